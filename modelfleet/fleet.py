"""The fleet: for each model, its replicas and the decisions about them.

A model with no replica is ``sleeping``; demand (a waiting request) starts
one and the model is ``starting`` until a replica answers its health check,
then ``ready``.  A replica idle past the model's idle timeout is stopped
(down to ``min_replicas``, so to zero by default).  A replica that exits or
stops answering health pings is replaced, with exponential backoff; after
``max_start_failures`` failed starts in a row the model is reported
unavailable, with the reason, for a cooldown.

With several gateway processes on one data folder, one of them owns the
fleet and the others mirror it (``fleetshare.py``): a follower's pools route
to the replicas the owner announces and pass their demand on to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modelfleet.catalog import Catalog, ModelSpec
from modelfleet.engines.base import Engine, LaunchPlan, ModelFileMissing, Resources, engine_for
from modelfleet.engines.http import WorkerClient
from modelfleet.fleetshare import (
    FleetShare,
    ModelNote,
    RemoteLoad,
    ReplicaNote,
    board_for,
    share_of,
)
from modelfleet.ids import short_id
from modelfleet.settings import FleetSettings, Settings
from modelfleet.supervisor import (
    LOCAL,
    Launcher,
    Replica,
    ReplicaState,
    StartFailed,
    free_port,
)
from modelfleet.tasks import TaskOwner

log = logging.getLogger(__name__)

# A follower stops routing to an announced replica that failed a check, this long.
SHUN_S = 5.0


def _slug(model_id: str) -> str:
    tail = model_id.rsplit("/", 1)[-1].lower()
    return "".join(c if c.isalnum() else "-" for c in tail).strip("-")[:40] or "model"


@dataclass
class ScaleEvent:
    at: float  # unix seconds
    model: str
    from_replicas: int
    to_replicas: int
    reason: str


def machine_budget(settings: FleetSettings) -> Resources:
    """What the local fleet may use: the settings, or 2 threads per core and 80%
    of the machine's memory."""
    threads = settings.cpu_threads or 2 * (os.cpu_count() or 1)
    memory = settings.memory_mib
    if memory is None:
        try:
            pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            memory = int(pages * 0.8) >> 20
        except (ValueError, OSError):
            memory = 4096
    return Resources(threads=threads, memory_mib=memory, gpus=settings.gpus)


class ModelPool:
    """The replicas of one model."""

    def __init__(
        self,
        spec: ModelSpec,
        engine: Engine,
        client: WorkerClient,
        settings: Settings,
        owner: TaskOwner,
        clock: Callable[[], float] = time.monotonic,
        ask_owner: Callable[[], None] = lambda: None,
        launcher: Launcher = LOCAL,
    ) -> None:
        self.spec = spec
        self.engine = engine
        # Where its replicas' processes run: here, or on a Ray cluster (rayfleet.py).
        self.launcher = launcher
        self.client = client
        self.settings = settings
        self.fleet_settings = settings.fleet
        self.owner = owner
        self.clock = clock
        self.replicas: list[Replica] = []
        self.desired = spec.scaling.min_replicas
        self.start_failures = 0
        self.unavailable_reason: str | None = None
        self._unavailable_until = 0.0
        self._next_start_at = 0.0
        self._file_check: tuple[float, str | None] = (-math.inf, None)
        self._delayed_start: asyncio.Task[None] | None = None
        self.cold_starts: list[float] = []
        self.events: list[ScaleEvent] = []
        # Set by the scheduler: called when capacity appears or the model fails.
        self.on_capacity: Callable[[], None] = lambda: None
        self.on_unavailable: Callable[[str], None] = lambda reason: None
        self.demand: Callable[[], int] = lambda: 0
        self.waiting: Callable[[], int] = lambda: 0
        self.interactive_waiting: Callable[[], int] = lambda: 0  # above background work
        # Set by the fleet: placement within the machine's budget.
        self.room: Room | None = None
        self.blocked: str | None = None  # why a wanted replica cannot start now
        self._pressure_since: float | None = None
        self.wall: Callable[[], float] = time.time
        # Observers (metrics): every scale decision, every cold start.
        self.on_event: Callable[[ScaleEvent], None] = lambda event: None
        self.on_cold_start: Callable[[str, float], None] = lambda model, seconds: None
        # Several gateways (fleetshare.py).  A follower mirrors what the owner
        # announced and asks it (``ask_owner``) for replicas; the owner adds
        # the others' demand (``remote``) to its own.
        self.follower = False
        self.announced: ModelNote | None = None
        self.ask_owner = ask_owner
        self.remote = RemoteLoad()
        self.gateways = 1
        self._shunned: dict[str, float] = {}

    # -- state as the API reports it -----------------------------------------

    @property
    def ready_replicas(self) -> int:
        return sum(1 for r in self.replicas if r.state is ReplicaState.ready)

    @property
    def live_replicas(self) -> int:
        return sum(
            1 for r in self.replicas if r.state in (ReplicaState.ready, ReplicaState.starting)
        )

    @property
    def state(self) -> str:
        if self.ready_replicas:
            return "ready"
        if any(r.state is ReplicaState.starting for r in self.replicas):
            return "starting"
        if self.follower:
            return self.announced.state if self.announced is not None else "sleeping"
        if self._delayed_start is not None and not self._delayed_start.done():
            return "starting"
        return "sleeping"

    def availability(self) -> tuple[bool, str | None]:
        """Whether the model can serve (now or after a cold start), and why not."""
        if self.follower and self.announced is not None:
            return self.announced.available, self.announced.reason
        now = self.clock()
        checked_at, problem = self._file_check
        if now - checked_at > 10.0:
            try:
                if self.launcher.checks_files_here:
                    self.engine.check()
                # else: the node that prepares a replica reports missing files
                # (``_prepare``), and the next request after 10s tries again.
                problem = None
            except ModelFileMissing as exc:
                problem = str(exc)
            self._file_check = (now, problem)
        if problem is not None:
            return False, problem
        if self.unavailable_reason is not None:
            if now < self._unavailable_until:
                return False, self.unavailable_reason
            self.unavailable_reason = None
            self.start_failures = 0
        return True, None

    # -- routing ----------------------------------------------------------------

    def free_replica(self, keep_free: int = 0) -> Replica | None:
        """The least loaded replica with a free slot (leaving ``keep_free``)."""
        best: Replica | None = None
        for replica in self.replicas:
            if replica.room_for(keep_free) and (best is None
                                                or replica.outstanding < best.outstanding):
                best = replica
        return best

    # -- demand of every gateway ------------------------------------------------

    def total_waiting(self) -> int:
        return self.waiting() + self.remote.waiting

    def total_demand(self) -> int:
        return self.demand() + self.remote.waiting + self.remote.in_flight

    def fleet_load(self) -> tuple[int, int]:
        """Requests waiting for this model, and running on it, on every gateway."""
        waiting = self.waiting()
        in_flight = sum(r.outstanding for r in self.replicas)
        if self.follower and self.announced is not None:
            return max(waiting, self.announced.queued), max(in_flight, self.announced.in_flight)
        return waiting + self.remote.waiting, in_flight + self.remote.in_flight

    # -- scaling -----------------------------------------------------------------

    def scale_for_demand(self) -> None:
        """The autoscaler's decision for this model, then start what is missing.

        - below min_replicas: up to it;
        - a request waiting and no replica: one, at once (cold start);
        - every slot busy and interactive requests waiting for ``scale_up_after_s``: one
          more, up to what demand needs and max_replicas;
        - down: idle replicas are stopped by ``reap_idle``.
        """
        if self.follower:  # the owner decides, for every gateway's demand
            if self.desired == 0 or not self.replicas:
                self.ask_owner()  # a cold start: tell it now, not at the next report
            return
        scaling = self.spec.scaling
        now = self.clock()
        demand, waiting = self.total_demand(), self.total_waiting()
        needed = max(scaling.min_replicas,
                     min(scaling.max_replicas, math.ceil(demand / scaling.concurrency)))
        if self.desired < scaling.min_replicas:
            self._set_desired(scaling.min_replicas, "min_replicas")
        elif demand and self.desired == 0:
            self._set_desired(1, "request waiting for a sleeping model")
        # pressure is interactive requests waiting with every slot busy: queued
        # background work (batch lines) never adds a replica, it fills idle ones
        pressure = ((self.interactive_waiting() > 0 and self.free_replica() is None)
                    or self.remote.pressed)
        if not pressure:
            self._pressure_since = None
        elif self._pressure_since is None:
            self._pressure_since = now
        elif (needed > self.desired and self.live_replicas >= self.desired
              and now - self._pressure_since >= scaling.scale_up_after_s):
            self._set_desired(self.desired + 1,
                              f"queue sustained {now - self._pressure_since:.1f}s "
                              f"({waiting} waiting, demand {demand})")
            self._pressure_since = now
        self._converge()

    def _set_desired(self, value: int, reason: str) -> None:
        if value != self.desired:
            self._record(self.desired, value, reason)
            self.desired = value

    def _record(self, before: int, after: int, reason: str) -> None:
        event = ScaleEvent(self.wall(), self.spec.id, before, after, reason)
        self.events.append(event)
        del self.events[:-200]
        self.on_event(event)

    def _converge(self) -> None:
        if self.availability()[0] is False:
            return
        missing = self.desired - self.live_replicas
        if missing <= 0:
            self.blocked = None
            return
        wait = self._next_start_at - self.clock()
        if wait > 0:
            if self._delayed_start is None or self._delayed_start.done():
                self._delayed_start = self.owner.spawn(
                    self._start_later(wait), f"{self.spec.id}:backoff"
                )
            return
        for _ in range(missing):
            if self.room is not None and not self.room.reserve(self):
                return  # waits for room; the fleet retries when some is freed
            self.blocked = None
            self._launch()

    async def _start_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._delayed_start = None
        self._converge()

    def _launch(self) -> None:
        replica_id = f"{_slug(self.spec.id)}-{short_id()}"
        replica = Replica(
            replica_id=replica_id,
            model_id=self.spec.id,
            port=free_port(),
            plan=None,
            slots=self.spec.scaling.concurrency,
            log_path=self.settings.logs_dir / f"{replica_id}.log",
            client=self.client,
            settings=self.fleet_settings,
            clock=self.clock,
            launcher=self.launcher,
        )
        replica.resources = self.engine.resources()
        replica.share = share_of(replica.slots, self.gateways)
        self.replicas.append(replica)
        if self.room is not None:
            self.room.place(replica)
        self.owner.spawn(self._run(replica), replica.id)

    async def _prepare(self, replica: Replica) -> bool:
        """Build the launch plan where the replica will run (here: in a thread,
        it may assemble weights, hundreds of MB; on Ray: in its actor)."""
        try:
            await self.launcher.prepare(replica, self.engine)
        except ModelFileMissing as exc:
            await replica.stop(grace_s=1.0)
            self._forget(replica)
            replica.state = ReplicaState.failed
            self._file_check = (self.clock(), str(exc))
            self.on_unavailable(str(exc))
            return False
        except StartFailed as exc:  # no place took it (a Ray cluster without room)
            await replica.stop(grace_s=1.0)
            replica.state = ReplicaState.failed
            replica.failure = str(exc)
            self._start_failed(replica, str(exc))
            return False
        except asyncio.CancelledError:
            await replica.stop(grace_s=1.0)
            raise
        return True

    async def _run(self, replica: Replica) -> None:
        """Start a replica, then watch it until it stops or dies."""
        cold = self.ready_replicas == 0
        if not await self._prepare(replica):
            return
        try:
            await replica.start(self.spec.engine.startup_timeout_s)
        except (StartFailed, OSError) as exc:
            await replica.stop(grace_s=1.0)
            replica.state = ReplicaState.failed
            replica.failure = str(exc)
            self._start_failed(replica, str(exc))
            return
        except asyncio.CancelledError:
            await replica.stop(grace_s=1.0)
            raise
        self.start_failures = 0
        if cold and replica.ready_at is not None:
            self.cold_starts.append(replica.ready_at - replica.started_at)
            del self.cold_starts[:-100]
            self.on_cold_start(self.spec.id, self.cold_starts[-1])
        self.on_capacity()
        try:
            await self._watch(replica)
        except asyncio.CancelledError:
            await replica.stop(grace_s=2.0)
            raise

    def _start_failed(self, replica: Replica, reason: str) -> None:
        self._forget(replica)
        self.start_failures += 1
        log.warning("replica %s failed to start: %s", replica.id, reason)
        fs = self.fleet_settings
        backoff = min(fs.restart_backoff_s * 2 ** (self.start_failures - 1), fs.restart_backoff_max_s)
        self._next_start_at = self.clock() + backoff
        if self.start_failures >= fs.max_start_failures:
            self.unavailable_reason = (
                f"model failed to start {self.start_failures} times in a row; last error: {reason}"
            )
            self._unavailable_until = self.clock() + fs.unavailable_cooldown_s
            if self.desired > self.spec.scaling.min_replicas:
                self._record(self.desired, self.spec.scaling.min_replicas, "start failures")
            self.desired = self.spec.scaling.min_replicas
            self.on_unavailable(self.unavailable_reason)
            return
        self._converge()

    async def _watch(self, replica: Replica) -> None:
        fs = self.fleet_settings
        exited = asyncio.ensure_future(replica.wait_exit())
        failures = 0
        try:
            while replica.state is ReplicaState.ready:
                done, _ = await asyncio.wait({exited}, timeout=fs.health_interval_s)
                if done:
                    break
                if replica.state is not ReplicaState.ready:
                    break
                if await replica.healthy():
                    failures = 0
                    continue
                failures += 1
                if failures >= fs.health_failures:
                    log.warning("replica %s is hung; killing it", replica.id)
                    replica.kill()
            code = await exited
        finally:
            if not exited.done():
                exited.cancel()
        if replica.state is ReplicaState.ready:
            self.replica_died(replica, replica.exit_reason or f"worker exited with code {code}")

    def replica_died(self, replica: Replica, reason: str) -> None:
        """A replica that was serving is gone: forget it and replace it (backoff)."""
        if replica not in self.replicas:
            return
        replica.state = ReplicaState.failed
        replica.failure = reason
        replica.kill()
        self._forget(replica)
        log.warning("replica %s died: %s; replacing it", replica.id, reason)
        self.start_failures += 1
        fs = self.fleet_settings
        backoff = min(fs.restart_backoff_s * 2 ** (self.start_failures - 1), fs.restart_backoff_max_s)
        self._next_start_at = self.clock() + backoff
        self._converge()

    def replica_stalled(self, replica: Replica, silent_s: float) -> None:
        """Nothing came back from a ready replica for ``silent_s`` while a request
        to it passed its deadline: its slots make no progress.  Restart it (a
        follower stops routing to it; the owner restarts it); requests that
        wait for a slot go to the replacement."""
        if replica.state is not ReplicaState.ready or replica not in self.replicas:
            return
        reason = f"replica {replica.id} made no progress for {silent_s:.0f}s; restarting it"
        if replica.mirrored:
            self._shun(replica)
            return
        live = self.live_replicas
        self._record(live, live, reason)
        replica.state = ReplicaState.failed
        replica.failure = reason
        replica.kill()
        self._forget(replica)
        log.warning("%s", reason)
        self._converge()

    async def check_replica(self, replica: Replica) -> None:
        """After a failed dispatch: replace the replica if it is dead or not answering
        (a follower only stops routing to it for a while: the owner replaces it)."""
        if replica.state is not ReplicaState.ready:
            return
        if replica.mirrored:
            if not await replica.healthy():
                self._shun(replica)
            return
        if not replica.alive or not await replica.healthy():
            self.replica_died(replica, "worker stopped answering")

    def _forget(self, replica: Replica) -> None:
        with contextlib.suppress(ValueError):
            self.replicas.remove(replica)

    def is_idle(self, replica: Replica) -> bool:
        return (replica.state is ReplicaState.ready and not replica.busy
                and self.total_waiting() == 0)

    def yields_to(self, replica: Replica, other: ModelPool) -> bool:
        """Whether ``replica`` may be stopped to make room for ``other``: it is
        idle, or it runs only background work while ``other`` has interactive
        requests waiting and this model has none (batch lines never hold a
        replica against an interactive request waiting for room)."""
        if self.live_replicas <= self.spec.scaling.min_replicas:
            return False
        if self.is_idle(replica):
            return True
        return (replica.background_only and other.interactive_waiting() > 0
                and self.interactive_waiting() == 0 and self.remote.waiting == 0)

    def evict(self, replica: Replica, reason: str) -> None:
        """Stop an idle replica (or one running only background work, which is
        preempted and runs again later) to make room for another model."""
        preempted = replica.preempt()
        if preempted:
            reason = f"{reason} (preempting {preempted} background requests)"
        before = self.live_replicas
        self.desired = min(self.desired, before - 1)
        self._record(before, before - 1, reason)
        replica.state = ReplicaState.draining
        self._forget(replica)
        log.info("replica %s: %s", replica.id, reason)
        self.owner.spawn(replica.stop(), f"{replica.id}:evict")

    async def reap_idle(self) -> None:
        """Stop replicas idle past the idle timeout, down to min_replicas."""
        scaling = self.spec.scaling
        now = self.clock()
        if self.follower or self.total_demand() > 0:
            return
        for replica in list(self.replicas):
            if self.live_replicas <= scaling.min_replicas:
                break
            idle = now - replica.last_used
            if (replica.state is ReplicaState.ready and not replica.busy
                    and idle >= scaling.idle_timeout_s):
                before = self.live_replicas
                self._record(before, before - 1, f"idle for {idle:.0f}s")
                self.desired = max(scaling.min_replicas, before - 1)
                replica.state = ReplicaState.draining
                self._forget(replica)
                log.info("replica %s idle for %.0fs; stopping it", replica.id, idle)
                await replica.stop()

    async def stop_all(self) -> None:
        replicas, self.replicas = list(self.replicas), []
        await asyncio.gather(*(r.stop() for r in replicas), return_exceptions=True)

    def describe(self) -> dict[str, Any]:
        available, reason = self.availability()
        return {
            "state": self.state,
            "available": available,
            "reason": reason,
            "ready_replicas": self.ready_replicas,
            "desired_replicas": self.desired,
            "waiting_for_room": self.blocked if self.follower or self.total_demand() else None,
        }

    # -- several gateways (fleetshare.py) -----------------------------------------

    def set_gateways(self, gateways: int) -> None:
        """How many gateways share each replica's slots (each fills a share)."""
        if gateways == self.gateways:
            return
        more_room = gateways < self.gateways
        self.gateways = gateways
        for replica in self.replicas:
            replica.share = share_of(replica.slots, gateways)
        if more_room:
            self.on_capacity()

    def take_load(self, load: RemoteLoad, wall: Callable[[], float]) -> None:
        """Owner: what the other gateways report for this model."""
        self.remote = load
        offset = self.clock() - wall()  # unix seconds -> this clock
        for replica in self.replicas:
            outstanding, last_used = load.replicas.get(replica.id, (0, 0.0))
            replica.remote_outstanding = outstanding
            if last_used:
                replica.remote_last_active = max(replica.remote_last_active, last_used + offset)
        if load.waiting:
            self.scale_for_demand()

    def mirror(self, note: ModelNote | None, gateways: int) -> None:
        """Follower: route to what the owner announced (None: no live owner, so
        no usable replica)."""
        was_available = self.availability()[0]
        self.announced = note
        self.desired = note.desired if note is not None else 0
        self.blocked = note.waiting_for_room if note is not None else None
        gained = self._mirror_replicas(note.replicas if note is not None else ())
        self.set_gateways(gateways)
        if note is not None and not note.available and was_available:
            self.on_unavailable(note.reason or "the fleet's owner reports it unavailable")
        elif gained:
            self.on_capacity()

    def _mirror_replicas(self, notes: tuple[ReplicaNote, ...]) -> bool:
        """Mirror the announced replicas; True if one became ready here."""
        now = self.clock()
        self._shunned = {rid: until for rid, until in self._shunned.items() if until > now}
        known = {r.id: r for r in self.replicas}
        mirrored: list[Replica] = []
        gained = False
        for note in notes:
            if note.id in self._shunned:
                continue
            replica = known.pop(note.id, None)
            if replica is None or (replica.base_url, replica.headers) != (note.base_url,
                                                                          note.headers):
                replica = self._mirrored(note)  # new, or its address is known only now (Ray)
            ready = ReplicaState(note.state) is ReplicaState.ready
            gained = gained or (ready and replica.state is not ReplicaState.ready)
            replica.state = ReplicaState(note.state)
            mirrored.append(replica)
        for gone in known.values():
            gone.state = ReplicaState.stopped
        self.replicas = mirrored
        return gained

    def _mirrored(self, note: ReplicaNote) -> Replica:
        replica = Replica(
            replica_id=note.id, model_id=self.spec.id, port=0,
            plan=LaunchPlan(argv=[], url=note.base_url, headers=dict(note.headers),
                            health_path=note.health_path),
            slots=note.slots, log_path=self.settings.logs_dir / f"{note.id}.log",
            client=self.client, settings=self.fleet_settings, clock=self.clock,
        )
        replica.share = share_of(note.slots, self.gateways)
        replica.mirrored, replica.mirrored_pid = True, note.pid
        replica.started_at = self.clock() - max(0.0, self.wall() - note.started_at)
        return replica

    def _shun(self, replica: Replica) -> None:
        log.warning("replica %s of the fleet's owner is not answering; not routing to it",
                    replica.id)
        replica.state = ReplicaState.failed
        self._forget(replica)
        self._shunned[replica.id] = self.clock() + SHUN_S

    def take_over(self) -> None:
        """This process now owns the fleet: the mirrored replicas died with
        their owner; start from min_replicas (demand decides the rest)."""
        for replica in self.replicas:
            replica.state = ReplicaState.stopped
        self.replicas = []
        self.follower = False
        self.announced = None
        self.blocked = None
        self.desired = self.spec.scaling.min_replicas


class Room:
    """Placement within the machine's budget (threads, memory, GPUs).

    A replica starts only if everything running plus it fits.  If it does not,
    idle replicas of other models are stopped, least recently used first (never
    below their min_replicas, never one with work or waiting requests), as long
    as that makes it fit; otherwise the model waits, and its requests with it,
    until room is freed (or their deadlines pass).
    """

    def __init__(self, budget: Resources, pools: dict[str, ModelPool]) -> None:
        self.budget = budget
        self.pools = pools

    def place(self, replica: Replica) -> None:
        """A replica was launched after ``reserve`` said yes (on one machine,
        nothing to record; on a cluster, the node chosen for it)."""

    def used(self) -> Resources:
        total = Resources()
        for pool in self.pools.values():
            for replica in pool.replicas:
                total = total + replica.resources
        return total

    def reserve(self, pool: ModelPool) -> bool:
        need = pool.engine.resources()
        if not need.fits_in(self.budget):
            pool.blocked = f"one replica needs {need}; the fleet has {self.budget}"
            return False
        free = self.budget - self.used()
        if need.fits_in(free):
            return True
        victims = self.victims(pool)
        chosen: list[Replica] = []
        for victim in victims:
            if need.fits_in(free):
                break
            if sum(1 for c in chosen if c.model_id == victim.model_id) >= (
                    self.pools[victim.model_id].live_replicas
                    - self.pools[victim.model_id].spec.scaling.min_replicas):
                continue
            chosen.append(victim)
            free = free + victim.resources
        if not need.fits_in(free):
            pool.blocked = f"waiting for room: needs {need}, {self.budget - self.used()} free"
            return False
        for victim in chosen:
            self.pools[victim.model_id].evict(victim, f"swapped out for {pool.spec.id}")
        return True

    def victims(self, pool: ModelPool, node_id: str | None = None) -> list[Replica]:
        """The replicas that may be stopped to make room for ``pool`` (on one
        node, or anywhere): idle ones first, least recently used first, then
        ones running only background work."""
        return sorted(
            (r for other in self.pools.values() if other is not pool
             for r in other.replicas
             if (node_id is None or r.node_id == node_id) and other.yields_to(r, pool)),
            key=lambda r: (r.busy, r.last_used),
        )

    def retry_blocked(self) -> None:
        for pool in self.pools.values():
            if pool.blocked is not None and pool.total_demand() > 0:
                pool.scale_for_demand()


def launcher_for(settings: Settings) -> Launcher:
    """Local processes, or Ray actors with a Ray address (ray is imported only then)."""
    if settings.ray_address:
        try:
            from modelfleet.rayfleet import RayLauncher
        except ImportError as exc:
            raise RuntimeError(f"a Ray address is set ({settings.ray_address}) but Ray cannot "
                               f"be imported ({exc}): install modelfleet[ray]") from None
        return RayLauncher(settings)
    return LOCAL


def room_for(launcher: Launcher, settings: Settings, pools: dict[str, ModelPool]) -> Room:
    """This machine's budget, or the Ray cluster's nodes."""
    if settings.ray_address:
        from modelfleet.rayfleet import RayLauncher, RayRoom

        assert isinstance(launcher, RayLauncher)
        return RayRoom(launcher, pools)
    return Room(machine_budget(settings.fleet), pools)


class Fleet:
    """All pools, the idle reaper, and shutdown; and this process's part in a
    fleet shared by several gateway processes (owner or follower)."""

    def __init__(
        self,
        catalog: Catalog,
        settings: Settings,
        client: WorkerClient,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.client = client
        self.clock = clock
        self.owner = TaskOwner("fleet")
        self.pools: dict[str, ModelPool] = {}
        # The data folder's fleet/ (one machine), or a Ray actor (MODELFLEET_RAY_ADDRESS).
        self.share = FleetShare(board_for(settings), self.pools)
        self._reaper_task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Task[None] | None = None
        # Where replicas run: local processes, or Ray actors (rayfleet.py).
        self.launcher = launcher_for(settings)
        for spec in catalog:
            self.pools[spec.id] = self._make_pool(spec)
        self.room = room_for(self.launcher, settings, self.pools)
        for pool in self.pools.values():
            pool.room = self.room
        self.started = False
        # Pools of models removed or replaced at runtime, until their running
        # requests have finished and their replicas have stopped.
        self.draining: set[ModelPool] = set()

    def _make_pool(self, spec: ModelSpec) -> ModelPool:
        engine = engine_for(spec, self.settings.models_dir, self.settings.fleet.llama_server)
        return ModelPool(spec, engine, self.client, self.settings, self.owner, self.clock,
                         ask_owner=self.share.wake, launcher=self.launcher)

    # -- models added, changed and removed at runtime (catalogstore.py) -----------

    def add_pool(self, spec: ModelSpec) -> tuple[ModelPool, ModelPool | None]:
        """A new pool for ``spec`` (a model added, or changed so that its
        replicas must be launched anew), routed to from now on; the pool it
        replaces, if any, drains (``retire``).  Returns (new, replaced)."""
        pool = self._make_pool(spec)
        pool.room = self.room
        old = self.pools.get(spec.id)
        self.pools[spec.id] = pool
        if old is not None:
            pool.events = old.events  # one model, one history of scale decisions
        if self.started:
            pool.follower = not self.share.owned
            if not pool.follower:
                pool.scale_for_demand()  # min_replicas > 0 starts now
        return pool, old

    def remove_pool(self, model_id: str) -> ModelPool | None:
        """Stop routing new work to a removed model's pool (it drains: ``retire``)."""
        return self.pools.pop(model_id, None)

    def retire(self, pool: ModelPool) -> asyncio.Task[None]:
        """Drain a pool that left ``pools``: the requests it has (running, and
        queued while its queue still points at it) finish, then its replicas
        stop.  Waits at most the model's run cap (``max_run_s``)."""
        self.draining.add(pool)
        pool.desired = 0
        return self.owner.spawn(self._drain(pool), f"{pool.spec.id}:drain")

    async def _drain(self, pool: ModelPool) -> None:
        give_up = self.clock() + pool.spec.scaling.run_cap_s + pool.spec.scaling.request_timeout_s
        try:
            while self.clock() < give_up:
                busy = pool.waiting() > 0 or any(r.outstanding or r.remote_outstanding
                                                 for r in pool.replicas)
                if not busy:
                    break
                await asyncio.sleep(0.1)  # polled: the requests settle in their own tasks
            log.info("model %s drained; stopping its %d replicas", pool.spec.id,
                     len(pool.replicas))
            if pool.live_replicas:
                pool._record(pool.live_replicas, 0, "model removed or replaced; drained")
            pool.desired = 0
            await pool.stop_all()
        finally:
            self.draining.discard(pool)

    def start(self) -> None:
        """Own the fleet, unless another process on this data folder does: then
        follow it (and take over when it is gone)."""
        self.started = True
        if self.share.try_own():
            self._own()
        else:
            if self.settings.ray_address:  # the board answers at its first exchange
                log.info("following the fleet's owner on the Ray board (%s) until this "
                         "process may own it", self.settings.ray_address)
            else:
                log.info("another process owns the fleet of %s; following it",
                         self.settings.data_dir)
            for pool in self.pools.values():
                pool.follower = True
        self.owner.spawn(self.share.run(self._take_over, self._step_down), "share")

    def _own(self) -> None:
        if not self.launcher.ready:  # a Ray cluster: connect first (rayfleet.py)
            if self._connecting is None or self._connecting.done():
                self._connecting = self.owner.spawn(self._connect_then_own(), "connect")
            return
        for pool in self.pools.values():
            pool.scale_for_demand()  # min_replicas > 0 starts now
        self._reaper_task = self.owner.spawn(self._reaper(), "reaper")

    async def _connect_then_own(self) -> None:
        await self.launcher.connect()  # retries until it reaches the cluster
        if self.share.owned:  # still (another gateway may have taken over meanwhile)
            self._own()

    def _take_over(self) -> None:
        for pool in self.pools.values():
            pool.take_over()
        self._own()

    def _step_down(self) -> None:
        """Another gateway owns the fleet now (this one could not renew its
        lease in time, on a shared board): stop deciding and stop this
        process's replicas; the next steps mirror the new owner's."""
        if self._reaper_task is not None:
            self._reaper_task.cancel()
            self._reaper_task = None
        for pool in self.pools.values():
            if pool._delayed_start is not None:
                pool._delayed_start.cancel()
                pool._delayed_start = None
            pool.follower = True
            pool.announced = None
            pool.remote = RemoteLoad()
            pool.desired = 0
            pool.blocked = None
            replicas, pool.replicas = list(pool.replicas), []
            for replica in replicas:
                replica.state = ReplicaState.draining
                self.owner.spawn(replica.stop(), f"{replica.id}:step-down")

    async def _reaper(self) -> None:
        """Every reap interval: stop idle replicas, re-decide scale (sustained
        queueing), and retry models waiting for room."""
        while True:
            await asyncio.sleep(self.settings.fleet.reap_interval_s)
            self.tick()
            for pool in list(self.pools.values()):  # a model may be added meanwhile
                try:
                    await pool.reap_idle()
                except Exception:  # keep reaping the other models
                    log.exception("idle reaper failed for %s", pool.spec.id)
            self.room.retry_blocked()

    def tick(self) -> None:
        for pool in self.pools.values():
            if pool.total_demand() or pool.live_replicas < pool.desired:
                pool.scale_for_demand()

    def events(self) -> list[ScaleEvent]:
        return sorted((e for p in self.pools.values() for e in p.events), key=lambda e: e.at)

    async def close(self) -> None:
        self.share.leave()  # followers stop routing to this process's replicas now
        with contextlib.suppress(Exception):
            await self.share.flush()
        await self.owner.close()
        await asyncio.gather(*(p.stop_all() for p in [*self.pools.values(), *self.draining]))
        await self.launcher.close()
        await self.share.aclose()  # a follower takes over
