"""Slow, idle and non-reading clients are cut off (modelfleet/api/server.py):
a real ``modelfleet serve`` with short limits, spoken to over raw sockets."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import SMOL_FILE, Server, launch_server, stop_server

pytestmark = pytest.mark.workers

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
KEEP_ALIVE = 2.0
MAX_CONNECTIONS = 16
MAX_HEADER_BYTES = 8192
WRITE_TIMEOUT = 2.0

CATALOG = f"""
[[models]]
id = "test/one-slot"
kind = "chat"
[models.engine]
type = "llama.cpp"
model_file = "{SMOL_FILE}"
threads = 1
[models.limits]
max_messages = 4
max_output_tokens = 4000
context_length = 4096
[models.scaling]
concurrency = 1
request_timeout_s = 60.0
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("slow")
    env = {
        "MODELFLEET_HTTP_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT),
        "MODELFLEET_HTTP_BODY_TIMEOUT_S": str(BODY_TIMEOUT),
        "MODELFLEET_HTTP_KEEP_ALIVE_S": str(KEEP_ALIVE),
        "MODELFLEET_HTTP_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "MODELFLEET_HTTP_MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
        "MODELFLEET_HTTP_WRITE_BUFFER_BYTES": "4096",
        "MODELFLEET_HTTP_WRITE_TIMEOUT_S": str(WRITE_TIMEOUT),
    }
    running = launch_server(tmp, CATALOG, env=env)
    try:
        yield running
    finally:
        stop_server(running.proc)


def _address(server: Server) -> tuple[str, int]:
    parts = urlsplit(server.url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def _connect(server: Server, *, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connect, so the advertised window is small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(_address(server))
    return sock


def _read_all(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """What the server sent until it closed (True) or ``timeout`` passed (False)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return data, False
    except ConnectionResetError:
        pass
    return data, True


def _trickle(sock: socket.socket, data: bytes, every: float, stop: threading.Event) -> float:
    """Send ``data`` one byte every ``every`` seconds; the seconds until the
    server cut the connection (or all was sent)."""
    start = time.monotonic()
    for i in range(len(data)):
        if stop.wait(every):
            break
        try:
            sock.send(data[i:i + 1])
        except OSError:
            break
    return time.monotonic() - start


def _error_of(response: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"connection: close" in head.lower()
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "code", "param", "status"}
    assert error["status"] == status and error["message"]
    return status, error


def _request(path: str = "/health", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode()


def test_slowloris_is_cut_off_at_the_header_timeout_while_others_are_served(
        server: Server) -> None:
    head = _request(extra="X-Padding: " + "a" * 200 + "\r\n")
    stop = threading.Event()
    results: list[float] = []
    with ExitStack() as stack:
        socks = [stack.enter_context(_connect(server)) for _ in range(5)]
        threads = [threading.Thread(target=lambda s=s: results.append(_trickle(s, head, 0.3, stop)))
                   for s in socks]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.4)
            with httpx.Client(base_url=server.url, timeout=5) as client:  # served meanwhile
                assert client.get("/health").status_code == 200
            for sock in socks:
                answer, closed = _read_all(sock, HEADER_TIMEOUT + 3)
                assert closed, "a slowloris connection outlived the header timeout"
                status, error = _error_of(answer)
                assert (status, error["code"]) == (408, "request_header_timeout")
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    assert len(results) == 5
    assert all(HEADER_TIMEOUT * 0.8 < cut < HEADER_TIMEOUT + 2 for cut in results), results


def test_a_slow_second_head_on_a_kept_alive_connection_is_cut_off(server: Server) -> None:
    stop = threading.Event()
    with _connect(server) as sock:
        sock.sendall(_request())
        sock.settimeout(5)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        thread = threading.Thread(target=_trickle, args=(sock, _request(), 0.3, stop))
        start = time.monotonic()
        thread.start()
        try:
            answer, closed = _read_all(sock, HEADER_TIMEOUT + 3)
        finally:
            stop.set()
            thread.join()
        # Cut at the header timeout from its first byte, though each byte
        # came well within keep_alive_s of the one before.
        assert closed and HEADER_TIMEOUT < time.monotonic() - start < HEADER_TIMEOUT + 2
    status, error = _error_of(answer)
    assert (status, error["code"]) == (408, "request_header_timeout")


def test_a_connection_that_sends_nothing_is_closed_without_a_word(server: Server) -> None:
    with _connect(server) as sock:
        start = time.monotonic()
        answer, closed = _read_all(sock, HEADER_TIMEOUT + 3)
        assert closed and answer == b""
        assert HEADER_TIMEOUT * 0.8 < time.monotonic() - start < HEADER_TIMEOUT + 2


def test_an_oversized_head_gets_431(server: Server) -> None:
    with _connect(server) as sock:
        # Fast, but never ending: one send the server reads whole.
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n"
                     + (b"X-Big: " + b"b" * 1000 + b"\r\n") * (2 * MAX_HEADER_BYTES // 1000))
        answer, closed = _read_all(sock, 5)
    assert closed
    status, error = _error_of(answer)
    assert (status, error["code"]) == (431, "request_header_too_large")


def test_a_request_that_is_not_http_gets_the_api_error_shape(server: Server) -> None:
    with _connect(server) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"content-length: QIM\r\n\r\n")
        answer, closed = _read_all(sock, 5)
    assert closed
    status, error = _error_of(answer)
    assert (status, error["code"], error["type"]) == \
        (400, "invalid_http_request", "invalid_request_error")


def test_a_slow_body_is_cut_off_at_the_body_timeout(server: Server) -> None:
    body = json.dumps({"model": "test/one-slot", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 4}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n"
            f"Authorization: Bearer {server.key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    stop = threading.Event()
    with _connect(server) as sock:
        sock.sendall(head + body[:5])
        start = time.monotonic()
        thread = threading.Thread(target=_trickle, args=(sock, body[5:], 0.2, stop))
        thread.start()
        try:
            answer, closed = _read_all(sock, BODY_TIMEOUT + 3)
        finally:
            stop.set()
            thread.join()
        elapsed = time.monotonic() - start
    assert closed, "a slow body outlived the body timeout"
    assert BODY_TIMEOUT * 0.8 < elapsed < BODY_TIMEOUT + 2
    status, error = _error_of(answer)
    assert (status, error["code"]) == (408, "request_body_timeout")


def test_idle_keep_alive_connection_is_closed_after_keep_alive_s(server: Server) -> None:
    with _connect(server) as sock:
        sock.sendall(_request())
        sock.settimeout(5)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        rest, closed = _read_all(sock, KEEP_ALIVE + 3)
        assert closed and rest == b""
        assert KEEP_ALIVE * 0.8 < time.monotonic() - start < KEEP_ALIVE + 2


def test_connection_cap_closes_idle_keep_alive_first_then_refuses(server: Server) -> None:
    with ExitStack() as stack:
        # Idle keep-alive connections: each has had its answer.
        idle = [stack.enter_context(_connect(server)) for _ in range(MAX_CONNECTIONS)]
        for sock in idle:
            sock.sendall(_request())
            sock.settimeout(5)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        with httpx.Client(base_url=server.url, timeout=5) as client:
            assert client.get("/health").status_code == 200  # room was made
        dropped = 0
        for sock in idle:
            sock.settimeout(0.05)
            with suppress(TimeoutError):
                dropped += sock.recv(1) == b""
        assert 1 <= dropped <= 2  # the excess, not every idle one (keep-alive is longer)

        # Connections that have sent nothing are not idle: past the cap, refused.
        for sock in idle:
            sock.close()
        time.sleep(0.2)
        waiting = [stack.enter_context(_connect(server)) for _ in range(MAX_CONNECTIONS)]
        with _connect(server) as extra:
            extra.sendall(_request(extra="Connection: keep-alive\r\n"))
            answer, closed = _read_all(extra, 5)
        assert closed
        status, error = _error_of(answer)
        assert (status, error["code"]) == (503, "too_many_connections")
        assert b"retry-after: 1" in answer.lower()
        for sock in waiting:
            sock.close()
    time.sleep(0.2)
    with httpx.Client(base_url=server.url, timeout=5) as client:
        assert client.get("/health").status_code == 200


def test_a_stream_nobody_reads_is_aborted_and_its_slot_freed(server: Server) -> None:
    body = json.dumps({
        "model": "test/one-slot", "stream": True, "max_tokens": 4000,
        "messages": [{"role": "user", "content": "Count from one to one thousand."}],
        "metadata": {"ignore_eos": True},
    }).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n"
            f"Authorization: Bearer {server.key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    quick = {"model": "test/one-slot", "max_tokens": 4,
             "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=server.url, timeout=60,
                      headers={"Authorization": f"Bearer {server.key}"}) as client:
        # Warm the model, so that the time below is the stall's alone.
        assert client.post("/v1/chat/completions", json=quick).status_code == 200
        with _connect(server, rcvbuf=2048) as sock:
            sock.sendall(head + body)
            start = time.monotonic()
            sock.settimeout(30)  # the stream has begun (peeked at, not read) ...
            assert sock.recv(1, socket.MSG_PEEK) == b"H"
            # ... so the one slot is the stalled stream's until the server gives up on it.
            resp = client.post("/v1/chat/completions", json=quick)
            waited = time.monotonic() - start
            assert resp.status_code == 200, resp.text
            received, closed = _read_all(sock, 5)
    assert closed
    assert b"data: [DONE]" not in received  # cut off, not finished
    assert WRITE_TIMEOUT < waited < WRITE_TIMEOUT + 12, waited
    assert "connection aborted" in Path(server.log_path).read_text()
