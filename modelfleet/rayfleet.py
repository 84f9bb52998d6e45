"""Replicas as Ray actors: the fleet on a Ray cluster (``MODELFLEET_RAY_ADDRESS``).

Each replica is one actor (``ReplicaHost``), created with the model's
resources (the engine's GPUs, CPUs and memory, and the catalog's custom
resources) and pinned to the node the fleet chose for it (``RayRoom``).  On
its node the actor builds the launch plan with the same engine code as a
local replica, binds the worker to the node's address on a port it picks,
sets ``CUDA_VISIBLE_DEVICES`` to the GPUs Ray gave it, starts the process and
reports its URL.  The gateways then talk to that URL directly; Ray places and
supervises, it does not proxy.

Lives are tied both ways:

- the worker gets SIGKILL when its actor's process dies (``PR_SET_PDEATHSIG``,
  as a local replica with the API process), and Ray ends the actor when the
  gateway that created it goes (it is not detached) or its node dies;
- the actor exits when its worker exits, so its resources return to Ray.

The gateway waits on the actor's ``wait`` call: it returns the worker's exit
code, or fails when the actor or its node died; either way the pool replaces
the replica (``ModelPool.replica_died``), on another node if this one is gone.

Only imported with a Ray address: a gateway without Ray never imports ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from modelfleet.catalog import ModelSpec
from modelfleet.engines.base import Engine, LaunchPlan, ModelFileMissing, Resources, engine_for
from modelfleet.fleet import ModelPool, Room
from modelfleet.settings import Settings
from modelfleet.supervisor import (
    PR_SET_PDEATHSIG,
    Launcher,
    Replica,
    StartFailed,
    WorkerProcess,
    free_port,
    log_tail,
)

if TYPE_CHECKING:
    from ray.actor import ActorHandle

log = logging.getLogger(__name__)

# The Ray namespace of modelfleet's actors (a replica's actor is named by its id).
NAMESPACE = "modelfleet"
MIB = 1 << 20
LOOPBACK = ("127.0.0.1", "localhost")


def connect_ray(address: str) -> None:
    """Join the cluster as a driver, once per process (a no-op when connected)."""
    if ray.is_initialized():
        return
    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False,
             logging_level=logging.WARNING)


# -- what a replica needs, and the nodes ---------------------------------------------


def needs_process(engine: Engine) -> bool:
    """An external server runs nowhere of ours: no actor, no placement."""
    return engine.spec.engine.type != "external"


def need_of(engine: Engine) -> dict[str, float]:
    """The Ray resources one replica of this model reserves."""
    res = engine.resources()
    placement = engine.spec.placement
    cpus = placement.num_cpus if placement.num_cpus is not None else float(res.threads)
    need = {"CPU": float(cpus), "GPU": float(res.gpus), "memory": float(res.memory_mib * MIB),
            **placement.resources}
    return {k: v for k, v in need.items() if v > 0}


def describe_need(need: dict[str, float]) -> str:
    parts = []
    for key, value in sorted(need.items()):
        if key == "memory":
            parts.append(f"{value / MIB:.0f} MiB")
        else:
            parts.append(f"{value:g} {key}")
    return ", ".join(parts) or "nothing"


def _fits(need: dict[str, float], have: dict[str, float]) -> bool:
    return all(have.get(key, 0.0) + 1e-9 >= value for key, value in need.items())


def _minus(have: dict[str, float], used: dict[str, float]) -> dict[str, float]:
    return {key: have.get(key, 0.0) - used.get(key, 0.0) for key in set(have) | set(used)}


def _plus(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {key: a.get(key, 0.0) + b.get(key, 0.0) for key in set(a) | set(b)}


@dataclass(frozen=True)
class Node:
    """A live node of the cluster, as Ray reports it."""

    id: str
    ip: str
    total: dict[str, float]
    labels: dict[str, str]


def cluster_nodes() -> list[Node]:
    """The live nodes and their total resources (one quick call to Ray's GCS)."""
    return [Node(id=n["NodeID"], ip=n.get("NodeManagerAddress", ""),
                 total=dict(n.get("Resources") or {}), labels=dict(n.get("Labels") or {}))
            for n in ray.nodes() if n.get("Alive")]


def _why(exc: BaseException) -> str:
    """One line from a Ray error (it says why an actor died: its node died...)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for word in ("because", "died"):
        for line in lines:
            if word in line.lower():
                return line[:300]
    return (lines[0] if lines else type(exc).__name__)[:300]


# -- on the node: the actor ----------------------------------------------------------


def bind_host(argv: list[str], host: str) -> list[str]:
    """The engine's command with ``--host 127.0.0.1`` turned into the node's address
    (a command that names another host keeps it)."""
    out = list(argv)
    for i, part in enumerate(out):
        if part == "--host" and i + 1 < len(out) and out[i + 1] in LOOPBACK:
            out[i + 1] = host
        elif part.startswith("--host=") and part.split("=", 1)[1] in LOOPBACK:
            out[i] = f"--host={host}"
    return out


class ReplicaHost:
    """The Ray actor of one replica: owns its worker process on this node.

    Created with ``max_concurrency`` > 1 (a threaded actor), so that ``wait``
    blocks while ``stop``, ``tail`` and ``info`` answer.
    """

    def __init__(self, spec: ModelSpec, models_dir: str, llama_server: str | None,
                 log_path: str, replica_id: str) -> None:
        self.spec = spec
        self.models_dir = Path(models_dir)
        self.llama_server = Path(llama_server) if llama_server else None
        self.log_path = Path(log_path)
        self.replica_id = replica_id
        self.argv: list[str] = []
        self.env: dict[str, str] = {}
        self.url = ""
        self.gpu_ids: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._spawn_error: str | None = None
        self._started = threading.Event()
        self._exited = threading.Event()
        self._stopping = False
        self._code: int | None = None

    def prepare(self) -> dict[str, Any]:
        """Build the launch plan here: the model's files, a free port on this
        node's address, the GPUs Ray assigned.  Raises ModelFileMissing."""
        engine = engine_for(self.spec, self.models_dir, self.llama_server)
        engine.check()
        host = ray.util.get_node_ip_address()
        port = free_port(host)
        plan = engine.launch(port)
        self.argv = bind_host(plan.argv, host)
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        # The GPUs Ray gave this actor, and only those (none: no GPU at all).
        self.env = {**os.environ, **plan.env, "CUDA_VISIBLE_DEVICES": ",".join(self.gpu_ids)}
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        return {"url": self.url, "port": port, "node_id": ray.get_runtime_context().get_node_id(),
                "node_ip": host, "gpu_ids": self.gpu_ids, "health_path": plan.health_path,
                "argv": self.argv, "env": dict(plan.env)}

    def start(self) -> dict[str, Any]:
        """Start the worker (in a thread that lives as long as it: the worker's
        parent-death signal follows that thread)."""
        threading.Thread(target=self._run, name=f"replica-{self.replica_id}", daemon=True).start()
        if not self._started.wait(60):
            raise RuntimeError("the worker process did not start within 60s")
        if self._spawn_error is not None:
            raise RuntimeError(f"could not start the worker: {self._spawn_error}")
        assert self._proc is not None
        return {"pid": self._proc.pid, "log_path": str(self.log_path)}

    def _open_log(self) -> Any:
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            return open(self.log_path, "ab")
        except OSError:  # the gateway's data folder is not on this node: a temporary one
            self.log_path = Path(tempfile.gettempdir()) / "modelfleet-logs" / self.log_path.name
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            return open(self.log_path, "ab")

    def _run(self) -> None:
        # Looked up before the fork: the child only makes the one call.
        prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None

        def die_with_actor() -> None:
            if prctl is not None:
                prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

        try:
            with self._open_log() as log_file:
                self._proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=log_file,
                    stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
                    preexec_fn=die_with_actor)
        except OSError as exc:
            self._spawn_error = str(exc)
            self._started.set()
            return
        self._started.set()
        self._code = self._proc.wait()
        self._exited.set()
        if not self._stopping:
            # The worker died on its own: so does this actor (its resources go
            # back to Ray), once ``wait`` has had time to answer.
            time.sleep(1.0)
            os._exit(1)

    def wait(self) -> int:
        """Until the worker exits: its exit code."""
        self._exited.wait()
        return self._code if self._code is not None else -1

    def stop(self, grace_s: float) -> int | None:
        """SIGTERM to the worker's process group, SIGKILL after the grace period."""
        self._stopping = True
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        self._signal(signal.SIGTERM)
        if not self._exited.wait(grace_s):
            self._signal(signal.SIGKILL)
            self._exited.wait(10)
        return proc.returncode

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, sig)

    def tail(self) -> str:
        return log_tail(self.log_path)

    def info(self) -> dict[str, Any]:
        """Where it runs: for operators and tests."""
        return {"replica": self.replica_id, "url": self.url,
                "pid": self._proc.pid if self._proc is not None else None,
                "actor_pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "gpu_ids": self.gpu_ids, "cuda_visible_devices": self.env.get("CUDA_VISIBLE_DEVICES"),
                "log_path": str(self.log_path)}


# -- on the gateway: the process handle and the launcher -------------------------------


class RayProcess(WorkerProcess):
    """A worker process on a Ray node, through its actor."""

    def __init__(self, actor: ActorHandle) -> None:
        self.actor = actor
        self._pid: int | None = None
        self._code: int | None = None
        self._waiter: asyncio.Future[int] | None = None
        self.reason: str | None = None

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._code

    async def start(self) -> None:
        try:
            info = await self.actor.start.remote()
        except RayError as exc:
            self._ended(-1, f"its Ray actor failed: {_why(exc)}")
            raise StartFailed(self.reason) from None
        self._pid = int(info["pid"])
        self._waiter = asyncio.ensure_future(self._watch())

    async def _watch(self) -> int:
        try:
            code = int(await self.actor.wait.remote())
            self._ended(code, None)
        except RayActorError as exc:
            self._ended(-1, f"its Ray actor died: {_why(exc)}")
        except RayError as exc:
            self._ended(-1, f"its Ray actor failed: {_why(exc)}")
        return self._code if self._code is not None else -1

    def _ended(self, code: int, reason: str | None) -> None:
        if self._code is None:
            self._code = code
            self.reason = reason

    async def wait(self) -> int:
        if self._waiter is None:
            return self._code if self._code is not None else 0
        return await asyncio.shield(self._waiter)

    async def stop(self, grace_s: float) -> None:
        if self._code is None and self._pid is not None:
            with contextlib.suppress(RayError, TimeoutError):
                await asyncio.wait_for(_awaitable(self.actor.stop.remote(grace_s)), grace_s + 5)
        self.kill()
        if self._waiter is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._waiter), 5)
        self._ended(-1, "stopped")

    def kill(self) -> None:
        """End the actor; its worker dies with it (parent-death signal)."""
        with contextlib.suppress(RayError, ValueError):
            ray.kill(self.actor, no_restart=True)

    async def tail(self) -> str:
        try:
            return str(await asyncio.wait_for(_awaitable(self.actor.tail.remote()), 5))
        except (RayError, TimeoutError):
            return ""


async def _awaitable(ref: Any) -> Any:
    return await ref


class RayLauncher(Launcher):
    """Each replica a Ray actor on the node ``RayRoom`` chose."""

    checks_files_here = False

    def __init__(self, settings: Settings) -> None:
        assert settings.ray_address
        self.address = settings.ray_address
        self.settings = settings
        self.ready = False
        self.error: str | None = None
        self._actor_class: Any = None

    async def connect(self) -> None:
        """Join the cluster; retried (with the reason shown as the models'
        ``waiting_for_room``) until it answers."""
        delay = 1.0
        while True:
            try:
                await asyncio.to_thread(connect_ray, self.address)
                break
            except Exception as exc:  # ConnectionError, a timeout, a version mismatch...
                self.error = f"cannot reach the Ray cluster at {self.address}: {exc}"
                log.warning("%s; retrying in %.0fs", self.error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 15.0)
        self._actor_class = ray.remote(ReplicaHost)
        self.ready, self.error = True, None
        log.info("connected to the Ray cluster at %s (%d nodes)", self.address,
                 len(cluster_nodes()))

    async def prepare(self, replica: Replica, engine: Engine) -> None:
        if not needs_process(engine):  # attached to a server: nothing to place
            replica.plan = await asyncio.to_thread(engine.launch, replica.port)
            return
        need = need_of(engine)
        options: dict[str, Any] = {
            "name": replica.id, "namespace": NAMESPACE, "max_restarts": 0,
            "max_concurrency": 4,
            "num_cpus": need.get("CPU", 0.0), "num_gpus": need.get("GPU", 0.0),
            "resources": {k: v for k, v in need.items() if k not in ("CPU", "GPU", "memory")},
        }
        if "memory" in need:
            options["memory"] = int(need["memory"])
        if replica.node_id is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                node_id=replica.node_id, soft=False)
        fs = self.settings.fleet
        try:
            actor = self._actor_class.options(**options).remote(
                engine.spec, str(self.settings.models_dir),
                str(fs.llama_server) if fs.llama_server else None, str(replica.log_path),
                replica.id)
        except (ValueError, TypeError) as exc:  # Ray refuses the options (a resource of 1.5)
            raise StartFailed(f"Ray refused the replica's actor: {exc}") from None
        replica.attach_process(RayProcess(actor))
        timeout = engine.spec.engine.startup_timeout_s
        try:
            info = await asyncio.wait_for(_awaitable(actor.prepare.remote()), timeout)
        except TimeoutError:
            raise StartFailed(f"no Ray node took the replica within {timeout:.0f}s "
                              f"(it needs {describe_need(need)})") from None
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, ModelFileMissing):
                raise ModelFileMissing(f"on Ray node {replica.node_id}: {cause}") from None
            raise StartFailed(f"its Ray actor could not prepare the worker: "
                              f"{cause or _why(exc)}") from None
        except RayError as exc:
            raise StartFailed(f"its Ray actor failed: {_why(exc)}") from None
        replica.port = int(info["port"])
        replica.base_url = str(info["url"])
        replica.node_id = str(info["node_id"])
        replica.plan = LaunchPlan(argv=list(info["argv"]), env=dict(info["env"]),
                                  health_path=str(info["health_path"]), url=replica.base_url)
        log.info("replica %s placed on Ray node %s (%s, GPUs %s)", replica.id,
                 replica.node_id[:12], replica.base_url, ",".join(info["gpu_ids"]) or "none")

    async def spawn(self, replica: Replica) -> WorkerProcess:
        proc = replica.process
        assert isinstance(proc, RayProcess), "prepare() attaches the actor first"
        await proc.start()
        return proc

    async def close(self) -> None:
        """The actors were stopped; leave the cluster (a shared controller may
        still use the connection: it closes it, not this)."""


# -- placement: the cluster's nodes as the budget --------------------------------------


class RayRoom(Room):
    """Placement on the cluster's nodes, node by node.

    A node can take a replica if its total resources (Ray's view) minus what
    this fleet's replicas on it reserve leaves room for the model's need
    (CPUs, GPUs, memory, custom resources) and it carries the model's labels.
    The fleet picks the node (GPU models pack onto the fullest GPU node that
    fits, CPU models prefer nodes without GPUs, then the most free CPUs) and
    pins the actor there.  If no node has room, idle replicas of other models
    on one node are swapped out, least recently used first (the node that
    needs the fewest), exactly as ``Room`` does on one machine.
    """

    def __init__(self, launcher: RayLauncher, pools: dict[str, ModelPool]) -> None:
        super().__init__(Resources(), pools)  # no one machine's budget: per node
        self.launcher = launcher
        self._granted: dict[str, str] = {}

    def place(self, replica: Replica) -> None:
        replica.node_id = self._granted.pop(replica.model_id, None)

    def used_on(self, node_id: str) -> dict[str, float]:
        total: dict[str, float] = {}
        for pool in self.pools.values():
            for replica in pool.replicas:
                if replica.node_id == node_id and not replica.mirrored:
                    total = _plus(total, need_of(pool.engine))
        return total

    def reserve(self, pool: ModelPool) -> bool:
        if not self.launcher.ready:
            pool.blocked = self.launcher.error or f"connecting to the Ray cluster at " \
                                                  f"{self.launcher.address}"
            return False
        if not needs_process(pool.engine):
            return True
        need = need_of(pool.engine)
        labels = pool.spec.placement.node_labels
        try:
            nodes = cluster_nodes()
        except Exception as exc:
            pool.blocked = f"cannot read the Ray cluster's nodes: {exc}"
            return False
        eligible = [n for n in nodes if _fits(need, n.total)
                    and all(n.labels.get(k) == v for k, v in labels.items())]
        if not eligible:
            wanted = f" and labels {labels}" if labels else ""
            pool.blocked = (f"no live node of the Ray cluster can hold one replica "
                            f"(it needs {describe_need(need)}{wanted})")
            return False
        free = {n.id: _minus(n.total, self.used_on(n.id)) for n in eligible}
        fitting = [n for n in eligible if _fits(need, free[n.id])]
        if fitting:
            self._granted[pool.spec.id] = self._best(fitting, need, free).id
            return True
        best: tuple[Node, list[Replica]] | None = None
        for node in eligible:
            chosen = self._victims(pool, node, need, free[node.id])
            if chosen is None:
                continue
            if best is None or self._cost(chosen) < self._cost(best[1]):
                best = (node, chosen)
        if best is None:
            pool.blocked = (f"waiting for room on the Ray cluster: needs {describe_need(need)}; "
                            + "; ".join(f"node {n.ip} ({n.id[:8]}) has "
                                        f"{describe_need(_nonneg(free[n.id], need))} free"
                                        for n in eligible))
            return False
        node, chosen = best
        for victim in chosen:
            self.pools[victim.model_id].evict(
                victim, f"swapped out for {pool.spec.id} on node {node.id[:8]}")
        self._granted[pool.spec.id] = node.id
        return True

    @staticmethod
    def _best(nodes: list[Node], need: dict[str, float],
              free: dict[str, dict[str, float]]) -> Node:
        def key(node: Node) -> tuple[float, float, str]:
            after = _minus(free[node.id], need)
            # GPU work packs onto the fullest GPU node; other work keeps off GPU nodes.
            first = (after.get("GPU", 0.0) if need.get("GPU", 0) > 0
                     else node.total.get("GPU", 0.0))
            return first, -after.get("CPU", 0.0), node.id
        return min(nodes, key=key)

    def _victims(self, pool: ModelPool, node: Node, need: dict[str, float],
                 free: dict[str, float]) -> list[Replica] | None:
        victims = self.victims(pool, node.id)
        chosen: list[Replica] = []
        for victim in victims:
            if _fits(need, free):
                break
            owner = self.pools[victim.model_id]
            if sum(1 for c in chosen if c.model_id == victim.model_id) >= (
                    owner.live_replicas - owner.spec.scaling.min_replicas):
                continue
            frees = need_of(owner.engine)
            short = {k for k, v in need.items() if free.get(k, 0.0) + 1e-9 < v}
            if not any(frees.get(k, 0.0) > 0 for k in short):
                continue  # stopping it would not give what is missing
            chosen.append(victim)
            free = _plus(free, frees)
        return chosen if _fits(need, free) else None

    @staticmethod
    def _cost(chosen: list[Replica]) -> tuple[int, float]:
        return len(chosen), max((r.last_used for r in chosen), default=-math.inf)


def _nonneg(free: dict[str, float], need: dict[str, float]) -> dict[str, float]:
    return {k: max(0.0, free.get(k, 0.0)) for k in need}
