"""External engines against a real llama.cpp server started here, and the
commands managed vLLM / SGLang replicas would run (no GPU on this machine)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from modelfleet.catalog import ModelSpec
from modelfleet.engines import engine_for
from modelfleet.engines.llamacpp import find_llama_server
from modelfleet.engines.modelfiles import resolve
from tests.conftest import SMOL_FILE, Server, free_port, launch_server, stop_server

pytestmark = pytest.mark.workers
SECRET = "upstream-" + "s3cret" * 4


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A plain llama-server that modelfleet does not manage, behind an API key."""
    port = free_port()
    model = resolve(SMOL_FILE, tmp_path_factory.mktemp("m"))
    proc = subprocess.Popen(
        [str(find_llama_server()), "--model", str(model), "--host", "127.0.0.1",
         "--port", str(port), "--threads", "1", "--parallel", "2", "--ctx-size", "4096",
         "--api-key", SECRET, "--no-webui", "--alias", "upstream-smol"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "upstream llama-server did not start"
        time.sleep(0.1)
    try:
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def external_catalog(url: str) -> str:
    return f"""
[[models]]
id = "ext/smol"
kind = "chat"
[models.engine]
type = "external"
url = "{url}"
api_key_env = "MODELFLEET_TEST_UPSTREAM_KEY"
upstream_model = "upstream-smol"
backend = "llama.cpp-external"
[models.prices]
input_per_million = 1_000_000
output_per_million = 10_000_000

[[models]]
id = "ext/no-credential"
kind = "chat"
[models.engine]
type = "external"
url = "{url}"
api_key_env = "MODELFLEET_TEST_MISSING_KEY"

[[models]]
id = "gpu/llama-70b"
kind = "chat"
[models.engine]
type = "vllm"
model = "meta-llama/Llama-3.3-70B-Instruct"
gpus = 4
"""


@pytest.fixture(scope="module")
def gateway(upstream: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("ext")
    server = launch_server(tmp, external_catalog(upstream),
                           env={"MODELFLEET_TEST_UPSTREAM_KEY": SECRET})
    try:
        yield server
    finally:
        stop_server(server.proc)


def test_external_engine_serves_with_keys_headers_and_billing(gateway: Server) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="ext/smol", max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
    reply = raw.parse()
    assert reply.model == "ext/smol" and reply.choices[0].message.content
    assert raw.headers["x-backend"] == "llama.cpp-external"
    assert raw.headers["x-model-used"] == "ext/smol"
    assert raw.headers["x-ratelimit-limit"] == "1000"
    chunks = list(client.chat.completions.create(
        model="ext/smol", max_tokens=4, stream=True, messages=[{"role": "user", "content": "Hi"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # charged like a managed worker: one usage record with a cost
    import sqlite3

    rid = raw.headers["x-request-id"]
    deadline = time.monotonic() + 10
    while True:
        rows = sqlite3.connect(gateway.data_dir / "modelfleet.db").execute(
            "SELECT status, input_tokens, output_tokens, cost FROM usage WHERE request_id = ?",
            (rid,)).fetchall()
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    status, tin, tout, cost = rows[0]
    assert status == "succeeded" and tout == reply.usage.completion_tokens  # type: ignore[union-attr]
    assert cost == tin + 10 * tout
    # the upstream credential never reaches logs
    logs = [gateway.log_text()] + [p.read_text(errors="replace")
                                   for p in (gateway.data_dir / "logs").glob("*")]
    assert all(SECRET not in text for text in logs)


def test_external_engine_without_its_credential_is_503(gateway: Server) -> None:
    resp = httpx.post(gateway.url + "/v1/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {gateway.key}"},
                      json={"model": "ext/no-credential", "max_tokens": 2,
                            "messages": [{"role": "user", "content": "Hi"}]})
    assert resp.status_code == 503
    assert "MODELFLEET_TEST_MISSING_KEY" in resp.json()["error"]["message"]


def test_gpu_model_is_listed_but_unavailable_here(gateway: Server) -> None:
    rows = httpx.get(gateway.url + "/v1/inference/runtime/models").json()["text"]
    row = next(r for r in rows if r["model"] == "gpu/llama-70b")
    assert row["available"] is False and "vllm" in row["reason"]


def _spec(engine: dict[str, object]) -> ModelSpec:
    return ModelSpec.model_validate({"id": "org/big", "kind": "chat", "engine": engine})


def test_vllm_and_sglang_launch_commands(tmp_path: Path) -> None:
    vllm = engine_for(_spec({"type": "vllm", "model": "org/big-weights", "gpus": 2,
                             "args": ["--max-model-len", "8192"]}), tmp_path)
    plan = vllm.launch(9001)
    assert plan.argv == ["vllm", "serve", "org/big-weights", "--host", "127.0.0.1",
                         "--port", "9001", "--tensor-parallel-size", "2",
                         "--served-model-name", "org/big", "--max-model-len", "8192"]
    assert vllm.resources().gpus == 2 and vllm.backend == "vllm"
    sglang = engine_for(_spec({"type": "sglang", "model": "/models/big", "gpus": 1}), tmp_path)
    argv = sglang.launch(9002).argv
    assert argv[1:3] == ["-m", "sglang.launch_server"]
    assert argv[3:] == ["--model-path", "/models/big", "--host", "127.0.0.1", "--port", "9002",
                        "--tp-size", "1", "--served-model-name", "org/big"]
    custom = engine_for(_spec({"type": "vllm", "model": "m", "gpus": 1,
                               "command": ["my-vllm", "--port={port}", "{model}"]}), tmp_path)
    assert custom.launch(7).argv == ["my-vllm", "--port=7", "m"]
    payload: dict[str, object] = {}
    vllm.prepare_stream(payload)
    assert payload["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}


def test_external_url_must_be_operator_http_and_secret_env_prefixed() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        _spec({"type": "external", "url": "file:///etc/passwd"})
    with pytest.raises(ValidationError):
        _spec({"type": "external", "url": "http://x:1", "api_key_env": "HOME"})
