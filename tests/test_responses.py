"""The Responses API (``/v1/responses``) on the real SmolLM2 through the
official openai SDK: text and items in, a Response (or its typed SSE events)
out, stored per project, continued with ``previous_response_id``, function
tools enforced as in chat, billed like chat; every body and event validates
against the OpenAI API description."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from modelfleet.ledger import cost_of
from tests import test_openai_schema
from tests.conftest import Server, _cli
from tests.test_money import wait_usage

validator = test_openai_schema.validator  # the fixture: bodies checked against the spec

pytestmark = pytest.mark.workers
PRICED = "test/priced"  # SmolLM2; 1 micro-unit per input token, 10 per output token
PRICES = (1_000_000, 10_000_000)
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 40},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
TOOL: Any = {"type": "function", "name": "get_weather", "description": "The weather in a city",
             "parameters": WEATHER, "strict": True}
# The schema of each streamed event type (ResponseStreamEvent is their anyOf).
EVENT_SCHEMAS = {
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "error": "ResponseErrorEvent",
}


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0,
                         timeout=120)


def post(server: Server, body: dict[str, Any], key: str | None = None) -> httpx.Response:
    return httpx.post(server.url + "/v1/responses", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {key or server.key}"})


def get(server: Server, path: str, key: str | None = None) -> httpx.Response:
    return httpx.get(server.url + "/v1/responses" + path, timeout=30,
                     headers={"Authorization": f"Bearer {key or server.key}"})


def stream_events(server: Server, body: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """The raw SSE of a streamed response: each event's ``event:`` name must
    match its data's type."""
    events: list[dict[str, Any]] = []
    with httpx.stream("POST", server.url + "/v1/responses", timeout=120,
                      json={**body, "stream": True},
                      headers={"Authorization": f"Bearer {server.key}"}) as resp:
        assert resp.status_code == 200, resp.read()
        request_id = resp.headers["x-request-id"]
        name = None
        for line in resp.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                assert event["type"] == name
                events.append(event)
    return events, request_id


def test_text_in_response_out_billed_like_chat(server: Server, validator: Any) -> None:
    resp = post(server, {"model": PRICED, "input": "Name a colour.", "max_output_tokens": 8,
                         "instructions": "Answer in one word.", "metadata": {"case": "a"}})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    validator("Response", body)
    assert body["object"] == "response" and body["id"].startswith("resp_")
    assert body["status"] in ("completed", "incomplete") and body["model"] == PRICED
    assert body["instructions"] == "Answer in one word." and body["metadata"] == {"case": "a"}
    message = body["output"][0]
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["content"][0]["text"]
    usage = body["usage"]
    assert usage["output_tokens"] >= 1 and usage["input_tokens"] > 5
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    cut = post(server, {"model": PRICED, "input": "Write a long story about a dragon.",
                        "max_output_tokens": 2}).json()
    assert cut["status"] == "incomplete" and cut["usage"]["output_tokens"] == 2
    assert cut["incomplete_details"] == {"reason": "max_output_tokens"}
    assert cut["output"][0]["status"] == "incomplete"
    status, tokens_in, tokens_out, cost = wait_usage(
        server, [resp.headers["x-request-id"]])[resp.headers["x-request-id"]]
    assert status == "succeeded"
    assert (tokens_in, tokens_out) == (usage["input_tokens"], usage["output_tokens"])
    assert cost == cost_of(tokens_in, tokens_out, PRICES)


def test_stored_get_items_delete_and_other_projects(client: openai.OpenAI, server: Server,
                                                    validator: Any) -> None:
    created = client.responses.create(
        model="smollm2", max_output_tokens=6,
        input=[{"role": "developer", "content": "Be brief."},
               {"role": "user", "content": [{"type": "input_text", "text": "Hello"}]}])
    got = get(server, f"/{created.id}")
    assert got.status_code == 200
    validator("Response", got.json())
    assert got.json()["id"] == created.id and created.usage
    assert (got.json()["usage"]["input_tokens"], got.json()["usage"]["output_tokens"]) == (
        created.usage.input_tokens, created.usage.output_tokens)
    assert got.json()["output"] == [o.model_dump(mode="json", exclude_unset=True)
                                    for o in created.output]
    items = get(server, f"/{created.id}/input_items")
    validator("ResponseItemList", items.json())
    data = items.json()["data"]
    assert [i["role"] for i in data] == ["user", "developer"]  # newest first
    assert data[0]["content"] == [{"type": "input_text", "text": "Hello"}]
    asc = client.responses.input_items.list(created.id, order="asc", limit=1)
    assert [i.id for i in asc.data] == [data[1]["id"]] and asc.has_more
    rest = get(server, f"/{created.id}/input_items?order=asc&after={data[1]['id']}").json()
    assert [i["id"] for i in rest["data"]] == [data[0]["id"]] and not rest["has_more"]

    other = _cli("keys", "create", "--project", "responses-other", "--scope", "inference",
                 data_dir=server.data_dir)
    for path in (f"/{created.id}", f"/{created.id}/input_items"):
        refused = get(server, path, other)
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "response_not_found"
    gone = httpx.delete(server.url + f"/v1/responses/{created.id}", timeout=30,
                        headers={"Authorization": f"Bearer {other}"})
    assert gone.status_code == 404
    cont = post(server, {"model": "smollm2", "input": "more", "previous_response_id": created.id,
                         "max_output_tokens": 2}, other)
    assert cont.status_code == 400 and cont.json()["error"]["param"] == "previous_response_id"

    client.responses.delete(created.id)
    assert get(server, f"/{created.id}").status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)


def test_previous_response_id_continues_the_conversation(client: openai.OpenAI,
                                                         server: Server) -> None:
    first = client.responses.create(model="smollm2", input="My name is Ada.", max_output_tokens=8,
                                    instructions="Be brief.", temperature=0)
    alone = client.responses.create(model="smollm2", input="What is my name?",
                                    max_output_tokens=4, temperature=0, store=False)
    second = client.responses.create(model="smollm2", input="What is my name?",
                                     max_output_tokens=4, temperature=0,
                                     previous_response_id=first.id)
    assert second.previous_response_id == first.id
    assert first.usage and alone.usage and second.usage
    # the model saw the first turn (its input and its output) before this input:
    # instructions are not carried over, as OpenAI does it
    seen = second.usage.input_tokens - alone.usage.input_tokens
    assert seen >= first.usage.output_tokens + 5
    assert seen < first.usage.input_tokens + first.usage.output_tokens
    third = client.responses.create(model="smollm2", input="And again?", max_output_tokens=2,
                                    previous_response_id=second.id)
    assert third.usage and third.usage.input_tokens > second.usage.input_tokens
    # store: false keeps nothing to continue from
    refused = post(server, {"model": "smollm2", "input": "x", "previous_response_id": alone.id})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "previous_response_not_found"
    assert get(server, f"/{alone.id}").status_code == 404


def test_stream_typed_events(server: Server, validator: Any) -> None:
    events, request_id = stream_events(server, {"model": PRICED, "input": "Count: one, two,",
                                                "max_output_tokens": 10})
    types = [e["type"] for e in events]
    assert types[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert types[-4:-1] == ["response.output_text.done", "response.content_part.done",
                            "response.output_item.done"]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for event in events:
        validator(EVENT_SCHEMAS[event["type"]], event)
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == text
    assert events[-4]["text"] == text
    assert final["usage"]["output_tokens"] >= 1
    row = wait_usage(server, [request_id])[request_id]
    assert row[1:3] == (final["usage"]["input_tokens"], final["usage"]["output_tokens"])
    stored = get(server, f"/{final['id']}").json()
    assert stored == final


def test_stream_with_the_sdk(client: openai.OpenAI) -> None:
    # (the SDK's stream helper wants response.completed: an answer that ends by itself)
    with client.responses.stream(model="smollm2", input="Say hello in two words.",
                                 max_output_tokens=60) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.output_text == "".join(deltas) and deltas


def test_function_tool_forced_then_its_output(client: openai.OpenAI, server: Server,
                                              validator: Any) -> None:
    first = client.responses.create(model="smollm2", input="What is the weather in Paris?",
                                    tools=[TOOL], max_output_tokens=80, temperature=0,
                                    tool_choice={"type": "function", "name": "get_weather"})
    validator("Response", get(server, f"/{first.id}").json())
    assert first.status == "completed"
    calls = [o for o in first.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
    final = client.responses.create(
        model="smollm2", previous_response_id=first.id, tools=[TOOL], max_output_tokens=20,
        # "auto" lets a small model call the tool again; "none" asks for the answer
        tool_choice="none", temperature=0,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                "output": '{"temperature_c": 21}'}])
    assert final.output[0].type == "message" and final.output_text
    items = client.responses.input_items.list(final.id)
    assert [i.type for i in items.data] == ["function_call_output"]
    # the whole loop as items, without storing
    again = client.responses.create(
        model="smollm2", store=False, tools=[TOOL], max_output_tokens=20, input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
             "arguments": calls[0].arguments},
            {"type": "function_call_output", "call_id": calls[0].call_id,
             "output": '{"temperature_c": 21}'}])
    assert again.output and again.status in ("completed", "incomplete")


def test_streamed_tool_call(server: Server, validator: Any) -> None:
    events, _ = stream_events(server, {"model": "smollm2", "input": "Weather in Oslo?",
                                       "tools": [TOOL], "tool_choice": "required",
                                       "max_output_tokens": 80, "temperature": 0})
    for event in events:
        validator(EVENT_SCHEMAS[event["type"]], event)
    types = [e["type"] for e in events]
    assert "response.function_call_arguments.delta" in types
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert done["name"] == "get_weather"
    jsonschema.validate(json.loads(done["arguments"]), WEATHER)
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["output"][0]["type"] == "function_call"


def test_text_format_json_schema(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 20}},
              "required": ["colour"], "additionalProperties": False}
    resp = client.responses.create(model="smollm2", input="Name a colour.", max_output_tokens=40,
                                   text={"format": {"type": "json_schema", "name": "colour",
                                                    "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(resp.output_text), schema)
    assert resp.text and resp.text.format and resp.text.format.type == "json_schema"


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "smollm2"}, 400, "input"),
    ({"model": "smollm2", "input": []}, 400, "input"),
    ({"model": "smollm2", "input": [{"type": "web_search_call", "id": "x"}]}, 400,
     "input[0].type"),
    ({"model": "smollm2", "input": [{"role": "user"}]}, 422, "input[0].content"),
    ({"model": "smollm2", "input": "x", "max_output_tokens": 10**6}, 400, "max_output_tokens"),
    ({"model": "smollm2", "input": "x", "background": True}, 400, "background"),
    ({"model": "smollm2", "input": "x", "truncation": "auto"}, 400, "truncation"),
    ({"model": "smollm2", "input": "x", "reasoning": {"effort": "low"}}, 422, "reasoning"),
    ({"model": "smollm2", "input": "x", "tool_choice": {"type": "function", "name": "nope"},
      "tools": [TOOL]}, 400, "tool_choice.name"),
    ({"model": "sentence-transformers/all-MiniLM-L6-v2", "input": "x"}, 400, "model"),
    ({"model": "smollm2", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "https://example.com/a.png"}]}]}, 400,
     "input[0].content[0]"),
])
def test_bad_requests_are_refused_and_charge_nothing(server: Server, body: dict[str, Any],
                                                     status: int, param: str) -> None:
    resp = post(server, body)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["param"] == param


async def test_a_stream_that_breaks_ends_failed_once(validator: Any) -> None:
    """The gateway's mid-stream error event (deadline passed, worker broke)
    becomes ``error`` and ``response.failed``, stored once; the chat stream's
    ``[DONE]`` after it adds nothing."""
    from modelfleet.catalog import load_catalog
    from modelfleet.openai import responses

    spec = load_catalog().resolve("smollm2")
    assert spec is not None
    body = responses.ResponsesRequest.model_validate({"model": "smollm2", "input": "x"})
    kept: list[dict[str, Any]] = []

    async def keep(response: dict[str, Any]) -> None:
        kept.append(response)

    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": spec.id,
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"},
                          "finish_reason": None}], "usage": None}
    error = {"error": {"message": "request to 'smollm2' did not finish within 1.5s",
                       "type": "timeout", "code": "request_timeout", "param": None}}

    async def chat_stream() -> Any:
        yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
        yield b"data: " + json.dumps(error).encode() + b"\n\ndata: [DONE]\n\n"

    shape = responses.Shape("resp_x", body, spec, temperature=0.2, top_p=1.0)
    out = b"".join([e async for e in responses.EventStream(shape, keep).run(chat_stream())])
    events = [json.loads(line[6:]) for line in out.decode().split("\n")
              if line.startswith("data: ")]
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta", "error",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.failed"]
    for event in events:
        validator(EVENT_SCHEMAS[event["type"]], event)
    assert events[5]["code"] == "request_timeout"
    assert len(kept) == 1 and kept[0]["status"] == "failed" == events[-1]["response"]["status"]
    assert kept[0]["output"][0]["status"] == "incomplete"
    assert kept[0]["output"][0]["content"][0]["text"] == "Hel"
