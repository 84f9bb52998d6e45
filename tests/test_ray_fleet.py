"""Replicas as Ray actors on a real local Ray cluster (modelfleet/rayfleet.py).

The module starts its own cluster (``ray.cluster_utils.Cluster``: a head and
two more nodes on this machine, dashboard off, few CPUs declared) and a real
gateway (``modelfleet serve`` with ``MODELFLEET_RAY_ADDRESS``) whose replicas
are real llama-server processes started by actors.  Node B declares two GPUs
that do not exist (FAKE GPUs: Ray lets a node declare any count): only the
assignment of ``CUDA_VISIBLE_DEVICES`` is checked, llama-server runs on the
CPU.  Everything is shut down at the end, by the Cluster object (its own
processes) and the server's process group.

    head    1 CPU                          (takes nothing until a node dies)
    node B  2 CPUs, 2 FAKE GPUs, zone_b=2, slot_b=1, label gpu-class=fake-h100
    node C  2 CPUs
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import SMOL_FILE, Server, launch_server, stop_server

pytestmark = pytest.mark.workers

ray = pytest.importorskip("ray")  # the [ray] extra
cluster_utils = pytest.importorskip("ray.cluster_utils")

NAMESPACE = "modelfleet"


def _model(model_id: str, *, engine: str = "", placement: str = "",
           model_file: str = SMOL_FILE) -> str:
    return f"""
[[models]]
id = "{model_id}"
kind = "chat"
[models.engine]
type = "llama.cpp"
model_file = "{model_file}"
threads = 1
{engine}
[models.limits]
max_messages = 4
max_output_tokens = 512
context_length = 1024
[models.scaling]
concurrency = 2
idle_timeout_s = 600.0
request_timeout_s = 60.0
[models.placement]
{placement}
"""


def catalog(junk: Path) -> str:
    return "".join([
        _model("ray/chat"),  # goes where resources allow
        _model("ray/gpu", engine="gpus = 1", placement="resources = { zone_b = 1 }"),
        _model("ray/swap-a", placement="num_cpus = 0\nresources = { slot_b = 1 }"),
        _model("ray/swap-b", placement="num_cpus = 0\nresources = { slot_b = 1 }"),
        _model("ray/labelled", placement='num_cpus = 0\nnode_labels = { gpu-class = "fake-h100" }'),
        _model("ray/missing", placement="num_cpus = 0", model_file="/nonexistent/model.gguf"),
        _model("ray/broken", placement="num_cpus = 0", model_file=str(junk)),
    ])


@dataclass
class Rig:
    cluster: Any
    node_b: Any
    node_c: Any
    server: Server

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.server.key}"}

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.server.admin_key}"}

    def chat(self, model: str) -> httpx.Response:
        return httpx.post(self.server.url + "/v1/chat/completions", headers=self.headers,
                          timeout=90, json={"model": model, "max_tokens": 3,
                                            "messages": [{"role": "user", "content": "Hi"}]})

    def fleet(self) -> dict[str, Any]:
        resp = httpx.get(self.server.url + "/v1/admin/replicas", headers=self.admin, timeout=10)
        assert resp.status_code == 200, resp.text
        return dict(resp.json())

    def replicas(self, model: str) -> list[dict[str, Any]]:
        return [r for r in self.fleet()["replicas"] if r["model"] == model]

    def ready(self, model: str) -> dict[str, Any]:
        rows = [r for r in self.replicas(model) if r["state"] == "ready"]
        assert len(rows) == 1, rows
        return rows[0]


def _wait(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def _actor_info(replica_id: str) -> dict[str, Any]:
    actor = ray.get_actor(replica_id, namespace=NAMESPACE)
    return dict(ray.get(actor.info.remote(), timeout=20))


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0")
                if "=" in item)


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie whose parent has not reaped it yet is gone too
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("ray")
    # the cluster's own session folder (short: Ray's socket paths have a length limit)
    ray_tmp = tempfile.mkdtemp(prefix="mfrf", dir="/tmp")
    # Ray's Cluster writes its address file to the default Ray folder (/tmp/ray),
    # whatever temp_dir says, and fails if that folder does not exist yet
    Path(tempfile.gettempdir(), "ray").mkdir(exist_ok=True)
    small = {"object_store_memory": 80 * 1024 * 1024, "temp_dir": ray_tmp}
    cluster = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, **small},
    )
    server: Server | None = None
    try:
        node_b = cluster.add_node(num_cpus=2, num_gpus=2,  # FAKE GPUs: none exist
                                  resources={"zone_b": 2, "slot_b": 1},
                                  labels={"gpu-class": "fake-h100"}, **small)
        node_c = cluster.add_node(num_cpus=2, **small)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
        junk = tmp / "not-a-model.gguf"
        junk.write_bytes(b"this is not a GGUF file" * 100)
        server = launch_server(tmp, catalog(junk),
                               env={"MODELFLEET_RAY_ADDRESS": cluster.address})
        yield Rig(cluster, node_b, node_c, server)
    finally:
        if server is not None and server.proc.poll() is None:
            stop_server(server.proc)
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_replica_is_an_actor_that_runs_the_engine_on_its_node(rig: Rig) -> None:
    resp = rig.chat("ray/chat")
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] is not None
    row = rig.ready("ray/chat")
    info = _actor_info(row["id"])
    # a CPU model keeps off the GPU node and goes where most CPUs are free: node C
    assert info["node_id"] == rig.node_c.node_id
    # the worker listens on the node's address (a port the actor picked), and
    # the gateway routes to that URL directly
    node_ip = rig.node_c.node_ip_address
    assert row["url"] == info["url"] == f"http://{node_ip}:{urlsplit(row['url']).port}"
    assert row["pid"] == info["pid"]
    pid = info["pid"]
    assert _ppid(pid) == info["actor_pid"]  # the actor's own child
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"--host" in cmdline and cmdline[cmdline.index(b"--host") + 1] == node_ip.encode()
    # no GPU reserved, none visible
    assert _environ(pid)["CUDA_VISIBLE_DEVICES"] == ""


def test_custom_resource_pins_a_model_to_its_node_and_its_fake_gpu(rig: Rig) -> None:
    resp = rig.chat("ray/gpu")
    assert resp.status_code == 200, resp.text
    row = rig.ready("ray/gpu")
    info = _actor_info(row["id"])
    assert info["node_id"] == rig.node_b.node_id  # the only node with zone_b
    assert len(info["gpu_ids"]) == 1 and info["gpu_ids"][0] in ("0", "1")  # a FAKE GPU
    # what the engine process really got: the GPU Ray assigned to its actor
    assert _environ(row["pid"])["CUDA_VISIBLE_DEVICES"] == info["gpu_ids"][0]


def test_node_label_pins_a_model_to_a_class_of_node(rig: Rig) -> None:
    resp = rig.chat("ray/labelled")
    assert resp.status_code == 200, resp.text
    info = _actor_info(rig.ready("ray/labelled")["id"])
    assert info["node_id"] == rig.node_b.node_id  # the only node labelled gpu-class=fake-h100
    assert info["gpu_ids"] == [] and _environ(info["pid"])["CUDA_VISIBLE_DEVICES"] == ""


def test_killing_the_actor_kills_the_engine_and_the_replica_is_replaced(rig: Rig) -> None:
    old = rig.ready("ray/chat")
    ray.kill(ray.get_actor(old["id"], namespace=NAMESPACE), no_restart=True)
    _wait(lambda: _gone(old["pid"]), 15, "the engine to die with its actor")
    new = _wait(lambda: [r for r in rig.replicas("ray/chat")
                         if r["id"] != old["id"] and r["state"] == "ready"], 60,
                "a replacement replica")[0]
    assert _actor_info(new["id"])["node_id"] == rig.node_c.node_id
    resp = rig.chat("ray/chat")
    assert resp.status_code == 200, resp.text


def test_engine_that_dies_takes_its_actor_with_it(rig: Rig) -> None:
    old = rig.ready("ray/chat")
    actor = ray.get_actor(old["id"], namespace=NAMESPACE)
    os.kill(old["pid"], signal.SIGKILL)

    def actor_dead() -> bool:
        try:
            ray.get(actor.info.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return True
        return False

    _wait(actor_dead, 20, "the actor to exit after its engine")
    _wait(lambda: [r for r in rig.replicas("ray/chat")
                   if r["id"] != old["id"] and r["state"] == "ready"], 60, "a replacement")
    assert rig.chat("ray/chat").status_code == 200


def test_two_models_that_do_not_fit_on_one_node_swap_there(rig: Rig) -> None:
    """swap-a and swap-b each need node B's one slot_b: they take turns on it,
    and the gpu model on the same node is left alone."""
    for model in ("ray/swap-a", "ray/swap-b", "ray/swap-a"):
        resp = rig.chat(model)
        assert resp.status_code == 200, resp.text
        live = [r["model"] for r in rig.fleet()["replicas"] if r["model"].startswith("ray/swap")]
        assert live == [model]  # never both
        assert _actor_info(rig.ready(model)["id"])["node_id"] == rig.node_b.node_id
    swaps = [e for e in rig.fleet()["scale_events"] if e["reason"].startswith("swapped out")]
    assert [e["model"] for e in swaps] == ["ray/swap-a", "ray/swap-b"]
    assert all(rig.node_b.node_id[:8] in e["reason"] for e in swaps)
    assert rig.ready("ray/gpu")  # not evicted: another model's resources


def test_failures_on_the_node_are_reported_with_their_reason(rig: Rig) -> None:
    missing = rig.chat("ray/missing")  # the model file is looked up on the node
    assert missing.status_code == 503, missing.text
    assert missing.json()["error"]["code"] == "model_unavailable"
    assert "on Ray node" in missing.json()["error"]["message"]
    assert "/nonexistent/model.gguf" in missing.json()["error"]["message"]
    broken = rig.chat("ray/broken")  # llama-server starts on the node and exits
    assert broken.status_code == 503, broken.text
    assert "failed to start 3 times" in broken.json()["error"]["message"]
    runtime = httpx.get(rig.server.url + "/v1/inference/runtime/models", timeout=10).json()
    row = next(r for r in runtime["text"] if r["model"] == "ray/broken")
    assert row["available"] is False and "exited with code" in row["reason"]
    assert rig.replicas("ray/broken") == []  # no actor left behind
    assert "ray/chat" in {r["model"] for r in rig.fleet()["replicas"]}


def test_removed_node_its_replicas_are_replaced_on_a_survivor(rig: Rig) -> None:
    """Node C goes while its replica runs two requests and a third waits for a
    slot: the waiting one is answered by the replacement on a surviving node."""
    old = rig.ready("ray/chat")
    assert _actor_info(old["id"])["node_id"] == rig.node_c.node_id
    results: dict[str, httpx.Response | Exception] = {}

    def call(name: str, **over: Any) -> None:
        body = {"model": "ray/chat", "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 3, **over}
        try:
            results[name] = httpx.post(rig.server.url + "/v1/chat/completions",
                                       headers=rig.headers, json=body, timeout=90)
        except httpx.HTTPError as exc:
            results[name] = exc

    def runtime() -> dict[str, Any]:
        rows = httpx.get(rig.server.url + "/v1/inference/runtime/models", timeout=10).json()
        return dict(next(r for r in rows["text"] if r["model"] == "ray/chat"))

    # both slots busy with long answers...
    running = [threading.Thread(target=call, args=(f"long{i}",),
                                kwargs={"max_tokens": 250, "metadata": {"ignore_eos": True}})
               for i in range(2)]
    for thread in running:
        thread.start()
    _wait(lambda: rig.ready("ray/chat")["outstanding"] == 2, 30, "two running requests")
    # ...and one more waiting for a slot
    waiting = threading.Thread(target=call, args=("waiting",))
    waiting.start()
    _wait(lambda: runtime()["queued"] >= 1, 10, "a queued request")
    assert all(name not in results for name in ("long0", "long1", "waiting"))
    rig.cluster.remove_node(rig.node_c)
    t0 = time.monotonic()
    waiting.join(90)
    answer = results["waiting"]
    assert isinstance(answer, httpx.Response) and answer.status_code == 200, answer
    assert time.monotonic() - t0 < 60
    for thread in running:
        thread.join(90)
    # they ended: retried on the replacement (nothing of theirs had reached the
    # client), or failed; the gateway decides that as for any dying replica
    assert {"long0", "long1"} <= set(results)
    new = rig.ready("ray/chat")
    assert new["id"] != old["id"]
    survivors = {rig.cluster.head_node.node_id, rig.node_b.node_id}
    assert _actor_info(new["id"])["node_id"] in survivors
    assert _gone(old["pid"])
    assert rig.chat("ray/chat").status_code == 200
    assert rig.chat("ray/gpu").status_code == 200  # node B's replica was not touched



def test_gateway_killed_its_actors_and_engines_go_with_it(rig: Rig) -> None:
    """Last: the cluster's version of the parent-death signal. Ray ends the
    actors of a driver that died, and each engine dies with its actor."""
    rows = [r for r in rig.fleet()["replicas"] if r["state"] == "ready"]
    assert len(rows) >= 2
    os.kill(rig.server.proc.pid, signal.SIGKILL)
    rig.server.proc.wait(10)
    for row in rows:
        _wait(lambda pid=row["pid"]: _gone(pid), 30, f"engine {row['id']} to die")


# -- the parts that need no cluster ----------------------------------------------------


def test_bind_host_and_what_a_replica_reserves() -> None:
    from modelfleet.catalog import CatalogError, load_catalog
    from modelfleet.engines.base import engine_for
    from modelfleet.rayfleet import bind_host, need_of

    argv = ["llama-server", "--host", "127.0.0.1", "--port", "1", "--x=localhost"]
    assert bind_host(argv, "10.0.0.7") == ["llama-server", "--host", "10.0.0.7", "--port", "1",
                                           "--x=localhost"]
    assert bind_host(["w", "--host=localhost"], "10.0.0.7") == ["w", "--host=10.0.0.7"]
    assert bind_host(["w", "--host", "0.0.0.0"], "10.0.0.7") == ["w", "--host", "0.0.0.0"]

    tmp = Path(tempfile.mkdtemp(prefix="mfrf"))
    try:
        path = tmp / "catalog.toml"
        path.write_text(_model("m", engine="gpus = 2\nmemory_mib = 512",
                               placement="resources = { a100 = 1 }"))
        spec = next(iter(load_catalog(path)))
        need = need_of(engine_for(spec, tmp))
        assert need == {"CPU": 1.0, "GPU": 2.0, "memory": 512.0 * 2**20, "a100": 1.0}
        for bad in ("resources = { GPU = 1 }", "cpus = 2"):
            path.write_text(_model("m", placement=bad))
            with pytest.raises(CatalogError):
                load_catalog(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
