"""Numbered, forward-only schema migrations, on SQLite and PostgreSQL.

A store declares its schema as a :class:`Schema`: a component name and its migrations,
numbered from 1, each with a SQLite and a PostgreSQL step (a script, or a function of the
:class:`~cuga.shared.sqldb.Database` for what SQL alone cannot say portably, such as
"add this column unless it is there"). The versions applied are rows of one table,
``cuga_schema_migrations`` (component, version, name, applied_at), shared by every store
of a database.

:meth:`Schema.migrate` applies the missing ones in order, each in its own transaction
together with its version row, so a crash leaves a database at a version, never between
two. On PostgreSQL it holds the store's session advisory lock meanwhile (replicas start
together; the second waits, then finds nothing to do); on SQLite each transaction is
``BEGIN IMMEDIATE``. Services migrate at start; ``cuga db migrate`` does it beforehand and
``cuga db status`` tells what is applied and what is pending.

Rules for a new migration: append it with the next number, never edit or renumber one
that was released, and keep it additive (new tables, new columns with defaults, new
indexes), so the previous release still runs on the migrated schema during a rolling
upgrade or a rollback. A database at a version newer than the code knows is used as it
is, with a warning: that is a rollback, and additive migrations keep it working.

A database made before this module existed (no version table) is brought under it by
migration 1, written as ``CREATE ... IF NOT EXISTS`` and column checks, so applying it to
an existing database changes nothing that is there.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cuga.shared.sqldb import Database, PostgresDatabase

log = logging.getLogger("cuga.migrations")

#: One migration step: a script of statements, or a function that runs them.
Step = str | Callable[[Database], None]

VERSION_TABLE = "cuga_schema_migrations"
_VERSION_TABLE_SQL = f"""
CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (
    component  TEXT NOT NULL,
    version    INTEGER NOT NULL,
    name       TEXT NOT NULL,
    applied_at TEXT NOT NULL,
    PRIMARY KEY (component, version)
)
"""


@dataclass(frozen=True)
class Migration:
    """One numbered schema change.

    Attributes:
        version: its number, 1, 2, 3 ... in the order they apply.
        name: a few words saying what it does (shown by ``cuga db status``).
        sqlite: the step on SQLite.
        postgres: the step on PostgreSQL.
    """

    version: int
    name: str
    sqlite: Step
    postgres: Step


@dataclass(frozen=True)
class SchemaStatus:
    """Where one store's database stands."""

    component: str
    current: int
    """The highest version applied (0: none)."""
    latest: int
    """The highest version this code knows."""
    pending: tuple[Migration, ...]
    """Known migrations not applied yet, in order."""

    @property
    def up_to_date(self) -> bool:
        """Nothing to apply."""
        return not self.pending


def _statements(script: str) -> list[str]:
    """The statements of a script (ours: no ``;`` inside strings or comments)."""
    return [s.strip() for s in script.split(";") if s.strip()]


def _run(db: Database, step: Step) -> None:
    if callable(step):
        step(db)
    else:
        # One by one: sqlite3's executescript would commit the open transaction first.
        for statement in _statements(step):
            db.execute(statement)


def column_exists(db: Database, table: str, column: str) -> bool:
    """Whether ``table`` has ``column`` (for "add this column unless it is there")."""
    if db.dialect == "sqlite":
        return any(row[1] == column for row in db.execute(f"PRAGMA table_info({table})"))
    found = db.execute(
        "SELECT 1 FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = ? AND column_name = ?",
        (table, column),
    ).fetchone()
    return found is not None


@dataclass(frozen=True)
class Schema:
    """A store's schema: its component name, migrations and PostgreSQL lock key.

    Raises:
        ValueError: the migrations are not numbered 1, 2, 3 ... in order.
    """

    component: str
    migrations: tuple[Migration, ...]
    lock_key: int

    def __post_init__(self) -> None:
        numbers = [m.version for m in self.migrations]
        if numbers != list(range(1, len(numbers) + 1)):
            raise ValueError(f"{self.component}: migrations must be numbered 1..n: {numbers}")

    @property
    def latest(self) -> int:
        """The highest version this code knows."""
        return len(self.migrations)

    def _applied(self, db: Database) -> set[int]:
        db.execute(_VERSION_TABLE_SQL)
        rows = db.execute(
            f"SELECT version FROM {VERSION_TABLE} WHERE component = ?", (self.component,)
        ).fetchall()
        return {int(row[0]) for row in rows}

    def status(self, db: Database) -> SchemaStatus:
        """What is applied and what is pending (creates only the version table)."""
        applied = self._applied(db)
        pending = tuple(m for m in self.migrations if m.version not in applied)
        return SchemaStatus(self.component, max(applied, default=0), self.latest, pending)

    def migrate(self, db: Database) -> list[Migration]:
        """Apply the pending migrations in order; the ones applied.

        Raises:
            Exception: a migration failed; it was rolled back and the ones before it stay
                applied (the database is at the version before it).
        """
        if db.dialect == "postgres":
            db.execute("SELECT pg_advisory_lock(?)", (self.lock_key,))
        try:
            applied = self._applied(db)
            done: list[Migration] = []
            for migration in self.migrations:
                if migration.version in applied:
                    continue
                step = migration.sqlite if db.dialect == "sqlite" else migration.postgres
                with db.transaction() as tx:
                    # Another process may have applied it since we looked (SQLite has no
                    # session lock): the version row decides, inside the transaction.
                    again = tx.execute(
                        f"SELECT 1 FROM {VERSION_TABLE} WHERE component = ? AND version = ?",
                        (self.component, migration.version),
                    ).fetchone()
                    if again is not None:
                        continue
                    _run(tx, step)
                    tx.execute(
                        f"INSERT INTO {VERSION_TABLE} (component, version, name, applied_at)"
                        " VALUES (?, ?, ?, ?)",
                        (
                            self.component,
                            migration.version,
                            migration.name,
                            dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                        ),
                    )
                done.append(migration)
                log.info(
                    "%s schema: applied migration %d (%s)",
                    self.component,
                    migration.version,
                    migration.name,
                )
            newer = max(applied, default=0)
            if newer > self.latest:
                log.warning(
                    "%s schema is at version %d, newer than this release's %d (a rollback):"
                    " running on it, as migrations are additive",
                    self.component,
                    newer,
                    self.latest,
                )
            return done
        finally:
            if db.dialect == "postgres":
                db.execute("SELECT pg_advisory_unlock(?)", (self.lock_key,))


def migrate_all(db: Database, schemas: Sequence[Schema]) -> list[tuple[str, Migration]]:
    """Migrate several stores sharing ``db``; (component, migration) of each applied."""
    return [(s.component, m) for s in schemas for m in s.migrate(db)]


async def migrate_postgres(dsn: str, schemas: Sequence[Schema]) -> list[tuple[str, Migration]]:
    """Migrate stores that serve from a connection pool, at start: on one synchronous
    connection of their own, opened for the migrations and closed after them (it holds
    each store's session advisory lock while that store migrates), on a worker thread so
    the event loop keeps serving meanwhile.

    Raises:
        psycopg.OperationalError: the database cannot be reached.
    """

    def run() -> list[tuple[str, Migration]]:
        db = PostgresDatabase(dsn)
        try:
            return migrate_all(db, schemas)
        finally:
            db.close()

    return await asyncio.to_thread(run)


__all__ = [
    "VERSION_TABLE",
    "Migration",
    "Schema",
    "SchemaStatus",
    "Step",
    "column_exists",
    "migrate_all",
    "migrate_postgres",
]
