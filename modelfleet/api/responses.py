"""The Responses API's routes: ``POST /v1/responses`` runs as a chat request
through the inference path (api/inference.py, with a ``Turn``); the stored
responses are read, listed and deleted here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from modelfleet.api import openapi_doc
from modelfleet.api.auth import require
from modelfleet.catalog import ModelSpec
from modelfleet.errors import InvalidRequest, ModelfleetError
from modelfleet.gateway import Call
from modelfleet.keys import Principal, Scope
from modelfleet.openai import chat
from modelfleet.openai import responses as api
from modelfleet.responsestore import ResponseStore
from modelfleet.services import Services


def validate(spec: ModelSpec, body: chat.ChatRequest) -> int:
    """The chat checks, on the chat request a Responses request became."""
    try:
        return chat.validate_chat(spec, body)
    except ModelfleetError as exc:
        raise api.renamed(exc) from None


class Turn:
    """One ``POST /v1/responses``: the chat request it is, and its answer
    rendered (and stored) as a Response."""

    def __init__(self, store: ResponseStore, principal: Principal, spec: ModelSpec,
                 body: api.ResponsesRequest) -> None:
        self.store = store
        self.principal = principal
        self.spec = spec
        self.body = body
        self.items: list[dict[str, Any]] = []
        self.context: list[dict[str, Any]] = []
        self.shape: api.Shape | None = None

    async def prepare(self) -> chat.ChatRequest:
        body, spec = self.body, self.spec
        api.check_request(spec, body)
        items = api.parse_items(body)
        context: list[dict[str, Any]] = []
        if body.previous_response_id is not None:
            context = await self.store.previous(self.principal, body.previous_response_id)
        request = api.to_chat(spec, body, api.items_of(context), items)
        self.items = [api.item_resource(item) for item in items]
        self.context = context + self.items
        return request

    def started(self, payload: dict[str, Any]) -> None:
        self.shape = api.Shape(api.new_id("resp"), self.body, self.spec,
                               temperature=float(payload.get("temperature", 1.0)),
                               top_p=float(payload.get("top_p", 1.0)))

    async def _keep(self, response: dict[str, Any]) -> None:
        if self.body.stored:
            await self.store.save(self.principal, response, self.items, self.context)

    async def finish(self, call: Call, completion: dict[str, Any]) -> dict[str, Any]:
        assert self.shape is not None
        response = api.render(self.shape, completion)
        await self._keep(response)
        return response

    def events(self, call: Call, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        assert self.shape is not None
        return api.EventStream(self.shape, self._keep).run(chunks)


def _json(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


def router(services: Services, store: ResponseStore) -> APIRouter:
    routes = APIRouter(tags=["responses"])
    @routes.get(api.RESPONSES_PATH + "/{response_id}",
                responses=openapi_doc.errors(400, 404, 422, scope="any"))
    async def get_response(response_id: str, request: Request,
                           stream: bool = False) -> Response:
        """A stored response, to a key of its project."""
        principal = await require(services, request, None)
        if stream:
            raise InvalidRequest("streaming a stored response again is not supported",
                                 param="stream", code="unsupported_parameter")
        row = await store.get(principal, response_id)
        return Response(row.body, media_type="application/json")

    @routes.delete(api.RESPONSES_PATH + "/{response_id}",
                   responses=openapi_doc.errors(404, scope="inference"))
    async def delete_response(response_id: str, request: Request) -> Response:
        principal = await require(services, request, Scope.inference)
        await store.delete(principal, response_id)
        return _json({"id": response_id, "object": "response", "deleted": True})

    @routes.get(api.RESPONSES_PATH + "/{response_id}/input_items",
                responses=openapi_doc.errors(400, 404, 422, scope="any"))
    async def input_items(response_id: str, request: Request,
                          limit: int = Query(20, ge=1, le=100),
                          order: Literal["asc", "desc"] = "desc",
                          after: str | None = None) -> Response:
        """The input items of a stored response, newest first by default."""
        principal = await require(services, request, None)
        return _json(await store.input_items(principal, response_id, limit=limit,
                                             order=order, after=after))

    @routes.post(api.RESPONSES_PATH + "/{response_id}/cancel",
                 responses=openapi_doc.errors(400, 404, scope="inference"))
    async def cancel_response(response_id: str, request: Request) -> Response:
        """Only background responses can be cancelled; this platform runs none."""
        principal = await require(services, request, Scope.inference)
        await store.get(principal, response_id)
        raise InvalidRequest("only background responses can be cancelled, and this platform "
                             "does not run responses in the background",
                             code="not_cancellable")

    return routes
