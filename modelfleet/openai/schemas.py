"""A structural check that a value is a JSON Schema (tool ``parameters``, a
``response_format`` schema) before a worker compiles it into a grammar.

Not a full metaschema validation: every subschema must be an object (or
``true``/``false``), and the keywords a grammar is built from must have the
types the JSON Schema specification gives them (``type``, ``properties``,
``items``, ``required``, ``enum``, ``anyOf``...), and counts
(``minLength``, ``maxItems``...) are within the model's
``limits.max_schema_repeat``.  Other keywords are annotations and pass.
The walk is iterative; callers bound the size first
(``bounds.check_free_json``).
"""

from __future__ import annotations

from typing import Any

from modelfleet.catalog import Limits
from modelfleet.errors import InvalidRequest

TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_ONE = ("not", "additionalProperties", "contains", "propertyNames", "if", "then", "else",
        "unevaluatedProperties", "unevaluatedItems", "additionalItems")
_STRINGS = ("title", "description", "$ref", "pattern", "format", "$id", "$schema", "$anchor")
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
           "minContains", "maxContains")
_NUMBERS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


class NotASchema(ValueError):
    """``str(exc)``: what is wrong, and where below the checked value."""


class TooManyRepeats(NotASchema):
    """A count keyword (``minLength``, ``maxItems``...) past the model's bound:
    a grammar repeats its rule that many times, and every token pays for it."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_type(value: Any, where: str) -> None:
    names = value if isinstance(value, list) else [value]
    if not names or not all(isinstance(n, str) and n in TYPES for n in names):
        raise NotASchema(f"{where}.type must be one of {', '.join(sorted(TYPES))} "
                         "(or a list of them)")


def _check_counts(node: dict[str, Any], where: str, max_repeat: int) -> None:
    for key in _COUNTS:
        if key not in node:
            continue
        value = node[key]
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            raise NotASchema(f"{where}.{key} must be a non-negative integer")
        if value > max_repeat:
            raise TooManyRepeats(f"{where}.{key} is {value}; this model takes at most {max_repeat}")


def _check_scalars(node: dict[str, Any], where: str) -> None:
    if "type" in node:
        _check_type(node["type"], where)
    required = node.get("required")
    if required is not None and not (isinstance(required, list)
                                     and all(isinstance(r, str) for r in required)):
        raise NotASchema(f"{where}.required must be a list of property names")
    if "enum" in node and not isinstance(node["enum"], list):
        raise NotASchema(f"{where}.enum must be a list")
    for key in _STRINGS:
        if key in node and not isinstance(node[key], str):
            raise NotASchema(f"{where}.{key} must be a string")
    for key in _NUMBERS:
        if key in node and not _is_number(node[key]):
            raise NotASchema(f"{where}.{key} must be a number")


def _subschemas(node: dict[str, Any], where: str) -> list[tuple[Any, str]]:
    """The schemas inside ``node``, with their paths."""
    out: list[tuple[Any, str]] = []
    for key in _MAPS:
        if key in node:
            if not isinstance(node[key], dict):
                raise NotASchema(f"{where}.{key} must be an object of schemas")
            out.extend((sub, f"{where}.{key}.{name}") for name, sub in node[key].items())
    for key in _LISTS:
        if key in node:
            if not isinstance(node[key], list) or not node[key]:
                raise NotASchema(f"{where}.{key} must be a non-empty list of schemas")
            out.extend((sub, f"{where}.{key}[{i}]") for i, sub in enumerate(node[key]))
    out.extend((node[key], f"{where}.{key}") for key in _ONE if key in node)
    items = node.get("items")
    if isinstance(items, list):  # draft 4-7 tuple form
        out.extend((sub, f"{where}.items[{i}]") for i, sub in enumerate(items))
    elif "items" in node:
        out.append((items, f"{where}.items"))
    return out


def check_schema(schema: Any, max_repeat: int, where: str = "") -> None:
    """Raise ``NotASchema`` unless ``schema`` is structurally a JSON Schema
    whose counts are at most ``max_repeat``."""
    stack = [(schema, where)]
    while stack:
        node, path = stack.pop()
        if isinstance(node, bool) and path != where:
            continue  # true / false schemas, below the top level
        if not isinstance(node, dict):
            raise NotASchema(f"{path} must be a JSON Schema object (or true/false)")
        _check_scalars(node, path)
        _check_counts(node, path, max_repeat)
        stack.extend(_subschemas(node, path))


def check_tool_parameters(parameters: dict[str, Any], param: str, limits: Limits) -> None:
    """A function's parameters: ``{}`` (no parameters) or a schema of type object."""
    if not parameters:
        return
    if parameters.get("type") != "object":
        raise InvalidRequest(f"{param} must be a JSON Schema with \"type\": \"object\"",
                             param=param, code="invalid_schema")
    _raise_invalid(parameters, param, limits)


def check_response_schema(schema: dict[str, Any], param: str, limits: Limits) -> None:
    _raise_invalid(schema, param, limits)


def _raise_invalid(schema: dict[str, Any], param: str, limits: Limits) -> None:
    try:
        check_schema(schema, limits.max_schema_repeat)
    except TooManyRepeats as exc:
        raise InvalidRequest(f"{param}{exc}", param=param, code="schema_too_large") from None
    except NotASchema as exc:
        raise InvalidRequest(f"{param} is not a JSON Schema: {param}{exc}", param=param,
                             code="invalid_schema") from None
