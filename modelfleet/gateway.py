"""One inference request, from queue to worker and back in the OpenAI shape.

    acquire a slot (queue; cold start; 503 / 504)
      → POST to the worker (retried elsewhere if it never reached it)
      → rewrite the answer (our id and model name, OpenAI fields only)
      → release the slot, record wait / run times

The deadline is the model's ``request_timeout_s``.  Passed while queued, the
request is cancelled; passed while running, the client gets 504 and the
work is ``abandoned``: it goes on to the end on the worker, which keeps the
slot until then.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from modelfleet.catalog import Catalog, ModelSpec
from modelfleet.engines.http import WorkerBroke, WorkerClient, WorkerReply, WorkerUnreachable
from modelfleet.errors import (
    ContextLengthExceeded,
    DeadlineExceeded,
    InvalidRequest,
    ModelfleetError,
    ModelNotFound,
    ModelUnavailable,
    UpstreamError,
)
from modelfleet.fleet import Fleet
from modelfleet.keys import Principal
from modelfleet.scheduler import Lease, ModelQueue, Scheduler
from modelfleet.tasks import TaskOwner

log = logging.getLogger(__name__)

_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


@dataclass
class Call:
    """What the gateway knows about one request while it runs."""

    request_id: str
    route_model: str
    spec: ModelSpec
    principal: Principal | None
    path: str  # the worker path: /v1/chat/completions or /v1/completions
    payload: dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    deployment_id: str | None = None
    status: str = "pending"  # pending, succeeded, failed, abandoned, cancelled
    usage: dict[str, int] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def response_id(self) -> str:
        prefix = "chatcmpl" if self.path.endswith("chat/completions") else "cmpl"
        return f"{prefix}-{self.request_id}"

    def headers(self) -> dict[str, str]:
        out = {
            "X-Model-Used": self.spec.id,
            "X-Route-Model": self.route_model,
            "X-Backend": self.spec.backend,
        }
        if self.deployment_id:
            out["X-Deployment-Id"] = self.deployment_id
        return out


def _usage(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        return {}
    out: dict[str, Any] = {k: int(raw[k]) for k in _USAGE_KEYS if isinstance(raw.get(k), int)}
    details = raw.get("prompt_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
        out["prompt_tokens_details"] = {"cached_tokens": details["cached_tokens"]}
    return out


def _worker_error(call: Call, reply: WorkerReply) -> ModelfleetError:
    raw_err = reply.body.get("error")
    err: dict[str, Any] = raw_err if isinstance(raw_err, dict) else {}
    message = str(err.get("message") or reply.body.get("detail") or "worker error")[:1000]
    if reply.status == 400:
        if "context" in message.lower() or err.get("type") == "exceed_context_size_error":
            return ContextLengthExceeded(message, param="messages")
        return InvalidRequest(message)
    if reply.status == 503:
        return ModelUnavailable(f"model {call.spec.id!r} is busy or loading: {message}")
    return UpstreamError(f"worker answered {reply.status}: {message}")


class Gateway:
    def __init__(
        self,
        catalog: Catalog,
        fleet: Fleet,
        scheduler: Scheduler,
        client: WorkerClient,
        *,
        dispatch_retries: int = 2,
    ) -> None:
        self.catalog = catalog
        self.fleet = fleet
        self.scheduler = scheduler
        self.client = client
        self.retries = dispatch_retries
        self.owner = TaskOwner("gateway")

    async def close(self) -> None:
        await self.owner.close()

    def resolve(self, name: str) -> ModelSpec:
        spec = self.catalog.resolve(name)
        if spec is None:
            raise ModelNotFound(f"model {name!r} does not exist", param="model")
        return spec

    # -- non-streaming ------------------------------------------------------------

    async def complete(self, call: Call) -> dict[str, Any]:
        queue = self.scheduler.queue(call.spec.id)
        enqueued = queue.clock()
        deadline = enqueued + call.spec.scaling.request_timeout_s
        for attempt in range(self.retries + 1):
            lease = await queue.acquire(deadline, enqueued)
            call.deployment_id = lease.replica.id
            work = self.owner.spawn(self._post(queue, lease, call), call.request_id)
            try:
                async with asyncio.timeout(max(0.0, deadline - queue.clock())):
                    reply = await asyncio.shield(work)
            except TimeoutError:
                call.status = "abandoned"
                raise DeadlineExceeded(
                    f"request to {call.spec.id!r} did not finish within "
                    f"{call.spec.scaling.request_timeout_s:g}s; the work was abandoned",
                    code="request_timeout",
                ) from None
            except WorkerUnreachable as exc:
                log.warning("request %s: replica %s unreachable (%s); retrying",
                            call.request_id, lease.replica.id, exc)
                await queue.pool.check_replica(lease.replica)
                if attempt == self.retries:
                    raise ModelUnavailable(
                        f"model {call.spec.id!r}: no replica answered after "
                        f"{attempt + 1} attempts"
                    ) from None
                continue
            if reply.status != 200:
                call.status = "failed"
                raise _worker_error(call, reply)
            call.status = "succeeded"
            return self._rewrite(call, reply.body)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _post(self, queue: ModelQueue, lease: Lease, call: Call) -> WorkerReply:
        started = queue.clock()
        ok = False
        try:
            reply = await self.client.post(lease.replica.base_url + call.path, call.payload)
            ok = True
            if reply.status == 200:
                call.usage = _usage(reply.body.get("usage"))
            return reply
        finally:
            queue.release(lease, run_s=queue.clock() - started if ok else None)

    def _rewrite(self, call: Call, body: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": call.response_id,
            "object": body.get("object")
            or ("chat.completion" if call.path.endswith("chat/completions") else "text_completion"),
            "created": body.get("created") or call.created,
            "model": call.spec.id,
            "choices": body.get("choices") or [],
            "usage": call.usage or _usage(body.get("usage")),
        }
        if "system_fingerprint" in body:
            out["system_fingerprint"] = body["system_fingerprint"]
        return out

    # -- streaming --------------------------------------------------------------

    async def open_stream(self, call: Call) -> AsyncIterator[bytes]:
        """Start a stream; errors before its first event are raised as HTTP errors."""
        queue = self.scheduler.queue(call.spec.id)
        enqueued = queue.clock()
        deadline = enqueued + call.spec.scaling.request_timeout_s
        for attempt in range(self.retries + 1):
            lease = await queue.acquire(deadline, enqueued)
            call.deployment_id = lease.replica.id
            started = queue.clock()
            url = lease.replica.base_url + call.path
            try:
                async with asyncio.timeout(max(0.0, deadline - queue.clock())):
                    stream = await self.client.open_stream(url, call.payload)
                    if stream.status != 200:
                        body = await stream.error_body()
                        queue.release(lease, run_s=None)
                        call.status = "failed"
                        raise _worker_error(call, WorkerReply(stream.status, body))
                    events = stream.events()
                    first = await anext(events)
            except TimeoutError:
                queue.release(lease, run_s=None)
                call.status = "cancelled"
                raise DeadlineExceeded(
                    f"request to {call.spec.id!r} produced nothing within "
                    f"{call.spec.scaling.request_timeout_s:g}s",
                    code="request_timeout",
                ) from None
            except (WorkerUnreachable, WorkerBroke, StopAsyncIteration) as exc:
                queue.release(lease, run_s=None)
                log.warning("request %s: replica %s failed before streaming (%s); retrying",
                            call.request_id, lease.replica.id, exc)
                await queue.pool.check_replica(lease.replica)
                if attempt == self.retries:
                    raise ModelUnavailable(
                        f"model {call.spec.id!r}: no replica answered after {attempt + 1} attempts"
                    ) from None
                continue
            except BaseException:
                if not lease.released:
                    queue.release(lease, run_s=None)
                raise
            return self._relay(call, queue, lease, stream, events, first, started, deadline)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _relay(
        self,
        call: Call,
        queue: ModelQueue,
        lease: Lease,
        stream: Any,
        events: AsyncIterator[bytes],
        first: bytes,
        started: float,
        deadline: float,
    ) -> AsyncIterator[bytes]:
        handed_off = False
        try:
            try:
                async with asyncio.timeout(max(0.0, deadline - queue.clock())):
                    chunk = self._chunk(call, first)
                    if chunk is not None:
                        yield chunk
                    async for data in events:
                        chunk = self._chunk(call, data)
                        if chunk is not None:
                            yield chunk
                call.status = "succeeded"
            except TimeoutError:
                call.status = "abandoned"
                handed_off = True
                self.owner.spawn(self._drain(call, queue, lease, stream, events, started),
                                 call.request_id)
                yield _sse_error(DeadlineExceeded(
                    f"request to {call.spec.id!r} did not finish within "
                    f"{call.spec.scaling.request_timeout_s:g}s; the work was abandoned",
                    code="request_timeout",
                ))
            except (WorkerBroke, WorkerUnreachable) as exc:
                call.status = "failed"
                log.warning("request %s: stream from %s broke: %s", call.request_id,
                            lease.replica.id, exc)
                self.owner.spawn(queue.pool.check_replica(lease.replica), "check")
                yield _sse_error(UpstreamError(
                    f"the worker serving {call.spec.id!r} failed mid-stream: {exc}",
                    code="worker_failed",
                ))
            yield b"data: [DONE]\n\n"
        finally:
            if not handed_off:
                if call.status == "pending":
                    call.status = "cancelled"  # the client went away
                stream.close()
                queue.release(lease, run_s=queue.clock() - started)

    async def _drain(
        self,
        call: Call,
        queue: ModelQueue,
        lease: Lease,
        stream: Any,
        events: AsyncIterator[bytes],
        started: float,
    ) -> None:
        """Let abandoned work finish on the worker, keeping its slot until then."""
        try:
            async for data in events:
                self._chunk(call, data)
        except (WorkerBroke, WorkerUnreachable):
            pass
        finally:
            stream.close()
            queue.release(lease, run_s=queue.clock() - started)

    def _chunk(self, call: Call, data: bytes) -> bytes | None:
        try:
            obj = json.loads(data)
        except ValueError:
            raise WorkerBroke("worker sent an event that is not JSON") from None
        if not isinstance(obj, dict):
            raise WorkerBroke("worker sent an event that is not an object")
        if "error" in obj:
            raise WorkerBroke(str(obj["error"])[:500])
        usage = obj.pop("usage", None)
        obj.pop("timings", None)
        if usage:
            call.usage = _usage(usage)
        obj["id"] = call.response_id
        obj["model"] = call.spec.id
        if not obj.get("choices") and usage:
            if not call.include_usage:
                return None
            obj["choices"] = []
            obj["usage"] = call.usage
        elif call.include_usage:
            obj["usage"] = None
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _sse_error(error: ModelfleetError) -> bytes:
    return b"data: " + json.dumps(error.body(), separators=(",", ":")).encode() + b"\n\n"
