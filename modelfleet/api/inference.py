"""POST /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/tokenize,
/v1/detokenize and /v1/rerank: parse, then one response that runs the
request through ``Gateway.handle`` and renders it.

The response object is where the request is owned: its ``__call__`` runs in
the task that serves the HTTP request, enters ``Gateway.handle`` (admission,
queue, dispatch), sends the answer or the stream, and leaves it, which
settles the request in that same task on the event loop."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

from modelfleet.api import errors, openapi_doc, responses
from modelfleet.api.auth import require
from modelfleet.api.http import presented_key, read_body, request_id
from modelfleet.batches import Terms
from modelfleet.catalog import ModelSpec
from modelfleet.engines.http import WorkerClient
from modelfleet.errors import ModelfleetError, ModelNotFound, RequestTooLarge
from modelfleet.gateway import Call, Starting
from modelfleet.keys import Principal
from modelfleet.keys import Scope as KeyScope
from modelfleet.observe import key_prefix, rejected_record
from modelfleet.openai import chat, completions, embeddings, rerank, taskchat, tokenize
from modelfleet.openai.common import parse_body
from modelfleet.openai.responses import RESPONSES_PATH, ResponsesRequest
from modelfleet.responsestore import ResponseStore
from modelfleet.scheduler import Lease
from modelfleet.services import Services

log = logging.getLogger(__name__)
CHAT_PATH = "/v1/chat/completions"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Renders a worker's answer in the endpoint's shape (and may count its usage,
# or store it: then it returns an awaitable).
Finish = Callable[[Call, dict[str, Any]], dict[str, Any] | Awaitable[dict[str, Any]]]
# Renders a stream's events in the endpoint's shape (the Responses API's events).
Events = Callable[[Call, AsyncIterator[bytes]], AsyncIterator[bytes]]


class Work(Protocol):
    """An endpoint whose worker calls differ from the OpenAI ones
    (``openai/tokenize.py``, ``openai/rerank.py``): the worker path and body,
    a step on the won slot before the gateway posts, and the answer rendered
    from the worker's.  ``settle_before_end`` is false where ``finish`` counts
    the usage (then the request is settled after its answer is rendered)."""

    path: str
    payload: dict[str, Any]
    settle_before_end: bool

    async def starting(self, lease: Lease) -> None: ...

    def finish(self, call: Call, body: dict[str, Any]) -> dict[str, Any]: ...


WorkFactory = Callable[[ModelSpec, str, Any, dict[str, Any], WorkerClient], Work]
WORK: dict[str, WorkFactory] = {
    tokenize.TOKENIZE_PATH: tokenize.TokenWork,
    tokenize.DETOKENIZE_PATH: tokenize.TokenWork,
    rerank.RERANK_PATH: rerank.RerankWork,
}


def _openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


async def rate_headers(services: Services, principal: Principal,
                       exc: ModelfleetError) -> dict[str, str]:
    """A refused request's limit headers, read without taking from the limits."""
    if not services.metering.enabled or "X-RateLimit-Tier" in exc.headers \
            or exc.code == "limits_unavailable":
        return {}
    try:
        return await services.metering.peek_headers(principal)
    except ModelfleetError:
        return {}


class OwnedResponse(Response):
    """Runs one request through ``Gateway.handle`` and renders what it yields.
    An error before anything was sent is rendered as an HTTP error; after a
    stream has started, the gateway turns it into a final SSE error event."""

    def __init__(self, services: Services, call: Call, principal: Principal, *,
                 starting: Starting | None = None, finish: Finish | None = None,
                 events: Events | None = None) -> None:
        super().__init__()
        self.services = services
        self.call = call
        self.principal = principal
        self.starting = starting
        self.finish = finish
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        call = self.call
        # A non-streamed request: a client that goes away while it waits or runs
        # cancels it (the worker request is stopped); a stream notices by itself.
        watch = None if call.stream else _Watch(receive, call)
        try:
            async with self.services.gateway.handle(call, self.starting) as answer:
                if watch is not None:
                    watch.stop()
                headers = {**call.rate_headers, **call.headers()}
                response: Response
                if answer.events is not None:
                    events = answer.events if self.events is None \
                        else self.events(call, answer.events)
                    response = StreamingResponse(events, media_type="text/event-stream",
                                                 headers={**SSE_HEADERS, **headers})
                else:
                    response = Response(
                        orjson.dumps(await self._body(answer.body),
                                     option=orjson.OPT_SERIALIZE_NUMPY),
                        media_type="application/json", headers=headers)
                await response(scope, receive, tracked)
        except ClientDisconnect:
            return  # the client left; the request was settled as it ended
        except asyncio.CancelledError:
            if watch is None or not watch.fired:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            return  # the client left; the request was cancelled and settled
        except ModelfleetError as exc:
            if started:
                return
            exc.headers = {**call.rate_headers, **(await rate_headers(
                self.services, self.principal, exc)), **call.headers(), **exc.headers}
            if call.admit is not None and call.ticket is None:  # refused at admission
                self.services.metrics.request_rejected(call.spec.id, self.principal.project_name,
                                                       exc.status)
            await errors.render(exc)(scope, receive, send)
        except Exception as exc:
            if started:
                raise
            log.error("request %s failed", call.request_id, exc_info=exc)
            await errors.render(ModelfleetError("internal server error"))(scope, receive, send)
        finally:
            if watch is not None:
                watch.stop()


    async def _body(self, body: dict[str, Any] | None) -> dict[str, Any] | None:
        if self.finish is None or body is None:
            return body
        out = self.finish(self.call, body)
        return await out if inspect.isawaitable(out) else out


class _Watch:
    """Cancels the task serving a request when its client disconnects (the
    body was read already, so the next message is the disconnect), while the
    request waits or runs: never once its settlement began."""

    __slots__ = ("_task", "fired")

    def __init__(self, receive: Receive, call: Call) -> None:
        self.fired = False
        self._task: asyncio.Task[None] | None = asyncio.get_running_loop().create_task(
            self._wait(receive, call, asyncio.current_task()))

    async def _wait(self, receive: Receive, call: Call, owner: asyncio.Task[Any] | None) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        # The owner is suspended at an await of the phase it is in: if that
        # phase may be cancelled, the cancellation lands there.
        if owner is not None and self._task is not None and call.cancellable:
            self.fired = True
            owner.cancel()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


Handler = Callable[[Request], Awaitable[Response]]
# The routes that never stream.
NOT_STREAMED = frozenset({"/v1/embeddings", *WORK})


def _fastapi_endpoint(endpoint: Handler) -> Handler:
    """The same handler with a signature FastAPI reads as "takes the request"."""

    async def handle(request: Request) -> Response:
        return await endpoint(request)

    return handle


Route = tuple[type[Any], Callable[[ModelSpec, Any], int],
              Callable[[ModelSpec, Any, int], dict[str, Any]]]
# Each endpoint's request model, its validation (returns max_tokens) and its worker body.
ROUTES: dict[str, Route] = {
    # chat models, and task models behind the chat body (openai/taskchat.py)
    CHAT_PATH: (chat.ChatRequest, taskchat.validate, taskchat.worker_body),
    "/v1/completions": (completions.CompletionRequest, completions.validate_completion,
                        completions.worker_body),
    "/v1/embeddings": (embeddings.EmbeddingRequest, embeddings.validate_embedding,
                       embeddings.worker_body),
    tokenize.TOKENIZE_PATH: (tokenize.TokenizeRequest, tokenize.validate_tokenize,
                             tokenize.tokenize_body),
    tokenize.DETOKENIZE_PATH: (tokenize.DetokenizeRequest, tokenize.validate_detokenize,
                               tokenize.detokenize_body),
    rerank.RERANK_PATH: (rerank.RerankRequest, rerank.validate_rerank, rerank.worker_body),
    RESPONSES_PATH: (ResponsesRequest, responses.validate, chat.worker_body),
}


@dataclass
class Prepared:
    """One request parsed and validated: its ``Call`` for ``Gateway.handle``
    and the endpoint's steps (on the won slot; rendering the answer or the stream)."""

    call: Call
    starting: Starting | None = None
    finish: Finish | None = None
    events: Events | None = None

    async def render(self, body: dict[str, Any]) -> dict[str, Any]:
        """A non-streamed answer in the endpoint's shape."""
        if self.finish is None:
            return body
        out = self.finish(self.call, body)
        return await out if inspect.isawaitable(out) else out


class RequestPath:
    """The one request path: a request's body, endpoint and principal turned
    into a ``Call`` (parsed, checked against the model, priced), for an HTTP
    request (``router``) and for a batch line (``batches.py``) alike."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.store = ResponseStore(services.db, services.settings.jobs.responses_retention_s)

    async def prepare(self, principal: Principal, read: Callable[[], Awaitable[bytes]],
                      path: str, rid: str, presented: str | None,
                      terms: Terms | None = None) -> Prepared:
        """Parse and validate the body ``read`` returns for ``path``; a refusal
        is counted, logged and raised (with the rate-limit headers)."""
        services = self.services
        gateway = services.gateway
        metering = services.metering
        model, validate, build = ROUTES[path]
        work: Work | None = None
        turn: responses.Turn | None = None
        headers: dict[str, str] = {}
        try:
            raw = await read()
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
            pool = gateway.fleet.pools.get(spec.id)
            if pool is None:  # removed at runtime since the catalog was read
                raise ModelNotFound(f"model {body.model!r} does not exist", param="model")
            engine = pool.engine
            spec = engine.effective(spec)  # tool_calling "auto" resolved
            if path == RESPONSES_PATH:  # a chat request, rendered as a Response
                turn = responses.Turn(self.store, principal, spec, body)
                body = await turn.prepare()
            max_tokens = validate(spec, body)
            payload = engine.adapt(build(spec, body, max_tokens), body.metadata)
            if turn is not None:
                turn.started(payload)
            if body.stream:
                engine.prepare_stream(payload)
            if path in WORK:
                work = WORK[path](spec, path, body, payload, gateway.client)
        except ModelfleetError as exc:
            exc.headers = {**(await rate_headers(services, principal, exc)), **headers,
                           **exc.headers}
            services.metrics.request_rejected(headers.get("X-Model-Used", "unknown"),
                                              principal.project_name, exc.status)
            gateway.observer.rejected(rejected_record(
                rid, principal, principal.project_name,
                headers.get("X-Model-Used", "unknown"), path, exc, key_prefix(presented)))
            raise
        call = Call(
            request_id=rid,
            route_model=body.model,
            spec=spec,
            principal=principal,
            path=work.path if work is not None else CHAT_PATH if turn is not None else path,
            payload=payload if work is None else work.payload,
            stream=bool(body.stream),
            include_usage=turn is not None or bool(body.stream_options
                                                   and body.stream_options.include_usage),
            encoding_format=getattr(body, "encoding_format", None) or "float",
            claim=metering.claim(principal, payload),
            key_prefix=key_prefix(presented),
            settle_before_end=work is None or work.settle_before_end,
        )
        if terms is not None:
            call.claim = replace(call.claim, priority=terms.priority)
            call.queue_timeout_s = terms.queue_timeout_s
        if metering.enabled and (terms is None or terms.metered):
            discount = 0 if terms is None else terms.discount_for(
                spec, metering.projects.plan_of(principal.project_id))
            ask, prices = metering.ask(call.request_id, principal, spec, payload, max_tokens,
                                       discount_pct=discount)
            if terms is not None and terms.queue_timeout_s is not None:
                # its concurrency slot is held while it waits, too
                ask = replace(ask, ttl_s=ask.ttl_s + terms.queue_timeout_s)
            call.admit = lambda: metering.admit(ask, spec, prices)
        if work is not None:
            return Prepared(call, starting=work.starting, finish=work.finish)
        if turn is not None:
            return Prepared(call, finish=turn.finish, events=turn.events)
        return Prepared(call)


def router(services: Services, handlers: dict[str, Handler] | None = None) -> APIRouter:
    """The inference routes.  ``handlers`` receives them by path, for the fast
    path in front of the framework (``api/app.py``)."""
    api = APIRouter()
    handlers = {} if handlers is None else handlers
    limit = services.settings.http.max_body_bytes
    requests = RequestPath(services)

    async def run(request: Request, path: str) -> Response:
        principal = await require(services, request, KeyScope.inference)
        prepared = await requests.prepare(principal, lambda: read_body(request, limit), path,
                                          request_id(request), presented_key(request))
        return OwnedResponse(services, prepared.call, principal, starting=prepared.starting,
                             finish=prepared.finish, events=prepared.events)

    for path, (model, _validate, _build) in ROUTES.items():

        async def endpoint(request: Request, path: str = path) -> Response:
            return await run(request, path)

        handlers[path] = endpoint
        api.add_api_route(path, _fastapi_endpoint(endpoint), methods=["POST"], tags=["inference"],
                          openapi_extra=_openapi_body(model), name=path.rsplit("/", 1)[-1],
                          responses={**openapi_doc.errors(400, 404, 413, 422, 502, 503, 504,
                                                          scope="inference", rate_limited=True,
                                                          billed=True),
                                     **(openapi_doc.EVENT_STREAM if path not in NOT_STREAMED
                                        else {})})
    api.include_router(responses.router(services, requests.store))
    return api
