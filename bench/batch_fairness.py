"""Batches beside interactive traffic: does a running batch delay chat requests?

One modelfleet server, the embedded chat model (8 slots), two projects:

1. idle:  B alone sends one chat request per second;
2. mixed: A's batch of ``--lines`` chat lines runs (``--batch-concurrency``
   lines in flight, more than the model has slots) while B again sends one
   request per second.

Waits are the queue waits the server records per request (usage.wait_ms).
The bar (issue 14): B's median wait in (2) within 2x its median wait in (1)
plus one service time (B's median run time in (1)).  Also reported: the
batch's throughput with B beside it and alone (after B stops).

    .venv/bin/python bench/batch_fairness.py [--lines 300] [--max-tokens 16] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fairness import MODEL, create_key, emit, fairness_bar, send, topup, trickle, usage
from metering import Server  # the same server harness


def batch_file(lines: int, max_tokens: int) -> bytes:
    return b"\n".join(orjson.dumps({
        "custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": MODEL, "max_tokens": max_tokens, "metadata": {"ignore_eos": True},
                 "messages": [{"role": "user", "content": f"Story {i}."}]}})
        for i in range(lines)) + b"\n"


async def completed(client: httpx.AsyncClient, url: str, key: str, batch_id: str) -> dict:
    resp = await client.get(f"{url}/v1/batches/{batch_id}",
                            headers={"Authorization": f"Bearer {key}"})
    return resp.json()  # type: ignore[no-any-return]


async def poll(client: httpx.AsyncClient, url: str, key: str, batch_id: str,
               until: Callable[[dict], bool]) -> dict:
    """The batch, once ``until`` holds for it (read every 0.2 s)."""
    while True:
        state = await completed(client, url, key, batch_id)
        if until(state):
            return state
        await asyncio.sleep(0.2)


async def run(args: argparse.Namespace) -> str:
    os.environ["MODELFLEET_BATCH_CONCURRENCY"] = str(args.batch_concurrency)
    server = Server(True)
    data = Path(server.tmp.name) / "data"
    try:
        key_a, key_b = create_key(data, "batch-a"), create_key(data, "steady-b")
        topup(data, "batch-a")
        topup(data, "steady-b")
        db = data / "modelfleet.db"
        async with httpx.AsyncClient(timeout=600) as client:
            await send(client, server.url, key_b, args.max_tokens, -1)  # warm the model
            idle_ids = await trickle(client, server.url, key_b, args.max_tokens,
                                     asyncio.Event(), args.probes)
            auth = {"Authorization": f"Bearer {key_a}"}
            uploaded = (await client.post(server.url + "/v1/files", headers=auth,
                                          data={"purpose": "batch"},
                                          files={"file": ("b.jsonl", batch_file(
                                              args.lines, args.max_tokens))})).json()
            batch = (await client.post(server.url + "/v1/batches", headers=auth, json={
                "input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions",
                "completion_window": "24h"})).json()
            started = time.perf_counter()
            await poll(client, server.url, key_a, batch["id"],  # the batch fills its slots
                       lambda b: b["request_counts"]["completed"] >= args.batch_concurrency)
            stop = asyncio.Event()
            b_task = asyncio.create_task(trickle(client, server.url, key_b, args.max_tokens,
                                                 stop, args.mixed_probes))
            mixed_ids = await b_task
            mixed_done_at = time.perf_counter()
            state = await completed(client, server.url, key_a, batch["id"])
            during = state["request_counts"]["completed"]
            t_during = mixed_done_at - started
            state = await poll(client, server.url, key_a, batch["id"], lambda b: b["status"] in (
                "completed", "failed", "expired", "cancelled"))
            t_total = time.perf_counter() - started
        idle = usage(db, idle_ids)
        mixed = usage(db, mixed_ids)
    finally:
        server.stop()
    bar = fairness_bar(idle, mixed)
    b_idle_wait, b_service, b_mixed_wait, bound = (
        bar["idle_wait"], bar["service"], bar["mixed_wait"], bar["bound"])
    b_mixed_p95 = sorted(w for w, _ in mixed)[int(0.95 * (len(mixed) - 1))]
    b_mixed_run = statistics.median(r for _, r in mixed)
    after = args.lines - during
    rate_during = during / t_during
    rate_after = after / max(t_total - t_during, 1e-9) if after else float("nan")
    lines = [
        f"A's batch: {args.lines} chat lines (max_tokens {args.max_tokens}), "
        f"{args.batch_concurrency} lines in flight at most, on a model with 8 slots per "
        f"replica; B sends one chat request per second.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| B median wait, idle system ({len(idle)} requests) | {b_idle_wait:.0f} ms |",
        f"| B median service time, idle system | {b_service:.0f} ms |",
        f"| B median wait while the batch runs ({len(mixed)} requests) | {b_mixed_wait:.0f} ms |",
        f"| B p95 wait while the batch runs | {b_mixed_p95:.0f} ms |",
        f"| B median service time while the batch runs | {b_mixed_run:.0f} ms |",
        f"| bound: 2 x idle wait + one service time | {bound:.0f} ms |",
        f"| batch lines/s with B beside it | {rate_during:.2f} ({during} lines) |",
        f"| batch lines/s after B stopped | {rate_after:.2f} ({after} lines) |",
        f"| batch status | {state['status']}, {state['request_counts']} |",
        "",
        f"- B's median wait: {b_mixed_wait:.0f} ms vs bound {bound:.0f} ms: "
        f"{'met' if b_mixed_wait <= bound else '**missed**'}",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--batch-concurrency", type=int, default=16)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--mixed-probes", type=int, default=15)
    ap.add_argument("--out")
    args = ap.parse_args()
    emit(asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()
