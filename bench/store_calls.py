"""CPU per call of each admission-store and ledger call on the request path.

    PYTHONPATH=. .venv/bin/python bench/store_calls.py [N]

For each call: the gateway process's CPU (process_time) and, for Redis and
PostgreSQL, the server process's CPU (from /proc), divided by N calls, one
call at a time (no pipelining: what one request pays).  Starts its own
redis-server and PostgreSQL (tests/services.py) and stops them by pid.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from modelfleet.admission import AdmissionStore, Ask, MemoryAdmission, Posted
from modelfleet.db import Database, VersionProbe, migrate
from modelfleet.ids import new_id
from modelfleet.keys import KeyService
from modelfleet.ledger import Ledger
from modelfleet.projects import PlanLimits
from modelfleet.redisstore import RedisAdmission
from tests.services import PostgresServer, RedisServer

PLAN = PlanLimits(name="bench", key_rpm=10**9, key_tpm=10**12, key_concurrency=10**6)


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, clock ticks


def _server_pids(port: int) -> list[int]:
    """Processes listening on ``port`` (the server and, for PostgreSQL, its backends
    are counted through the postmaster's children below)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(port).encode() in cmd or b"postgres:" in cmd:
                pids.append(int(entry.name))
    return pids


async def _measure(name: str, n: int, call: Callable[[int], Awaitable[object]],
                   server_pids: list[int]) -> None:
    for i in range(min(200, n)):  # warm up (scripts loaded, pools filled)
        await call(-1 - i)
    server_before = sum(_safe_cpu(p) for p in server_pids)
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(n):
        await call(i)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    server = sum(_safe_cpu(p) for p in server_pids) - server_before
    print(f"| {name} | {cpu / n * 1e6:.0f} | {server / n * 1e6:.0f} | {wall / n * 1e6:.0f} |")


def _safe_cpu(pid: int) -> float:
    try:
        return _proc_cpu(pid)
    except OSError:
        return 0.0


async def _store_calls(label: str, store: AdmissionStore, n: int, pids: list[int]) -> None:
    await store.start()
    await store.load({"p": 10**15})
    grants: dict[int, object] = {}

    async def admit(i: int) -> None:
        grants[i] = await store.admit(Ask(f"r{i}", PLAN, "k", "p", tokens=100, amount=1000))

    async def settle(i: int) -> None:
        await store.settle(grants.pop(i), used_tokens=50, cost=500)  # type: ignore[arg-type]

    async def apply(i: int) -> None:
        await store.apply([Posted(f"e{label}{i}", "p", -500, f"r{i}")])

    async def peek(i: int) -> None:
        await store.peek(PLAN, "k", "p")

    await _measure(f"{label}: admit (limits + concurrency + hold)", n, admit, pids)
    await _measure(f"{label}: settle", n, settle, pids)
    await _measure(f"{label}: apply one committed debit", n, apply, pids)
    await _measure(f"{label}: peek (headers of a refused request)", n, peek, pids)
    await store.close()


async def _ledger_calls(label: str, url: str, n: int, pids: list[int]) -> None:
    await asyncio.to_thread(migrate, url)
    db = Database(url)
    keys = KeyService(db)
    project_id, _ = await keys.ensure_project("bench")
    ledger = Ledger(db)
    await ledger.load(0)
    writer = asyncio.get_running_loop().create_task(ledger.run_writer())
    probe = VersionProbe(db)

    def usage(i: int) -> dict[str, object]:
        from datetime import UTC, datetime
        return {"request_id": new_id(), "project_id": project_id, "key_id": "k",
                "model_id": "m", "status": "succeeded", "input_tokens": 10,
                "output_tokens": 5, "wait_ms": 0, "run_ms": 1, "total_ms": 1,
                "created_at": datetime.now(UTC), "images": 0}

    async def durable(i: int) -> None:
        written = ledger.record(usage(i), 15, durable=True)
        assert written is not None
        await written

    async def version(i: int) -> None:
        await probe.read()

    await _measure(f"{label}: usage row + debit committed before the answer's end "
                   "(one request alone)", n, durable, pids)

    async def sixteen(i: int) -> None:  # 16 requests settling together: one group commit
        await asyncio.gather(*(durable(i) for _ in range(16)))

    await _measure(f"{label}: the same, 16 requests at once (per 16)", max(1, n // 16),
                   sixteen, pids)
    await _measure(f"{label}: version probe (admin changes), per request", n, version, pids)
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    probe.close()
    await db.close()


async def main(n: int) -> None:
    print("| call | gateway CPU µs | server CPU µs | wall µs |")
    print("|---|---|---|---|")
    await _store_calls("memory", MemoryAdmission(), n, [])
    with RedisServer.start() as redis:
        await _store_calls("redis", RedisAdmission(redis.url), n, [redis.proc.pid])
    with tempfile.TemporaryDirectory() as tmp:
        await _ledger_calls("sqlite", f"sqlite+aiosqlite:///{tmp}/bench.db", n, [])
    with PostgresServer.start() as pg:
        url = pg.create_database()
        await _ledger_calls("postgresql", url, n, _server_pids(pg.port))


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))
