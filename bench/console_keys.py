"""The console's keys page with 100,000 keys in the store: server time.

    PYTHONPATH=. .venv/bin/python bench/console_keys.py [KEYS] [RUNS]

Fills a fresh SQLite store (migrated as ``modelfleet serve`` does) with KEYS
keys (default 100,000) in one project, ``big``, plus a few in others; signs in
to the console (in process, over ASGI) as an operator and as a tenant of
``big``; then times RUNS requests (default 30, after 3 warm-ups) of each page
view: the first page of every key, of ``big``'s keys (tenant and operator),
and a page deep into the list (keyset, ``?before=``).  Server time is the
wall time of the request through the whole app (session, queries, template),
with no network; ``db`` is the page's ``Server-Timing`` (the key queries).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
from sqlalchemy import insert, select

from modelfleet.api.app import create_app
from modelfleet.db import Database, migrate
from modelfleet.ids import new_id
from modelfleet.keys import generate_key, hash_key
from modelfleet.services import Services
from modelfleet.settings import Settings
from modelfleet.tables import ApiKey

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


async def fill(db: Database, project_id: str, count: int) -> None:
    now = datetime.now(UTC)
    batch = []
    for i in range(count):
        raw = generate_key()
        batch.append({"id": new_id(), "project_id": project_id, "name": f"key {i}",
                      "prefix": raw[:11], "key_hash": hash_key(raw), "scopes": "inference",
                      "created_at": now})
        if len(batch) == 5000 or i == count - 1:
            async with db.session() as session, session.begin():
                await session.execute(insert(ApiKey), batch)
            batch = []


async def sign_in(client: httpx.AsyncClient, key: str) -> None:
    page = await client.get("/console/login")
    token = CSRF.search(page.text)
    assert token is not None
    answer = await client.post("/console/login", data={"csrf_token": token.group(1), "key": key})
    assert answer.status_code == 303, answer.text


async def timed(client: httpx.AsyncClient, path: str, runs: int) -> tuple[list[float], list[float]]:
    walls, dbs = [], []
    for i in range(runs + 3):
        started = time.perf_counter()
        answer = await client.get(path)
        wall = (time.perf_counter() - started) * 1000
        assert answer.status_code == 200, (path, answer.status_code, answer.text[:300])
        if i >= 3:
            walls.append(wall)
            dbs.append(float(answer.headers["server-timing"].split("dur=")[1]))
    return walls, dbs


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(count: int, runs: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="console-bench-"))
    settings = Settings(data_dir=tmp / "data", bootstrap_default_key=False)
    settings.data_dir.mkdir(parents=True)
    migrate(settings.db_url)
    services = Services.build(settings)
    app = create_app(settings, services)
    await services.start()
    try:
        admin = await services.keys.create("ops", ["admin"])
        tenant = await services.keys.create("big", ["inference", "read"])
        for name in ("a", "b", "c"):
            await services.keys.create(name, ["inference"])
        started = time.perf_counter()
        await fill(services.db, tenant.project_id, count)
        print(f"inserted {count} keys in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        await services.watcher.check()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as op, \
                httpx.AsyncClient(transport=transport, base_url="http://bench") as tn:
            await sign_in(op, admin.key)
            await sign_in(tn, tenant.key)
            # the key half way down big's list, newest first: a deep page by keyset
            async with services.db.session() as session:
                deep_before = await session.scalar(
                    select(ApiKey.id).where(ApiKey.project_id == tenant.project_id)
                    .order_by(ApiKey.id.desc()).offset(count // 2).limit(1))
            cases = [
                ("operator, every project, first page", op, "/console/keys"),
                ("operator, project big, first page", op,
                 f"/console/keys?project={tenant.project_id}"),
                ("tenant of big, first page", tn, "/console/keys"),
                ("tenant of big, the page half way down (?before=)", tn,
                 f"/console/keys?before={deep_before}"),
            ]
            print(f"\n{count} keys in project big, {count + 5} in the store; {runs} runs each\n")
            print("| page view | server p50 ms | server p95 ms | db p50 ms |")
            print("|---|---|---|---|")
            for label, client, path in cases:
                walls, dbs = await timed(client, path, runs)
                print(f"| {label} | {statistics.median(walls):.1f} | {_p(walls, 0.95):.1f} "
                      f"| {statistics.median(dbs):.1f} |")
    finally:
        await services.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000,
                     int(sys.argv[2]) if len(sys.argv) > 2 else 30))
