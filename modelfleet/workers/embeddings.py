"""modelfleet's embedding worker: one sentence-transformers model behind an
OpenAI-compatible ``POST /v1/embeddings``.

    python -m modelfleet.workers.embeddings --model-dir DIR --port P [--parent-pid PID]

The model is loaded before the port opens, so a worker that answers
``/health`` is ready to embed.  Concurrent requests are merged: a single
batcher takes whatever is pending, up to ``--max-batch`` inputs, into one
forward pass on one dedicated thread.  A pass costs much less per input than
one pass per request, and the event loop stays free to parse and answer.

Every input is checked before it is queued (type, emptiness, length in tokens),
so a bad request is refused whole with a 400 and never takes a place in a batch,
and nothing is ever truncated silently.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import orjson
from aiohttp import web

from modelfleet.workers.common import (
    error_response,
    exit_now,
    json_app,
    json_response,
    run_app,
    serving_args,
)

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger("modelfleet.workers.embeddings")

Vectors = npt.NDArray[np.float32]
# One input as the batcher sees it: a text, or token ids exactly as the model takes them.
Input = str | list[int]

MAX_INPUTS = 2048  # per request, as the OpenAI API; the platform's per-model limit is lower
MAX_BODY = 64 << 20  # 2048 long inputs as JSON, with room to spare
TOKENIZE_OFF_LOOP_CHARS = 20_000  # counting this much text takes milliseconds: do it on a thread
INPUT_TYPES = "a string, an array of strings, an array of token ids or an array of token-id arrays"


class BadRequest(Exception):
    """A request refused with a 400 in the OpenAI error shape."""

    def __init__(self, message: str, param: str | None = "input", code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class Encoder:
    """The model, and what the worker needs to know about it.  ``encode`` runs on
    the batcher's thread; the rest is cheap and runs on the event loop."""

    def __init__(self, model: SentenceTransformer) -> None:
        self.model = model.eval()
        self.tokenizer: Any = model.tokenizer
        self.dimension = int(model.get_embedding_dimension() or 0)
        self.max_seq_length = int(model.max_seq_length or self.tokenizer.model_max_length)
        self.vocab_size = len(self.tokenizer)
        self.cls_id = int(self.tokenizer.cls_token_id)
        self.sep_id = int(self.tokenizer.sep_token_id)
        self.pad_id = int(self.tokenizer.pad_token_id or 0)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens the model sees for each text, special tokens included, untruncated."""
        ids = self.tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)
        return [len(row) for row in ids["input_ids"]]

    def wrap_ids(self, ids: list[int], index: int) -> list[int]:
        """Token ids as the model takes them: with CLS first and SEP last, as
        tokenizing the decoded text would give."""
        for token in ids:
            if not 0 <= token < self.vocab_size:
                raise BadRequest(f"input[{index}] has token id {token}, outside this model's vocabulary "
                                 f"(0 to {self.vocab_size - 1})", code="invalid_token_id")
        body = ids[1:] if ids[0] == self.cls_id else ids
        body = body[:-1] if body and body[-1] == self.sep_id else body
        return [self.cls_id, *body, self.sep_id]

    def encode(self, inputs: Sequence[Input]) -> Vectors:
        """Embed a batch; texts and token arrays each take one forward pass."""
        out = np.empty((len(inputs), self.dimension), dtype=np.float32)
        texts: list[str] = []
        text_rows: list[int] = []
        token_arrays: list[list[int]] = []
        token_rows: list[int] = []
        for row, item in enumerate(inputs):
            if isinstance(item, str):
                texts.append(item)
                text_rows.append(row)
            else:
                token_arrays.append(item)
                token_rows.append(row)
        if texts:
            out[text_rows] = np.asarray(self.model.encode(
                texts, batch_size=len(texts), convert_to_numpy=True,
                normalize_embeddings=False, show_progress_bar=False,
            ))
        if token_arrays:
            out[token_rows] = self._encode_ids(token_arrays)
        return out

    def _encode_ids(self, rows: list[list[int]]) -> Vectors:
        """Run the model's modules on given token ids: the same features its own
        tokenizer makes (padded, with an attention mask), so padding never
        changes a vector."""
        import torch

        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            input_ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention[index, : len(row)] = 1
        features = {"input_ids": input_ids, "attention_mask": attention,
                    "token_type_ids": torch.zeros_like(input_ids)}
        with torch.inference_mode():
            embedding = self.model(features)["sentence_embedding"]
        return np.asarray(embedding.float().cpu().numpy(), dtype=np.float32)


@dataclass
class Stats:
    requests: int = 0
    inputs: int = 0
    batches: int = 0
    max_batch_seen: int = 0


@dataclass
class _Job:
    inputs: list[Input]
    future: asyncio.Future[Vectors]


class Batcher:
    """Continuous batching: while one pass runs, requests queue up; the next
    pass takes all of them that fit in ``max_batch`` inputs.  A lone request
    never waits for company, and a request larger than ``max_batch`` is split
    into several passes."""

    def __init__(self, encode: Callable[[list[Input]], Vectors], max_batch: int) -> None:
        self.encode = encode
        self.max_batch = max_batch
        self.stats = Stats()
        self._pending: deque[_Job] = deque()
        self._wakeup = asyncio.Event()
        # One thread: passes run one at a time, each with all of torch's threads.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="embedding-batcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for job in self._pending:
            job.future.cancel()
        self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def embed(self, inputs: list[Input]) -> Vectors:
        loop = asyncio.get_running_loop()
        jobs = [_Job(inputs[start:start + self.max_batch], loop.create_future())
                for start in range(0, len(inputs), self.max_batch)]
        self._pending.extend(jobs)
        self._wakeup.set()
        # If the caller is cancelled, gather cancels the futures and _take skips them.
        parts = await asyncio.gather(*(job.future for job in jobs))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _take(self) -> list[_Job]:
        batch: list[_Job] = []
        size = 0
        while self._pending:
            job = self._pending[0]
            if job.future.done():  # its request went away
                self._pending.popleft()
                continue
            if batch and size + len(job.inputs) > self.max_batch:
                break
            batch.append(self._pending.popleft())
            size += len(job.inputs)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while batch := self._take():
                inputs = [item for job in batch for item in job.inputs]
                try:
                    vectors = await loop.run_in_executor(self._executor, self.encode, inputs)
                except Exception as exc:
                    log.exception("encoding a batch of %d inputs failed", len(inputs))
                    for job in batch:
                        if not job.future.done():
                            job.future.set_exception(exc)
                    continue
                self.stats.batches += 1
                self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(inputs))
                offset = 0
                for job in batch:
                    if not job.future.done():
                        job.future.set_result(vectors[offset:offset + len(job.inputs)])
                    offset += len(job.inputs)


@dataclass
class EmbeddingRequest:
    inputs: list[Input]
    prompt_tokens: int
    base64: bool


def _is_token(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_input(value: object) -> list[Input]:
    """The request's ``input`` as a list of texts, or a list of token arrays."""
    if isinstance(value, str):
        if not value:
            raise BadRequest("'input' is an empty string")
        return [value]
    if not isinstance(value, list):
        raise BadRequest(f"'input' must be {INPUT_TYPES}")
    if not value:
        raise BadRequest("'input' is an empty array")
    if all(_is_token(item) for item in value):
        return [value]
    if len(value) > MAX_INPUTS:
        raise BadRequest(f"'input' has {len(value)} items; at most {MAX_INPUTS} are allowed")
    texts = isinstance(value[0], str)
    for index, item in enumerate(value):
        if texts and not isinstance(item, str):
            raise BadRequest(f"input[{index}] is not a string (an array of inputs is all strings "
                             "or all token arrays)")
        if not texts and not (isinstance(item, list) and all(_is_token(token) for token in item)):
            raise BadRequest(f"input[{index}] is not an array of token ids: 'input' must be {INPUT_TYPES}")
        if not item:
            raise BadRequest(f"input[{index}] is empty")
    return value


class EmbeddingWorker:
    """The HTTP side: check a request, queue its inputs, answer in OpenAI's shape.
    ``/stats`` counts the requests that passed the checks and were embedded."""

    def __init__(self, encoder: Encoder, *, name: str, max_batch: int, max_input_tokens: int) -> None:
        self.encoder = encoder
        self.name = name
        self.max_input_tokens = max_input_tokens
        self.batcher = Batcher(encoder.encode, max_batch)

    @property
    def stats(self) -> Stats:
        return self.batcher.stats

    async def parse(self, body: object) -> EmbeddingRequest:
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object", param=None)
        if "input" not in body:
            raise BadRequest("'input' is required")
        if not isinstance(body.get("model", ""), str):
            raise BadRequest("'model' must be a string", param="model")
        encoding = body.get("encoding_format")
        encoding = "float" if encoding is None else encoding
        if encoding not in ("float", "base64"):
            raise BadRequest(f"'encoding_format' must be 'float' or 'base64', not {encoding!r}",
                             param="encoding_format")
        dimensions = body.get("dimensions")
        if dimensions is not None and (not _is_token(dimensions) or dimensions != self.encoder.dimension):
            raise BadRequest(f"this model makes {self.encoder.dimension}-dimensional embeddings: "
                             f"'dimensions' must be {self.encoder.dimension} or left out",
                             param="dimensions")
        items = parse_input(body["input"])
        inputs: list[Input]
        texts = [item for item in items if isinstance(item, str)]
        if texts:
            if sum(map(len, texts)) > TOKENIZE_OFF_LOOP_CHARS:
                counts = await asyncio.to_thread(self.encoder.count_tokens, texts)
            else:
                counts = self.encoder.count_tokens(texts)
            inputs = list(texts)
        else:
            inputs = [self.encoder.wrap_ids(ids, index)
                      for index, ids in enumerate(items) if not isinstance(ids, str)]
            counts = [len(ids) for ids in inputs]
        for index, count in enumerate(counts):
            if count > self.max_input_tokens:
                raise BadRequest(f"input[{index}] is {count} tokens; this model takes at most "
                                 f"{self.max_input_tokens}", code="input_too_long")
        return EmbeddingRequest(inputs, sum(counts), encoding == "base64")

    async def embeddings(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return error_response(400, f"the request body is not valid JSON: {exc}")
        try:
            parsed = await self.parse(body)
        except BadRequest as exc:
            return error_response(400, exc.message, exc.param, exc.code)
        self.stats.requests += 1
        self.stats.inputs += len(parsed.inputs)
        try:
            vectors = await self.batcher.embed(parsed.inputs)
        except Exception as exc:
            return error_response(500, f"embedding failed: {type(exc).__name__}: {exc}")
        embeddings: list[Any]
        if parsed.base64:
            little = vectors.astype("<f4", copy=False)
            embeddings = [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
        else:
            # float64 holds each float32 exactly and prints as the Python float of it.
            embeddings = list(vectors.astype(np.float64))
        return json_response({
            "object": "list",
            "data": [{"object": "embedding", "index": index, "embedding": embedding}
                     for index, embedding in enumerate(embeddings)],
            "model": self.name,
            "usage": {"prompt_tokens": parsed.prompt_tokens, "total_tokens": parsed.prompt_tokens},
        })

    async def health(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        return json_response({"object": "list", "data": [
            {"id": self.name, "object": "model", "owned_by": "modelfleet"}]})

    async def stats_view(self, request: web.Request) -> web.Response:
        stats = self.stats
        return json_response({"requests": stats.requests, "inputs": stats.inputs,
                              "batches": stats.batches, "max_batch_seen": stats.max_batch_seen})

    def app(self) -> web.Application:
        app = json_app(MAX_BODY, {"/health": self.health, "/v1/models": self.models,
                                  "/stats": self.stats_view},
                       {"/v1/embeddings": self.embeddings})

        async def batcher_life(app: web.Application) -> Any:
            self.batcher.start()
            yield
            await self.batcher.close()

        app.cleanup_ctx.append(batcher_life)
        return app


def load_model(model_dir: Path, threads: int) -> SentenceTransformer:
    """Load from the folder only: the worker never downloads anything."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    started = time.perf_counter()
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    imported = time.perf_counter()
    model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    model.encode(["warm up"], show_progress_bar=False)  # the first pass pays one-time setup
    log.info("model loaded from %s in %.2fs (imports %.2fs, load and warm-up %.2fs)", model_dir,
             time.perf_counter() - started, imported - started, time.perf_counter() - imported)
    return model


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m modelfleet.workers.embeddings",
                                     description="modelfleet's embedding worker")
    parser.add_argument("--model-dir", type=Path, required=True)
    serving_args(parser, "the folder's name")
    parser.add_argument("--max-batch", type=int, default=64, help="most inputs in one forward pass")
    parser.add_argument("--max-input-tokens", type=int,
                        help="longest input, in tokens (default: the model's max_seq_length)")
    args = parser.parse_args(argv)
    if not args.model_dir.is_dir():
        parser.error(f"--model-dir {args.model_dir} is not a folder")
    for name in ("threads", "max_batch", "max_input_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    encoder = Encoder(load_model(args.model_dir, args.threads))
    max_input_tokens = args.max_input_tokens or encoder.max_seq_length
    if max_input_tokens > encoder.max_seq_length:
        # Longer inputs would be truncated silently by the model.
        sys.exit(f"--max-input-tokens {max_input_tokens} is more than the model's "
                 f"max_seq_length {encoder.max_seq_length}")
    worker = EmbeddingWorker(encoder, name=args.model_name or args.model_dir.resolve().name,
                             max_batch=args.max_batch, max_input_tokens=max_input_tokens)
    asyncio.run(run_app(worker.app(), args.host, args.port, args.parent_pid))


if __name__ == "__main__":
    main()
    exit_now()
