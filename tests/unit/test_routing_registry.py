"""Worker registry: idempotent registration, liveness on a fake clock, durable registrations."""

from __future__ import annotations

from pathlib import Path

import pytest

from cuga.services.routing.registry import SQLiteWorkerStore, WorkerRegistry
from cuga.shared.clock import FakeClock
from cuga.shared.errors import NotFoundError, ResourceExhaustedError


async def test_register_is_idempotent_by_id_and_updates_address_and_tools() -> None:
    clock = FakeClock()
    registry = WorkerRegistry(clock)
    first = await registry.register("w1", "h:1", ["a"], ["x"], {"zone": "eu"})
    registry.heartbeat("w1", 4, 0.2)
    clock.advance(1)
    again = await registry.register("w1", "h:2", ["a", "b"])
    assert len(registry) == 1
    assert again.address == "h:2"
    assert again.tools == frozenset({"a", "b"})
    assert again.capabilities == frozenset()
    assert again.registered_at == first.registered_at
    assert again.last_seen == clock.now()
    assert again.in_flight == 4  # the last reported load is kept until the next heartbeat


async def test_worker_is_unavailable_after_the_timeout_and_back_after_a_heartbeat() -> None:
    clock = FakeClock()
    registry = WorkerRegistry(clock, heartbeat_timeout_s=6.0)
    await registry.register("w1", "h:1", ["a"])
    clock.advance(6.0)
    record = registry.get("w1")
    assert record is not None and registry.is_available(record)  # exactly at the timeout
    clock.advance(0.001)
    assert not registry.is_available(record)
    back = registry.heartbeat("w1", 0, 0.0)
    assert registry.is_available(back)


async def test_registering_again_revives_an_unavailable_worker() -> None:
    clock = FakeClock()
    registry = WorkerRegistry(clock, heartbeat_timeout_s=1.0)
    await registry.register("w1", "h:1", ["a"])
    clock.advance(5)
    assert registry.is_available(await registry.register("w1", "h:1", ["a"]))


async def test_heartbeat_of_unknown_worker_is_not_found() -> None:
    registry = WorkerRegistry(FakeClock())
    with pytest.raises(NotFoundError, match="register it again"):
        registry.heartbeat("ghost", 0, 0.0)


async def test_deregister_is_idempotent() -> None:
    registry = WorkerRegistry(FakeClock())
    await registry.register("w1", "h:1", ["a"])
    assert await registry.deregister("w1") is True
    assert await registry.deregister("w1") is False
    assert registry.workers() == []


async def test_max_workers_refuses_new_ids_but_not_re_registration() -> None:
    registry = WorkerRegistry(FakeClock(), max_workers=1)
    await registry.register("w1", "h:1", ["a"])
    await registry.register("w1", "h:9", ["a"])
    with pytest.raises(ResourceExhaustedError, match="limit is 1"):
        await registry.register("w2", "h:2", ["a"])


async def test_page_orders_by_id_and_filters_by_tool() -> None:
    registry = WorkerRegistry(FakeClock())
    for worker_id, tools in [("w3", ["a"]), ("w1", ["a", "b"]), ("w2", ["b"]), ("w4", ["a"])]:
        await registry.register(worker_id, "h:1", tools)
    page, more = registry.page(limit=2, tool="a")
    assert [r.worker_id for r in page] == ["w1", "w3"] and more
    page, more = registry.page(after="w3", limit=2, tool="a")
    assert [r.worker_id for r in page] == ["w4"] and not more
    page, more = registry.page(limit=4)
    assert [r.worker_id for r in page] == ["w1", "w2", "w3", "w4"] and not more


async def test_registrations_survive_a_restart_and_heartbeats_are_not_written(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    store = SQLiteWorkerStore(tmp_path / "routing.db")
    registry = WorkerRegistry(clock, store=store, heartbeat_timeout_s=6.0)
    await registry.register("w1", "h:1", ["a"], ["x"], {"zone": "eu"})
    await registry.register("w2", "h:2", ["b"])
    await registry.deregister("w2")
    registry.heartbeat("w1", 7, 0.5)
    store.close()

    clock.advance(100)  # long after the last heartbeat: loaded workers count as seen now
    store = SQLiteWorkerStore(tmp_path / "routing.db")
    reloaded = WorkerRegistry(clock, store=store, heartbeat_timeout_s=6.0)
    [w1] = reloaded.workers()
    assert (w1.worker_id, w1.address, w1.tools, w1.capabilities) == (
        "w1",
        "h:1",
        frozenset({"a"}),
        frozenset({"x"}),
    )
    assert dict(w1.labels) == {"zone": "eu"}
    assert w1.in_flight == 0  # load is not persisted
    assert reloaded.is_available(w1)
    clock.advance(6.5)
    assert not reloaded.is_available(w1)
    store.close()
