"""``cuga db status`` and ``cuga db migrate``: the stores' schema versions (docs/operations.md).

Services migrate their stores at start, under the store's advisory lock; these commands
do the same beforehand (a release's migrations applied by a job before its pods roll), or
show where a database stands. They open the databases the configuration names (the same
``CUGA_*`` keys the services read): the coordinator's run store, SQLite under the data
directory or PostgreSQL by ``coordinator.dsn``, and planning's plans and plan memory
(``planning.db`` or ``planning.dsn``).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cuga.cli._output import ConfigProblem, json_line, out
from cuga.shared.config import Settings
from cuga.shared.migrations import Schema, SchemaStatus
from cuga.shared.sqldb import Database, PostgresDatabase, SQLiteDatabase
from cuga.shared.sqlite import open_sqlite


@dataclass(frozen=True)
class Store:
    """One store's schema and where its database is."""

    schema: Schema
    where: str
    """``sqlite:<path>`` or ``postgres:<dsn without its password>``."""
    sqlite_path: Path | None = None
    dsn: str = ""
    setting: str = ""
    """The configuration key naming the database (``coordinator.dsn``)."""


def _redacted(dsn: str) -> str:
    import psycopg.conninfo  # here, not at the top: the CLI's other commands never need it

    try:
        parts = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable dsn>"
    parts.pop("password", None)
    return " ".join(f"{k}={v}" for k, v in sorted(parts.items()))


def _located(
    schemas: tuple[Schema, ...], kind: str, dsn: str, path: Path, setting: str
) -> list[Store]:
    if kind == "postgres":
        where = f"postgres:{_redacted(dsn)}"
        return [Store(s, where, dsn=dsn, setting=setting) for s in schemas]
    return [Store(s, f"sqlite:{path}", sqlite_path=path) for s in schemas]


def stores(settings: Settings) -> list[Store]:
    """The stores with migrations that this configuration uses: the coordinator's run
    store, planning's plans and plan memory."""
    # Imported here: the run store's module brings the whole engine (~0.3 s), which every
    # process would pay on import of the CLI (each service runs through it).
    from cuga.orchestrator._runstore import RUN_STORE_SCHEMA
    from cuga.services.coordinator.config import CoordinatorConfig
    from cuga.services.planning.config import PlanningConfig
    from cuga.services.planning.memory import MEMORY_SCHEMA
    from cuga.services.planning.store import PLAN_STORE_SCHEMA

    data_dir = Path(settings.common.data_dir)
    coordinator = settings.section(CoordinatorConfig, "coordinator")
    planning = settings.section(PlanningConfig, "planning")
    return [
        *_located(
            (RUN_STORE_SCHEMA,),
            coordinator.run_store,
            coordinator.dsn,
            data_dir / "coordinator.db",
            "coordinator.dsn",
        ),
        *_located(
            (PLAN_STORE_SCHEMA, MEMORY_SCHEMA),
            planning.store,
            planning.dsn,
            data_dir / "planning.db",
            "planning.dsn",
        ),
    ]


def _one_line(exc: Exception) -> str:
    # libpq's messages span lines ("... Connection refused\n\tIs the server running
    # ..."); a command's error is one line.
    return " ".join(str(exc).split())


@contextmanager
def _open(store: Store, *, create: bool) -> Iterator[Database | None]:
    """The store's database; None for a SQLite file that does not exist and ``create`` is off."""
    if store.sqlite_path is not None:
        if not create and not store.sqlite_path.exists():
            yield None
            return
        db: Database = SQLiteDatabase(open_sqlite(store.sqlite_path))
    else:
        import psycopg

        try:
            db = PostgresDatabase(store.dsn)
        except psycopg.OperationalError as exc:
            raise ConfigProblem(
                f"{store.where} ({store.setting}): cannot connect: {_one_line(exc)}"
            ) from None
        except psycopg.ProgrammingError as exc:
            raise ConfigProblem(
                f"{store.setting}: not a libpq connection string or URI: {_one_line(exc)}"
            ) from None
    try:
        yield db
    finally:
        db.close()


def _row(store: Store, status: SchemaStatus | None) -> dict[str, object]:
    if status is None:
        return {"component": store.schema.component, "where": store.where, "exists": False}
    return {
        "component": status.component,
        "where": store.where,
        "version": status.current,
        "latest": status.latest,
        "pending": [f"{m.version} {m.name}" for m in status.pending],
    }


async def _status(args: argparse.Namespace, settings: Settings) -> int:
    """``cuga db status``."""
    for store in stores(settings):
        with _open(store, create=False) as db:
            status = store.schema.status(db) if db is not None else None
        row = _row(store, status)
        if getattr(args, "json", False):
            json_line(row)
            continue
        console = out()
        if status is None:
            console.print(f"{store.schema.component}: {store.where}: no database yet")
        elif status.up_to_date:
            console.print(
                f"{status.component}: {store.where}: version {status.current} (up to date)",
                highlight=False,
            )
        else:
            console.print(
                f"{status.component}: {store.where}: version {status.current} of"
                f" {status.latest}; pending:",
                highlight=False,
            )
            for migration in status.pending:
                console.print(f"  {migration.version} {migration.name}", highlight=False)
    return 0


async def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    """``cuga db migrate``."""
    for store in stores(settings):
        with _open(store, create=True) as db:
            assert db is not None
            applied = store.schema.migrate(db)
            version = store.schema.status(db).current
        if getattr(args, "json", False):
            json_line(
                {
                    "component": store.schema.component,
                    "where": store.where,
                    "applied": [f"{m.version} {m.name}" for m in applied],
                    "version": version,
                }
            )
            continue
        console = out()
        for migration in applied:
            console.print(
                f"{store.schema.component}: applied {migration.version} {migration.name}",
                highlight=False,
            )
        console.print(
            f"{store.schema.component}: {store.where}: version {version}", highlight=False
        )
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``cuga db status`` and ``cuga db migrate``."""
    parser = subparsers.add_parser("db", help="the stores' schema versions: status, migrate")
    sub = parser.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    sub.add_parser(
        "status", help="the version of each store's schema and what is pending"
    ).set_defaults(handler=_status)
    sub.add_parser(
        "migrate", help="apply the pending migrations (the services also do it at start)"
    ).set_defaults(handler=_migrate)


__all__ = ["Store", "register", "stores"]
