"""Bounds on inputs a client can make costly for a worker: free-form JSON
(``metadata``, tool ``parameters``, a ``response_format`` schema), stop
sequences and ``logit_bias``.

Every check runs before the request is queued, against the model's
``[models.limits]`` (``docs/catalog.md``), and raises ``InvalidRequest``
(400) naming the field.  A free-form value is measured in two steps:
orjson serialises it (in C: it refuses nesting past 255 levels and integers
past 64 bits, which become 400s here instead of 500s when the worker's body
is built) and its size is checked; only a value within the size limit is
then walked, once and without recursion, for its depth, its ``enum``
entries and non-finite numbers.  A request without these fields pays
nothing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import orjson

from modelfleet.catalog import Limits
from modelfleet.errors import InvalidRequest

# logit_bias token ids must be below this when the catalog gives no vocab_size.
UNKNOWN_VOCAB = 2**20
_TOKEN_ID = re.compile(r"[0-9]{1,10}")


def serialised_size(value: Any, param: str, limits: Limits) -> int:
    """Bytes of ``value`` as JSON; 400 when it cannot be serialised for a worker."""
    try:
        return len(orjson.dumps(value))
    except orjson.JSONEncodeError as exc:
        if "Recursion" in str(exc):
            raise _too_deep(param, limits) from None
        raise InvalidRequest(f"{param} cannot be sent to a worker: {exc}", param=param) from None


def _too_deep(param: str, limits: Limits) -> InvalidRequest:
    return InvalidRequest(f"{param} is nested deeper than {limits.max_json_depth} levels",
                          param=param, code="json_too_deep")


def _children(node: Any) -> Iterable[Any] | None:
    if isinstance(node, dict):
        return node.values()
    if isinstance(node, list):
        return node
    return None


def measure(value: Any, param: str, limits: Limits) -> int:
    """Walk ``value``: 400 past ``max_json_depth`` levels (``{}`` and ``[]``
    are one level) or for NaN/infinity; returns its ``enum`` entries."""
    enum = 0
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = _children(node)
        if children is None:
            if isinstance(node, float) and not math.isfinite(node):
                raise InvalidRequest(f"{param} holds a number that is not finite", param=param)
            continue
        if depth > limits.max_json_depth:
            raise _too_deep(param, limits)
        if isinstance(node, dict) and isinstance(node.get("enum"), list):
            enum += len(node["enum"])
        stack.extend((child, depth + 1) for child in children)
    return enum


def check_free_json(value: Any, param: str, limits: Limits, max_bytes: int,
                    code: str = "schema_too_large") -> int:
    """Size, then depth and numbers, of one free-form value; returns its enum entries."""
    size = serialised_size(value, param, limits)
    if size > max_bytes:
        raise InvalidRequest(f"{param} is {size} bytes as JSON; this model takes at most "
                             f"{max_bytes}", param=param, code=code)
    return measure(value, param, limits)


def check_enum(count: int, param: str, limits: Limits) -> None:
    if count > limits.max_schema_enum:
        raise InvalidRequest(f"{param} has {count} enum entries; this model takes at most "
                             f"{limits.max_schema_enum}", param=param, code="schema_too_large")


def check_metadata(metadata: dict[str, Any] | None, limits: Limits) -> None:
    """``metadata`` is forwarded to the worker; a ``grammar`` in it is a
    grammar the worker compiles, so it has the schema's size limit."""
    if not metadata:
        return
    grammar = metadata.get("grammar")
    if isinstance(grammar, str) and len(grammar.encode()) > limits.max_schema_bytes:
        raise InvalidRequest(f"metadata.grammar is longer than {limits.max_schema_bytes} bytes",
                             param="metadata.grammar", code="schema_too_large")
    check_free_json(metadata, "metadata", limits, limits.max_metadata_bytes,
                    code="metadata_too_large")


def check_stop(stop: str | list[str] | None, limits: Limits) -> None:
    sequences = [stop] if isinstance(stop, str) else stop or []
    for text in sequences:
        if len(text) > limits.max_stop_chars:
            raise InvalidRequest(
                f"stop sequences are at most {limits.max_stop_chars} characters; got one of "
                f"{len(text)}", param="stop", code="stop_too_long")


def check_logit_bias(bias: dict[str, float] | None, limits: Limits) -> None:
    """Keys are token ids (integer strings) within the vocabulary; values -100..100."""
    if not bias:
        return
    vocab = limits.vocab_size or UNKNOWN_VOCAB
    for key, value in bias.items():
        if not _TOKEN_ID.fullmatch(key) or int(key) >= vocab:
            raise InvalidRequest(
                f"logit_bias keys are token ids from 0 to {vocab - 1}; got {key[:40]!r}",
                param="logit_bias", code="invalid_logit_bias")
        if not -100 <= value <= 100:
            raise InvalidRequest(f"logit_bias values are between -100 and 100; token {key} has "
                                 f"{value:g}", param="logit_bias", code="invalid_logit_bias")
