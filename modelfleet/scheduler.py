"""Per-model queues: a request waits here for a slot on a ready replica.

``acquire`` returns a lease on one slot of one replica.  A request whose
deadline passes while it waits is cancelled (504); one that finds its model
unavailable is refused (503).  Every release hands freed slots to waiting
requests in fair order (fairqueue.py).

Background work (batch lines, priority class ``BACKGROUND``) takes only what
interactive traffic leaves: it is served after every waiting interactive
request, it leaves one slot of a replica with several free for the next
interactive request (``BACKGROUND_KEEPS_FREE``), and a replica that runs only
background work may be swapped out for a model whose interactive requests
wait for room (``fleet.Room``): its background work is then preempted
(``Replica.preempt``) and runs again later.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from modelfleet.errors import DeadlineExceeded, ModelUnavailable
from modelfleet.fairqueue import FairQueue
from modelfleet.fleet import Fleet, ModelPool
from modelfleet.stats import RecentStats
from modelfleet.supervisor import Replica

# The priority class of background work (batch lines): below every plan's.
BACKGROUND = -(2**31)
# Slots of a replica that background work leaves free (of a replica with more
# than this many), so an interactive request arriving finds one at once.
BACKGROUND_KEEPS_FREE = 1


@dataclass(frozen=True)
class Claim:
    """Who asks for a slot, for fair ordering: the project, its plan's weight and
    priority class, its running cap on this model, and the conversation prefix
    (for affinity)."""

    project: str = ""
    weight: int = 1
    priority: int = 0
    cap: int | None = None
    prefix: str | None = None

    @property
    def background(self) -> bool:
        return self.priority <= BACKGROUND


ANONYMOUS = Claim()


@dataclass
class Lease:
    replica: Replica
    enqueued_at: float
    acquired_at: float
    project: str = ""
    released: bool = field(default=False)
    background: bool = False

    @property
    def wait_s(self) -> float:
        return self.acquired_at - self.enqueued_at


@dataclass(eq=False)
class _Waiter:
    claim: Claim
    future: asyncio.Future[Replica]


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
        self._waiters: FairQueue[_Waiter] = FairQueue()
        self._running: dict[str, int] = {}
        self._caps: dict[str, int | None] = {}
        self._affinity: OrderedDict[str, str] = OrderedDict()
        self._wire(pool)

    def _wire(self, pool: ModelPool) -> None:
        pool.demand = self.demand
        pool.waiting = lambda: self.waiting
        pool.interactive_waiting = lambda: self._waiters.waiting_above(BACKGROUND)
        pool.on_capacity = self.dispatch
        pool.on_unavailable = self.fail_waiters

    def rebind(self, pool: ModelPool) -> None:
        """The model was changed at runtime and has a new pool: the requests
        waiting here go to it; the old pool (draining) no longer sees them.
        Leases on the old pool's replicas are released here as before."""
        old, self.pool = self.pool, pool
        old.demand = old.waiting = old.interactive_waiting = lambda: 0
        old.on_capacity = lambda: None
        old.on_unavailable = lambda reason: None
        self._wire(pool)
        self._affinity.clear()
        if self.waiting:
            self.dispatch()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def running(self, project: str) -> int:
        return self._running.get(project, 0)

    def demand(self) -> int:
        return self.waiting + sum(r.outstanding for r in self.pool.replicas)

    def _refuse_if_unavailable(self) -> None:
        available, reason = self.pool.availability()
        if not available:
            raise ModelUnavailable(f"model {self.pool.spec.id!r} is unavailable: {reason}")

    def _under_cap(self, claim: Claim) -> bool:
        self._caps[claim.project] = claim.cap
        return claim.cap is None or self.running(claim.project) < claim.cap

    def _route(self, claim: Claim) -> Replica | None:
        """The least loaded replica with room (for background work: room it
        leaves for interactive requests); the one that served this
        conversation before if it is not more loaded than that."""
        keep = BACKGROUND_KEEPS_FREE if claim.background else 0
        best = self.pool.free_replica(keep)
        if best is None or claim.prefix is None:
            return best
        preferred = self._affinity.get(claim.prefix)
        for replica in self.pool.replicas:
            if replica.id == preferred and replica.room_for(keep):
                if replica.outstanding <= best.outstanding:
                    return replica
                break
        return best

    def _grant(self, replica: Replica, claim: Claim) -> None:
        replica.outstanding += 1
        if claim.background:
            replica.background += 1
        if claim.project:
            self._running[claim.project] = self.running(claim.project) + 1
        if claim.prefix is not None:
            self._affinity[claim.prefix] = replica.id
            self._affinity.move_to_end(claim.prefix)
            if len(self._affinity) > 10_000:
                self._affinity.popitem(last=False)

    async def acquire(
        self, deadline: float, enqueued_at: float | None = None, claim: Claim = ANONYMOUS
    ) -> Lease:
        """A slot on a ready replica, waiting (until ``deadline``) if there is none."""
        enqueued = self.clock() if enqueued_at is None else enqueued_at
        self._refuse_if_unavailable()
        if not self._waiters and self._under_cap(claim):
            replica = self._route(claim)
            if replica is not None:
                self._grant(replica, claim)
                return Lease(replica, enqueued, self.clock(), claim.project,
                             background=claim.background)
        self._caps[claim.project] = claim.cap
        waiter = _Waiter(claim, asyncio.get_running_loop().create_future())
        self._waiters.push(waiter, project=claim.project, weight=claim.weight,
                           priority=claim.priority)
        self.pool.scale_for_demand()
        self.dispatch()
        try:
            async with asyncio.timeout(max(0.0, deadline - self.clock())):
                replica = await waiter.future
        except TimeoutError:
            self._abandon(waiter)
            raise DeadlineExceeded(
                f"request to {self.pool.spec.id!r} timed out while queued "
                f"(model state: {self.pool.state}); it was cancelled before it ran",
                code="queue_timeout",
            ) from None
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise
        return Lease(replica, enqueued, self.clock(), claim.project,
                     background=claim.background)

    def _abandon(self, waiter: _Waiter) -> None:
        """A waiter gave up; give back a slot it was handed at the same moment."""
        fut = waiter.future
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            self._give_back(fut.result(), waiter.claim.project, waiter.claim.background)
            self.dispatch()
        else:
            fut.cancel()
        self._waiters.remove(waiter)

    def _give_back(self, replica: Replica, project: str, background: bool) -> None:
        replica.outstanding -= 1
        if background:
            replica.background -= 1
        if project:
            left = self.running(project) - 1
            if left > 0:
                self._running[project] = left
            else:
                self._running.pop(project, None)

    def release(self, lease: Lease) -> None:
        if lease.released:
            return
        lease.released = True
        replica = lease.replica
        self._give_back(replica, lease.project, lease.background)
        replica.served += 1
        replica.last_active = self.clock()
        self.dispatch()
        if replica.outstanding == 0 and self.pool.room is not None:
            self.pool.room.retry_blocked()  # an idle replica may be swapped out now

    def dispatch(self) -> None:
        """Hand free slots to waiting requests in fair order (background work
        only where it leaves room for interactive requests)."""
        while self._waiters and self.pool.free_replica() is not None:
            background_room = self.pool.free_replica(BACKGROUND_KEEPS_FREE) is not None
            waiter = self._waiters.pop(
                lambda project: project == "" or self._under_cap_of(project),
                above=None if background_room else BACKGROUND)
            if waiter is None:
                break  # every waiting project is at its running cap
            if waiter.future.done():
                continue
            replica = self._route(waiter.claim)
            assert replica is not None
            self._grant(replica, waiter.claim)
            waiter.future.set_result(replica)
        if self.waiting:
            self.pool.scale_for_demand()

    def _under_cap_of(self, project: str) -> bool:
        cap = self._caps.get(project)
        return cap is None or self.running(project) < cap

    def fail_waiters(self, reason: str) -> None:
        error = f"model {self.pool.spec.id!r} is unavailable: {reason}"
        while (waiter := self._waiters.pop()) is not None:
            if not waiter.future.done():
                waiter.future.set_exception(ModelUnavailable(error))


class Scheduler:
    """The queues of all models, built over the fleet."""

    def __init__(self, fleet: Fleet, stats_window_s: float) -> None:
        self.stats_window_s = stats_window_s
        self.queues: dict[str, ModelQueue] = {
            model_id: ModelQueue(pool, RecentStats(stats_window_s))
            for model_id, pool in fleet.pools.items()
        }

    def queue(self, model_id: str) -> ModelQueue:
        return self.queues[model_id]

    def attach(self, pool: ModelPool) -> ModelQueue:
        """The queue of a pool added or replaced at runtime: the model's queue
        if it has one (kept, with its waiting requests and recent stats),
        else a new one.  A removed model's queue stays (a request settling
        after its model was removed still finds it; one added again reuses it)."""
        queue = self.queues.get(pool.spec.id)
        if queue is None:
            queue = self.queues[pool.spec.id] = ModelQueue(pool, RecentStats(self.stats_window_s))
        elif queue.pool is not pool:
            queue.rebind(pool)
        return queue
