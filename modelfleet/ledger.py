"""Money: balances, holds, settlement, and the append-only ledger.

All amounts are integer micro-units.  A project's *balance* is the sum of its
ledger entries.  Before a request runs, its worst-case cost is *held*; a hold
is granted only if ``balance - held >= amount``, and everything happens in one
event-loop step, so concurrent requests can never overdraw.  When the request
ends, the hold becomes the actual cost (never more than the hold), which is
a *pending* debit until the writer has committed the usage record and its
ledger entry; then it leaves ``held`` and enters ``balance`` in the same step.

One writer task commits usage rows and usage debits in batches (one
transaction per batch).  If it cannot write, admission fails closed (503)
until it can.  Entries written by other processes (the CLI topping up) are
picked up by ``catch_up`` whenever the store's version changes.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, insert, select, text

from modelfleet.db import Database, bump_version
from modelfleet.errors import InsufficientCredits, InvalidRequest, NotFound, ServiceUnavailable
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
class Hold:
    project_id: str
    amount: int
    settled: bool = False


@dataclass
class _Settlement:
    usage: dict[str, Any]
    cost: int
    entry: dict[str, Any] | None = field(default=None)


class Ledger:
    def __init__(self, db: Database, *, batch: int = 512, interval_s: float = 0.2,
                 retry_s: float = 1.0, clock: Callable[[], datetime] = _now) -> None:
        self._db = db
        self._batch = batch
        self._interval = interval_s
        self._retry_s = retry_s
        self._clock = clock
        self._balance: dict[str, int] = {}
        self._held: dict[str, int] = {}
        self._watermark = 0
        self._version = -1
        self._own: set[str] = set()
        self._lock = asyncio.Lock()
        self._pending: list[_Settlement] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.failing: str | None = None

    # -- state ---------------------------------------------------------------------

    async def load(self, version: int) -> None:
        async with self._lock, self._db.session() as session:
            rows = (await session.execute(
                select(LedgerEntry.project_id, func.sum(LedgerEntry.amount)).group_by(
                    LedgerEntry.project_id)
            )).all()
            top = await session.scalar(select(func.max(LedgerEntry.seq)))
        self._balance = {pid: int(total) for pid, total in rows}
        self._watermark = int(top or 0)
        self._version = version

    async def catch_up(self, version: int) -> None:
        """Apply entries other processes appended since we last looked."""
        async with self._lock:
            async with self._db.session() as session:
                rows = (await session.execute(
                    select(LedgerEntry.seq, LedgerEntry.id, LedgerEntry.project_id,
                           LedgerEntry.amount).where(LedgerEntry.seq > self._watermark)
                    .order_by(LedgerEntry.seq)
                )).all()
            for seq, entry_id, project_id, amount in rows:
                if entry_id in self._own:
                    self._own.discard(entry_id)
                else:
                    self._balance[project_id] = self._balance.get(project_id, 0) + int(amount)
                self._watermark = max(self._watermark, int(seq))
            self._version = version

    def balance(self, project_id: str) -> int:
        return self._balance.get(project_id, 0)

    def held(self, project_id: str) -> int:
        return self._held.get(project_id, 0)

    def available(self, project_id: str) -> int:
        return self.balance(project_id) - self.held(project_id)

    # -- the request path ----------------------------------------------------------

    def hold(self, project_id: str, amount: int) -> Hold:
        if self.failing is not None:
            raise ServiceUnavailable(
                "billing is unavailable (the ledger cannot be written); not serving",
                code="billing_unavailable",
            )
        if amount > 0:
            available = self.available(project_id)
            if amount > available:
                raise InsufficientCredits(
                    f"insufficient credits: this request may cost up to {amount} micro-units "
                    f"and the project has {max(0, available)} available"
                )
            self._held[project_id] = self.held(project_id) + amount
        return Hold(project_id, amount)

    def release(self, hold: Hold) -> None:
        """Give a hold back without a usage record (work accepted but never run
        in this process, such as a job that runs again after a restart)."""
        if hold.settled:
            return
        hold.settled = True
        self._held[hold.project_id] = self.held(hold.project_id) - hold.amount

    def settle(self, hold: Hold, cost: int, usage: dict[str, Any]) -> int:
        """Turn the hold into the actual cost (capped at the hold); queue the rows.
        Returns the cost charged."""
        if hold.settled:
            return 0
        hold.settled = True
        if cost > hold.amount:
            log.error("request %s cost %d above its hold %d; charging the hold",
                      usage["request_id"], cost, hold.amount)
            cost = hold.amount
        cost = max(0, cost)
        self._held[hold.project_id] = self.held(hold.project_id) - hold.amount + cost
        usage["cost"] = cost
        entry = None
        if cost:
            entry = {"id": new_id(), "project_id": hold.project_id, "amount": -cost,
                     "kind": "usage", "reason": f"{usage['model_id']} {usage['status']}",
                     "request_id": usage["request_id"], "actor": usage["key_id"],
                     "created_at": usage["created_at"]}
        self._pending.append(_Settlement(usage, cost, entry))
        self._idle.clear()
        self._wake.set()
        return cost

    # -- the writer ----------------------------------------------------------------

    async def run_writer(self) -> None:
        """Group commit: wait for a settlement, gather for ``interval_s``, write
        the batch in one transaction.  Unwritten debits stay in ``held``, so the
        money is exact at every moment; a crash loses at most one interval of
        usage rows, and with them their debits (nothing is charged twice)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._interval and len(self._pending) < self._batch:
                await asyncio.sleep(self._interval)
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
            self._idle.set()

    async def _write(self, batch: list[_Settlement]) -> None:
        entries = [s.entry for s in batch if s.entry is not None]
        async with self._lock:
            async with self._db.engine.begin() as conn:
                await conn.execute(insert(UsageRecord), [s.usage for s in batch])
                if entries:
                    await conn.execute(insert(LedgerEntry), entries)
                version, top = (await conn.execute(text(
                    "SELECT (SELECT value FROM meta WHERE key = 'version'), "
                    "(SELECT MAX(seq) FROM ledger)"))).one()
            for s in batch:
                if s.cost:
                    pid = s.usage["project_id"]
                    self._held[pid] = self.held(pid) - s.cost
                    self._balance[pid] = self.balance(pid) - s.cost
            if version == self._version:
                # no other process changed money since our last look: all rows are ours
                self._watermark = int(top or 0)
            else:
                self._own.update(e["id"] for e in entries)

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
                if await session.get(Project, project_id) is None:
                    raise NotFound(f"no project with id {project_id!r}", code="project_not_found")
                await session.execute(insert(LedgerEntry), [entry])
                await bump_version(session)
            self._own.add(entry["id"])
            self._balance[project_id] = self.balance(project_id) + amount
        return entry


async def write_credit(db: Database, project_id: str, amount: int, *, kind: str, reason: str,
                       actor: str) -> dict[str, Any]:
    """Append a credit entry from outside the server (the CLI); the server picks
    it up through the store version."""
    ledger = Ledger(db)
    ledger._own = set()
    return await ledger.credit(project_id, amount, kind=kind, reason=reason, actor=actor)
