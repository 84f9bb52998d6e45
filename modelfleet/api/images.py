"""Image generation as async jobs: the native job API and OpenAI's images endpoint.

    POST /v1/inference/image                 → 202 {job_id, job_type, result_url}
    GET  /v1/inference/jobs[/{id}]           → the job(s) of the key's project
    POST /v1/inference/jobs/{id}/cancel      → cancel a queued job
    GET  /v1/inference/jobs/{id}/result[/i]  → the PNG (owning project only)
    POST /v1/images/generations              → the same job, waited for (OpenAI shape)
    GET  /v1/inference/webhook-secret        → this project's webhook signing secret
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from modelfleet.api import openapi_doc
from modelfleet.api.auth import require
from modelfleet.api.http import read_body
from modelfleet.api.inference import _openapi_body
from modelfleet.catalog import ModelSpec
from modelfleet.errors import (
    Conflict,
    DeadlineExceeded,
    InsufficientCredits,
    InvalidRequest,
    ModelfleetError,
    ModelUnavailable,
    UpstreamError,
)
from modelfleet.jobs import TERMINAL, job_view
from modelfleet.keys import Principal, Scope
from modelfleet.openai.common import parse_body
from modelfleet.openai.images import ImageJob, ImageJobRequest, OpenAIImageRequest, native_job, openai_job
from modelfleet.openai.videos import OpenAIVideoRequest, VideoJob, VideoJobRequest
from modelfleet.services import Services
from modelfleet.tables import Job

B = TypeVar("B", ImageJobRequest, OpenAIImageRequest, VideoJobRequest, OpenAIVideoRequest)

# A job's error code → the status the OpenAI endpoint answers with.
_FAILURE_STATUS: dict[str, type[ModelfleetError]] = {
    "model_unavailable": ModelUnavailable,
    "queue_timeout": DeadlineExceeded,
    "request_timeout": DeadlineExceeded,
    "insufficient_credits": InsufficientCredits,
    "invalid_request": InvalidRequest,
    "cancelled": Conflict,
}


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json",
                    headers=headers)


async def accept_job(services: Services, request: Request, schema: type[B],
                     build: Callable[[ModelSpec, B], ImageJob | VideoJob],
                     raw: bytes | None = None) -> tuple[Principal, Job, B, dict[str, str]]:
    """Authenticate, parse, check against the model, then submit the job (an
    image or a video job; ``raw``: the body, when the caller has read it)."""
    principal = await require(services, request, Scope.inference)
    if raw is None:
        raw = await read_body(request, services.settings.http.max_body_bytes)
    body = parse_body(schema, raw)
    name = body.model
    spec = services.gateway.resolve(name)
    services.metering.check_model(principal, spec, name)
    job = build(spec, body)
    available, reason = services.fleet.pools[spec.id].availability()
    if not available:
        raise ModelUnavailable(f"model {spec.id!r} is not serving: {reason}")
    row, headers = await services.jobs.submit(principal, spec, job, str(request.base_url))
    return principal, row, body, {**headers, "X-Model-Used": spec.id, "X-Route-Model": name,
                                  "X-Backend": spec.backend}


def accepted(row: Job, base_url: str, headers: dict[str, str]) -> Response:
    """The native API's 202 for a job just submitted."""
    view = job_view(row, base_url)
    return _json({"job_id": row.id, "job_type": row.job_type, "result_url": view["result_url"],
                  "status": row.status, "status_url": view["url"]},
                 202, {**headers, "Location": view["url"]})


def router(services: Services) -> APIRouter:
    api = APIRouter()
    jobs = services.jobs

    @api.post("/v1/inference/image", tags=["images"], status_code=202,
              openapi_extra=_openapi_body(ImageJobRequest),
              responses=openapi_doc.errors(400, 404, 413, 422, 503, scope="inference",
                                           rate_limited=True, billed=True))
    async def submit_image(request: Request) -> Response:
        """Enqueue an image job; answers at once with its id and result URL."""
        _, row, _, headers = await accept_job(services, request, ImageJobRequest, native_job)
        return accepted(row, str(request.base_url), headers)

    @api.post("/v1/images/generations", tags=["images"],
              openapi_extra=_openapi_body(OpenAIImageRequest),
              responses=openapi_doc.errors(400, 404, 409, 413, 422, 502, 503, 504,
                                           scope="inference", rate_limited=True, billed=True))
    async def generations(request: Request) -> Response:
        """OpenAI's image generation: runs one job and waits for it."""
        principal, row, body, headers = await accept_job(services, request, OpenAIImageRequest, openai_job)
        spec = services.gateway.resolve(row.model_id)
        headers["X-Job-Id"] = row.id
        # Like a chat request: the model's request timeout covers waiting and running.
        if not await jobs.wait(row.id, spec.scaling.request_timeout_s):
            raise DeadlineExceeded(f"job {row.id} did not finish in time; it goes on: "
                                   f"GET /v1/inference/jobs/{row.id}", headers=headers)
        done = await jobs.get(principal, row.id)
        return await _openai_answer(services, principal, done, body, str(request.base_url), headers)

    return api


def jobs_router(services: Services) -> APIRouter:
    """Reading and cancelling jobs, and their results."""
    api = APIRouter()
    jobs = services.jobs

    @api.get("/v1/inference/jobs", tags=["images"], responses=openapi_doc.errors(400, scope="any"))
    async def list_jobs(request: Request, status: str | None = None, limit: int = 20) -> Response:
        """This project's jobs, newest first."""
        principal = await require(services, request, None)
        if not 1 <= limit <= 100:
            raise InvalidRequest("limit must be between 1 and 100", param="limit")
        if status is not None and status not in ("queued", "running", *TERMINAL):
            raise InvalidRequest(f"unknown status {status!r}", param="status")
        rows = await jobs.list(principal, status, limit)
        return _json({"object": "list", "data": [job_view(r, str(request.base_url)) for r in rows]})

    @api.get("/v1/inference/jobs/{job_id}", tags=["images"],
             responses=openapi_doc.errors(404, scope="any"))
    async def get_job(job_id: str, request: Request) -> Response:
        """Status, timings, error and result URLs of one job of this project."""
        principal = await require(services, request, None)
        return _json(job_view(await jobs.get(principal, job_id), str(request.base_url)))

    @api.post("/v1/inference/jobs/{job_id}/cancel", tags=["images"],
              responses=openapi_doc.errors(404, 409, scope="inference"))
    async def cancel_job(job_id: str, request: Request) -> Response:
        """Cancel a queued job (409 once it runs); a cancelled job costs nothing."""
        principal = await require(services, request, Scope.inference)
        return _json(job_view(await jobs.cancel(principal, job_id), str(request.base_url)))

    async def result(job_id: str, index: int, request: Request) -> Response:
        principal = await require(services, request, None)
        data, media_type = await jobs.read_media(principal, job_id, index)
        return Response(data, media_type=media_type,
                        headers={"Cache-Control": "private, max-age=3600"})

    @api.get("/v1/inference/jobs/{job_id}/result", tags=["images"], response_class=Response,
             responses={**openapi_doc.PNG, **openapi_doc.errors(404, 409, scope="any")})
    async def get_result(job_id: str, request: Request) -> Response:
        """The job's (first) image, as PNG; only to a key of the owning project."""
        return await result(job_id, 0, request)

    @api.get("/v1/inference/jobs/{job_id}/result/{index}", tags=["images"], response_class=Response,
             responses={**openapi_doc.PNG, **openapi_doc.errors(404, 409, scope="any")})
    async def get_result_n(job_id: str, index: int, request: Request) -> Response:
        return await result(job_id, index, request)

    @api.get("/v1/inference/webhook-secret", tags=["images"],
             responses=openapi_doc.errors(scope="any"))
    async def webhook_secret(request: Request) -> Response:
        """The secret this project's webhooks are signed with (see docs/jobs.md)."""
        principal = await require(services, request, None)
        return _json({"object": "webhook_secret", "project_id": principal.project_id,
                      "secret": jobs.signer.secret(principal.project_id),
                      "header": "X-Modelfleet-Signature", "scheme": "t=<unix>,v1=<hex hmac-sha256>"})

    return api


async def _openai_answer(services: Services, principal: Principal, done: Any,
                         body: OpenAIImageRequest, base_url: str,
                         headers: dict[str, str]) -> Response:
    """OpenAI's images response for a finished job, or its failure as an error."""
    if done.status != "succeeded":
        error = _FAILURE_STATUS.get(done.error_code or "", UpstreamError)
        raise error(f"image job {done.id} {done.status}: {done.error_message}",
                    code=done.error_code, headers=headers)
    view = job_view(done, base_url)
    data = []
    for i, url in enumerate(view["result_urls"]):
        if body.response_format == "b64_json":
            png = await services.jobs.read_result(principal, done.id, i)
            data.append({"b64_json": base64.b64encode(png).decode(), "revised_prompt": body.prompt})
        else:
            data.append({"url": url, "revised_prompt": body.prompt})
    size = f"{view['params']['width']}x{view['params']['height']}"
    return _json({"created": int(time.time()), "data": data, "output_format": "png", "size": size},
                 200, headers)
