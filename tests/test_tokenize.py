"""POST /v1/tokenize and /v1/detokenize against the real server (llama-server
with SmolLM2, real SQLite): vLLM's shapes, counts that match chat's usage,
refusals in the error shape, one usage row per request."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import httpx

from tests.conftest import CHAT, Server

TEXT = "Hello world, how are you today? Ünïcödé and emoji 🚀 too."
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name one colour."}]


def post(server: Server, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120,
                      headers={"Authorization": f"Bearer {server.key}"})


def usage_row(server: Server, request_id: str, timeout: float = 10) -> tuple[Any, ...] | None:
    deadline = time.monotonic() + timeout
    while True:
        conn = sqlite3.connect(server.data_dir / "modelfleet.db")
        try:
            rows = conn.execute("SELECT status, model_id, input_tokens, output_tokens FROM usage "
                                "WHERE request_id = ?", (request_id,)).fetchall()
        finally:
            conn.close()
        if rows or time.monotonic() > deadline:
            return rows[0] if rows else None
        time.sleep(0.05)


def test_tokenize_then_detokenize_round_trips(server: Server) -> None:
    resp = post(server, "/v1/tokenize", {"model": "smollm2", "prompt": TEXT})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"count", "max_model_len", "tokens"}
    assert body["count"] == len(body["tokens"]) > 5
    assert body["max_model_len"] == 4096
    assert all(isinstance(t, int) and 0 <= t < 49152 for t in body["tokens"])
    back = post(server, "/v1/detokenize", {"model": CHAT, "tokens": body["tokens"]})
    assert back.status_code == 200, back.text
    assert back.json() == {"prompt": TEXT}
    assert back.headers["x-model-used"] == CHAT


def test_messages_count_matches_chat_usage(server: Server) -> None:
    counted = post(server, "/v1/tokenize", {"model": "smollm2", "messages": MESSAGES,
                                            "add_generation_prompt": True})
    assert counted.status_code == 200, counted.text
    chat = post(server, "/v1/chat/completions", {"model": "smollm2", "messages": MESSAGES,
                                                 "max_tokens": 1})
    assert chat.status_code == 200, chat.text
    assert counted.json()["count"] == chat.json()["usage"]["prompt_tokens"]
    # Without the generation prompt the assistant header is not there: fewer tokens.
    bare = post(server, "/v1/tokenize", {"model": "smollm2", "messages": MESSAGES,
                                         "add_generation_prompt": False})
    assert bare.status_code == 200, bare.text
    assert bare.json()["count"] < counted.json()["count"]


def test_usage_row_per_request(server: Server) -> None:
    resp = post(server, "/v1/tokenize", {"model": "smollm2", "prompt": TEXT})
    assert resp.status_code == 200, resp.text
    row = usage_row(server, resp.headers["x-request-id"])
    assert row == ("succeeded", CHAT, resp.json()["count"], 0)
    tokens = resp.json()["tokens"]
    back = post(server, "/v1/detokenize", {"model": "smollm2", "tokens": tokens})
    assert back.status_code == 200, back.text
    assert usage_row(server, back.headers["x-request-id"]) == ("succeeded", CHAT, len(tokens), 0)


def _error(resp: httpx.Response, status: int, code: str | None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert {"message", "type", "param", "code"} <= set(err)
    assert err["code"] == code
    return dict(err)


def test_unsupported_models_and_bad_input_are_refused(server: Server) -> None:
    for path, body in (("/v1/tokenize", {"model": "minilm", "prompt": "hi"}),
                       ("/v1/detokenize", {"model": "minilm", "tokens": [1, 2]}),
                       ("/v1/tokenize", {"model": "tiny-sd", "prompt": "hi"})):
        resp = post(server, path, body)
        err = _error(resp, 400, "unsupported_endpoint")
        assert err["param"] == "model"
        assert usage_row(server, resp.headers["x-request-id"], timeout=0) is None
    _error(post(server, "/v1/tokenize", {"model": "smollm2", "prompt": "a",
                                         "messages": MESSAGES}), 422, "validation_error")
    _error(post(server, "/v1/tokenize", {"model": "smollm2"}), 422, "validation_error")
    _error(post(server, "/v1/tokenize", {"model": "smollm2", "prompt": "a", "stream": True}),
           422, "validation_error")
    err = _error(post(server, "/v1/detokenize", {"model": "smollm2", "tokens": [1, 49152]}),
                 400, "invalid_token")
    assert err["param"] == "tokens"
    _error(post(server, "/v1/detokenize", {"model": "smollm2", "tokens": [-1]}),
           422, "validation_error")
    # A base model has no chat template: messages are refused, a prompt is fine.
    err = _error(post(server, "/v1/tokenize", {"model": "gemma3-270m", "messages": MESSAGES}),
                 400, "invalid_request")
    assert err["param"] == "messages"


def test_catalog_lists_the_token_endpoints(server: Server) -> None:
    catalog = httpx.get(server.url + "/v1/inference/models", timeout=10).json()
    by_id = {m["model"]: m for group in ("text", "embedding", "image") for m in catalog[group]}
    assert "/v1/tokenize" in by_id[CHAT]["endpoints"]
    assert "/v1/detokenize" in by_id["google/gemma-3-270m"]["endpoints"]
    assert "/v1/tokenize" not in by_id["sentence-transformers/all-MiniLM-L6-v2"]["endpoints"]
