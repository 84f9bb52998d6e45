"""POST /v1/completions (legacy text completions)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from modelfleet.catalog import ModelKind, ModelSpec
from modelfleet.errors import InvalidRequest
from modelfleet.openai import bounds
from modelfleet.openai.common import (
    Float,
    Int64,
    MetaValue,
    ModelName,
    Stop,
    StreamOptions,
    Strict,
    check_sampling,
    effective_max_tokens,
    require_kind,
    sampling_payload,
)

TokenList = Annotated[list[Annotated[int, Field(ge=0, lt=2**31)]], Field(min_length=1)]
Prompt = (
    Annotated[str, Field(max_length=2_000_000)]
    | Annotated[list[str], Field(min_length=1)]
    | TokenList
    | Annotated[list[TokenList], Field(min_length=1)]
)


class CompletionRequest(Strict):
    model: ModelName
    prompt: Prompt
    max_tokens: Int64 | None = None
    temperature: Float | None = None
    top_p: Float | None = None
    n: Int64 | None = None
    stop: Stop = None
    seed: Int64 | None = None
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    logprobs: Int64 | None = None
    logit_bias: Annotated[dict[str, Float], Field(max_length=300)] | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: Int64 | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    metadata: Annotated[dict[str, MetaValue], Field(max_length=64)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None


_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "logit_bias",
)


def _prompt_count(prompt: Any) -> int:
    if isinstance(prompt, str):
        return 1
    if prompt and isinstance(prompt[0], list):
        return len(prompt)
    if prompt and isinstance(prompt[0], int):
        return 1
    return len(prompt)


def validate_completion(spec: ModelSpec, body: CompletionRequest) -> int:
    """Check the request against the model; return the effective max_tokens."""
    require_kind(spec, (ModelKind.chat, ModelKind.completion), "/v1/completions")
    count = _prompt_count(body.prompt)
    if count > spec.limits.max_prompts:
        raise InvalidRequest(
            f"{count} prompts exceed this model's limit of {spec.limits.max_prompts}",
            param="prompt",
        )
    check_sampling(
        spec,
        temperature=body.temperature,
        top_p=body.top_p,
        n=body.n,
        stop=body.stop,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        stream=body.stream,
    )
    if body.logprobs is not None:
        if not spec.capabilities.logprobs:
            raise InvalidRequest(f"model {spec.id!r} does not return logprobs", param="logprobs",
                                 code="logprobs_not_supported")
        if not 0 <= body.logprobs <= 5:
            raise InvalidRequest("logprobs must be between 0 and 5", param="logprobs")
    if body.suffix:
        raise InvalidRequest("suffix (insertion) is not supported by this model", param="suffix")
    if body.echo:  # llama-server ignores it: refused rather than silently dropped
        raise InvalidRequest("echo is not supported by this model", param="echo")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise InvalidRequest("best_of other than n is not supported", param="best_of")
    if body.n is not None and body.n * count > spec.limits.max_n * spec.limits.max_prompts:
        raise InvalidRequest("too many completions requested", param="n")
    bounds.check_logit_bias(body.logit_bias, spec.limits)
    bounds.check_metadata(body.metadata, spec.limits)
    return effective_max_tokens(spec, body.max_tokens)


def worker_body(spec: ModelSpec, body: CompletionRequest, max_tokens: int) -> dict[str, Any]:
    payload: dict[str, Any] = {"model": spec.id, "prompt": body.prompt, "max_tokens": max_tokens}
    payload.update(sampling_payload(spec, body, _SAMPLING_FIELDS))
    return payload
