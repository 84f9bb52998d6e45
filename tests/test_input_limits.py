"""Costly and lenient inputs are refused before they reach a worker (issue 10,
point 2): JSON nesting, grammar bombs, stop length, logit_bias, tool schemas,
the content type and a byte order mark on every JSON route, image strength
without an image, control characters in names.

Most tests run in process on SQLite, where no worker is started: a refusal
must come back fast and leave the model's pool asleep.  The last ones send
the edge values that must still work to the real server and its llama.cpp
worker."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from modelfleet.catalog import CatalogError, load_catalog
from tests.conftest import CHAT, Actors, Server

COMPLETION = "google/gemma-3-270m"
CHAT_URL = "/v1/chat/completions"
SMOL_VOCAB = 49152
MSG = [{"role": "user", "content": "Say yes."}]


@pytest.fixture
def database_url() -> None:
    """SQLite only: nothing here depends on the store's backend."""
    return None


def nest(depth: int) -> Any:
    """A JSON value ``depth`` containers deep: [[...[]...]]."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def chat(**over: Any) -> dict[str, Any]:
    return {"model": "smollm2", "messages": MSG, "max_tokens": 4, **over}


def tool(parameters: Any, name: str = "lookup") -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def schema_format(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def assert_error(resp: httpx.Response, status: int, code: str | None = None,
                 param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "code", "param", "status"}
    assert err["status"] == status
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return dict(err)


async def post(app: Actors, url: str, body: Any, **headers: str) -> httpx.Response:
    return await app.client.post(url, json=body, headers={**app.auth(app.tenant), **headers})


async def fund(app: Actors) -> None:
    """Credit enough that only the checks under test stand between the request and a worker."""
    resp = await app.client.post(f"/v1/admin/projects/{app.tenant.project_id}/credits",
                                 json={"amount": 10**12}, headers=app.auth(app.admin))
    assert resp.status_code == 201, resp.text


def assert_asleep(app: Actors, model: str = CHAT) -> None:
    """No worker was asked for: the model has no replica and wants none."""
    pool = app.services.fleet.pools[model]
    assert pool.replicas == [] and pool.desired == 0, pool.describe()


# -- JSON nesting ----------------------------------------------------------------------


DEEP = [
    (chat(metadata={"deep": nest(259)}), "metadata"),
    (chat(tools=[tool({"type": "object", "properties": {"a": {"x-deep": nest(258)}}})]),
     "tools[0].function.parameters"),
    (chat(tools=[tool({"type": "object"}, "ok"),
                 tool({"type": "object", "properties": {"a": {"enum": [nest(80)]}}}, "deep")]),
     "tools[1].function.parameters"),
    (chat(response_format=schema_format({"type": "object", "x-deep": nest(259)})),
     "response_format.json_schema.schema"),
    (chat(response_format=schema_format({"type": "array", "items": {"enum": [nest(70)]}})),
     "response_format.json_schema.schema"),
    (chat(metadata={"deep": nest(64)}), "metadata"),  # one level past limits.max_json_depth
]


async def test_deep_free_form_json_is_400_naming_the_field(app: Actors) -> None:
    await fund(app)
    for body, param in DEEP:
        started = time.monotonic()
        assert_error(await post(app, CHAT_URL, body), 400, "json_too_deep", param)
        assert time.monotonic() - started < 2
    assert_asleep(app)


async def test_deep_metadata_on_completions_is_400(app: Actors) -> None:
    resp = await post(app, "/v1/completions",
                      {"model": COMPLETION, "prompt": "x", "metadata": {"a": nest(300)}})
    assert_error(resp, 400, "json_too_deep", "metadata")
    assert_asleep(app, COMPLETION)


def _admin_routes(project_id: str) -> list[tuple[str, str, str]]:
    """(method, path, a field that takes no nesting) for every admin route with a body."""
    return [
        ("POST", "/v1/admin/projects", "name"),
        ("PATCH", f"/v1/admin/projects/{project_id}", "models"),
        ("POST", f"/v1/admin/projects/{project_id}/keys", "scopes"),
        ("POST", f"/v1/admin/projects/{project_id}/credits", "amount"),
        ("POST", f"/v1/admin/projects/{project_id}/adjustments", "amount"),
        ("PUT", "/v1/admin/plans/gold", "key_rpm"),
        ("PUT", f"/v1/admin/prices/{CHAT}", "input_per_million"),
    ]


async def test_deep_json_is_4xx_on_every_json_route(app: Actors) -> None:
    tenant, admin = app.auth(app.tenant), app.auth(app.admin)
    inference = [
        ("POST", CHAT_URL, {**chat(), "messages": [{"role": "user", "content": nest(260)}]}),
        ("POST", "/v1/completions", {"model": COMPLETION, "prompt": nest(260)}),
        ("POST", "/v1/embeddings", {"model": "minilm", "input": nest(260)}),
        ("POST", "/v1/inference/image", {"model": "tiny-sd", "prompt": nest(260)}),
        ("POST", "/v1/images/generations", {"model": "tiny-sd", "prompt": nest(260)}),
    ]
    calls = [(m, u, b, tenant) for m, u, b in inference]
    calls += [(m, u, {f: nest(260)}, admin) for m, u, f in _admin_routes(app.tenant.project_id)]
    for method, url, body, headers in calls:
        for raw in (json.dumps(body).encode(), b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"):
            resp = await app.client.request(method, url, content=raw,
                                             headers={**headers, "content-type": "application/json"})
            assert 400 <= resp.status_code < 500, (method, url, resp.text[:300])
            assert resp.json()["error"]["type"] == "invalid_request_error"
    assert app.services.projects.list_plans()[0].name == "default"
    assert len(app.services.projects.list_projects()) == 3  # tenant, other, ops


# -- grammar bombs and schema size ----------------------------------------------------


@pytest.mark.parametrize("enum", [
    [f"value-{i:06d}" for i in range(50_000)],   # about 0.8 MB: past max_schema_bytes
    [f"v{i}" for i in range(5_000)],             # 40 kB, but 5000 entries: past max_schema_enum
])
async def test_grammar_bomb_is_refused_before_the_worker(app: Actors, enum: list[str]) -> None:
    await fund(app)
    body = chat(response_format=schema_format({"type": "string", "enum": enum}))
    started = time.monotonic()
    err = assert_error(await post(app, CHAT_URL, body), 400, "schema_too_large",
                       "response_format.json_schema.schema")
    assert time.monotonic() - started < 2
    assert "65536" in err["message"] or "1024" in err["message"]
    assert_asleep(app)


async def test_grammar_in_metadata_and_tool_schemas_are_bounded(app: Actors) -> None:
    grammar = 'root ::= "a"' + ' | "b"' * 20_000
    assert_error(await post(app, CHAT_URL, chat(metadata={"grammar": grammar})), 400,
                 "schema_too_large", "metadata.grammar")
    assert_error(await post(app, CHAT_URL, chat(metadata={"blob": "x" * 70_000})), 400,
                 "metadata_too_large", "metadata")
    big = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(1000)}}
    assert_error(await post(app, CHAT_URL, chat(tools=[tool(big)])), 400, "schema_too_large",
                 "tools[0].function.parameters")
    spread = [tool({"type": "object", "properties": {"a": {"enum": list(range(300))}}}, f"t{i}")
              for i in range(4)]  # 1200 entries over four tools: one grammar
    assert_error(await post(app, CHAT_URL, chat(tools=spread)), 400, "schema_too_large", "tools")
    repeat = {"type": "string", "minLength": 1999}  # slowed llama-server several times over
    assert_error(await post(app, CHAT_URL, chat(response_format=schema_format(repeat))), 400,
                 "schema_too_large", "response_format.json_schema.schema")
    items = {"type": "object", "properties": {"a": {"type": "array", "maxItems": 501}}}
    assert_error(await post(app, CHAT_URL, chat(tools=[tool(items)])), 400, "schema_too_large",
                 "tools[0].function.parameters")
    many = [tool({"type": "object"}, f"t{i}") for i in range(65)]
    assert_error(await post(app, CHAT_URL, chat(tools=many)), 400, "too_many_tools", "tools")
    assert_asleep(app)


NOT_SCHEMAS = [
    {"foo": "bar"},
    {"type": "banana"},
    {"type": "string"},
    {"type": "object", "properties": ["a", "b"]},
    {"type": "object", "properties": {"a": 5}},
    {"type": "object", "properties": {"a": {"type": "string", "enum": "abc"}}},
    {"type": "object", "required": "a"},
    {"type": "object", "properties": {"a": {"anyOf": []}}},
    {"type": "object", "properties": {"a": {"type": "array", "items": "string"}}},
    {"type": "object", "properties": {"a": {"maxLength": -1}}},
]


async def test_tool_parameters_must_be_a_json_schema(app: Actors) -> None:
    for parameters in NOT_SCHEMAS:
        assert_error(await post(app, CHAT_URL, chat(tools=[tool(parameters)])), 400,
                     "invalid_schema", "tools[0].function.parameters")
    assert_asleep(app)


async def test_response_format_schema_must_be_a_json_schema(app: Actors) -> None:
    body = chat(response_format=schema_format({"type": "object", "properties": {"a": [1]}}))
    assert_error(await post(app, CHAT_URL, body), 400, "invalid_schema",
                 "response_format.json_schema.schema")


async def test_numbers_no_worker_can_take_are_400(app: Actors) -> None:
    raw = json.dumps(chat(metadata={"a": [1]})).replace("[1]", "[1e400]").encode()
    resp = await app.client.post(CHAT_URL, content=raw, headers={
        **app.auth(app.tenant), "content-type": "application/json"})
    assert_error(resp, 400, None, "metadata")
    assert_error(await post(app, CHAT_URL, chat(metadata={"a": [2**70]})), 400, None, "metadata")


# -- stop and logit_bias ----------------------------------------------------------------


async def test_long_stop_sequences_are_400(app: Actors) -> None:
    for stop in ["x" * 10_000, "x" * 501, ["ok", "y" * 501]]:
        assert_error(await post(app, CHAT_URL, chat(stop=stop)), 400, "stop_too_long", "stop")
        resp = await post(app, "/v1/completions",
                          {"model": COMPLETION, "prompt": "x", "stop": stop})
        assert_error(resp, 400, "stop_too_long", "stop")
    assert_asleep(app)


BAD_BIAS = [
    {"hello": 5}, {"-1": 5}, {"1.5": 5}, {" 12": 5}, {"": 1}, {"0x10": 1},
    {str(SMOL_VOCAB): 1}, {"99999999999": 1},
    {"12": 100.5}, {"12": -101}, {"12": 1e300},
]


async def test_bad_logit_bias_is_400(app: Actors) -> None:
    for bias in BAD_BIAS:
        assert_error(await post(app, CHAT_URL, chat(logit_bias=bias)), 400,
                     "invalid_logit_bias", "logit_bias")
    assert_asleep(app)


async def test_logit_bias_vocabulary_is_the_models(app: Actors) -> None:
    resp = await post(app, "/v1/completions",
                      {"model": COMPLETION, "prompt": "x", "logit_bias": {"262144": 1}})
    assert_error(resp, 400, "invalid_logit_bias", "logit_bias")
    assert "262143" in resp.json()["error"]["message"]


# -- content type and byte order mark -----------------------------------------------------


def _json_routes(app: Actors) -> list[tuple[str, str, dict[str, Any], dict[str, str]]]:
    tenant, admin = app.auth(app.tenant), app.auth(app.admin)
    return [
        ("POST", CHAT_URL, chat(), tenant),
        ("POST", "/v1/completions", {"model": COMPLETION, "prompt": "x"}, tenant),
        ("POST", "/v1/embeddings", {"model": "minilm", "input": "x"}, tenant),
        ("POST", "/v1/inference/image", {"model": "tiny-sd", "prompt": "x"}, tenant),
        ("POST", "/v1/images/generations", {"model": "tiny-sd", "prompt": "x"}, tenant),
        ("POST", "/v1/admin/projects", {"name": "made-by-test"}, admin),
        ("PUT", "/v1/admin/plans/made-by-test", {"key_rpm": 5}, admin),
        ("POST", f"/v1/admin/projects/{app.tenant.project_id}/credits", {"amount": 5}, admin),
    ]


async def test_non_json_content_type_is_400_everywhere(app: Actors) -> None:
    types = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
             "application/json; charset=utf-16", "application/jsonp"]
    for content_type in types:
        for method, url, body, headers in _json_routes(app):
            resp = await app.client.request(method, url, content=json.dumps(body).encode(),
                                             headers={**headers, "content-type": content_type})
            err = assert_error(resp, 400, "unsupported_content_type", "Content-Type")
            assert "application/json" in err["message"], url
    await _nothing_changed(app)


async def test_byte_order_mark_and_utf16_are_422_everywhere(app: Actors) -> None:
    for method, url, body, headers in _json_routes(app):
        text = json.dumps(body)
        for raw in (b"\xef\xbb\xbf" + text.encode(), text.encode("utf-16")):
            resp = await app.client.request(method, url, content=raw, headers={
                **headers, "content-type": "application/json"})
            assert_error(resp, 422, "invalid_json")
        resp = await app.client.request(method, url, content=b"\xef\xbb\xbf" + text.encode(),
                                         headers=headers)
        assert "byte order mark" in assert_error(resp, 422, "invalid_json")["message"]
    await _nothing_changed(app)


async def _nothing_changed(app: Actors) -> None:
    assert app.services.projects.by_name("made-by-test") is None
    assert "made-by-test" not in {p.name for p in app.services.projects.list_plans()}
    money = await app.services.ledger.money(app.tenant.project_id)
    assert money["balance"] == 0
    assert_asleep(app)


async def test_json_with_charset_and_without_content_type_is_accepted(app: Actors) -> None:
    admin = app.auth(app.admin)
    for i, content_type in enumerate(["application/json; charset=UTF-8", "Application/JSON", None]):
        headers = {**admin, **({"content-type": content_type} if content_type else {})}
        resp = await app.client.post("/v1/admin/projects", headers=headers,
                                     content=json.dumps({"name": f"typed-{i}"}).encode())
        assert resp.status_code == 201, (content_type, resp.text)


async def test_unpaired_surrogate_is_422_and_pairs_pass_parsing(app: Actors) -> None:
    raw = b'{"model": "smollm2", "messages": [{"role": "user", "content": "\\ud800"}]}'
    resp = await app.client.post(CHAT_URL, content=raw, headers={
        **app.auth(app.tenant), "content-type": "application/json"})
    assert_error(resp, 422, "invalid_json")
    pair = b'{"name": "\\ud83d\\ude00"}'  # an emoji, as json.dumps writes it: valid JSON
    resp = await app.client.post("/v1/admin/projects", content=pair, headers=app.auth(app.admin))
    assert_error(resp, 400, None, "name")  # past parsing: the name's alphabet refuses it


# -- images and names -----------------------------------------------------------------------


async def test_image_strength_without_input_image_is_400(app: Actors) -> None:
    base = {"model": "tiny-sd", "prompt": "a lighthouse", "strength": 0.5}
    for body in (base, {**base, "input_images_base64": []}):
        assert_error(await post(app, "/v1/inference/image", body), 400, None, "strength")
    jobs = await app.client.get("/v1/inference/jobs", headers=app.auth(app.tenant))
    assert jobs.status_code == 200 and jobs.json()["data"] == []


async def test_plan_names_with_control_characters_are_400(app: Actors) -> None:
    for name in ["gold\x07", "gold\n", "\x1b[31mred", "a b", "-lead", "x" * 51]:
        resp = await app.client.put(f"/v1/admin/plans/{quote(name, safe='')}",
                                    json={"key_rpm": 5}, headers=app.auth(app.admin))
        assert_error(resp, 400, None, "name")
    assert [p.name for p in app.services.projects.list_plans()] == ["default"]
    ok = await app.client.put("/v1/admin/plans/gold-2.tier_a", json={"key_rpm": 5},
                              headers=app.auth(app.admin))
    assert ok.status_code == 200, ok.text


async def test_names_with_control_characters_are_400(app: Actors) -> None:
    keys = f"/v1/admin/projects/{app.tenant.project_id}/keys"
    for url, body in [
        ("/v1/admin/projects", {"name": "ops2\n"}),
        ("/v1/admin/projects", {"name": "bell\x07"}),
        (keys, {"scopes": ["inference"], "name": "ci\x1b[2Jkey"}),
        (keys, {"scopes": ["inference"], "name": "evil\u202eyek"}),
        (keys, {"scopes": ["inference"], "name": "two\nlines"}),
    ]:
        assert_error(await app.client.post(url, json=body, headers=app.auth(app.admin)), 400,
                     None, "name")
    assert len(app.services.projects.list_projects()) == 3
    assert len(await app.services.keys.list_keys(project_id=app.tenant.project_id)) == 1
    ok = await app.client.post(f"/v1/admin/projects/{app.tenant.project_id}/keys",
                               json={"scopes": ["inference"], "name": "CI key (ünïcode) ✓"},
                               headers=app.auth(app.admin))
    assert ok.status_code == 201, ok.text


# -- the catalog ------------------------------------------------------------------------------


def test_catalog_limits_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "catalog.toml"
    base = load_catalog()
    assert base.resolve("smollm2").limits.vocab_size == SMOL_VOCAB  # type: ignore[union-attr]
    assert base.resolve("minilm").limits.max_json_depth == 64  # type: ignore[union-attr]
    path.write_text('[[models]]\nid = "m"\nkind = "chat"\n[models.engine]\ntype = "llama.cpp"\n'
                    'model_file = "x.gguf"\n[models.limits]\nmax_json_depth = 300\n')
    with pytest.raises(CatalogError, match="max_json_depth"):
        load_catalog(path)


# -- edge values still work, on the real server and worker --------------------------------------


@pytest.mark.workers
def test_edge_values_are_served_by_the_worker(server: Server) -> None:
    headers = {"Authorization": f"Bearer {server.key}"}
    bomb = chat(response_format=schema_format({"type": "string",
                                               "enum": [f"value-{i:06d}" for i in range(50_000)]}))
    started = time.monotonic()
    refused = httpx.post(server.url + CHAT_URL, json=bomb, headers=headers, timeout=30)
    assert_error(refused, 400, "schema_too_large")
    assert time.monotonic() - started < 2
    body = chat(
        stop=["\u00e9" * 500, "b" * 500, "c" * 500, "d" * 500],
        logit_bias={"0": -100, str(SMOL_VOCAB - 1): 100, "17": 2.5},
        metadata={"deep": nest(63), "top_k": 40},
        response_format=schema_format({"type": "object", "properties": {
            "answer": {"type": "string", "enum": [f"a{i}" for i in range(1024)]}},
            "required": ["answer"]}),
    )
    resp = httpx.post(server.url + CHAT_URL, json=body, headers=headers, timeout=120)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["finish_reason"] in ("stop", "length")
    tools = [tool({"type": "object", "properties": {
        "city": {"type": "string", "enum": [f"c{i}" for i in range(500)]},
        "when": {"anyOf": [{"type": "string", "format": "date"}, {"type": "null"}]},
        "note": {"type": "string", "maxLength": 500},
    }, "required": ["city"], "additionalProperties": False}), tool({}, "noop")]
    resp = httpx.post(server.url + CHAT_URL, json=chat(tools=tools), headers=headers, timeout=120)
    assert resp.status_code == 200, resp.text
    text = httpx.post(server.url + "/v1/completions", headers=headers, timeout=120, json={
        "model": "smollm2", "prompt": "Yes or no:", "max_tokens": 3, "stop": "x" * 500,
        "logit_bias": {str(SMOL_VOCAB - 1): -100}})
    assert text.status_code == 200, text.text
