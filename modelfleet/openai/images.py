"""Image requests: the native job API (POST /v1/inference/image) and OpenAI's
POST /v1/images/generations, both checked here against the model's limits
and merged over its ``parameter_defaults`` into one set of job parameters.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import secrets
import warnings
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field

from modelfleet.catalog import ModelKind, ModelSpec
from modelfleet.errors import InvalidRequest
from modelfleet.netguard import check_url
from modelfleet.openai.common import Float, ModelName, Strict, require_kind

Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
Dimension = Annotated[int, Field(ge=1, le=16384)]
# Input images: the decoded file may be this large, and this many pixels.
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096


class ImageJobRequest(Strict):
    """POST /v1/inference/image."""

    model: ModelName
    prompt: str
    negative_prompt: str | None = None
    width: Dimension | None = None
    height: Dimension | None = None
    steps: Annotated[int, Field(ge=1, le=1000)] | None = None
    guidance: Float | None = None
    seed: Seed | None = None
    input_images_base64: Annotated[list[str], Field(max_length=64)] | None = None
    strength: Float | None = None
    # Images per job (an extension; the OpenAI endpoint's `n`).
    n: Annotated[int, Field(ge=1, le=64)] | None = None
    webhook_url: Annotated[str, Field(max_length=2000)] | None = None
    # Retired: accepted in shape only to be refused with a clear 400.
    remove_bg: Any = None


class OpenAIImageRequest(Strict):
    """POST /v1/images/generations (the OpenAI shape, plus the native knobs)."""

    model: ModelName
    prompt: str
    n: Annotated[int, Field(ge=1, le=64)] | None = None
    size: str | None = None
    response_format: Literal["url", "b64_json"] | None = None
    quality: Literal["auto", "standard"] | None = None
    output_format: Literal["png"] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    negative_prompt: str | None = None
    steps: Annotated[int, Field(ge=1, le=1000)] | None = None
    guidance: Float | None = None
    seed: Seed | None = None


@dataclass
class ImageJob:
    """A validated image job: the worker's parameters and the decoded inputs (PNG)."""

    params: dict[str, Any]
    inputs: list[bytes]
    webhook_url: str | None = None
    job_type: str = "image"


def _parse_size(size: str) -> tuple[int, int]:
    match = re.fullmatch(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})", size)
    if not match:
        raise InvalidRequest(f"size must look like 512x512, got {size!r}", param="size")
    return int(match.group(1)), int(match.group(2))


def decode_image(data: str, index: int) -> bytes:
    """A base64 image file, verified by decoding it, as PNG bytes."""
    from PIL import Image, UnidentifiedImageError

    param = "input_images_base64"
    where = f"input_images_base64[{index}]"
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]  # a data: URL
    if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise InvalidRequest(f"{where} is larger than {MAX_IMAGE_BYTES} bytes", param=param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{where} is not valid base64", param=param,
                             code="invalid_image") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as probe:
                probe.verify()
            with Image.open(io.BytesIO(raw)) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise InvalidRequest(f"{where} has more than {MAX_IMAGE_PIXELS} pixels",
                                         param=param, code="invalid_image")
                img.load()
                out = io.BytesIO()
                img.convert("RGB").save(out, format="PNG")
    except InvalidRequest:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError,
            Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidRequest(f"{where} is not a valid image: {exc}", param=param,
                             code="invalid_image") from None
    return out.getvalue()


def check_prompts(spec: ModelSpec, prompt: str, negative_prompt: str | None) -> None:
    """A prompt is not blank; it and the negative prompt are within the model's
    max_prompt_chars (image and video models)."""
    limit = spec.limits.max_prompt_chars
    if not prompt.strip():
        raise InvalidRequest("prompt must not be empty", param="prompt")
    if len(prompt) > limit:
        raise InvalidRequest(f"prompt is {len(prompt)} characters; model {spec.id!r} takes at "
                             f"most {limit}", param="prompt", code="prompt_too_long")
    if negative_prompt is not None and len(negative_prompt) > limit:
        raise InvalidRequest(f"negative_prompt is longer than {limit} characters",
                             param="negative_prompt", code="prompt_too_long")


def build_job(spec: ModelSpec, *, prompt: str, negative_prompt: str | None, width: int | None,
              height: int | None, steps: int | None, guidance: float | None, seed: int | None,
              strength: float | None, n: int | None, images: list[str] | None,
              size_param: str = "width") -> ImageJob:
    """Merge over the model's defaults, then check every limit (400, naming the field)."""
    require_kind(spec, (ModelKind.image,), "this endpoint")
    lim, dft = spec.limits, spec.parameter_defaults
    check_prompts(spec, prompt, negative_prompt)
    w, h = width or dft.width, height or dft.height
    if f"{w}x{h}" not in lim.sizes:
        raise InvalidRequest(
            f"size {w}x{h} is not available for model {spec.id!r}; allowed sizes: "
            f"{', '.join(lim.sizes)}", param=size_param, code="unsupported_size")
    steps = dft.steps if steps is None else steps
    if not lim.min_steps <= steps <= lim.max_steps:
        raise InvalidRequest(
            f"steps is {steps}; model {spec.id!r} takes {lim.min_steps} to {lim.max_steps}",
            param="steps")
    guidance = dft.guidance if guidance is None else guidance
    if not 0 <= guidance <= 50:
        raise InvalidRequest(f"guidance must be between 0 and 50, got {guidance:g}", param="guidance")
    if strength is not None and not images:
        raise InvalidRequest("strength is how far to move from an input image; send it with "
                             "input_images_base64 or leave it out", param="strength")
    strength = dft.strength if strength is None else strength
    if not 0 < strength <= 1:
        raise InvalidRequest(f"strength must be in (0, 1], got {strength:g}", param="strength")
    n = 1 if n is None else n
    if not 1 <= n <= lim.max_n:
        raise InvalidRequest(f"n must be between 1 and {lim.max_n} for model {spec.id!r}", param="n")
    images = images or []
    if not lim.min_input_images <= len(images) <= lim.max_input_images:
        if lim.max_input_images == 0:
            message = f"model {spec.id!r} does not take input images"
        else:
            message = (f"model {spec.id!r} takes {lim.min_input_images} to "
                       f"{lim.max_input_images} input images; got {len(images)}")
        raise InvalidRequest(message, param="input_images_base64", code="invalid_image_count")
    inputs = [decode_image(data, i) for i, data in enumerate(images)]
    params: dict[str, Any] = {
        "prompt": prompt, "negative_prompt": dft.negative_prompt if negative_prompt is None
        else negative_prompt, "width": w, "height": h, "steps": steps, "guidance": guidance,
        "n": n,
    }
    # The seed is chosen now, so the job's record says how to make its image again.
    params["seed"] = secrets.randbelow(2**31) if seed is None else seed
    if inputs:
        params["strength"] = strength
    return ImageJob(params, inputs)


def native_job(spec: ModelSpec, body: ImageJobRequest) -> ImageJob:
    if "remove_bg" in body.model_fields_set:
        raise InvalidRequest("remove_bg has been retired and is no longer accepted; remove it "
                             "from the request", param="remove_bg", code="retired_parameter")
    job = build_job(spec, prompt=body.prompt, negative_prompt=body.negative_prompt,
                    width=body.width, height=body.height, steps=body.steps, guidance=body.guidance,
                    seed=body.seed, strength=body.strength, n=body.n,
                    images=body.input_images_base64)
    if body.webhook_url is not None:
        # its shape here; where it points is checked at every connect, against
        # the operator's address policy (modelfleet.netguard)
        check_url(body.webhook_url)
        job.webhook_url = body.webhook_url
    return job


def openai_job(spec: ModelSpec, body: OpenAIImageRequest) -> ImageJob:
    width = height = None
    if body.size is not None and body.size != "auto":
        width, height = _parse_size(body.size)
    return build_job(spec, prompt=body.prompt, negative_prompt=body.negative_prompt,
                     width=width, height=height, steps=body.steps, guidance=body.guidance,
                     seed=body.seed, strength=None, n=body.n, images=None, size_param="size")
