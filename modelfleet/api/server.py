"""The HTTP server: uvicorn, with our own protocol and its limits on clients.

``CoalescingHttpToolsProtocol`` is uvicorn's httptools protocol with two
changes.

Writes of one event-loop step are sent together.  uvicorn writes a
response's status line and headers, then its body, as two sends.  On a small
machine each send to a waiting client wakes it, and a woken client can
preempt the server on its core before the body is written: two wake-ups per
response instead of one.  Buffering the writes of one loop step and sending
them at its end joins them (measured in docs/benchmarks.md); a streamed
event is still sent in the step that produced it.

Slow and idle clients are cut off (``HttpSettings``; docs/deploy.md, "Slow
clients"):

- a request head must arrive within ``header_timeout_s`` (from the
  connection's start, or from the first byte of a later request on it) and
  be at most ``max_header_bytes``: else 408 / 431 and the connection closes;
- a request body must arrive within ``body_timeout_s`` of its head, counted
  while the server is reading it: else the app sees a disconnect, the client
  a 408 if no answer had started, and the connection closes;
- an idle keep-alive connection closes after ``keep_alive_s`` (uvicorn's
  ``timeout_keep_alive``);
- past ``max_connections`` open connections, idle keep-alive ones are closed
  to make room, and a new connection that still finds none gets 503;
- a client that does not read: the transport buffers ``write_buffer_bytes``
  and then pauses the response's writer; paused for ``write_timeout_s``, the
  connection is aborted, so the request sees a disconnect and its owner
  cancels it.

The common request costs no timer: one timer per connection is armed at
connect and dropped at its first head, and a timer is armed afterwards only
when a head or body does not arrive whole in one read, or when writing
pauses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import sys
from typing import Any

import orjson
import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState
from uvicorn.supervisors import Multiprocess

from modelfleet.settings import HttpSettings

log = logging.getLogger(__name__)


class _CoalescingTransport:
    """A transport whose writes within one loop step leave as one send."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        self._pending.append(bytes(data))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(p) for p in self._pending)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _error(status: int, reason: str, type_: str, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 response in the API's error shape, closing the connection."""
    body = orjson.dumps({"error": {"message": message, "type": type_, "code": code,
                                   "param": None, "status": status}})
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


async def _too_many_connections(scope: Any, receive: Any, send: Any) -> None:
    body = orjson.dumps({"error": {
        "message": "the server has too many open connections; retry shortly",
        "type": "service_unavailable", "code": "too_many_connections", "param": None,
        "status": 503}})
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class ServerConfig(uvicorn.Config):
    """uvicorn's configuration, with the client limits the protocol reads."""

    def __init__(self, app: Any, *, http: HttpSettings, **kwargs: Any) -> None:
        super().__init__(app, host=http.host, port=http.port, http=CoalescingHttpToolsProtocol,
                         loop="uvloop", ws="none", access_log=False, timeout_graceful_shutdown=10,
                         **kwargs)
        self.client_limits = http


def run(app: Any, http: HttpSettings, *, workers: int = 1, log_level: str = "info",
        factory: bool = False) -> None:
    """Serve ``app`` (an ASGI app, or an import string with ``workers`` > 1) as
    ``uvicorn.run`` would, with ``http``'s limits on clients."""
    config = ServerConfig(app, http=http, workers=workers, log_level=log_level, factory=factory)
    server = uvicorn.Server(config)
    if workers > 1:
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's protocol, with coalesced writes and limits on slow clients
    (the module's docstring)."""

    def __init__(self, config: uvicorn.Config, server_state: ServerState,
                 app_state: dict[str, Any], _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits = config.client_limits if isinstance(config, ServerConfig) else HttpSettings()
        self.limits = limits
        self.timeout_keep_alive = limits.keep_alive_s  # type: ignore[assignment]
        self._timer: asyncio.TimerHandle | None = None  # the head or the body timeout
        self._write_timer: asyncio.TimerHandle | None = None
        self._in_head = False  # a request head has begun and is not complete
        self._awaiting_body = False  # its head is parsed, its body is not complete
        self._head_bytes = 0
        self._refused = False  # opened past max_connections: answered 503

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        limits = self.limits
        # Bound what a client that does not read can leave buffered: in the
        # kernel (fixed, so not grown by autotuning to megabytes), then in the
        # transport, past which the response's writer is paused.
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, limits.write_buffer_bytes)
        transport.set_write_buffer_limits(high=limits.write_buffer_bytes)
        super().connection_made(_CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
        self._timer = self.loop.call_later(limits.header_timeout_s, self._head_timed_out)
        if len(self.connections) > limits.max_connections:
            self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse_head(_error(
                    431, "Request Header Fields Too Large", "invalid_request_error",
                    "request_header_too_large",
                    f"the request head is larger than {self.limits.max_header_bytes} bytes"))
            elif self._timer is None:
                self._timer = self.loop.call_later(self.limits.header_timeout_s,
                                                   self._head_timed_out)
        elif self._awaiting_body and self._timer is None:
            self._timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timed_out)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._awaiting_body = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._refused:
            app = self.app
            self.app = _too_many_connections
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        else:
            super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._awaiting_body = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().on_message_complete()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.limits.write_timeout_s,
                                                     self._write_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    # -- the limits ------------------------------------------------------------------

    def _cancel_timers(self) -> None:
        for timer in (self._timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._write_timer = None

    def _make_room(self) -> None:
        """Past max_connections: close idle keep-alive connections (those
        waiting for a next request); if none is idle, refuse this one."""
        excess = len(self.connections) - self.limits.max_connections
        for other in list(self.connections):
            if excess <= 0:
                return
            if (isinstance(other, CoalescingHttpToolsProtocol) and other is not self
                    and other.timeout_keep_alive_task is not None
                    and not other.transport.is_closing()):
                other.timeout_keep_alive_handler()
                excess -= 1
        log.warning("more than %d open connections: refusing new requests",
                    self.limits.max_connections)
        self._refused = True

    def _head_timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if not self._in_head:  # connected and sent nothing: close without a word
            self.transport.close()
            return
        self._refuse_head(_error(
            408, "Request Timeout", "invalid_request_error", "request_header_timeout",
            f"the request head did not arrive within {self.limits.header_timeout_s:g} s"))

    def send_400_response(self, msg: str) -> None:
        """A request that is not valid HTTP: the API's error shape, not text."""
        self._refuse_head(_error(400, "Bad Request", "invalid_request_error",
                                 "invalid_http_request", msg))

    def _refuse_head(self, response: bytes) -> None:
        """Answer a request whose head was not accepted, and close."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._in_head = False
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # A pipelined head behind a running response: close after it.
            cycle.keep_alive = False
            self.flow.pause_reading()
            return
        self.transport.write(response)
        self.transport.close()

    def _body_timed_out(self) -> None:
        self._timer = None
        if not self._awaiting_body or self.transport.is_closing():
            return
        if self.flow.read_paused:  # the app is behind in reading it, not the client
            self._timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timed_out)
            return
        cycle = self.cycle
        answer = cycle is None or not cycle.response_started
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() returns http.disconnect
            cycle.message_event.set()
        if answer:
            self.transport.write(_error(
                408, "Request Timeout", "invalid_request_error", "request_body_timeout",
                f"the request body did not arrive within {self.limits.body_timeout_s:g} s"))
        self.transport.close()

    def _write_timed_out(self) -> None:
        self._write_timer = None
        if not self.transport.is_closing():
            log.info("client %s read nothing for %g s: connection aborted",
                     self.client, self.limits.write_timeout_s)
            # Reset, so the kernel drops what the client will never read.
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()
