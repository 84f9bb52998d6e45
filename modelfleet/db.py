"""Database engine, sessions and migrations.

SQLite (WAL) in the data folder by default, any SQLAlchemy async URL otherwise.
Migrations run with Alembic at startup and before every CLI command that uses the store.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

MIGRATIONS = Path(__file__).with_name("migrations")


def _sync_url(url: str) -> str:
    return url.replace("+aiosqlite", "").replace("+asyncpg", "+psycopg")


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=5000")
        cur.close()


def migrate(url: str) -> None:
    """Bring the schema at ``url`` to the newest migration."""
    if url.startswith("sqlite"):
        db_path = url.split("///", 1)[-1]
        if db_path and db_path != ":memory:":
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(_sync_url(url), poolclass=NullPool)
    if url.startswith("sqlite"):
        _sqlite_pragmas(engine)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    finally:
        engine.dispose()


class Database:
    """The async engine and a session factory, owned by the app's lifespan."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: AsyncEngine = create_async_engine(url)
        if url.startswith("sqlite"):
            _sqlite_pragmas(self.engine.sync_engine)
        self.session = async_sessionmaker(self.engine, expire_on_commit=False)

    async def close(self) -> None:
        await self.engine.dispose()


async def bump_version(session: AsyncSession) -> None:
    """Tell every process serving this store to reload what it caches (call
    inside the transaction that makes the change)."""
    await session.execute(text("UPDATE meta SET value = value + 1 WHERE key = 'version'"))


class VersionProbe:
    """Reads ``meta.version`` on every request, cheaply.

    SQLite: a dedicated read-only connection in this thread; a point read of a
    cached page costs microseconds, so a change made by another process (the
    CLI revoking a key) is seen on the very next request.  Other databases:
    read at most every ``interval_s`` seconds through the async engine.
    """

    def __init__(self, db: Database, interval_s: float = 1.0) -> None:
        self._db = db
        self._interval = interval_s
        self._conn: sqlite3.Connection | None = None
        self._last: tuple[float, int] = (0.0, -1)
        self._sqlite_path = db.url.split("///", 1)[-1] if db.url.startswith("sqlite") else None

    async def read(self) -> int:
        if self._sqlite_path is not None:
            if self._conn is None:  # opened on first use: the file exists after migrations
                self._conn = sqlite3.connect(f"file:{self._sqlite_path}?mode=ro", uri=True,
                                             check_same_thread=False, isolation_level=None)
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
            return int(row[0]) if row else 0
        now = time.monotonic()
        if now - self._last[0] < self._interval:
            return self._last[1]
        async with self._db.session() as session:
            value = await session.scalar(text("SELECT value FROM meta WHERE key = 'version'"))
        self._last = (now, int(value or 0))
        return self._last[1]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
