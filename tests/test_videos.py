"""Video jobs end to end: a real server, modelfleet's own diffusers video worker
on a tiny LTX-Video pipeline with random weights (built offline by the CLI, as
a user would), OpenAI's videos endpoints through the official SDK, the native
job API, validation, ownership, cancel, webhooks and billing per second."""

from __future__ import annotations

import io
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import openai
import pytest

from modelfleet.catalog import DEFAULT_CATALOG
from modelfleet.jobs import verify_signature
from modelfleet.workers.tinyvideo import build_tiny_video_pipeline
from tests.conftest import CHAT, Server, _cli, launch_server, stop_server
from tests.test_images import Receiver, _h, receiver, sql, usage_of, wait_job  # noqa: F401
from tests.test_openai_schema import validator  # noqa: F401  (fixture)

# the SDK marks its videos resource deprecated (Sora's shutdown); the warning is not ours
pytestmark = [pytest.mark.workers, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
TINY = "modelfleet/tiny-random-video"
PER_SECOND = 1_000  # the built-in catalog's price for the tiny model


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("videos")
    _cli("models", "make-tiny-video", data_dir=tmp / "data")
    assert (tmp / "data" / "models" / "modelfleet-tiny-random-video" / "model_index.json").is_file()
    running = launch_server(tmp, DEFAULT_CATALOG.read_text(),
                            env={"MODELFLEET_JOBS_WEBHOOK_BACKOFF_S": "0.2",
                                 "MODELFLEET_WEBHOOK_ALLOW": "127.0.0.1"})
    try:
        yield running
    finally:
        stop_server(running.proc)


def decode(mp4: bytes) -> tuple[str, int, int, int, float]:
    """(codec, frames, width, height, frames per second) of an MP4, decoded with PyAV."""
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(video=0))
        return (stream.codec_context.name, len(frames), frames[0].width, frames[0].height,
                float(stream.average_rate or 0))


def submit(srv: Server, key: str | None = None, path: str = "/v1/inference/video",
           **body: Any) -> httpx.Response:
    payload = {"model": TINY, "prompt": "a red fox in the snow", **body}
    return httpx.post(srv.url + path, json=payload, headers=_h(key or srv.key), timeout=60)


def test_openai_sdk_flow(srv: Server, validator: Any) -> None:  # noqa: F811
    with openai.OpenAI(base_url=srv.url + "/v1", api_key=srv.key, max_retries=0,
                       timeout=120) as sdk:
        # 720x1280: LTX renders 736x1280 (sides in multiples of 32), cropped to the size asked
        video = sdk.videos.create(model=TINY, prompt="a lighthouse at dusk", seconds="2",
                                  size="720x1280")
        assert video.status == "queued" and video.model == TINY and video.size == "720x1280"
        assert video.seconds == "2.125"  # 17 frames (8k + 1, nearest to 2 s) at 8 fps
        deadline = time.monotonic() + 120
        while video.status in ("queued", "in_progress") and time.monotonic() < deadline:
            time.sleep(0.2)
            video = sdk.videos.retrieve(video.id)
        assert video.status == "completed", video.error
        assert video.progress == 100 and video.completed_at and video.expires_at
        content = sdk.videos.download_content(video.id).content
        assert decode(content) == ("h264", 17, 720, 1280, 8.0)
        assert video.id in [v.id for v in sdk.videos.list(limit=5).data]
        raw = httpx.get(f"{srv.url}/v1/videos/{video.id}", headers=_h(srv.key)).json()
        validator("VideoResource", raw)
        listing = httpx.get(srv.url + "/v1/videos?limit=1", headers=_h(srv.key)).json()
        validator("VideoListResource", listing)
        # 17 frames at 8 fps: 2.125 s at 1000 per second
        assert usage_of(srv, video.id) == [("succeeded", 1, 2125)]
        deleted = sdk.videos.delete(video.id)
        assert deleted.deleted and deleted.id == video.id
        validator("DeletedVideoResource", httpx.Response(200, json=deleted.model_dump()).json())
        with pytest.raises(openai.NotFoundError):
            sdk.videos.retrieve(video.id)
        with pytest.raises(openai.BadRequestError) as exc:
            sdk.videos.create(model=TINY, prompt="x", size="1024x1792")  # not one it makes
        assert exc.value.code == "unsupported_size"
        assert exc.value.body["param"] == "size"  # type: ignore[index]


def test_native_job_flow(srv: Server) -> None:
    reply = submit(srv, frames=9, width=64, height=96, fps=6, seed=7)
    assert reply.status_code == 202, reply.text
    accepted = reply.json()
    assert accepted["job_type"] == "video" and reply.headers["x-model-used"] == TINY
    typed = submit(srv, path="/v1/inference/jobs", job_type="video", frames=17)
    assert typed.status_code == 202, typed.text
    for job_id, frames, size, fps in ((accepted["job_id"], 9, (64, 96), 6.0),
                                      (typed.json()["job_id"], 17, (64, 64), 8.0)):
        job = wait_job(srv, job_id)
        assert job["status"] == "succeeded", (job["error"], job)
        assert job["job_type"] == "video" and job["images"] == 1
        assert job["params"]["frames"] == frames and job["params"]["steps"] == 2  # model default
        mp4 = httpx.get(job["result_url"], headers=_h(srv.key), timeout=30)
        assert mp4.status_code == 200 and mp4.headers["content-type"] == "video/mp4"
        assert decode(mp4.content) == ("h264", frames, *size, fps)
        # per second of video, rounded up: 9 / 6 s -> 1500; 17 / 8 s -> 2125
        assert usage_of(srv, job_id) == [("succeeded", 1, -(-PER_SECOND * frames // int(fps)))]
        # a size OpenAI's video object cannot name: read through the native API only
        assert httpx.get(f"{srv.url}/v1/videos/{job_id}", headers=_h(srv.key)).status_code == 404
        listed = httpx.get(f"{srv.url}/v1/videos", headers=_h(srv.key)).json()["data"]
        assert job_id not in [v["id"] for v in listed]
    # an image job through the same typed route
    image = submit(srv, path="/v1/inference/jobs", job_type="image",
                   model="modelfleet/tiny-random-sd")
    assert image.status_code == 503  # its weights were not built here: it is not serving
    assert "tiny-random-sd" in image.json()["error"]["message"]


def test_every_validation_error_changes_nothing(srv: Server) -> None:
    before = sql(srv, "SELECT COUNT(*) FROM jobs")[0][0]
    native: list[tuple[dict[str, Any], int, str | None]] = [
        ({"prompt": "x" * 501}, 400, "prompt"),
        ({"prompt": "  "}, 400, "prompt"),
        ({"width": 100, "height": 64}, 400, "width"),
        ({"frames": 10}, 400, "frames"),        # not 8k + 1
        ({"frames": 57}, 400, "frames"),        # above max_frames
        ({"frames": 49, "fps": 2}, 400, "frames"),  # 24.5 s, above max_seconds
        ({"seconds": 7.0}, 400, "seconds"),
        ({"seconds": 1.0, "frames": 9}, 400, "seconds"),
        ({"fps": 25}, 400, "fps"),
        ({"steps": 21}, 400, "steps"),
        ({"guidance": 51.0}, 400, "guidance"),
        ({"webhook_url": "ftp://example.com/x"}, 400, "webhook_url"),
        ({"model": "no/such-model"}, 404, "model"),
        ({"model": CHAT}, 400, "model"),
        ({"model": "modelfleet/tiny-random-sd"}, 400, "model"),  # an image model
        ({"frames": "9"}, 422, "frames"),
        ({"colour": "red"}, 422, "colour"),
    ]
    openai_cases: list[tuple[dict[str, Any], int, str | None]] = [
        ({"size": "1792x1024"}, 400, "size"),  # OpenAI's, but not the model's
        ({"size": "96x64"}, 400, "size"),  # the model's, but not OpenAI's: the native API's
        ({"size": "big"}, 400, "size"),
        ({"seconds": "12"}, 400, "seconds"),
        ({"seconds": "four"}, 400, "seconds"),
        ({"prompt": "x" * 501}, 400, "prompt"),
        ({"steps": 0}, 422, "steps"),
        ({"input_reference": {"image_url": "https://example.com/a.png"}}, 400, "input_reference"),
        ({"model": "stabilityai/sd-turbo"}, 400, "model"),
    ]
    for path, cases in (("/v1/inference/video", native), ("/v1/videos", openai_cases)):
        for over, status, param in cases:
            reply = submit(srv, path=path, **over)
            assert reply.status_code == status, (path, over, reply.text)
            error = reply.json()["error"]
            assert set(error) == {"message", "type", "code", "param", "status"}
            assert error["param"] == param, (path, over, error)
    bad_type = submit(srv, path="/v1/inference/jobs", job_type="audio")
    assert bad_type.status_code == 400 and bad_type.json()["error"]["param"] == "job_type"
    # a listed model whose weights folder is absent: 503 saying what is missing
    missing = submit(srv, model="Lightricks/LTX-Video")
    assert missing.status_code == 503 and "LTX-Video" in missing.json()["error"]["message"]
    assert submit(srv, key=srv.admin_key).status_code == 403  # admin, not inference
    assert sql(srv, "SELECT COUNT(*) FROM jobs")[0][0] == before
    assert sql(srv, "SELECT COUNT(*) FROM usage WHERE cost > 0 AND status != 'succeeded'")[0][0] == 0


def test_videos_belong_to_their_project(srv: Server) -> None:
    other = _cli("keys", "create", "--project", "video-other", "--scope", "inference",
                 data_dir=srv.data_dir)
    job_id = submit(srv, width=720, height=1280).json()["job_id"]  # an OpenAI size
    assert wait_job(srv, job_id)["status"] == "succeeded"
    for path in (f"/v1/videos/{job_id}", f"/v1/videos/{job_id}/content",
                 f"/v1/inference/jobs/{job_id}", f"/v1/inference/jobs/{job_id}/result"):
        reply = httpx.get(srv.url + path, headers=_h(other))
        assert reply.status_code == 404, (path, reply.text)
    assert httpx.delete(f"{srv.url}/v1/videos/{job_id}", headers=_h(other)).status_code == 404
    listed = httpx.get(srv.url + "/v1/videos", headers=_h(other)).json()["data"]
    assert job_id not in [v["id"] for v in listed]
    assert httpx.get(f"{srv.url}/v1/videos/{job_id}", headers=_h(srv.key)).status_code == 200
    # an id that is no job of this project
    assert httpx.get(f"{srv.url}/v1/videos/not-a-job", headers=_h(srv.key)).status_code == 404


def test_cancel_a_queued_video(srv: Server) -> None:
    # one replica, one slot: the last of several slower jobs is still queued
    ids = [submit(srv, width=128, height=128, frames=49, fps=12, steps=8).json()["job_id"]
           for _ in range(2)]
    ids.append(submit(srv, width=1280, height=720).json()["job_id"])  # an OpenAI size
    reply = httpx.post(f"{srv.url}/v1/inference/jobs/{ids[-1]}/cancel", headers=_h(srv.key))
    assert reply.status_code == 200, reply.text
    assert reply.json()["status"] == "cancelled" and reply.json()["started_at"] is None
    view = httpx.get(f"{srv.url}/v1/videos/{ids[-1]}", headers=_h(srv.key)).json()
    assert view["status"] == "failed" and view["error"]["code"] == "cancelled"
    assert httpx.get(f"{srv.url}/v1/videos/{ids[-1]}/content",
                     headers=_h(srv.key)).status_code == 409
    assert usage_of(srv, ids[-1]) == [("cancelled", 0, 0)]
    first = wait_job(srv, ids[0])
    assert first["status"] == "succeeded"
    assert httpx.post(f"{srv.url}/v1/inference/jobs/{ids[0]}/cancel",
                      headers=_h(srv.key)).status_code == 409
    assert wait_job(srv, ids[1])["status"] == "succeeded"
    assert wait_job(srv, ids[-1])["attempts"] == 0  # never started
    # 49 frames at 12 fps: 4.0833 s, rounded up to a whole micro-unit
    assert usage_of(srv, ids[0]) == [("succeeded", 1, 4084)]


def test_webhook_is_signed(srv: Server, receiver: Receiver) -> None:  # noqa: F811
    receiver.fail_first = 0
    secret = httpx.get(srv.url + "/v1/inference/webhook-secret", headers=_h(srv.key)).json()["secret"]
    job_id = submit(srv, webhook_url=receiver.url).json()["job_id"]
    assert wait_job(srv, job_id)["status"] == "succeeded"
    deadline = time.monotonic() + 20
    while not receiver.deliveries(job_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    [call] = receiver.deliveries(job_id)
    assert call["headers"]["x-modelfleet-event"] == "job.succeeded"
    assert verify_signature(secret, call["body"], call["headers"]["x-modelfleet-signature"])
    delivered = json.loads(call["body"])
    assert delivered["id"] == job_id and delivered["job_type"] == "video"


def test_catalog_lists_video_models(srv: Server) -> None:
    catalog = httpx.get(srv.url + "/v1/inference/models").json()
    videos = {m["model"]: m for m in catalog["video"]}
    assert set(videos) == {TINY, "Lightricks/LTX-Video", "genmo/mochi-1-preview"}
    tiny = videos[TINY]
    assert tiny["endpoints"] == ["/v1/inference/video", "/v1/videos"]
    assert tiny["parameters"]["frames"] == {"default": 9, "min": 1, "max": 49, "step": 8}
    assert tiny["pricing"] == {"unit": "micro-units per second of video",
                               "per_video_second": PER_SECOND}
    runtime = {r["model"]: r for r in
               httpx.get(srv.url + "/v1/inference/runtime/models").json()["video"]}
    assert runtime[TINY]["available"] is True
    ltx = runtime["Lightricks/LTX-Video"]
    assert ltx["available"] is False and "LTX-Video" in ltx["reason"]


def test_a_video_job_survives_kill_9_of_the_api(tmp_path: Path) -> None:
    build_tiny_video_pipeline(tmp_path / "data" / "models" / "modelfleet-tiny-random-video")
    server = launch_server(tmp_path, DEFAULT_CATALOG.read_text())
    try:
        # the model is asleep: the job waits for a cold start when the API dies
        reply = submit(server, frames=17, seed=3)
        assert reply.status_code == 202
        job_id = reply.json()["job_id"]
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        assert sql(server, "SELECT status FROM jobs WHERE id = ?", job_id)[0][0] in ("queued", "running")
        again = launch_server(tmp_path, DEFAULT_CATALOG.read_text(), key=server.key)
        try:
            job = wait_job(again, job_id)
            assert job["status"] == "succeeded", (job["error"], job)
            mp4 = httpx.get(f"{again.url}/v1/inference/jobs/{job_id}/result",
                            headers=_h(again.key))
            assert decode(mp4.content) == ("h264", 17, 64, 64, 8.0)
            assert (again.data_dir / "results" / job_id / "0.mp4").is_file()
            # charged once: 17 frames at 8 fps
            assert usage_of(again, job_id) == [("succeeded", 1, 2125)]
            assert len(sql(again, "SELECT * FROM ledger WHERE request_id = ?", job_id)) == 1
        finally:
            stop_server(again.proc)
    finally:
        if server.proc.poll() is None:
            stop_server(server.proc)
