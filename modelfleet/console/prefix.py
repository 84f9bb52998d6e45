"""Serving under a path prefix (a reverse proxy at ``https://host/mf/``).

The console builds every URL from the prefix a request came under: the ASGI
``root_path`` (``modelfleet serve --root-path /mf``), else the proxy's
``X-Forwarded-Prefix`` header.  Nothing is fixed when the package is built, so
one install works at ``/``, ``/mf`` or ``/a/b`` alike.
"""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

# A prefix is path segments of safe characters: it is written into pages and cookies.
_PREFIX = re.compile(r"^(/[A-Za-z0-9._~-]+)*$")


def clean_prefix(value: str | None) -> str:
    """``value`` without a trailing slash, or "" when it is empty or unsafe."""
    text = (value or "").strip().rstrip("/")
    return text if _PREFIX.fullmatch(text) else ""


def prefix_of(request: Request) -> str:
    return clean_prefix(request.scope.get("root_path")) or \
        clean_prefix(request.headers.get("x-forwarded-prefix"))


class RootPath:
    """Sets the ASGI ``root_path`` of every request (``serve --root-path``).

    The proxy in front strips the prefix, as uvicorn's ``--root-path`` expects;
    a request that still carries it is routed too (Starlette drops a leading
    ``root_path`` from the path before matching).  The path itself is left as
    it came, so the inference fast path (``api/app.py``) still matches it."""

    def __init__(self, app: ASGIApp, root_path: str) -> None:
        cleaned = clean_prefix(root_path)
        if cleaned != root_path.rstrip("/"):
            raise ValueError(f"--root-path must look like /segment[/segment...], got {root_path!r}")
        self.app = app
        self.root_path = cleaned

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, "root_path": self.root_path + scope.get("root_path", "")}
        await self.app(scope, receive, send)
