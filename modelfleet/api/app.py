"""The ASGI app: ``create_app(settings)`` builds the services and the routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from modelfleet import __version__, console
from modelfleet.api import (
    account,
    admin,
    batches,
    catalog_routes,
    errors,
    images,
    inference,
    metrics_route,
    openapi_doc,
    videos,
)
from modelfleet.api.http import REQUEST_ID, RequestIdMiddleware
from modelfleet.errors import ModelfleetError
from modelfleet.observe import AccessLog, configure_logging
from modelfleet.services import Services
from modelfleet.settings import Settings

log = logging.getLogger(__name__)


class FastPath:
    """The ASGI front of the app.  The inference POST routes (chat, completions,
    embeddings) go straight to their handlers; everything else goes through
    FastAPI.  Measured: FastAPI's routing and its middleware stack cost the
    inference path a few hundred microseconds per request (docs/benchmarks.md).
    The handlers are the same functions FastAPI registers (OpenAPI lists them),
    and errors are rendered by the same function."""

    def __init__(self, app: FastAPI, handlers: dict[str, inference.Handler]) -> None:
        self.app = app
        self.handlers = handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self.handlers.get(scope["path"]) if scope["type"] == "http" else None
        if handler is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            response = await handler(Request(scope, receive))
        except ModelfleetError as exc:
            response = errors.render(exc)
        except Exception as exc:
            log.error("unhandled error", exc_info=exc)
            response = errors.render(ModelfleetError("internal server error"))
        await response(scope, receive, send)


def create_app(settings: Settings, services: Services | None = None) -> ASGIApp:
    services = services or Services.build(settings)
    handlers: dict[str, inference.Handler] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await services.start()
        try:
            yield
        finally:
            await services.stop()

    app = FastAPI(
        title="modelfleet",
        version=__version__,
        summary="OpenAI-compatible inference over a self-hosted fleet of model workers",
        lifespan=lifespan,
    )
    errors.install(app)
    app.include_router(inference.router(services, handlers))
    app.include_router(images.router(services))
    app.include_router(images.jobs_router(services))
    app.include_router(videos.router(services))  # video jobs (docs/videos.md)
    app.include_router(batches.router(services))  # files and batches (docs/batches.md)
    app.include_router(catalog_routes.router(services))
    app.include_router(catalog_routes.fleet_router(services))
    app.include_router(metrics_route.router(services.metrics))
    app.include_router(admin.router(services))
    app.include_router(account.router(services))
    app.include_router(console.router(services))  # the web console (docs/console.md)
    openapi_doc.install(app)

    @app.get("/health", include_in_schema=False)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    # one log line per request (observe.py): the gateway writes it, or AccessLog does
    return RequestIdMiddleware(AccessLog(FastPath(app, handlers), services.gateway.observer,
                                         REQUEST_ID))


def create_app_from_env() -> ASGIApp:
    """The app of one ``modelfleet serve --workers N`` worker process: uvicorn
    imports it by name in each worker.  Its settings come from the environment
    the parent set (``MODELFLEET_DATA_DIR``, ``MODELFLEET_CATALOG``,
    ``MODELFLEET_HOST``, ``MODELFLEET_PORT``, ``MODELFLEET_LOG_LEVEL``, then
    what ``Settings.from_env`` reads).  The parent migrated the store and made
    the first start's key, so no worker does."""
    settings, log_level = Settings.for_worker_process()
    configure_logging(log_level, settings.observe.log_format)
    return create_app(settings)
