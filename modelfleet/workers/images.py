"""modelfleet's own image worker: one diffusers pipeline behind a small HTTP API.

    python -m modelfleet.workers.images --model-dir DIR --port P [--host H]
        [--model-name NAME] [--threads N] [--parent-pid PID]

The pipeline is loaded from local files only, before the port opens, so a
worker that answers /health can generate.  One image job runs at a time, in
one dedicated thread: a diffusion step already uses every thread torch has,
so running two would only make both slower, and the event loop stays free to
answer health pings while a job runs.  A request is checked completely
(including decoding its input image) before it waits for the pipeline, so a
bad request is refused at once.

Same seed and parameters give the same PNG bytes.  The image-to-image variant
of the pipeline is built on first use and shares the weights.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import importlib.util
import io
import logging
import math
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from modelfleet.workers.common import (
    error_middleware,
    error_response,
    json_response,
    run_app,
    serving_args,
)

log = logging.getLogger("modelfleet.workers.images")

MAX_SIDE = 2048
MAX_STEPS = 200
MAX_GUIDANCE = 50.0
MAX_N = 8
MAX_SEED = 2**64 - 1
# An input image is decoded fully in memory: refuse more pixels than this
# (16.7 M, a 4096x4096 picture) before decoding.
MAX_INPUT_PIXELS = 4096 * 4096
# Request bodies: base64 input images make them large.
MAX_BODY_BYTES = 64 << 20
INPUT_FORMATS = ("PNG", "JPEG", "WEBP")
FIELDS = frozenset({"prompt", "negative_prompt", "width", "height", "steps", "guidance", "seed", "n",
                    "input_images_base64", "strength"})
NO_INPUT_IMAGES = "this model does not take input images"


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    n: int
    strength: float
    # Already decoded, RGB, resized to width x height (a PIL image).
    input_image: Any | None


# ── request checking ──────────────────────────────────────────────────────


def _int(body: dict[str, Any], name: str, low: int, high: int, default: int | None = None) -> int:
    value = body.get(name)
    if value is None:
        if default is None:
            raise BadRequest(f"{name} is required", name)
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer", name)
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}", name)
    return value


def _float(body: dict[str, Any], name: str, low: float, high: float, *, default: float | None = None,
           low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        if default is None:
            raise BadRequest(f"{name} is required", name)
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{name} must be a number", name)
    number = float(value)
    above_low = number > low if low_open else number >= low
    if not (math.isfinite(number) and above_low and number <= high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise BadRequest(f"{name} must be in {interval}", name)
    return number


def _side(body: dict[str, Any], name: str) -> int:
    value = _int(body, name, 8, MAX_SIDE)
    if value % 8:
        raise BadRequest(f"{name} must be a multiple of 8", name)
    return value


def _prompts(body: dict[str, Any]) -> tuple[str, str | None]:
    prompt = body.get("prompt")
    if prompt is None:
        raise BadRequest("prompt is required", "prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest("prompt must be a non-empty string", "prompt")
    negative = body.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise BadRequest("negative_prompt must be a string", "negative_prompt")
    return prompt, negative


def decode_image(text: Any, width: int, height: int) -> Any:
    """One base64-encoded PNG, JPEG or WebP file (a ``data:`` URL prefix is
    allowed) → an RGB PIL image of width x height."""
    from PIL import Image

    param = "input_images_base64"
    if not isinstance(text, str):
        raise BadRequest("input images must be base64 strings", param)
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("an input image is not valid base64", param) from None
    try:
        with Image.open(io.BytesIO(data), formats=INPUT_FORMATS) as image:
            if image.width * image.height > MAX_INPUT_PIXELS:
                raise BadRequest(f"an input image has more than {MAX_INPUT_PIXELS} pixels", param)
            image.load()
            rgb = image.convert("RGB")
    except BadRequest:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise BadRequest("an input image is not a PNG, JPEG or WebP file", param) from None
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.LANCZOS)
    return rgb


def known_fields(body: Any, fields: frozenset[str]) -> dict[str, Any]:
    """The body, a JSON object of only ``fields`` (else BadRequest)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for name in body:
        if name not in fields:
            raise BadRequest(f"unknown field {name!r}", name)
    return body


def parse_request(body: Any) -> ImageRequest:
    """Check a request body completely; raises BadRequest naming the field."""
    body = known_fields(body, FIELDS)
    prompt, negative = _prompts(body)
    width, height = _side(body, "width"), _side(body, "height")
    steps = _int(body, "steps", 1, MAX_STEPS)
    guidance = _float(body, "guidance", 0.0, MAX_GUIDANCE)
    seed = _int(body, "seed", 0, MAX_SEED, default=-1)
    n = _int(body, "n", 1, MAX_N, default=1)
    # Accepted (and unused) without an input image, so a client may always send it.
    strength = _float(body, "strength", 0.0, 1.0, default=0.75, low_open=True)
    images = body.get("input_images_base64") or []
    if not isinstance(images, list):
        raise BadRequest("input_images_base64 must be a list of base64 strings", "input_images_base64")
    if len(images) > 1:
        raise BadRequest("this engine takes at most one input image", "input_images_base64")
    input_image = decode_image(images[0], width, height) if images else None
    if input_image is not None and int(steps * strength) < 1:
        # Image-to-image runs the last steps x strength steps: none would be no picture.
        raise BadRequest("steps x strength must be at least 1 for image-to-image", "strength")
    if seed < 0:
        seed = random.randrange(2**31)
    return ImageRequest(prompt=prompt, negative_prompt=negative, width=width, height=height, steps=steps,
                        guidance=guidance, seed=seed, n=n, strength=strength, input_image=input_image)


# ── the pipeline ──────────────────────────────────────────────────────────


class ImagePipeline:
    """The loaded pipeline and the one thread that runs it."""

    def __init__(self, model_dir: Path) -> None:
        import diffusers
        import torch
        from transformers.utils import logging as transformers_logging

        # Progress bars in a log file are noise.
        diffusers.utils.logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        started = time.perf_counter()
        self.pipe: Any = diffusers.DiffusionPipeline.from_pretrained(
            str(model_dir), local_files_only=True, dtype=torch.float32,
            # Without accelerate diffusers says so at every load, then does this anyway.
            low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
        self.pipe.to("cpu")
        self.pipe.set_progress_bar_config(disable=True)
        log.info("loaded %s from %s in %.2f s", type(self.pipe).__name__, model_dir,
                 time.perf_counter() - started)
        self._image_pipe: Any = None
        self._image_pipe_missing = False
        self.lock = asyncio.Lock()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffusion")

    def image_pipe(self) -> Any | None:
        """The image-to-image variant, built on first use (it shares the weights);
        None if this pipeline class has none."""
        if self._image_pipe is None and not self._image_pipe_missing:
            from diffusers import AutoPipelineForImage2Image

            try:
                self._image_pipe = AutoPipelineForImage2Image.from_pipe(self.pipe)
            except ValueError as exc:
                log.info("no image-to-image variant of %s: %s", type(self.pipe).__name__, exc)
                self._image_pipe_missing = True
            else:
                self._image_pipe.set_progress_bar_config(disable=True)
        return self._image_pipe

    def run(self, req: ImageRequest) -> list[str]:
        """Runs in the pipeline thread; returns base64 PNGs."""
        import torch

        kwargs: dict[str, Any] = {
            "prompt": req.prompt,
            "negative_prompt": req.negative_prompt,
            "num_inference_steps": req.steps,
            "guidance_scale": req.guidance,
            "num_images_per_prompt": req.n,
            "generator": torch.Generator("cpu").manual_seed(req.seed),
            "output_type": "pil",
        }
        if req.input_image is None:
            pipe = self.pipe
            kwargs.update(width=req.width, height=req.height)
        else:
            pipe = self.image_pipe()
            if pipe is None:
                raise BadRequest(NO_INPUT_IMAGES, "input_images_base64")
            kwargs.update(image=req.input_image, strength=req.strength)
        with torch.inference_mode():
            images = pipe(**kwargs).images
        encoded = []
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
        return encoded


# ── HTTP ──────────────────────────────────────────────────────────────────


async def read_json(request: web.Request) -> tuple[Any, web.Response | None]:
    """The request's JSON body, or the error response to send instead."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return None, error_response(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        return orjson.loads(raw), None
    except orjson.JSONDecodeError as exc:
        return None, error_response(400, f"the request body is not valid JSON: {exc}")


def worker_app(pipeline: ImagePipeline, model_name: str, path: str,
               generate: Callable[[web.Request], Awaitable[web.Response]]) -> web.Application:
    """A worker's app: /health, /v1/models and ``generate`` at ``path`` (the
    image worker's, and the video worker's)."""
    created = int(time.time())

    async def health(_: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def models(_: web.Request) -> web.Response:
        return json_response({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "modelfleet"}]})

    async def stop(_: web.Application) -> None:
        pipeline.executor.shutdown(wait=False, cancel_futures=True)

    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[error_middleware])
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post(path, generate)
    app.on_cleanup.append(stop)
    return app


def create_app(pipeline: ImagePipeline, model_name: str) -> web.Application:
    async def generate(request: web.Request) -> web.Response:
        body, failed = await read_json(request)
        if failed is not None:
            return failed
        loop = asyncio.get_running_loop()
        try:
            # Decoding an input image is CPU work: off the event loop, not in the pipeline's thread.
            req = await loop.run_in_executor(None, parse_request, body)
            async with pipeline.lock:
                started = time.perf_counter()
                images = await loop.run_in_executor(pipeline.executor, pipeline.run, req)
                run_ms = int((time.perf_counter() - started) * 1000)
        except BadRequest as exc:
            return error_response(400, exc.message, param=exc.param)
        except Exception as exc:
            log.exception("generation failed")
            return error_response(500, f"image generation failed: {exc}")
        log.info("%d image(s) %dx%d, %d steps, seed %d%s: %d ms", req.n, req.width, req.height,
                 req.steps, req.seed, " (image-to-image)" if req.input_image is not None else "", run_ms)
        return json_response({"model": model_name, "seed": req.seed, "images": images, "width": req.width,
                              "height": req.height, "timings": {"run_ms": run_ms}})

    return worker_app(pipeline, model_name, "/v1/images/generate", generate)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """A diffusers worker's options (the image and the video worker's), parsed;
    logging set up."""
    parser.add_argument("--model-dir", type=Path, required=True, help="a diffusers pipeline folder")
    serving_args(parser, "the folder's name")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args


def prepare(args: argparse.Namespace) -> Path | None:
    """Offline for good, torch's threads set; the pipeline folder, or None
    (said on stderr) when it is not one."""
    # Never reach for a hub: everything comes from --model-dir.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import torch

    torch.set_num_threads(max(1, args.threads))
    model_dir = args.model_dir.resolve()
    if not (model_dir / "model_index.json").is_file():
        print(f"error: {model_dir} is not a diffusers pipeline folder (no model_index.json)", file=sys.stderr)
        return None
    return model_dir


def serve(module: str, doc: str | None, load: Callable[[Path], Any],
          make_app: Callable[[Any, str], web.Application], argv: list[str] | None) -> int:
    """A diffusers worker's main (the image and the video worker's): options,
    the pipeline loaded by ``load``, then its app served until stopped."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    args = parse_args(parser, argv)
    model_dir = prepare(args)
    if model_dir is None:
        return 2
    app = make_app(load(model_dir), args.model_name or model_dir.name)
    asyncio.run(run_app(app, args.host, args.port, args.parent_pid))
    return 0


def main(argv: list[str] | None = None) -> int:
    return serve("modelfleet.workers.images", __doc__, ImagePipeline, create_app, argv)


if __name__ == "__main__":
    raise SystemExit(main())
