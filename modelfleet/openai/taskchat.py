"""Task models behind ``POST /v1/chat/completions`` (docs/tasks.md).

A ``task`` model (zero-shot classification, NER, PII detection) takes the
chat body as ZeroGPU does: the text is the last user message and ``metadata``
carries the task's parameters.  This module checks both before anything is
held or queued, and builds the worker's body: the text as one user message
and the parameters, normalised, as ``metadata``.  The task worker
(``workers/tasks.py``) parses that metadata again with the same functions.

Usage, as the worker reports it and the gateway charges it: ``prompt_tokens``
is the text's tokens under the model's own tokenizer (never more than its
characters), ``completion_tokens`` one per item of the result (a scored label,
a found entity).  The hold is therefore the text's length for the prompt and
the number of labels, or the text's length, for the output.
"""

from __future__ import annotations

from typing import Any

from modelfleet.catalog import ModelKind, ModelSpec, TaskEngine
from modelfleet.errors import InvalidRequest
from modelfleet.openai import bounds, chat
from modelfleet.openai.chat import ChatRequest, TextPart

# Zero-shot classification: labels per request, characters per label.
MAX_LABELS = 64
MAX_LABEL_CHARS = 100
# spaCy's English pipelines (OntoNotes 5): the entity types NER may report.
NER_TYPES = ("PERSON", "NORP", "FAC", "ORG", "GPE", "LOC", "PRODUCT", "EVENT", "WORK_OF_ART",
             "LAW", "LANGUAGE", "DATE", "TIME", "PERCENT", "MONEY", "QUANTITY", "ORDINAL",
             "CARDINAL")
# What Presidio's analyzer (2.2.366) finds in English with its default
# recognizers and en_core_web_sm: PERSON, LOCATION, NRP, ORGANIZATION and
# DATE_TIME from the spaCy model, the rest from patterns and checksums.
PII_ENTITIES = ("PERSON", "LOCATION", "NRP", "ORGANIZATION", "DATE_TIME", "EMAIL_ADDRESS",
                "PHONE_NUMBER", "URL", "IP_ADDRESS", "MAC_ADDRESS", "CREDIT_CARD", "IBAN_CODE",
                "CRYPTO", "US_BANK_NUMBER", "US_SSN", "US_ITIN", "US_PASSPORT",
                "US_DRIVER_LICENSE", "UK_NHS", "MEDICAL_LICENSE")
# PII use cases: which entity groups a request looks for (metadata.usecase).
PII_USECASES: dict[str, tuple[str, ...]] = {
    # loose patterns left out: a US phone number can pass the UK NHS checksum
    "general": ("PERSON", "LOCATION", "EMAIL_ADDRESS", "PHONE_NUMBER", "URL", "IP_ADDRESS",
                "CREDIT_CARD", "IBAN_CODE", "CRYPTO", "US_SSN", "US_ITIN", "US_PASSPORT"),
    "contact": ("PERSON", "LOCATION", "EMAIL_ADDRESS", "PHONE_NUMBER", "URL"),
    "financial": ("CREDIT_CARD", "IBAN_CODE", "CRYPTO", "US_BANK_NUMBER"),
    "government_id": ("US_SSN", "US_ITIN", "US_PASSPORT", "US_DRIVER_LICENSE", "UK_NHS",
                      "MEDICAL_LICENSE"),
    "network": ("IP_ADDRESS", "MAC_ADDRESS", "URL", "EMAIL_ADDRESS"),
    "all": PII_ENTITIES,
}
DEFAULT_USECASE = "general"
DEFAULT_SCORE_THRESHOLD = 0.4
# The metadata keys each task takes.
TASK_KEYS = {
    "classification": ("labels", "multi_label"),
    "ner": ("entity_types",),
    "pii": ("mask", "usecase", "entities", "score_threshold"),
}
# Chat fields a task model has no use for, with the one value each may take
# (None: only absent).
_NEUTRAL: dict[str, object] = {
    "max_tokens": None, "max_completion_tokens": None, "temperature": None, "top_p": None,
    "n": 1, "stop": None, "seed": None, "presence_penalty": None, "frequency_penalty": None,
    "logprobs": False, "top_logprobs": None, "logit_bias": None, "tools": None,
    "tool_choice": None, "parallel_tool_calls": None, "stream": False, "stream_options": None,
}


def _bad(message: str, key: str) -> InvalidRequest:
    return InvalidRequest(message, param=f"metadata.{key}", code="invalid_metadata")


def _flag(meta: dict[str, Any], key: str) -> bool:
    """A boolean, or the strings "true"/"false" (OpenAI's metadata is string-valued)."""
    value = meta.get(key, False)
    if isinstance(value, bool):
        return value
    if value in ("true", "false"):
        return value == "true"
    raise _bad(f"metadata.{key} must be true or false", key)


def _names(meta: dict[str, Any], key: str, *, most: int = MAX_LABELS,
           chars: int = MAX_LABEL_CHARS) -> list[str] | None:
    """A list of distinct non-empty strings, or one comma-separated string."""
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",")]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(f"metadata.{key} must be a list of strings (or one comma-separated string)", key)
    if not value or len(value) > most:
        raise _bad(f"metadata.{key} must have 1 to {most} items, not {len(value)}", key)
    for item in value:
        if not item.strip() or len(item) > chars:
            raise _bad(f"metadata.{key} items must be 1 to {chars} characters, not {item!r}", key)
    if len(set(value)) != len(value):
        raise _bad(f"metadata.{key} lists an item twice", key)
    return list(value)


def _known(names: list[str] | None, allowed: tuple[str, ...], key: str) -> list[str] | None:
    if names is None:
        return None
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise _bad(f"metadata.{key}: unknown {', '.join(map(repr, unknown))}; one of "
                   f"{', '.join(allowed)}", key)
    return names


def parse_params(task: str, meta: dict[str, Any] | None,
                 default_labels: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The task's parameters from ``metadata``, checked and with the defaults
    filled in; an unknown key or a bad value is a 400 naming it."""
    meta = meta or {}
    for key in meta:
        if key not in TASK_KEYS[task]:
            raise _bad(f"metadata.{key} is not a parameter of {task} models (they take "
                       f"{', '.join(TASK_KEYS[task])})", key)
    if task == "classification":
        labels = _names(meta, "labels") or list(default_labels)
        if not labels:
            raise _bad("metadata.labels is required: this model has no default labels", "labels")
        return {"labels": labels, "multi_label": _flag(meta, "multi_label")}
    if task == "ner":
        return {"entity_types": _known(_names(meta, "entity_types"), NER_TYPES, "entity_types")}
    usecase = meta.get("usecase", DEFAULT_USECASE)
    if usecase not in PII_USECASES:
        raise _bad(f"metadata.usecase must be one of {', '.join(PII_USECASES)}", "usecase")
    entities = _known(_names(meta, "entities"), PII_ENTITIES, "entities")
    threshold = meta.get("score_threshold", DEFAULT_SCORE_THRESHOLD)
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) \
            or not 0 <= threshold <= 1:
        raise _bad("metadata.score_threshold must be a number from 0 to 1", "score_threshold")
    return {"mask": _flag(meta, "mask"), "usecase": usecase,
            "entities": entities or list(PII_USECASES[usecase]),
            "score_threshold": float(threshold)}


def task_text(body: ChatRequest) -> str:
    """The last user message's text (text parts joined with newlines)."""
    for i in range(len(body.messages) - 1, -1, -1):
        message = body.messages[i]
        if message.role != "user":
            continue
        content = message.content
        if isinstance(content, str):
            text = content
        else:
            parts = content or []
            if any(not isinstance(part, TextPart) for part in parts):
                raise InvalidRequest("task models take text only: the last user message has a "
                                     "part that is not text", param=f"messages.{i}.content",
                                     code="unsupported_content")
            text = "\n".join(part.text for part in parts if isinstance(part, TextPart))
        if not text.strip():
            raise InvalidRequest("the last user message is empty: it is the text the task "
                                 "model reads", param=f"messages.{i}.content")
        return text
    raise InvalidRequest("task models read the last user message, and there is none",
                         param="messages")


def _check_fields(spec: ModelSpec, body: ChatRequest) -> None:
    for name, neutral in _NEUTRAL.items():
        value = getattr(body, name)
        if value is None or value == neutral:
            continue
        raise InvalidRequest(
            f"{name} does not apply to {spec.id!r}, a task model: it returns its whole "
            f"result as one JSON answer (leave {name} out)",
            param=name, code="streaming_not_supported" if name == "stream"
            else "unsupported_parameter")
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_schema":
        raise InvalidRequest(f"{spec.id!r} is a task model: its answer is its own JSON "
                             "(docs/tasks.md); response_format may only be text or json_object",
                             param="response_format", code="unsupported_parameter")


def validate_task(spec: ModelSpec, body: ChatRequest) -> int:
    """Check a task request; returns the most result items (for the hold)."""
    assert isinstance(spec.engine, TaskEngine)
    _check_fields(spec, body)
    if len(body.messages) > spec.limits.max_messages:
        raise InvalidRequest(f"{len(body.messages)} messages exceed this model's limit of "
                             f"{spec.limits.max_messages}", param="messages",
                             code="too_many_messages")
    text = task_text(body)
    if len(text) > spec.limits.max_prompt_chars:
        raise InvalidRequest(f"the text is {len(text)} characters; {spec.id!r} reads at most "
                             f"{spec.limits.max_prompt_chars}", param="messages",
                             code="prompt_too_long")
    bounds.check_metadata(body.metadata, spec.limits)
    params = parse_params(spec.engine.task, body.metadata, spec.engine.labels)
    return len(params["labels"]) if spec.engine.task == "classification" else len(text)


def task_body(spec: ModelSpec, body: ChatRequest, _max_items: int) -> dict[str, Any]:
    """The worker's body: the text and the normalised parameters."""
    assert isinstance(spec.engine, TaskEngine)
    return {"model": spec.id, "messages": [{"role": "user", "content": task_text(body)}],
            "metadata": parse_params(spec.engine.task, body.metadata, spec.engine.labels)}


def validate(spec: ModelSpec, body: ChatRequest) -> int:
    """``/v1/chat/completions``: a task model's checks, or a chat model's."""
    if spec.kind is ModelKind.task:
        return validate_task(spec, body)
    return chat.validate_chat(spec, body)


def worker_body(spec: ModelSpec, body: ChatRequest, max_tokens: int) -> dict[str, Any]:
    if spec.kind is ModelKind.task:
        return task_body(spec, body, max_tokens)
    return chat.worker_body(spec, body, max_tokens)


def parameters(spec: ModelSpec) -> dict[str, Any]:
    """What ``GET /v1/inference/models`` lists for a task model."""
    assert isinstance(spec.engine, TaskEngine)
    task = spec.engine.task
    out: dict[str, Any] = {"task": task, "max_text_chars": spec.limits.max_prompt_chars,
                           "messages": {"max": spec.limits.max_messages},
                           "stream": {"allowed": False}}
    if task == "classification":
        out["metadata"] = {"labels": {"default": list(spec.engine.labels), "max": MAX_LABELS,
                                      "max_chars": MAX_LABEL_CHARS},
                           "multi_label": {"default": False}}
    elif task == "ner":
        out["metadata"] = {"entity_types": {"default": list(NER_TYPES), "values": list(NER_TYPES)}}
    else:
        out["metadata"] = {"mask": {"default": False},
                           "usecase": {"default": DEFAULT_USECASE,
                                       "values": {k: list(v) for k, v in PII_USECASES.items()}},
                           "entities": {"values": list(PII_ENTITIES)},
                           "score_threshold": {"default": DEFAULT_SCORE_THRESHOLD,
                                               "min": 0.0, "max": 1.0}}
    return out
