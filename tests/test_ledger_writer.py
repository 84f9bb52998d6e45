"""The ledger's group-commit writer: a row whose answer waits for its commit
is committed at once, whatever came before it (no 0.2 s gathering pause)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

from modelfleet.db import Database, migrate
from modelfleet.ids import new_id
from modelfleet.keys import KeyService
from modelfleet.ledger import Ledger


def _usage(project_id: str) -> dict[str, object]:
    return {"request_id": new_id(), "project_id": project_id, "key_id": "k", "model_id": "m",
            "status": "succeeded", "input_tokens": 1, "output_tokens": 1, "wait_ms": 0,
            "run_ms": 0, "total_ms": 0, "created_at": datetime.now(UTC), "images": 0}


async def test_rows_waited_for_are_committed_at_once_after_a_burst(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/ledger.db"
    await asyncio.to_thread(migrate, url)
    db = Database(url)
    project_id, _ = await KeyService(db).ensure_project("p")
    ledger = Ledger(db, interval_s=0.5)
    await ledger.load(0)
    writer = asyncio.get_running_loop().create_task(ledger.run_writer())
    try:
        async def one() -> float:
            started = time.perf_counter()
            written = ledger.record(_usage(project_id), 3, durable=True)
            assert written is not None
            await written
            return time.perf_counter() - started

        async def client(count: int) -> list[float]:
            return [await one() for _ in range(count)]

        # a burst: rows arrive while others are being committed
        await asyncio.gather(*(client(10) for _ in range(8)))
        slowest = 0.0
        for _ in range(5):
            first = ledger.record(_usage(project_id), 3, durable=True)
            await asyncio.sleep(0)  # the writer starts committing it...
            second = ledger.record(_usage(project_id), 3, durable=True)  # ...this joins after
            assert first is not None and second is not None
            await asyncio.gather(first, second)
            await asyncio.sleep(0.01)  # the writer comes round again
            slowest = max(slowest, await one())
        assert slowest < 0.25, slowest  # never the 0.5 s gathering pause
        await ledger.drain()
        assert ledger._waiting == 0
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await db.close()
