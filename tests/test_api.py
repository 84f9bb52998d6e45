"""The API in process (httpx.ASGITransport): auth, validation, errors, catalog.

None of these requests reaches a worker: each fails or is answered before
dispatch, so no model process starts here.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import CHAT, Actors

CHAT_URL = "/v1/chat/completions"


def chat_body(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}
    body.update(over)
    return body


def assert_error(resp: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "code", "param", "status"}
    assert err["status"] == status
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code
    assert resp.headers["x-request-id"]
    return err


async def test_error_shape_is_pinned(app: Actors) -> None:
    resp = await app.client.post(CHAT_URL, json=chat_body())
    assert resp.json() == {
        "error": {
            "message": "missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
            "type": "authentication_error",
            "code": "missing_api_key",
            "param": None,
            "status": 401,
        }
    }


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer nope"}, "invalid_api_key"),
        ({"Authorization": "Bearer mf-" + "A" * 43}, "invalid_api_key"),
        ({"x-api-key": "mf-" + "B" * 43}, "invalid_api_key"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "invalid_api_key"),
    ],
)
async def test_bad_keys_are_401(app: Actors, headers: dict[str, str], code: str) -> None:
    resp = await app.client.post(CHAT_URL, json=chat_body(), headers=headers)
    assert_error(resp, 401, code)


async def test_revoked_key_is_401_on_next_request(app: Actors) -> None:
    key = await app.services.keys.create("tenant", ["inference"])
    headers = {"x-api-key": key.key}
    ok = await app.client.get("/v1/models", headers=headers)
    assert ok.status_code == 200
    await app.services.keys.revoke(key.key_id)
    resp = await app.client.get("/v1/models", headers=headers)
    assert_error(resp, 401, "revoked_api_key")


async def test_expired_key_is_401(app: Actors) -> None:
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    from modelfleet.tables import ApiKey

    key = await app.services.keys.create(
        "tenant", ["inference"], expires_at=datetime.now(UTC) + timedelta(hours=1)
    )
    async with app.services.db.session() as session, session.begin():
        await session.execute(
            update(ApiKey).where(ApiKey.id == key.key_id)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    resp = await app.client.get("/v1/models", headers={"x-api-key": key.key})
    assert_error(resp, 401, "expired_api_key")


async def test_key_without_inference_scope_is_403(app: Actors) -> None:
    only_admin = await app.services.keys.create("ops", ["admin"])
    # admin implies everything; a key with no inference scope at all:
    from modelfleet.tables import ApiKey

    async with app.services.db.session() as session, session.begin():
        row = await session.get(ApiKey, only_admin.key_id)
        assert row is not None
        row.scopes = "read"
    app.services.keys._cache.clear()
    resp = await app.client.post(CHAT_URL, json=chat_body(), headers={"x-api-key": only_admin.key})
    assert_error(resp, 403, "insufficient_scope")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": "smollm2"}, "messages"),
        (chat_body(messages=[]), "messages"),
        (chat_body(temperature="hot"), "temperature"),
        (chat_body(max_tokens=True), "max_tokens"),
        (chat_body(max_tokens=1.5), "max_tokens"),
        (chat_body(stream="yes"), "stream"),
        (chat_body(messages=[{"role": "wizard", "content": "x"}]), "messages.0.role"),
        (chat_body(best_friend=True), "best_friend"),
        (chat_body(stop=[1, 2]), "stop"),
    ],
)
async def test_shape_errors_are_422(app: Actors, body: dict[str, Any], param: str) -> None:
    resp = await app.client.post(CHAT_URL, json=body, headers=app.auth(app.tenant))
    err = assert_error(resp, 422)
    assert err["param"] is not None and err["param"].startswith(param), err


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        b'{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "top_p": 1e400}',
        b'{"model": "smollm2", "model": "other", "messages": []}',
        b'{"model": ',
        b"[1, 2]",
    ],
)
async def test_non_json_nan_inf_and_duplicates_are_422(app: Actors, raw: bytes) -> None:
    resp = await app.client.post(
        CHAT_URL, content=raw, headers={**app.auth(app.tenant), "content-type": "application/json"}
    )
    assert_error(resp, 422)


@pytest.mark.parametrize(
    ("over", "param", "code"),
    [
        ({"temperature": 2.5}, "temperature", "invalid_request"),
        ({"temperature": -0.1}, "temperature", "invalid_request"),
        ({"top_p": 1.5}, "top_p", "invalid_request"),
        ({"max_tokens": 100_000}, "max_tokens", "invalid_request"),
        ({"max_completion_tokens": 0}, "max_completion_tokens", "invalid_request"),
        ({"n": 50}, "n", "invalid_request"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_request"),
        ({"presence_penalty": 3.0}, "presence_penalty", "invalid_request"),
        ({"top_logprobs": 3}, "top_logprobs", "invalid_request"),
        ({"messages": [{"role": "user", "content": "x"}] * 65}, "messages", "too_many_messages"),
        (
            {"messages": [{"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ]}]},
            "messages.0.content",
            "image_input_not_supported_yet",
        ),
    ],
)
async def test_model_specific_errors_are_400(
    app: Actors, over: dict[str, Any], param: str, code: str
) -> None:
    resp = await app.client.post(CHAT_URL, json=chat_body(**over), headers=app.auth(app.tenant))
    err = assert_error(resp, 400, code)
    assert err["param"] == param
    assert resp.headers["x-model-used"] == CHAT
    assert resp.headers["x-route-model"] == "smollm2"
    assert resp.headers["x-backend"] == "llama.cpp"


async def test_stream_on_model_that_disallows_it_is_400(app: Actors) -> None:
    resp = await app.client.post(
        CHAT_URL, json=chat_body(model="test/nostream", stream=True), headers=app.auth(app.tenant)
    )
    assert_error(resp, 400, "streaming_not_supported")


async def test_chat_on_completion_model_is_400(app: Actors) -> None:
    resp = await app.client.post(
        CHAT_URL, json=chat_body(model="gemma3-270m"), headers=app.auth(app.tenant)
    )
    assert_error(resp, 400, "unsupported_endpoint")


async def test_unknown_model_is_404(app: Actors) -> None:
    resp = await app.client.post(
        CHAT_URL, json=chat_body(model="no/such-model"), headers=app.auth(app.tenant)
    )
    err = assert_error(resp, 404, "model_not_found")
    assert err["param"] == "model"


async def test_model_without_weights_is_503_with_reason(app: Actors) -> None:
    resp = await app.client.post(
        CHAT_URL, json=chat_body(model="test/missing"), headers=app.auth(app.tenant)
    )
    err = assert_error(resp, 503, "model_unavailable")
    assert "/nonexistent/model.gguf" in err["message"]


async def test_body_too_large_is_413(app: Actors) -> None:
    big = b'{"model": "smollm2", "messages": [{"role": "user", "content": "' + b"x" * (9 << 20)
    resp = await app.client.post(CHAT_URL, content=big + b'"}]}', headers=app.auth(app.tenant))
    assert_error(resp, 413, "request_too_large")


async def test_unknown_route_is_404_in_our_shape(app: Actors) -> None:
    assert_error(await app.client.get("/v1/nothing-here"), 404, "not_found")
    assert_error(await app.client.get(CHAT_URL), 405, "method_not_allowed")


async def test_models_list_and_detail(app: Actors) -> None:
    resp = await app.client.get("/v1/models", headers=app.auth(app.tenant))
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert CHAT in ids and "google/gemma-3-270m" in ids
    assert all(m["object"] == "model" and isinstance(m["created"], int) for m in body["data"])
    one = await app.client.get(f"/v1/models/{CHAT}", headers=app.auth(app.tenant))
    assert one.json()["id"] == CHAT
    by_alias = await app.client.get("/v1/models/smollm2", headers=app.auth(app.tenant))
    assert by_alias.json()["id"] == CHAT
    assert_error(await app.client.get("/v1/models/nope", headers=app.auth(app.tenant)), 404)
    assert_error(await app.client.get("/v1/models"), 401)


async def test_public_catalog(app: Actors) -> None:
    resp = await app.client.get("/v1/inference/models")
    assert resp.status_code == 200
    body = resp.json()
    chat = {e["model"]: e for e in body["chat"]}
    completion = {e["model"]: e for e in body["completion"]}
    assert CHAT in chat and "google/gemma-3-270m" in completion
    assert {e["model"] for e in body["text"]} == set(chat) | set(completion)
    entry = chat[CHAT]
    assert entry["parameters"]["max_tokens"] == {"default": 256, "min": 1, "max": 2048}
    assert entry["parameters"]["temperature"]["default"] == 0.7
    assert entry["parameters"]["messages"]["max"] == 64
    # the bounds on costly inputs are public too (checked at parse time: test_input_limits)
    assert entry["parameters"]["stop"]["max_chars"] == 500
    assert entry["parameters"]["response_format"]["max_enum_entries"] == 1024
    assert entry["parameters"]["logit_bias"] == {"min": -100, "max": 100, "vocab_size": 49152}
    assert entry["runtime"]["state"] == "sleeping"
    assert entry["runtime"]["available"] is True
    assert set(entry["recent_summary_stats"]) >= {"wait", "run", "total"}
    assert entry["recent_summary_stats"]["total"]["count"] == 0
    missing = chat["test/missing"]["runtime"]
    assert missing["available"] is False and "nonexistent" in missing["reason"]


async def test_runtime_endpoint_is_public(app: Actors) -> None:
    resp = await app.client.get("/v1/inference/runtime/models")
    rows = {r["model"]: r for r in resp.json()["text"]}
    assert rows[CHAT] == {
        "model": CHAT, "kind": "chat", "state": "sleeping", "available": True, "reason": None,
        "ready_replicas": 0, "desired_replicas": 0, "queued": 0, "in_flight": 0,
        "waiting_for_room": None,
    }


async def test_admin_endpoint_needs_admin(app: Actors) -> None:
    assert_error(await app.client.get("/v1/admin/replicas", headers=app.auth(app.tenant)), 403)
    resp = await app.client.get("/v1/admin/replicas", headers=app.auth(app.admin))
    assert resp.status_code == 200 and resp.json()["replicas"] == []
