"""End to end with the official openai SDK: real server, real llama.cpp workers."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import CHAT, Server

pytestmark = pytest.mark.workers
MSG = [{"role": "user", "content": "Say hello in three words."}]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0,
                         timeout=120)


def test_chat_completion(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2", messages=MSG, max_tokens=12  # type: ignore[arg-type]
    )
    resp = raw.parse()
    assert resp.object == "chat.completion"
    assert resp.model == CHAT
    assert resp.id.startswith("chatcmpl-")
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage is not None and resp.usage.completion_tokens <= 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    headers = raw.headers
    assert resp.id == "chatcmpl-" + headers["x-request-id"]
    assert headers["x-model-used"] == CHAT
    assert headers["x-route-model"] == "smollm2"
    assert headers["x-backend"] == "llama.cpp"
    assert headers["x-deployment-id"].startswith("smollm2-135m-instruct-")


def test_streaming_ends_with_done_and_usage_only_when_asked(server: Server) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0)
    chunks = list(client.chat.completions.create(
        model=CHAT, messages=MSG, max_tokens=8, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert all(c.model == CHAT for c in chunks)
    assert len({c.id for c in chunks}) == 1
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 8 or chunks[-2].choices[0].finish_reason == "stop"
    plain = list(client.chat.completions.create(
        model=CHAT, messages=MSG, max_tokens=4, stream=True  # type: ignore[arg-type]
    ))
    assert all(c.usage is None for c in plain)
    assert all(c.choices for c in plain)
    # the raw wire format ends with data: [DONE]
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={
        "x-api-key": server.key}, json={"model": CHAT, "messages": MSG, "max_tokens": 3,
                                         "stream": True}, timeout=60) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-model-used"] == CHAT
        events = [line for line in resp.iter_lines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]"


def test_completions_on_base_model(client: openai.OpenAI) -> None:
    resp = client.completions.create(model="gemma3-270m", prompt="The capital of France is",
                                     max_tokens=6, temperature=0)
    assert resp.object == "text_completion"
    assert resp.model == "google/gemma-3-270m"
    assert resp.id.startswith("cmpl-")
    assert resp.choices[0].text
    assert resp.usage is not None and resp.usage.completion_tokens <= 6


def test_completions_streaming(client: openai.OpenAI) -> None:
    text = "".join(
        c.choices[0].text for c in client.completions.create(
            model="gemma3-270m", prompt="One, two, three,", max_tokens=5, stream=True)
        if c.choices
    )
    assert text


def test_models(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert CHAT in ids and "google/gemma-3-270m" in ids
    assert client.models.retrieve("smollm2").id == CHAT


def test_parameters_pass_through(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="smollm2", messages=MSG, max_completion_tokens=6, n=2, seed=7,  # type: ignore[arg-type]
        temperature=0.9, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5,
        logprobs=True, top_logprobs=2, stop=["\n\n", "###"],
    )
    assert len(resp.choices) == 2
    assert sorted(c.index for c in resp.choices) == [0, 1]
    lp = resp.choices[0].logprobs
    assert lp is not None and lp.content
    assert len(lp.content[0].top_logprobs) == 2


def test_seed_and_greedy_sampling_are_deterministic(client: openai.OpenAI) -> None:
    def once(**kw: Any) -> str:
        r = client.chat.completions.create(model="smollm2", messages=MSG,  # type: ignore[arg-type]
                                           max_tokens=16, **kw)
        return r.choices[0].message.content or ""

    assert once(temperature=1.5, seed=11) == once(temperature=1.5, seed=11)
    # metadata is handed to the engine: top_k=1 makes sampling greedy whatever the seed
    greedy = [once(temperature=1.8, seed=s, metadata={"top_k": 1}) for s in (1, 2, 3)]
    assert len(set(greedy)) == 1


def test_metadata_ignore_eos_reaches_the_engine(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Say OK."}],
        max_tokens=40, metadata={"ignore_eos": True},  # type: ignore[arg-type]
    )
    assert resp.usage is not None and resp.usage.completion_tokens == 40


def test_json_schema_output_is_valid(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"},
                                               "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    resp = client.chat.completions.create(
        model="smollm2", max_tokens=60, temperature=0,
        messages=[{"role": "user", "content": "Give a city and its population as JSON."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "city", "schema": schema}},
    )
    data = json.loads(resp.choices[0].message.content or "")
    assert isinstance(data["city"], str) and isinstance(data["population"], int)
    obj = client.chat.completions.create(
        model="smollm2", max_tokens=60, temperature=0, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Describe a cat as JSON."}],
    )
    content = obj.choices[0].message.content or ""
    assert content.lstrip().startswith("{")


def test_tools_are_accepted_and_forwarded(client: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]
    resp = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=tools, tool_choice="auto", max_tokens=16,  # type: ignore[arg-type]
    )
    assert resp.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_text_content_parts(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="smollm2", max_tokens=5,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Say hi."}]}],
    )
    assert resp.choices[0].message.content


def test_sdk_sees_each_error_code(server: Server, client: openai.OpenAI) -> None:
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="mf-" + "x" * 43, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e401:
        bad.chat.completions.create(model="smollm2", messages=MSG)  # type: ignore[arg-type]
    assert e401.value.status_code == 401
    admin = openai.OpenAI(base_url=server.url + "/v1", api_key=server.admin_key, max_retries=0)
    assert admin.models.list().data  # admin may read models
    with pytest.raises(openai.NotFoundError) as e404:
        client.chat.completions.create(model="nope/nope", messages=MSG)  # type: ignore[arg-type]
    assert e404.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e400:
        client.chat.completions.create(model="smollm2", messages=MSG,  # type: ignore[arg-type]
                                       temperature=3)
    assert e400.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as eimg:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.invalid/a.png"}}]}])
    assert eimg.value.code == "image_input_not_supported_yet"
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="smollm2", messages=MSG,  # type: ignore[arg-type]
                                       extra_body={"max_tokens": "many"})
    with pytest.raises(openai.InternalServerError) as e503:
        client.chat.completions.create(model="test/missing", messages=MSG)  # type: ignore[arg-type]
    assert e503.value.status_code == 503
    with pytest.raises(openai.BadRequestError) as estream:
        client.chat.completions.create(model="test/nostream", messages=MSG,  # type: ignore[arg-type]
                                       stream=True)
    assert estream.value.code == "streaming_not_supported"


def test_context_overflow_is_400(client: openai.OpenAI) -> None:
    long = "word " * 6000
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="smollm2", max_tokens=10,
                                       messages=[{"role": "user", "content": long}])
    assert exc.value.code == "context_length_exceeded"


def test_permission_denied_for_key_without_inference(server: Server) -> None:
    import sqlite3

    from tests.conftest import _cli

    raw = _cli("keys", "create", "--project", "p403", "--scope", "inference",
               data_dir=server.data_dir)
    # Narrow the key to a scope that does not include inference, in the store.
    db = sqlite3.connect(server.data_dir / "modelfleet.db")
    db.execute("UPDATE api_keys SET scopes = 'read' WHERE prefix = ?", (raw[:11],))
    db.commit()
    db.close()
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=raw, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as e403:
        c.chat.completions.create(model="smollm2", messages=MSG)  # type: ignore[arg-type]
    assert e403.value.status_code == 403


def test_catalog_reports_ready_and_stats(server: Server, client: openai.OpenAI) -> None:
    client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=2)  # type: ignore[arg-type]
    body = httpx.get(server.url + "/v1/inference/models", timeout=10).json()
    entry = next(e for e in body["chat"] if e["model"] == CHAT)
    assert entry["runtime"]["state"] == "ready"
    stats = entry["recent_summary_stats"]
    assert stats["total"]["count"] >= 1
    assert stats["total"]["p50_seconds"] >= stats["run"]["p50_seconds"] > 0
    runtime = httpx.get(server.url + "/v1/inference/runtime/models", timeout=10).json()
    row = next(r for r in runtime["text"] if r["model"] == CHAT)
    assert row["available"] is True and row["ready_replicas"] == 1 and row["desired_replicas"] == 1


def test_metrics_count_requests_and_show_live_state(server: Server, client: openai.OpenAI) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=2)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2", messages=MSG, temperature=9)  # type: ignore[arg-type]
    text = httpx.get(server.url + "/metrics", timeout=10).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}

    def value(name: str, **labels: str) -> float:
        return sum(v for (n, lab), v in samples.items()
                   if n == name and all((k, w) in lab for k, w in labels.items()))

    assert value("modelfleet_requests_total", model=CHAT, status="succeeded") >= 1
    assert value("modelfleet_requests_total", model=CHAT, status="rejected_400") >= 1
    assert value("modelfleet_tokens_total", model=CHAT, direction="output") >= 2
    assert value("modelfleet_total_seconds_count", model=CHAT) >= 1
    assert value("modelfleet_replicas", model=CHAT, state="ready") == 1
    assert value("modelfleet_model_available", model="test/missing") == 0
    assert value("modelfleet_cold_start_seconds_count", model=CHAT) >= 1
    assert value("modelfleet_autoscaler_decisions_total", model=CHAT, direction="up") >= 1
