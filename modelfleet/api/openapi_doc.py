"""The OpenAPI document (``/openapi.json``), as the API really answers.

FastAPI writes the paths, parameters, request bodies and success responses
from the routes.  What a handler raises it cannot see, so each route states
its errors in its decorator, ``responses=errors(404, scope="admin")``, and
``install`` finishes the document once, on first use:

- ``components.schemas.Error``: the one error body (``modelfleet/errors.py``).
  FastAPI's ``HTTPValidationError`` 422 is replaced by it, because a bad
  parameter or body is answered in that shape (``api/errors.py``).
- Authentication: a route that takes a key declares 401 and 403
  (``scope=...``) and so requires one of the two security schemes,
  ``Authorization: Bearer`` or ``x-api-key``; the others have ``security: []``.
- 429 with ``Retry-After`` and the rate-limit headers on rate-limited routes,
  whose other responses carry the same limit headers.
- Statuses any request can get from the server itself: 400 (not valid HTTP), 408 and 431 (headers
  or body too slow, headers too large) and 503 (too many connections, a
  store that is down), and ``X-Request-Id`` on every response.
- ``components.responses`` for a path that does not exist (404) and a method
  a path does not take (405, with ``Allow``).
- pydantic's ``$defs`` in request bodies are moved to ``components.schemas``:
  in OpenAPI 3.1 a ``#/$defs/...`` reference resolves against the document's
  root, where there are none.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

Responses = dict[int | str, dict[str, Any]]

ERROR_REF = "#/components/schemas/Error"
SCHEMAS = "#/components/schemas/"

ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "description": "Every error, whatever the route (docs/api.md, Errors).",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code", "param"],
            "properties": {
                "message": {"type": "string", "description": "For a person to read."},
                "type": {"type": "string", "description": "Fixed by the HTTP status.",
                         "examples": ["invalid_request_error", "authentication_error"]},
                "code": {"type": "string", "description": "The machine-readable reason.",
                         "examples": ["model_not_found", "rate_limit_requests"]},
                "param": {"type": ["string", "null"],
                          "description": "The offending field or parameter, if one is."},
                "status": {"type": "integer", "description": "The HTTP status again."},
            },
        }
    },
}

DESCRIPTIONS: dict[int, str] = {
    400: "Valid in shape, but not for this model, route or state, or sent with a "
         "`Content-Type` other than JSON (`invalid_request_error`); or not valid HTTP at "
         "all, such as a malformed `Content-Length` (`invalid_http_request`, from the "
         "server; the connection is closed).",
    401: "No key, or a key that is malformed, unknown, revoked or expired "
         "(`missing_api_key`, `invalid_api_key`, `revoked_api_key`, `expired_api_key`).",
    403: "The key lacks the scope, or `x-project-id` names another project "
         "(`insufficient_scope`, `project_mismatch`).",
    404: "No such model, project, key or job, or one this key may not see.",
    405: "The path does not take this method; `Allow` lists those it takes.",
    408: "The request's headers or body did not arrive in time; the connection is closed.",
    409: "The state forbids it (a project name taken, a job no longer queued).",
    413: "The body is larger than the route takes.",
    422: "A parameter or the body does not have the documented shape, or is not JSON "
         "(`validation_error`, `invalid_json`, `invalid_body`).",
    429: "A rate limit of the key's plan; retry after `Retry-After` seconds.",
    431: "The request's headers are too large; the connection is closed.",
    502: "A worker answered with something modelfleet could not use.",
    503: "Cannot serve now: the model cannot start, a store is down, or the server has "
         "too many connections.",
    504: "The request's deadline passed while it waited or ran.",
}

HEADERS: dict[str, dict[str, Any]] = {
    "X-Request-Id": {"description": "This request's id (UUIDv7).", "schema": {"type": "string"}},
    "Retry-After": {"description": "Seconds until the limit allows the request.",
                    "schema": {"type": "string", "pattern": "^[0-9]+$"}},
    "Allow": {"description": "The methods this path takes.", "required": True,
              "schema": {"type": "string"}},
    "X-RateLimit-Tier": {"description": "The key's plan.", "schema": {"type": "string"}},
    "X-RateLimit-Limit": {"description": "Requests per minute (the tighter of key and project).",
                          "schema": {"type": "string"}},
    "X-RateLimit-Remaining": {"description": "Requests left in the window.",
                              "schema": {"type": "string"}},
    "X-RateLimit-Reset": {"description": "Unix time when the request window is full again.",
                          "schema": {"type": "string"}},
    **{f"x-ratelimit-{what}-{kind}": {"description": f"OpenAI's {what} header for {kind}.",
                                      "schema": {"type": "string"}}
       for kind in ("requests", "tokens") for what in ("limit", "remaining", "reset")},
}
RATE_LIMIT_HEADERS = [h for h in HEADERS if h.lower().startswith("x-ratelimit-")]

SECURITY_SCHEMES: dict[str, Any] = {
    "bearer": {"type": "http", "scheme": "bearer",
               "description": "`Authorization: Bearer mf-...`"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key",
               "description": "`x-api-key: mf-...` (the same keys)."},
}
KEYED: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]

# Answered by the server for any request, before (or instead of) a route.
ANY_REQUEST = {"400": "BadHttpRequest", "408": "RequestTimeout", "431": "HeadersTooLarge",
               "503": "ServiceUnavailable"}

# A streamed chat or text completion (``stream: true``).
EVENT_STREAM: Responses = {200: {"content": {"text/event-stream": {
    "schema": {"type": "string", "description": "Server-sent events, ending with `data: [DONE]`."}}}}}
PNG: Responses = {200: {"content": {"image/png": {
    "schema": {"type": "string", "contentMediaType": "image/png"}}}}}


def _error_response(status: int, description: str | None = None) -> dict[str, Any]:
    return {"description": description or DESCRIPTIONS[status],
            "content": {"application/json": {"schema": {"$ref": ERROR_REF}}}}


def errors(*statuses: int, scope: str | None = None, rate_limited: bool = False,
           billed: bool = False) -> Responses:
    """The ``responses=`` of a route: the error statuses its handler can send.
    ``scope``: the route takes a key with this scope ("any": any valid key),
    so it can also answer 401 and 403.  ``rate_limited``: 429, and the limit
    headers on its answers.  ``billed``: 403 when the credit does not cover it."""
    out: Responses = {status: _error_response(status) for status in statuses}
    if scope is not None:
        out[401] = _error_response(401)
        reasons = ["`x-project-id` names another project (`project_mismatch`)"]
        if scope != "any":
            reasons.insert(0, f"the key lacks the `{scope}` scope, which `admin` includes "
                              "(`insufficient_scope`)")
        if billed:
            reasons.append("the project's available credit does not cover the worst-case "
                           "cost (`insufficient_credits`, type `insufficient_quota`)")
        text = "; or ".join(reasons)
        out[403] = _error_response(403, text[0].upper() + text[1:] + ".")
    if rate_limited:
        out[429] = {**_error_response(429), "headers": {
            name: {"$ref": f"#/components/headers/{name}"}
            for name in ["Retry-After", *RATE_LIMIT_HEADERS]}}
    return out


def _components_responses() -> dict[str, Any]:
    def with_header(status: int, *names: str) -> dict[str, Any]:
        return {**_error_response(status),
                "headers": {n: {"$ref": f"#/components/headers/{n}"} for n in names}}

    return {
        "NotFound": {**with_header(404, "X-Request-Id"),
                     "description": "No route has this path (`not_found`)."},
        "MethodNotAllowed": with_header(405, "Allow", "X-Request-Id"),
        "BadHttpRequest": _error_response(400),
        "RequestTimeout": _error_response(408),
        "HeadersTooLarge": _error_response(431),
        "ServiceUnavailable": with_header(503, "Retry-After"),
    }


INFO_DESCRIPTION = """\
Every error is a JSON body `{"error": {"message", "type", "code", "param", "status"}}`
(`#/components/schemas/Error`); the statuses each operation can answer are
listed with it. A path that no route has answers 404
(`#/components/responses/NotFound`); a method that a path does not take
answers 405 with `Allow` (`#/components/responses/MethodNotAllowed`). Send the
key as `Authorization: Bearer KEY` or `x-api-key: KEY`."""


# -- finishing FastAPI's document ----------------------------------------------------


def _walk(node: Any, visit: Callable[[dict[str, Any]], None]) -> None:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            visit(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _hoist_defs(schema: dict[str, Any], schemas: dict[str, Any]) -> None:
    """Move ``schema``'s ``$defs`` into ``components.schemas`` (a name already
    used for another schema gets a suffix) and point its references there."""
    defs: dict[str, Any] = schema.pop("$defs", {})
    names: dict[str, str] = {}
    for name, body in defs.items():
        target, n = name, 1
        while target in schemas and schemas[target] != body:
            n += 1
            target = f"{name}{n}"
        names[name] = target
    moved = {names[name]: body for name, body in defs.items()}

    def moved_ref(ref: Any) -> Any:
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return SCHEMAS + names[ref.removeprefix("#/$defs/")]
        return ref

    def repoint(node: dict[str, Any]) -> None:
        if "$ref" in node:
            node["$ref"] = moved_ref(node["$ref"])
        mapping = node.get("discriminator", {}).get("mapping") if "discriminator" in node else None
        if isinstance(mapping, dict):
            node["discriminator"]["mapping"] = {k: moved_ref(v) for k, v in mapping.items()}

    _walk([schema, moved], repoint)
    schemas.update(moved)


def _finish_operation(op: dict[str, Any], schemas: dict[str, Any]) -> None:
    for media in op.get("requestBody", {}).get("content", {}).values():
        if isinstance(media.get("schema"), dict):
            _hoist_defs(media["schema"], schemas)
    responses: dict[str, Any] = op["responses"]
    if "422" in responses and "HTTPValidationError" in str(responses["422"]):
        responses["422"] = _error_response(422)
    op["security"] = copy.deepcopy(KEYED) if "401" in responses else []
    for status, name in ANY_REQUEST.items():
        responses.setdefault(status, {"$ref": f"#/components/responses/{name}"})
    limited = "429" in responses
    for status, response in responses.items():
        if "$ref" in response:
            continue
        headers = response.setdefault("headers", {})
        headers.setdefault("X-Request-Id", {"$ref": "#/components/headers/X-Request-Id"})
        if limited and status != "429":
            for name in RATE_LIMIT_HEADERS:
                headers.setdefault(name, {"$ref": f"#/components/headers/{name}"})
    op["responses"] = dict(sorted(responses.items()))


def finish(raw: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's document with the errors, headers and security the API really has."""
    doc = copy.deepcopy(raw)
    components = doc.setdefault("components", {})
    schemas: dict[str, Any] = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas["Error"] = copy.deepcopy(ERROR_SCHEMA)
    for item in doc.get("paths", {}).values():
        for op in item.values():
            _finish_operation(op, schemas)
    components["schemas"] = dict(sorted(schemas.items()))
    components["responses"] = _components_responses()
    components["headers"] = copy.deepcopy(HEADERS)
    components["securitySchemes"] = copy.deepcopy(SECURITY_SCHEMES)
    info = doc.setdefault("info", {})
    info["description"] = INFO_DESCRIPTION
    return doc


def install(app: FastAPI) -> None:
    """Serve the finished document at ``/openapi.json``; built once, on first use."""
    build = app.openapi
    cache: list[dict[str, Any]] = []

    def openapi() -> dict[str, Any]:
        if not cache:
            cache.append(finish(build()))
        return cache[0]

    app.openapi = openapi  # type: ignore[method-assign]
