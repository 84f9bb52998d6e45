"""POST /v1/chat/completions and /v1/completions: parse, call the gateway, render."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask

from modelfleet.api.auth import require
from modelfleet.api.http import read_body, request_id
from modelfleet.catalog import ModelSpec
from modelfleet.errors import ModelfleetError, RequestTooLarge
from modelfleet.gateway import Call
from modelfleet.keys import Principal, Scope
from modelfleet.metering import Ticket
from modelfleet.openai import chat, completions, embeddings
from modelfleet.openai.common import parse_body
from modelfleet.services import Services

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


def _recorder(
    services: Services, principal: Principal, ticket: Ticket | None
) -> Callable[[Call], None]:
    """What happens once a request's work has ended: one place records it for
    the catalog's recent stats, the metrics and (when metering) the bill."""

    def finished(c: Call) -> None:
        if c.status in ("succeeded", "disconnected"):
            services.scheduler.queue(c.spec.id).stats.record(c.wait_s, c.run_s)
        if ticket is not None:
            ticket.settle(request_id=c.request_id, status=c.status, usage=c.usage,
                          wait_s=c.wait_s, run_s=c.run_s)
        services.metrics.request_finished(
            c.spec.id, principal.project_id, c.status, c.wait_s, c.run_s,
            int(c.usage.get("prompt_tokens", 0)), int(c.usage.get("completion_tokens", 0)))

    return finished


Handler = Callable[[Request], Awaitable[Response]]


def _fastapi_endpoint(endpoint: Handler) -> Handler:
    """The same handler with a signature FastAPI reads as "takes the request"."""

    async def handle(request: Request) -> Response:
        return await endpoint(request)

    return handle


def router(services: Services, handlers: dict[str, Handler] | None = None) -> APIRouter:
    """The inference routes.  ``handlers`` receives them by path, for the fast
    path in front of the framework (``api/app.py``)."""
    api = APIRouter()
    handlers = {} if handlers is None else handlers
    gateway = services.gateway
    metering = services.metering
    limit = services.settings.http.max_body_bytes

    async def run(
        request: Request,
        model: type[Any],
        validate: Callable[[ModelSpec, Any], int],
        build: Callable[[ModelSpec, Any, int], dict[str, Any]],
        path: str,
    ) -> Response:
        principal = await require(services, request, Scope.inference)
        headers: dict[str, str] = {}
        call: Call | None = None
        try:
            raw = await read_body(request, limit)
            body = parse_body(model, raw)
            spec = gateway.resolve(body.model)
            metering.check_model(principal, spec, body.model)
            headers.update({"X-Model-Used": spec.id, "X-Route-Model": body.model,
                            "X-Backend": spec.backend})
            if len(raw) > spec.limits.max_request_bytes:
                raise RequestTooLarge(
                    f"request body is {len(raw)} bytes; model {spec.id!r} takes at most "
                    f"{spec.limits.max_request_bytes}"
                )
            max_tokens = validate(spec, body)
            engine = gateway.fleet.pools[spec.id].engine
            payload = engine.adapt(build(spec, body, max_tokens), body.metadata)
            if body.stream:
                engine.prepare_stream(payload)
            call = Call(
                request_id=request_id(request),
                route_model=body.model,
                spec=spec,
                principal=principal,
                path=path,
                payload=payload,
                stream=bool(body.stream),
                include_usage=bool(body.stream_options and body.stream_options.include_usage),
                encoding_format=getattr(body, "encoding_format", None) or "float",
            )
            call.claim = metering.claim(principal, payload)
            ticket = metering.admit(principal, spec, payload, max_tokens) \
                if metering.enabled else None
            if ticket is not None:
                headers.update(ticket.headers)

            call.on_finish = _recorder(services, principal, ticket)
            if call.stream:
                events = await gateway.open_stream(call)
                return StreamingResponse(
                    events, media_type="text/event-stream",
                    headers={**SSE_HEADERS, **headers, **call.headers()},
                )
            result = await gateway.complete(call)
            return Response(orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY),
                            media_type="application/json", headers={**headers, **call.headers()},
                            background=BackgroundTask(call.finish))
        except ModelfleetError as exc:
            if metering.enabled and "X-RateLimit-Tier" not in headers:
                # refused before admission: report the limits without taking from them
                headers.update(metering.peek_headers(principal))
            exc.headers = {**headers, **exc.headers}
            if call is None or not call.on_finish:
                services.metrics.request_rejected(headers.get("X-Model-Used", "unknown"),
                                                  principal.project_id, exc.status)
            raise

    routes: dict[str, tuple[type[Any], Callable[[ModelSpec, Any], int],
                            Callable[[ModelSpec, Any, int], dict[str, Any]]]] = {
        "/v1/chat/completions": (chat.ChatRequest, chat.validate_chat, chat.worker_body),
        "/v1/completions": (completions.CompletionRequest, completions.validate_completion,
                            completions.worker_body),
        "/v1/embeddings": (embeddings.EmbeddingRequest, embeddings.validate_embedding,
                           embeddings.worker_body),
    }
    for path, (model, validate, build) in routes.items():

        async def endpoint(request: Request, model: type[Any] = model,
                           validate: Callable[[ModelSpec, Any], int] = validate,
                           build: Callable[[ModelSpec, Any, int], dict[str, Any]] = build,
                           path: str = path) -> Response:
            return await run(request, model, validate, build, path)

        handlers[path] = endpoint
        api.add_api_route(path, _fastapi_endpoint(endpoint), methods=["POST"], tags=["inference"],
                          openapi_extra=_openapi_body(model), name=path.rsplit("/", 1)[-1])
    return api
