"""Image jobs end to end: a real server, modelfleet's own diffusers worker on a
tiny pipeline with random weights (built offline in a temporary folder), the
native job API, the OpenAI images endpoint through the official SDK, webhooks
with signatures, and a job that survives a kill -9 of the API process."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from modelfleet.catalog import DEFAULT_CATALOG
from modelfleet.jobs import verify_signature
from modelfleet.workers.tinydiffusion import build_tiny_pipeline
from tests.conftest import CHAT, Server, _cli, launch_server, stop_server

pytestmark = pytest.mark.workers
TINY = "modelfleet/tiny-random-sd"
PER_IMAGE = 100  # the built-in catalog's price for the tiny model


def _png(width: int = 32, height: int = 32, color: tuple[int, int, int] = (200, 30, 30)) -> str:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


@dataclass
class Receiver:
    """A webhook endpoint on loopback that records deliveries; the first
    ``fail_first`` attempts per job get a 500."""

    url: str = ""
    fail_first: int = 0
    calls: list[dict[str, Any]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    def deliveries(self, job_id: str) -> list[dict[str, Any]]:
        return [c for c in self.calls if c["headers"].get("x-modelfleet-job-id") == job_id]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    rec = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            headers = {k.lower(): v for k, v in self.headers.items()}
            seen = len(rec.deliveries(headers.get("x-modelfleet-job-id", "")))
            rec.calls.append({"path": self.path, "headers": headers, "body": body})
            self.send_response(500 if seen < rec.fail_first else 200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    rec.server = httpd
    rec.url = f"http://127.0.0.1:{httpd.server_address[1]}/hooks"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield rec
    httpd.shutdown()
    httpd.server_close()


def _start(tmp: Path, cli: bool = False) -> Server:
    """A server whose data folder holds the tiny pipeline (made by the CLI, as a
    user would, or directly)."""
    if cli:
        _cli("models", "make-tiny-image", data_dir=tmp / "data")
    else:
        build_tiny_pipeline(tmp / "data" / "models" / "modelfleet-tiny-random-sd")
    assert (tmp / "data" / "models" / "modelfleet-tiny-random-sd" / "model_index.json").is_file()
    return launch_server(tmp, DEFAULT_CATALOG.read_text(),
                         env={"MODELFLEET_JOBS_WEBHOOK_BACKOFF_S": "0.2",
                              # the test's receiver is on loopback: allowed on purpose
                              "MODELFLEET_WEBHOOK_ALLOW": "127.0.0.1"})


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = _start(tmp_path_factory.mktemp("images"), cli=True)
    try:
        yield running
    finally:
        stop_server(running.proc)


def _h(key: str) -> dict[str, str]:
    return {"x-api-key": key}


def submit(srv: Server, key: str | None = None, **body: Any) -> httpx.Response:
    payload = {"model": TINY, "prompt": "a red fox in the snow", **body}
    return httpx.post(srv.url + "/v1/inference/image", json=payload, headers=_h(key or srv.key),
                      timeout=60)


def wait_job(srv: Server, job_id: str, key: str | None = None, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = httpx.get(f"{srv.url}/v1/inference/jobs/{job_id}", headers=_h(key or srv.key),
                        timeout=30).json()
        if job["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


def sql(srv: Server, query: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(srv.data_dir / "modelfleet.db")
    try:
        return conn.execute(query, args).fetchall()
    finally:
        conn.close()


def usage_of(srv: Server, job_id: str, timeout: float = 10) -> list[tuple[Any, ...]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = sql(srv, "SELECT status, images, cost FROM usage WHERE request_id = ?", job_id)
        if rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def test_native_job_flow(srv: Server) -> None:
    reply = submit(srv, seed=7)
    assert reply.status_code == 202, reply.text
    accepted = reply.json()
    assert set(accepted) >= {"job_id", "job_type", "result_url"}
    assert accepted["job_type"] == "image"
    assert reply.headers["x-model-used"] == TINY and "x-request-id" in reply.headers
    assert reply.headers["location"] == accepted["status_url"]
    job = wait_job(srv, accepted["job_id"])
    assert job["status"] == "succeeded", (job["error"], job)
    assert job["url"] == accepted["status_url"]
    assert httpx.get(accepted["status_url"], headers=_h(srv.key)).json()["id"] == accepted["job_id"]
    assert job["params"]["seed"] == 7
    assert job["params"]["steps"] == 4 and job["params"]["guidance"] == 3.5  # model defaults
    assert job["params"]["width"] == 64 and job["images"] == 1
    assert job["timings"]["run_ms"] is not None and job["timings"]["total_ms"] >= job["timings"]["run_ms"]
    png = httpx.get(accepted["result_url"], headers=_h(srv.key), timeout=30)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (64, 64)
    # Bearer works as well as x-api-key
    bearer = httpx.get(accepted["result_url"], headers={"Authorization": f"Bearer {srv.key}"})
    assert bearer.content == png.content
    assert usage_of(srv, accepted["job_id"]) == [("succeeded", 1, PER_IMAGE)]


def test_image_to_image_and_larger_size(srv: Server) -> None:
    reply = submit(srv, input_images_base64=[_png()], width=128, height=128, steps=2)
    assert reply.status_code == 202, reply.text
    job = wait_job(srv, reply.json()["job_id"])
    assert job["status"] == "succeeded", (job["error"], job)
    assert job["input_images"] == 1
    png = httpx.get(job["result_url"], headers=_h(srv.key), timeout=30)
    assert Image.open(io.BytesIO(png.content)).size == (128, 128)


def test_every_validation_error_changes_nothing(srv: Server) -> None:
    before = sql(srv, "SELECT COUNT(*) FROM jobs")[0][0]
    cases: list[tuple[dict[str, Any], int, str | None]] = [
        ({"model": None}, 422, "model"),
        ({"prompt": None}, 422, "prompt"),
        ({"prompt": "x" * 1001}, 400, "prompt"),
        ({"width": 100, "height": 100}, 400, "width"),
        ({"steps": 21}, 400, "steps"),
        ({"guidance": 51.0}, 400, "guidance"),
        ({"n": 5}, 400, "n"),
        ({"remove_bg": True}, 400, "remove_bg"),
        ({"input_images_base64": ["not base64!!"]}, 400, "input_images_base64"),
        ({"input_images_base64": [base64.b64encode(b"plain text, not an image").decode()]},
         400, "input_images_base64"),
        ({"input_images_base64": [_png(), _png()]}, 400, "input_images_base64"),
        ({"webhook_url": "ftp://example.com/x"}, 400, "webhook_url"),
        ({"model": "no/such-model"}, 404, "model"),
        ({"model": CHAT}, 400, "model"),
        ({"colour": "red"}, 422, "colour"),
    ]
    for over, status, param in cases:
        body = {"model": TINY, "prompt": "a cat", **over}
        body = {k: v for k, v in body.items() if v is not None}
        reply = httpx.post(srv.url + "/v1/inference/image", json=body, headers=_h(srv.key))
        assert reply.status_code == status, (over, reply.text)
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "code", "param", "status"}
        assert error["param"] == param, (over, error)
    # a known model whose weights folder is absent: 503 saying what is missing
    missing = submit(srv, model="stabilityai/sd-turbo")
    assert missing.status_code == 503
    assert "sd-turbo" in missing.json()["error"]["message"]
    assert "model_index.json" in missing.json()["error"]["message"] or \
        "does not exist" in missing.json()["error"]["message"]
    assert httpx.post(srv.url + "/v1/inference/image", json={"model": TINY, "prompt": "x"}).status_code == 401
    assert submit(srv, key=srv.admin_key).status_code == 403  # admin, not inference
    assert sql(srv, "SELECT COUNT(*) FROM jobs")[0][0] == before


def test_jobs_belong_to_their_project(srv: Server) -> None:
    other = _cli("keys", "create", "--project", "someone-else", "--scope", "inference",
                 data_dir=srv.data_dir)
    job_id = submit(srv).json()["job_id"]
    job = wait_job(srv, job_id)
    assert job["status"] == "succeeded"
    for url in (f"{srv.url}/v1/inference/jobs/{job_id}", job["result_url"]):
        reply = httpx.get(url, headers=_h(other))
        assert reply.status_code == 404, reply.text
    assert httpx.post(f"{srv.url}/v1/inference/jobs/{job_id}/cancel", headers=_h(other)).status_code == 404
    listed = httpx.get(srv.url + "/v1/inference/jobs", headers=_h(other)).json()["data"]
    assert job_id not in [j["id"] for j in listed]
    mine = httpx.get(srv.url + "/v1/inference/jobs", headers=_h(srv.key)).json()["data"]
    assert job_id in [j["id"] for j in mine]


def test_cancel_a_queued_job(srv: Server) -> None:
    # one replica, one slot: the last of several slow jobs is still queued
    ids = [submit(srv, width=128, height=128, steps=20, n=4).json()["job_id"] for _ in range(3)]
    reply = httpx.post(f"{srv.url}/v1/inference/jobs/{ids[-1]}/cancel", headers=_h(srv.key))
    assert reply.status_code == 200, reply.text
    cancelled = reply.json()
    assert cancelled["status"] == "cancelled" and cancelled["started_at"] is None
    first = wait_job(srv, ids[0])
    assert first["status"] == "succeeded"
    again = httpx.post(f"{srv.url}/v1/inference/jobs/{ids[0]}/cancel", headers=_h(srv.key))
    assert again.status_code == 409
    assert httpx.get(f"{srv.url}/v1/inference/jobs/{ids[-1]}/result",
                     headers=_h(srv.key)).status_code == 409
    assert usage_of(srv, ids[-1]) == [("cancelled", 0, 0)]
    assert wait_job(srv, ids[1])["status"] == "succeeded"
    assert wait_job(srv, ids[-1])["attempts"] == 0  # never started


def test_openai_images_endpoint(srv: Server) -> None:
    with openai.OpenAI(base_url=srv.url + "/v1", api_key=srv.key, max_retries=0, timeout=120) as sdk:
        result = sdk.images.generate(model=TINY, prompt="a lighthouse", n=2, size="64x64",
                                     response_format="b64_json")
        assert len(result.data) == 2
        for item in result.data:
            assert item.b64_json is not None
            assert Image.open(io.BytesIO(base64.b64decode(item.b64_json))).size == (64, 64)
        by_url = sdk.images.generate(model=TINY, prompt="a lighthouse", size="128x128")
        assert by_url.data[0].url is not None
        png = httpx.get(by_url.data[0].url, headers=_h(srv.key))
        assert Image.open(io.BytesIO(png.content)).size == (128, 128)
        with pytest.raises(openai.BadRequestError) as exc:
            sdk.images.generate(model=TINY, prompt="x", size="1024x1024")
        assert exc.value.code == "unsupported_size"
        with pytest.raises(openai.InternalServerError) as unavailable:
            sdk.images.generate(model="stabilityai/sd-turbo", prompt="x")
        assert unavailable.value.status_code == 503


def test_webhook_is_signed_and_retried(srv: Server, receiver: Receiver) -> None:
    receiver.fail_first = 1
    secret = httpx.get(srv.url + "/v1/inference/webhook-secret", headers=_h(srv.key)).json()["secret"]
    job_id = submit(srv, webhook_url=receiver.url).json()["job_id"]
    assert wait_job(srv, job_id)["status"] == "succeeded"
    deadline = time.monotonic() + 20
    while len(receiver.deliveries(job_id)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    calls = receiver.deliveries(job_id)
    assert len(calls) == 2  # one refused, then delivered
    for call in calls:
        assert call["headers"]["x-modelfleet-event"] == "job.succeeded"
        assert verify_signature(secret, call["body"], call["headers"]["x-modelfleet-signature"])
        assert not verify_signature(secret, call["body"] + b" ", call["headers"]["x-modelfleet-signature"])
        assert not verify_signature("whsec_wrong", call["body"], call["headers"]["x-modelfleet-signature"])
    delivered = json.loads(calls[-1]["body"])
    assert delivered["id"] == job_id and delivered["status"] == "succeeded"
    job = wait_job(srv, job_id)
    deadline = time.monotonic() + 5
    while job["webhook"]["state"] != "delivered" and time.monotonic() < deadline:
        time.sleep(0.05)
        job = wait_job(srv, job_id)
    assert job["webhook"] == {"url": receiver.url, "state": "delivered", "attempts": 2}
    other = _cli("keys", "create", "--project", "hook-other", "--scope", "inference",
                 data_dir=srv.data_dir)
    other_secret = httpx.get(srv.url + "/v1/inference/webhook-secret", headers=_h(other)).json()["secret"]
    assert other_secret != secret


def test_catalog_and_runtime_list_image_and_embedding_models(srv: Server) -> None:
    catalog = httpx.get(srv.url + "/v1/inference/models").json()
    images = {m["model"]: m for m in catalog["image"]}
    assert set(images) == {TINY, "stabilityai/sd-turbo"}
    tiny = images[TINY]["parameters"]
    assert tiny["max_input_images"] == 1 and tiny["max_prompt_length"] == 1000
    assert tiny["parameter_defaults"]["steps"] == 4
    assert [m["model"] for m in catalog["embedding"]] == ["sentence-transformers/all-MiniLM-L6-v2"]
    runtime = httpx.get(srv.url + "/v1/inference/runtime/models").json()
    rows = {r["model"]: r for r in runtime["image"]}
    assert rows[TINY]["available"] is True
    assert rows["stabilityai/sd-turbo"]["available"] is False
    assert "sd-turbo" in rows["stabilityai/sd-turbo"]["reason"]
    for row in rows.values():
        assert {"ready_replicas", "desired_replicas", "min_input_images", "max_input_images",
                "max_prompt_length", "parameter_defaults"} <= set(row)
    assert [r["model"] for r in runtime["embedding"]] == ["sentence-transformers/all-MiniLM-L6-v2"]


def test_a_job_survives_kill_9_of_the_api(tmp_path: Path) -> None:
    server = _start(tmp_path)
    try:
        # The model is asleep: the job waits for a cold start when the API dies.
        # A chat replica too: every replica, llama-server included, must die with the API.
        chat = httpx.post(server.url + "/v1/chat/completions", headers=_h(server.key), timeout=120,
                          json={"model": CHAT, "max_tokens": 1,
                                "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 200
        reply = submit(server, seed=3)
        assert reply.status_code == 202
        job_id = reply.json()["job_id"]
        replicas = httpx.get(server.url + "/v1/admin/replicas",
                             headers=_h(server.admin_key)).json()["replicas"]
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        status = sql(server, "SELECT status FROM jobs WHERE id = ?", job_id)[0][0]
        assert status in ("queued", "running")
        # the workers of the killed server go away on their own
        assert any(r["model"] == CHAT and r["pid"] for r in replicas)
        for pid in [r["pid"] for r in replicas if r["pid"]]:
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not _alive(pid), f"worker {pid} outlived its API process"
        (tmp_path / "catalog.toml").unlink()
        # Restarted with a short retention, to see results expire and be deleted.
        again = launch_server(tmp_path, DEFAULT_CATALOG.read_text(), key=server.key,
                              env={"MODELFLEET_JOBS_RETENTION_S": "4",
                                   "MODELFLEET_JOBS_SWEEP_INTERVAL_S": "0.5"})
        try:
            job = wait_job(again, job_id)
            assert job["status"] == "succeeded", (job["error"], job)
            png = httpx.get(job["result_url"], headers=_h(again.key))
            assert png.status_code == 200
            assert usage_of(again, job_id) == [("succeeded", 1, PER_IMAGE)]
            time.sleep(0.5)
            assert len(sql(again, "SELECT * FROM usage WHERE request_id = ?", job_id)) == 1
            assert len(sql(again, "SELECT * FROM ledger WHERE request_id = ?", job_id)) == 1
            result_file = again.data_dir / "results" / job_id / "0.png"
            assert result_file.is_file()
            deadline = time.monotonic() + 15
            while result_file.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not result_file.exists(), "the sweeper did not delete an expired result"
            gone = httpx.get(job["result_url"], headers=_h(again.key))
            assert gone.status_code == 404 and gone.json()["error"]["code"] == "result_expired"
        finally:
            stop_server(again.proc)
    finally:
        if server.proc.poll() is None:
            stop_server(server.proc)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False
