"""Money: the append-only ledger and its group-commit writer.

All amounts are integer micro-units.  A project's *balance* is the sum of its
ledger entries.  Balances and holds live in the admission store
(``modelfleet.admission``): in this process by default, in Redis when several
gateways share them.  A request's worst-case cost is held there before it
runs; when it ends, the hold shrinks to the actual cost, which stays
*pending* until the writer has committed the usage record and its ledger
entry; then ``apply`` moves it from held into the balance.

One writer task commits usage rows and usage debits in batches (one
transaction per batch).  If it cannot write, admission fails closed (503)
until it can.  Entries written by other processes (the CLI topping up,
another gateway) are picked up by ``catch_up`` whenever the store's version
changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, insert, select, text

from modelfleet.admission import AdmissionStore, MemoryAdmission, Posted
from modelfleet.db import Database, bump_version, lock_ledger_order, sync_engine
from modelfleet.errors import InvalidRequest, NotFound, ServiceUnavailable
from modelfleet.ids import new_id
from modelfleet.tables import LedgerEntry, Project, UsageRecord

log = logging.getLogger(__name__)

MAX_AMOUNT = 10**15  # a billion currency units, in micro-units


def cost_of(input_tokens: int, output_tokens: int, prices: tuple[int, int]) -> int:
    """Micro-units for the tokens at (input, output) micro-units per million, rounded up."""
    return math.ceil((input_tokens * prices[0] + output_tokens * prices[1]) / 1_000_000)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class _Settlement:
    usage: dict[str, Any]
    cost: int
    entry: dict[str, Any] | None = field(default=None)
    # Resolved once the row is committed (a request whose answer waits for it).
    written: asyncio.Future[None] | None = None


_VERSION_AND_TOP = text("SELECT (SELECT value FROM meta WHERE key = 'version'), "
                        "(SELECT MAX(seq) FROM ledger)")


class _SqliteWriter:
    """A synchronous engine with one connection, used from one thread: the
    writer's transactions on SQLite."""

    def __init__(self, url: str) -> None:
        self.engine = sync_engine(url)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="ledger-writer")

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.engine.dispose()


# A shared store applies each entry once, so catch-up reads this far back to
# cover entries committed out of sequence order by concurrent transactions.
CATCH_UP_MARGIN = 2000


class Ledger:
    def __init__(self, db: Database, store: AdmissionStore | None = None, *, batch: int = 512,
                 interval_s: float = 0.2, retry_s: float = 1.0,
                 clock: Callable[[], datetime] = _now) -> None:
        self._db = db
        self.store: AdmissionStore = store if store is not None else MemoryAdmission()
        self._batch = batch
        self._interval = interval_s
        self._retry_s = retry_s
        self._clock = clock
        self._watermark = 0
        self._version = -1
        self._own: set[str] = set()
        self._lock = asyncio.Lock()
        self._pending: list[_Settlement] = []
        self._sqlite = _SqliteWriter(db.url) if db.url.startswith("sqlite") else None
        self._waiting = 0  # pending settlements whose answer waits for their commit
        self._unapplied: list[Posted] = []  # committed, not yet in the store (it was down)
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()  # a row whose answer waits for its commit
        self._idle = asyncio.Event()
        self._idle.set()
        self.failing: str | None = None

    # -- state ---------------------------------------------------------------------

    async def load(self, version: int) -> None:
        since = self._clock() - timedelta(minutes=10)
        async with self._lock, self._db.session() as session:
            rows = (await session.execute(
                select(LedgerEntry.project_id, func.sum(LedgerEntry.amount)).group_by(
                    LedgerEntry.project_id)
            )).all()
            top = await session.scalar(select(func.max(LedgerEntry.seq)))
            recent = list((await session.scalars(
                select(LedgerEntry.id).where(LedgerEntry.created_at >= since))).all())
        await self.store.load({pid: int(total) for pid, total in rows}, recent)
        self._watermark = int(top or 0)
        self._version = version

    async def reload(self) -> None:
        """Load balances into a store that lost them (Redis restarted empty)."""
        await self.load(self._version)

    async def committed(self, request_ids: list[str]) -> dict[str, Posted]:
        """The usage debits committed for these requests, by request id."""
        out: dict[str, Posted] = {}
        for start in range(0, len(request_ids), 500):
            async with self._db.session() as session:
                rows = (await session.execute(
                    select(LedgerEntry.id, LedgerEntry.project_id, LedgerEntry.amount,
                           LedgerEntry.request_id)
                    .where(LedgerEntry.request_id.in_(request_ids[start:start + 500])))).all()
            for entry_id, project_id, amount, request_id in rows:
                out[str(request_id)] = Posted(entry_id, project_id, int(amount), request_id)
        return out

    async def sweep_orphans(self) -> int:
        """Resolve holds left by gateways that died (shared stores only)."""
        sweep = getattr(self.store, "sweep", None)
        if sweep is None:
            return 0
        return int(await sweep(self.committed))

    async def catch_up(self, version: int) -> None:
        """Apply entries other processes appended since we last looked."""
        shared = self.store.dedupes
        async with self._lock:
            after = self._watermark - CATCH_UP_MARGIN if shared else self._watermark
            async with self._db.session() as session:
                rows = (await session.execute(
                    select(LedgerEntry.seq, LedgerEntry.id, LedgerEntry.project_id,
                           LedgerEntry.amount, LedgerEntry.request_id)
                    .where(LedgerEntry.seq > after).order_by(LedgerEntry.seq)
                )).all()
            posted = []
            for seq, entry_id, project_id, amount, request_id in rows:
                if not shared and entry_id in self._own:
                    self._own.discard(entry_id)
                else:
                    posted.append(Posted(entry_id, project_id, int(amount), request_id))
                self._watermark = max(self._watermark, int(seq))
            await self._apply(posted)  # kept for a retry if the store is down
            self._version = version

    async def balance(self, project_id: str) -> tuple[int, int]:
        """(balance, held) in micro-units."""
        return await self.store.balance(project_id)

    async def money(self, project_id: str) -> dict[str, int]:
        """A project's balance, held and available, as the API shows them."""
        balance, held = await self.store.balance(project_id)
        return {"balance": balance, "held": held, "available": balance - held}

    # -- the request path ----------------------------------------------------------

    def check_writable(self) -> None:
        if self.failing is not None:
            raise ServiceUnavailable(
                "billing is unavailable (the ledger cannot be written); not serving",
                code="billing_unavailable",
            )

    def record(self, usage: dict[str, Any], cost: int, *,
               durable: bool = False) -> asyncio.Future[None] | None:
        """Queue a settled request's usage row (and its debit, if it cost
        anything) for the writer.  ``durable``: returns a future resolved when
        the row is committed, and the writer commits at once instead of
        gathering for ``interval_s`` (rows that arrive meanwhile join the next
        commit: a group commit without a timer)."""
        usage["cost"] = cost
        entry = None
        if cost:
            entry = {"id": new_id(), "project_id": usage["project_id"], "amount": -cost,
                     "kind": "usage", "reason": f"{usage['model_id']} {usage['status']}",
                     "request_id": usage["request_id"], "actor": usage["key_id"],
                     "created_at": usage["created_at"]}
        written: asyncio.Future[None] | None = None
        if durable:
            written = asyncio.get_running_loop().create_future()
            self._waiting += 1
            self._urgent.set()
        self._pending.append(_Settlement(usage, cost, entry, written))
        self._idle.clear()
        self._wake.set()
        return written

    # -- the writer ----------------------------------------------------------------

    async def run_writer(self) -> None:
        """Group commit: wait for a settlement, gather for ``interval_s``, write
        the batch in one transaction.  Unwritten debits stay in ``held``, so the
        money is exact at every moment; a crash loses at most one interval of
        usage rows, and with them their debits (nothing is charged twice)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._pending and not self._unapplied:
                self._idle.set()  # a wake for rows a previous round already wrote
                continue
            if self._interval and len(self._pending) < self._batch and not self._waiting:
                # gather rows nobody waits for; a row somebody waits for ends it
                self._urgent.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), self._interval)
            if self._unapplied:
                async with self._lock:
                    await self._apply([])
            while self._pending:
                batch = self._pending[: self._batch]
                try:
                    await self._write(batch)
                except Exception as exc:
                    self.failing = f"{type(exc).__name__}: {exc}"
                    log.error("cannot write the ledger (%s); retrying", self.failing)
                    await asyncio.sleep(self._retry_s)
                    continue
                self.failing = None
                del self._pending[: len(batch)]
                for settled in batch:
                    if settled.written is not None:
                        self._waiting -= 1
                        if not settled.written.done():
                            settled.written.set_result(None)
            self._idle.set()

    async def _write(self, batch: list[_Settlement]) -> None:
        entries = [s.entry for s in batch if s.entry is not None]
        rows = [s.usage for s in batch]
        async with self._lock:
            if self._sqlite is not None:
                # SQLite: the whole transaction in one hop to a thread of its own
                # (the async driver would hop to its thread once per statement).
                version, top = await asyncio.get_running_loop().run_in_executor(
                    self._sqlite.executor, self._write_sync, rows, entries)
            else:
                async with self._db.engine.begin() as conn:
                    await lock_ledger_order(conn)
                    await conn.execute(insert(UsageRecord), rows)
                    if entries:
                        await conn.execute(insert(LedgerEntry), entries)
                    version, top = (await conn.execute(_VERSION_AND_TOP)).one()
            if not self.store.dedupes:
                if version == self._version:
                    # no other process changed money since our last look: all rows are ours
                    self._watermark = int(top or 0)
                else:
                    self._own.update(e["id"] for e in entries)
            await self._apply([Posted(e["id"], e["project_id"], e["amount"], e["request_id"])
                               for e in entries])

    def _write_sync(self, rows: list[dict[str, Any]],
                    entries: list[dict[str, Any]]) -> tuple[Any, Any]:
        assert self._sqlite is not None
        with self._sqlite.engine.begin() as conn:
            conn.execute(insert(UsageRecord), rows)
            if entries:
                conn.execute(insert(LedgerEntry), entries)
            version, top = conn.execute(_VERSION_AND_TOP).one()
        return version, top

    def close(self) -> None:
        """Stops the SQLite writer's thread (after ``drain``)."""
        if self._sqlite is not None:
            self._sqlite.close()

    async def _apply(self, posted: list[Posted]) -> None:
        """Committed entries into the store; kept for a retry if it is down."""
        posted = self._unapplied + posted
        self._unapplied = []
        if not posted:
            return
        try:
            await self.store.apply(posted)
        except Exception as exc:
            self._unapplied = posted
            log.warning("committed ledger entries not yet applied to the store (%s); will retry",
                        exc)

    async def drain(self) -> None:
        """Wait until every settled request is written (tests, shutdown)."""
        interval, self._interval = self._interval, 0.0
        try:
            while self._pending:
                self._wake.set()
                await self._idle.wait()
                if self._pending and self.failing:
                    raise ServiceUnavailable(f"ledger not writable: {self.failing}")
        finally:
            self._interval = interval

    # -- credits (admin) -------------------------------------------------------------

    async def credit(self, project_id: str, amount: int, *, kind: str, reason: str,
                     actor: str) -> dict[str, Any]:
        """A top-up (positive) or an adjustment (either sign, with a reason)."""
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise InvalidRequest("amount must be an integer number of micro-units", param="amount")
        if kind == "topup" and amount <= 0:
            raise InvalidRequest("a top-up must be a positive amount", param="amount")
        if kind == "adjustment":
            if amount == 0:
                raise InvalidRequest("an adjustment must not be zero", param="amount")
            if not reason.strip():
                raise InvalidRequest("an adjustment needs a reason", param="reason")
        if abs(amount) > MAX_AMOUNT:
            raise InvalidRequest(f"amount must be at most {MAX_AMOUNT} in size", param="amount")
        entry: dict[str, Any] = {"id": new_id(), "project_id": project_id, "amount": amount, "kind": kind,
                 "reason": reason[:500], "request_id": None, "actor": actor[:100],
                 "created_at": self._clock()}
        async with self._lock:
            async with self._db.session() as session, session.begin():
                await lock_ledger_order(session)
                if await session.get(Project, project_id) is None:
                    raise NotFound(f"no project with id {project_id!r}", code="project_not_found")
                await session.execute(insert(LedgerEntry), [entry])
                await bump_version(session)
            if not self.store.dedupes:
                self._own.add(entry["id"])
            await self._apply([Posted(entry["id"], project_id, amount)])
        return entry


async def write_credit(db: Database, project_id: str, amount: int, *, kind: str, reason: str,
                       actor: str) -> dict[str, Any]:
    """Append a credit entry from outside the server (the CLI); the server picks
    it up through the store version."""
    ledger = Ledger(db)
    return await ledger.credit(project_id, amount, kind=kind, reason=reason, actor=actor)
