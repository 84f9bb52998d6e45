"""What rate limits and billing add to a request.

Two modelfleet servers on loopback, identical but for MODELFLEET_METERING
(on: token buckets, hold, settlement, usage record + ledger entry; off: none
of it; auth is on in both).  The same non-streaming request (max_tokens 1) is
sent to each in alternating blocks, so machine noise hits both alike; the
difference of the medians is the cost of metering.  A second measurement
times admit + settle in process, without HTTP or a model.

    .venv/bin/python bench/metering.py [--requests 400] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BODY = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, metering: bool) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="mf-bench-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "MODELFLEET_METERING": "on" if metering else "off"}
        self.out = Path(self.tmp.name) / "out"
        with open(self.out, "wb") as out, open(Path(self.tmp.name) / "err", "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "modelfleet", "serve", "--port", str(self.port),
                 "--data-dir", str(Path(self.tmp.name) / "data"), "--log-level", "warning"],
                stdout=out, stderr=err, env=env, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.1)
        self.key = self.out.read_text().split()[0]

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)
        self.tmp.cleanup()


async def block(client: httpx.AsyncClient, server: Server, n: int, conc: int) -> list[float]:
    """``n`` timed requests at concurrency ``conc``, after a few untimed ones: the
    first requests after switching servers pay for waking the other worker's
    threads (seconds, on both sides alike), which is not what is measured here."""
    out: list[float] = []
    sem = asyncio.Semaphore(conc)
    headers = {"Authorization": f"Bearer {server.key}"}
    for _ in range(3):
        await client.post(server.url + "/v1/chat/completions", json=BODY, headers=headers)

    async def one() -> None:
        async with sem:
            t = time.perf_counter()
            r = await client.post(server.url + "/v1/chat/completions", json=BODY, headers=headers)
            out.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text

    await asyncio.gather(*(one() for _ in range(n)))
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def http_bench(on: Server, off: Server, total: int, conc: int) -> dict[str, list[float]]:
    res: dict[str, list[float]] = {"on": [], "off": []}
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as client:
        for server in (on, off):  # warm: worker started, connections open
            await block(client, server, 20, conc)
        blocks = 8
        for _ in range(blocks):
            for name, server in (("on", on), ("off", off)):
                res[name] += await block(client, server, total // blocks, conc)
    return res


def admit_settle_bench(n: int = 20000) -> float:
    """Microseconds for metering.admit + ticket.settle, in process."""
    from modelfleet.catalog import load_catalog
    from modelfleet.db import Database
    from modelfleet.keys import Principal
    from modelfleet.ledger import Ledger
    from modelfleet.limits import RateLimiter
    from modelfleet.metering import Metering
    from modelfleet.projects import PlanLimits, ProjectService

    catalog = load_catalog()
    spec = catalog.resolve("smollm2")
    assert spec is not None
    db = Database("sqlite+aiosqlite:///:memory:")
    ledger = Ledger(db)
    ledger._balance["p"] = 10**15
    projects = ProjectService(db, catalog)
    # every limit checked, none reached
    projects._plans["default"] = PlanLimits("bench", key_rpm=10**9, key_tpm=10**12,
                                            key_concurrency=10**6, project_rpm=10**9,
                                            project_tpm=10**12, project_concurrency=10**6)
    metering = Metering(projects, RateLimiter(), ledger)
    principal = Principal("k", "p", "p", frozenset({"inference"}), None)
    payload = {"messages": BODY["messages"], "max_tokens": 1}
    usage = {"prompt_tokens": 30, "completion_tokens": 1}
    t = time.perf_counter()
    for i in range(n):
        ticket = metering.admit(principal, spec, payload, 1)
        ticket.settle(request_id=str(i), status="succeeded", usage=usage, wait_s=0.0, run_s=0.01)
        ledger._pending.clear()  # the writer's work is measured by the HTTP benchmark
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--out")
    args = ap.parse_args()
    micro = admit_settle_bench()
    on, off = Server(True), Server(False)
    try:
        lines = ["| concurrency | metering | requests | p50 ms | p99 ms |", "|---|---|---|---|---|"]
        deltas = {}
        for conc in (1, 8):
            res = asyncio.run(http_bench(on, off, args.requests, conc))
            for name in ("off", "on"):
                lines.append(f"| {conc} | {name} | {len(res[name])} | {pct(res[name], .5):.2f} | "
                             f"{pct(res[name], .99):.2f} |")
            deltas[conc] = pct(res["on"], .5) - pct(res["off"], .5)
            print(f"c={conc}: p50 on {pct(res['on'], .5):.2f} ms, off {pct(res['off'], .5):.2f} ms, "
                  f"added {deltas[conc]:+.2f} ms", flush=True)
    finally:
        on.stop()
        off.stop()
    text = "\n".join([
        f"In-process admit + settle: {micro:.1f} µs per request.",
        "",
        *lines,
        "",
        *(f"Added p50 at concurrency {c}: {d:+.2f} ms (target: at most 1 ms)"
          for c, d in deltas.items()),
    ])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print("median of the two medians stdev check:", statistics.mean(deltas.values()))


if __name__ == "__main__":
    main()
