"""Several gateway processes on one data folder: exactly one owns the fleet.

First in process and deterministic (two fleets on one folder, steps driven by
hand, replica records without processes), then with real ``modelfleet serve``
processes and the real SmolLM2 model: three gateways, one llama-server; a
sleeping model woken once through two followers; a follower's use keeps a
replica awake; kill -9 of the owner and a follower takes over; and
``serve --workers 2``."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelfleet import fleetshare
from modelfleet.catalog import Catalog, ModelKind, ModelSpec
from modelfleet.engines.base import LaunchPlan
from modelfleet.engines.http import WorkerClient
from modelfleet.fleet import Fleet, ModelPool
from modelfleet.fleetshare import OwnerLock, share_of
from modelfleet.settings import Settings
from modelfleet.supervisor import Replica, ReplicaState
from tests.conftest import SMOL_FILE, Server, launch_server, stop_server

# -- in process: the protocol, step by step -------------------------------------------

MODEL = "test/shared"


def _spec() -> ModelSpec:
    return ModelSpec.model_validate({
        "id": MODEL, "kind": ModelKind.chat,
        "engine": {"type": "llama.cpp", "model_file": "/x.gguf", "threads": 1,
                   "memory_mib": 100},
        "scaling": {"concurrency": 4, "max_replicas": 2, "idle_timeout_s": 1.0},
    })


class Gateway:
    """A fleet with stand-ins for its queue (``waiting``) and, when it owns the
    fleet, launches that add a ready replica record at once (no process)."""

    def __init__(self, data_dir: Path) -> None:
        self.fleet = Fleet(Catalog([_spec()]), Settings(data_dir=data_dir), WorkerClient())
        self.pool: ModelPool = self.fleet.pools[MODEL]
        self.queued = 0
        self.launched: list[Replica] = []
        self.capacity = 0
        self.pool.waiting = lambda: self.queued  # type: ignore[method-assign]
        self.pool.interactive_waiting = self.pool.waiting  # the queued requests are interactive
        self.pool.demand = lambda: (self.queued  # type: ignore[method-assign]
                                    + sum(r.outstanding for r in self.pool.replicas))
        self.pool.availability = lambda: (True, None)  # type: ignore[method-assign]
        self.pool._launch = self._launch  # type: ignore[method-assign]
        self.pool.on_capacity = self._capacity

    def _capacity(self) -> None:
        self.capacity += 1

    def _launch(self) -> None:
        pool = self.pool
        replica = Replica(replica_id=f"r{len(self.launched)}", model_id=MODEL, port=1,
                          plan=LaunchPlan(argv=["true"]), slots=pool.spec.scaling.concurrency,
                          log_path=Path("/dev/null"), client=WorkerClient(),
                          settings=pool.fleet_settings)
        replica.state = ReplicaState.ready
        replica.share = share_of(replica.slots, pool.gateways)
        pool.replicas.append(replica)
        self.launched.append(replica)

    def claim(self) -> bool:
        """What Fleet.start decides, without the background loop."""
        owned = self.fleet.share.try_own()
        self.pool.follower = not owned
        return owned

    def step(self) -> None:
        share = self.fleet.share
        if share.owned:
            share.owner_step()
        else:
            share.follower_step()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Gateway, Gateway]]:
    owner, follower = Gateway(tmp_path), Gateway(tmp_path)
    assert owner.claim() and not follower.claim()
    try:
        yield owner, follower
    finally:
        follower.fleet.share.close()
        owner.fleet.share.close()


def test_owner_lock_is_exclusive_and_freed_on_release(tmp_path: Path) -> None:
    first, second = OwnerLock(tmp_path / "owner.lock"), OwnerLock(tmp_path / "owner.lock")
    assert first.try_acquire()
    assert not second.try_acquire()
    first.release()
    assert second.try_acquire()
    second.release()


def test_follower_demand_wakes_one_replica_and_follower_routes_to_it(
        pair: tuple[Gateway, Gateway]) -> None:
    owner, follower = pair
    follower.queued = 2  # two requests wait on the follower for a sleeping model
    follower.pool.scale_for_demand()  # what its queue does: asks the owner, starts nothing
    assert follower.launched == []
    follower.step()  # reports its demand
    owner.step()  # reads it: one replica, not one per gateway or request
    owner.step()
    assert [r.id for r in owner.pool.replicas] == ["r0"]
    assert owner.pool.desired == 1
    assert owner.fleet.share.gateways == 2
    assert owner.pool.replicas[0].share == 2  # 4 slots between 2 gateways
    follower.step()  # mirrors the announcement
    mirrored = follower.pool.replicas
    assert [(r.id, r.state, r.mirrored, r.share) for r in mirrored] == [
        ("r0", ReplicaState.ready, True, 2)]
    assert follower.capacity == 1  # its queue was told: the waiters are dispatched
    assert follower.pool.describe()["state"] == "ready"
    assert follower.fleet.events() and follower.fleet.events()[-1].to_replicas == 1


def test_follower_use_keeps_the_owners_replica_from_the_reaper(
        pair: tuple[Gateway, Gateway]) -> None:
    owner, follower = pair
    follower.queued = 1
    follower.step()
    owner.step()
    owner.step()
    follower.step()
    follower.queued = 0
    follower.pool.replicas[0].outstanding = 1  # a request of the follower runs on it
    follower.step()
    owner.step()
    replica = owner.pool.replicas[0]
    assert replica.remote_outstanding == 1 and owner.pool.total_demand() == 1
    replica.last_active -= 60  # long idle as far as the owner's own requests go
    asyncio.run(owner.pool.reap_idle())
    assert owner.pool.replicas == [replica]
    follower.pool.replicas[0].outstanding = 0  # done just now: last use is now
    follower.pool.replicas[0].last_active = time.monotonic()
    follower.pool.replicas[0].served = 1
    follower.step()
    owner.step()
    asyncio.run(owner.pool.reap_idle())
    assert owner.pool.replicas == [replica]  # idle for less than idle_timeout_s


def test_follower_stops_routing_to_a_dead_or_silent_owners_replicas(
        pair: tuple[Gateway, Gateway], monkeypatch: pytest.MonkeyPatch) -> None:
    owner, follower = pair
    follower.queued = 1
    for gateway in (follower, owner, owner, follower):
        gateway.step()
    assert [r.id for r in follower.pool.replicas] == ["r0"]
    monkeypatch.setattr(fleetshare, "pid_alive", lambda pid: False)  # the owner died
    follower.step()
    assert follower.pool.replicas == [] and follower.pool.free_replica() is None
    assert follower.fleet.share.describe()["owner_pid"] is None
    monkeypatch.setattr(fleetshare, "pid_alive", lambda pid: True)
    follower.step()
    assert [r.id for r in follower.pool.replicas] == ["r0"]  # alive after all
    beat = time.time() - fleetshare.STALE_S - 1  # alive, but silent: hung
    os.utime(follower.fleet.share.files.lock.path, (beat, beat))
    follower.step()
    assert follower.pool.replicas == []


def test_follower_takes_over_when_the_owner_is_gone(pair: tuple[Gateway, Gateway]) -> None:
    owner, follower = pair
    follower.queued = 1
    for gateway in (follower, owner, owner, follower):
        gateway.step()
    assert len(follower.pool.replicas) == 1
    owner.fleet.share.leave()  # what Fleet.close does first
    follower.step()
    assert follower.pool.replicas == [] and follower.pool.describe()["state"] == "sleeping"
    owner.fleet.share.close()  # lets the lock go
    assert follower.fleet.share.try_own()
    follower.pool.take_over()  # what Fleet._take_over does
    follower.pool.scale_for_demand()  # its own waiting request: it starts one itself
    assert [r.id for r in follower.launched] == ["r0"] and not follower.pool.follower


# -- real gateways and real workers ----------------------------------------------------

CATALOG = "".join(f"""
[[models]]
id = "own/{name}"
kind = "chat"
[models.engine]
type = "llama.cpp"
model_file = "{SMOL_FILE}"
threads = 1
[models.limits]
max_output_tokens = 256
context_length = 1024
[models.scaling]
concurrency = 2
idle_timeout_s = {idle}
""" for name, idle in (("a", 600.0), ("b", 600.0), ("idle", 2.0)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited: {log_path.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("gateway did not start")
        time.sleep(0.1)


def launch_peer(first: Server, tmp: Path, name: str, *args: str) -> Server:
    """Another ``modelfleet serve`` on the first one's data folder and catalog."""
    port = _free_port()
    log_path = tmp / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelfleet", "serve", "--port", str(port), *args,
             "--data-dir", str(first.data_dir), "--catalog", str(tmp / "catalog.toml")],
            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log_path)
    except RuntimeError:
        stop_gateway(proc)
        raise
    return Server(url, first.data_dir, log_path, first.key, first.admin_key, proc)


def stop_gateway(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        stop_server(proc)


def llama_servers(parents: set[int]) -> dict[int, int]:
    """llama-server processes whose parent is one of ``parents``: pid -> parent."""
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if comm.startswith("llama-server") and ppid in parents:
            found[int(entry)] = ppid
    return found


def children(pid: int) -> set[int]:
    out: set[int] = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                out.add(int(entry))
    return out


def chat(server: Server, model: str) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", timeout=60,
                      json={"model": model, "max_tokens": 2,
                            "messages": [{"role": "user", "content": "Hi"}]},
                      headers={"Authorization": f"Bearer {server.key}"})


def admin(server: Server, path: str = "/v1/admin/replicas") -> dict[str, Any]:
    reply = httpx.get(server.url + path, timeout=10,
                      headers={"Authorization": f"Bearer {server.admin_key}"})
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


def replica_ids(server: Server, model: str) -> list[str]:
    return sorted(r["id"] for r in admin(server)["replicas"] if r["model"] == model)


def runtime(server: Server, model: str) -> dict[str, Any]:
    rows = httpx.get(server.url + "/v1/inference/runtime/models", timeout=10).json()["text"]
    return next(r for r in rows if r["model"] == model)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def in_parallel(calls: list[Callable[[], httpx.Response]]) -> list[httpx.Response]:
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    tmp = tmp_path_factory.mktemp("owner")
    first = launch_server(tmp, CATALOG)
    started = [first]
    try:
        started.append(launch_peer(first, tmp, "second"))
        started.append(launch_peer(first, tmp, "third"))
        yield started
    finally:
        for server in started:
            stop_gateway(server.proc)


def fleet_view(server: Server) -> dict[str, Any]:
    view: dict[str, Any] = admin(server)["fleet"]
    return view


@pytest.mark.workers
def test_three_gateways_one_owner_one_llama_server(gateways: list[Server]) -> None:
    owner, *followers = gateways
    pids = {g.proc.pid for g in gateways}
    assert fleet_view(owner)["owner"] is True  # the first one took the lock
    wait_for(lambda: all(fleet_view(g)["owner_pid"] == owner.proc.pid for g in followers)
             and fleet_view(owner)["gateways"] == 3, 5, "followers to see the owner")
    assert not any(fleet_view(g)["owner"] for g in followers)
    replies = in_parallel([lambda g=g: chat(g, "own/a") for g in gateways for _ in range(2)])
    assert [r.status_code for r in replies] == [200] * 6, [r.text for r in replies]
    assert len({r.headers["X-Deployment-Id"] for r in replies}) == 1
    running = llama_servers(pids)
    assert list(running.values()) == [owner.proc.pid]  # one worker, the owner's child
    ids = [replica_ids(g, "own/a") for g in gateways]
    assert ids[0] == ids[1] == ids[2] and len(ids[0]) == 1
    for follower in followers:
        row = runtime(follower, "own/a")
        assert (row["state"], row["ready_replicas"], row["desired_replicas"]) == ("ready", 1, 1)
        events = admin(follower, "/v1/admin/scale-events?model=own/a")["data"]
        assert events == admin(owner, "/v1/admin/scale-events?model=own/a")["data"]
        assert [(e["from_replicas"], e["to_replicas"]) for e in events] == [(0, 1)]


@pytest.mark.workers
def test_sleeping_model_woken_through_two_followers_starts_once(gateways: list[Server]) -> None:
    owner, second, third = gateways
    assert all(runtime(g, "own/b")["state"] == "sleeping" for g in gateways)
    replies = in_parallel([lambda: chat(second, "own/b"), lambda: chat(third, "own/b"),
                           lambda: chat(second, "own/b")])
    assert [r.status_code for r in replies] == [200] * 3, [r.text for r in replies]
    assert len({r.headers["X-Deployment-Id"] for r in replies}) == 1
    assert len(replica_ids(owner, "own/b")) == 1
    events = admin(owner, "/v1/admin/scale-events?model=own/b")["data"]
    assert [(e["from_replicas"], e["to_replicas"], e["reason"]) for e in events] == [
        (0, 1, "request waiting for a sleeping model")]
    assert len(llama_servers({g.proc.pid for g in gateways})) == 2  # own/a and own/b


@pytest.mark.workers
def test_use_through_a_follower_keeps_the_replica_awake(gateways: list[Server]) -> None:
    owner, second, _third = gateways
    first = chat(second, "own/idle")  # idle_timeout_s = 2
    assert first.status_code == 200, first.text
    deployment = first.headers["X-Deployment-Id"]
    until = time.monotonic() + 4.5
    while time.monotonic() < until:  # busy only through the follower, past the idle timeout
        reply = chat(second, "own/idle")
        assert reply.status_code == 200, reply.text
        assert reply.headers["X-Deployment-Id"] == deployment  # never reaped meanwhile
        time.sleep(0.5)
    # then idle: the owner stops it, and the follower shows the model asleep
    wait_for(lambda: runtime(second, "own/idle")["state"] == "sleeping", 10, "scale to zero")
    assert replica_ids(owner, "own/idle") == []


@pytest.mark.workers
def test_follower_takes_over_after_kill_9_of_the_owner(gateways: list[Server]) -> None:
    owner, *followers = gateways
    before = chat(followers[0], "own/a")
    assert before.status_code == 200, before.text
    old_workers = llama_servers({owner.proc.pid})
    assert old_workers
    os.kill(owner.proc.pid, signal.SIGKILL)
    owner.proc.wait(timeout=10)
    killed_at = time.monotonic()
    wait_for(lambda: any(fleet_view(g)["owner"] for g in followers), 5, "a new owner")
    took_over = time.monotonic() - killed_at
    new_owner = next(g for g in followers if fleet_view(g)["owner"])
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in old_workers), 5,
             "the dead owner's workers to die with it")
    after = [chat(g, "own/a") for g in followers]
    assert [r.status_code for r in after] == [200, 200], [r.text for r in after]
    assert len({r.headers["X-Deployment-Id"] for r in after}) == 1
    assert after[0].headers["X-Deployment-Id"] != before.headers["X-Deployment-Id"]
    running = llama_servers({g.proc.pid for g in followers})
    assert list(running.values()) == [new_owner.proc.pid]
    other = next(g for g in followers if g is not new_owner)
    assert fleet_view(other)["owner_pid"] == new_owner.proc.pid
    assert took_over < 3.0


@pytest.mark.workers
def test_serve_workers_2_runs_one_llama_server(tmp_path: Path) -> None:
    (tmp_path / "catalog.toml").write_text(CATALOG)
    port = _free_port()
    out_path, log_path = tmp_path / "serve.out", tmp_path / "serve.log"
    with open(out_path, "wb") as out, open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelfleet", "serve", "--port", str(port), "--workers", "2",
             "--data-dir", str(tmp_path / "data"), "--catalog", str(tmp_path / "catalog.toml")],
            stdout=out, stderr=log, start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, log_path)
        wait_for(lambda: len(children(proc.pid)) >= 2, 30, "two worker processes")
        key = out_path.read_text().strip().splitlines()[0]  # the bootstrap key, printed once
        server = Server(url, tmp_path / "data", log_path, key, "", proc)
        replies = in_parallel([lambda: chat(server, "own/a") for _ in range(6)])
        assert [r.status_code for r in replies] == [200] * 6, [r.text for r in replies]
        assert len({r.headers["X-Deployment-Id"] for r in replies}) == 1
        assert len(llama_servers(children(proc.pid))) == 1
        assert log_path.read_text().count("created project 'default'") == 1
    finally:
        stop_gateway(proc)
