"""The fleet's board on a Ray cluster: one fleet controller for every gateway
on every machine.

With ``MODELFLEET_RAY_ADDRESS``, the gateways meet at a named, detached Ray
actor (``modelfleet-fleet-board`` in namespace ``modelfleet``) instead of the
data folder's ``fleet/`` files (``fleetshare.FleetFolder``).  The protocol
is the one of ``fleetshare.py``: one gateway owns the fleet, announces its
replicas and scale events, and adds the others' demand reports to its own.

- **Ownership is a lease** held in the actor: the owner renews it on every
  exchange (every ``POLL_S``); one that stops renewing (dead, hung, cut off)
  loses it ``LEASE_S`` later, to the first other gateway that asks.  A lease
  term counts the owners; the actor keeps only the holder's announcements and
  events (a deposed owner's late writes are dropped), and a deposed owner
  that comes back steps down (``Fleet._step_down``).  Time is the actor's
  own monotonic clock, so the gateways' clocks need not agree.
- **One exchange per step.**  ``FleetShare.step`` reads and writes the board
  synchronously, from what the last exchange brought; ``exchange`` sends the
  writes and fetches the rest in one actor call, awaited on the event loop
  with a timeout (``CALL_TIMEOUT_S``).  A follower with news (a request waits
  for a sleeping model) exchanges at once.
- **Unreachable actor.**  The gateway keeps serving: a follower routes with
  the last announcement, an owner keeps its replicas, and both retry.  A
  restarted actor (``max_restarts=-1``) starts empty: for ``LEASE_S`` only a
  gateway that owned the fleet may claim it, and each board re-sends what it
  had published.

Ray is imported here only, and only once a gateway connects (lazily, in a
thread: ``ray.init(address=..., namespace="modelfleet")``).  ``LeaseBoard``
(the actor's state) and ``RemoteBoard`` (a gateway's side) run without Ray,
which is how the lease logic is tested (tests/test_ray_board.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson

from modelfleet.fleetshare import STALE_S, Announcement, DemandReport

if TYPE_CHECKING:
    from modelfleet.fleet import ScaleEvent

log = logging.getLogger(__name__)

ACTOR_NAME = "modelfleet-fleet-board"
NAMESPACE = "modelfleet"
LEASE_S = 3.0  # an owner that has not renewed its lease for this long loses it
CALL_TIMEOUT_S = 2.0  # an exchange waits this long for the actor (or for Ray's connection)
MIN_GAP_S = 0.02  # between two exchanges of one gateway
RECONNECT_S = 1.0  # after a failed connection, wait this long before the next try
REPORT_STALE_S = STALE_S  # a follower's report older than this (actor's clock) is dropped
REPORT_FORGET_S = 60.0  # and forgotten after this


# -- the actor's state (no Ray here) ----------------------------------------------------


class LeaseBoard:
    """What the board actor holds, and its one call (``sync``).

    A request is a dict: ``gateway`` (its id), ``meta`` (pid, host), ``want``
    (own the fleet if it is free, or renew), ``owned`` (the caller believes it
    owns it: lets it reclaim a restarted board first), ``release``,
    ``lease_s``, ``announce`` / ``events`` (an owner's writes, bytes),
    ``report`` (a follower's demand, bytes), ``withdraw``, and ``seen_announce``
    / ``seen_events`` (the versions the caller has).  The reply says who holds
    the lease and whether it is live, and carries what changed.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 grace_s: float = 0.0) -> None:
        self.clock = clock
        self.instance = secrets.token_hex(8)  # a restarted actor is another instance
        self.holder: str | None = None
        self.holder_meta: dict[str, Any] = {}
        self.expires = -math.inf
        self.term = 0
        self.announce: bytes | None = None
        self.announce_version = 0
        self.events: bytes | None = None
        self.events_version = 0
        self.reports: dict[str, tuple[bytes, float]] = {}
        # Until then only a gateway that owned the fleet may claim it (a restart).
        self.reserved_until = clock() + grace_s

    def live(self, now: float) -> bool:
        return self.holder is not None and now < self.expires

    def _lease(self, req: dict[str, Any], now: float) -> bool:
        """Release, renew or take the lease as asked; whether the caller holds it."""
        gateway: str = req["gateway"]
        lease_s = float(req.get("lease_s") or LEASE_S)
        if req.get("release") and self.holder == gateway:
            self.holder, self.expires = None, -math.inf
        if req.get("want"):
            if self.live(now):
                if self.holder == gateway:
                    self.expires = now + lease_s  # renewed
            elif now >= self.reserved_until or req.get("owned"):
                if self.holder != gateway:
                    self.term += 1
                    self.holder = gateway
                self.holder_meta = dict(req.get("meta") or {})
                self.expires = now + lease_s
        return self.live(now) and self.holder == gateway

    def sync(self, req: dict[str, Any]) -> dict[str, Any]:
        now = self.clock()
        gateway: str = req["gateway"]
        owned = self._lease(req, now)
        if owned:
            if req.get("announce") is not None:
                self.announce = req["announce"]
                self.announce_version += 1
            if req.get("events") is not None:
                self.events = req["events"]
                self.events_version += 1
            self.reports.pop(gateway, None)
        elif req.get("report") is not None:
            self.reports[gateway] = (req["report"], now)
        if req.get("withdraw"):
            self.reports.pop(gateway, None)
        live = self.live(now)
        reply: dict[str, Any] = {
            "instance": self.instance, "owned": owned, "live": live, "term": self.term,
            "holder": self.holder if live else None,
            "holder_meta": self.holder_meta if live else {},
            "lease_left": round(self.expires - now, 3) if live else 0.0,
        }
        if not owned and req.get("seen_announce") != self.announce_version:
            reply["announce"], reply["announce_version"] = self.announce, self.announce_version
        if req.get("seen_events") != self.events_version:
            reply["events"], reply["events_version"] = self.events, self.events_version
        if owned:
            reply["reports"] = [data for data, at in self.reports.values()
                                if now - at < REPORT_STALE_S]
            self.reports = {g: r for g, r in self.reports.items()
                            if now - r[1] < REPORT_FORGET_S}
        return reply


class BoardActor:
    """The Ray actor: a ``LeaseBoard``, its calls run one at a time."""

    def __init__(self) -> None:
        import ray

        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self.board = LeaseBoard(grace_s=LEASE_S if restarted else 0.0)

    def sync(self, req: dict[str, Any]) -> dict[str, Any]:
        return self.board.sync(req)


# -- a gateway's side -------------------------------------------------------------------

Transport = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class RemoteBoard:
    """A ``fleetshare.Board`` whose store is elsewhere (the actor), reached
    through ``transport`` (one async call per exchange)."""

    kind = "remote"

    def __init__(self, transport: Transport, *, lease_s: float = LEASE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.transport = transport
        self.lease_s = lease_s
        self.clock = clock
        self.gateway = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.meta = {"pid": os.getpid(), "host": socket.gethostname()}
        # ownership as of the last exchange
        self.want = False
        self.held = False
        self.holder: str | None = None
        self.holder_meta: dict[str, Any] = {}
        self.live = False
        self.term = 0
        self.lease_left = 0.0
        self.instance: str | None = None
        # writes not sent yet, and the last sent (re-sent to a restarted actor)
        self._release = False
        self._withdraw = False
        self._announce_out: bytes | None = None
        self._events_out: bytes | None = None
        self._report_out: bytes | None = None
        self._announce_last: bytes | None = None
        self._events_last: bytes | None = None
        # what the exchanges brought
        self._seen_announce = -1
        self._seen_events = -1
        self._announcement: Announcement | None = None
        self._announcement_new = False
        self._events: list[dict[str, Any]] = []
        self._reports: list[DemandReport] = []
        # health of the connection
        self.reachable = False
        self.last_ok = -math.inf
        self.failures = 0
        self._warned_at = -math.inf
        self._news = asyncio.Event()

    # -- Board: synchronous, from the last exchange ------------------------------

    def join(self, gateway: str) -> None:
        self.gateway = gateway

    def try_acquire(self) -> bool:
        self.want = True
        self._release = False
        return self.held

    def holds(self) -> bool:
        return self.held

    def release(self) -> None:
        if self.held or self.want:
            self._release = True
        self.want = self.held = False

    def beat(self) -> None:
        pass  # every exchange of the owner renews its lease

    def owner_alive(self, announcement: Announcement, now: float) -> bool:
        """The lease of the announcement's writer is live (as of the last
        exchange: while the actor is unreachable, the last answer stands)."""
        return self.live and announcement.owner == self.holder

    def publish(self, announcement: Announcement) -> None:
        self._announce_out = self._announce_last = announcement.encode()
        self._news.set()

    def publish_events(self, events: list[ScaleEvent]) -> None:
        self._events_out = self._events_last = orjson.dumps(events)
        self._news.set()

    def read_events(self) -> list[dict[str, Any]]:
        return self._events

    def changed_announcement(self) -> Announcement | None:
        if not self._announcement_new:
            return None
        self._announcement_new = False
        return self._announcement

    def report(self, report: DemandReport) -> None:
        self._report_out = report.encode()
        self._withdraw = False
        self._news.set()

    def withdraw(self, gateway: str) -> None:
        self._report_out = None
        self._withdraw = True

    def reports(self, now: float) -> list[DemandReport]:
        return self._reports if self.held else []

    def describe(self) -> dict[str, Any]:
        return {"board": self.kind, "board_reachable": self.reachable,
                "lease_term": self.term, "lease_holder": self.holder,
                "lease_holder_host": self.holder_meta.get("host"),
                "lease_left_s": self.lease_left}

    # -- the exchange --------------------------------------------------------------

    async def pause(self, seconds: float) -> None:
        """``seconds``, or less when a step wrote news (a request waits, the
        owner's replicas changed), but at least ``MIN_GAP_S``: an owner whose
        announcement changes at every step (its queues under load) exchanges
        at most 1 / MIN_GAP_S times a second."""
        await asyncio.sleep(MIN_GAP_S)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._news.wait(), max(0.0, seconds - MIN_GAP_S))

    async def exchange(self) -> None:
        self._news.clear()
        announce, events, report = self._announce_out, self._events_out, self._report_out
        release, withdraw = self._release, self._withdraw
        req = {"gateway": self.gateway, "meta": self.meta, "want": self.want,
               "owned": self.held, "release": release, "lease_s": self.lease_s,
               "announce": announce, "events": events, "report": report,
               "withdraw": withdraw, "seen_announce": self._seen_announce,
               "seen_events": self._seen_events}
        try:
            reply = await self.transport(req)
        except Exception as exc:  # keep serving with what we have; retry next step
            self._failed(exc)
            return
        # what was sent is delivered (unless replaced meanwhile: then send that)
        if self._announce_out is announce:
            self._announce_out = None
        if self._events_out is events:
            self._events_out = None
        if self._report_out is report:
            self._report_out = None
        if release:
            self._release = False
        if withdraw and self._withdraw:
            self._withdraw = False
        self._apply(reply)

    def _apply(self, reply: dict[str, Any]) -> None:
        if not self.reachable and self.failures:
            log.info("the fleet board is reachable again")
        self.reachable, self.failures, self.last_ok = True, 0, self.clock()
        if reply["instance"] != self.instance:
            if self.instance is not None:
                log.warning("the fleet board restarted; sending it what this gateway had")
                self._seen_announce = self._seen_events = -1
                if reply["owned"]:
                    self._announce_out = self._announce_out or self._announce_last
                    self._events_out = self._events_out or self._events_last
                    self._news.set()
            self.instance = reply["instance"]
        was_held = self.held
        self.held = bool(reply["owned"]) and self.want
        if was_held and not self.held:
            # deposed: the current announcement is news for the follower again
            self._announcement_new = self._announcement is not None
        self.live, self.holder, self.term = reply["live"], reply["holder"], reply["term"]
        self.holder_meta, self.lease_left = reply["holder_meta"], reply["lease_left"]
        # A board with nothing yet (restarted) leaves the last announcement and
        # events in place: whether to follow them is the lease's to say.
        if "announce" in reply:
            self._seen_announce = reply["announce_version"]
            if reply["announce"]:
                try:
                    self._announcement = Announcement.decode(reply["announce"])
                    self._announcement_new = True
                except (ValueError, TypeError, KeyError) as exc:
                    log.warning("unreadable fleet announcement on the board: %s", exc)
        if "events" in reply:
            self._seen_events = reply["events_version"]
            with contextlib.suppress(orjson.JSONDecodeError):
                events = orjson.loads(reply["events"]) if reply["events"] else None
                if isinstance(events, list):
                    self._events = events
        reports: list[DemandReport] = []
        for data in reply.get("reports", ()):
            try:
                reports.append(DemandReport.decode(data))
            except (ValueError, TypeError, KeyError):
                continue
        self._reports = reports

    def _failed(self, exc: BaseException) -> None:
        self.reachable = False
        self.failures += 1
        now = self.clock()
        if self.failures == 1 or now - self._warned_at > 30.0:
            self._warned_at = now
            log.warning("cannot reach the fleet board (%s: %s); %s with what it knew",
                        type(exc).__name__, exc,
                        "owning the fleet" if self.held else "routing")

    async def aclose(self) -> None:
        if self._release or self._withdraw:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.exchange(), CALL_TIMEOUT_S + 1.0)


# -- on Ray -----------------------------------------------------------------------------


class RayTransport:
    """Calls to the board actor on the Ray cluster at ``address``: connects on
    first use (in a thread: one at a time, however long ``ray.init`` takes; an
    exchange waits for it at most ``timeout_s``), then one awaited actor call
    per exchange, at most ``timeout_s``."""

    def __init__(self, address: str, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._actor: Any = None
        self._connecting: asyncio.Future[Any] | None = None
        self._next_try = -math.inf
        self._lock = threading.Lock()

    async def _actor_handle(self) -> Any:
        if self._actor is not None:
            return self._actor
        if self._connecting is None:
            if time.monotonic() < self._next_try:
                raise ConnectionError("not connected to Ray (retrying)")
            self._connecting = self._start_connecting()
        connecting = self._connecting
        try:
            await asyncio.wait_for(asyncio.shield(connecting), self.timeout_s)
        except TimeoutError:
            raise ConnectionError(f"connecting to Ray at {self.address}") from None
        except Exception:
            if self._connecting is connecting:
                self._connecting = None
                self._next_try = time.monotonic() + RECONNECT_S
            raise
        if self._connecting is connecting:
            self._connecting = None
            self._actor = connecting.result()
        return connecting.result()

    def _start_connecting(self) -> asyncio.Future[Any]:
        """``_connect`` in a daemon thread: ``ray.init`` may retry an unreachable
        cluster for minutes, and must not hold up the process's exit."""
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(self._connect())
            except BaseException as exc:
                done.set_exception(exc)

        threading.Thread(target=run, name="modelfleet-ray-connect", daemon=True).start()
        future = asyncio.wrap_future(done)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # always retrieved
        return future

    async def __call__(self, req: dict[str, Any]) -> dict[str, Any]:
        actor = await self._actor_handle()
        ref = actor.sync.remote(req)
        try:
            reply: dict[str, Any] = await asyncio.wait_for(
                asyncio.wrap_future(ref.future()), self.timeout_s)
        except TimeoutError:
            raise
        except Exception:
            self._actor = None  # the actor died or moved: look it up again
            raise
        return reply

    def _connect(self) -> Any:
        with self._lock:
            import ray
            from ray import cloudpickle

            if not ray.is_initialized():
                ray.init(address=self.address, namespace=NAMESPACE, log_to_driver=False,
                         logging_level=logging.WARNING)
                log.info("connected to the Ray cluster at %s", self.address)
            # The actor's code travels with it: a node need not have modelfleet.
            cloudpickle.register_pickle_by_value(sys.modules[__name__])
            actor_class = ray.remote(BoardActor)
            return actor_class.options(
                name=ACTOR_NAME, namespace=NAMESPACE, lifetime="detached",
                get_if_exists=True, num_cpus=0, max_restarts=-1,
            ).remote()


class RayBoard(RemoteBoard):
    """The board held by the named detached actor on the Ray cluster at ``address``."""

    kind = "ray"

    def __init__(self, address: str, **kwargs: Any) -> None:
        super().__init__(RayTransport(address), **kwargs)
        self.address = address

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "ray_address": self.address}
