"""modelfleet's responses validate against the official OpenAI API description
(shared/reference/openai-openapi.yaml, OpenAPI 3.1 = JSON Schema 2020-12)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.conftest import CHAT, ROOT, Server

pytestmark = pytest.mark.workers
SPEC = ROOT.parent / "shared" / "reference" / "openai-openapi.yaml"


def _nullable(node: Any) -> Any:
    """OpenAPI 3.0's ``nullable: true`` (still used in places) as JSON Schema: or null."""
    if isinstance(node, list):
        return [_nullable(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable(v) for k, v in node.items()}
    if node.pop("nullable", False) is True:
        return {"anyOf": [node, {"type": "null"}]}
    return node


@pytest.fixture(scope="module")
def validator() -> Any:
    assert SPEC.is_file(), f"the OpenAI API description is expected at {SPEC}"
    doc = yaml.load(SPEC.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    doc = _nullable(doc)
    registry: Registry[Any] = Registry().with_resource(
        "openai", Resource.from_contents(doc, default_specification=DRAFT202012)
    )

    def check(name: str, instance: Any) -> None:
        schema = {"$ref": f"openai#/components/schemas/{name}"}
        errors = list(Draft202012Validator(schema, registry=registry).iter_errors(instance))
        assert not errors, f"{name}: " + "; ".join(
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5]
        )

    return check


def post(server: Server, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120,
                      headers={"Authorization": f"Bearer {server.key}"})


MSG = [{"role": "user", "content": "Name a colour."}]


def test_chat_completion_matches_schema(server: Server, validator: Any) -> None:
    body = post(server, "/v1/chat/completions",
                {"model": CHAT, "messages": MSG, "max_tokens": 8, "logprobs": True,
                 "top_logprobs": 1, "n": 2}).json()
    validator("CreateChatCompletionResponse", body)


def test_chat_chunks_match_schema(server: Server, validator: Any) -> None:
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120,
                      headers={"x-api-key": server.key},
                      json={"model": CHAT, "messages": MSG, "max_tokens": 6, "stream": True,
                            "stream_options": {"include_usage": True}}) as resp:
        chunks = [json.loads(line[5:]) for line in resp.iter_lines()
                  if line.startswith("data:") and line != "data: [DONE]"]
    assert len(chunks) >= 3
    for chunk in chunks:
        validator("CreateChatCompletionStreamResponse", chunk)


def test_completion_matches_schema(server: Server, validator: Any) -> None:
    body = post(server, "/v1/completions",
                {"model": "gemma3-270m", "prompt": "Red, green,", "max_tokens": 5}).json()
    validator("CreateCompletionResponse", body)


def test_models_match_schema(server: Server, validator: Any) -> None:
    headers = {"x-api-key": server.key}
    listing = httpx.get(server.url + "/v1/models", headers=headers, timeout=10).json()
    validator("ListModelsResponse", listing)
    validator("Model", httpx.get(server.url + f"/v1/models/{CHAT}", headers=headers).json())


def test_errors_match_schema(server: Server, validator: Any) -> None:
    body = post(server, "/v1/chat/completions", {"model": "nope", "messages": MSG}).json()
    validator("ErrorResponse", body)


def test_spec_path_is_the_shared_reference() -> None:
    assert Path(SPEC).name == "openai-openapi.yaml"
