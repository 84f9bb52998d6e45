"""Per-model queues: a request waits here for a slot on a ready replica.

``acquire`` returns a lease on one slot of one replica.  A request whose
deadline passes while it waits is cancelled (504); one that finds its model
unavailable is refused (503).  Every release hands freed slots to waiting
requests in arrival order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from modelfleet.errors import DeadlineExceeded, ModelUnavailable
from modelfleet.fleet import Fleet, ModelPool
from modelfleet.stats import RecentStats
from modelfleet.supervisor import Replica


@dataclass
class Lease:
    replica: Replica
    enqueued_at: float
    acquired_at: float
    released: bool = field(default=False)

    @property
    def wait_s(self) -> float:
        return self.acquired_at - self.enqueued_at


class ModelQueue:
    def __init__(
        self,
        pool: ModelPool,
        stats: RecentStats,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.stats = stats
        self.clock = clock
        self._waiters: deque[asyncio.Future[Replica]] = deque()
        pool.demand = self.demand
        pool.on_capacity = self.dispatch
        pool.on_unavailable = self.fail_waiters

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def demand(self) -> int:
        return self.waiting + sum(r.outstanding for r in self.pool.replicas)

    def _refuse_if_unavailable(self) -> None:
        available, reason = self.pool.availability()
        if not available:
            raise ModelUnavailable(f"model {self.pool.spec.id!r} is unavailable: {reason}")

    async def acquire(self, deadline: float, enqueued_at: float | None = None) -> Lease:
        """A slot on a ready replica, waiting (until ``deadline``) if there is none."""
        enqueued = self.clock() if enqueued_at is None else enqueued_at
        self._refuse_if_unavailable()
        if not self._waiters:
            replica = self.pool.free_replica()
            if replica is not None:
                replica.outstanding += 1
                return Lease(replica, enqueued, self.clock())
        fut: asyncio.Future[Replica] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self.pool.scale_for_demand()
        self.dispatch()
        try:
            async with asyncio.timeout(max(0.0, deadline - self.clock())):
                replica = await fut
        except TimeoutError:
            self._abandon(fut)
            raise DeadlineExceeded(
                f"request to {self.pool.spec.id!r} timed out while queued "
                f"(model state: {self.pool.state}); it was cancelled before it ran",
                code="queue_timeout",
            ) from None
        except asyncio.CancelledError:
            self._abandon(fut)
            raise
        return Lease(replica, enqueued, self.clock())

    def _abandon(self, fut: asyncio.Future[Replica]) -> None:
        """A waiter gave up; give back a slot it was handed at the same moment."""
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            replica = fut.result()
            replica.outstanding -= 1
            self.dispatch()
        else:
            fut.cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(fut)

    def release(self, lease: Lease, *, run_s: float | None = None) -> None:
        if lease.released:
            return
        lease.released = True
        replica = lease.replica
        replica.outstanding -= 1
        replica.served += 1
        replica.last_active = self.clock()
        if run_s is not None:
            self.stats.record(lease.wait_s, run_s)
        self.dispatch()

    def dispatch(self) -> None:
        while self._waiters:
            head = self._waiters[0]
            if head.done():
                self._waiters.popleft()
                continue
            replica = self.pool.free_replica()
            if replica is None:
                break
            self._waiters.popleft()
            replica.outstanding += 1
            head.set_result(replica)
        if self.waiting:
            self.pool.scale_for_demand()

    def fail_waiters(self, reason: str) -> None:
        error = f"model {self.pool.spec.id!r} is unavailable: {reason}"
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(ModelUnavailable(error))


class Scheduler:
    """The queues of all models, built over the fleet."""

    def __init__(self, fleet: Fleet, stats_window_s: float) -> None:
        self.queues: dict[str, ModelQueue] = {
            model_id: ModelQueue(pool, RecentStats(stats_window_s))
            for model_id, pool in fleet.pools.items()
        }

    def queue(self, model_id: str) -> ModelQueue:
        return self.queues[model_id]
