"""The playground: chat and image jobs run with the session's key, through
the gateway's own request path.

The browser never holds a key, so the console cannot call ``/v1`` from the
page.  Instead it builds its own copy of the inference and image routes over
the same services, with one difference: the caller is the signed-in
session's principal, given for the duration of the call, instead of a key
read from headers.  Admission, limits, holds, queueing, cold start,
dispatch, streaming, settlement and the response headers are the gateway's,
unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, cast

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from modelfleet.api import errors, images, inference
from modelfleet.console.web import Web
from modelfleet.errors import AuthenticationError, ModelfleetError, NotFound
from modelfleet.keys import Principal
from modelfleet.services import Services
from modelfleet.tables import UsageRecord

Handler = Callable[[Request], Awaitable[Response]]


class SessionKeys:
    """Stands in for ``KeyService.authenticate`` in the playground's routes:
    the principal is the session's, set by the console for one call."""

    def __init__(self) -> None:
        self.current: ContextVar[Principal | None] = ContextVar("console_principal", default=None)

    async def authenticate(self, raw: str | None) -> Principal:
        principal = self.current.get()
        if principal is None:
            raise AuthenticationError("no console session", code="invalid_api_key")
        return principal


class _AsSession:
    """The platform's services, with the session's principal as the caller."""

    def __init__(self, services: Services, keys: SessionKeys) -> None:
        self._services = services
        self.keys = keys

    def __getattr__(self, name: str) -> Any:
        return getattr(self._services, name)


def _endpoint(routes: list[BaseRoute], path: str) -> Handler:
    for route in routes:
        if getattr(route, "path", None) == path:
            return cast(Handler, route.endpoint)  # type: ignore[attr-defined]
    raise LookupError(path)


class Playground:
    def __init__(self, services: Services, web: Web) -> None:
        self.services = services
        self.web = web
        self.keys = SessionKeys()
        proxy = cast(Services, _AsSession(services, self.keys))
        handlers: dict[str, inference.Handler] = {}
        inference.router(proxy, handlers)
        self.chat = handlers[inference.CHAT_PATH]
        self.image = _endpoint(images.router(proxy).routes, "/v1/inference/image")

    async def page(self, request: Request) -> Response:
        ctx = await self.web.ctx(request)
        project = self.services.projects.project(ctx.principal.project_id)
        models = [{"id": s.id, "kind": s.kind.value} for s in self.services.catalog
                  if project is None or project.may_use(s.id)]
        return self.web.render(ctx, "playground.html", page="playground", models=models)

    async def _run(self, request: Request, handler: Handler) -> Response:
        ctx = await self.web.ctx(request)
        self.web.check_header_csrf(ctx)
        token = self.keys.current.set(ctx.principal)
        try:
            return await handler(request)
        except ModelfleetError as exc:
            return errors.render(exc)
        finally:
            self.keys.current.reset(token)

    async def run_chat(self, request: Request) -> Response:
        """``POST /v1/chat/completions`` as the session's key (streamed or not)."""
        return await self._run(request, self.chat)

    async def run_image(self, request: Request) -> Response:
        """``POST /v1/inference/image`` as the session's key."""
        return await self._run(request, self.image)

    async def cost(self, request: Request) -> Response:
        """What a request of this project was charged (its usage record)."""
        ctx = await self.web.ctx(request, touch=False)
        async with self.services.db.session() as session:
            row = await session.get(UsageRecord, request.path_params["request_id"])
        if row is None or row.project_id != ctx.principal.project_id:
            return errors.render(NotFound("no usage record for this request yet",
                                          code="usage_not_found"))
        return JSONResponse({"request_id": row.request_id, "status": row.status,
                             "input_tokens": row.input_tokens, "output_tokens": row.output_tokens,
                             "images": row.images, "cost": int(row.cost),
                             "wait_ms": row.wait_ms, "run_ms": row.run_ms,
                             "total_ms": row.total_ms})
