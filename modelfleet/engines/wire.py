"""A small HTTP/1.1 client for modelfleet's own loopback workers.

Every inference request crosses this hop twice (request, answer), on the
same cores the model runs on.  aiohttp's client costs about 245 µs of CPU
per request here; this one, an asyncio protocol with httptools (the C parser
uvicorn uses) and keep-alive connections, about 85 µs (docs/benchmarks.md).
It speaks only what the workers need: POST with a JSON body to
``http://127.0.0.1:PORT``, an answer with Content-Length or chunked encoding
(SSE streams).  Anything else (https, another host) goes through aiohttp.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

# Connections kept open per worker (more are opened under load, then closed).
IDLE_PER_HOST = 32
HIGH_WATER = 1 << 20  # stop reading a stream when this much is unconsumed


class WireError(Exception):
    """The exchange failed; ``started`` tells whether any of the answer arrived."""

    def __init__(self, message: str, started: bool) -> None:
        super().__init__(message)
        self.started = started


class _Exchange(asyncio.Protocol):
    """One connection, one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers_done: asyncio.Future[None] = loop.create_future()
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.more = asyncio.Event()
        self.complete = False
        self.closed = False
        self.error: str | None = None
        self.started = False
        self.keep_alive = True
        self.paused = False

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.started = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"bad HTTP from worker: {exc}")
            self.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            self._fail(str(exc) if exc else "worker closed the connection")

    # -- httptools callbacks --

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        if not self.headers_done.done():
            self.headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(bytes(body))
        self.buffered += len(body)
        self.more.set()
        if self.buffered > HIGH_WATER and self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.complete = True
        self.more.set()

    # -- helpers --

    def _fail(self, message: str) -> None:
        if self.error is None:
            self.error = message
        if not self.headers_done.done():
            self.headers_done.set_exception(WireError(message, self.started))
            self.headers_done.exception()  # retrieved: no "never retrieved" warning
        self.more.set()

    def take(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and self.error is None

    def reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers_done = self.loop.create_future()
        self.chunks.clear()
        self.buffered = 0
        self.more = asyncio.Event()
        self.complete = self.started = False

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class WireResponse:
    """An answer being read: ``status``, then the body whole or chunk by chunk."""

    def __init__(self, pool: WirePool, key: tuple[str, int], conn: _Exchange) -> None:
        self._pool = pool
        self._key = key
        self._conn: _Exchange | None = conn
        self.status = conn.status

    async def read(self) -> bytes:
        parts = [chunk async for chunk in self.iter_chunks()]
        return b"".join(parts)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        try:
            while True:
                if conn.chunks:
                    yield conn.take()
                    continue
                if conn.complete:
                    break
                if conn.error is not None:
                    raise WireError(conn.error, True)
                conn.more.clear()
                await conn.more.wait()
        except BaseException:
            self.close()
            raise
        self.release()

    def release(self) -> None:
        """Done with the answer: the connection goes back to the pool if it can."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.put(self._key, conn)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class WirePool:
    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[_Exchange]] = {}
        self._closed = False

    @staticmethod
    def handles(url: str) -> bool:
        parts = urlsplit(url)
        return parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1")

    async def post(self, url: str, body: bytes, headers: dict[str, str] | None = None,
                   accept: str = "application/json") -> WireResponse:
        """Send; return once the answer's status line and headers are in.  Raises
        WireError(started=False) when no answer began (safe to retry)."""
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = [f"POST {target} HTTP/1.1", f"Host: {host}:{port}", f"Accept: {accept}",
                "Content-Type: application/json", f"Content-Length: {len(body)}"]
        for name, value in (headers or {}).items():
            head.append(f"{name}: {value}")
        request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        key = (host, port)
        conn = self._take(key)
        if conn is not None:
            try:
                return await self._exchange(key, conn, request)
            except WireError as exc:
                if exc.started:
                    raise
                # A kept-alive connection the worker had closed: once more, on a new one.
        return await self._exchange(key, await self._connect(host, port), request)

    async def _connect(self, host: str, port: int) -> _Exchange:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(lambda: _Exchange(loop), host, port)
        except OSError as exc:
            raise WireError(str(exc) or type(exc).__name__, False) from None
        return conn

    async def _exchange(self, key: tuple[str, int], conn: _Exchange,
                        request: bytes) -> WireResponse:
        assert conn.transport is not None
        try:
            conn.transport.write(request)
            await conn.headers_done
        except BaseException:
            conn.close()
            raise
        return WireResponse(self, key, conn)

    def _take(self, key: tuple[str, int]) -> _Exchange | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                conn.reset()
                return conn
        return None

    def put(self, key: tuple[str, int], conn: _Exchange) -> None:
        idle = self._idle.setdefault(key, [])
        if self._closed or not conn.reusable() or len(idle) >= IDLE_PER_HOST:
            conn.close()
            return
        idle.append(conn)

    def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()

