"""The approval store on SQLite and PostgreSQL, and approval managers sharing one store.

The store's contract (idempotent inserts, compare-and-swap updates, the pending limit)
runs on both dialects. Several managers over one PostgreSQL database stand in for approval
replicas: each has its own store and connection pool, their calls race on one event loop
(on PostgreSQL every query is awaited, so their statements interleave on the server), and
cross-replica waking goes through the real LISTEN/NOTIFY.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from cuga.approval.v1 import approval_pb2
from cuga.common.v1 import common_pb2 as S
from cuga.services.approval import store as store_module
from cuga.services.approval.domain import ApprovalManager
from cuga.services.approval.policy import parse_policy
from cuga.services.approval.store import (
    PostgresApprovalStore,
    SqlApprovalStore,
    SQLiteApprovalStore,
    StoredRequest,
    open_approval_store,
    step_key,
)
from cuga.shared.auth import Identity
from cuga.shared.clock import FakeClock
from cuga.shared.errors import (
    AlreadyExistsError,
    CugaError,
    FailedPreconditionError,
    ResourceExhaustedError,
)
from cuga.shared.messages import timestamp
from tests.support.postgres import postgres_cluster, postgres_dsn  # noqa: F401
from tests.unit.test_approval_domain import POLICY, ask

pytestmark = pytest.mark.timeout(60)

APPROVE, DENY = approval_pb2.VERDICT_APPROVE, approval_pb2.VERDICT_DENY
RITA = Identity("rita", ("reviewer",))
ROB = Identity("rob", ("reviewer",))
PENDING = S.APPROVAL_STATUS_PENDING

#: Where approvals are stored: a SQLite file or a PostgreSQL DSN.
Location = Path | str
T = TypeVar("T")


@pytest.fixture(params=["sqlite", "postgres"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    """Each backend in turn."""
    if request.param == "sqlite":
        return tmp_path / "approval.db"
    return str(request.getfixturevalue("postgres_dsn"))


Stores = Callable[[], Awaitable[SqlApprovalStore]]


@pytest.fixture
async def stores(location: Location) -> AsyncIterator[Stores]:
    """Opens stores on one location (each its own connections); closes them afterwards."""
    opened: list[SqlApprovalStore] = []

    async def open_store() -> SqlApprovalStore:
        if isinstance(location, Path):
            store: SqlApprovalStore = SQLiteApprovalStore(location)
        else:
            store = PostgresApprovalStore(location)
            await store.open()
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        await store.aclose()


def pending(
    approval_id: str, step_id: str = "s1", *, tool: str = "db.drop", run_id: str = "r1"
) -> approval_pb2.ApprovalRequest:
    request = approval_pb2.ApprovalRequest(
        approval_id=approval_id,
        run_id=run_id,
        step_id=step_id,
        tool=tool,
        profile="default",
        status=PENDING,
        required_approvals=1,
    )
    request.created_at.CopyFrom(timestamp(100.0))
    request.expires_at.CopyFrom(timestamp(200.0))
    return request


def no_check(new: approval_pb2.ApprovalRequest, existing: StoredRequest) -> None:
    """Accepts whatever is stored."""


# ---------------------------------------------------------------------- the store


async def test_insert_is_idempotent_by_step_and_request_id(
    stores: Stores,
) -> None:
    a, b = await stores(), await stores()
    assert await a.insert(
        [(pending("apr_1"), "u", "k1")], profile="default", max_pending=9, check=no_check
    ) == [None]
    seen: list[tuple[str, str]] = []

    def record(new: approval_pb2.ApprovalRequest, existing: StoredRequest) -> None:
        seen.append((new.approval_id, existing.request.approval_id))

    # The same step again, from another connection: the stored request answers.
    (again,) = await b.insert(
        [(pending("apr_2"), "u", "")], profile="default", max_pending=9, check=record
    )
    assert again is not None and again.request.approval_id == "apr_1"
    # Another step under the same request id: the request id's owner answers.
    (reused,) = await b.insert(
        [(pending("apr_3", "s2"), "u", "k1")], profile="default", max_pending=9, check=record
    )
    assert reused is not None and reused.request_id == "k1"
    assert seen == [("apr_2", "apr_1"), ("apr_3", "apr_1")]
    assert await b.get("apr_2") is None and await b.get("apr_3") is None

    # A check that refuses undoes the whole batch.
    def refuse(new: approval_pb2.ApprovalRequest, existing: StoredRequest) -> None:
        raise AlreadyExistsError("step reused", reason="STEP_REUSED")

    with pytest.raises(AlreadyExistsError):
        await b.insert(
            [(pending("apr_4", "s4"), "u", ""), (pending("apr_5", "s1"), "u", "")],
            profile="default",
            max_pending=9,
            check=refuse,
        )
    assert await a.get("apr_4") is None and await a.count_all_pending() == 1


async def test_by_steps_finds_the_requests_of_a_batch_by_step_key(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await stores()
    superseding = pending("apr_4")
    superseding.supersedes = "apr_1"
    rows = [pending("apr_1"), pending("apr_2", "s2"), pending("apr_3", run_id="r2"), superseding]
    await store.insert(
        [(r, "u", "") for r in rows], profile="default", max_pending=9, check=no_check
    )
    # Two keys per query: six keys (one repeated, two with nothing stored) take three.
    monkeypatch.setattr(store_module, "KEYS_PER_QUERY", 2)
    found = await store.by_steps("r1", ["s1", "s3", step_key("s1", "apr_1"), "s1", "s9", "s2"])
    assert {key: stored.request.approval_id for key, stored in found.items()} == {
        "s1": "apr_1",
        "s1#apr_1": "apr_4",
        "s2": "apr_2",
    }
    assert found["s1#apr_1"].request == superseding and found["s1"].user_id == "u"
    assert await store.by_steps("r2", ["s1"]) == {"s1": await store.get("apr_3")}
    assert await store.by_steps("r3", ["s1"]) == {}


async def test_update_is_a_compare_and_swap(stores: Stores) -> None:
    a, b = await stores(), await stores()
    await a.insert([(pending("apr_1"), "u", "")], profile="default", max_pending=9, check=no_check)
    read_a, read_b = await a.get("apr_1"), await b.get("apr_1")
    assert read_a is not None and read_b is not None and read_a.version == read_b.version == 0
    approved = approval_pb2.ApprovalRequest()
    approved.CopyFrom(read_a.request)
    approved.status = S.APPROVAL_STATUS_APPROVED
    approved.decisions.add(reviewer="rita", verdict=APPROVE)
    denied = approval_pb2.ApprovalRequest()
    denied.CopyFrom(read_b.request)
    denied.status = S.APPROVAL_STATUS_DENIED
    denied.decisions.add(reviewer="rob", verdict=DENY, reason="no")
    assert await a.update(approved, version=0, decision_key=("d1", "rita"))
    # B read the same version: its write loses and changes nothing.
    assert not await b.update(denied, version=0, decision_key=("d2", "rob"))
    now = await b.get("apr_1")
    assert now is not None and now.version == 1 and now.request == approved
    assert (
        await b.decision_key("d1", "rita") == "apr_1" and await b.decision_key("d2", "rob") is None
    )
    assert await b.count_all_pending() == 0 and await b.due(1e12) == []


async def test_pending_limit_is_counted_with_the_insert(stores: Stores) -> None:
    a, b = await stores(), await stores()
    await a.insert(
        [(pending("apr_1"), "u", ""), (pending("apr_2", "s2"), "u", "")],
        profile="default",
        max_pending=2,
        check=no_check,
    )
    with pytest.raises(ResourceExhaustedError, match="has 2 pending approvals; the limit is 2"):
        await b.insert(
            [(pending("apr_3", "s3"), "u", "")], profile="default", max_pending=2, check=no_check
        )
    assert await b.count_pending("default") == 2 and await b.get("apr_3") is None
    # A repeat of a stored step stores nothing, so the limit does not refuse it.
    (again,) = await b.insert(
        [(pending("apr_9"), "u", "")], profile="default", max_pending=2, check=no_check
    )
    assert again is not None and again.request.approval_id == "apr_1"


async def test_open_approval_store_validates(tmp_path: Path) -> None:
    store = open_approval_store("sqlite", data_dir=tmp_path)
    await store.open()
    await store.aclose()
    assert (tmp_path / "approval.db").exists()
    with pytest.raises(ValueError, match="DSN"):
        open_approval_store("postgres", data_dir=tmp_path, dsn=" ")
    with pytest.raises(ValueError, match="sqlite, postgres"):
        open_approval_store("mysql", data_dir=tmp_path)


async def test_sqlite_file_from_before_versions_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "approval.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        """CREATE TABLE approvals (approval_id TEXT PRIMARY KEY, request_id TEXT,
        run_id TEXT NOT NULL, step_id TEXT NOT NULL, profile TEXT NOT NULL,
        user_id TEXT NOT NULL, status INTEGER NOT NULL, created_at REAL NOT NULL,
        expires_at REAL NOT NULL, body BLOB NOT NULL, UNIQUE (run_id, step_id));"""
    )
    conn.execute(
        "INSERT INTO approvals VALUES ('apr_old', NULL, 'r1', 's1', 'default', 'u', ?, 100, 200, ?)",
        (PENDING, pending("apr_old").SerializeToString()),
    )
    conn.commit()
    conn.close()
    store = SQLiteApprovalStore(path)
    old = await store.get("apr_old")
    assert old is not None and old.version == 0 and old.request.status == PENDING
    approved = approval_pb2.ApprovalRequest()
    approved.CopyFrom(old.request)
    approved.status = S.APPROVAL_STATUS_APPROVED
    assert await store.update(approved, version=0)
    store.close()  # the SQLite store also closes synchronously (the embedded engine)


# ---------------------------------------------------------------------- managers on one store


def manager(store: SqlApprovalStore, clock: FakeClock, **kw: Any) -> ApprovalManager:
    return ApprovalManager(store, parse_policy(POLICY), clock=clock, **kw)


async def test_two_managers_share_requests_and_partial_approvals(
    stores: Stores,
) -> None:
    clock = FakeClock()
    a, b = manager(await stores(), clock), manager(await stores(), clock)
    first = await a.request_approval(ask("v", "vault.open", request_id="k1"))
    assert first.required_approvals == 2
    # B answers the same request id / step with A's request.
    assert await b.request_approval(ask("v", "vault.open", request_id="k1")) == first
    assert await b.request_approval(ask("v", "vault.open", request_id="k2")) == first
    with pytest.raises(AlreadyExistsError, match="another step"):
        await b.request_approval(ask("w", "vault.open", request_id="k1"))
    assert (await b.list_pending())[0] == [first]
    half = await a.submit_decision(first.approval_id, APPROVE, "ok", RITA)
    assert half.status == PENDING
    # B sees A's approval: rita cannot approve twice, rob completes it.
    with pytest.raises(FailedPreconditionError, match="already approved"):
        await b.submit_decision(first.approval_id, APPROVE, "again", RITA)
    done = await b.submit_decision(first.approval_id, APPROVE, "ok", ROB)
    assert done.status == S.APPROVAL_STATUS_APPROVED
    assert [d.reviewer for d in done.decisions] == ["rita", "rob"]
    assert await a.get_request(first.approval_id) == done
    with pytest.raises(FailedPreconditionError) as late:
        await a.submit_decision(first.approval_id, DENY, "late", Identity("sam", ("reviewer",)))
    assert late.value.reason == "ALREADY_APPROVED"


# ---------------------------------------------------------------------- replicas on PostgreSQL


async def race(*calls: Callable[[], Awaitable[T]]) -> list[T | CugaError]:
    """Start the calls together; each one's result or refusal."""

    async def run(call: Callable[[], Awaitable[T]]) -> T | CugaError:
        try:
            return await call()
        except CugaError as exc:
            return exc

    return list(await asyncio.gather(*(run(c) for c in calls)))


@pytest.fixture
async def pg_stores(postgres_dsn: str) -> AsyncIterator[Stores]:  # noqa: F811
    opened: list[SqlApprovalStore] = []

    async def open_store() -> SqlApprovalStore:
        store = PostgresApprovalStore(postgres_dsn)
        await store.open()
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        await store.aclose()


async def test_racing_replicas_store_one_request_per_step(
    pg_stores: Stores,
) -> None:
    clock = FakeClock()
    a, b = manager(await pg_stores(), clock), manager(await pg_stores(), clock)
    for i in range(8):
        results = await race(
            lambda i=i: a.request_approval(ask(f"s{i}", request_id=f"k{i}")),  # type: ignore[misc]
            lambda i=i: b.request_approval(ask(f"s{i}", request_id=f"k{i}")),  # type: ignore[misc]
        )
        assert all(isinstance(r, approval_pb2.ApprovalRequest) for r in results), results
        ids = {r.approval_id for r in results if isinstance(r, approval_pb2.ApprovalRequest)}
        assert len(ids) == 1
    assert len((await a.list_pending())[0]) == 8


async def test_racing_decisions_are_decided_once(pg_stores: Stores) -> None:
    clock = FakeClock()
    a, b = manager(await pg_stores(), clock), manager(await pg_stores(), clock)
    for i in range(6):
        # Two approvers of a 2-key request: neither approval is lost.
        two = await a.request_approval(ask(f"v{i}", "vault.open"))
        both = await race(
            lambda aid=two.approval_id: a.submit_decision(aid, APPROVE, "ok", RITA),  # type: ignore[misc]
            lambda aid=two.approval_id: b.submit_decision(aid, APPROVE, "ok", ROB),  # type: ignore[misc]
        )
        assert all(isinstance(r, approval_pb2.ApprovalRequest) for r in both), both
        final = await b.get_request(two.approval_id)
        assert final.status == S.APPROVAL_STATUS_APPROVED
        assert sorted(d.reviewer for d in final.decisions) == ["rita", "rob"]
        # Approve on A against deny on B: one decides, the other is late.
        one = await a.request_approval(ask(f"s{i}"))
        results = await race(
            lambda aid=one.approval_id: a.submit_decision(aid, APPROVE, "ok", RITA),  # type: ignore[misc]
            lambda aid=one.approval_id: b.submit_decision(aid, DENY, "no", ROB),  # type: ignore[misc]
        )
        won = [r for r in results if isinstance(r, approval_pb2.ApprovalRequest)]
        lost = [r for r in results if isinstance(r, FailedPreconditionError)]
        assert len(won) == 1 and len(lost) == 1, results
        final = await a.get_request(one.approval_id)
        assert final == won[0] and len(final.decisions) == 1
        assert lost[0].reason == f"ALREADY_{S.ApprovalStatus.Name(final.status)[16:]}"


async def test_racing_expiry_sweeps_expire_once(
    pg_stores: Stores, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    a, b = manager(await pg_stores(), clock), manager(await pg_stores(), clock)
    ids = [(await a.request_approval(ask(f"s{i}"))).approval_id for i in range(10)]
    clock.advance(120)  # the `sensitive` rule's timeout
    caplog.set_level(logging.INFO, logger="cuga.approval")
    # list_pending runs the expiry sweep first, on both replicas at once.
    pages = await race(lambda: a.list_pending(), lambda: b.list_pending())
    assert pages == [([], ""), ([], "")]
    expired = [r for r in caplog.records if r.getMessage().startswith("approval expired")]
    assert sorted(r.getMessage().split()[2] for r in expired) == sorted(ids)
    for approval_id in ids:
        assert (await b.get_request(approval_id)).status == S.APPROVAL_STATUS_EXPIRED


@asynccontextmanager
async def started(
    store: SqlApprovalStore, clock: FakeClock, **kw: Any
) -> AsyncIterator[ApprovalManager]:
    m = manager(store, clock, **kw)
    await m.start()
    try:
        yield m
    finally:
        await m.close()


async def test_wait_on_b_is_woken_by_a_decision_on_a(
    pg_stores: Stores,
) -> None:
    clock = FakeClock()
    a = manager(await pg_stores(), clock)
    # Re-checks far apart: only the notification can answer within the wait.
    async with started(await pg_stores(), clock, recheck_s=300) as b:
        req = await a.request_approval(ask())
        waiter = asyncio.ensure_future(b.await_decision(req.approval_id))
        await asyncio.wait_for(b.until_waiting(1), 5)
        decided = await a.submit_decision(req.approval_id, APPROVE, "ok", RITA)
        assert await asyncio.wait_for(waiter, 10) == decided
        assert b.waiting == 0


async def test_b_expires_a_request_made_on_a(pg_stores: Stores) -> None:
    clock = FakeClock()
    a = manager(await pg_stores(), clock)  # never started: as if it died after asking
    async with started(await pg_stores(), clock, recheck_s=300) as b:
        await b.request_approval(ask("s0"))  # 120 s: B's expiry task sleeps until then
        await asyncio.wait_for(clock.until_sleepers(1), 10)  # B's expiry task sleeps
        # Only A's notification can tell B's expiry task about this earlier one.
        req = await a.request_approval(ask("p", "pay", sensitive=False, amount=500))  # 30 s
        waiter = asyncio.ensure_future(b.await_decision(req.approval_id))
        await asyncio.wait_for(b.until_waiting(1), 5)
        clock.advance(30)
        out = await asyncio.wait_for(waiter, 10)
        assert out.status == S.APPROVAL_STATUS_EXPIRED and out.decided_at == req.expires_at


async def test_a_lost_notification_only_delays(
    pg_stores: Stores,
    postgres_dsn: str,  # noqa: F811
) -> None:
    clock = FakeClock()
    a = await pg_stores()
    async with started(await pg_stores(), clock, recheck_s=0.1) as b:
        req = await manager(a, clock).request_approval(ask())
        waiter = asyncio.ensure_future(b.await_decision(req.approval_id))
        await asyncio.wait_for(b.until_waiting(1), 5)
        # A decision written without a NOTIFY (as if the notification were lost).
        approved = approval_pb2.ApprovalRequest()
        approved.CopyFrom(req)
        approved.status = S.APPROVAL_STATUS_APPROVED
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute(
                "UPDATE approvals SET status = %s, body = %s, version = version + 1"
                " WHERE approval_id = %s",
                (approved.status, approved.SerializeToString(), req.approval_id),
            )
        assert (await asyncio.wait_for(waiter, 10)).status == S.APPROVAL_STATUS_APPROVED


async def test_waiters_recheck_after_the_listener_reconnects(
    pg_stores: Stores,
    postgres_dsn: str,  # noqa: F811
) -> None:
    clock = FakeClock()
    async with started(await pg_stores(), clock, recheck_s=300) as b:
        req = await b.request_approval(ask())
        waiter = asyncio.ensure_future(b.await_decision(req.approval_id))
        await asyncio.wait_for(b.until_waiting(1), 5)
        approved = approval_pb2.ApprovalRequest()
        approved.CopyFrom(req)
        approved.status = S.APPROVAL_STATUS_APPROVED
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            # Decided while nobody could hear it, then the listening session dies.
            conn.execute(
                "UPDATE approvals SET status = %s, body = %s, version = version + 1"
                " WHERE approval_id = %s",
                (approved.status, approved.SerializeToString(), req.approval_id),
            )
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query LIKE 'LISTEN %'"
                " AND pid <> pg_backend_pid()"
            )
        assert (await asyncio.wait_for(waiter, 10)).status == S.APPROVAL_STATUS_APPROVED
