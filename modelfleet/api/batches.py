"""OpenAI's Files and Batch APIs (docs/batches.md): thin routes over
``files.py`` and ``batches.py``.

    POST   /v1/files                  multipart: purpose=batch, file (JSONL)
    GET    /v1/files[/{id}[/content]] the project's files; 404 to others
    DELETE /v1/files/{id}
    POST   /v1/batches                {input_file_id, endpoint, completion_window, metadata}
    GET    /v1/batches[/{id}]         list (after, limit) or one batch
    POST   /v1/batches/{id}/cancel
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from pydantic import Field
from starlette.datastructures import UploadFile
from starlette.types import Message

from modelfleet.api import openapi_doc
from modelfleet.api.auth import require
from modelfleet.api.http import read_body
from modelfleet.api.inference import _openapi_body
from modelfleet.batches import batch_view, check_metadata
from modelfleet.errors import InvalidRequest, RequestTooLarge
from modelfleet.files import file_view
from modelfleet.keys import Scope
from modelfleet.openai.common import Strict, parse_body
from modelfleet.services import Services

JSONL: dict[int | str, dict[str, Any]] = {200: {"content": {"application/jsonl": {
    "schema": {"type": "string", "contentMediaType": "application/jsonl"}}}}}
# Room for the multipart envelope (boundaries, part headers, the purpose field).
ENVELOPE_BYTES = 64 * 1024


class CreateBatchRequest(Strict):
    input_file_id: str = Field(max_length=64)
    endpoint: str = Field(max_length=64)
    completion_window: str = Field(max_length=10)
    metadata: dict[str, Any] | None = None
    output_expires_after: dict[str, Any] | None = None


def _json(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


def _page(views: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": views, "first_id": views[0]["id"] if views else None,
            "last_id": views[-1]["id"] if views else None, "has_more": has_more}


def _upload_schema() -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["purpose", "file"],
        "properties": {"purpose": {"type": "string", "enum": ["batch"]},
                       "file": {"type": "string", "format": "binary"}}}}}}}


async def _upload(services: Services, request: Request) -> dict[str, Any]:
    """Read the multipart upload (counting its bytes as they arrive) and keep its file."""
    principal = await require(services, request, Scope.inference)
    limit = services.settings.batches.max_file_bytes + ENVELOPE_BYTES
    too_large = RequestTooLarge(f"a file is at most {limit - ENVELOPE_BYTES} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    size = 0

    async def counted() -> Message:
        nonlocal size
        message = await request.receive()
        size += len(message.get("body", b""))
        if size > limit:
            raise too_large
        return message

    form = await Request(request.scope, counted).form(max_files=1, max_fields=10)
    try:
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose != "batch":
            raise InvalidRequest("purpose must be batch (the only purpose served here)",
                                 param="purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("file is required: a JSONL file of requests", param="file")
        row = await services.batches.files.upload_batch(
            principal, upload.filename or "batch.jsonl", upload.file)
    finally:
        await form.close()
    return file_view(row)


def router(services: Services) -> APIRouter:
    """The Files API."""
    api = APIRouter()
    files = services.batches.files

    @api.post("/v1/files", tags=["batches"], openapi_extra=_upload_schema(),
              responses=openapi_doc.errors(400, 413, scope="inference"))
    async def upload(request: Request) -> Response:
        """Upload a JSONL batch input file (``purpose`` batch), validated line by line."""
        return _json(await _upload(services, request))

    @api.get("/v1/files", tags=["batches"], responses=openapi_doc.errors(400, scope="any"))
    async def list_files(request: Request, purpose: str | None = None, limit: int = 10000,
                         order: Literal["asc", "desc"] = "desc",
                         after: str | None = None) -> Response:
        """This project's files."""
        principal = await require(services, request, None)
        if not 1 <= limit <= 10000:
            raise InvalidRequest("limit must be between 1 and 10000", param="limit")
        rows, more = await files.list(principal, purpose, limit, order, after)
        return _json(_page([file_view(r) for r in rows], more))

    @api.get("/v1/files/{file_id}", tags=["batches"],
             responses=openapi_doc.errors(404, scope="any"))
    async def get_file(file_id: str, request: Request) -> Response:
        principal = await require(services, request, None)
        return _json(file_view(await files.get(principal, file_id)))

    @api.get("/v1/files/{file_id}/content", tags=["batches"], response_class=Response,
             responses={**JSONL, **openapi_doc.errors(404, scope="any")})
    async def file_content(file_id: str, request: Request) -> Response:
        """The file's bytes (JSONL)."""
        principal = await require(services, request, None)
        return FileResponse(await files.content(principal, file_id),
                            media_type="application/jsonl")

    @api.delete("/v1/files/{file_id}", tags=["batches"],
                responses=openapi_doc.errors(404, 409, scope="inference"))
    async def delete_file(file_id: str, request: Request) -> Response:
        """Delete a file (409 while an unfinished batch reads it)."""
        principal = await require(services, request, Scope.inference)
        await services.batches.delete_file(principal, file_id)
        return _json({"id": file_id, "object": "file", "deleted": True})

    api.include_router(batches_router(services))
    return api


def batches_router(services: Services) -> APIRouter:
    """The Batch API."""
    api = APIRouter()
    batches = services.batches

    @api.post("/v1/batches", tags=["batches"], openapi_extra=_openapi_body(CreateBatchRequest),
              responses=openapi_doc.errors(400, 404, 413, 422, scope="inference"))
    async def create_batch(request: Request) -> Response:
        """Run an uploaded file's requests, at the batch discount, within 24h."""
        principal = await require(services, request, Scope.inference)
        body = parse_body(CreateBatchRequest, await read_body(request,
                                                               services.settings.http.max_body_bytes))
        if body.output_expires_after is not None:
            raise InvalidRequest("output_expires_after is not supported: output files are kept "
                                 "for the server's file retention", param="output_expires_after")
        row = await batches.create(principal, body.input_file_id, body.endpoint,
                                   body.completion_window, check_metadata(body.metadata))
        return _json(batch_view(row))

    @api.get("/v1/batches", tags=["batches"], responses=openapi_doc.errors(400, scope="any"))
    async def list_batches(request: Request, after: str | None = None,
                           limit: int = 20) -> Response:
        """This project's batches, newest first."""
        principal = await require(services, request, None)
        if not 1 <= limit <= 100:
            raise InvalidRequest("limit must be between 1 and 100", param="limit")
        rows, more = await batches.list(principal, after, limit)
        return _json(_page([batch_view(r) for r in rows], more))

    @api.get("/v1/batches/{batch_id}", tags=["batches"],
             responses=openapi_doc.errors(404, scope="any"))
    async def get_batch(batch_id: str, request: Request) -> Response:
        principal = await require(services, request, None)
        return _json(batch_view(await batches.get(principal, batch_id)))

    @api.post("/v1/batches/{batch_id}/cancel", tags=["batches"],
              responses=openapi_doc.errors(404, 409, scope="inference"))
    async def cancel_batch(batch_id: str, request: Request) -> Response:
        """Stop starting lines; finished ones are kept in the output files."""
        principal = await require(services, request, Scope.inference)
        return _json(batch_view(await batches.cancel(principal, batch_id)))

    return api
