"""One fleet controller for every gateway on every machine: the fleet's board
held by a named, detached Ray actor (``modelfleet/rayboard.py``).

First without Ray and deterministic: the lease (expiry, renewal, takeover,
release, a restarted board) on a fake clock, and the owner/follower protocol
of ``fleetshare.py`` over ``RemoteBoard`` with the actor's state in process
(a deposed owner steps down; an unreachable board leaves routing as it was).
Then a real local Ray cluster (``ray start --head --block`` in a temporary
folder, stopped by the pids of what it started) and three real ``modelfleet
serve`` gateways, each with its own data folder and SQLite store (three
machines as far as they know), pointed at it, with the real SmolLM2 model
(replicas are Ray actors: rayfleet.py): one owner; a sleeping model woken
through the followers starts one replica; the followers' use keeps a replica
up past its idle timeout and it scales to zero when idle; the board actor
killed (Ray restarts it, empty): requests go on, the owner keeps the fleet;
the owner killed with SIGKILL: another takes over within LEASE_S + 4 s and
requests succeed; scale events read the same from every gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelfleet.catalog import Catalog, ModelKind, ModelSpec
from modelfleet.engines.base import LaunchPlan
from modelfleet.engines.http import WorkerClient
from modelfleet.fleet import Fleet, ModelPool
from modelfleet.fleetshare import FleetShare, share_of
from modelfleet.rayboard import LEASE_S, LeaseBoard, RemoteBoard
from modelfleet.settings import Settings
from modelfleet.supervisor import Replica, ReplicaState
from tests.conftest import SMOL_FILE, Server, launch_server, stop_server
from tests.services import free_port

# -- the lease, on a fake clock -----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ask(board: LeaseBoard, gateway: str, **fields: Any) -> dict[str, Any]:
    return board.sync({"gateway": gateway, "want": True, "lease_s": LEASE_S, **fields})


def test_lease_is_exclusive_renewed_and_expires() -> None:
    clock = Clock()
    board = LeaseBoard(clock)
    first = ask(board, "a", meta={"host": "one"})
    assert first["owned"] and first["holder"] == "a" and first["term"] == 1
    assert first["holder_meta"] == {"host": "one"}
    assert not ask(board, "b")["owned"]  # held: b follows
    clock.now += LEASE_S - 0.5
    assert ask(board, "a")["owned"]  # renewed for another LEASE_S
    clock.now += LEASE_S - 0.5
    reply = ask(board, "b")
    assert not reply["owned"] and reply["holder"] == "a" and reply["live"]
    clock.now += 0.6  # a stopped renewing LEASE_S ago
    reply = board.sync({"gateway": "c", "want": False})
    assert not reply["live"] and reply["holder"] is None  # nobody owns it now
    reply = ask(board, "b")
    assert reply["owned"] and reply["term"] == 2
    late = ask(board, "a")  # the old owner comes back: it lost the fleet
    assert not late["owned"] and late["holder"] == "b"


def test_release_hands_the_lease_over_at_once() -> None:
    clock = Clock()
    board = LeaseBoard(clock)
    assert ask(board, "a")["owned"]
    board.sync({"gateway": "b", "release": True})  # not b's to release
    assert not ask(board, "b")["owned"]
    assert not board.sync({"gateway": "a", "release": True})["owned"]
    assert ask(board, "b")["owned"]


def test_only_the_holders_writes_count_and_reports_reach_it_fresh() -> None:
    clock = Clock()
    board = LeaseBoard(clock)
    ask(board, "a", announce=b"A1", events=b"[1]")
    reply = ask(board, "b", report=b"demand-b", seen_announce=0, seen_events=0)
    assert (reply["announce"], reply["announce_version"]) == (b"A1", 1)
    assert (reply["events"], reply["events_version"]) == (b"[1]", 1)
    ask(board, "b", announce=b"B-not-owner", events=b"[2]")  # dropped: b does not own it
    reply = ask(board, "c", seen_announce=0, seen_events=0)
    assert reply["announce"] == b"A1" and reply["events"] == b"[1]"
    assert "announce" not in ask(board, "c", seen_announce=1, seen_events=1)  # nothing new
    assert ask(board, "a")["reports"] == [b"demand-b"]
    clock.now += 2.0
    ask(board, "a")
    ask(board, "c", report=b"demand-c")
    clock.now += 1.5  # b's report is older than REPORT_STALE_S now, c's is not
    assert ask(board, "a")["reports"] == [b"demand-c"]
    ask(board, "c", withdraw=True)
    assert ask(board, "a")["reports"] == []


def test_a_restarted_board_is_reserved_for_the_gateway_that_owned_it() -> None:
    clock = Clock()
    board = LeaseBoard(clock, grace_s=LEASE_S)  # what a reconstructed actor starts with
    assert not ask(board, "follower")["owned"]
    assert ask(board, "owner", owned=True)["owned"]
    clock.now += LEASE_S + 0.1  # the owner never came back: anyone may take it
    fresh = LeaseBoard(clock, grace_s=LEASE_S)
    clock.now += LEASE_S
    assert ask(fresh, "follower")["owned"]


def test_without_a_ray_address_the_board_is_the_folder_and_ray_is_not_imported(
        tmp_path: Path) -> None:
    code = f"""
import sys
from pathlib import Path
from modelfleet.services import Services
from modelfleet.settings import Settings
services = Services.build(Settings(data_dir=Path({str(tmp_path)!r})))
print(type(services.fleet.share.board).__name__, "ray" in sys.modules)
"""
    env = {k: v for k, v in os.environ.items() if k != "MODELFLEET_RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=env, check=True)
    assert out.stdout.split() == ["FleetFolder", "False"], out.stderr


# -- the protocol over a remote board, actor state in process ---------------------------

MODEL = "test/remote"


class Link:
    """The transport to an in-process ``LeaseBoard``; ``down`` cuts it."""

    def __init__(self, board: LeaseBoard) -> None:
        self.board = board
        self.down = False
        self.calls = 0

    async def __call__(self, req: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        if self.down:
            raise ConnectionError("board unreachable")
        return self.board.sync(req)


def _spec() -> ModelSpec:
    return ModelSpec.model_validate({
        "id": MODEL, "kind": ModelKind.chat,
        "engine": {"type": "llama.cpp", "model_file": "/x.gguf", "threads": 1,
                   "memory_mib": 100},
        "scaling": {"concurrency": 4, "max_replicas": 2, "idle_timeout_s": 1.0},
    })


class Gateway:
    """A fleet on a remote board, with a stand-in queue (``queued``) and
    launches that add a ready replica record at once (no process)."""

    def __init__(self, tmp: Path, link: Link, name: str, wall: Clock) -> None:
        self.fleet = Fleet(Catalog([_spec()]), Settings(data_dir=tmp / name), WorkerClient())
        self.share = self.fleet.share = FleetShare(RemoteBoard(link), self.fleet.pools,
                                                   wall=wall)
        self.board = self.share.board
        self.pool: ModelPool = self.fleet.pools[MODEL]
        self.pool.ask_owner = self.share.wake
        self.name = name
        self.queued = 0
        self.launched: list[Replica] = []
        self.took_over = self.stepped_down = 0
        self.pool.waiting = lambda: self.queued  # type: ignore[method-assign]
        self.pool.interactive_waiting = self.pool.waiting  # the queued requests are interactive
        self.pool.demand = lambda: (self.queued  # type: ignore[method-assign]
                                    + sum(r.outstanding for r in self.pool.replicas))
        self.pool.availability = lambda: (True, None)  # type: ignore[method-assign]
        self.pool._launch = self._launch  # type: ignore[method-assign]
        self.pool.follower = True  # until the board says otherwise (Fleet.start)

    def _launch(self) -> None:
        pool = self.pool
        replica = Replica(replica_id=f"{self.name}-r{len(self.launched)}", model_id=MODEL,
                          port=1, plan=LaunchPlan(argv=["true"]),
                          slots=pool.spec.scaling.concurrency, log_path=Path("/dev/null"),
                          client=WorkerClient(), settings=pool.fleet_settings)
        replica.state = ReplicaState.ready
        replica.share = share_of(replica.slots, pool.gateways)
        pool.replicas.append(replica)
        self.launched.append(replica)

    def _take_over(self) -> None:
        self.took_over += 1
        self.pool.take_over()
        self.pool.scale_for_demand()

    def _step_down(self) -> None:
        self.stepped_down += 1
        self.fleet._step_down()

    async def step(self) -> None:
        """One turn of ``FleetShare.run``: a step, then an exchange."""
        self.share._lock_tried = -1e9  # no waiting between tries in a test
        self.share.step(self._take_over, self._step_down)
        await self.board.exchange()


async def turns(*gateways: Gateway, times: int = 1) -> None:
    for _ in range(times):
        for gateway in gateways:
            await gateway.step()


@pytest.fixture
def trio(tmp_path: Path) -> tuple[Clock, Link, list[Gateway]]:
    clock = Clock()
    link = Link(LeaseBoard(clock))
    return clock, link, [Gateway(tmp_path, link, name, clock) for name in ("a", "b", "c")]


async def test_one_owner_and_a_followers_demand_wakes_one_replica(
        trio: tuple[Clock, Link, list[Gateway]]) -> None:
    _clock, _link, (a, b, c) = trio
    await turns(a, b, c, times=2)
    assert [g.share.owned for g in (a, b, c)] == [True, False, False]
    b.queued = c.queued = 2  # requests wait on two followers for a sleeping model
    b.pool.scale_for_demand()
    c.pool.scale_for_demand()
    assert b.launched == [] and c.launched == []
    await turns(b, c, a, a, b, c, b, c)
    assert [r.id for r in a.pool.replicas] == ["a-r0"]  # one, not one per gateway
    assert a.share.gateways == 3 and a.pool.replicas[0].share == 2
    for follower in (b, c):
        assert [(r.id, r.state, r.mirrored) for r in follower.pool.replicas] == [
            ("a-r0", ReplicaState.ready, True)]
        assert follower.pool.describe()["state"] == "ready"
        assert follower.share.describe()["owner_gateway"] == a.share.gateway
        events = [(e.from_replicas, e.to_replicas, e.reason) for e in follower.fleet.events()]
        assert events == [(0, 1, "request waiting for a sleeping model")]
    # the followers' use keeps it from the owner's reaper
    b.queued = c.queued = 0
    b.pool.replicas[0].outstanding = 1
    await turns(b, c, a)
    a.pool.replicas[0].last_active -= 60
    await a.pool.reap_idle()
    assert [r.id for r in a.pool.replicas] == ["a-r0"]


async def test_owner_that_stops_renewing_loses_the_fleet_and_steps_down_on_return(
        trio: tuple[Clock, Link, list[Gateway]]) -> None:
    clock, _link, (a, b, c) = trio
    await turns(a, b, c)
    b.queued = 1
    await turns(a, b, c, times=4)
    assert [r.id for r in b.pool.replicas] == ["a-r0"]
    clock.now += LEASE_S - 0.1  # a is hung: it does not renew
    await turns(b, c)
    assert not b.share.owned and [r.id for r in b.pool.replicas] == ["a-r0"]  # not yet
    clock.now += 0.2
    await turns(b, c, b, c)  # b takes the lease at its exchange, the fleet at its next step
    assert b.share.owned and b.took_over == 1 and not c.share.owned
    assert [r.id for r in b.pool.replicas] == ["b-r0"]  # its own waiting request
    assert b.board.describe()["lease_term"] == 2
    await turns(b, c)
    assert [r.id for r in c.pool.replicas] == ["b-r0"]  # c follows the new owner
    # a comes back: the board says it lost the lease; it stops its replica and follows
    stale = a.pool.replicas[0]
    await turns(a, a, b, a)
    assert not a.share.owned and a.stepped_down == 1 and a.pool.follower
    await asyncio.sleep(0)  # the stop runs in its own task
    assert stale.state is ReplicaState.stopped
    assert [(r.id, r.mirrored) for r in a.pool.replicas] == [("b-r0", True)]
    await turns(b, b)
    assert b.share.gateways == 3  # a reports as a follower now


async def test_unreachable_board_keeps_routing_and_ownership_as_they_were(
        trio: tuple[Clock, Link, list[Gateway]]) -> None:
    clock, link, (a, b, c) = trio
    b.queued = 1
    await turns(a, b, c, times=4)
    assert [r.id for r in b.pool.replicas] == ["a-r0"]
    link.down = True
    clock.now += 10 * LEASE_S  # nobody can renew, nobody can take over
    await turns(a, b, c, times=3)
    assert a.share.owned and [r.id for r in a.pool.replicas] == ["a-r0"]
    assert [r.id for r in b.pool.replicas] == ["a-r0"]  # still routed to
    assert b.pool.free_replica() is not None
    assert b.board.describe()["board_reachable"] is False
    link.down = False
    await turns(a, b, c, times=2)  # a renews first: it stays the owner
    assert a.share.owned and a.board.describe()["lease_term"] == 1
    assert [r.id for r in c.pool.replicas] == ["a-r0"]


async def test_restarted_board_gets_the_owners_announcement_again(
        trio: tuple[Clock, Link, list[Gateway]]) -> None:
    clock, link, (a, b, c) = trio
    b.queued = 1
    await turns(a, b, c, times=4)
    link.board = LeaseBoard(clock, grace_s=LEASE_S)  # the actor restarted, empty
    await turns(b, c)  # the followers ask first: reserved for the owner
    assert link.board.holder is None
    await turns(a)  # it reclaims the lease (and sends its announcement next time)
    assert link.board.holder == a.share.gateway and link.board.announce is None
    await turns(c, c)  # the old announcement is the owner's: followed meanwhile
    assert [r.id for r in c.pool.replicas] == ["a-r0"]
    assert [e.to_replicas for e in c.fleet.events()] == [1]
    await turns(a, b, c, c)
    assert a.share.owned and link.board.holder == a.share.gateway
    assert link.board.announce is not None and link.board.events is not None
    assert [r.id for r in c.pool.replicas] == ["a-r0"]
    assert [e.to_replicas for e in c.fleet.events()] == [1]


async def test_graceful_stop_hands_over_at_once(
        trio: tuple[Clock, Link, list[Gateway]]) -> None:
    _clock, _link, (a, b, c) = trio
    await turns(a, b, c)
    a.share.leave()
    await a.share.aclose()  # what Fleet.close ends with
    await turns(b, b)
    assert b.share.owned and b.took_over == 1


# -- a real Ray cluster and three real gateways --------------------------------------------

CATALOG = "".join(f"""
[[models]]
id = "rb/{name}"
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
request_timeout_s = 90.0
""" for name, idle in (("chat", 600.0), ("idle", 2.0)))


@dataclass
class RayHead:
    """``ray start --head --block`` in a session of its own: every process of
    the cluster (GCS, raylet, workers, the board actor) is in its process
    group, which is what ``stop`` ends."""

    proc: subprocess.Popen[bytes]
    address: str
    temp_dir: Path

    @classmethod
    def start(cls) -> RayHead:
        ray = Path(sys.executable).with_name("ray")
        temp_dir = Path(tempfile.mkdtemp(prefix="mfray", dir="/tmp"))  # short: socket paths
        port = free_port()
        ports = {f"--{name}": str(free_port()) for name in (
            "node-manager-port", "object-manager-port",
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
            "runtime-env-agent-port", "metrics-export-port")}
        log = open(temp_dir / "head.log", "wb")  # noqa: SIM115 (the child keeps it)
        proc = subprocess.Popen(
            [str(ray), "start", "--head", "--block", f"--port={port}",
             "--include-dashboard=false", "--num-cpus=4", "--num-gpus=0",
             "--object-store-memory=100000000", f"--temp-dir={temp_dir}",
             "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items())],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        log.close()
        head = cls(proc, f"127.0.0.1:{port}", temp_dir)
        deadline = time.monotonic() + 60
        while b"will now block" not in (temp_dir / "head.log").read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                text = (temp_dir / "head.log").read_text(errors="replace")
                head.stop()
                raise RuntimeError(f"ray head did not start: {text}")
            time.sleep(0.2)
        return head

    def stop(self) -> None:
        """SIGTERM to ``ray start`` and every process under it (GCS, raylet,
        agents, the workers, which have process groups of their own), by pid;
        SIGKILL to what still runs 3 s later."""
        started = _descendants(self.proc.pid) | {self.proc.pid}
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 3
        while _running(started) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in _running(started | _descendants(self.proc.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _stat(pid: int) -> list[str] | None:
    """State, parent and the rest of /proc/<pid>/stat after the name, or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None:
            parents[int(entry)] = int(fields[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _running(pids: set[int]) -> set[int]:
    """Those of ``pids`` that still run (zombies do not)."""
    return {pid for pid in pids if (fields := _stat(pid)) is not None and fields[0] != "Z"}


@dataclass
class Cluster:
    head: RayHead
    gateways: list[Server]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    head = RayHead.start()
    started: list[Server] = []

    def launch(name: str) -> Server:  # each its own data folder and store
        server = launch_server(tmp_path_factory.mktemp(f"machine-{name}"), CATALOG,
                               env={"MODELFLEET_RAY_ADDRESS": head.address,
                                    "PYTHONFAULTHANDLER": "1"})
        started.append(server)
        return server

    try:
        first = launch("one")
        wait_for(lambda: fleet_view(first)["owner"], 60, "the first to own the fleet")
        with ThreadPoolExecutor(2) as pool:  # then two more at once
            second, third = pool.map(launch, ("two", "three"))
        yield Cluster(head, [first, second, third])
    finally:
        for server in started:
            if server.proc.poll() is None:
                stop_server(server.proc)
        head.stop()


def chat(server: Server, model: str) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", timeout=120,
                      json={"model": model, "max_tokens": 2,
                            "messages": [{"role": "user", "content": "Hi"}]},
                      headers={"Authorization": f"Bearer {server.key}"})


def admin(server: Server, path: str) -> dict[str, Any]:
    reply = httpx.get(server.url + path, timeout=10,
                      headers={"Authorization": f"Bearer {server.admin_key}"})
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


def fleet_view(server: Server) -> dict[str, Any]:
    view: dict[str, Any] = admin(server, "/v1/admin/replicas")["fleet"]
    return view


def replica_ids(server: Server, model: str) -> list[str]:
    return sorted(r["id"] for r in admin(server, "/v1/admin/replicas")["replicas"]
                  if r["model"] == model)


def scale_events(server: Server, model: str) -> list[tuple[int, int, str]]:
    rows = admin(server, f"/v1/admin/scale-events?model={model}")["data"]
    return [(e["from_replicas"], e["to_replicas"], e["reason"]) for e in rows]


def state(server: Server, model: str) -> str:
    rows = httpx.get(server.url + "/v1/inference/runtime/models", timeout=10).json()["text"]
    return str(next(r for r in rows if r["model"] == model)["state"])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def in_parallel(calls: list[Callable[[], httpx.Response]]) -> list[httpx.Response]:
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def owners(gateways: list[Server]) -> list[Server]:
    return [g for g in gateways if fleet_view(g)["owner"]]


@pytest.mark.workers
def test_one_owner_for_three_gateways_on_the_ray_board(cluster: Cluster) -> None:
    first, *others = cluster.gateways
    wait_for(lambda: fleet_view(first)["gateways"] == 3, 15, "the owner to count three")
    views = [fleet_view(g) for g in cluster.gateways]
    assert [v["owner"] for v in views] == [True, False, False]
    assert {v["board"] for v in views} == {"ray"}
    assert {v["lease_holder"] for v in views} == {views[0]["gateway"]}
    wait_for(lambda: all(fleet_view(g)["owner_gateway"] == views[0]["gateway"]
                         for g in others), 10, "the followers to follow the owner")


@pytest.mark.workers
def test_sleeping_model_woken_through_followers_starts_one_replica(cluster: Cluster) -> None:
    owner, second, third = cluster.gateways
    assert all(state(g, "rb/chat") == "sleeping" for g in cluster.gateways)
    replies = in_parallel([lambda: chat(second, "rb/chat"), lambda: chat(third, "rb/chat"),
                           lambda: chat(second, "rb/chat")])
    assert [r.status_code for r in replies] == [200] * 3, [r.text for r in replies]
    assert len({r.headers["X-Deployment-Id"] for r in replies}) == 1
    ids = replica_ids(owner, "rb/chat")
    assert len(ids) == 1
    wait_for(lambda: all(replica_ids(g, "rb/chat") == ids for g in cluster.gateways), 5,
             "every gateway to list the one replica")
    expected = [(0, 1, "request waiting for a sleeping model")]
    wait_for(lambda: all(scale_events(g, "rb/chat") == expected for g in cluster.gateways), 5,
             "every gateway to show the one scale event")
    owner_reply = chat(owner, "rb/chat")  # the owner routes to it too
    assert owner_reply.status_code == 200, owner_reply.text
    assert owner_reply.headers["X-Deployment-Id"] == replies[0].headers["X-Deployment-Id"]


@pytest.mark.workers
def test_followers_use_keeps_it_up_and_idle_scales_it_to_zero(cluster: Cluster) -> None:
    owner, second, third = cluster.gateways
    first = chat(second, "rb/idle")  # idle_timeout_s = 2
    assert first.status_code == 200, first.text
    deployment = first.headers["X-Deployment-Id"]
    until, turn = time.monotonic() + 5.0, 0
    while time.monotonic() < until:  # used only through followers, past the idle timeout
        reply = chat((second, third)[turn % 2], "rb/idle")
        turn += 1
        assert reply.status_code == 200, reply.text
        assert reply.headers["X-Deployment-Id"] == deployment  # never reaped meanwhile
        time.sleep(0.5)
    wait_for(lambda: all(state(g, "rb/idle") == "sleeping" for g in cluster.gateways), 15,
             "scale to zero, seen by every gateway")
    assert replica_ids(owner, "rb/idle") == []
    events = [e[:2] for e in scale_events(owner, "rb/idle")]
    assert events == [(0, 1), (1, 0)]
    wait_for(lambda: all(scale_events(g, "rb/idle") == scale_events(owner, "rb/idle")
                         for g in (second, third)), 5, "the followers to show the events")


def board_actor_pid(head: RayHead) -> int | None:
    for pid in _running(_descendants(head.proc.pid)):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::BoardActor"):
                return pid
    return None


@pytest.mark.workers
def test_board_actor_killed_routing_goes_on_and_the_owner_keeps_the_fleet(
        cluster: Cluster) -> None:
    owner, second, third = cluster.gateways
    holder = fleet_view(owner)["gateway"]
    first = chat(second, "rb/chat")
    assert first.status_code == 200, first.text
    deployment, replicas = first.headers["X-Deployment-Id"], replica_ids(owner, "rb/chat")
    events = scale_events(owner, "rb/chat")
    killed = board_actor_pid(cluster.head)
    assert killed is not None
    os.kill(killed, signal.SIGKILL)  # Ray restarts it, empty
    for turn in range(6):  # answered meanwhile, by the same replica
        reply = chat((second, third)[turn % 2], "rb/chat")
        assert reply.status_code == 200, reply.text
        assert reply.headers["X-Deployment-Id"] == deployment
        time.sleep(0.3)
    wait_for(lambda: board_actor_pid(cluster.head) not in (None, killed), 30,
             "Ray to restart the board actor")
    wait_for(lambda: all(fleet_view(g)["board_reachable"] for g in cluster.gateways), 30,
             "every gateway to reach the restarted board")
    wait_for(lambda: all(fleet_view(g)["lease_holder"] == holder for g in cluster.gateways),
             10, "the owner to hold the fleet again")
    assert [fleet_view(g)["owner"] for g in cluster.gateways] == [True, False, False]
    wait_for(lambda: all(replica_ids(g, "rb/chat") == replicas for g in cluster.gateways), 10,
             "every gateway to list the same replica again")
    assert [scale_events(g, "rb/chat") for g in cluster.gateways] == [events] * 3
    after = chat(third, "rb/chat")
    assert after.status_code == 200 and after.headers["X-Deployment-Id"] == deployment


@pytest.mark.workers
def test_owner_killed_another_takes_over_and_requests_succeed(cluster: Cluster) -> None:
    owner, *followers = cluster.gateways
    before = chat(followers[0], "rb/chat")
    assert before.status_code == 200, before.text
    history = scale_events(owner, "rb/chat")
    os.kill(owner.proc.pid, signal.SIGKILL)
    owner.proc.wait(timeout=10)
    killed_at = time.monotonic()
    wait_for(lambda: owners(followers), 15, "another gateway to own the fleet")
    took_over = time.monotonic() - killed_at
    assert took_over < LEASE_S + 4.0, took_over
    (new_owner,) = owners(followers)
    other = next(g for g in followers if g is not new_owner)
    wait_for(lambda: fleet_view(other)["owner_gateway"] == fleet_view(new_owner)["gateway"],
             10, "the other follower to follow the new owner")
    after = in_parallel([lambda: chat(other, "rb/chat"), lambda: chat(new_owner, "rb/chat")])
    assert [r.status_code for r in after] == [200, 200], [r.text for r in after]
    assert len({r.headers["X-Deployment-Id"] for r in after}) == 1
    assert after[0].headers["X-Deployment-Id"] != before.headers["X-Deployment-Id"]
    assert len(replica_ids(new_owner, "rb/chat")) == 1
    # the history went on where it was: one more start, recorded once, shown by both
    events = scale_events(new_owner, "rb/chat")
    assert events[:len(history)] == history and len(events) == len(history) + 1
    assert events[-1][:2] == (0, 1)
    wait_for(lambda: scale_events(other, "rb/chat") == events, 5, "the events on the other")


@pytest.mark.workers
def test_owner_stopped_gracefully_hands_over_at_once(cluster: Cluster) -> None:
    alive = [g for g in cluster.gateways if g.proc.poll() is None]
    (owner,) = owners(alive)
    (last,) = [g for g in alive if g is not owner]
    os.killpg(owner.proc.pid, signal.SIGTERM)  # it releases the lease on its way out
    try:
        owner.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:  # show where it hangs (PYTHONFAULTHANDLER), then end it
        os.kill(owner.proc.pid, signal.SIGABRT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            owner.proc.wait(timeout=5)
        stop_server(owner.proc)
        pytest.fail("the owner did not stop within 20 s of SIGTERM:\n"
                    + owner.log_path.read_text(errors="replace")[-8000:])
    stopped_at = time.monotonic()
    wait_for(lambda: fleet_view(last)["owner"], 10, "the last gateway to own the fleet")
    # Released on the way out, the lease is taken at once (0.02 s here alone).
    # Under a loaded machine the release has been seen not to reach the board
    # before the process ended, and the lease then expires (3.1 s): the bound
    # takes either; that the release itself hands over at once is checked in
    # process by test_graceful_stop_hands_over_at_once.
    assert time.monotonic() - stopped_at < LEASE_S + 2.0
    reply = chat(last, "rb/chat")
    assert reply.status_code == 200, reply.text
    assert fleet_view(last)["gateways"] == 1
