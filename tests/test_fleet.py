"""The fleet with real worker processes: cold start, scale to zero, restarts,
deadlines and start failures.  Each test uses its own small model from the
test catalog (tests/conftest.py), so they do not disturb one another."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import httpx
import pytest

from tests.conftest import Server

pytestmark = pytest.mark.workers


def chat(server: Server, model: str, timeout: float = 120, **over: Any) -> httpx.Response:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "Hi"}],
                            "max_tokens": 4}
    body.update(over)
    return httpx.post(server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {server.key}"}, timeout=timeout)


def runtime(server: Server, model: str) -> dict[str, Any]:
    rows = httpx.get(server.url + "/v1/inference/runtime/models", timeout=10).json()["text"]
    return next(r for r in rows if r["model"] == model)


def replicas(server: Server, model: str) -> list[dict[str, Any]]:
    body = httpx.get(server.url + "/v1/admin/replicas", timeout=10,
                     headers={"Authorization": f"Bearer {server.admin_key}"}).json()
    return [r for r in body["replicas"] if r["model"] == model]


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_cold_start_waits_then_scales_to_zero(server: Server) -> None:
    model = "test/idle"
    assert runtime(server, model)["state"] == "sleeping"
    seen: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append(runtime(server, model)["state"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        resp = chat(server, model)
    finally:
        done.set()
        watcher.join()
    assert resp.status_code == 200, resp.text  # no 503 for a model that can start
    assert "starting" in seen
    row = runtime(server, model)
    assert row["state"] == "ready" and row["ready_replicas"] == 1
    pid = replicas(server, model)[0]["pid"]
    # idle_timeout_s = 1.0: the replica is stopped and the model sleeps again
    wait_for(lambda: runtime(server, model)["state"] == "sleeping", 15, "scale to zero")
    assert runtime(server, model)["desired_replicas"] == 0
    wait_for(lambda: not pid_alive(pid), 10, "worker process exit")
    # and the next request wakes it again
    assert chat(server, model).status_code == 200


def test_dead_worker_is_replaced_and_requests_retried(server: Server) -> None:
    model = "test/restart"
    first = chat(server, model)
    assert first.status_code == 200
    old = replicas(server, model)[0]
    os.kill(old["pid"], signal.SIGKILL)
    # sent at once: the dead replica may still look ready; the request must not fail
    resp = chat(server, model)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-deployment-id"] != old["id"]
    new = replicas(server, model)
    assert len(new) == 1 and new[0]["pid"] != old["pid"] and new[0]["state"] == "ready"


def test_stream_cut_by_dying_worker_ends_with_error_event(server: Server) -> None:
    model = "test/restart"
    assert chat(server, model).status_code == 200
    victim = replicas(server, model)[0]
    lines: list[str] = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      headers={"x-api-key": server.key},
                      json={"model": model, "messages": [{"role": "user", "content": "Count"}],
                            "max_tokens": 2000, "stream": True,
                            "metadata": {"ignore_eos": True}}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data:"):
                lines.append(line)
                if len(lines) == 5:
                    os.kill(victim["pid"], signal.SIGKILL)
    assert lines[-1] == "data: [DONE]"
    assert '"error"' in lines[-2] and "worker_failed" in lines[-2]
    wait_for(lambda: any(r["state"] == "ready" and r["pid"] != victim["pid"]
                         for r in replicas(server, model)), 30, "replacement replica")


def test_deadline_while_queued_is_504_and_cancelled(server: Server) -> None:
    # request_timeout_s = 0.2: shorter than a cold start, so it expires in the queue
    resp = chat(server, "test/queue-timeout")
    assert resp.status_code == 504, resp.text
    err = resp.json()["error"]
    assert err["code"] == "queue_timeout" and err["type"] == "timeout_error"


def test_deadline_while_running_is_504_and_the_work_is_stopped(server: Server) -> None:
    model = "test/running-timeout"  # min_replicas = 1, request_timeout_s = 1.5
    wait_for(lambda: runtime(server, model)["state"] == "ready", 60, "warm replica")
    wait_for(lambda: runtime(server, model)["in_flight"] == 0, 60, "idle replica")
    started = time.monotonic()
    resp = chat(server, model, max_tokens=2000, metadata={"ignore_eos": True})
    elapsed = time.monotonic() - started
    assert resp.status_code == 504, resp.text
    assert resp.json()["error"]["code"] == "request_timeout"
    assert "stopped on the worker" in resp.json()["error"]["message"]
    assert elapsed < 5
    # the worker request was closed: its slot is free at once, on the worker too
    wait_for(lambda: runtime(server, model)["in_flight"] == 0, 2, "the slot to be freed")
    quick = time.monotonic()
    assert chat(server, model, max_tokens=2).status_code == 200
    assert time.monotonic() - quick < 1.5


def test_deadline_mid_stream_ends_with_error_event_and_the_work_is_stopped(
        server: Server) -> None:
    model = "test/running-timeout"  # request_timeout_s = 1.5
    wait_for(lambda: runtime(server, model)["in_flight"] == 0, 60, "idle replica")
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=30,
                      headers={"x-api-key": server.key},
                      json={"model": model, "messages": [{"role": "user", "content": "Go"}],
                            "max_tokens": 2000, "stream": True,
                            "metadata": {"ignore_eos": True}}) as resp:
        assert resp.status_code == 200
        lines = [line for line in resp.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    assert '"code":"request_timeout"' in lines[-2] and '"status":504' in lines[-2]
    assert len(lines) > 5  # tokens did stream before the deadline
    wait_for(lambda: runtime(server, model)["in_flight"] == 0, 2, "the slot to be freed")


def test_abandoned_work_may_finish_but_never_past_max_run_s(server: Server) -> None:
    model = "test/finish-abandoned"  # finish_abandoned, request_timeout_s 1.5, max_run_s 4
    wait_for(lambda: runtime(server, model)["state"] == "ready", 60, "warm replica")
    started = time.monotonic()
    resp = chat(server, model, max_tokens=4000, metadata={"ignore_eos": True})
    assert resp.status_code == 504, resp.text
    assert "may finish" in resp.json()["error"]["message"]
    assert runtime(server, model)["in_flight"] == 1  # it goes on, holding its slot...
    wait_for(lambda: runtime(server, model)["in_flight"] == 0, 10, "the cap")
    took = time.monotonic() - started
    assert 3.5 <= took <= 7.0, took  # ...until max_run_s, not until its 4000 tokens
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=30,
                      headers={"x-api-key": server.key},
                      json={"model": model, "messages": [{"role": "user", "content": "Go"}],
                            "max_tokens": 4000, "stream": True,
                            "metadata": {"ignore_eos": True}}) as stream:
        lines = [line for line in stream.iter_lines() if line.startswith("data:")]
    assert '"code":"request_timeout"' in lines[-2]
    assert runtime(server, model)["in_flight"] == 1
    wait_for(lambda: runtime(server, model)["in_flight"] == 0, 10, "the stream's cap")


def test_a_client_that_leaves_a_non_streamed_request_stops_it(server: Server) -> None:
    model = "test/running-timeout"
    wait_for(lambda: runtime(server, model)["in_flight"] == 0, 60, "idle replica")
    with pytest.raises(httpx.ReadTimeout):
        chat(server, model, timeout=0.6, max_tokens=2000, metadata={"ignore_eos": True})
    wait_for(lambda: runtime(server, model)["in_flight"] == 0, 2, "the slot to be freed")


def test_model_that_cannot_start_gets_503_with_reason(server: Server) -> None:
    started = time.monotonic()
    resp = chat(server, "test/broken")  # a file that is not a GGUF model
    assert resp.status_code == 503, resp.text
    assert time.monotonic() - started < 60  # well within the 60 s deadline
    err = resp.json()["error"]
    assert err["code"] == "model_unavailable"
    assert "failed to start 3 times" in err["message"]
    row = runtime(server, "test/broken")
    assert row["available"] is False and "exited with code" in row["reason"]
    # while unavailable, new requests are refused at once
    again = chat(server, "test/broken")
    assert again.status_code == 503


def test_concurrent_requests_share_one_replica(server: Server) -> None:
    model = "test/restart"  # concurrency = 2 slots
    results: list[int] = []

    def one() -> None:
        results.append(chat(server, model, max_tokens=8).status_code)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 6
    assert len(replicas(server, model)) == 1
