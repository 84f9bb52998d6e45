"""Tool calls with the real SmolLM2 (its template has no tool section): the
gateway enforces them with a JSON schema (capabilities.tool_calling =
"grammar", docs/api.md "Tools"), through the official openai SDK."""

from __future__ import annotations

import functools
import json
from operator import add
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from modelfleet.openai import chat, tools
from tests.conftest import CHAT, Server
from tests.test_openai_schema import validator  # noqa: F401  (fixture)

pytestmark = pytest.mark.workers

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 40},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather",
                                      "description": "The weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers",
                                      "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED: Any = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0,
                         timeout=120)


def _valid_call(call: Any, name: str | None = None) -> dict[str, Any]:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in SCHEMAS and (name is None or call.function.name == name)
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return dict(args)


@pytest.mark.parametrize("choice", [NAMED, "required"])
def test_forced_tool_call(client: openai.OpenAI, choice: Any) -> None:
    resp = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS,
                                          tool_choice=choice, max_tokens=80, temperature=0)
    out = resp.choices[0]
    assert out.finish_reason == "tool_calls"
    assert out.message.content is None and out.message.tool_calls
    assert len(out.message.tool_calls) == 1
    _valid_call(out.message.tool_calls[0], "get_weather" if choice is NAMED else None)
    assert resp.usage is not None and resp.usage.completion_tokens > 0


@pytest.mark.parametrize("choice", [NAMED, "required"])
def test_forced_tool_call_streamed(client: openai.OpenAI, choice: Any) -> None:
    with client.chat.completions.stream(model="smollm2", messages=ASK, tools=TOOLS,
                                        tool_choice=choice, max_tokens=80, temperature=0,
                                        stream_options={"include_usage": True}) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    out = final.choices[0]
    assert out.finish_reason == "tool_calls"
    assert not out.message.content and out.message.tool_calls
    _valid_call(out.message.tool_calls[0], "get_weather" if choice is NAMED else None)
    assert final.usage is not None and final.usage.completion_tokens > 0


def test_bodies_and_chunks_match_the_spec(server: Server, validator: Any) -> None:  # noqa: F811
    headers = {"Authorization": f"Bearer {server.key}"}
    body = {"model": CHAT, "messages": ASK, "tools": TOOLS, "tool_choice": "required",
            "max_tokens": 80, "temperature": 0}
    resp = httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers,
                      timeout=120)
    assert resp.status_code == 200, resp.text
    validator("CreateChatCompletionResponse", resp.json())
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120, headers=headers,
                      json={**body, "stream": True,
                            "stream_options": {"include_usage": True}}) as stream:
        chunks = [json.loads(line[5:]) for line in stream.iter_lines()
                  if line.startswith("data:") and line != "data: [DONE]"]
    for chunk in chunks:
        validator("CreateChatCompletionStreamResponse", chunk)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": None}
    first = next(d["tool_calls"][0] for d in deltas if "tool_calls" in d)
    assert first["index"] == 0 and first["id"].startswith("call_")
    assert first["function"]["arguments"] == "" and first["type"] == "function"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    hello = {**body, "tool_choice": "auto", "stream": True, "max_tokens": 40,
             "messages": [{"role": "user", "content": "Say hello to me."}]}
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120,
                      headers=headers, json=hello) as stream:
        chunks = [json.loads(line[5:]) for line in stream.iter_lines()
                  if line.startswith("data:") and line != "data: [DONE]"]
    for chunk in chunks:
        validator("CreateChatCompletionStreamResponse", chunk)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "tool_calls", "length")
    assert not text.lstrip().startswith("{")  # a message is its content, not the JSON


def test_two_turn_tool_loop(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "What is 2 plus 3? Use the add tool."}]
    first = client.chat.completions.create(
        model="smollm2", messages=messages, tools=TOOLS, max_tokens=60, temperature=0,
        tool_choice={"type": "function", "function": {"name": "add"}})
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    args = _valid_call(call, "add")
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": str(args["a"] + args["b"])}]
    final = client.chat.completions.create(model="smollm2", messages=messages, tools=TOOLS,
                                           tool_choice="none", max_tokens=30, temperature=0)
    assert final.choices[0].finish_reason in ("stop", "length")
    text = final.choices[0].message.content
    assert text and not final.choices[0].message.tool_calls
    assert not text.lstrip().startswith("{") and "add(" not in text  # prose, not a call
    # the same history under "auto" is answered as a message or a call, never broken JSON
    again = client.chat.completions.create(model="smollm2", messages=messages, tools=TOOLS,
                                           tool_choice="auto", max_tokens=60, temperature=0)
    _auto_answer(again.choices[0])


def _auto_answer(out: Any) -> None:
    if out.finish_reason == "tool_calls":
        assert out.message.content is None
        _valid_call(out.message.tool_calls[0])
    else:
        assert out.finish_reason == "stop" and out.message.tool_calls is None
        assert isinstance(out.message.content, str)
        assert not out.message.content.lstrip().startswith('{"type"')


def test_auto_is_a_message_or_a_call(client: openai.OpenAI) -> None:
    for messages, extra in ((ASK, {"tool_choice": "auto"}),
                            ([{"role": "user", "content": "Say hello to me."}], {})):
        resp = client.chat.completions.create(model="smollm2", messages=messages, tools=TOOLS,
                                              max_tokens=40, temperature=0,
                                              **extra)  # type: ignore[call-overload]
        _auto_answer(resp.choices[0])


def test_cut_short_is_never_prose(client: openai.OpenAI) -> None:
    for choice in ("required", NAMED):
        out = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS,
                                             tool_choice=choice, max_tokens=4,
                                             temperature=0).choices[0]
        assert out.finish_reason == "length"
        assert out.message.content is None  # at most a call with the arguments so far
        assert choice == "required" or out.message.tool_calls


def test_every_choice_is_a_call(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, n=2,
                                          tool_choice=NAMED, max_tokens=40, temperature=0)
    assert [c.index for c in resp.choices] == [0, 1]
    for out in resp.choices:
        assert out.finish_reason == "tool_calls"
        _valid_call(out.message.tool_calls[0])  # type: ignore[index]
    # (llama-server may start with choice 1: the SDK's .stream() helper cannot take
    # that, with or without tools, so the chunks are gathered here)
    calls: dict[int, dict[str, str]] = {}
    finish: dict[int, str | None] = {}
    for chunk in client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS,
                                                n=2, tool_choice=NAMED, max_tokens=40,
                                                temperature=0, stream=True):
        for c in chunk.choices:
            for delta in c.delta.tool_calls or []:
                call = calls.setdefault(c.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                call["name"] += delta.function.name or "" if delta.function else ""
                call["arguments"] += delta.function.arguments or "" if delta.function else ""
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert finish == {0: "tool_calls", 1: "tool_calls"}
    for call in calls.values():
        assert call["name"] == "get_weather" and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["arguments"]), WEATHER)


def test_history_is_rendered_for_a_template_without_tools() -> None:
    body = chat.ChatRequest.model_validate({"model": "m", "tools": TOOLS, "messages": [
        {"role": "system", "content": "Be brief."}, *ASK,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]})
    plan = tools.plan_for(body)
    assert plan == tools.Plan("auto")
    out = tools.render_messages(body.messages, plan, body)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\nYou can call these functions:")
    assert "get_weather: The weather in a city" in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": "Calling get_weather."}
    assert out[3]["content"] == 'Result of get_weather({"city":"Paris"}): sunny'
    fmt = tools.response_format(body, plan)
    assert tools.plan_of({"response_format": fmt}) == plan
    assert [p["properties"].get("name", {}).get("const") for p in
            fmt["json_schema"]["schema"]["anyOf"]] == [None, "get_weather", "add"]


def test_refused_combinations(server: Server) -> None:
    headers = {"Authorization": f"Bearer {server.key}"}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": WEATHER}}
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"tool_choice": "required", "response_format": fmt}, "tools_with_response_format",
         "response_format"),
        ({"tool_choice": NAMED, "response_format": {"type": "json_object"}},
         "tools_with_response_format", "response_format"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "invalid_request", "tool_choice.function.name"),
    ]
    for extra, code, param in cases:
        resp = httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=30,
                          json={"model": "smollm2", "messages": ASK, "tools": TOOLS, **extra})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["code"] == code
        assert resp.json()["error"]["param"] == param
    reserved = {"type": "json_schema", "json_schema": {"name": "modelfleet-tools-auto",
                                                       "schema": WEATHER}}
    resp = httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=30,
                      json={"model": "smollm2", "messages": ASK, "response_format": reserved})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "response_format.json_schema.name"


def test_catalog_says_how_tools_are_enforced(server: Server) -> None:
    listing = httpx.get(server.url + "/v1/inference/models", timeout=10,
                        headers={"Authorization": f"Bearer {server.key}"}).json()
    by_id = {m["model"]: m for m in listing["text"]}
    assert by_id[CHAT]["capabilities"]["tools"] is True
    assert by_id[CHAT]["capabilities"]["tool_calling"] == "grammar"  # "auto" in the catalog
    assert by_id[CHAT]["capabilities"]["tool_calling_detected"] == \
        "the chat template has no tool section"
    assert by_id["google/gemma-3-270m"]["capabilities"]["tool_calling"] == "none"


def test_langchain_bind_tools(server: Server) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key=server.key,  # type: ignore[arg-type]
                     model="smollm2", temperature=0, max_completion_tokens=60, max_retries=0)
    named = llm.bind_tools(TOOLS, tool_choice="get_weather").invoke(ASK[0]["content"])
    chunks = list(llm.bind_tools(TOOLS, tool_choice="any").stream(ASK[0]["content"]))
    for message, name in ((named, "get_weather"), (functools.reduce(add, chunks), None)):
        calls = message.tool_calls
        assert calls and calls[0]["name"] in SCHEMAS and name in (None, calls[0]["name"])
        jsonschema.validate(calls[0]["args"], SCHEMAS[calls[0]["name"]])
