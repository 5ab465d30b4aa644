"""CoordinatorService: proto in, engine call, proto out.

Besides mapping, the servicer applies the caller-dependent rules of the service:

* the requester of a run is the caller's identity, never a field the caller fills in; a
  caller holding the ``delegate`` role may name another ``user_id`` (it acts for that end
  user), and then both are recorded (``user_id`` and ``delegate_id``);
* profile isolation: a caller scoped to profiles never sees another profile's runs, which
  answer NOT_FOUND exactly as absent ones do (a ``run_id`` chosen by the caller that another
  profile's run holds included); ``request_id`` deduplication is per requester and profile;
* the per-identity limit on concurrent streams.

A stream message carries every event that is ready when it is written (``events``, see
:meth:`CoordinatorAgent.watch_batches`): one event a message while the reader keeps up,
several once it falls behind or on a replay, so a busy coordinator writes fewer messages.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import AsyncIterator, Iterator

import grpc

from cuga.common.v1 import common_pb2
from cuga.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from cuga.orchestrator import CoordinatorAgent
from cuga.shared.auth import (
    ROLE_DELEGATE,
    check_profile_access,
    current_identity,
    is_visible,
    profile_filter,
)
from cuga.shared.errors import (
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
)
from cuga.shared.validation import check_request_id


def set_requester(context: common_pb2.ExecutionContext) -> None:
    """Make the run's requester the authenticated caller (in place).

    Without an identity (auth off and no credentials, or in process) ``user_id`` stays as
    sent. A caller with the ``delegate`` role may name another user: ``delegate_id``
    records the caller.

    Raises:
        InvalidArgumentError: ``delegate_id`` was sent (only the coordinator sets it).
        PermissionDeniedError: ``user_id`` names someone else and the caller may not
            delegate (NOT_A_DELEGATE).
    """
    if context.delegate_id:
        raise InvalidArgumentError("context.delegate_id", "is set by the coordinator, not sent")
    identity = current_identity()
    if identity is None:
        return
    if context.user_id and context.user_id != identity.name:
        if not identity.has_role(ROLE_DELEGATE):
            raise PermissionDeniedError(
                f"context.user_id: {identity.name!r} starts runs as itself; naming another"
                f" user ({context.user_id[:64]!r}) needs the {ROLE_DELEGATE!r} role",
                reason="NOT_A_DELEGATE",
            )
        context.delegate_id = identity.name
        return
    context.user_id = identity.name


class StreamLimiter:
    """Counts open streams per caller identity and refuses one past the limit."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._open: collections.Counter[str] = collections.Counter()

    def open_streams(self, who: str) -> int:
        """Streams ``who`` holds open now."""
        return self._open[who]

    @contextlib.contextmanager
    def stream(self) -> Iterator[None]:
        """Hold one stream slot of the current caller for the block.

        Raises:
            ResourceExhaustedError: the caller already holds the limit.
        """
        identity = current_identity()
        who = identity.name if identity is not None else ""
        if self._open[who] >= self._limit:
            raise ResourceExhaustedError(
                f"{who or 'this caller'} already has {self._limit} open streams"
                " (coordinator.max_streams_per_identity); close one first",
                reason="TOO_MANY_STREAMS",
            )
        self._open[who] += 1
        try:
            yield
        finally:
            self._open[who] -= 1
            if not self._open[who]:
                del self._open[who]


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    """Streams runs' lifecycles; a dropped stream leaves the run running."""

    def __init__(self, agent: CoordinatorAgent, *, max_streams_per_identity: int = 512) -> None:
        self._agent = agent
        self.streams = StreamLimiter(max_streams_per_identity)

    async def _visible_run(self, run_id: str) -> coordinator_pb2.Run:
        run = await self._agent.get_run(run_id)
        if not is_visible(run.context.profile):
            # Same answer as for a run that does not exist: nothing leaks across profiles.
            raise NotFoundError(f"run {run_id} not found")
        return run

    async def _free_run_id(self, run_id: str) -> None:
        """A chosen run id held by a run the caller may not see is NOT_FOUND, as any other
        unknown run; one of the caller's own runs is the engine's FAILED_PRECONDITION."""
        try:
            run = await self._agent.get_run(run_id)
        except NotFoundError:
            return
        if not is_visible(run.context.profile):
            raise NotFoundError(f"run {run_id} not found")

    async def Orchestrate(
        self, request: coordinator_pb2.OrchestrateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.OrchestrateResponse]:
        # Malformed fields first, named as sent, before the rules that read them.
        self._agent.validate(request)
        check_profile_access(request.context.profile)
        set_requester(request.context)
        if request.context.run_id:
            await self._free_run_id(request.context.run_id)
        with self.streams.stream():
            run_id = await self._agent.start(request)
            async for batch in self._agent.watch_batches(run_id, 0):
                yield coordinator_pb2.OrchestrateResponse(events=batch)

    async def Resume(
        self, request: coordinator_pb2.ResumeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.ResumeResponse]:
        check_request_id(request.request_id)
        which = request.WhichOneof("target")
        if which is None:
            raise InvalidArgumentError("target", "set run_id or partial")
        target = request.run_id if which == "run_id" else request.partial
        retry = request.retry_policy if request.HasField("retry_policy") else None
        self._agent.validate_resume(
            target, error_strategy=request.error_strategy, retry_policy=retry
        )
        await self._visible_run(request.run_id if which == "run_id" else request.partial.run_id)
        with self.streams.stream():
            run_id, after = await self._agent.start_resume(
                target, error_strategy=request.error_strategy, retry_policy=retry
            )
            async for batch in self._agent.watch_batches(run_id, after):
                yield coordinator_pb2.ResumeResponse(events=batch)

    async def Watch(
        self, request: coordinator_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.WatchResponse]:
        await self._visible_run(request.run_id)
        with self.streams.stream():
            async for batch in self._agent.watch_batches(request.run_id, request.after_seq):
                yield coordinator_pb2.WatchResponse(events=batch)

    async def GetRun(
        self, request: coordinator_pb2.GetRunRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.GetRunResponse:
        return coordinator_pb2.GetRunResponse(run=await self._visible_run(request.run_id))

    async def ListRuns(
        self, request: coordinator_pb2.ListRunsRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.ListRunsResponse:
        scoped = coordinator_pb2.ListRunsRequest()
        scoped.CopyFrom(request)
        scoped.profile = profile_filter(request.profile)
        return await self._agent.list_runs(scoped)

    async def CancelRun(
        self, request: coordinator_pb2.CancelRunRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.CancelRunResponse:
        check_request_id(request.request_id)
        await self._visible_run(request.run_id)
        run = await self._agent.cancel_run(request.run_id, request.reason)
        return coordinator_pb2.CancelRunResponse(run=run)
