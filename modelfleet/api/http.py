"""Small request helpers shared by the routes: body reading, keys, request ids."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modelfleet.errors import InvalidRequest, RequestTooLarge
from modelfleet.ids import new_id

REQUEST_ID = "modelfleet.request_id"


def check_json_content_type(request: Request) -> None:
    """Every route with a body takes JSON: a ``Content-Type`` other than
    ``application/json`` (with, at most, ``charset=utf-8``) is 400
    ``unsupported_content_type``.  A request without the header is read as JSON."""
    header = request.headers.get("content-type")
    if header is None:
        return
    media, *params = header.split(";")
    ok = media.strip().lower() == "application/json"
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() != "utf-8":
            ok = False
    if not ok:
        raise InvalidRequest(
            f"Content-Type must be application/json, got {header[:100]!r} (curl: add "
            "-H 'Content-Type: application/json')", param="Content-Type",
            code="unsupported_content_type")


async def read_body(request: Request, limit: int, *, json: bool = True) -> bytes:
    """The body of a JSON request, after its content type was checked (400;
    ``json`` False: the caller checked it) and while its size stays within
    ``limit`` (413)."""
    if json:
        check_json_content_type(request)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"request body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def presented_key(request: Request) -> str | None:
    """The API key from ``Authorization: Bearer`` or ``x-api-key``."""
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return auth.strip()  # malformed: fails as an invalid key
    return request.headers.get("x-api-key")


def request_id(request: Request) -> str:
    return str(request.scope[REQUEST_ID])


class RequestIdMiddleware:
    """Gives every request an id, returned as ``X-Request-Id`` on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = new_id()
        scope[REQUEST_ID] = rid
        header = (b"x-request-id", rid.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers: list[Any] = list(message.get("headers", []))
                headers.append(header)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_id)
