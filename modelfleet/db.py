"""Database engine, sessions and migrations.

SQLite (WAL) in the data folder by default; PostgreSQL through asyncpg
(``postgresql+asyncpg://user:password@host/db``, the ``[postgres]`` extra).
Migrations run with Alembic at startup and before every CLI command that uses
the store; on PostgreSQL they hold an advisory lock, so gateways starting
together migrate one at a time.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool, StaticPool

MIGRATIONS = Path(__file__).with_name("migrations")
# pg_advisory_xact_lock keys: held while migrating ("modelfleet" in ASCII), and
# by every transaction that appends to the ledger ("mfledger").
_MIGRATION_LOCK = 0x6D6F64656C666C65
_LEDGER_LOCK = 0x6D666C6564676572


def async_url(url: str) -> str:
    """The URL with its async driver: a bare ``postgresql://`` (or ``postgres://``)
    means asyncpg."""
    for bare in ("postgresql://", "postgres://"):
        if url.startswith(bare):
            return "postgresql+asyncpg://" + url[len(bare):]
    return url


def _sync_url(url: str) -> str:
    return url.replace("+aiosqlite", "")


def sync_engine(url: str) -> Engine:
    """A synchronous engine on one SQLite connection (a single writer thread)."""
    engine = create_engine(_sync_url(url), poolclass=StaticPool,
                           connect_args={"check_same_thread": False})
    _sqlite_pragmas(engine)
    return engine


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=5000")
        cur.close()


def _upgrade(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, "head")


def migrate(url: str) -> None:
    """Bring the schema at ``url`` to the newest migration (call it from a
    thread with no running event loop: the CLI, or ``asyncio.to_thread``)."""
    url = async_url(url)
    if not url.startswith("sqlite"):
        asyncio.run(_migrate_async(url))
        return
    db_path = url.split("///", 1)[-1]
    if db_path and db_path != ":memory:":
        Path(db_path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(_sync_url(url), poolclass=NullPool)
    _sqlite_pragmas(engine)
    try:
        with engine.begin() as conn:
            _upgrade(conn)
    finally:
        engine.dispose()


async def _migrate_async(url: str) -> None:
    """Alembic is synchronous: it runs on the async driver's connection through
    ``run_sync`` (one driver to install, the same one the server uses)."""
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_upgrade)
    finally:
        await engine.dispose()


class _Session(Session):
    """The sessions a Database makes: a commit that bumped the store version
    counts in ``Database.local_changes`` (see ``bump_version``)."""


@event.listens_for(_Session, "after_commit")
def _after_commit(session: Session) -> None:
    if session.info.pop("bumped_version", False):
        db = session.info.get("database")
        if isinstance(db, Database):
            db.local_changes += 1
            for hook in db.change_hooks:
                hook()


@event.listens_for(_Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop("bumped_version", None)


class Database:
    """The async engine and a session factory, owned by the app's lifespan."""

    def __init__(self, url: str) -> None:
        self.url = url = async_url(url)
        self.engine: AsyncEngine = create_async_engine(url)
        if url.startswith("sqlite"):
            _sqlite_pragmas(self.engine.sync_engine)
        self.session = async_sessionmaker(self.engine, expire_on_commit=False,
                                          sync_session_class=_Session, info={"database": self})
        # Commits through this object that bumped the store version: a probe
        # that polls reads again at once after one (this process's own change).
        self.local_changes = 0
        # Called (on the event loop, synchronously) after such a commit: the
        # Redis change feed publishes it to every other gateway.
        self.change_hooks: list[Callable[[], None]] = []

    async def close(self) -> None:
        await self.engine.dispose()


async def bump_version(session: AsyncSession) -> None:
    """Tell every process serving this store to reload what it caches (call
    inside the transaction that makes the change)."""
    await session.execute(text("UPDATE meta SET value = value + 1 WHERE key = 'version'"))
    session.info["bumped_version"] = True


async def lock_ledger_order(executor: AsyncSession | AsyncConnection) -> None:
    """Call first in every transaction that appends to ``ledger``.

    Readers catch up with ``WHERE seq > last seen``.  On PostgreSQL a sequence
    number is taken at insert, not at commit, so without this a transaction
    holding seq 10 could commit after one holding seq 11 and be skipped.  This
    transaction-scoped advisory lock makes appends commit one at a time, in
    seq order.  SQLite has a single writer already: nothing to do.
    """
    dialect = executor.get_bind().dialect if isinstance(executor, AsyncSession) else executor.dialect
    if dialect.name == "postgresql":
        await executor.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LEDGER_LOCK})


class VersionProbe:
    """Reads ``meta.version`` on every request, cheaply.

    SQLite: a dedicated read-only connection in this thread; a point read of a
    cached page costs microseconds, so a change made by another process (the
    CLI revoking a key) is seen on the very next request.  Other databases
    (PostgreSQL): read at most every ``interval_s`` seconds (0.25 by default,
    so another process's change is seen well within a second) through the
    async engine, by one request at a time; the others meanwhile use the last
    value read.
    """

    def __init__(self, db: Database, interval_s: float = 0.25) -> None:
        self._db = db
        self._interval = interval_s
        self._conn: sqlite3.Connection | None = None
        self._last: tuple[float, int] = (0.0, -1)
        self._inflight: asyncio.Future[int] | None = None
        self._seen_changes = -1
        self._nudges = self._seen_nudges = 0
        self._sqlite_path = db.url.split("///", 1)[-1] if db.url.startswith("sqlite") else None

    async def read(self) -> int:
        if self._sqlite_path is not None:
            if self._conn is None:  # opened on first use: the file exists after migrations
                self._conn = sqlite3.connect(f"file:{self._sqlite_path}?mode=ro", uri=True,
                                             check_same_thread=False, isolation_level=None)
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
            return int(row[0]) if row else 0
        now = time.monotonic()
        changes, nudges = self._db.local_changes, self._nudges
        changed = changes != self._seen_changes or nudges != self._seen_nudges
        if self._last[1] >= 0 and not changed and now - self._last[0] < self._interval:
            return self._last[1]
        if self._inflight is not None:
            # A read is under way: after a known change, wait for it (it began
            # after the change was heard); a routine poll uses the last value.
            return await asyncio.shield(self._inflight) if changed or self._last[1] < 0 \
                else self._last[1]
        inflight = self._inflight = asyncio.get_running_loop().create_future()
        try:
            async with self._db.engine.connect() as conn:
                value = int(await conn.scalar(
                    text("SELECT value FROM meta WHERE key = 'version'")) or 0)
        except asyncio.CancelledError:
            inflight.cancel()
            raise
        except Exception as exc:
            inflight.set_exception(exc)
            inflight.exception()  # retrieved: the callers that waited re-raise it
            raise
        finally:
            self._inflight = None
        self._last = (now, value)
        self._seen_changes, self._seen_nudges = changes, nudges
        inflight.set_result(value)
        return value

    def nudge(self) -> None:
        """Another process changed the store (a message on the change feed):
        the next read goes to the database."""
        self._nudges += 1

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
