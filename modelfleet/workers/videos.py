"""modelfleet's own video worker: one diffusers video pipeline (LTX-Video's
``LTXPipeline``, or another text-to-video pipeline diffusers ships) behind a
small HTTP API; each video comes back as an MP4 (H.264, encoded with PyAV).

    python -m modelfleet.workers.videos --model-dir DIR --port P [--host H]
        [--model-name NAME] [--threads N] [--parent-pid PID]

    POST /v1/videos/generate {prompt, negative_prompt?, width, height, frames,
                              fps, steps, guidance, seed?}
      → {videos: [base64 MP4], frames, width, height, fps, seed, timings}

As in the image worker (``workers.images``): the pipeline is loaded from local
files before the port opens, one video is made at a time in one dedicated
thread, and a request is checked completely before it waits for the pipeline.
Same seed and parameters give the same MP4 bytes.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import io
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from modelfleet.workers import images
from modelfleet.workers.common import error_response, json_response
from modelfleet.workers.images import BadRequest, _float, _int, _prompts, _side

log = logging.getLogger("modelfleet.workers.videos")

MAX_FRAMES = 1024
MAX_FPS = 120
FIELDS = frozenset({"prompt", "negative_prompt", "width", "height", "frames", "fps", "steps",
                    "guidance", "seed"})


@dataclass(frozen=True)
class VideoRequest:
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    frames: int
    fps: int
    steps: int
    guidance: float
    seed: int


def parse_request(body: Any) -> VideoRequest:
    """Check a request body completely; raises BadRequest naming the field."""
    body = images.known_fields(body, FIELDS)
    prompt, negative = _prompts(body)
    seed = _int(body, "seed", 0, images.MAX_SEED, default=-1)
    return VideoRequest(
        prompt=prompt, negative_prompt=negative, width=_side(body, "width"),
        height=_side(body, "height"), frames=_int(body, "frames", 1, MAX_FRAMES),
        fps=_int(body, "fps", 1, MAX_FPS), steps=_int(body, "steps", 1, images.MAX_STEPS),
        guidance=_float(body, "guidance", 0.0, images.MAX_GUIDANCE),
        seed=seed if seed >= 0 else random.randrange(2**31))


def encode_mp4(frames: Any, fps: int) -> bytes:
    """Frames (F, H, W, 3, floats in [0, 1]) as an H.264 MP4 (yuv420p)."""
    import av
    import numpy as np

    pixels = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = pixels.shape[1], pixels.shape[2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for picture in pixels:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode(None))
    return out.getvalue()


class VideoPipeline(images.ImagePipeline):
    """The loaded pipeline and the one thread that runs it (loaded as the image
    worker loads its own)."""

    def check(self, req: VideoRequest) -> None:
        """What this pipeline cannot make, refused before the request waits."""
        temporal = getattr(self.pipe, "vae_temporal_compression_ratio", 1)
        if (req.frames - 1) % temporal:
            raise BadRequest(f"frames must be 1 + a multiple of {temporal} for this model", "frames")
        for name, side in (("width", req.width), ("height", req.height)):
            if side % 2:  # H.264 in yuv420p: whole chroma pixels
                raise BadRequest(f"{name} must be even for an H.264 video", name)

    def render_size(self, width: int, height: int) -> tuple[int, int]:
        """The size the pipeline renders to make ``width`` x ``height``: each side
        rounded up to the latent grid (LTX-Video's sides are multiples of 32);
        the frames are then cropped to the size asked for, centred."""
        grid = int(getattr(self.pipe, "vae_spatial_compression_ratio", 8))
        return -(-width // grid) * grid, -(-height // grid) * grid

    def run_video(self, req: VideoRequest) -> tuple[str, int]:
        """Runs in the pipeline thread; returns the base64 MP4 and its frame count."""
        import torch

        width, height = self.render_size(req.width, req.height)
        kwargs: dict[str, Any] = {
            "prompt": req.prompt, "negative_prompt": req.negative_prompt or "",
            "num_frames": req.frames, "width": width, "height": height,
            "num_inference_steps": req.steps, "guidance_scale": req.guidance,
            "generator": torch.Generator("cpu").manual_seed(req.seed), "output_type": "np",
        }
        if "frame_rate" in inspect.signature(self.pipe.__call__).parameters:
            kwargs["frame_rate"] = req.fps  # LTX-Video conditions on it
        with torch.inference_mode():
            frames = self.pipe(**kwargs).frames[0]
        top, left = (height - req.height) // 2, (width - req.width) // 2
        frames = frames[:, top:top + req.height, left:left + req.width]
        return base64.b64encode(encode_mp4(frames, req.fps)).decode("ascii"), len(frames)


def create_app(pipeline: VideoPipeline, model_name: str) -> web.Application:
    async def generate(request: web.Request) -> web.Response:
        body, failed = await images.read_json(request)
        if failed is not None:
            return failed
        loop = asyncio.get_running_loop()
        try:
            req = parse_request(body)
            pipeline.check(req)
            async with pipeline.lock:
                started = time.perf_counter()
                video, frames = await loop.run_in_executor(pipeline.executor,
                                                           pipeline.run_video, req)
                run_ms = int((time.perf_counter() - started) * 1000)
        except BadRequest as exc:
            return error_response(400, exc.message, param=exc.param)
        except ValueError as exc:  # the pipeline's own input checks
            return error_response(400, f"the pipeline refused the request: {exc}")
        except Exception as exc:
            log.exception("generation failed")
            return error_response(500, f"video generation failed: {exc}")
        log.info("video %dx%d, %d frames at %d fps, %d steps, seed %d: %d ms", req.width,
                 req.height, frames, req.fps, req.steps, req.seed, run_ms)
        return json_response({
            "model": model_name, "seed": req.seed, "videos": [video], "width": req.width,
            "height": req.height, "frames": frames, "fps": req.fps,
            "timings": {"run_ms": run_ms}})

    return images.worker_app(pipeline, model_name, "/v1/videos/generate", generate)


def main(argv: list[str] | None = None) -> int:
    return images.serve("modelfleet.workers.videos", __doc__, VideoPipeline, create_app, argv)


if __name__ == "__main__":
    raise SystemExit(main())
