"""Every audit Query and Export input gets a mapped answer, never INTERNAL (issue 20, item 10).

The attack, before: two inputs an auditor may send answered INTERNAL. ``end_time``
9999-12-31 overflowed the backends' nanosecond columns (int64 ns ends in 2262), and a page
token whose chain index was past int64 made the SQL driver raise OverflowError.

Now the time bounds are clamped to what a record can hold (records are stamped before
2200): an ``end_time`` after that is no bound, a ``start_time`` after it matches nothing.
A page token's index past 2^63 - 1 is INVALID_ARGUMENT naming ``page_token``. Every other
input, drawn by hypothesis over real gRPC against each backend, answers OK or a mapped
refusal naming a field of the request.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cuga.audit.v1 import audit_pb2, audit_pb2_grpc
from cuga.services.audit.app import build
from cuga.shared.bootstrap import RunningServer
from cuga.shared.errors import InvalidArgumentError, from_rpc_error
from cuga.shared.validation import MAX_TIMESTAMP_SECONDS, encode_page_token
from tests.support.postgres import postgres_cluster, postgres_dsn  # noqa: F401
from tests.support.servers import as_identity, make_settings, running_service

pytestmark = pytest.mark.filterwarnings(
    # The service runs on its own thread, and OpenTelemetry's span ids come from the global
    # `random`: hypothesis sees that state move during a draw and blames the strategy.
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning"
)

BACKENDS = ["sqlite", "jsonl", pytest.param("postgres", marks=pytest.mark.postgres)]
TRACES = ["a" * 32, "b" * 32, "c" * 32]
#: 2262-04-11T23:47:16Z: the last second an int64 count of nanoseconds reaches.
INT64_NS_LAST_SECOND = (2**63 - 1) // 1_000_000_000
AUDITOR = as_identity("auditor")


class BackgroundAudit:
    """The audit service through the production bootstrap, on its own loop in a thread
    (hypothesis drives plain synchronous calls)."""

    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        self._settings = make_settings(data_dir, env)
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),))
        self.server: RunningServer | None = None
        self.error: BaseException | None = None

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        try:
            async with running_service("audit", build, self._settings) as server:
                self.server = server
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            self.error = exc
            self._ready.set()

    def __enter__(self) -> str:
        self._thread.start()
        assert self._ready.wait(60), "the audit service did not start"
        if self.error is not None:
            raise self.error
        assert self.server is not None
        return self.server.address

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)


@pytest.fixture(params=BACKENDS)
def audit(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[grpc.Channel]:
    """A channel to an audit service on ``request.param`` holding three traces of three
    records each."""
    env = {"CUGA_AUDIT__BACKEND": request.param}
    if request.param == "postgres":
        env["CUGA_AUDIT__DSN"] = request.getfixturevalue("postgres_dsn")
    with (
        BackgroundAudit(tmp_path / "data", env) as address,
        grpc.insecure_channel(address) as channel,
    ):
        records = [
            audit_pb2.AuditRecord(
                record_id=f"r-{t}-{i}", trace_id=trace, run_id=f"run-{t}", kind="run_started"
            )
            for t, trace in enumerate(TRACES)
            for i in range(3)
        ]
        audit_pb2_grpc.AuditServiceStub(channel).RecordBatch(
            audit_pb2.RecordBatchRequest(records=records),
            timeout=10,
            metadata=as_identity("coordinator"),
        )
        yield channel


def _ts(seconds: int, nanos: int = 0) -> Timestamp:
    return Timestamp(seconds=seconds, nanos=nanos)


def _query(channel: grpc.Channel, request: audit_pb2.QueryRequest) -> audit_pb2.QueryResponse:
    return audit_pb2_grpc.AuditServiceStub(channel).Query(request, timeout=10, metadata=AUDITOR)


def _export(channel: grpc.Channel, flt: audit_pb2.RecordFilter) -> list[str]:
    stream = audit_pb2_grpc.AuditServiceStub(channel).Export(
        audit_pb2.ExportRequest(filter=flt), timeout=10, metadata=AUDITOR
    )
    return [r.json_line for r in stream]


def _ids(response: audit_pb2.QueryResponse) -> list[str]:
    return [r.record_id for r in response.records]


def _refusal(call: Any) -> InvalidArgumentError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    exc: Any = info.value
    error = from_rpc_error(exc.code(), exc.details(), exc.trailing_metadata())
    assert isinstance(error, InvalidArgumentError), f"{exc.code().name}: {exc.details()}"
    return error


@pytest.mark.parametrize(
    "end",
    [
        _ts(MAX_TIMESTAMP_SECONDS, 999_999_999),  # 9999-12-31T23:59:59.999999999Z
        _ts(INT64_NS_LAST_SECOND + 1),  # the first second past int64 nanoseconds
        _ts(INT64_NS_LAST_SECOND, 999_999_999),
    ],
    ids=["9999-12-31", "2262-first-second-past-int64", "2262-last-nanosecond"],
)
def test_an_end_time_past_what_a_record_can_hold_is_no_bound(
    audit: grpc.Channel, end: Timestamp
) -> None:
    everything = _query(audit, audit_pb2.QueryRequest(page_size=100))
    assert len(everything.records) == 9
    bounded = _query(
        audit, audit_pb2.QueryRequest(filter=audit_pb2.RecordFilter(end_time=end), page_size=100)
    )
    assert _ids(bounded) == _ids(everything)
    since_2000 = audit_pb2.RecordFilter(start_time=_ts(946_684_800), end_time=end)
    assert _ids(_query(audit, audit_pb2.QueryRequest(filter=since_2000))) == _ids(everything)
    assert len(_export(audit, audit_pb2.RecordFilter(end_time=end))) == 9


def test_a_start_time_past_what_a_record_can_hold_matches_nothing(audit: grpc.Channel) -> None:
    for start in (_ts(MAX_TIMESTAMP_SECONDS - 1), _ts(INT64_NS_LAST_SECOND + 1)):
        flt = audit_pb2.RecordFilter(start_time=start)
        response = _query(audit, audit_pb2.QueryRequest(filter=flt))
        assert not response.records and not response.next_page_token
        assert _export(audit, flt) == []
        flt.end_time.CopyFrom(_ts(MAX_TIMESTAMP_SECONDS))
        assert not _query(audit, audit_pb2.QueryRequest(filter=flt)).records


@pytest.mark.parametrize(
    "index",
    [str(2**63), str(10**30), "9" * 400, "²", "١٢"],
    ids=["2^63", "10^30", "400-digits", "superscript-two", "arabic-indic-digits"],
)
def test_a_page_token_index_past_int64_is_invalid_argument(audit: grpc.Channel, index: str) -> None:
    token = encode_page_token(f"{TRACES[0]}:{index}")
    error = _refusal(lambda: _query(audit, audit_pb2.QueryRequest(page_token=token)))
    assert error.field == "page_token"


def test_the_largest_page_token_index_is_an_empty_page(audit: grpc.Channel) -> None:
    token = encode_page_token(f"{TRACES[2]}:{2**63 - 1}")
    response = _query(audit, audit_pb2.QueryRequest(page_token=token))
    assert not response.records and not response.next_page_token
    # And paging from the start walks every record, in order, across pages.
    seen: list[str] = []
    token = ""
    while True:
        page = _query(audit, audit_pb2.QueryRequest(page_size=2, page_token=token))
        seen.extend(_ids(page))
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == 9 == len(set(seen))


# -- every other input -------------------------------------------------------------------

_SECONDS = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from(
        [
            -1,
            0,
            1,
            MAX_TIMESTAMP_SECONDS,
            MAX_TIMESTAMP_SECONDS + 1,
            INT64_NS_LAST_SECOND,
            INT64_NS_LAST_SECOND + 1,
            7_258_118_400,  # 2200-01-01
            -62_135_596_800,  # 0001-01-01
        ]
    ),
)
_NANOS = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([-1, 0, 999_999_999, 10**9]))
_TIMESTAMPS = st.builds(Timestamp, seconds=_SECONDS, nanos=_NANOS)
_INDEX = st.one_of(
    st.integers(0, 2**70).map(str),
    st.sampled_from([str(2**63 - 1), str(2**63), "-1", "+1", " 1", "1_000", "0x10", ""]),
    st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=30),
)
_TOKENS = st.one_of(
    st.just(""),
    st.text(max_size=60),
    st.builds(lambda t, i: encode_page_token(f"{t}:{i}"), st.sampled_from(TRACES), _INDEX),
    st.text(max_size=80).map(encode_page_token),
)


@st.composite
def _filters(draw: st.DrawFn) -> audit_pb2.RecordFilter:
    flt = audit_pb2.RecordFilter()
    if draw(st.booleans()):
        flt.start_time.CopyFrom(draw(_TIMESTAMPS))
    if draw(st.booleans()):
        flt.end_time.CopyFrom(draw(_TIMESTAMPS))
    if draw(st.booleans()):
        flt.trace_id = draw(st.sampled_from([*TRACES, "A" * 32, "", "x" * 200]))
    if draw(st.booleans()):
        flt.run_id = draw(st.sampled_from(["run-0", "run 0", "r" * 129, ""]))
    if draw(st.booleans()):
        flt.profile = draw(st.sampled_from(["default", "p" * 129, "a/b", ""]))
    flt.kinds.extend(draw(st.lists(st.sampled_from(["run_started", "plan", "nope"]), max_size=3)))
    return flt


#: The fields a refusal of Query or Export may name.
FIELDS = {
    "page_size",
    "page_token",
    "filter.start_time",
    "filter.end_time",
    "filter.trace_id",
    "filter.run_id",
    "filter.profile",
    *(f"filter.kinds[{i}]" for i in range(3)),
}


def test_no_query_or_export_input_answers_internal(audit: grpc.Channel) -> None:
    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(
        flt=_filters(),
        size=st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 1000, 1001])),
        token=_TOKENS,
    )
    def check(flt: audit_pb2.RecordFilter, size: int, token: str) -> None:
        request = audit_pb2.QueryRequest(filter=flt, page_size=size, page_token=token)
        for call in (lambda: _query(audit, request), lambda: _export(audit, flt)):
            try:
                call()
            except grpc.RpcError as exc:
                rpc: Any = exc
                error = from_rpc_error(rpc.code(), rpc.details(), rpc.trailing_metadata())
                assert isinstance(error, InvalidArgumentError), (
                    f"{rpc.code().name} ({rpc.details()}) for {request!r}"
                )
                assert error.field in FIELDS, f"named {error.field!r} for {request!r}"

    check()
