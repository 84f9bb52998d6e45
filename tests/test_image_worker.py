"""The image worker (``modelfleet.workers.images``) as a real process, over HTTP,
serving the tiny random-weight pipeline from ``modelfleet.workers.tinydiffusion``."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from modelfleet.workers.tinydiffusion import build_tiny_pipeline

ROOT = Path(__file__).resolve().parent.parent
MODEL = "test/tiny-diffusion"
BASE: dict[str, Any] = {"prompt": "a red fox in the snow", "width": 64, "height": 64, "steps": 2,
                        "guidance": 5.0, "seed": 7}


@dataclass
class Worker:
    url: str
    model_dir: Path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-diffusion") / "pipeline")


@pytest.fixture(scope="module")
def worker(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    port = _free_port()
    log_path = tmp_path_factory.mktemp("image-worker") / "worker.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelfleet.workers.images", "--model-dir", str(model_dir),
             "--port", str(port), "--model-name", MODEL, "--threads", "2", "--parent-pid", str(os.getpid())],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the image worker exited ({proc.returncode}):\n{log_path.read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the image worker was not healthy after 90 s:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield Worker(url=url, model_dir=model_dir)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
async def client(worker: Worker) -> Any:
    async with httpx.AsyncClient(base_url=worker.url, timeout=60) as http:
        yield http


def _png(size: tuple[int, int] = (48, 40), color: tuple[int, int, int] = (200, 30, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _images(body: dict[str, Any]) -> list[Image.Image]:
    decoded = []
    for text in body["images"]:
        image = Image.open(io.BytesIO(base64.b64decode(text)))
        assert image.format == "PNG"
        image.load()
        decoded.append(image)
    return decoded


def _error(resp: httpx.Response, param: str | None) -> dict[str, Any]:
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    return dict(error)


def test_build_tiny_pipeline_is_small_and_loads(tmp_path: Path) -> None:
    import torch
    from diffusers import DiffusionPipeline

    folder = build_tiny_pipeline(tmp_path / "tiny", seed=3)
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    assert size < 20 << 20
    assert (folder / "model_index.json").is_file()
    assert list(folder.rglob("*.safetensors"))
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.safety_checker is None


async def test_health_and_models(client: httpx.AsyncClient) -> None:
    health = await client.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    assert [model["id"] for model in models["data"]] == [MODEL]


async def test_text_to_image_returns_n_pngs_of_the_size(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/images/generate",
                             json={**BASE, "width": 64, "height": 48, "n": 2, "negative_prompt": "blurry"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == MODEL
    assert body["seed"] == 7
    assert (body["width"], body["height"]) == (64, 48)
    assert isinstance(body["timings"]["run_ms"], int)
    images = _images(body)
    assert len(images) == 2
    assert all(image.size == (64, 48) for image in images)


async def test_seed_decides_the_bytes(client: httpx.AsyncClient) -> None:
    first = (await client.post("/v1/images/generate", json=BASE)).json()
    again = (await client.post("/v1/images/generate", json=BASE)).json()
    other = (await client.post("/v1/images/generate", json={**BASE, "seed": 8})).json()
    assert first["images"] == again["images"]
    assert first["images"] != other["images"]


async def test_missing_seed_is_chosen_and_reported(client: httpx.AsyncClient) -> None:
    body = {key: value for key, value in BASE.items() if key != "seed"}
    resp = await client.post("/v1/images/generate", json=body)
    assert resp.status_code == 200, resp.text
    seed = resp.json()["seed"]
    assert isinstance(seed, int) and seed >= 0
    again = (await client.post("/v1/images/generate", json={**body, "seed": seed})).json()
    assert again["images"] == resp.json()["images"]


async def test_image_to_image(client: httpx.AsyncClient) -> None:
    payload = {**BASE, "width": 56, "height": 64, "steps": 3, "strength": 0.7,
               "input_images_base64": [_png()]}
    resp = await client.post("/v1/images/generate", json=payload)
    assert resp.status_code == 200, resp.text
    images = _images(resp.json())
    assert [image.size for image in images] == [(56, 64)]
    again = (await client.post("/v1/images/generate", json=payload)).json()
    assert again["images"] == resp.json()["images"]
    text_only = (await client.post("/v1/images/generate", json={**payload, "input_images_base64": []})).json()
    assert text_only["images"] != resp.json()["images"]


async def test_two_input_images_are_refused(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/images/generate", json={**BASE, "input_images_base64": [_png(), _png()]})
    _error(resp, "input_images_base64")


@pytest.mark.parametrize("image", [
    "not base64 at all!",
    base64.b64encode(b"this is not an image file").decode(),
    base64.b64encode(b"GIF89a" + bytes(40)).decode(),
    42,
])
async def test_bad_input_images_are_refused(client: httpx.AsyncClient, image: Any) -> None:
    resp = await client.post("/v1/images/generate", json={**BASE, "input_images_base64": [image]})
    _error(resp, "input_images_base64")


@pytest.mark.parametrize(("change", "param"), [
    ({"width": 60}, "width"),
    ({"height": 4096}, "height"),
    ({"width": "64"}, "width"),
    ({"steps": 0}, "steps"),
    ({"steps": True}, "steps"),
    ({"guidance": 51}, "guidance"),
    ({"seed": -1}, "seed"),
    ({"n": 9}, "n"),
    ({"strength": 0}, "strength"),
    ({"prompt": ""}, "prompt"),
    ({"negative_prompt": 3}, "negative_prompt"),
    ({"remove_bg": True}, "remove_bg"),
    ({"input_images_base64": "abc"}, "input_images_base64"),
])
async def test_invalid_values_name_the_field(client: httpx.AsyncClient, change: dict[str, Any],
                                             param: str) -> None:
    _error(await client.post("/v1/images/generate", json={**BASE, **change}), param)


@pytest.mark.parametrize("field", ["prompt", "width", "height", "steps", "guidance"])
async def test_required_fields(client: httpx.AsyncClient, field: str) -> None:
    body = {key: value for key, value in BASE.items() if key != field}
    error = _error(await client.post("/v1/images/generate", json=body), field)
    assert field in error["message"]


async def test_unknown_field_is_named(client: httpx.AsyncClient) -> None:
    error = _error(await client.post("/v1/images/generate", json={**BASE, "remove_bg": True}), "remove_bg")
    assert "remove_bg" in error["message"]


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b""])
async def test_bad_json_is_refused(client: httpx.AsyncClient, content: bytes) -> None:
    resp = await client.post("/v1/images/generate", content=content,
                             headers={"content-type": "application/json"})
    _error(resp, None)


async def test_unknown_route_answers_in_the_error_shape(client: httpx.AsyncClient) -> None:
    resp = await client.get("/v1/nothing")
    assert resp.status_code == 404
    assert "message" in resp.json()["error"]
