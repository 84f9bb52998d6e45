"""What modelfleet's own workers share: the error shape, the parent watch, serving.

A worker is started by the API process on a private loopback port.  If that
process dies hard (SIGKILL, OOM), nothing stops the worker, so each worker
watches its parent and leaves by itself: a crash of the platform never leaves
orphans holding memory and cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

log = logging.getLogger(__name__)

PARENT_POLL_S = 0.5
# The parent as it was when the worker started (not when the watch began): a
# parent that died while the model was loading shows as a changed ppid.
_FIRST_PPID = os.getppid()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(body: Any, status: int = 200) -> web.Response:
    """orjson rather than json: embedding answers are large arrays of floats."""
    return web.Response(
        body=orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
        status=status,
        content_type="application/json",
    )


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None) -> web.Response:
    """An error in the OpenAI shape, which the API passes on to its client."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return json_response(
        {"error": {"message": message, "type": kind, "param": param, "code": code}}, status=status
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own errors (unknown path, wrong method, body too large) in the
    same JSON shape as the worker's, so the API can pass every error on as is."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, f"{request.method} {request.path}: {exc.reason}")


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs.  A zombie counts as gone: a killed parent whose own
    parent has not reaped it yet still answers ``kill(pid, 0)``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (not Linux): kill(pid, 0) is all there is
    return state not in (b"Z", b"X")


async def watch_parent(pid: int) -> None:
    """Return once process ``pid`` is gone, or this process was re-parented
    (its real parent died), checking every half second."""
    # Polling: there is no event for "another process ended" short of pidfds.
    while True:
        if not pid_alive(pid) or os.getppid() != _FIRST_PPID:
            break
        await asyncio.sleep(PARENT_POLL_S)
    log.warning("parent process %d is gone", pid)


async def run_app(app: web.Application, host: str, port: int, parent_pid: int | None = None) -> None:
    """Serve ``app`` until SIGTERM or SIGINT, or until ``parent_pid`` is gone,
    then shut down cleanly (the app's cleanup hooks run)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        log.info("listening on http://%s:%d", host, port)
        waits: list[asyncio.Task[Any]] = [asyncio.create_task(stop.wait())]
        if parent_pid is not None:
            waits.append(asyncio.create_task(watch_parent(parent_pid)))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        log.info("shutting down")
    finally:
        await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def serving_args(parser: argparse.ArgumentParser, model_name: str) -> None:
    """The options every worker takes: where it listens, the model id it
    answers with (``model_name`` says the default), its threads, its parent."""
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model-name", help=f"the model id to report (default: {model_name})")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--parent-pid", type=int, help="exit when this process is gone")


def json_app(max_body: int, gets: dict[str, Handler], posts: dict[str, Handler]) -> web.Application:
    """A worker's aiohttp app: its routes, with errors in the OpenAI shape."""
    app = web.Application(client_max_size=max_body, middlewares=[error_middleware])
    for path, handler in gets.items():
        app.router.add_get(path, handler)
    for path, handler in posts.items():
        app.router.add_post(path, handler)
    return app


def exit_now() -> None:
    """Leave once everything is closed, skipping the interpreter's own teardown
    of torch and transformers (a second or two, during which a restart waits)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
