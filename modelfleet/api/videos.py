"""Video generation as async jobs (docs/videos.md): the native job API and
OpenAI's videos endpoints, over the same jobs as images (``jobs.py``).

    POST   /v1/inference/video          → 202 {job_id, job_type: "video", ...}
    POST   /v1/inference/jobs           → the same, for {"job_type": "video" | "image", ...}
    POST   /v1/videos                   → the job as OpenAI's VideoResource (status queued)
    GET    /v1/videos[/{id}]            → this project's video jobs
    GET    /v1/videos/{id}/content      → the MP4 (owning project only)
    DELETE /v1/videos/{id}              → a finished video and its file

Reading and cancelling go through the native job routes too
(``GET /v1/inference/jobs/{id}``, ``POST /v1/inference/jobs/{id}/cancel``).
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.types import Message

from modelfleet.api import openapi_doc
from modelfleet.api.auth import require
from modelfleet.api.http import read_body
from modelfleet.api.images import _json, accept_job, accepted
from modelfleet.api.inference import _openapi_body
from modelfleet.errors import InvalidRequest, NotFound
from modelfleet.jobs import JobService, job_view
from modelfleet.keys import Principal, Scope
from modelfleet.openai.common import parse_json
from modelfleet.openai.images import ImageJobRequest, native_job
from modelfleet.openai.videos import (
    OPENAI_SIZES,
    OpenAIVideoRequest,
    VideoJobRequest,
    native_video_job,
    openai_video_job,
)
from modelfleet.services import Services
from modelfleet.states import JobState
from modelfleet.tables import Job

# A job's status → OpenAI's VideoStatus (a cancelled job is a failed video
# whose error code is "cancelled").
STATUS = {JobState.queued: "queued", JobState.running: "in_progress",
          JobState.succeeded: "completed", JobState.failed: "failed",
          JobState.cancelled: "failed"}
MP4: dict[int | str, dict[str, Any]] = {200: {"content": {"video/mp4": {
    "schema": {"type": "string", "contentMediaType": "video/mp4"}}}}}


def openai_size(row: Job) -> bool:
    """Whether OpenAI's video object can describe the job: its size is one of
    OpenAI's VideoSize values (a video made through the native API at another
    size is read there, at /v1/inference/jobs/{id})."""
    params = job_view(row, "")["params"]
    return f"{params.get('width')}x{params.get('height')}" in OPENAI_SIZES


def video_view(row: Job, base_url: str) -> dict[str, Any]:
    """A video job as OpenAI's VideoResource (with frames and fps beside)."""
    params = job_view(row, base_url)["params"]
    frames, fps = int(params["frames"]), int(params["fps"])
    status = STATUS[JobState(row.status)]
    ended = row.finished_at if status in ("completed", "failed") else None
    return {
        "id": row.id, "object": "video", "model": row.model_id, "status": status,
        "progress": 100 if status == "completed" else 0,
        "created_at": int(row.created_at.timestamp()),
        "completed_at": None if ended is None else int(ended.timestamp()),
        "expires_at": None if row.expires_at is None else int(row.expires_at.timestamp()),
        "prompt": params["prompt"], "size": f"{params['width']}x{params['height']}",
        "seconds": f"{frames / fps:g}", "frames": frames, "fps": fps,
        "remixed_from_video_id": None,
        "error": {"code": row.error_code, "message": row.error_message or ""}
        if row.error_code else None,
    }


async def _submit_typed(services: Services, request: Request) -> Response:
    await require(services, request, Scope.inference)
    raw = await read_body(request, services.settings.http.max_body_bytes)
    data = parse_json(raw)
    kind = data.get("job_type") if isinstance(data, dict) else None
    if kind == "video":
        _, row, _, headers = await accept_job(services, request, VideoJobRequest,
                                              native_video_job, raw)
    elif kind == "image":
        del data["job_type"]
        _, row, _, headers = await accept_job(services, request, ImageJobRequest, native_job,
                                              orjson.dumps(data))
    else:
        raise InvalidRequest('job_type must be "video" or "image"', param="job_type")
    return accepted(row, str(request.base_url), headers)


async def _create_body(services: Services, request: Request) -> bytes:
    """POST /v1/videos's body as JSON: sent as JSON, or as multipart form
    fields (what the openai SDK sends); numbers in form fields are read as numbers."""
    multipart = request.headers.get("content-type", "").startswith("multipart/form-data")
    await require(services, request, Scope.inference)  # before reading the body
    raw = await read_body(request, services.settings.http.max_body_bytes, json=not multipart)
    if not multipart:
        return raw

    async def replay() -> Message:
        return {"type": "http.request", "body": raw, "more_body": False}

    form = await Request(request.scope, replay).form(max_files=1, max_fields=32)
    try:
        fields: dict[str, Any] = {}
        for name, value in form.multi_items():
            if not isinstance(value, str):
                raise InvalidRequest("input_reference is not supported yet: videos are made from "
                                     "the prompt alone", param="input_reference",
                                     code="input_reference_not_supported")
            fields[name] = _form_number(name, value)
    finally:
        await form.close()
    return orjson.dumps(fields)


def _form_number(name: str, value: str) -> Any:
    """A form field's text, or its number for the numeric native fields."""
    try:
        if name in ("fps", "steps", "seed"):
            return int(value)
        if name == "guidance":
            return float(value)
    except ValueError:
        pass
    return value


async def _openai_videos(jobs: JobService, principal: Principal, limit: int, after: str | None,
                         ascending: bool) -> list[Job]:
    """Up to ``limit + 1`` of the project's videos that OpenAI's object can
    describe (their size is one of OpenAI's), from ``after`` on."""
    rows: list[Job] = []
    cursor, more = after, True
    while more and len(rows) <= limit:
        page = await jobs.list(principal, None, limit + 1, job_type="video", after=cursor,
                               ascending=ascending)
        rows += [r for r in page if openai_size(r)]
        more, cursor = len(page) > limit, page[-1].id if page else cursor
    return rows


def router(services: Services) -> APIRouter:
    api = APIRouter()
    jobs = services.jobs

    async def video_job(principal: Principal, video_id: str) -> Job:
        row = await jobs.get(principal, video_id)
        if row.job_type != "video":
            raise NotFound(f"video {video_id!r} does not exist", code="video_not_found")
        if not openai_size(row):
            raise NotFound(f"video {video_id!r} was made through the native API at a size "
                           "OpenAI's video object cannot name; read it at "
                           f"/v1/inference/jobs/{video_id}", code="video_not_found")
        return row

    @api.post("/v1/inference/video", tags=["videos"], status_code=202,
              openapi_extra=_openapi_body(VideoJobRequest),
              responses=openapi_doc.errors(400, 404, 413, 422, 503, scope="inference",
                                           rate_limited=True, billed=True))
    async def submit_video(request: Request) -> Response:
        """Enqueue a video job; answers at once with its id and result URL."""
        _, row, _, headers = await accept_job(services, request, VideoJobRequest,
                                              native_video_job)
        return accepted(row, str(request.base_url), headers)

    @api.post("/v1/inference/jobs", tags=["videos"], status_code=202,
              responses=openapi_doc.errors(400, 404, 413, 422, 503, scope="inference",
                                           rate_limited=True, billed=True))
    async def submit_job(request: Request) -> Response:
        """Enqueue a job of the body's ``job_type`` ("video" or "image")."""
        return await _submit_typed(services, request)

    @api.post("/v1/videos", tags=["videos"], openapi_extra=_openapi_body(OpenAIVideoRequest),
              responses=openapi_doc.errors(400, 404, 413, 422, 503, scope="inference",
                                           rate_limited=True, billed=True))
    async def create_video(request: Request) -> Response:
        """OpenAI's create video: the job, queued (poll GET /v1/videos/{id})."""
        _, row, _, headers = await accept_job(services, request, OpenAIVideoRequest,
                                              openai_video_job, await _create_body(services, request))
        return _json(video_view(row, str(request.base_url)), 200, headers)

    @api.get("/v1/videos", tags=["videos"], responses=openapi_doc.errors(400, scope="any"))
    async def list_videos(request: Request, limit: int = 20, after: str | None = None,
                          order: Literal["asc", "desc"] = "desc") -> Response:
        """This project's video jobs, newest first (``order=asc``: oldest first)."""
        principal = await require(services, request, None)
        if not 0 <= limit <= 100:
            raise InvalidRequest("limit must be between 0 and 100", param="limit")
        rows = await _openai_videos(jobs, principal, limit, after, order == "asc")
        data = [video_view(r, str(request.base_url)) for r in rows[:limit]]
        return _json({"object": "list", "data": data,
                      "first_id": data[0]["id"] if data else None,
                      "last_id": data[-1]["id"] if data else None,
                      "has_more": len(rows) > limit})

    @api.get("/v1/videos/{video_id}", tags=["videos"],
             responses=openapi_doc.errors(404, scope="any"))
    async def get_video(video_id: str, request: Request) -> Response:
        """One video job of this project (404 to any other project)."""
        principal = await require(services, request, None)
        return _json(video_view(await video_job(principal, video_id), str(request.base_url)))

    @api.get("/v1/videos/{video_id}/content", tags=["videos"], response_class=Response,
             responses={**MP4, **openapi_doc.errors(400, 404, 409, scope="any")})
    async def video_content(video_id: str, request: Request, variant: str = "video") -> Response:
        """The finished video as MP4 (H.264)."""
        principal = await require(services, request, None)
        if variant != "video":
            raise InvalidRequest(f"variant {variant!r} is not available; only \"video\" (the MP4)",
                                 param="variant")
        await video_job(principal, video_id)
        data, media_type = await jobs.read_media(principal, video_id, 0)
        return Response(data, media_type=media_type,
                        headers={"Cache-Control": "private, max-age=3600"})

    @api.delete("/v1/videos/{video_id}", tags=["videos"],
                responses=openapi_doc.errors(404, 409, scope="inference"))
    async def delete_video(video_id: str, request: Request) -> Response:
        """Delete a completed or failed video and its file (409 while queued or running)."""
        principal = await require(services, request, Scope.inference)
        await video_job(principal, video_id)
        await jobs.delete(principal, video_id)
        return _json({"id": video_id, "object": "video.deleted", "deleted": True})

    return api
