"""The one place where errors become HTTP responses."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from modelfleet.errors import (
    MethodNotAllowed,
    ModelfleetError,
    NotFound,
    ValidationFailed,
)

log = logging.getLogger(__name__)


def render(error: ModelfleetError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(ModelfleetError)
    async def _ours(_request: Request, exc: ModelfleetError) -> JSONResponse:
        return render(exc)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return render(NotFound(f"no route for {request.method} {request.url.path}"))
        if exc.status_code == 405:
            return render(MethodNotAllowed(f"{request.method} is not allowed here",
                                           headers=dict(exc.headers or {})))
        error = ModelfleetError(str(exc.detail), code=f"http_{exc.status_code}")
        response = render(error)
        response.status_code = exc.status_code
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = ".".join(str(p) for p in first["loc"])
        return render(ValidationFailed(f"{loc}: {first['msg']}", param=loc or None))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return render(ModelfleetError("internal server error"))
