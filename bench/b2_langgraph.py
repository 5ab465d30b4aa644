"""B2: LangGraph — a 50-node sequential StateGraph of no-op nodes, durable and in memory.

Each node stamps ``perf_counter`` on entry; the time between consecutive nodes is what one
node costs the framework (scheduling, state update, checkpoint write). ``SqliteSaver`` in a
temp file with ``durability="sync"`` persists each step's checkpoint before the next node
starts — the same guarantee as our run store, which writes each step's result before its
event is published — and that is the headline figure. LangGraph's default
``durability="async"`` (the checkpoint is written while the next node runs) and the
in-memory saver are reported beside it.
"""

from __future__ import annotations

import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict

from bench.stats import intervals, summarize_rounds


@dataclass(frozen=True)
class GraphSizes:
    """How much B2 measures."""

    nodes: int = 50
    """Nodes in the sequential graph."""
    warmup: int = 2
    """Invocations before measuring (per saver)."""
    rounds: int = 9
    """Measured invocations per saver, each on a fresh thread id."""


class _State(TypedDict):
    n: int


def _build(nodes: int, stamps: list[float], checkpointer: Any) -> Any:
    from langgraph.graph import END, START, StateGraph

    def make(i: int) -> Callable[[_State], dict[str, int]]:
        def node(state: _State) -> dict[str, int]:
            stamps.append(time.perf_counter())
            return {"n": state["n"] + 1}

        node.__name__ = f"n{i}"
        return node

    graph = StateGraph(_State)
    for i in range(nodes):
        graph.add_node(f"n{i}", make(i))  # type: ignore[call-overload]
    graph.add_edge(START, "n0")
    for i in range(1, nodes):
        graph.add_edge(f"n{i - 1}", f"n{i}")
    graph.add_edge(f"n{nodes - 1}", END)
    return graph.compile(checkpointer=checkpointer)


def _measure(
    sizes: GraphSizes, checkpointer: Any, durability: Literal["sync", "async", "exit"]
) -> dict[str, float]:
    stamps: list[float] = []
    app = _build(sizes.nodes, stamps, checkpointer)
    rounds: list[list[float]] = []
    for i in range(sizes.warmup + sizes.rounds):
        stamps.clear()
        config = {"configurable": {"thread_id": f"{durability}-{i}"}}
        out = app.invoke({"n": 0}, config, durability=durability)
        assert out["n"] == sizes.nodes, out
        if i >= sizes.warmup:
            rounds.append(intervals(stamps))
    return summarize_rounds(rounds, scale=1e6)


class GraphRunner:
    """A compiled graph on one saver; :meth:`invoke` runs it once on a fresh thread id."""

    def __init__(self, nodes: int, checkpointer: Any, name: str) -> None:
        self._stamps: list[float] = []
        self._app = _build(nodes, self._stamps, checkpointer)
        self._nodes = nodes
        self._name = name
        self._count = 0

    def invoke(self) -> list[float]:
        """One invocation (``durability="sync"``); the gaps between nodes, seconds."""
        self._stamps.clear()
        self._count += 1
        config = {"configurable": {"thread_id": f"{self._name}-{self._count}"}}
        out = self._app.invoke({"n": 0}, config, durability="sync")
        assert out["n"] == self._nodes, out
        return intervals(self._stamps)


@contextmanager
def sqlite_saver_graph(synchronous: str, nodes: int = 50) -> Iterator[GraphRunner]:
    """The graph on ``SqliteSaver`` in a temp file at durability ``synchronous``:
    ``full`` is ``SqliteSaver`` as shipped (WAL, SQLite's default ``synchronous=FULL``,
    checked), ``normal`` the same on a connection set to ``synchronous=NORMAL``."""
    from langgraph.checkpoint.sqlite import SqliteSaver

    with tempfile.TemporaryDirectory(prefix=f"cuga-bench-lg-{synchronous}-") as tmp:
        if synchronous == "full":
            with SqliteSaver.from_conn_string(str(Path(tmp) / "checkpoints.db")) as saver:
                saver.setup()
                level = saver.conn.execute("PRAGMA synchronous").fetchone()[0]
                if level != 2:
                    raise RuntimeError(f"SqliteSaver as shipped runs synchronous={level}, not FULL")
                yield GraphRunner(nodes, saver, "full")
            return
        conn = sqlite3.connect(str(Path(tmp) / "normal.db"), check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            yield GraphRunner(nodes, SqliteSaver(conn), "normal")
        finally:
            conn.close()


def run_b2(sizes: GraphSizes) -> dict[str, Any]:
    """Measure the graph with SqliteSaver (sync and async durability) and InMemorySaver."""
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.checkpoint.sqlite import SqliteSaver

    with tempfile.TemporaryDirectory(prefix="cuga-bench-lg-") as tmp:
        with SqliteSaver.from_conn_string(str(Path(tmp) / "checkpoints.db")) as saver:
            sync = _measure(sizes, saver, "sync")
            asynchronous = _measure(sizes, saver, "async")
            pragma = saver.conn.execute("PRAGMA journal_mode").fetchone()[0]
            synchronous = saver.conn.execute("PRAGMA synchronous").fetchone()[0]
        # SqliteSaver leaves synchronous at SQLite's FULL (fsync per commit); our stores use
        # WAL + NORMAL. The same durability level as ours, for a like-for-like reading:
        conn = sqlite3.connect(str(Path(tmp) / "normal.db"), check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            normal = _measure(sizes, SqliteSaver(conn), "sync")
        finally:
            conn.close()
    memory = _measure(sizes, InMemorySaver(), "sync")
    return {
        "sqlite_node_p50_us": sync["p50"],
        "sqlite_node_p99_us": sync["p99"],
        "sqlite_async_node_p50_us": asynchronous["p50"],
        "sqlite_normal_node_p50_us": normal["p50"],
        "sqlite_normal_node_p99_us": normal["p99"],
        "sqlite_async_node_p99_us": asynchronous["p99"],
        "memory_node_p50_us": memory["p50"],
        "memory_node_p99_us": memory["p99"],
        "nodes": sizes.nodes,
        "rounds": sizes.rounds,
        "sqlite_journal_mode": str(pragma),
        "sqlite_synchronous": int(synchronous),
    }


__all__ = ["GraphRunner", "GraphSizes", "run_b2", "sqlite_saver_graph"]
