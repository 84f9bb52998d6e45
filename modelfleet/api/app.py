"""The ASGI app: ``create_app(settings)`` builds the services and the routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from modelfleet import __version__
from modelfleet.api import account, admin, catalog_routes, errors, images, inference, metrics_route
from modelfleet.api.http import RequestIdMiddleware
from modelfleet.services import Services
from modelfleet.settings import Settings


def create_app(settings: Settings, services: Services | None = None) -> FastAPI:
    services = services or Services.build(settings)

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
    app.include_router(inference.router(services))
    app.include_router(images.router(services))
    app.include_router(images.jobs_router(services))
    app.include_router(catalog_routes.router(services))
    app.include_router(catalog_routes.fleet_router(services))
    app.include_router(metrics_route.router(services.metrics))
    app.include_router(admin.router(services))
    app.include_router(account.router(services))
    app.add_middleware(RequestIdMiddleware)

    @app.get("/health", include_in_schema=False)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
