"""Fairness under a flood: does one project's backlog delay another's requests?

One modelfleet server, the embedded chat model (8 slots), two projects:

1. idle:  B alone sends one request per second;
2. alone: A alone floods 200 requests at once;
3. mixed: A floods 200 again while B sends one request per second.

Waits are the queue waits the server records per request (usage.wait_ms).
Targets (issue 4): B's median wait in (3) within 2x its median wait in (1)
plus one request's service time (B's median run time in (1)); A's throughput
in (3) at least 90% of (2).

    .venv/bin/python bench/fairness.py [--flood 200] [--max-tokens 16] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metering import Server  # the same server harness

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def create_key(data_dir: Path, project: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "modelfleet", "keys", "create", "--project", project,
         "--data-dir", str(data_dir)], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def topup(data_dir: Path, project: str) -> None:
    subprocess.run([sys.executable, "-m", "modelfleet", "credits", "topup", "--project", project,
                    "--amount", "1000000000", "--data-dir", str(data_dir)],
                   check=True, capture_output=True, text=True)


VARY = False  # --vary: A's lengths spread over max_tokens/2 .. 3*max_tokens/2


async def send(client: httpx.AsyncClient, url: str, key: str, max_tokens: int, i: int) -> str:
    if VARY and i >= 0 and i < 10_000:
        max_tokens = max(1, max_tokens // 2 + (i * 7919) % (max_tokens + 1))
    resp = await client.post(url + "/v1/chat/completions",
                             headers={"Authorization": f"Bearer {key}"},
                             json={"model": MODEL, "max_tokens": max_tokens,
                                   "metadata": {"ignore_eos": True},
                                   "messages": [{"role": "user", "content": f"Story {i}."}]})
    assert resp.status_code == 200, resp.text
    return resp.headers["x-request-id"]


async def trickle(client: httpx.AsyncClient, url: str, key: str, max_tokens: int,
                  stop: asyncio.Event, limit: int) -> list[str]:
    ids: list[str] = []
    tasks = []
    while not stop.is_set() and len(tasks) < limit:
        tasks.append(asyncio.create_task(send(client, url, key, max_tokens, 10_000 + len(tasks))))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
    ids = list(await asyncio.gather(*tasks))
    return ids


async def flood(client: httpx.AsyncClient, url: str, key: str, n: int,
                max_tokens: int) -> tuple[list[str], float]:
    started = time.perf_counter()
    ids = await asyncio.gather(*(send(client, url, key, max_tokens, i) for i in range(n)))
    return list(ids), time.perf_counter() - started


def usage(db: Path, ids: list[str]) -> list[tuple[int, int]]:
    deadline = time.monotonic() + 10
    while True:
        conn = sqlite3.connect(db)
        marks = ",".join("?" * len(ids))
        rows = conn.execute(f"SELECT wait_ms, run_ms FROM usage WHERE request_id IN ({marks})",
                            ids).fetchall()
        conn.close()
        if len(rows) == len(ids) or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def medians(rows: list[tuple[int, int]]) -> tuple[float, float]:
    """(median wait, median run time) in ms of usage rows (wait_ms, run_ms)."""
    return statistics.median(w for w, _ in rows), statistics.median(r for _, r in rows)


def fairness_bar(idle: list[tuple[int, int]], mixed: list[tuple[int, int]]) -> dict[str, float]:
    """B's waits and the bar: its median wait beside the other load within 2x
    its idle median wait plus one idle service time."""
    idle_wait, service = medians(idle)
    return {"idle_wait": idle_wait, "service": service, "mixed_wait": medians(mixed)[0],
            "bound": 2 * idle_wait + service}


def emit(text: str, out: str | None) -> None:
    print(text)
    if out:
        Path(out).write_text(text + "\n")


async def run(args: argparse.Namespace) -> str:
    server = Server(True)
    data = Path(server.tmp.name) / "data"
    try:
        key_a, key_b = create_key(data, "flood-a"), create_key(data, "steady-b")
        topup(data, "flood-a")
        topup(data, "steady-b")
        db = data / "modelfleet.db"
        limits = httpx.Limits(max_connections=args.flood + 20)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            await send(client, server.url, key_b, args.max_tokens, -1)  # warm the model
            never = asyncio.Event()
            idle_ids = await trickle(client, server.url, key_b, args.max_tokens, never, args.probes)
            _, t_alone = await flood(client, server.url, key_a, args.flood, args.max_tokens)
            stop = asyncio.Event()
            b_task = asyncio.create_task(
                trickle(client, server.url, key_b, args.max_tokens, stop, 10_000))
            a_mixed, t_mixed = await flood(client, server.url, key_a, args.flood, args.max_tokens)
            stop.set()
            mixed_ids = await b_task
        idle = usage(db, idle_ids)
        mixed = usage(db, mixed_ids)
        a_rows = usage(db, a_mixed)
    finally:
        server.stop()
    bar = fairness_bar(idle, mixed)
    b_idle_wait, b_service, b_mixed_wait, bound = (
        bar["idle_wait"], bar["service"], bar["mixed_wait"], bar["bound"])
    tput_alone, tput_mixed = args.flood / t_alone, args.flood / t_mixed
    a_wait, a_service = medians(a_rows)
    loaded_bound = 2 * b_idle_wait + a_service
    lines = [
        f"A floods {args.flood} requests (max_tokens {args.max_tokens}"
        f"{', lengths varied 0.5x-1.5x' if VARY else ', all the same length'}, 8 slots); "
        f"B sends one request per second.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| B median wait, idle system ({len(idle)} requests) | {b_idle_wait:.0f} ms |",
        f"| B median service time, idle system | {b_service:.0f} ms |",
        f"| B median wait during A's flood ({len(mixed)} requests) | {b_mixed_wait:.0f} ms |",
        f"| bound: 2 x idle wait + one service time | {bound:.0f} ms |",
        f"| A median wait during its flood | {a_wait:.0f} ms |",
        f"| A median service time during its flood (8 in a batch) | {a_service:.0f} ms |",
        f"| bound with the service time under load | {loaded_bound:.0f} ms |",
        f"| A throughput alone | {tput_alone:.2f} req/s ({t_alone:.1f} s) |",
        f"| A throughput with B | {tput_mixed:.2f} req/s ({t_mixed:.1f} s) |",
        "",
        f"- B's wait: {b_mixed_wait:.0f} ms vs bound {bound:.0f} ms (idle service time): "
        f"{'met' if b_mixed_wait <= bound else '**missed**'}; vs {loaded_bound:.0f} ms "
        f"(service time under load): {'met' if b_mixed_wait <= loaded_bound else '**missed**'}",
        f"- A's throughput with B: {tput_mixed / tput_alone:.1%} of alone (target >= 90%): "
        f"{'met' if tput_mixed >= 0.9 * tput_alone else '**missed**'}",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flood", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--vary", action="store_true", help="vary A's request lengths")
    ap.add_argument("--out")
    args = ap.parse_args()
    global VARY
    VARY = args.vary
    emit(asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()
