"""The one client that talks OpenAI-compatible HTTP to every worker.

Loopback workers (every replica modelfleet runs) are reached through
``wire.WirePool``, a keep-alive HTTP/1.1 client on httptools that costs about
a third of aiohttp's CPU per request; anything else (an external server,
https) through aiohttp, which costs about a third of httpx's
(docs/dependencies.md).  This path runs on the same cores as the model.
Redirects are never followed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from modelfleet.engines.wire import WireError, WirePool, WireResponse


class WorkerUnreachable(Exception):
    """The request did not reach the worker, or no response began: safe to retry."""


class WorkerBroke(Exception):
    """The worker failed after its response began (a cut stream)."""


@dataclass
class WorkerReply:
    status: int
    body: dict[str, Any]


class WorkerClient:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._wire = WirePool()

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            read_bufsize=1 << 20,
            max_line_size=1 << 24,
            max_field_size=1 << 16,
            json_serialize=json.dumps,
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        self._wire.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("WorkerClient.start() was not awaited")
        return self._session

    async def health(self, url: str, timeout: float, headers: dict[str, str] | None = None) -> bool:
        try:
            async with self.session.get(
                url, timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False,
                headers=headers,
            ) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def post(self, url: str, payload: dict[str, Any],
                   headers: dict[str, str] | None = None) -> WorkerReply:
        """POST and read the answer.  Failing before the response began (the worker
        was unreachable, or died before answering: nothing was delivered) raises
        WorkerUnreachable, which is safe to retry; failing while reading the body
        raises WorkerBroke."""
        if WirePool.handles(url):
            wire = await self._wire_post(url, payload, headers, "application/json")
            try:
                raw = await wire.read()
            except WireError as exc:
                raise WorkerBroke(str(exc)) from exc
            return WorkerReply(wire.status, _json_object(raw))
        try:
            resp = await self.session.post(url, json=payload, allow_redirects=False,
                                           headers=headers)
        except (aiohttp.ClientConnectionError, OSError) as exc:
            raise WorkerUnreachable(str(exc) or type(exc).__name__) from exc
        try:
            raw = await resp.read()
        except (aiohttp.ClientError, OSError) as exc:
            raise WorkerBroke(str(exc) or type(exc).__name__) from exc
        finally:
            resp.release()
        return WorkerReply(resp.status, _json_object(raw))

    async def _wire_post(self, url: str, payload: dict[str, Any], headers: dict[str, str] | None,
                         accept: str) -> WireResponse:
        try:
            return await self._wire.post(url, orjson.dumps(payload), headers, accept)
        except WireError as exc:
            if exc.started:
                raise WorkerBroke(str(exc)) from exc
            raise WorkerUnreachable(str(exc)) from exc

    async def open_stream(self, url: str, payload: dict[str, Any],
                          headers: dict[str, str] | None = None) -> WorkerStream | WireStream:
        if WirePool.handles(url):
            return WireStream(await self._wire_post(url, payload, headers, "text/event-stream"))
        try:
            resp = await self.session.post(url, json=payload, allow_redirects=False,
                                           headers=headers)
        except (aiohttp.ClientConnectionError, OSError) as exc:
            raise WorkerUnreachable(str(exc) or type(exc).__name__) from exc
        return WorkerStream(resp)


class _EventStream:
    """An open SSE answer from a worker; iterate ``events`` for the ``data:`` payloads."""

    # What reading the lines may raise (a cut connection): becomes WorkerBroke.
    _read_errors: tuple[type[BaseException], ...] = ()

    def __init__(self, resp: Any) -> None:
        self._resp = resp
        self.status: int = resp.status
        self.started = False

    def _lines(self) -> AsyncIterator[bytes]:
        raise NotImplementedError

    async def error_body(self) -> dict[str, Any]:
        try:
            return _json_object(await self._resp.read())
        except self._read_errors:
            return {}
        finally:
            self.close()

    async def events(self) -> AsyncIterator[bytes]:
        """Each event's data, up to but not including ``[DONE]``, as the SSE
        format has it: an event ends at a blank line, its ``data:`` lines are
        joined with newlines, ``event:``, ``id:``, ``retry:`` and comment lines
        are skipped (the data says what each event is)."""
        data: list[bytes] = []
        try:
            async for raw in self._lines():
                line = raw.rstrip(b"\r\n")
                if line.startswith(b"data:"):
                    data.append(line[6:] if line[5:6] == b" " else line[5:])
                    continue
                if line or not data:
                    continue  # a field other than data, a comment, or a blank line alone
                event = data[0] if len(data) == 1 else b"\n".join(data)
                data = []
                if event == b"[DONE]":
                    return
                self.started = True
                yield event
            if data and data != [b"[DONE]"]:  # the last event, cut off by the end of the stream
                self.started = True
                yield b"\n".join(data)
            elif data:
                return
        except self._read_errors as exc:
            raise WorkerBroke(str(exc) or type(exc).__name__) from exc
        if not self.started:
            raise WorkerUnreachable("worker closed the stream before any event")
        raise WorkerBroke("worker closed the stream without [DONE]")

    def close(self) -> None:
        self._resp.close()

    def release(self) -> None:
        self._resp.release()


class WireStream(_EventStream):
    """A stream from a loopback worker (``wire.WirePool``)."""

    _read_errors = (WireError,)

    async def _lines(self) -> AsyncIterator[bytes]:
        pending = b""
        async for chunk in self._resp.iter_chunks():
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                yield line


class WorkerStream(_EventStream):
    """A stream through aiohttp (external servers)."""

    _read_errors = (aiohttp.ClientError, OSError, ValueError)

    async def _lines(self) -> AsyncIterator[bytes]:
        async for line in self._resp.content:
            yield line


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(raw)
    except ValueError:
        return {"error": {"message": raw[:500].decode("utf-8", "replace")}}
    return value if isinstance(value, dict) else {"value": value}
