"""POST /v1/embeddings: the OpenAI request, checked against the model's limits.

The worker is always asked for base64 (exact float32, a third of the bytes of
a JSON float list); the answer is rendered in the format the client asked for.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from modelfleet.catalog import ModelKind, ModelSpec
from modelfleet.errors import InvalidRequest
from modelfleet.openai.common import Int64, ModelName, Strict, require_kind

Token = Annotated[int, Field(ge=0, lt=2**31)]
TokenList = Annotated[list[Token], Field(min_length=1)]
EmbeddingInput = (
    Annotated[str, Field(max_length=2_000_000)]
    | list[Annotated[str, Field(max_length=2_000_000)]]
    | TokenList
    | list[TokenList]
)


class EmbeddingRequest(Strict):
    model: ModelName
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Int64 | None = None
    user: Annotated[str, Field(max_length=256)] | None = None

    # The chat-shaped fields the shared request path reads.
    stream: None = None
    stream_options: None = None
    metadata: None = None


def inputs_of(value: Any) -> list[Any]:
    """The request's inputs as a list (one string, or one token list, is one input)."""
    if isinstance(value, str):
        return [value]
    if value and isinstance(value[0], int):
        return [value]
    return list(value)


def validate_embedding(spec: ModelSpec, body: EmbeddingRequest) -> int:
    """Check against the model; returns 0 (an embedding generates no tokens)."""
    require_kind(spec, (ModelKind.embedding,), "/v1/embeddings")
    items = inputs_of(body.input)
    if not items:
        raise InvalidRequest("input must not be an empty list", param="input")
    if len(items) > spec.limits.max_inputs:
        raise InvalidRequest(
            f"input has {len(items)} items; model {spec.id!r} takes at most "
            f"{spec.limits.max_inputs} per request", param="input", code="too_many_inputs")
    for i, item in enumerate(items):
        if isinstance(item, str) and not item:
            raise InvalidRequest(f"input[{i}] is an empty string", param="input")
        if isinstance(item, list) and len(item) > spec.limits.max_input_tokens:
            raise InvalidRequest(
                f"input[{i}] is {len(item)} tokens; model {spec.id!r} takes at most "
                f"{spec.limits.max_input_tokens}", param="input", code="input_too_long")
    if body.dimensions is not None and body.dimensions < 1:
        raise InvalidRequest("dimensions must be at least 1", param="dimensions")
    return 0


def worker_body(spec: ModelSpec, body: EmbeddingRequest, _max_tokens: int) -> dict[str, Any]:
    payload: dict[str, Any] = {"model": spec.id, "input": body.input, "encoding_format": "base64"}
    if body.dimensions is not None:
        payload["dimensions"] = body.dimensions
    return payload


def render(model_id: str, body: dict[str, Any], usage: dict[str, Any], fmt: str) -> dict[str, Any]:
    """The OpenAI embeddings response from the worker's base64 answer.  Float
    vectors stay numpy float32 arrays: the JSON encoder writes them directly."""
    data = []
    for i, item in enumerate(body.get("data") or []):
        raw = item.get("embedding") if isinstance(item, dict) else None
        if isinstance(raw, str):
            vector: Any = raw if fmt == "base64" else np.frombuffer(base64.b64decode(raw), "<f4")
        elif isinstance(raw, list):  # an engine that only speaks float
            vector = (base64.b64encode(np.asarray(raw, "<f4").tobytes()).decode()
                      if fmt == "base64" else np.asarray(raw, "<f4"))
        else:
            continue
        data.append({"object": "embedding", "index": item.get("index", i), "embedding": vector})
    prompt = int(usage.get("prompt_tokens", 0))
    return {"object": "list", "data": data, "model": model_id,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}
