"""One replica: a worker process on a private port, and its life.

    starting ──healthy──▶ ready ──stop()──▶ draining ──▶ stopped
        │                   │
        └──exit/timeout──▶ failed ◀──exit / hung (health pings fail)

The process runs in its own session so that stopping it ends everything it
started; output goes to ``logs/<replica>.log`` in the data folder.

Where the process runs is a *launcher*'s business: ``LocalLauncher`` (the
default) starts it here, a child of the API process on 127.0.0.1;
``modelfleet.rayfleet.RayLauncher`` starts it on a Ray node, inside an actor
that owns it.  The pool and this class see the same ``WorkerProcess`` either
way: a URL, a pid, an exit to wait for, a stop and a kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import math
import os
import signal
import socket
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from modelfleet.engines.base import LaunchPlan, Resources
from modelfleet.engines.http import WorkerClient
from modelfleet.settings import FleetSettings

if TYPE_CHECKING:
    from modelfleet.engines.base import Engine

log = logging.getLogger(__name__)


class ReplicaState(StrEnum):
    starting = "starting"
    ready = "ready"
    draining = "draining"
    stopped = "stopped"
    failed = "failed"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the new worker, before exec: ask Linux to SIGKILL it when the API
    process dies, even by kill -9, so no replica outlives the fleet that owns
    it (and its port and memory).  A no-op elsewhere."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


PR_SET_PDEATHSIG = 1


class StartFailed(Exception):
    pass


def log_tail(path: Path, lines: int = 3) -> str:
    """The last non-empty lines of a worker's log, for a failure message."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    useful = [line for line in text if line.strip()][-lines:]
    return (": " + " | ".join(useful))[:600] if useful else ""


class WorkerProcess(ABC):
    """A running worker process, wherever it runs."""

    # Why it ended, when the launcher knows better than an exit code (a node died).
    reason: str | None = None

    @property
    @abstractmethod
    def pid(self) -> int | None:
        """Its pid on the machine it runs on."""

    @property
    @abstractmethod
    def returncode(self) -> int | None:
        """None while it runs."""

    @abstractmethod
    async def wait(self) -> int:
        """Until it exits: its exit code."""

    @abstractmethod
    async def stop(self, grace_s: float) -> None:
        """SIGTERM to its process group, SIGKILL after the grace period."""

    @abstractmethod
    def kill(self) -> None:
        """End it now."""

    @abstractmethod
    async def tail(self) -> str:
        """The end of its log (for a failure message), or ''."""


class LocalProcess(WorkerProcess):
    """A child process of this one (its own session; dies with this process)."""

    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    async def wait(self) -> int:
        return await self.proc.wait()

    async def stop(self, grace_s: float) -> None:
        proc = self.proc
        if proc.returncode is None:
            self._signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except TimeoutError:
                self._signal(signal.SIGKILL)
                await proc.wait()

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    async def tail(self) -> str:
        return log_tail(self.log_path)


class Launcher(ABC):
    """Where replicas' processes run.  ``prepare`` builds the launch plan
    (raising ModelFileMissing if the model cannot run there, StartFailed if no
    place could take it), ``spawn`` starts the plan."""

    # Whether the model files are checked on this machine (they are where the
    # processes run); a remote launcher reports missing files from the node.
    checks_files_here = True
    # Whether replicas can be placed now (a remote launcher: once connected).
    ready = True

    async def connect(self) -> None:  # noqa: B027 (a hook: nothing to do by default)
        """Reach where the processes run (nothing to do here)."""

    @abstractmethod
    async def prepare(self, replica: Replica, engine: Engine) -> None:
        """Set ``replica.plan`` (and its port and URL)."""

    @abstractmethod
    async def spawn(self, replica: Replica) -> WorkerProcess:
        """Start the replica's plan."""

    async def close(self) -> None:  # noqa: B027 (a hook: nothing to do by default)
        """After every replica was stopped."""


class LocalLauncher(Launcher):
    """Each replica a child process of this one, on 127.0.0.1 (the embedded default)."""

    async def prepare(self, replica: Replica, engine: Engine) -> None:
        # In a thread: it may assemble weights (hundreds of MB).
        replica.plan = await asyncio.to_thread(engine.launch, replica.port)

    async def spawn(self, replica: Replica) -> WorkerProcess:
        assert replica.plan is not None
        replica.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **replica.plan.env}
        with open(replica.log_path, "ab") as log_file:
            proc = await asyncio.create_subprocess_exec(
                *replica.plan.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        return LocalProcess(proc, replica.log_path)


LOCAL = LocalLauncher()


class Replica:
    def __init__(
        self,
        *,
        replica_id: str,
        model_id: str,
        port: int,
        plan: LaunchPlan | None,
        slots: int,
        log_path: Path,
        client: WorkerClient,
        settings: FleetSettings,
        clock: Callable[[], float] = time.monotonic,
        launcher: Launcher = LOCAL,
    ) -> None:
        self.id = replica_id
        self.model_id = model_id
        self.port = port
        self.plan = plan
        self.slots = slots
        # The slots this gateway may fill: all of them, unless several gateways
        # share the replica (fleetshare.py; each gets a share).
        self.share = slots
        self.base_url = (plan.url if plan is not None and plan.url else
                         f"http://127.0.0.1:{port}")
        self.log_path = log_path
        self.state = ReplicaState.starting
        self.outstanding = 0
        # Of those, background work (batch lines), and how to stop each of them
        # if the replica is swapped out for interactive requests (by request id).
        self.background = 0
        self.preemptible: dict[str, Callable[[], None]] = {}
        self.served = 0
        self.clock = clock
        self.last_active = clock()
        # When something last came back from the worker (an answer, a stream
        # chunk); a replica silent past its stall timeout is restarted.
        self.last_output = clock()
        self.silent_misses = 0  # requests in a row that passed their deadline with nothing back
        self.started_at = clock()
        self.ready_at: float | None = None
        self.failure: str | None = None
        self.resources = Resources()
        # Several gateways: requests of the others on it and their last use (seen
        # by the owner), and whether this is another process's replica (mirrored).
        self.remote_outstanding = 0
        self.remote_last_active = -math.inf
        self.mirrored = False
        self.mirrored_pid: int | None = None
        self._client = client
        self._settings = settings
        self.launcher = launcher
        # The Ray node it was placed on (None: this machine, or not known here).
        self.node_id: str | None = None
        self._proc: WorkerProcess | None = None
        self._exited = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return self.mirrored_pid if self._proc is None else self._proc.pid

    @property
    def exit_reason(self) -> str | None:
        """Why its process ended, when known better than by an exit code."""
        return self._proc.reason if self._proc is not None else None

    @property
    def attached(self) -> bool:
        """Attached to a server modelfleet does not run (no process)."""
        return self.plan is not None and not self.plan.argv

    @property
    def headers(self) -> dict[str, str]:
        return self.plan.headers if self.plan is not None else {}

    @property
    def alive(self) -> bool:
        if self.attached:
            return self.state not in (ReplicaState.stopped, ReplicaState.failed)
        return self._proc is not None and self._proc.returncode is None

    @property
    def process(self) -> WorkerProcess | None:
        return self._proc

    def attach_process(self, proc: WorkerProcess) -> None:
        """Its process, known before it starts (a launcher that places it first)."""
        self._proc = proc

    @property
    def has_room(self) -> bool:
        return self.state is ReplicaState.ready and self.outstanding < self.share

    def room_for(self, keep_free: int = 0) -> bool:
        """A free slot, leaving ``keep_free`` (of a replica with more) for others."""
        keep = keep_free if self.share > keep_free else 0
        return self.state is ReplicaState.ready and self.outstanding < self.share - keep

    @property
    def background_only(self) -> bool:
        """Ready, and all that runs on it (from this gateway) is background work."""
        return (self.state is ReplicaState.ready and self.remote_outstanding == 0
                and self.outstanding == self.background)

    def preempt(self) -> int:
        """Stop the background work on it (it runs again later); how many."""
        stops = list(self.preemptible.values())
        self.preemptible.clear()
        for stop in stops:
            stop()
        return len(stops)

    @property
    def busy(self) -> bool:
        """Requests run on it, from this gateway or (as reported) another."""
        return self.outstanding > 0 or self.remote_outstanding > 0

    @property
    def last_used(self) -> float:
        """When a request on it last ended, on any gateway (this clock)."""
        return max(self.last_active, self.remote_last_active)

    async def start(self, timeout_s: float) -> None:
        """Spawn the worker and wait until it answers its health check."""
        if self.plan is None:
            raise StartFailed("no launch plan")
        if self.plan.url:
            self.base_url = self.plan.url
        if self.attached:
            await self._wait_healthy(timeout_s)
            return
        self._proc = await self.launcher.spawn(self)
        log.info("replica %s starting (pid %s, %s)", self.id, self._proc.pid, self.base_url)
        await self._wait_healthy(timeout_s)

    async def _wait_healthy(self, timeout_s: float) -> None:
        assert self.plan is not None
        deadline = self.clock() + timeout_s
        url = self.base_url + self.plan.health_path
        # Poll often: a small model is healthy in under a second, and a slow
        # backoff here would add directly to every cold start.
        delay = 0.05
        while True:
            if not self.alive:
                code = self._proc.returncode if self._proc else None
                why = self.exit_reason or f"worker exited with code {code}"
                raise StartFailed(f"{why} while starting{await self._tail()}")
            if await self._client.health(url, timeout=2.0, headers=self.headers):
                break
            if self.clock() > deadline:
                raise StartFailed(f"worker not healthy after {timeout_s:.0f}s{await self._tail()}")
            await asyncio.sleep(delay)
            delay = min(delay * 1.2, 0.1)
        self.state = ReplicaState.ready
        self.ready_at = self.last_active = self.last_output = self.clock()
        log.info("replica %s ready in %.2fs", self.id, self.ready_at - self.started_at)
        self._exited = asyncio.Event()

    async def _tail(self) -> str:
        return await self._proc.tail() if self._proc is not None else log_tail(self.log_path)

    async def wait_exit(self) -> int:
        if self.attached:
            await self._exited.wait()  # an attached replica "exits" when stopped
            return 0
        if self._proc is None:
            return 0
        return await self._proc.wait()

    async def healthy(self) -> bool:
        path = self.plan.health_path if self.plan else "/health"
        return await self._client.health(
            self.base_url + path, timeout=self._settings.health_timeout_s, headers=self.headers
        )

    async def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM to the worker's process group, SIGKILL after the grace period."""
        if self.state not in (ReplicaState.failed, ReplicaState.stopped):
            self.state = ReplicaState.draining
        self._exited.set()
        if self._proc is not None:
            await self._proc.stop(grace_s)
        if self.state is not ReplicaState.failed:
            self.state = ReplicaState.stopped

    def kill(self) -> None:
        """End the worker now (a hung replica)."""
        self._exited.set()
        if self._proc is not None:
            self._proc.kill()
