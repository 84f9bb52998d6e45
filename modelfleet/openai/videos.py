"""Video requests: the native job API (POST /v1/inference/video, or
POST /v1/inference/jobs with ``job_type: "video"``) and OpenAI's
POST /v1/videos, both checked here against the model's limits and merged over
its ``parameter_defaults`` into one set of job parameters.

A video is ``frames`` pictures shown at ``fps`` frames per second: it lasts
frames / fps seconds.  A request may give its length in ``seconds`` instead
of ``frames`` (OpenAI's way): the frame count is then the nearest one the
model makes (1 + k * frame_step) to seconds x fps.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Field

from modelfleet.catalog import ModelKind, ModelSpec, VideoDefaults
from modelfleet.errors import InvalidRequest
from modelfleet.netguard import check_url
from modelfleet.openai.common import Float, ModelName, Strict, require_kind
from modelfleet.openai.images import Dimension, Seed, check_prompts

# OpenAI's VideoSize: the only sizes its video object can name.  POST /v1/videos
# takes these (those the model lists); the native API takes any of the model's.
OPENAI_SIZES = ("720x1280", "1280x720", "1024x1792", "1792x1024")
Count = Annotated[int, Field(ge=1, le=100_000)]
Seconds = Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)]


class VideoJobRequest(Strict):
    """POST /v1/inference/video (and /v1/inference/jobs with job_type "video")."""

    job_type: Literal["video"] | None = None
    model: ModelName
    prompt: str
    negative_prompt: str | None = None
    width: Dimension | None = None
    height: Dimension | None = None
    frames: Count | None = None
    seconds: Seconds | None = None
    fps: Count | None = None
    steps: Annotated[int, Field(ge=1, le=1000)] | None = None
    guidance: Float | None = None
    seed: Seed | None = None
    webhook_url: Annotated[str, Field(max_length=2000)] | None = None


class OpenAIVideoRequest(Strict):
    """POST /v1/videos: OpenAI's CreateVideoJsonBody, plus the native knobs."""

    model: ModelName
    prompt: str
    seconds: Annotated[str, Field(max_length=16)] | None = None
    size: Annotated[str, Field(max_length=16)] | None = None
    # A reference image or video: accepted in shape only, to be refused with a clear 400.
    input_reference: Any = None
    negative_prompt: str | None = None
    fps: Count | None = None
    steps: Annotated[int, Field(ge=1, le=1000)] | None = None
    guidance: Float | None = None
    seed: Seed | None = None


@dataclass
class VideoJob:
    """A validated video job: the worker's parameters."""

    params: dict[str, Any]
    webhook_url: str | None = None
    inputs: list[bytes] = field(default_factory=list)
    job_type: str = "video"


def video_cost(spec: ModelSpec, params: dict[str, Any]) -> int:
    """What one video costs: per second of video (frames / fps), rounded up to
    a whole micro-unit."""
    frames, fps = int(params["frames"]), int(params["fps"])
    return -(-spec.prices.per_video_second * frames // fps)


def _frames(spec: ModelSpec, frames: int | None, seconds: float | None, fps: int,
            seconds_param: str) -> int:
    """The frame count asked for (or made from seconds), checked against the limits."""
    lim = spec.limits
    if frames is not None and seconds is not None:
        raise InvalidRequest("send frames or seconds, not both", param="seconds")
    if seconds is not None:
        if seconds > lim.max_seconds:
            raise InvalidRequest(f"seconds is {seconds:g}; model {spec.id!r} makes at most "
                                 f"{lim.max_seconds:g} seconds", param=seconds_param)
        frames = 1 + max(0, round((seconds * fps - 1) / lim.frame_step)) * lim.frame_step
        if not lim.min_frames <= frames <= lim.max_frames:
            raise InvalidRequest(f"{seconds:g} seconds at {fps} fps is {frames} frames; model "
                                 f"{spec.id!r} makes {lim.min_frames} to {lim.max_frames}",
                                 param=seconds_param)
        return frames
    assert frames is not None
    if not lim.min_frames <= frames <= lim.max_frames or (frames - 1) % lim.frame_step:
        step = f" and of the form 1 + k x {lim.frame_step}" if lim.frame_step > 1 else ""
        raise InvalidRequest(f"frames is {frames}; model {spec.id!r} makes {lim.min_frames} to "
                             f"{lim.max_frames} frames{step}", param="frames")
    return frames


def build_video_job(spec: ModelSpec, *, prompt: str, negative_prompt: str | None,
                    width: int | None, height: int | None, frames: int | None,
                    seconds: float | None, fps: int | None, steps: int | None,
                    guidance: float | None, seed: int | None, size_param: str = "width",
                    seconds_param: str = "seconds") -> VideoJob:
    """Merge over the model's defaults, then check every limit (400, naming the field)."""
    require_kind(spec, (ModelKind.video,), "this endpoint")
    lim, dft = spec.limits, spec.parameter_defaults
    assert isinstance(dft, VideoDefaults)
    check_prompts(spec, prompt, negative_prompt)
    w, h = width or dft.width, height or dft.height
    if f"{w}x{h}" not in lim.sizes:
        raise InvalidRequest(f"size {w}x{h} is not available for model {spec.id!r}; allowed "
                             f"sizes: {', '.join(lim.sizes)}", param=size_param,
                             code="unsupported_size")
    fps = dft.fps if fps is None else fps
    if not lim.min_fps <= fps <= lim.max_fps:
        raise InvalidRequest(f"fps is {fps}; model {spec.id!r} takes {lim.min_fps} to "
                             f"{lim.max_fps}", param="fps")
    count = _frames(spec, dft.frames if frames is None and seconds is None else frames,
                    seconds, fps, seconds_param)
    if seconds is None and count / fps > lim.max_seconds:  # (seconds: checked as asked)
        raise InvalidRequest(f"{count} frames at {fps} fps is {count / fps:g} seconds; model "
                             f"{spec.id!r} makes at most {lim.max_seconds:g}", param="frames")
    steps = dft.steps if steps is None else steps
    if not lim.min_steps <= steps <= lim.max_steps:
        raise InvalidRequest(f"steps is {steps}; model {spec.id!r} takes {lim.min_steps} to "
                             f"{lim.max_steps}", param="steps")
    guidance = dft.guidance if guidance is None else guidance
    if not 0 <= guidance <= 50:
        raise InvalidRequest(f"guidance must be between 0 and 50, got {guidance:g}",
                             param="guidance")
    return VideoJob({
        "prompt": prompt, "negative_prompt": dft.negative_prompt if negative_prompt is None
        else negative_prompt, "width": w, "height": h, "frames": count, "fps": fps,
        "steps": steps, "guidance": guidance,
        # chosen now, so the job's record says how to make its video again
        "seed": secrets.randbelow(2**31) if seed is None else seed,
    })


def native_video_job(spec: ModelSpec, body: VideoJobRequest) -> VideoJob:
    job = build_video_job(spec, prompt=body.prompt, negative_prompt=body.negative_prompt,
                          width=body.width, height=body.height, frames=body.frames,
                          seconds=body.seconds, fps=body.fps, steps=body.steps,
                          guidance=body.guidance, seed=body.seed)
    if body.webhook_url is not None:
        check_url(body.webhook_url)  # where it points is checked at every connect
        job.webhook_url = body.webhook_url
    return job


def openai_video_job(spec: ModelSpec, body: OpenAIVideoRequest) -> VideoJob:
    if body.input_reference is not None:
        raise InvalidRequest("input_reference is not supported yet: videos are made from the "
                             "prompt alone", param="input_reference",
                             code="input_reference_not_supported")
    require_kind(spec, (ModelKind.video,), "this endpoint")
    offered = [s for s in OPENAI_SIZES if s in spec.limits.sizes]
    if body.size is not None and body.size not in OPENAI_SIZES:
        raise InvalidRequest(f"size must be one of OpenAI's video sizes ({', '.join(OPENAI_SIZES)}"
                             f"), got {body.size!r}; model {spec.id!r} makes "
                             f"{', '.join(offered) or 'none of them'} here (other sizes: "
                             "POST /v1/inference/video)", param="size", code="unsupported_size")
    size = body.size or (offered[0] if offered else None)
    if size is None:
        raise InvalidRequest(f"model {spec.id!r} makes none of OpenAI's video sizes; its sizes "
                             f"({', '.join(spec.limits.sizes)}) are served by POST "
                             "/v1/inference/video", param="size", code="unsupported_size")
    match = re.fullmatch(r"([0-9]+)x([0-9]+)", size)
    assert match is not None
    width, height = int(match.group(1)), int(match.group(2))
    seconds = None
    if body.seconds is not None:
        try:
            seconds = float(body.seconds)
        except ValueError:
            seconds = float("nan")
        if not 0 < seconds <= 3600:  # NaN too
            raise InvalidRequest(f"seconds must be a number of seconds such as \"4\", got "
                                 f"{body.seconds!r}", param="seconds")
    return build_video_job(spec, prompt=body.prompt, negative_prompt=body.negative_prompt,
                           width=width, height=height, frames=None, seconds=seconds,
                           fps=body.fps, steps=body.steps, guidance=body.guidance,
                           seed=body.seed, size_param="size")
