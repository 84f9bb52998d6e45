"""Strict request parsing and the checks every generation endpoint shares."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modelfleet.catalog import ModelKind, ModelSpec
from modelfleet.errors import InvalidRequest, ValidationFailed
from modelfleet.openai.bounds import check_stop

M = TypeVar("M", bound=BaseModel)

Float = Annotated[float, Field(allow_inf_nan=False)]
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
# Scalar values a client may put in `metadata` (model-specific parameters).
MetaValue = str | bool | Int64 | Float | None | list[Any] | dict[str, Any]


class Strict(BaseModel):
    """Request models: unknown keys are errors, no silent coercion, no NaN/inf."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool | None = None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_BOM = b"\xef\xbb\xbf"
# A \uD800-\uDFFF escape: half of a pair, or (alone) a string no worker can be sent.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_json(raw: bytes) -> Any:
    """JSON as RFC 8259 has it: UTF-8 without a byte order mark, no NaN or
    Infinity, no duplicate keys, no unpaired surrogate (422 ``invalid_json``).
    Nesting deeper than the parser's recursion limit is the same 422."""
    if raw.startswith(_BOM):
        raise ValidationFailed("request body starts with a UTF-8 byte order mark; send JSON "
                               "without one", code="invalid_json")
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys,
                          parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        raise ValidationFailed(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if _SURROGATE_ESCAPE.search(raw):
        try:
            orjson.dumps(data)  # refuses a lone surrogate, which no worker could be sent
        except orjson.JSONEncodeError as exc:
            if "surrogate" in str(exc):
                raise ValidationFailed("request body is not valid JSON: a \\u escape is half "
                                       "of a surrogate pair", code="invalid_json") from None
    return data


def parse_body(model: type[M], raw: bytes) -> M:
    """Validate a JSON body against ``model``; shape errors become 422."""
    data = parse_json(raw)
    if not isinstance(data, dict):
        raise ValidationFailed("request body must be a JSON object", code="invalid_body")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_failed(exc) from None


def validation_failed(exc: ValidationError, prefix: str = "") -> ValidationFailed:
    """A pydantic error as the API's 422, its first problem named (``prefix``
    in front of the field's path: ``input[3].``)."""
    err = exc.errors()[0]
    loc = prefix + ".".join(str(p) for p in err["loc"])
    if err["type"] == "missing":
        message = f"field required: {loc}"
    elif err["type"] == "extra_forbidden":
        message = f"unrecognized request argument: {loc}"
    else:
        message = f"{loc}: {err['msg']}"
    extra = len(exc.errors()) - 1
    if extra:
        message += f" (and {extra} more error{'s' if extra > 1 else ''})"
    return ValidationFailed(message, param=loc or None)


ENDPOINT_OF_KIND = {
    ModelKind.chat: "/v1/chat/completions",
    ModelKind.completion: "/v1/completions",
    ModelKind.embedding: "/v1/embeddings",
    ModelKind.image: "/v1/images/generations or /v1/inference/image",
    ModelKind.task: "/v1/chat/completions, with the task's parameters in metadata",
    ModelKind.video: "/v1/videos or /v1/inference/video",
}


def require_kind(spec: ModelSpec, kinds: tuple[ModelKind, ...], endpoint: str) -> None:
    """400 for a model this endpoint does not serve, naming the one that does."""
    if spec.kind not in kinds:
        raise InvalidRequest(
            f"model {spec.id!r} is a {spec.kind.value} model; {endpoint} does not serve it "
            f"(use {ENDPOINT_OF_KIND[spec.kind]})",
            param="model",
            code="unsupported_endpoint",
        )


def check_range(value: float | None, low: float, high: float, param: str) -> None:
    if value is not None and not low <= value <= high:
        raise InvalidRequest(f"{param} must be between {low:g} and {high:g}, got {value:g}", param=param)


def effective_max_tokens(spec: ModelSpec, max_tokens: int | None, alt: int | None = None) -> int:
    if max_tokens is not None and alt is not None and max_tokens != alt:
        raise InvalidRequest(
            "max_tokens and max_completion_tokens disagree; send one of them",
            param="max_completion_tokens",
        )
    asked = alt if alt is not None else max_tokens
    limit = spec.limits.max_output_tokens
    if asked is None:
        return spec.defaults.max_tokens
    param = "max_completion_tokens" if alt is not None else "max_tokens"
    if asked < 1:
        raise InvalidRequest(f"{param} must be at least 1", param=param)
    if asked > limit:
        raise InvalidRequest(
            f"{param} is {asked}, above this model's limit of {limit}", param=param
        )
    return asked


def check_sampling(
    spec: ModelSpec,
    *,
    temperature: float | None,
    top_p: float | None,
    n: int | None,
    stop: str | list[str] | None,
    presence_penalty: float | None,
    frequency_penalty: float | None,
    stream: bool | None,
) -> None:
    check_range(temperature, 0.0, 2.0, "temperature")
    check_range(top_p, 0.0, 1.0, "top_p")
    check_range(presence_penalty, -2.0, 2.0, "presence_penalty")
    check_range(frequency_penalty, -2.0, 2.0, "frequency_penalty")
    if n is not None and not 1 <= n <= spec.limits.max_n:
        raise InvalidRequest(f"n must be between 1 and {spec.limits.max_n} for this model", param="n")
    if isinstance(stop, list):
        if len(stop) > spec.limits.max_stop:
            raise InvalidRequest(
                f"at most {spec.limits.max_stop} stop sequences are allowed", param="stop"
            )
        if any(not s for s in stop):
            raise InvalidRequest("stop sequences must not be empty", param="stop")
    check_stop(stop, spec.limits)
    if stream and not spec.capabilities.streaming:
        raise InvalidRequest(
            f"model {spec.id!r} does not allow streaming; send stream: false or omit it",
            param="stream",
            code="streaming_not_supported",
        )


def sampling_payload(
    spec: ModelSpec, body: BaseModel, fields: tuple[str, ...]
) -> dict[str, Any]:
    """The worker's sampling fields: what the client set, then the model's defaults."""
    payload: dict[str, Any] = {}
    for name in fields:
        value = getattr(body, name)
        if value is not None:
            payload[name] = value
    payload.setdefault("temperature", spec.defaults.temperature)
    payload.setdefault("top_p", spec.defaults.top_p)
    return payload


ModelName = Annotated[str, Field(min_length=1, max_length=256)]
# Characters per sequence are the model's limits.max_stop_chars (400, bounds.check_stop).
Stop = str | Annotated[list[str], Field(max_length=64)] | None
ReasoningEffort = Literal["minimal", "low", "medium", "high"]
