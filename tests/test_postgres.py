"""The store on PostgreSQL: migrations (from empty, again, several at once, down
and up), a change made by another process seen within a second, and the test
service launchers themselves (stopped by their pid; Redis back on its port)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import insert, text

from modelfleet.db import MIGRATIONS, Database, async_url, lock_ledger_order, migrate
from modelfleet.ids import new_id
from modelfleet.keys import KeyService
from modelfleet.tables import LedgerEntry, Project
from tests.conftest import Actors
from tests.services import PostgresServer, RedisServer


async def _scalar(url: str, sql: str) -> object:
    db = Database(url)
    try:
        async with db.engine.connect() as conn:
            return await conn.scalar(text(sql))
    finally:
        await db.close()


def _alembic(url: str, verb: str, target: str) -> None:
    async def run() -> None:
        db = Database(url)
        try:
            async with db.engine.begin() as conn:
                def work(sync_conn: object) -> None:
                    cfg = Config()
                    cfg.set_main_option("script_location", str(MIGRATIONS))
                    cfg.attributes["connection"] = sync_conn
                    getattr(command, verb)(cfg, target)

                await conn.run_sync(work)
        finally:
            await db.close()

    asyncio.run(run())


@pytest.mark.postgresql
def test_migrations_from_empty_again_and_down_and_up(pg_url: str) -> None:
    migrate(pg_url)
    migrate(pg_url)  # nothing to do the second time
    head = asyncio.run(_scalar(pg_url, "SELECT version_num FROM alembic_version"))
    assert asyncio.run(_scalar(pg_url, "SELECT value FROM meta WHERE key = 'version'")) == 1
    # the ledger's sequence is 64-bit here
    kind = asyncio.run(_scalar(pg_url, "SELECT data_type FROM information_schema.columns "
                                       "WHERE table_name = 'ledger' AND column_name = 'seq'"))
    assert kind == "bigint"
    _alembic(pg_url, "downgrade", "base")
    assert asyncio.run(_scalar(pg_url, "SELECT count(*) FROM information_schema.tables "
                                       "WHERE table_schema = 'public' AND table_name <> "
                                       "'alembic_version'")) == 0
    migrate(pg_url)
    assert asyncio.run(_scalar(pg_url, "SELECT version_num FROM alembic_version")) == head


@pytest.mark.postgresql
def test_gateways_starting_together_migrate_one_at_a_time(pg_url: str) -> None:
    # Each process runs migrate() at start; the advisory lock makes them queue.
    code = "import sys; from modelfleet.db import migrate; migrate(sys.argv[1])"
    procs = [subprocess.Popen([sys.executable, "-c", code, pg_url], stderr=subprocess.PIPE)
             for _ in range(3)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    assert asyncio.run(_scalar(pg_url, "SELECT count(*) FROM alembic_version")) == 1


@pytest.mark.postgresql
async def test_ledger_appends_commit_in_seq_order(pg_url: str) -> None:
    # Readers catch up with "seq > last seen": a transaction may not take a
    # seq while an earlier one is still open, or its rows could be skipped.
    await asyncio.to_thread(migrate, pg_url)
    db = Database(pg_url)
    now = datetime.now(UTC)

    def entry(reason: str) -> dict[str, object]:
        return {"id": new_id(), "project_id": "p", "amount": 1, "kind": "topup",
                "reason": reason, "actor": "test", "created_at": now}

    try:
        async with db.session() as session, session.begin():
            session.add(Project(id="p", name="p", created_at=now))
        first = await db.engine.connect()
        await first.begin()
        await lock_ledger_order(first)
        await first.execute(insert(LedgerEntry), [entry("first")])

        async def second() -> None:
            async with db.session() as session, session.begin():
                await lock_ledger_order(session)
                await session.execute(insert(LedgerEntry), [entry("second")])

        waiting = asyncio.create_task(second())
        await asyncio.sleep(0.3)
        assert not waiting.done()  # it queues behind the open append
        await first.commit()
        await first.close()
        await asyncio.wait_for(waiting, 10)
    finally:
        await db.close()
    rows = await _rows(pg_url, "SELECT reason FROM ledger ORDER BY seq")
    assert rows == [("first",), ("second",)]


async def _rows(url: str, sql: str) -> list[tuple[object, ...]]:
    db = Database(url)
    try:
        async with db.engine.connect() as conn:
            return [tuple(r) for r in (await conn.execute(text(sql))).all()]
    finally:
        await db.close()


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_processes_making_one_project_at_once_agree_on_it(database_url: str | None,
                                                               tmp_path: Path) -> None:
    url = database_url or f"sqlite+aiosqlite:///{tmp_path / 'modelfleet.db'}"
    await asyncio.to_thread(migrate, url)
    dbs = [Database(url) for _ in range(4)]  # four processes' engines
    try:
        made = await asyncio.gather(*(KeyService(db).ensure_project("acme") for db in dbs))
    finally:
        for db in dbs:
            await db.close()
    assert len({project_id for project_id, _ in made}) == 1
    assert sum(created for _, created in made) == 1


def test_bare_postgresql_urls_mean_asyncpg() -> None:
    assert async_url("postgresql://u:p@h/db") == "postgresql+asyncpg://u:p@h/db"
    assert async_url("postgres://h/db") == "postgresql+asyncpg://h/db"
    assert async_url("postgresql+asyncpg://h/db") == "postgresql+asyncpg://h/db"
    assert async_url("sqlite+aiosqlite:///x.db") == "sqlite+aiosqlite:///x.db"


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_a_key_revoked_by_another_process_is_refused_within_a_second(
    app: Actors, database_url: str | None,
) -> None:
    headers = app.auth(app.tenant)
    assert (await app.client.get("/v1/models", headers=headers)).status_code == 200
    env = dict(os.environ)
    if database_url is not None:
        env["MODELFLEET_DATABASE_URL"] = database_url
    revoke = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "modelfleet", "keys", "revoke", app.tenant.key_id,
        "--data-dir", str(app.services.settings.data_dir), env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await revoke.communicate()
    assert revoke.returncode == 0, err.decode()
    started = time.monotonic()
    while True:
        resp = await app.client.get("/v1/models", headers=headers)
        if resp.status_code == 401:
            break
        assert resp.status_code == 200
        assert time.monotonic() - started < 1.0, "the revocation was not seen within 1 s"
        await asyncio.sleep(0.02)
    assert resp.json()["error"]["code"] == "revoked_api_key"


# -- the launchers in tests/services.py -----------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.postgresql
def test_postgres_runs_as_a_non_root_user_and_stops_by_its_pid() -> None:
    server = PostgresServer.start()
    try:
        pid, root = server.proc.pid, server.root
        owner = server.psql("SELECT current_setting('data_directory')").stdout.strip()
        assert owner == str(root / "data")
        status = Path(f"/proc/{pid}/status").read_text()
        uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
        assert uid != 0
        first, second = server.create_database(), server.create_database()
        assert first != second
        assert asyncio.run(_scalar(second, "SELECT 1")) == 1
    finally:
        server.stop()
    assert not _alive(pid) and not root.exists()


@pytest.mark.redis
def test_redis_stops_and_comes_back_on_the_same_port(redis_server: RedisServer) -> None:
    port = redis_server.port
    url = redis_server.fresh_url()
    assert url.startswith(f"redis://127.0.0.1:{port}/")
    pid = redis_server.proc.pid if redis_server.proc else 0
    redis_server.stop(kill=True)
    assert not _alive(pid)
    with pytest.raises(httpx.ConnectError):  # nothing listens on the port now
        httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
    redis_server.resume()
    assert redis_server.port == port and redis_server.running
    import redis

    with redis.Redis.from_url(url) as client:
        assert client.ping()
