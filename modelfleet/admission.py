"""Limits and holds behind one small async interface.

    admit(ask)            every rate-limit bucket, the key's concurrency and
                          the worst-case hold, taken in one step or not at all
                          (429 / 403 / 503); returns a Grant
    settle(grant, ...)    the request ended: its concurrency is freed, unused
                          tokens go back, the hold shrinks to the actual cost,
                          which stays *pending* (held) until the ledger row is
                          committed
    apply(entries)        committed ledger entries: a usage debit leaves
                          pending and leaves the balance; a top-up joins it
    load(balances)        the balances the store starts from

Two implementations, swapped under the same calls (as TensorZero puts its
rate limits behind ``consume_tickets``/``return_tickets``):

- ``MemoryAdmission`` (here): one process, the embedded default.  Every call
  finishes within one event-loop step, so concurrent requests can never
  overdraw or overshoot a limit.
- ``RedisAdmission`` (``modelfleet.redisstore``): several gateway processes
  share buckets, concurrency and holds through atomic Lua scripts.

Money and limits are touched only through this interface, by the task that
owns the request, on the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from modelfleet.errors import InsufficientCredits
from modelfleet.limits import Admission, RateLimiter
from modelfleet.projects import PlanLimits


@dataclass(frozen=True)
class Ask:
    """What one request asks to take before it runs."""

    request_id: str
    plan: PlanLimits
    key_id: str
    project_id: str
    tokens: int = 0  # worst-case tokens, for tokens-per-minute limits
    amount: int = 0  # worst-case cost in micro-units, held
    # False: only the hold is taken (an async job's run: its request was
    # counted when it was accepted).
    counted: bool = True
    # The longest the request may hold a concurrency slot (a shared store
    # frees slots of a gateway that died after this).
    ttl_s: float = 900.0


@dataclass
class Grant:
    ask: Ask
    headers: dict[str, str]
    handle: Any = None  # the implementation's own record
    settled: bool = False


@dataclass(frozen=True)
class Posted:
    """A committed ledger entry, as the admission store applies it."""

    entry_id: str
    project_id: str
    amount: int  # signed micro-units
    request_id: str | None = None  # a usage debit's request (its pending cost is released)


class AdmissionStore(Protocol):
    # True: ``apply`` ignores an entry it has applied before (shared stores,
    # where every gateway may apply the same entry).
    dedupes: bool

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def admit(self, ask: Ask) -> Grant: ...

    async def settle(self, grant: Grant, *, used_tokens: int, cost: int) -> None: ...

    async def peek(self, plan: PlanLimits, key_id: str, project_id: str) -> dict[str, str]: ...

    async def load(self, balances: dict[str, int], recent: Sequence[str] = ()) -> None: ...

    async def apply(self, entries: Sequence[Posted]) -> None: ...

    async def balance(self, project_id: str) -> tuple[int, int]:
        """(balance, held) of a project, in micro-units."""
        ...


class StoreNotReady(Exception):
    """The store holds no balances (a shared store restarted empty): load them
    from the ledger, then retry."""


def refuse_credit(amount: int, available: int) -> InsufficientCredits:
    return InsufficientCredits(
        f"insufficient credits: this request may cost up to {amount} micro-units "
        f"and the project has {max(0, available)} available"
    )


@dataclass
class MemoryAdmission:
    """The embedded store: buckets, counters, balances and holds in this process."""

    limiter: RateLimiter = field(default_factory=RateLimiter)
    dedupes: bool = False

    def __post_init__(self) -> None:
        self._balance: dict[str, int] = {}
        self._held: dict[str, int] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def admit(self, ask: Ask) -> Grant:
        admission: Admission | None = None
        if ask.counted:
            admission = self.limiter.admit(ask.plan, ask.key_id, ask.project_id, ask.tokens)
            headers = admission.headers
        else:
            headers = {}
        if ask.amount > 0:
            pid = ask.project_id
            available = self._balance.get(pid, 0) - self._held.get(pid, 0)
            if ask.amount > available:
                if admission is not None:
                    self.limiter.undo(admission)  # a refused request takes nothing
                raise refuse_credit(ask.amount, available)
            self._held[pid] = self._held.get(pid, 0) + ask.amount
        return Grant(ask, headers, admission)

    async def settle(self, grant: Grant, *, used_tokens: int, cost: int) -> None:
        if grant.settled:
            return
        grant.settled = True
        if grant.handle is not None:
            self.limiter.release(grant.handle, used_tokens)
        if grant.ask.amount:
            pid = grant.ask.project_id
            self._held[pid] = self._held.get(pid, 0) - grant.ask.amount + cost

    async def peek(self, plan: PlanLimits, key_id: str, project_id: str) -> dict[str, str]:
        return self.limiter.peek(plan, key_id, project_id)

    async def load(self, balances: dict[str, int], recent: Sequence[str] = ()) -> None:
        self._balance = dict(balances)

    async def apply(self, entries: Sequence[Posted]) -> None:
        for e in entries:
            self._balance[e.project_id] = self._balance.get(e.project_id, 0) + e.amount
            if e.request_id is not None and e.amount < 0:
                self._held[e.project_id] = self._held.get(e.project_id, 0) + e.amount

    async def balance(self, project_id: str) -> tuple[int, int]:
        return self._balance.get(project_id, 0), self._held.get(project_id, 0)

    def active(self) -> int:
        """Concurrency counters still taken (tests: nothing leaks)."""
        return self.limiter.active()

    def total_held(self) -> int:
        return sum(self._held.values())
