"""The loopback worker client against real sockets: keep-alive reuse, a kept-
alive connection the server closed, chunked streams, and each failure mapped
to the gateway's retry rules (unreachable: safe to retry; broke: not)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from modelfleet.engines.http import WorkerBroke, WorkerClient, WorkerUnreachable

Answer = Callable[[bytes], bytes | None]


class Server:
    """A real TCP server whose answer to each request is given by ``answer``
    (None: close the connection without answering)."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.host = "127.0.0.1"
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                out = self.answer(body)
                if out is None:
                    break
                writer.write(out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1/chat/completions"


def fixed(body: bytes, status: int = 200, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
            % (status, len(body), extra)) + body


def chunked(*events: bytes) -> bytes:
    out = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    for event in events:
        out += b"%x\r\n%s\r\n" % (len(event), event)
    return out + b"0\r\n\r\n"


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Answer], asyncio.Future[Server]]]:
    servers: list[Server] = []

    async def start(answer: Answer, host: str = "127.0.0.1") -> Server:
        srv = Server(answer)
        srv.host = host
        srv.server = await asyncio.start_server(srv.handle, host, 0)
        srv.port = srv.server.sockets[0].getsockname()[1]
        servers.append(srv)
        return srv

    yield start  # type: ignore[misc]
    for srv in servers:
        assert srv.server is not None
        srv.server.close()


@pytest.fixture
async def client() -> AsyncIterator[WorkerClient]:
    c = WorkerClient()
    await c.start()
    yield c
    await c.close()


async def test_post_reuses_one_connection(serve, client: WorkerClient) -> None:  # type: ignore[no-untyped-def]
    srv = await serve(lambda body: fixed(b'{"ok": true, "echo": %s}' % body))
    for i in range(5):
        reply = await client.post(srv.url, {"n": i}, {"Authorization": "Bearer x"})
        assert reply.status == 200 and reply.body == {"ok": True, "echo": {"n": i}}
    assert srv.connections == 1
    assert b"authorization: bearer x" in srv.requests[0].lower()


async def test_error_status_and_non_json_body(serve, client: WorkerClient) -> None:  # type: ignore[no-untyped-def]
    srv = await serve(lambda body: fixed(b"not json", status=503))
    reply = await client.post(srv.url, {})
    assert reply.status == 503 and "not json" in reply.body["error"]["message"]


async def test_a_closed_kept_alive_connection_is_retried_once(serve, client: WorkerClient) -> None:  # type: ignore[no-untyped-def]
    calls = {"n": 0}

    def answer(body: bytes) -> bytes | None:
        calls["n"] += 1
        return fixed(b"{}", extra=b"Connection: close\r\n" if calls["n"] == 1 else b"")

    srv = await serve(answer)
    assert (await client.post(srv.url, {})).status == 200
    await asyncio.sleep(0.05)
    assert (await client.post(srv.url, {})).status == 200  # the first connection was closed
    assert srv.connections == 2


async def test_nothing_listening_is_unreachable(client: WorkerClient) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(WorkerUnreachable):
        await client.post(f"http://127.0.0.1:{port}/x", {})


async def test_closed_before_answering_is_unreachable(serve, client: WorkerClient) -> None:  # type: ignore[no-untyped-def]
    srv = await serve(lambda body: None)
    with pytest.raises(WorkerUnreachable):
        await client.post(srv.url, {})


async def test_cut_mid_answer_is_broke(serve, client: WorkerClient) -> None:  # type: ignore[no-untyped-def]
    srv = await serve(lambda body: fixed(b'{"long": "answer"}')[:-5])

    async def cut() -> None:
        await asyncio.sleep(0.1)
        for task in asyncio.all_tasks():
            if task.get_coro().__qualname__.startswith("Server.handle"):  # type: ignore[union-attr]
                task.cancel()

    canceller = asyncio.create_task(cut())
    with pytest.raises(WorkerBroke):
        await client.post(srv.url, {})
    await canceller


async def test_stream_events_then_done(serve, client: WorkerClient) -> None:  # type: ignore[no-untyped-def]
    srv = await serve(lambda body: chunked(b'data: {"a": 1}\n\n', b'data: {"b"', b': 2}\n\ndata: [DONE]\n\n'))
    stream = await client.open_stream(srv.url, {"stream": True})
    assert stream.status == 200
    events = [e async for e in stream.events()]
    assert events == [b'{"a": 1}', b'{"b": 2}']


async def test_stream_without_done_is_broke(serve, client: WorkerClient) -> None:  # type: ignore[no-untyped-def]
    srv = await serve(lambda body: chunked(b'data: {"a": 1}\n\n'))
    stream = await client.open_stream(srv.url, {"stream": True})
    got = []
    with pytest.raises(WorkerBroke):
        async for event in stream.events():
            got.append(event)
    assert got == [b'{"a": 1}']


# An engine's SSE as the format allows it: event and id fields, comments, CRLF
# line ends, data split over several lines, no space after the colon.
SSE_FIELDS = (b": keep-alive\r\n\r\n",
              b"event: response.output_text.delta\r\nid: 1\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\n",
              b"retry: 100\nevent: x\ndata:{\"b\": 2}\n\n",
              b"data: [DONE]\n\n")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2"])  # the loopback client; aiohttp
async def test_stream_event_fields_and_multiline_data(serve, client: WorkerClient,  # type: ignore[no-untyped-def]
                                                      host: str) -> None:
    srv = await serve(lambda body: chunked(*SSE_FIELDS), host)
    stream = await client.open_stream(srv.url, {"stream": True})
    events = [e async for e in stream.events()]
    assert events == [b'{"a":\n1}', b'{"b": 2}']
