"""POST /v1/chat/completions: the request, its checks, and the worker body."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from modelfleet.catalog import Limits, ModelKind, ModelSpec
from modelfleet.errors import ImageInputNotSupported, InvalidRequest
from modelfleet.openai import bounds, tools
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
from modelfleet.openai.schemas import check_response_schema, check_tool_parameters


class _Lenient(BaseModel):
    """Message parts: unknown keys are dropped (clients send back what they got)."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class TextPart(_Lenient):
    type: Literal["text"]
    text: Annotated[str, Field(max_length=1_000_000)]


class ImageUrl(_Lenient):
    url: str
    detail: str | None = None


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageUrl


class OtherPart(_Lenient):
    """Audio, files and refusals: shapes this platform does not take yet."""

    type: Literal["input_audio", "file", "refusal"]


ContentPart = Annotated[TextPart | ImagePart | OtherPart, Field(discriminator="type")]
Content = str | Annotated[list[ContentPart], Field(max_length=1000)]


class FunctionCall(_Lenient):
    name: Annotated[str, Field(max_length=256)]
    arguments: str


class ToolCall(_Lenient):
    id: Annotated[str, Field(max_length=256)]
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content | None = None
    name: Annotated[str, Field(max_length=256)] | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=128)] | None = None
    tool_call_id: Annotated[str, Field(max_length=256)] | None = None


class FunctionDef(Strict):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchema(Strict):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class ResponseFormatText(Strict):
    type: Literal["text"]


class ResponseFormatJsonObject(Strict):
    type: Literal["json_object"]


class ResponseFormatJsonSchema(Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema,
    Field(discriminator="type"),
]


class ChatRequest(Strict):
    model: ModelName
    messages: Annotated[list[Message], Field(min_length=1, max_length=10_000)]
    max_tokens: Int64 | None = None
    max_completion_tokens: Int64 | None = None
    temperature: Float | None = None
    top_p: Float | None = None
    n: Int64 | None = None
    stop: Stop = None
    seed: Int64 | None = None
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    logprobs: bool | None = None
    top_logprobs: Int64 | None = None
    logit_bias: Annotated[dict[str, Float], Field(max_length=300)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    metadata: Annotated[dict[str, MetaValue], Field(max_length=64)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    store: bool | None = None
    service_tier: str | None = None


_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "tool_choice",
    "parallel_tool_calls",
)


def _check_messages(spec: ModelSpec, messages: list[Message]) -> None:
    if len(messages) > spec.limits.max_messages:
        raise InvalidRequest(
            f"{len(messages)} messages exceed this model's limit of {spec.limits.max_messages}",
            param="messages",
            code="too_many_messages",
        )
    for i, message in enumerate(messages):
        if isinstance(message.content, list):
            for part in message.content:
                if isinstance(part, ImagePart) and not spec.capabilities.image_input:
                    raise ImageInputNotSupported(
                        f"model {spec.id!r} takes text only; image_url content parts "
                        "are not supported",
                        param=f"messages.{i}.content",
                    )
                if isinstance(part, ImagePart) and not part.image_url.url.startswith("data:"):
                    # a worker would fetch a URL itself, past the platform's outbound guard
                    raise InvalidRequest(
                        "image_url must be a data: URL (base64); the platform does not "
                        "fetch images by URL", param=f"messages.{i}.content",
                        code="image_url_not_allowed")
                if isinstance(part, OtherPart):
                    raise InvalidRequest(
                        f"content parts of type {part.type!r} are not supported",
                        param=f"messages.{i}.content",
                        code="unsupported_content",
                    )
        if message.content is None and message.role != "assistant":
            raise InvalidRequest(f"messages.{i}.content is required for role {message.role!r}",
                                 param=f"messages.{i}.content")
        if message.role == "tool" and not message.tool_call_id:
            raise InvalidRequest("tool messages need tool_call_id", param=f"messages.{i}.tool_call_id")


def _check_capabilities(spec: ModelSpec, body: ChatRequest) -> None:
    caps = spec.capabilities
    if body.tools and not caps.tools:
        raise InvalidRequest(f"model {spec.id!r} does not support tools", param="tools",
                             code="tools_not_supported")
    if body.tool_choice is not None and not body.tools and body.tool_choice != "none":
        raise InvalidRequest("tool_choice needs tools", param="tool_choice")
    fmt = body.response_format
    if fmt is not None and fmt.type != "text" and not caps.json_output:
        raise InvalidRequest(f"model {spec.id!r} does not support JSON output",
                             param="response_format", code="json_output_not_supported")
    if (body.logprobs or body.top_logprobs is not None) and not caps.logprobs:
        raise InvalidRequest(f"model {spec.id!r} does not return logprobs", param="logprobs",
                             code="logprobs_not_supported")
    if body.top_logprobs is not None:
        if not 0 <= body.top_logprobs <= 20:
            raise InvalidRequest("top_logprobs must be between 0 and 20", param="top_logprobs")
        if not body.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")


def _check_tools(limits: Limits, tools: list[Tool]) -> None:
    """Tools become prompt text and, for tool calls, one grammar: bounded in
    count, size, depth and enum entries (summed over the tools)."""
    if len(tools) > limits.max_tools:
        raise InvalidRequest(f"{len(tools)} tools exceed this model's limit of {limits.max_tools}",
                             param="tools", code="too_many_tools")
    enum = 0
    for i, tool in enumerate(tools):
        fn, param = tool.function, f"tools[{i}].function.parameters"
        if fn.description and len(fn.description) > limits.max_tool_schema_bytes:
            raise InvalidRequest(f"tools[{i}].function.description is longer than "
                                 f"{limits.max_tool_schema_bytes} characters",
                                 param=f"tools[{i}].function.description", code="schema_too_large")
        if fn.parameters is not None:
            enum += bounds.check_free_json(fn.parameters, param, limits,
                                           limits.max_tool_schema_bytes)
            check_tool_parameters(fn.parameters, param, limits)
    bounds.check_enum(enum, "tools", limits)


def _check_response_format(limits: Limits, fmt: ResponseFormat | None) -> None:
    if not isinstance(fmt, ResponseFormatJsonSchema) or fmt.json_schema.schema_ is None:
        return
    schema, param = fmt.json_schema.schema_, "response_format.json_schema.schema"
    enum = bounds.check_free_json(schema, param, limits, limits.max_schema_bytes)
    bounds.check_enum(enum, param, limits)
    check_response_schema(schema, param, limits)


def validate_chat(spec: ModelSpec, body: ChatRequest) -> int:
    """Check the request against the model; return the effective max_tokens."""
    require_kind(spec, (ModelKind.chat,), "/v1/chat/completions")
    _check_messages(spec, body.messages)
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
    _check_capabilities(spec, body)
    bounds.check_logit_bias(body.logit_bias, spec.limits)
    if body.tools:
        _check_tools(spec.limits, body.tools)
    if not native_tools(spec, body):
        tools.check(body)
    _check_response_format(spec.limits, body.response_format)
    bounds.check_metadata(body.metadata, spec.limits)
    return effective_max_tokens(spec, body.max_tokens, body.max_completion_tokens)


def native_tools(spec: ModelSpec, body: ChatRequest) -> bool:
    """Whether the engine gets ``tools`` as sent.  A forced call (``"required"``
    or a named function) on a model that can emit JSON always goes through
    the gateway's schema, even where the template takes tools: llama-server's
    own "required" grammar lets prose come first (and drops a named
    ``tool_choice``), and a forced call must be a call."""
    if spec.capabilities.tool_calling != "native":
        return False
    plan = tools.plan_for(body)
    return not (plan is not None and plan.mode != "auto" and spec.capabilities.json_output)


def worker_body(spec: ModelSpec, body: ChatRequest, max_tokens: int) -> dict[str, Any]:
    """The validated request, re-serialised for the worker (never the raw bytes)."""
    if native_tools(spec, body):
        return _native_body(spec, body, max_tokens)
    plan = tools.plan_for(body)
    payload: dict[str, Any] = {
        "model": spec.id,
        "messages": tools.render_messages(body.messages, plan, body),
        "max_tokens": max_tokens,
    }
    payload.update(sampling_payload(spec, body, _SAMPLING_FIELDS))
    payload.pop("tool_choice", None)  # the grammar below enforces it
    payload.pop("parallel_tool_calls", None)
    if plan is not None:
        payload["response_format"] = tools.response_format(body, plan)
    elif body.response_format is not None:
        payload["response_format"] = body.response_format.model_dump(
            exclude_none=True, by_alias=True
        )
    return payload


def _native_body(spec: ModelSpec, body: ChatRequest, max_tokens: int) -> dict[str, Any]:
    """For an engine that parses tool calls itself: tools passed as sent."""
    payload: dict[str, Any] = {
        "model": spec.id,
        "messages": [m.model_dump(exclude_none=True) for m in body.messages],
        "max_tokens": max_tokens,
    }
    payload.update(sampling_payload(spec, body, _SAMPLING_FIELDS))
    if isinstance(payload.get("tool_choice"), BaseModel):
        payload["tool_choice"] = payload["tool_choice"].model_dump()
    if body.tools:
        payload["tools"] = [t.model_dump(exclude_none=True) for t in body.tools]
    if body.response_format is not None:
        payload["response_format"] = body.response_format.model_dump(
            exclude_none=True, by_alias=True
        )
    return payload
