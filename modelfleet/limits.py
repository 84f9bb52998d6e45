"""Rate limits: requests and tokens per minute, and concurrent requests, per
key and per project, from the project's plan.

A per-minute limit is a sliding window: at most ``limit`` units taken in any
60 seconds, exactly (a log of what was taken and when; an entry leaves the
window 60 s after it was taken).  A token bucket would let ``limit`` through
at once and then ``limit`` more as it refills within the same minute; a
window never does.  Token limits take the request's worst case (prompt upper
bound + every output token it may produce) before it runs and give back the
unused part after, so no request can overshoot them.  Admission checks every
window first and takes from all of them only if all allow it: one admission
is atomic (the event loop runs it without interruption).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from modelfleet.errors import RateLimited
from modelfleet.projects import PlanLimits

#: The length of a per-minute limit's window, in seconds.
WINDOW_S = 60.0


class Window:
    """At most ``capacity`` units taken in any ``WINDOW_S`` seconds.

    Entries are ``[taken at, amount]``; one that left the window has its
    amount set to 0, so giving back to it does nothing.
    """

    __slots__ = ("capacity", "entries", "now", "total")

    def __init__(self, capacity: int, now: float) -> None:
        self.capacity = capacity
        self.entries: deque[list[float]] = deque()
        self.total = 0.0
        self.now = now

    def trim(self, now: float) -> None:
        self.now = now
        entries, edge = self.entries, now - WINDOW_S
        while entries and entries[0][0] <= edge:
            entry = entries.popleft()
            self.total -= entry[1]
            entry[1] = 0.0

    @property
    def level(self) -> float:
        """Units that may still be taken now."""
        return self.capacity - self.total

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` fits (inf if it never can)."""
        if amount > self.capacity:
            return math.inf
        excess = self.total + amount - self.capacity
        if excess <= 0:
            return 0.0
        freed = 0.0
        for taken_at, taken in self.entries:
            freed += taken
            if freed >= excess:
                return max(0.001, taken_at + WINDOW_S - self.now)
        return WINDOW_S

    def take(self, amount: float) -> list[float]:
        entry = [self.now, float(amount)]
        self.entries.append(entry)
        self.total += amount
        return entry

    def give_back(self, entry: list[float], amount: float) -> None:
        returned = min(amount, entry[1])
        entry[1] -= returned
        self.total -= returned

    def reset_in(self) -> float:
        """Seconds until the window is empty again."""
        return max(0.0, self.entries[-1][0] + WINDOW_S - self.now) if self.entries else 0.0


class Level:
    """A window as read from a shared store: what headers and refusals need."""

    __slots__ = ("capacity", "level", "reset")

    def __init__(self, capacity: int, level: float, reset: float) -> None:
        self.capacity, self.level, self.reset = capacity, level, reset

    def reset_in(self) -> float:
        return self.reset


@dataclass
class Admission:
    """What one admitted request holds, and the headers that describe it."""

    taken: list[tuple[Window, list[float], str]]  # (window, what was taken, kind)
    counters: list[str]
    reserved_tokens: int
    headers: dict[str, str] = field(default_factory=dict)
    released: bool = False


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._wall = wall
        self._windows: dict[tuple[str, str, int], Window] = {}
        self._active: dict[str, int] = {}

    def _window(self, scope: str, kind: str, limit: int, now: float) -> Window:
        key = (scope, kind, limit)  # a changed limit starts a fresh window
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = Window(limit, now)
        window.trim(now)
        return window

    def _plan_buckets(
        self, plan: PlanLimits, key_id: str, project_id: str, now: float
    ) -> list[tuple[Window, str, str]]:
        out = []
        for scope, who, rpm, tpm in (("key", key_id, plan.key_rpm, plan.key_tpm),
                                     ("project", project_id, plan.project_rpm, plan.project_tpm)):
            if rpm:
                out.append((self._window(f"{scope}:{who}", "requests", rpm, now), "requests", scope))
            if tpm:
                out.append((self._window(f"{scope}:{who}", "tokens", tpm, now), "tokens", scope))
        return out

    def admit(self, plan: PlanLimits, key_id: str, project_id: str, tokens: int) -> Admission:
        """Take one request and ``tokens`` from every limit, or raise 429."""
        now = self._clock()
        buckets = self._plan_buckets(plan, key_id, project_id, now)
        # Per-key concurrency is refused here (429); a project's cap on running
        # requests is applied by the scheduler, where its extra requests wait.
        for scope, who, limit in (("key", key_id, plan.key_concurrency),):
            if limit and self._active.get(f"{scope}:{who}", 0) >= limit:
                raise self._refused(plan, buckets, f"concurrent_requests_per_{scope}",
                                    f"{limit} concurrent requests per {scope}", 1.0)
        for bucket, kind, scope in buckets:
            amount = 1 if kind == "requests" else tokens
            wait = bucket.wait_for(amount)
            if wait > 0:
                unit = "requests" if kind == "requests" else "tokens"
                if math.isinf(wait):
                    raise self._refused(
                        plan, buckets, f"{unit}_per_minute_per_{scope}",
                        f"{bucket.capacity} {unit} per minute per {scope}; this request needs "
                        f"up to {amount} (prompt plus max output), which can never fit", None)
                raise self._refused(plan, buckets, f"{unit}_per_minute_per_{scope}",
                                    f"{bucket.capacity} {unit} per minute per {scope}", wait)
        taken = [(window, window.take(1 if kind == "requests" else tokens), kind)
                 for window, kind, _scope in buckets]
        counters = [f"key:{key_id}", f"project:{project_id}"]
        for name in counters:
            self._active[name] = self._active.get(name, 0) + 1
        admission = Admission(taken, counters, tokens)
        admission.headers = self._headers(plan, buckets)
        return admission

    def release(self, admission: Admission, used_tokens: int) -> None:
        """The request ended: free its concurrency and return unused tokens."""
        if admission.released:
            return
        admission.released = True
        for name in admission.counters:
            self._active[name] = max(0, self._active.get(name, 0) - 1)
        unused = max(0, admission.reserved_tokens - used_tokens)
        if unused:
            for window, entry, kind in admission.taken:
                if kind == "tokens":
                    window.give_back(entry, unused)

    def undo(self, admission: Admission) -> None:
        """Give back everything an admission took (it was refused for another
        reason, such as credit, in the same step)."""
        self.release(admission, 0)
        for window, entry, kind in admission.taken:
            if kind == "requests":
                window.give_back(entry, 1)

    def active(self) -> int:
        """Concurrency counters taken now (0 when nothing runs)."""
        return sum(self._active.values())

    def peek(self, plan: PlanLimits, key_id: str, project_id: str) -> dict[str, str]:
        """The headers for a response that took nothing (an error before admission)."""
        return self._headers(plan, self._plan_buckets(plan, key_id, project_id, self._clock()))

    def _refused(self, plan: PlanLimits, buckets: list[tuple[Window, str, str]], code: str,
                 what: str, wait: float | None) -> RateLimited:
        return refusal(plan, buckets, code, what, wait, self._wall())

    def _headers(self, plan: PlanLimits, buckets: list[tuple[Window, str, str]]) -> dict[str, str]:
        return limit_headers(plan, buckets, self._wall())


def refusal(plan: PlanLimits, buckets: Sequence[tuple[Window | Level, str, str]], code: str, what: str,
            wait: float | None, wall: float) -> RateLimited:
    """The 429 for a refused admission, with its headers."""
    headers = limit_headers(plan, buckets, wall)
    message = f"rate limit reached: {what} (plan {plan.name!r})"
    if wait is not None:
        retry = max(1, math.ceil(wait))
        headers["Retry-After"] = str(retry)
        message += f"; retry after {retry}s"
    return RateLimited(message, code=f"rate_limit_{code}", headers=headers)


def limit_headers(plan: PlanLimits, buckets: Sequence[tuple[Window | Level, str, str]],
                  wall: float) -> dict[str, str]:
    """X-RateLimit-* (requests) and OpenAI's x-ratelimit-* (requests and tokens).
    Where key and project both limit, the tighter one is reported."""
    headers = {"X-RateLimit-Tier": plan.name}
    for kind in ("requests", "tokens"):
        mine = [b for b, k, _ in buckets if k == kind]
        if not mine:
            continue
        tight = min(mine, key=lambda b: b.level)
        remaining = str(max(0, math.floor(tight.level)))
        reset_in = max(b.reset_in() for b in mine)
        headers[f"x-ratelimit-limit-{kind}"] = str(tight.capacity)
        headers[f"x-ratelimit-remaining-{kind}"] = remaining
        headers[f"x-ratelimit-reset-{kind}"] = f"{reset_in:.3f}s"
        if kind == "requests":
            headers["X-RateLimit-Limit"] = str(tight.capacity)
            headers["X-RateLimit-Remaining"] = remaining
            headers["X-RateLimit-Reset"] = str(math.ceil(wall + reset_in))
    return headers


def plan_limits(plan: PlanLimits, key_id: str, project_id: str) -> list[tuple[str, str, int, str]]:
    """The windows a plan sets: (scope name, kind, capacity, scope)."""
    out = []
    for scope, who, rpm, tpm in (("key", key_id, plan.key_rpm, plan.key_tpm),
                                 ("project", project_id, plan.project_rpm, plan.project_tpm)):
        if rpm:
            out.append((f"{scope}:{who}", "requests", rpm, scope))
        if tpm:
            out.append((f"{scope}:{who}", "tokens", tpm, scope))
    return out
