"""POST /v1/chat/completions and /v1/completions: parse, call the gateway, render."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from modelfleet.api.auth import require
from modelfleet.api.http import read_body, request_id
from modelfleet.catalog import ModelSpec
from modelfleet.errors import ModelfleetError, RequestTooLarge
from modelfleet.gateway import Call
from modelfleet.keys import Scope
from modelfleet.openai import chat, completions
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


def router(services: Services) -> APIRouter:
    api = APIRouter()
    gateway = services.gateway
    limit = services.settings.http.max_body_bytes

    async def run(
        request: Request,
        model: type[Any],
        validate: Callable[[ModelSpec, Any], int],
        build: Callable[[ModelSpec, Any, int], dict[str, Any]],
        path: str,
    ) -> Response:
        principal = await require(services.keys, request, Scope.inference)
        raw = await read_body(request, limit)
        body = parse_body(model, raw)
        spec = gateway.resolve(body.model)
        if len(raw) > spec.limits.max_request_bytes:
            raise RequestTooLarge(
                f"request body is {len(raw)} bytes; model {spec.id!r} takes at most "
                f"{spec.limits.max_request_bytes}"
            )
        call: Call | None = None
        try:
            max_tokens = validate(spec, body)
            payload = gateway.fleet.pools[spec.id].engine.adapt(
                build(spec, body, max_tokens), body.metadata
            )
            stream = bool(body.stream)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            if stream:
                payload["stream"] = True
                payload["stream_options"] = {"include_usage": True}
            call = Call(
                request_id=request_id(request),
                route_model=body.model,
                spec=spec,
                principal=principal,
                path=path,
                payload=payload,
                stream=stream,
                include_usage=include_usage,
            )
            if stream:
                events = await gateway.open_stream(call)
                return StreamingResponse(
                    events,
                    media_type="text/event-stream",
                    headers={**SSE_HEADERS, **call.headers()},
                )
            result = await gateway.complete(call)
            return JSONResponse(result, headers=call.headers())
        except ModelfleetError as exc:
            exc.headers.update(call.headers() if call else {
                "X-Model-Used": spec.id, "X-Route-Model": body.model, "X-Backend": spec.backend,
            })
            raise

    @api.post(
        "/v1/chat/completions",
        tags=["inference"],
        openapi_extra=_openapi_body(chat.ChatRequest),
    )
    async def chat_completions(request: Request) -> Response:
        return await run(
            request, chat.ChatRequest, chat.validate_chat, chat.worker_body, "/v1/chat/completions"
        )

    @api.post(
        "/v1/completions",
        tags=["inference"],
        openapi_extra=_openapi_body(completions.CompletionRequest),
    )
    async def text_completions(request: Request) -> Response:
        return await run(
            request,
            completions.CompletionRequest,
            completions.validate_completion,
            completions.worker_body,
            "/v1/completions",
        )

    return api
