"""Several gateway processes on one machine, one fleet: who owns the local
replicas, how the others learn about them, and how they ask for them.

Exactly one process per data folder owns the fleet: the one that holds an
OS lock (``flock``) on ``<data dir>/fleet/owner.lock``.  It starts, health
checks, scales and stops replicas as a lone process does.  Every other
process (a *follower*) tries the lock every ``LOCK_RETRY_S``; the kernel
frees it when its holder dies, even by ``kill -9``, and the owner's replicas
die with it (``PR_SET_PDEATHSIG``), so one follower takes over within about
half a second and starts replicas for the demand it sees.

Files in ``<data dir>/fleet/``, each written whole (temp file + rename)::

    owner.lock            the lock; its mtime is the owner's heartbeat (touched
                          every HEARTBEAT_S), its text the owner's pid
    announce.json         the owner: its replicas and each model's state, on
                          every change (within POLL_S while followers run)
    events.json           the owner: its scale events, when one is added
    demand/<gateway>.json a follower: requests waiting and in flight per model,
                          and when it last used each replica; on every change
                          and every REPORT_EVERY_S

A follower mirrors the announced replicas into its pools (it routes to them,
never starts, stops, health-checks or evicts them) and treats them as gone
once the announcement is stale: its writer is dead, or its heartbeat is
older than STALE_S (hung).
The owner adds the followers' reports to its own demand, so a request
waiting on any gateway wakes one replica, sustained queueing anywhere scales
up, and a replica another gateway uses is not reaped as idle.

Each gateway counts its own requests per replica, so each uses a share of a
replica's slots: ``ceil(slots / gateways)`` (see ``share_of``).

Where the gateways meet is a *board* (``Board``): this folder by default
(``FleetFolder``, gateways on one machine), or, with a Ray address, a named
detached Ray actor every gateway on every machine reaches (``rayboard.py``),
where ownership is a lease the owner renews.  The protocol is the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from modelfleet.ids import short_id
from modelfleet.workers.common import pid_alive

if TYPE_CHECKING:
    from modelfleet.fleet import ModelPool, ScaleEvent
    from modelfleet.settings import Settings

log = logging.getLogger(__name__)

POLL_S = 0.1  # followers look at announce.json, the owner at demand/, this often
HEARTBEAT_S = 0.5  # the owner touches owner.lock this often
REPORT_EVERY_S = 1.0  # a follower rewrites its demand file at least this often
STALE_S = 3.0  # an announcement or report this old is from a dead or hung process
LOCK_RETRY_S = 0.5  # a follower tries to take the lock this often
REMIRROR_S = 1.0  # a follower mirrors an unchanged announcement again this often


def share_of(slots: int, gateways: int) -> int:
    """The slots of one replica that one of ``gateways`` gateways may fill.
    Rounded up: with fewer slots than gateways each still gets one, and the
    worker queues the excess itself."""
    return max(1, math.ceil(slots / max(1, gateways)))


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` at once: readers see the old or the new
    file, never part of one.  Private to the user (it may hold worker headers)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.replace(tmp, path)


class OwnerLock:
    """The fleet's ownership: an exclusive ``flock`` on one file, tried without
    waiting.  The kernel releases it when the holder's last descriptor closes,
    which includes the process dying by any signal."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held = False
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        if self.held:
            return True
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as exc:  # a file system without locks: own it, as one process would
            log.warning("cannot lock %s (%s); this process owns the fleet", self.path, exc)
        self.held = True
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the lock
            self._fd = None
        self.held = False


# -- what the owner announces -------------------------------------------------------


@dataclass(frozen=True)
class ReplicaNote:
    """One replica as the owner announces it."""

    id: str
    base_url: str
    state: str  # starting or ready
    slots: int  # the model's per-replica concurrency (all gateways together)
    headers: dict[str, str]
    started_at: float  # unix seconds
    pid: int | None
    health_path: str = "/health"


@dataclass(frozen=True)
class ModelNote:
    """One model's pool as the owner sees it (demand of every gateway included)."""

    state: str
    available: bool
    reason: str | None
    desired: int
    ready: int
    waiting_for_room: str | None
    queued: int
    in_flight: int
    replicas: tuple[ReplicaNote, ...] = ()

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> ModelNote:
        notes = tuple(ReplicaNote(**r) for r in raw.pop("replicas", ()))
        return cls(**raw, replicas=notes)


@dataclass(frozen=True)
class Announcement:
    owner: str  # the owning gateway's id
    pid: int
    at: float  # unix seconds when written (its heartbeat is owner.lock's mtime)
    gateways: int  # the owner plus every follower with a fresh report
    events: str  # a signature of events.json: reread it when this changes
    models: dict[str, ModelNote]

    def encode(self) -> bytes:
        return orjson.dumps(self)

    @classmethod
    def decode(cls, data: bytes) -> Announcement:
        raw = orjson.loads(data)
        models = {k: ModelNote.parse(v) for k, v in raw.pop("models").items()}
        return cls(**raw, models=models)


# -- what a follower reports ---------------------------------------------------------


@dataclass(frozen=True)
class ModelDemand:
    waiting: int = 0
    in_flight: int = 0
    pressed: bool = False  # requests wait and no replica has a free slot for them
    # replica id -> [requests of this gateway on it, when it last finished one (unix s)]
    replicas: dict[str, list[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class DemandReport:
    gateway: str
    pid: int
    at: float
    models: dict[str, ModelDemand]

    def encode(self) -> bytes:
        return orjson.dumps(self)

    @classmethod
    def decode(cls, data: bytes) -> DemandReport:
        raw = orjson.loads(data)
        models = {k: ModelDemand(**v) for k, v in raw.pop("models").items()}
        return cls(**raw, models=models)


@dataclass
class RemoteLoad:
    """What the other gateways report for one model, summed (seen by the owner)."""

    waiting: int = 0
    in_flight: int = 0
    pressed: bool = False
    # replica id -> (their requests on it, when they last used it: unix seconds)
    replicas: dict[str, tuple[int, float]] = field(default_factory=dict)

    def add(self, demand: ModelDemand) -> None:
        self.waiting += demand.waiting
        self.in_flight += demand.in_flight
        self.pressed = self.pressed or demand.pressed
        for rid, (outstanding, last_used) in demand.replicas.items():
            had, seen = self.replicas.get(rid, (0, 0.0))
            self.replicas[rid] = (had + int(outstanding), max(seen, last_used))


def total_load(reports: Iterable[DemandReport]) -> dict[str, RemoteLoad]:
    out: dict[str, RemoteLoad] = {}
    for report in reports:
        for model, demand in report.models.items():
            out.setdefault(model, RemoteLoad()).add(demand)
    return out


# -- the board -----------------------------------------------------------------------


class Board(Protocol):
    """Where the gateways sharing one fleet meet: who owns it, what the owner
    announces, its scale events, and the followers' demand.

    Every call but ``exchange``, ``pause`` and ``aclose`` is synchronous and
    cheap (a file, or what the last exchange brought): ``FleetShare.step``
    runs them on the event loop.  A board whose store is remote sends what
    they wrote, and fetches what they read, in ``exchange``.
    """

    kind: str

    def join(self, gateway: str) -> None:
        """This process's gateway id (before the first call)."""

    def try_acquire(self) -> bool:
        """Own the fleet if no live gateway does; True while this one owns it."""

    def holds(self) -> bool:
        """Whether this gateway still owns the fleet (a lease may be lost)."""

    def release(self) -> None: ...

    def beat(self) -> None:
        """The owner is alive (a heartbeat)."""

    def owner_alive(self, announcement: Announcement, now: float) -> bool:
        """Whether the gateway that wrote ``announcement`` still owns the fleet."""

    def publish(self, announcement: Announcement) -> None: ...

    def publish_events(self, events: list[ScaleEvent]) -> None: ...

    def read_events(self) -> list[dict[str, Any]]: ...

    def changed_announcement(self) -> Announcement | None:
        """The announcement if it changed since the last call, else None."""

    def report(self, report: DemandReport) -> None: ...

    def withdraw(self, gateway: str) -> None: ...

    def reports(self, now: float) -> list[DemandReport]:
        """The followers' fresh reports (read by the owner)."""

    async def exchange(self) -> None:
        """Send what was written and fetch what is read (remote boards)."""

    async def pause(self, seconds: float) -> None:
        """Until the next step: ``seconds``, or less when there is news to send."""

    async def aclose(self) -> None:
        """Send what is left (a release, a withdrawal) and let go."""

    def describe(self) -> dict[str, Any]: ...


def board_for(settings: Settings) -> Board:
    """The data folder's ``fleet/`` (one machine), or a Ray actor (a cluster)."""
    if settings.ray_address:
        from modelfleet.rayboard import RayBoard

        return RayBoard(settings.ray_address)
    return FleetFolder(settings.data_dir / "fleet")


# -- the folder ----------------------------------------------------------------------


class FleetFolder:
    """The files of ``<data dir>/fleet``: read only when they changed (the
    default board: several gateways on one machine)."""

    kind = "folder"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.lock = OwnerLock(folder / "owner.lock")
        self.announce_path = folder / "announce.json"
        self.events_path = folder / "events.json"
        self.demand_dir = folder / "demand"
        self._announce_seen: tuple[int, int] | None = None
        self._reports: dict[str, tuple[int, DemandReport]] = {}
        self._listed = -1  # demand/'s mtime when last listed

    def join(self, gateway: str) -> None:
        pass

    def try_acquire(self) -> bool:
        return self.lock.try_acquire()

    def holds(self) -> bool:
        return self.lock.held  # a flock is never lost while the process lives

    def release(self) -> None:
        self.lock.release()

    def owner_alive(self, announcement: Announcement, now: float) -> bool:
        """Its writer lives and is not hung (its heartbeat is recent)."""
        return pid_alive(announcement.pid) and now - self.last_beat() < STALE_S

    async def exchange(self) -> None:
        pass

    async def pause(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def aclose(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"board": self.kind}

    def publish(self, announcement: Announcement) -> None:
        write_atomic(self.announce_path, announcement.encode())

    def publish_events(self, events: list[ScaleEvent]) -> None:
        write_atomic(self.events_path, orjson.dumps(events))

    def beat(self) -> None:
        """The owner's heartbeat: the lock file's modification time."""
        os.utime(self.lock.path)

    def last_beat(self) -> float:
        try:
            return os.stat(self.lock.path).st_mtime
        except OSError:
            return -math.inf

    def read_events(self) -> list[dict[str, Any]]:
        try:
            events = orjson.loads(self.events_path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return []
        return events if isinstance(events, list) else []

    def changed_announcement(self) -> Announcement | None:
        """The announcement if the file changed since the last call, else None."""
        try:
            st = os.stat(self.announce_path)
        except FileNotFoundError:
            return None
        seen = (st.st_ino, st.st_mtime_ns)
        if seen == self._announce_seen:
            return None
        try:
            announcement = Announcement.decode(self.announce_path.read_bytes())
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("unreadable fleet announcement %s: %s", self.announce_path, exc)
            return None
        self._announce_seen = seen
        return announcement

    def report_path(self, gateway: str) -> Path:
        return self.demand_dir / f"{gateway}.json"

    def report(self, report: DemandReport) -> None:
        self.demand_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.report_path(report.gateway), report.encode())

    def withdraw(self, gateway: str) -> None:
        with contextlib.suppress(OSError):
            self.report_path(gateway).unlink()

    def reports(self, now: float) -> list[DemandReport]:
        """The followers' fresh reports; those of dead processes are deleted."""
        try:
            listed = os.stat(self.demand_dir).st_mtime_ns
        except FileNotFoundError:
            listed = 0
        if listed == self._listed and not self._reports:
            return []  # no follower, as before (the usual case: one process)
        self._listed = listed
        fresh: list[DemandReport] = []
        seen: dict[str, tuple[int, DemandReport]] = {}
        try:
            entries = list(os.scandir(self.demand_dir))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            report = self._read_report(entry, seen)
            if report is None:
                continue
            if not pid_alive(report.pid):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                continue
            if now - report.at < STALE_S:
                fresh.append(report)
        self._reports = seen
        return fresh

    def _read_report(self, entry: os.DirEntry[str],
                     seen: dict[str, tuple[int, DemandReport]]) -> DemandReport | None:
        if not entry.name.endswith(".json"):
            return None
        try:
            mtime = entry.stat().st_mtime_ns
            cached = self._reports.get(entry.name)
            if cached is not None and cached[0] == mtime:
                report = cached[1]
            else:
                with open(entry.path, "rb") as handle:
                    report = DemandReport.decode(handle.read())
        except (OSError, ValueError, TypeError, KeyError):
            return None
        seen[entry.name] = (mtime, report)
        return report


# -- the two roles ---------------------------------------------------------------------


def note_of(pool: ModelPool) -> ModelNote:
    """What the owner announces about one of its pools."""
    from modelfleet.supervisor import ReplicaState

    wall, mono = time.time(), pool.clock()
    live = (ReplicaState.starting, ReplicaState.ready)
    replicas = tuple(
        ReplicaNote(id=r.id, base_url=r.base_url, state=r.state.value, slots=r.slots,
                    headers=r.headers, started_at=round(wall - (mono - r.started_at), 3),
                    pid=r.pid, health_path=r.plan.health_path if r.plan else "/health")
        for r in pool.replicas if r.state in live
    )
    described = pool.describe()
    queued, in_flight = pool.fleet_load()
    return ModelNote(state=described["state"], available=described["available"],
                     reason=described["reason"], desired=pool.desired, ready=pool.ready_replicas,
                     waiting_for_room=described["waiting_for_room"], queued=queued,
                     in_flight=in_flight, replicas=replicas)


def demand_of(pool: ModelPool) -> ModelDemand | None:
    """What a follower reports about one pool (None: nothing to say)."""
    wall, mono = time.time(), pool.clock()
    used = {
        r.id: [r.outstanding, round(wall - (mono - r.last_active), 3)]
        for r in pool.replicas if r.outstanding or r.served
    }
    waiting = pool.waiting()
    if not waiting and not used:
        return None
    return ModelDemand(waiting=waiting, in_flight=sum(r.outstanding for r in pool.replicas),
                       pressed=pool.interactive_waiting() > 0 and pool.free_replica() is None,
                       replicas=used)


def _events_signature(pools: Iterable[ModelPool]) -> str:
    return ",".join(f"{len(p.events)}:{p.events[-1].at if p.events else 0}" for p in pools)


class FleetShare:
    """This process's part in a shared fleet: the owner or a follower.

    ``run`` is one background loop for both roles; ``take_over`` (given by the
    fleet) is called when this process becomes the owner, ``step_down`` when
    it lost the fleet to another gateway (a lease it could not renew in time).
    ``board``: a ``Board``, or a data folder's ``fleet/`` (``FleetFolder``).
    """

    def __init__(self, board: Board | Path, pools: dict[str, ModelPool],
                 wall: Callable[[], float] = time.time) -> None:
        self.board: Board = FleetFolder(board) if isinstance(board, Path) else board
        self.files = self.board  # the name the folder-only code knew it by
        self.pools = pools
        self.wall = wall
        self.gateway = f"{os.getpid()}-{short_id()}"
        self.board.join(self.gateway)
        self.owned = False
        self.gateways = 1
        self.owner_pid: int | None = None
        self._lock_tried = -math.inf
        # owner: what announce.json holds, when it was last compared, the last beat
        self._announced_content = b""
        self._compared = -math.inf
        self._beat = -math.inf
        self._events_sig = ""
        # follower: the last announcement read, the one it follows (None while the
        # owner is dead or silent), and its last report (content, when)
        self._latest: Announcement | None = None
        self._announced: Announcement | None = None
        self._reported: tuple[bytes, float] = (b"", -math.inf)
        self._wake_pending = False
        self._remirrored = -math.inf

    # -- both ----------------------------------------------------------------------

    def try_own(self) -> bool:
        self._lock_tried = time.monotonic()
        if self.board.try_acquire():
            self.owned = True
            self.owner_pid = os.getpid()
            self.gateways = 1
            self._latest = self._announced = None
            self.board.withdraw(self.gateway)
        return self.owned

    async def run(self, take_over: Callable[[], None],
                  step_down: Callable[[], None] = lambda: None) -> None:
        while True:
            await self.board.exchange()  # a remote board: fetch, and send the last step's news
            self.step(take_over, step_down)
            await self.board.pause(POLL_S)  # a remote board: at once when the step wrote

    async def flush(self) -> None:
        """Send what the board holds for others now (a remote board)."""
        await self.board.exchange()

    def step(self, take_over: Callable[[], None],
             step_down: Callable[[], None] = lambda: None) -> None:
        try:
            if self.owned and not self.board.holds():
                log.warning("this process (pid %s) no longer owns the fleet; following "
                            "its new owner", os.getpid())
                self.owned = False
                self.owner_pid = None
                self._latest = self._announced = None
                self._announced_content = b""
                self._events_sig = ""
                step_down()
            if (not self.owned and (time.monotonic() - self._lock_tried >= LOCK_RETRY_S
                                    or self.board.holds()) and self.try_own()):
                log.info("this process (pid %s) now owns the fleet", os.getpid())
                take_over()
            if self.owned:
                self.owner_step()
            else:
                self.follower_step()
        except Exception:  # keep sharing; the next step tries again
            log.exception("fleet sharing step failed")

    def describe(self) -> dict[str, Any]:
        return {"owner": self.owned, "owner_pid": self.owner_pid, "gateways": self.gateways,
                "gateway": self.gateway,
                "owner_gateway": self.gateway if self.owned else (
                    self._announced.owner if self._announced is not None else None),
                **self.board.describe()}

    # -- owner ---------------------------------------------------------------------

    def owner_step(self) -> None:
        now = self.wall()
        reports = self.board.reports(now)
        if reports or self.gateways > 1:  # alone, and alone before: nothing to add
            self._set_gateways(1 + len(reports))
            loads = total_load(reports)
            for model_id, pool in self.pools.items():
                pool.take_load(loads.get(model_id, RemoteLoad()), self.wall)
        self._publish(now)
        if now - self._beat >= HEARTBEAT_S:
            self.board.beat()
            self._beat = now

    def _set_gateways(self, gateways: int) -> None:
        if gateways != self.gateways:
            log.info("gateway processes sharing the fleet: %d", gateways)
        self.gateways = gateways
        for pool in self.pools.values():
            pool.set_gateways(gateways)

    def _publish(self, now: float) -> None:
        signature = _events_signature(self.pools.values())
        if signature != self._events_sig:
            self.board.publish_events(
                sorted((e for p in self.pools.values() for e in p.events), key=lambda e: e.at))
            self._events_sig = signature
        if self.gateways == 1 and now - self._compared < HEARTBEAT_S:
            return  # alone: twice a second is enough for a follower that starts
        self._compared = now
        body = {model_id: note_of(pool) for model_id, pool in self.pools.items()}
        content = orjson.dumps([body, self.gateways, signature])
        if content != self._announced_content:
            self.board.publish(Announcement(owner=self.gateway, pid=os.getpid(), at=now,
                                            gateways=self.gateways, events=signature,
                                            models=body))
            self._announced_content = content

    def leave(self) -> None:
        """An owner about to stop its replicas: announce that it has none, so
        followers stop routing to them now."""
        if self.owned:
            with contextlib.suppress(OSError):
                self.board.publish(Announcement(owner=self.gateway, pid=os.getpid(),
                                                at=self.wall(), gateways=self.gateways,
                                                events=self._events_sig, models={}))

    def close(self) -> None:
        """Leave the fleet: an owner lets the lock go (a follower takes over); a
        follower withdraws its report."""
        if not self.owned:
            self.board.withdraw(self.gateway)
        self.board.release()
        self.owned = False

    async def aclose(self) -> None:
        """``close``, then let the board send it (a remote board)."""
        self.close()
        await self.board.aclose()

    # -- follower ------------------------------------------------------------------

    def wake(self) -> None:
        """A follower has news for the owner (a request waits): report it now,
        not at the next step."""
        if self.owned or self._wake_pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a test driving steps by hand): the next step
            return
        self._wake_pending = True
        loop.call_soon(self._woken)

    def _woken(self) -> None:
        self._wake_pending = False
        if not self.owned:
            try:
                self._report(self.wall())
            except OSError as exc:
                log.warning("could not report demand to the fleet's owner: %s", exc)

    def follower_step(self) -> None:
        now = self.wall()
        latest = self._latest = self.board.changed_announcement() or self._latest
        if latest is not None and not self.board.owner_alive(latest, now):
            latest = None  # its owner is dead, or hung (followed again if it recovers)
        self._follow(latest)
        self._report(now)

    def _follow(self, announcement: Announcement | None) -> None:
        previous, self._announced = self._announced, announcement
        now = time.monotonic()
        if announcement is previous:
            if announcement is not None and now - self._remirrored >= REMIRROR_S:
                self._remirrored = now  # replicas it stopped routing to may be back
                for model_id, pool in self.pools.items():
                    pool.mirror(announcement.models.get(model_id), self.gateways)
            return
        self._remirrored = now
        self.owner_pid = announcement.pid if announcement else None
        self.gateways = announcement.gateways if announcement else 1
        if announcement is None:
            log.warning("the fleet's owner is gone; waiting for another to take over")
        elif previous is None or previous.events != announcement.events:
            self._mirror_events()
        for model_id, pool in self.pools.items():
            note = announcement.models.get(model_id) if announcement else None
            pool.mirror(note, self.gateways)

    def _mirror_events(self) -> None:
        from modelfleet.fleet import ScaleEvent

        by_model: dict[str, list[ScaleEvent]] = {}
        for raw in self.board.read_events():
            with contextlib.suppress(TypeError):
                event = ScaleEvent(**raw)
                by_model.setdefault(event.model, []).append(event)
        for model_id, pool in self.pools.items():
            pool.events = by_model.get(model_id, [])

    def _report(self, now: float) -> None:
        models = {model_id: demand for model_id, pool in self.pools.items()
                  if (demand := demand_of(pool)) is not None}
        content = orjson.dumps(models)
        if content == self._reported[0] and now - self._reported[1] < REPORT_EVERY_S:
            return
        self.board.report(DemandReport(gateway=self.gateway, pid=os.getpid(), at=now,
                                       models=models))
        self._reported = (content, now)
