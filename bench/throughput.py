"""Throughput through modelfleet vs straight to its worker, in long windows.

bench/spine.py measures 1, 4 and 8 concurrent requests in 4-second blocks;
at concurrency 1 such a block holds only ~7 requests, so its ratio is noisy.
This script measures one concurrency level with long alternating blocks
(default: 4 blocks of 15 s per side), counting completed tokens.

    .venv/bin/python bench/throughput.py [--concurrency 1] [--block-s 15] [--blocks 4]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metering import Server  # the same server harness

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
MAX_TOKENS = 64


async def block(client: httpx.AsyncClient, url: str, headers: dict[str, str], body: dict,
                conc: int, seconds: float) -> float:
    """Output tokens per second over ``seconds`` (requests started inside it)."""
    tokens = 0
    end = time.perf_counter() + seconds
    start = time.perf_counter()

    async def worker() -> None:
        nonlocal tokens
        while time.perf_counter() < end:
            r = await client.post(url, json=body, headers=headers)
            assert r.status_code == 200, r.text
            tokens += r.json()["usage"]["completion_tokens"]

    await asyncio.gather(*(worker() for _ in range(conc)))
    return tokens / (time.perf_counter() - start)


def admin_key(server: Server) -> str:
    return subprocess.run(
        [sys.executable, "-m", "modelfleet", "keys", "create", "--project", "ops",
         "--scope", "admin", "--data-dir", str(Path(server.tmp.name) / "data")],
        check=True, capture_output=True, text=True).stdout.strip()


async def run(args: argparse.Namespace, server: Server, admin: str) -> str:
    try:
        gw_headers = {"Authorization": f"Bearer {server.key}"}
        msg = [{"role": "user", "content": "Tell a story."}]
        gw_body = {"model": MODEL, "messages": msg, "max_tokens": MAX_TOKENS,
                   "metadata": {"ignore_eos": True}}
        direct_body = {"model": MODEL, "messages": msg, "max_tokens": MAX_TOKENS,
                       "ignore_eos": True}
        async with httpx.AsyncClient(timeout=120) as client:
            await client.post(server.url + "/v1/chat/completions", json=gw_body,
                              headers=gw_headers)
            reps = (await client.get(server.url + "/v1/admin/replicas",
                                     headers={"Authorization": f"Bearer {admin}"})).json()
            worker = reps["replicas"][0]["url"] + "/v1/chat/completions"
            rates: dict[str, list[float]] = {"direct": [], "gateway": []}
            for i in range(args.blocks):
                order = ("direct", "gateway") if i % 2 == 0 else ("gateway", "direct")
                for name in order:
                    url, headers, body = ((worker, {}, direct_body) if name == "direct" else
                                          (server.url + "/v1/chat/completions", gw_headers,
                                           gw_body))
                    rate = await block(client, url, headers, body, args.concurrency,
                                       args.block_s)
                    rates[name].append(rate)
                    print(f"block {i + 1} {name:7s} {rate:6.1f} tok/s", flush=True)
    finally:
        server.stop()
    d, g = statistics.mean(rates["direct"]), statistics.mean(rates["gateway"])
    pairs = [gr / dr for gr, dr in zip(rates["gateway"], rates["direct"], strict=True)]
    return (f"concurrency {args.concurrency}, {args.blocks} x {args.block_s:g} s blocks per "
            f"side, max_tokens {MAX_TOKENS}: direct {d:.1f} tok/s, gateway {g:.1f} tok/s, "
            f"ratio {g / d:.3f} (per pair: {', '.join(f'{p:.3f}' for p in pairs)})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--block-s", type=float, default=15.0)
    ap.add_argument("--blocks", type=int, default=4)
    args = ap.parse_args()
    server = Server(True)
    print(asyncio.run(run(args, server, admin_key(server))))


if __name__ == "__main__":
    main()
