#!/usr/bin/env python3
"""Benchmark of the serving spine: throughput, added latency and cold start.

One run starts its own modelfleet server on 127.0.0.1 (temp data dir; the
inference key is the one `serve` prints on first start, plus an admin key from
`modelfleet keys create`) and measures, always against the same llama-server
worker (its URL from GET /v1/admin/replicas):

  (a) aggregate output tokens/s of the chat model at concurrency 1, 4 and 8,
      through the gateway and straight to the worker.  At c=4 and c=8 the two
      run in blocks interleaved direct/gateway, gateway/direct, ... per level
      and round; at c=1 they alternate request by request.  Non-streaming,
      max_tokens 64 with ignore_eos, tokens from usage.completion_tokens.
  (b) the gateway's added latency: the same max_tokens=1 request straight to
      the worker and through the gateway (auth on), p50/p99 at c=1 (request
      by request) and c=16 (interleaved blocks).
  (c) cold start: fresh servers (the model sleeping), time from sending a
      streaming request to its first content token; warm TTFT for comparison.

The machine is shared: every block records the CPU other processes used
meanwhile, and verdicts use only the pairs where that stayed low.
All traffic stays on loopback.  The servers are stopped by PID at the end.

    .venv/bin/python bench/spine.py [--quick] [--out results.md]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
MODELFLEET = str(VENV_BIN / "modelfleet") if (VENV_BIN / "modelfleet").exists() else "modelfleet"
MODEL_ALIAS = "smollm2"
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")

PROMPT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."},
]
# Sampling set explicitly on both paths so the worker does the same work.
SAMPLING = {"temperature": 0.7, "top_p": 1.0}


@dataclass
class Profile:
    levels: tuple[int, ...] = (1, 4, 8)
    rounds: int = 5  # interleaved rounds in (a); fewer if its time allotment runs out
    block_s: float = 4.0  # measurement window per (round, level, target) block in (a)
    max_tokens: int = 64
    lat_c1_total: int = 200  # per target
    lat_c16_total: int = 400  # per target
    lat_blocks: int = 4  # each total is split into this many interleaved blocks
    cold_runs: int = 3
    warm_ttft_n: int = 10
    # Time allotments (s): a phase stops starting new rounds/blocks past its own.
    a_budget_s: float = 150.0
    b_budget_s: float = 120.0
    quiet_wait_s: float = 4.0  # before each block, wait up to this for a quiet machine
    quiet_total_s: float = 45.0  # ... but no more than this over the whole run
    budget_s: float = 480.0  # hard limit of the whole run
    c_reserve_s: float = 40.0  # of which kept for (c)


QUICK = Profile(rounds=1, block_s=3.0, lat_c1_total=60, lat_c16_total=160, lat_blocks=2,
                cold_runs=1, warm_ttft_n=5, a_budget_s=45.0, b_budget_s=30.0,
                quiet_wait_s=2.0, quiet_total_s=10.0, budget_s=150.0,
                c_reserve_s=20.0)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process, from /proc (None if it is gone)."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class CpuMeter:
    """Machine-wide busy CPU from /proc/stat, split into ours and everyone else's.

    "Ours" is this script, the gateway and the worker; "foreign" is the rest of
    the (shared) machine, reported per block so a noisy block can be seen.
    """

    def __init__(self) -> None:
        self.pids: list[int] = [os.getpid()]

    @staticmethod
    def busy() -> float:
        with open("/proc/stat") as f:
            parts = [int(x) for x in f.readline().split()[1:]]
        idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
        return (sum(parts[:8]) - idle) / CLK_TCK

    def ours(self) -> float:
        return sum(cpu_seconds(pid) or 0.0 for pid in self.pids)

    def snap(self) -> tuple[float, float, float]:
        return time.perf_counter(), self.busy(), self.ours()

    @staticmethod
    def foreign(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
        """Cores used by other processes between two snaps."""
        dt = b[0] - a[0]
        return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / dt) if dt > 0 else 0.0

    async def wait_quiet(self, max_wait: float, threshold: float = 0.25) -> float:
        """Wait (at most max_wait s) for other processes to use < threshold cores."""
        t0 = time.perf_counter()
        while True:
            a = self.snap()
            await asyncio.sleep(0.3)
            if self.foreign(a, self.snap()) < threshold:
                break
            if time.perf_counter() - t0 > max_wait:
                break
        return time.perf_counter() - t0


METER = CpuMeter()


def children(pid: int | None) -> list[int]:
    """Direct children of a process (from /proc)."""
    out = []
    if pid is None:
        return out
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(d.name))
    return out


def pid_is(pid: int, needle: str) -> bool:
    try:
        return needle in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    rank = max(1, min(len(s), int(-(-q * len(s) // 1))))
    return s[rank - 1]


# -- servers ---------------------------------------------------------------------


class Server:
    """One `modelfleet serve` we started, with its own temp data dir."""

    def __init__(self, name: str, *, admin_key: bool) -> None:
        self.name = name
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"mf-bench-{name}-"))
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.admin_key = admin_key
        self.key: str | None = None  # inference (the bootstrap key)
        self.admin: str | None = None  # admin scope, for /v1/admin/replicas
        self.proc: asyncio.subprocess.Process | None = None
        self.worker_pids: set[int] = set()
        self._stdout_task: asyncio.Task[None] | None = None
        self._key_seen = asyncio.Event()
        self.stderr_path = self.data_dir / "serve.stderr.log"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    async def start(self, session: aiohttp.ClientSession, timeout: float = 60.0) -> float:
        """Start and wait until GET /health answers; returns seconds taken.

        The inference key is the one `serve` prints on its first start (project
        `default`, which gets the welcome credit and the default plan); an
        admin key for /v1/admin/replicas is then made with `modelfleet keys
        create` on the same data dir, in the same project.
        """
        t0 = time.perf_counter()
        with open(self.stderr_path, "wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                MODELFLEET, "serve", "--host", HOST, "--port", str(self.port),
                "--data-dir", str(self.data_dir), "--log-level", "info",
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=err,
            )
        self._stdout_task = asyncio.create_task(self._read_stdout())
        deadline = t0 + timeout
        while True:
            if self.proc.returncode is not None:
                raise RuntimeError(f"{self.name}: modelfleet serve exited "
                                   f"({self.proc.returncode}): {self.stderr_tail()}")
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                async with session.get(self.base + "/health",
                                       timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        break
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{self.name}: /health did not answer in {timeout:.0f}s")
            await asyncio.sleep(0.05)
        took = time.perf_counter() - t0
        try:
            await asyncio.wait_for(self._key_seen.wait(), 10)
        except TimeoutError:
            raise RuntimeError(f"{self.name}: serve printed no key on its first start: "
                               f"{self.stderr_tail()}") from None
        if self.admin_key:
            out = await asyncio.to_thread(
                subprocess.run,
                [MODELFLEET, "keys", "create", "--project", "default", "--scope", "admin",
                 "--name", "bench-admin", "--data-dir", str(self.data_dir)],
                capture_output=True, text=True, timeout=60, check=False,
            )
            self.admin = _find_key(out.stdout)
            if out.returncode or not self.admin:
                raise RuntimeError(f"keys create failed: {out.stdout!r} {out.stderr!r}")
        return took

    async def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith("mf-") and self.key is None:
                self.key = line
                self._key_seen.set()

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    async def replicas(self, session: aiohttp.ClientSession) -> list[dict[str, Any]]:
        async with session.get(self.base + "/v1/admin/replicas",
                               headers={"Authorization": f"Bearer {self.admin}"}) as r:
            body = await r.json()
            if r.status != 200:
                raise RuntimeError(f"/v1/admin/replicas: {r.status} {body}")
        rows = body["replicas"]
        for row in rows:
            if row.get("pid"):
                self.worker_pids.add(int(row["pid"]))
        return rows

    def stderr_tail(self, n: int = 5) -> str:
        try:
            lines = self.stderr_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-n:])

    def worker_ready_times(self) -> list[float]:
        """'replica ... ready in X s' from the server log: spawn -> healthy."""
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return []
        return [float(m) for m in re.findall(r"replica \S+ ready in ([0-9.]+)s", text)]

    async def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)  # uvicorn shuts down; the fleet stops workers
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                log(f"{self.name}: serve pid {proc.pid} ignored SIGTERM; SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                await proc.wait()
        if self._stdout_task is not None:
            self._stdout_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._stdout_task
        # Workers our server started and somehow left behind (only by their PID).
        for pid in self.worker_pids:
            if pid_is(pid, "llama-server"):
                log(f"{self.name}: worker pid {pid} outlived its server; SIGTERM")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        shutil.rmtree(self.data_dir, ignore_errors=True)


def _find_key(text: str) -> str | None:
    for line in text.splitlines():
        if line.strip().startswith("mf-"):
            return line.strip()
    return None


# -- one target: the gateway or the worker directly ---------------------------------


@dataclass
class Target:
    name: str  # "gateway" or "direct"
    url: str  # full chat completions URL
    headers: dict[str, str]
    gateway: bool

    def body(self, max_tokens: int, *, ignore_eos: bool, stream: bool = False) -> bytes:
        b: dict[str, Any] = {"messages": PROMPT, "max_tokens": max_tokens, **SAMPLING}
        if self.gateway:
            b["model"] = MODEL_ALIAS
            if ignore_eos:
                b["metadata"] = {"ignore_eos": True}
        else:
            b["model"] = MODEL_ID
            if ignore_eos:
                b["ignore_eos"] = True
        if stream:
            b["stream"] = True
        return json.dumps(b).encode()


@dataclass
class BlockResult:
    target: str
    concurrency: int
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    short: int = 0  # answers with fewer tokens than asked
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    spans: list[tuple[float, float, int]] = field(default_factory=list)  # start, end, tokens
    window: tuple[float, float] | None = None  # the measurement window of a timed block
    gw_cpu: float | None = None  # gateway process CPU seconds during the block
    wk_cpu: float | None = None  # worker process CPU seconds during the block
    first_error: str = ""
    foreign: float = 0.0  # cores used by other processes during the block
    started: float = 0.0


async def one_request(session: aiohttp.ClientSession, t: Target, body: bytes,
                      res: BlockResult, want_tokens: int) -> None:
    t0 = time.perf_counter()
    try:
        async with session.post(t.url, data=body, headers=t.headers) as r:
            raw = await r.read()
            status = r.status
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        res.errors += 1
        res.first_error = res.first_error or f"{type(exc).__name__}: {exc}"
        return
    dt = time.perf_counter() - t0
    if status != 200:
        res.errors += 1
        res.first_error = res.first_error or f"HTTP {status}: {raw[:200]!r}"
        return
    usage = json.loads(raw).get("usage") or {}
    n = int(usage.get("completion_tokens") or 0)
    res.requests += 1
    res.tokens += n
    if n < want_tokens:
        res.short += 1
    res.latencies.append(dt)
    res.spans.append((t0, t0 + dt, n))


async def run_block(session: aiohttp.ClientSession, t: Target, *, concurrency: int,
                    max_tokens: int, ignore_eos: bool, duration: float | None = None,
                    count: int | None = None, pids: tuple[int | None, int | None]) -> BlockResult:
    """Closed loop: `concurrency` clients, until `duration` passes or `count` are sent."""
    res = BlockResult(t.name, concurrency)
    body = t.body(max_tokens, ignore_eos=ignore_eos)
    sent = 0
    gw0, wk0 = cpu_seconds(pids[0]), cpu_seconds(pids[1])
    m0 = METER.snap()
    start = res.started = time.perf_counter()
    stop_at = start + duration if duration is not None else None

    async def client() -> None:
        nonlocal sent
        while True:
            if stop_at is not None and time.perf_counter() >= stop_at:
                return
            if count is not None:
                if sent >= count:
                    return
                sent += 1
            await one_request(session, t, body, res, max_tokens)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    res.elapsed = time.perf_counter() - start
    if stop_at is not None:
        res.window = (start, stop_at)
    res.foreign = METER.foreign(m0, METER.snap())
    gw1, wk1 = cpu_seconds(pids[0]), cpu_seconds(pids[1])
    if gw0 is not None and gw1 is not None:
        res.gw_cpu = gw1 - gw0
    if wk0 is not None and wk1 is not None:
        res.wk_cpu = wk1 - wk0
    if res.errors:
        log(f"    {res.errors} errors, first: {res.first_error}")
    return res


async def run_mixed(session: aiohttp.ClientSession, targets: dict[str, Target], *,
                    max_tokens: int, ignore_eos: bool, duration: float | None = None,
                    count: int | None = None, pids: tuple[int | None, int | None],
                    first: int = 0) -> dict[str, BlockResult]:
    """Concurrency 1, the two targets alternating request by request (ABBA order).

    With one request in flight at a time, nothing is shared between the two
    targets' requests, so interleaving them this finely makes the comparison
    immune to drift in the machine's speed.  A result's `elapsed` is the time
    spent inside its own requests, so its rate is tokens / time in requests.
    """
    res = {name: BlockResult(name, 1) for name in targets}
    bodies = {name: t.body(max_tokens, ignore_eos=ignore_eos) for name, t in targets.items()}
    gw0 = cpu_seconds(pids[0])
    m0 = METER.snap()
    start = time.perf_counter()
    for r in res.values():
        r.started = start
    k = first
    while True:
        if duration is not None and time.perf_counter() - start >= duration:
            break
        if count is not None and k - first >= 2 * count:
            break
        pair = _order(k // 2)
        name = pair[k % 2]
        await one_request(session, targets[name], bodies[name], res[name], max_tokens)
        k += 1
    foreign = METER.foreign(m0, METER.snap())
    gw1 = cpu_seconds(pids[0])
    for name, r in res.items():
        r.elapsed = sum(r.latencies)
        r.foreign = foreign
        if name == "gateway" and gw0 is not None and gw1 is not None:
            r.gw_cpu = gw1 - gw0  # includes the gateway's idle background work
        if r.errors:
            log(f"    {name}: {r.errors} errors, first: {r.first_error}")
    return res


async def ttft(session: aiohttp.ClientSession, t: Target, max_tokens: int = 16,
               timeout: float = 120.0) -> tuple[float, int]:
    """Seconds from sending a streaming request to its first content token; tokens seen."""
    body = t.body(max_tokens, ignore_eos=True, stream=True)
    t0 = time.perf_counter()
    first: float | None = None
    chunks = 0
    async with session.post(t.url, data=body, headers=t.headers,
                            timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        if r.status != 200:
            raise RuntimeError(f"{t.name}: HTTP {r.status}: {(await r.read())[:300]!r}")
        async for line in r.content:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            obj = json.loads(data)
            choices = obj.get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError(f"{t.name}: stream had no content")
    return first, chunks


# -- the phases ---------------------------------------------------------------------


@dataclass
class Results:
    profile: Profile
    started: str = ""
    machine: dict[str, Any] = field(default_factory=dict)
    # (a): per (level, target) the list of per-round blocks
    thr: dict[tuple[int, str], list[BlockResult]] = field(default_factory=dict)
    # (b): per (concurrency, target) the blocks
    lat: dict[tuple[int, str], list[BlockResult]] = field(default_factory=dict)
    warm_ttft: dict[str, list[float]] = field(default_factory=dict)
    cold: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    quiet_wait_s: float = 0.0


def _order(i: int) -> tuple[str, str]:
    return ("direct", "gateway") if i % 2 == 0 else ("gateway", "direct")


class Quiet:
    """Before a block, wait a little for the shared machine to calm down."""

    def __init__(self, p: Profile) -> None:
        self.p = p
        self.spent = 0.0

    async def __call__(self) -> None:
        left = min(self.p.quiet_wait_s, self.p.quiet_total_s - self.spent)
        if left > 0:
            self.spent += await METER.wait_quiet(left)


async def phase_throughput(session, targets, pids, p: Profile, R: Results, quiet) -> None:
    log(f"(a) throughput: levels {p.levels}, up to {p.rounds} rounds x {p.block_s:g}s blocks, "
        f"max_tokens {p.max_tokens}, ignore_eos")
    t0 = time.perf_counter()
    i = 0
    for rnd in range(p.rounds):
        for c in p.levels:
            # stop at a pair boundary when another pair would overrun the allotment
            if time.perf_counter() - t0 > p.a_budget_s - 2 * p.block_s - 2:
                R.notes.append(f"(a) stopped in round {rnd + 1} of {p.rounds}, before c={c} "
                               "(time allotment); later levels have one pair fewer")
                log(R.notes[-1])
                return
            if c == 1:
                await quiet()
                mixed = await run_mixed(session, targets, max_tokens=p.max_tokens,
                                        ignore_eos=True, duration=2 * p.block_s, pids=pids,
                                        first=i)
                blocks = [mixed[name] for name in _order(i)]
            else:
                blocks = []
                for name in _order(i):
                    await quiet()
                    blocks.append(await run_block(session, targets[name], concurrency=c,
                                                  max_tokens=p.max_tokens, ignore_eos=True,
                                                  duration=p.block_s, pids=pids))
            for b in blocks:
                R.thr.setdefault((c, b.target), []).append(b)
                log(f"  round {rnd + 1} c={c} {b.target:7s}: {b.requests:3d} req, "
                    f"{_rate([b]):6.1f} tok/s  (other processes: "
                    f"{b.foreign:.2f} cores){'  [request-interleaved]' if c == 1 else ''}")
            i += 1


async def phase_latency(session, targets, pids, p: Profile, R: Results, quiet) -> None:
    log(f"(b) added latency: max_tokens 1, c=1 x {p.lat_c1_total}, c=16 x {p.lat_c16_total} "
        f"per target, {p.lat_blocks} interleaved blocks each")
    t0 = time.perf_counter()
    i = 0
    for c, total in ((1, p.lat_c1_total), (16, p.lat_c16_total)):
        # a few unmeasured requests at this concurrency first
        for name in ("direct", "gateway"):
            await run_block(session, targets[name], concurrency=c, max_tokens=1,
                            ignore_eos=False, count=c * 2, pids=(None, None))
        per_block = max(1, total // p.lat_blocks)
        for k in range(p.lat_blocks):
            # c=1 gets at most ~45% of the allotment, so c=16 always runs
            limit = p.b_budget_s * (0.45 if c == 1 else 1.0)
            if k and time.perf_counter() - t0 > limit:
                R.notes.append(f"(b) c={c}: ran {k} of {p.lat_blocks} block pairs "
                               "(time allotment)")
                break
            if c == 1:
                await quiet()
                mixed = await run_mixed(session, targets, max_tokens=1, ignore_eos=False,
                                        count=per_block, pids=pids, first=i)
                for name in ("direct", "gateway"):
                    R.lat.setdefault((c, name), []).append(mixed[name])
            else:
                for name in _order(i):
                    await quiet()
                    b = await run_block(session, targets[name], concurrency=c, max_tokens=1,
                                        ignore_eos=False, count=per_block, pids=pids)
                    R.lat.setdefault((c, name), []).append(b)
            i += 1
        for name in ("direct", "gateway"):
            lats = [x for b in R.lat[(c, name)] for x in b.latencies]
            log(f"  c={c:2d} {name:7s}: n={len(lats)} p50 {pct(lats, .5) * 1e3:.2f} ms "
                f"p99 {pct(lats, .99) * 1e3:.2f} ms")


async def phase_warm_ttft(session, targets, p: Profile, R: Results) -> None:
    log(f"warm TTFT: {p.warm_ttft_n} streaming requests per target, interleaved")
    for k in range(p.warm_ttft_n):
        for name in _order(k):
            s, _ = await ttft(session, targets[name])
            R.warm_ttft.setdefault(name, []).append(s)
    for name, xs in R.warm_ttft.items():
        log(f"  {name:7s}: median {statistics.median(xs) * 1e3:.1f} ms")


async def phase_cold(session, p: Profile, R: Results, servers: list[Server]) -> None:
    log(f"(c) cold start: {p.cold_runs} fresh servers, streaming TTFT on a sleeping model")
    for k in range(p.cold_runs):
        srv = Server(f"cold{k + 1}", admin_key=False)
        servers.append(srv)
        up = await srv.start(session)
        gw = Target("gateway", srv.base + "/v1/chat/completions", srv.headers(), True)
        await METER.wait_quiet(p.quiet_wait_s)
        t0, busy0 = time.perf_counter(), CpuMeter.busy()
        ours0 = (cpu_seconds(os.getpid()) or 0.0) + (cpu_seconds(srv.pid) or 0.0)
        cold_s, chunks = await ttft(session, gw)
        # the worker started inside this window: all its CPU so far is ours
        ours1 = (cpu_seconds(os.getpid()) or 0.0) + (cpu_seconds(srv.pid) or 0.0) + sum(
            cpu_seconds(pid) or 0.0 for pid in children(srv.pid))
        foreign = max(0.0, (CpuMeter.busy() - busy0) - (ours1 - ours0)) / (
            time.perf_counter() - t0)
        warm = []
        for _ in range(3):
            w, _ = await ttft(session, gw)
            warm.append(w)
        ready = srv.worker_ready_times()
        row = {"server_start_s": up, "cold_ttft_s": cold_s, "chunks": chunks,
               "worker_ready_s": ready[0] if ready else None,
               "warm_ttft_s": statistics.median(warm), "foreign": foreign}
        R.cold.append(row)
        log(f"  run {k + 1}: server up in {up:.2f}s (not timed); cold TTFT {cold_s * 1e3:.0f} ms "
            f"(worker spawn->healthy {row['worker_ready_s']}s); warm TTFT "
            f"{row['warm_ttft_s'] * 1e3:.1f} ms; other processes {foreign:.2f} cores")
        await srv.stop()
        servers.remove(srv)


async def main_async(args: argparse.Namespace) -> Results:
    p = QUICK if args.quick else Profile()
    R = Results(profile=p, started=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    R.machine = machine_info()
    t_start = time.perf_counter()
    servers: list[Server] = []
    waited = await METER.wait_quiet(p.quiet_wait_s * 5)
    if waited > 1:
        log(f"waited {waited:.1f}s for other processes to quieten before starting")
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=120),
        skip_auto_headers=("User-Agent",),
    ) as session:
        try:
            async with asyncio.timeout(p.budget_s - p.c_reserve_s):
                srv = Server("main", admin_key=True)
                servers.append(srv)
                up = await srv.start(session)
                log(f"modelfleet serve pid {srv.pid} on {srv.base} (up in {up:.2f}s), "
                    f"data dir {srv.data_dir}")
                gw = Target("gateway", srv.base + "/v1/chat/completions", srv.headers(), True)
                # The first request wakes the model (cold start through the gateway).
                b = await run_block(session, gw, concurrency=1, max_tokens=8, ignore_eos=True,
                                    count=1, pids=(None, None))
                if b.errors:
                    raise RuntimeError(f"first request failed: {b.first_error}")
                reps = [r for r in await srv.replicas(session)
                        if r["model"] == MODEL_ID and r["state"] == "ready"]
                if len(reps) != 1:
                    raise RuntimeError(f"expected one ready replica, got {reps}")
                rep = reps[0]
                if not rep["url"].startswith(f"http://{HOST}:"):
                    raise RuntimeError(f"replica url is not loopback: {rep['url']}")
                R.machine["replica_slots"] = rep["slots"]
                direct = Target("direct", rep["url"] + "/v1/chat/completions", {}, False)
                targets = {"gateway": gw, "direct": direct}
                pids = (srv.pid, int(rep["pid"]))
                log(f"worker pid {rep['pid']} at {rep['url']} ({rep['slots']} slots)")
                # warm-up both paths at full concurrency; check ignore_eos works on both
                for name in ("direct", "gateway"):
                    wb = await run_block(session, targets[name], concurrency=8,
                                         max_tokens=p.max_tokens, ignore_eos=True, count=16,
                                         pids=(None, None))
                    if wb.errors or wb.short:
                        R.notes.append(f"warm-up {name}: {wb.errors} errors, {wb.short} "
                                       f"answers shorter than max_tokens")
                METER.pids += [p_ for p_ in pids if p_]
                quiet = Quiet(p)
                try:
                    await phase_throughput(session, targets, pids, p, R, quiet)
                    await phase_latency(session, targets, pids, p, R, quiet)
                    await phase_warm_ttft(session, targets, p, R)
                finally:
                    R.quiet_wait_s = quiet.spent
        except TimeoutError:
            R.notes.append(f"(a)/(b) stopped at their time budget of "
                           f"{p.budget_s - p.c_reserve_s:g}s; results are partial")
            log(R.notes[-1])
        finally:
            for s in list(servers):
                await s.stop()
                servers.remove(s)
        try:
            left = p.budget_s - (time.perf_counter() - t_start)
            async with asyncio.timeout(max(left, p.c_reserve_s)):
                await phase_cold(session, p, R, servers)
        except TimeoutError:
            R.notes.append("(c) stopped at the run's time budget; results are partial")
            log(R.notes[-1])
        finally:
            for s in list(servers):
                await s.stop()
    R.wall_s = time.perf_counter() - t_start
    R.machine["loadavg_end"] = os.getloadavg()
    return R


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
        "other_llama_servers": sum(1 for d in Path("/proc").iterdir()
                                   if d.name.isdigit() and pid_is(int(d.name), "llama-server")),
    }
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                                "modelfleet"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        info["revision"] = rev + (" + uncommitted changes in modelfleet/" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        info["revision"] = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import tomllib

        cat = tomllib.loads((ROOT / "modelfleet" / "catalog.toml").read_text())
        m = next(x for x in cat["models"] if x["id"] == MODEL_ID)
        info["engine"] = (f"llama-server, --threads {m['engine']['threads']}, --parallel "
                          f"{m['scaling']['concurrency']}, ctx {m['limits']['context_length']} "
                          f"per slot, args {' '.join(m['engine']['args'])}")
        info["model_file"] = m["engine"]["model_file"]
    except Exception as exc:  # informational only
        info["engine"] = f"(catalog not read: {exc})"
    return info


# -- report ------------------------------------------------------------------------


def window_tokens(b: BlockResult) -> float:
    """Tokens produced inside the block's window, each request's tokens spread evenly
    over its own duration (decode dominates: the prompt is short and cached).

    The clients keep `concurrency` requests in flight for the whole window and
    only stop starting new ones at its end, so this is the steady-state rate,
    free of the ramp-down after the window (requests finishing at different
    times) and of quantisation into whole requests.
    """
    if b.window is None:
        return float(b.tokens)
    w0, w1 = b.window
    total = 0.0
    for s0, s1, n in b.spans:
        overlap = min(s1, w1) - max(s0, w0)
        if overlap > 0 and s1 > s0:
            total += n * overlap / (s1 - s0)
    return total


def _rate(blocks: list[BlockResult]) -> float:
    """Aggregate tokens/s over several blocks (their windows)."""
    el = sum((b.window[1] - b.window[0]) if b.window else b.elapsed for b in blocks)
    return sum(window_tokens(b) for b in blocks) / el if el else 0.0


NOISY = 0.25  # cores used by other processes above which a block counts as noisy


def quiet_pairs(pairs: list[tuple[BlockResult, BlockResult]]) -> list[tuple[BlockResult,
                                                                          BlockResult]]:
    return [(a, b) for a, b in pairs if a.foreign < NOISY and b.foreign < NOISY]


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _ok(flag: bool, quiet: bool = True) -> str:
    if not quiet:
        return "inconclusive, no quiet pair"
    return "met" if flag else "**missed**"


def render(R: Results) -> str:
    p = R.profile
    m = R.machine
    out: list[str] = []
    w = out.append
    w(f"Run {R.started}, {'quick' if p is QUICK else 'full'} profile, "
      f"{R.wall_s:.0f} s wall.  Machine: {m.get('nproc')} CPUs ({m.get('cpu', '?')}), "
      f"no GPU; load average at start {m['loadavg_start'][0]:.2f}, at end "
      f"{m.get('loadavg_end', (float('nan'),))[0]:.2f}; other llama-server processes "
      f"running at start: {m.get('other_llama_servers', '?')}.  Worker: {m.get('engine')}.  "
      f"modelfleet revision {m.get('revision', '?')}.")
    w("")
    # (a)
    if R.thr:
        w(f"### (a) Aggregate output throughput (max_tokens {p.max_tokens}, ignore_eos, "
          f"non-streaming; direct/gateway blocks interleaved in pairs, {p.block_s:g} s window per "
          "block; at c=1 the two alternate request by request instead)")
        w("")
        w(f"Verdicts use the *quiet* pairs: both blocks of the pair ran while other processes "
          f"used < {NOISY:g} cores on average.  Rates are tokens inside each block's window "
          "(see the script's `window_tokens`).")
        w("")
        w("| concurrency | quiet pairs / all | direct tok/s | gateway tok/s | gateway / direct "
          "(pooled) | per-pair ratios, quiet (median) | all pairs pooled ratio "
          "| gateway CPU ms/req |")
        w("|---:|---:|---:|---:|---:|---|---:|---:|")
        rates: dict[int, tuple[float, float]] = {}
        verdict: list[str] = []
        quiet_levels: set[int] = set()
        for c in p.levels:
            d, g = R.thr.get((c, "direct"), []), R.thr.get((c, "gateway"), [])
            pairs = list(zip(d, g, strict=False))
            if not pairs:
                continue
            qp = quiet_pairs(pairs)
            use = qp or pairs
            rd, rg = _rate([x for x, _ in use]), _rate([y for _, y in use])
            rates[c] = (rd, rg)
            ratios = [_rate([y]) / _rate([x]) for x, y in use if _rate([x])]
            med = statistics.median(ratios) if ratios else float("nan")
            per = ", ".join(f"{r:.2f}" for r in ratios) + f" ({med:.3f})"
            all_ratio = _rate([y for _, y in pairs]) / max(_rate([x for x, _ in pairs]), 1e-9)
            nreq_g = sum(b.requests for b in g)
            cpu = [b.gw_cpu for b in g if b.gw_cpu is not None]
            cpu_ms = f"{sum(cpu) / nreq_g * 1e3:.2f}" if cpu and nreq_g else "-"
            w(f"| {c} | {len(qp)} / {len(pairs)} | {rd:.1f} | {rg:.1f} | {rg / rd:.3f} | {per} "
              f"| {all_ratio:.3f} | {cpu_ms} |")
            verdict.append(f"- c={c}: gateway/direct {rg / rd:.3f} pooled, {med:.3f} median "
                           f"of pairs (target >= 0.95: {_ok(rg / rd >= 0.95, bool(qp))})")
            if qp:
                quiet_levels.add(c)
        w("")
        errs = sum(b.errors for bl in R.thr.values() for b in bl)
        short = sum(b.short for bl in R.thr.values() for b in bl)
        w(f"Errors: {errs}; answers shorter than max_tokens: {short}.")
        w("")
        out.extend(verdict)
        if 1 in rates and 4 in rates:
            for label, idx in (("gateway", 1), ("direct", 0)):
                sc = rates[4][idx] / rates[1][idx]
                ok = _ok(sc >= 1.3, {1, 4} <= quiet_levels)
                w(f"- scaling c=4 vs c=1, {label}: {sc:.2f}x (target >= 1.3: {ok})")
            if 8 in rates:
                w(f"- scaling c=8 vs c=1: gateway {rates[8][1] / rates[1][1]:.2f}x, "
                  f"direct {rates[8][0] / rates[1][0]:.2f}x")
        w("")
        w("<details><summary>Every block</summary>")
        w("")
        w("| # | concurrency | target | requests | tok/s (window) | block s (incl. tail) "
          "| other procs, cores | gateway CPU s | worker CPU s |")
        w("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
        blocks = sorted((b for bl in R.thr.values() for b in bl), key=lambda b: b.started)
        for k, b in enumerate(blocks, 1):
            w(f"| {k} | {b.concurrency} | {b.target} | {b.requests} | {_rate([b]):.1f} | "
              f"{b.elapsed:.1f} | {b.foreign:.2f}{' (noisy)' if b.foreign >= NOISY else ''} | "
              f"{_f(b.gw_cpu)} | {_f(b.wk_cpu)} |")
        w("")
        w("</details>")
        w("")
    # (b)
    if R.lat:
        w("### (b) Added latency (max_tokens 1, non-streaming, auth on; c=1: the two targets "
          "alternate request by request; c=16: interleaved blocks)")
        w("")
        w("Percentiles over the quiet block pairs (all pairs if none was quiet).")
        w("")
        w("| concurrency | quiet pairs / all | n per target | direct p50 ms | gateway p50 ms "
          "| added p50 ms | direct p99 ms | gateway p99 ms | added p99 ms | gateway CPU ms/req "
          "| all pairs: added p50 / p99 ms |")
        w("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        added1 = None
        quiet1 = False
        for c in (1, 16):
            pairs = list(zip(R.lat.get((c, "direct"), []), R.lat.get((c, "gateway"), []),
                             strict=False))
            if not pairs:
                continue
            qp = quiet_pairs(pairs)
            use = qp or pairs
            d = [x for b, _ in use for x in b.latencies]
            g = [x for _, b in use for x in b.latencies]
            da = [x for b, _ in pairs for x in b.latencies]
            ga = [x for _, b in pairs for x in b.latencies]
            if not d or not g:
                continue
            gb = [b for _, b in use]
            cpu = [b.gw_cpu for b in gb if b.gw_cpu is not None]
            nreq = sum(b.requests for b in gb)
            cpu_ms = f"{sum(cpu) / nreq * 1e3:.2f}" if cpu and nreq else "-"
            d50, g50, d99, g99 = pct(d, .5), pct(g, .5), pct(d, .99), pct(g, .99)
            if c == 1:
                added1 = (g50 - d50) * 1e3
                quiet1 = bool(qp)
            w(f"| {c} | {len(qp)} / {len(pairs)} | {len(g)} | {d50 * 1e3:.2f} | {g50 * 1e3:.2f} | "
              f"{(g50 - d50) * 1e3:+.2f} | {d99 * 1e3:.2f} | {g99 * 1e3:.2f} | "
              f"{(g99 - d99) * 1e3:+.2f} | {cpu_ms} | "
              f"{(pct(ga, .5) - pct(da, .5)) * 1e3:+.2f} / "
              f"{(pct(ga, .99) - pct(da, .99)) * 1e3:+.2f} |")
        w("")
        errs = sum(b.errors for bl in R.lat.values() for b in bl)
        w(f"Errors: {errs}.")
        w("")
        if added1 is not None:
            w(f"- added p50 at c=1: {added1:.2f} ms (target <= 2 ms: {_ok(added1 <= 2.0, quiet1)})")
        w("")
    # (c)
    if R.warm_ttft or R.cold:
        w("### (c) Time to first token (streaming, max_tokens 16)")
        w("")
        if R.cold:
            w("| cold run | server start (not in TTFT) s | worker spawn -> healthy s "
              "| cold TTFT ms | warm TTFT, same server, ms | other procs, cores |")
            w("|---:|---:|---:|---:|---:|---:|")
            for i, row in enumerate(R.cold, 1):
                ready = row["worker_ready_s"]
                w(f"| {i} | {row['server_start_s']:.2f} | "
                  f"{'-' if ready is None else f'{ready:.2f}'} | "
                  f"{row['cold_ttft_s'] * 1e3:.0f} | {row['warm_ttft_s'] * 1e3:.1f} | "
                  f"{row['foreign']:.2f}{' (noisy)' if row['foreign'] >= NOISY else ''} |")
            colds = [r["cold_ttft_s"] for r in R.cold]
            w("")
            w(f"- cold TTFT: median {statistics.median(colds) * 1e3:.0f} ms, max "
              f"{max(colds) * 1e3:.0f} ms over {len(colds)} fresh server(s)")
        if R.warm_ttft:
            parts = []
            for name in ("direct", "gateway"):
                xs = R.warm_ttft.get(name)
                if xs:
                    parts.append(f"{name} median {statistics.median(xs) * 1e3:.1f} ms "
                                 f"(n={len(xs)})")
            w(f"- warm TTFT on the main server: {', '.join(parts)}")
        w("")
    w(f"Waited {R.quiet_wait_s:.0f} s in all for other processes to quieten before blocks "
      "(\"other procs\" = CPU used by processes other than this script, the gateway and "
      "the worker during the blocks, in cores out of " f"{m.get('nproc')}).")
    w("")
    if R.notes:
        w("Notes:")
        w("")
        for n in R.notes:
            w(f"- {n}")
        w("")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the results as markdown to this file")
    ap.add_argument("--quick", action="store_true", help="a shorter run (about 1 minute)")
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    R = asyncio.run(main_async(args))
    md = render(R)
    print(md)
    if args.out:
        args.out.write_text(md + "\n")
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
