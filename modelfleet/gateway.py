"""One request, owned by one task from admission to settlement.

    Gateway.handle(call)  (an async context manager, entered by the task that
                           owns the request: a route's, or a job's runner)
      admit: limits + worst-case hold in one step of the admission store
      → acquire a slot (queue; cold start; 503 / 504)
      → POST to the worker (retried elsewhere if it never reached it)
      → yield the answer (a body, or a stream of SSE events) to be rendered
      → exit: the single cleanup step settles it, on the event loop

The deadline is the model's ``request_timeout_s``.  Passed while queued, the
request is cancelled; passed while running, the client gets 504 and the
work is ``abandoned``: it is settled then (abandoned work is not charged)
and stopped on the worker (its connection closed, so the engine frees the
slot), unless the catalog lets abandoned work finish (``finish_abandoned``),
and then never past ``max_run_s``.  A client that goes away is treated the
same.  A replica from which nothing came back for ``stall_timeout_s`` while
a request to it passed its deadline is restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
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
    Preempted,
    UpstreamError,
)
from modelfleet.fleet import Fleet
from modelfleet.keys import Principal
from modelfleet.metering import Metering, Outcome, Ticket, completions_count
from modelfleet.metrics import Metrics
from modelfleet.observe import Marks, Observer, charged, rejected_record, stream_times
from modelfleet.openai import embeddings, shape, tools
from modelfleet.openai.usage import ChoiceUsage, fold
from modelfleet.scheduler import ANONYMOUS, Claim, Lease, ModelQueue, Scheduler
from modelfleet.states import RequestState
from modelfleet.tasks import TaskOwner

log = logging.getLogger(__name__)

EMBEDDINGS_PATH = "/v1/embeddings"
# How long a finished answer waits for its usage row to be committed.
DURABLE_WAIT_S = 10.0
# Requests in a row that pass their deadline with nothing back from a replica
# (and nothing back at all for its stall timeout) before it is restarted.
STALL_MISSES = 3
_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


# Called with the lease once a slot is won, before the worker is called (an
# async job marks its row running there, or raises to stop).
Starting = Callable[[Lease], Awaitable[None]]


@dataclass
class Call:
    """What the gateway knows about one request while it runs."""

    request_id: str
    route_model: str
    spec: ModelSpec
    principal: Principal | None
    path: str  # the worker path: /v1/chat/completions, /v1/completions, ...
    payload: dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    deployment_id: str | None = None
    status: RequestState = RequestState.pending
    usage: dict[str, int] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))
    claim: Claim = ANONYMOUS  # fair-queue identity: project, weight, priority, cap
    wait_s: float = 0.0
    run_s: float = 0.0
    # Embeddings: the format the client asked for (the worker always sends base64).
    encoding_format: str = "float"
    # Money: how to admit it (None: not metered) and, once admitted, its ticket.
    admit: Callable[[], Awaitable[Ticket]] | None = None
    ticket: Ticket | None = None
    images: int = 0  # image jobs: images delivered (charged per image)
    # Async jobs wait this long for a slot (None: the request deadline covers both).
    queue_timeout_s: float | None = None
    # What the request's log line and trace need (observe.py), and the
    # presented key's public prefix (as `keys list` shows it).
    marks: Marks = field(default_factory=Marks)
    key_prefix: str = ""
    # An answer sent to a client: settled, with its usage row committed, before
    # the end of the answer is sent (a job settles when it leaves handle).
    settle_before_end: bool = False
    settled: bool = False
    # Whether a client that goes away may cancel the owner task now (not once
    # settlement began: it runs to its end).
    cancellable: bool = True
    # Background work stopped to make room for interactive requests: it runs
    # again under the same request id, so this attempt leaves no usage row.
    preempted: bool = False
    # A grammar tool call's streamed answer, kept until its end (openai/tools.py).
    tool_stream: tools.ToolStream | None = None

    @property
    def is_chat(self) -> bool:
        return self.path.endswith("chat/completions")

    @functools.cached_property
    def choice_usage(self) -> ChoiceUsage | None:
        """Several choices from llama.cpp: counted per choice and summed
        (openai/usage.py); None for one choice, or engines that sum themselves."""
        if self.spec.backend != "llama.cpp" or not self.path.endswith("completions"):
            return None
        count = completions_count(self.payload)
        return ChoiceUsage(int(self.payload.get("n") or 1), count) if count > 1 else None

    @property
    def response_id(self) -> str:
        return f"{'chatcmpl' if self.is_chat else 'cmpl'}-{self.request_id}"

    @property
    def rate_headers(self) -> dict[str, str]:
        return self.ticket.headers if self.ticket is not None else {}

    def headers(self) -> dict[str, str]:
        out = {
            "X-Model-Used": self.spec.id,
            "X-Route-Model": self.route_model,
            "X-Backend": self.spec.backend,
        }
        if self.deployment_id:
            out["X-Deployment-Id"] = self.deployment_id
        return out


@dataclass
class Answer:
    """What ``Gateway.handle`` yields: a JSON body, or the SSE events of a stream."""

    body: dict[str, Any] | None = None
    events: AsyncIterator[bytes] | None = None


def _usage(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        return {}
    out: dict[str, Any] = {k: int(raw[k]) for k in _USAGE_KEYS if isinstance(raw.get(k), int)}
    details = raw.get("prompt_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
        out["prompt_tokens_details"] = {"cached_tokens": details["cached_tokens"]}
    return out


def _timings_usage(raw: Any) -> dict[str, int]:
    """Token counts from llama-server's per-chunk timings (timings_per_token)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("predicted_n"), int):
        return {}
    prompt = int(raw.get("prompt_n") or 0) + int(raw.get("cache_n") or 0)
    out = int(raw["predicted_n"])
    return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out}


def _worker_error(call: Call, reply: WorkerReply) -> ModelfleetError:
    raw_err = reply.body.get("error")
    err: dict[str, Any] = raw_err if isinstance(raw_err, dict) else {}
    message = str(err.get("message") or reply.body.get("detail") or "worker error")[:1000]
    if reply.status == 400:
        if err.get("type") == "exceed_context_size_error" or "context size" in message:
            return ContextLengthExceeded(message, param="messages" if call.is_chat else "prompt")
        code, param = err.get("code"), err.get("param")
        return InvalidRequest(message, code=code if isinstance(code, str) else None,
                              param=param if isinstance(param, str) else None)
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
        metering: Metering,
        metrics: Metrics,
        *,
        dispatch_retries: int = 2,
        observer: Observer | None = None,
    ) -> None:
        self.catalog = catalog
        self.fleet = fleet
        self.scheduler = scheduler
        self.client = client
        self.metering = metering
        self.metrics = metrics
        self.retries = dispatch_retries
        self.owner = TaskOwner("gateway")
        self.observer = observer or Observer()

    async def close(self) -> None:
        await self.owner.close()
        self.observer.close()

    def resolve(self, name: str) -> ModelSpec:
        spec = self.catalog.resolve(name)
        if spec is None:
            raise ModelNotFound(f"model {name!r} does not exist", param="model")
        return spec

    # -- the one entry ------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def handle(self, call: Call, starting: Starting | None = None) -> AsyncIterator[Answer]:
        """Run ``call`` in the calling task: admit it, queue it, dispatch it,
        yield its answer to be rendered, and settle it on the way out (once,
        whatever happened: error, deadline, a client that left)."""
        if call.admit is not None:
            try:
                call.ticket = await call.admit()  # refused: nothing was taken, nothing to settle
            except ModelfleetError as exc:
                self.observer.rejected(rejected_record(
                    call.request_id, call.principal, self._project_name(call), call.spec.id,
                    call.path, exc, call.key_prefix))
                raise
        try:
            if call.stream:
                events = await self._open_stream(call)
                try:
                    yield Answer(events=events)
                finally:
                    await events.aclose()  # type: ignore[attr-defined]
            else:
                body = await self._complete(call, starting)
                if call.settle_before_end:
                    await self._settle(call)
                yield Answer(body=body)
        except DeadlineExceeded as exc:
            call.marks.error(exc)
            if call.status is RequestState.pending:
                call.status = RequestState.cancelled if exc.code == "queue_timeout" \
                    else RequestState.failed
            raise
        except BaseException as exc:
            call.marks.error(exc)
            if call.status is RequestState.pending:
                call.status = RequestState.cancelled
            raise
        finally:
            await self._settle(call)

    async def settle_durably(self, call: Call) -> None:
        """Settle ``call`` now, inside ``handle``, and wait for its usage row to
        be committed (a job settles before it is marked done, so a crash
        between the two cannot leave a finished job unpaid)."""
        call.settle_before_end = True
        await self._settle(call)

    async def _settle(self, call: Call) -> None:
        """The request's single cleanup step: stats, money and limits, metrics.
        A delivered answer is settled before its end is sent (``settle_before_end``):
        then this waits until its usage row is committed, so a crash after the
        client got the answer cannot lose the charge."""
        call.cancellable = False
        if call.settled:
            return
        call.settled = True
        settle_started = time.monotonic()
        if call.status is RequestState.pending:
            call.status = RequestState.failed
        if call.status in (RequestState.succeeded, RequestState.disconnected):
            self.scheduler.queue(call.spec.id).stats.record(call.wait_s, call.run_s)
        if call.ticket is not None and call.principal is not None:
            outcome = Outcome(call.request_id, call.status, dict(call.usage), call.wait_s,
                              call.run_s, call.images)
            written = await self.metering.settle(call.ticket, outcome, call.principal.key_id,
                                                 durable=call.settle_before_end,
                                                 record=not call.preempted)
            if written is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(written), DURABLE_WAIT_S)
                except TimeoutError:
                    log.error("request %s: usage row not committed within %gs (the ledger "
                              "is not writable); answering anyway, the row stays queued",
                              call.request_id, DURABLE_WAIT_S)
        call.marks.cost = charged(call)
        name = self._project_name(call)
        ttft, tpot = stream_times(call)
        self.metrics.request_finished(
            call.spec.id, name, call.status.value, call.wait_s, call.run_s,
            int(call.usage.get("prompt_tokens", 0)), int(call.usage.get("completion_tokens", 0)),
            ttft_s=ttft, tpot_s=tpot)
        self.observer.finished(call, name, settle_started)

    def _project_name(self, call: Call) -> str:
        """The project's name (metric label, log field); a job's principal has only its id."""
        if call.principal is None:
            return ""
        if call.principal.project_name:
            return call.principal.project_name
        info = self.metering.projects.project(call.principal.project_id)
        return info.name if info is not None else call.principal.project_id

    # -- non-streaming ------------------------------------------------------------

    def _deadlines(self, call: Call, queue: ModelQueue) -> tuple[float, float]:
        enqueued = queue.clock()
        deadline = enqueued + call.spec.scaling.request_timeout_s
        if call.queue_timeout_s is None:
            return enqueued, deadline
        return enqueued, enqueued + call.queue_timeout_s

    async def _complete(self, call: Call, starting: Starting | None = None) -> dict[str, Any]:
        queue = self.scheduler.queue(call.spec.id)
        enqueued, deadline = self._deadlines(call, queue)
        for attempt in range(self.retries + 1):
            lease = await queue.acquire(deadline, enqueued, call.claim)
            call.deployment_id = lease.replica.id
            call.marks.lease = lease
            call.wait_s = lease.wait_s
            if starting is not None:
                try:
                    await starting(lease)
                except BaseException:
                    queue.release(lease)
                    raise
            run_started = queue.clock()
            run_deadline = deadline if call.queue_timeout_s is None \
                else run_started + call.spec.scaling.request_timeout_s
            work = self.owner.spawn(self._post(queue, lease, call), call.request_id)
            if lease.background:  # swapped out for interactive requests: stopped, run later
                self._preemptible(lease, call, work)
            try:
                async with asyncio.timeout(max(0.0, run_deadline - queue.clock())):
                    reply = await asyncio.shield(work)
            except TimeoutError:
                if work.done() and not work.cancelled() and work.exception() is None:
                    reply = work.result()  # finished at the deadline itself: deliver it
                    if reply.status == 200:
                        call.status = RequestState.succeeded
                        return self._rewrite(call, reply.body)
                call.status = RequestState.abandoned
                self._stall_check(queue, lease)
                self._stop_work(call, work.cancel, work, run_started)
                raise self._deadline(call, "did not finish") from None
            except asyncio.CancelledError:  # the client went away (or the gateway stops)
                self._cancelled(call, lease, work, run_started)
                raise
            except WorkerUnreachable as exc:
                await self._unreachable(call, lease, exc, attempt)
                continue
            except WorkerBroke as exc:
                call.status = RequestState.failed
                await queue.pool.check_replica(lease.replica)
                raise UpstreamError(
                    f"the worker serving {call.spec.id!r} failed while answering: {exc}",
                    code="worker_failed",
                ) from None
            if reply.status != 200:
                call.status = RequestState.failed
                raise _worker_error(call, reply)
            call.status = RequestState.succeeded
            return self._rewrite(call, reply.body)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _post(self, queue: ModelQueue, lease: Lease, call: Call) -> WorkerReply:
        """The work itself: shielded from the client, so a deadline or a client
        that leaves does not cancel it; it holds the slot until the worker is done."""
        started = queue.clock()
        try:
            if call.choice_usage is not None:
                reply = await self._post_folded(lease, call)
            else:
                reply = await self.client.post(lease.replica.base_url + call.path, call.payload,
                                               lease.replica.headers)
            lease.replica.last_output = queue.clock()
            lease.replica.silent_misses = 0
            if reply.status == 200 and call.choice_usage is None:
                call.usage = _usage(reply.body.get("usage"))
            return reply
        finally:
            call.run_s = queue.clock() - started
            # done: no longer preemptible (releasing may swap the replica out at once)
            lease.replica.preemptible.pop(call.request_id, None)
            queue.release(lease)

    async def _post_folded(self, lease: Lease, call: Call) -> WorkerReply:
        """Several choices from llama.cpp, asked unstreamed: read as a stream
        (where each choice's usage shows) and folded into one body (openai/usage.py)."""
        payload = {**call.payload, "stream": True, "stream_options": {"include_usage": True}}
        stream = await self.client.open_stream(lease.replica.base_url + call.path, payload,
                                               lease.replica.headers)
        if stream.status != 200:
            return WorkerReply(stream.status, await stream.error_body())
        events = []
        try:
            async for data in stream.events():
                obj = _worker_event(data)
                if obj is not None:
                    _count_usage(call, obj)
                    events.append(obj)
        finally:
            stream.close()
        return WorkerReply(200, fold(events, call.is_chat))

    def _rewrite(self, call: Call, body: dict[str, Any]) -> dict[str, Any]:
        if call.path == EMBEDDINGS_PATH:
            return embeddings.render(call.spec.id, body, call.usage or _usage(body.get("usage")),
                                     call.encoding_format)
        if not call.path.endswith("completions"):
            return body  # a job's worker answer, read by the job itself
        choices = body.get("choices") or []
        if call.is_chat and (plan := tools.plan_of(call.payload)) is not None:
            choices = [tools.answer(plan, c) for c in choices]  # JSON answer -> tool_calls
        out: dict[str, Any] = {
            "id": call.response_id,
            "object": "chat.completion" if call.is_chat else "text_completion",
            "created": body.get("created") or call.created,
            "model": call.spec.id,
            "choices": [
                shape.chat_choice(c) if call.is_chat else shape.text_choice(c) for c in choices
            ],
            "usage": call.usage or _usage(body.get("usage")),
        }
        if "system_fingerprint" in body:
            out["system_fingerprint"] = body["system_fingerprint"]
        return out

    # -- streaming --------------------------------------------------------------

    async def _open_stream(self, call: Call) -> AsyncIterator[bytes]:
        """Start a stream; errors before its first event are raised as HTTP errors."""
        queue = self.scheduler.queue(call.spec.id)
        enqueued, deadline = self._deadlines(call, queue)
        for attempt in range(self.retries + 1):
            lease = await queue.acquire(deadline, enqueued, call.claim)
            call.deployment_id = lease.replica.id
            call.marks.lease = lease
            call.wait_s = lease.wait_s
            url = lease.replica.base_url + call.path
            try:
                async with asyncio.timeout(max(0.0, deadline - queue.clock())):
                    stream = await self.client.open_stream(url, call.payload,
                                                           lease.replica.headers)
            except TimeoutError:
                queue.release(lease)
                call.status = RequestState.cancelled
                raise self._deadline(call, "produced nothing") from None
            except WorkerUnreachable as exc:
                queue.release(lease)
                await self._unreachable(call, lease, exc, attempt)
                continue
            except BaseException:
                queue.release(lease)
                raise
            if stream.status != 200:
                body = await stream.error_body()
                queue.release(lease)
                call.status = RequestState.failed
                raise _worker_error(call, WorkerReply(stream.status, body))
            pump = _Pump(self, call, queue, lease, stream)
            pump.task = self.owner.spawn(pump.run(), call.request_id)
            pump.arm(deadline)
            try:
                first = await pump.next(deadline)
            except BaseException:
                pump.cancel()
                raise
            if isinstance(first, WorkerUnreachable):
                await self._unreachable(call, lease, first, attempt)
                continue
            if first is _TIMEOUT:
                call.status = RequestState.abandoned
                self._stall_check(queue, lease)
                pump.stop_or_finish(call)
                raise self._deadline(call, "produced nothing")
            return self._relay(call, pump, first, deadline)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _unreachable(self, call: Call, lease: Lease, exc: Exception, attempt: int) -> None:
        queue = self.scheduler.queue(call.spec.id)
        log.warning("request %s: replica %s unreachable (%s); retrying",
                    call.request_id, lease.replica.id, exc)
        await queue.pool.check_replica(lease.replica)
        if attempt == self.retries:
            raise ModelUnavailable(
                f"model {call.spec.id!r}: no replica answered after {attempt + 1} attempts"
            )

    @staticmethod
    def _preemptible(lease: Lease, call: Call, work: asyncio.Future[Any]) -> None:
        replica, rid = lease.replica, call.request_id

        def stop() -> None:
            work.cancel()

        replica.preemptible[rid] = stop
        work.add_done_callback(lambda _: replica.preemptible.pop(rid, None))

    def _cancelled(self, call: Call, lease: Lease, work: asyncio.Future[Any],
                   run_started: float) -> None:
        """The task running ``call`` was cancelled: its client went away (the
        work is stopped, or left to finish), or, for background work, the work
        itself was stopped because its replica was swapped out (``Preempted``:
        not charged, and it runs again)."""
        task = asyncio.current_task()
        if work.cancelled() and lease.background and not (task and task.cancelling()):
            call.status, call.preempted = RequestState.cancelled, True
            raise Preempted(f"model {call.spec.id!r}: its replica was swapped out for "
                            "interactive requests; this background request was stopped "
                            "before it finished, and not charged") from None
        if not work.done():
            call.status = RequestState.cancelled
            self._stop_work(call, work.cancel, work, run_started)

    def _stop_work(self, call: Call, stop: Callable[[], object], work: asyncio.Future[Any],
                   run_started: float) -> None:
        """Work whose client is gone (deadline passed, or disconnected): stopped
        now (the worker connection is closed, so the engine frees the slot), or,
        where the catalog lets abandoned work finish, at ``max_run_s`` at most."""
        scaling = call.spec.scaling
        if not scaling.finish_abandoned:
            stop()
            return
        left = run_started + scaling.run_cap_s - self.scheduler.queue(call.spec.id).clock()
        if left <= 0:
            stop()
            return
        cap = self.owner.spawn(_stop_after(left, stop), f"{call.request_id}:cap")
        work.add_done_callback(lambda _: cap.cancel())

    def _stall_check(self, queue: ModelQueue, lease: Lease) -> None:
        """A request passed its deadline on this replica with nothing back.  After
        ``STALL_MISSES`` such requests in a row, with nothing at all back from
        the replica for its stall timeout, its slots are stuck: restart it."""
        replica = lease.replica
        replica.silent_misses += 1
        silent = queue.clock() - replica.last_output
        if replica.silent_misses >= STALL_MISSES and silent >= queue.pool.spec.scaling.stall_s:
            queue.pool.replica_stalled(replica, silent)

    def _deadline(self, call: Call, what: str) -> DeadlineExceeded:
        suffix = ""
        if call.status is RequestState.abandoned:
            suffix = "; the work was abandoned" + (
                f" (it may finish, within {call.spec.scaling.run_cap_s:g}s in all)"
                if call.spec.scaling.finish_abandoned else " and stopped on the worker")
        return DeadlineExceeded(
            f"request to {call.spec.id!r} {what} within "
            f"{call.spec.scaling.request_timeout_s:g}s{suffix}",
            code="request_timeout",
        )

    async def _relay(
        self, call: Call, pump: _Pump, first: object, deadline: float
    ) -> AsyncIterator[bytes]:
        item = first
        held: list[bytes] = []  # the end of the answer, sent once it is settled
        try:
            while True:
                if item is _END:
                    call.status = RequestState.succeeded
                    if call.settle_before_end:
                        call.run_s = pump.queue.clock() - pump.started
                        await self._settle(call)
                    for event in held:
                        yield event
                    break
                if item is _TIMEOUT or isinstance(item, Exception):
                    for event in held:
                        yield event
                    yield self._stream_failed(call, pump, item)
                    break
                data: bytes = item  # type: ignore[assignment]
                try:
                    chunk = self._chunk(call, data)
                except WorkerBroke as exc:
                    item = exc
                    continue
                if chunk is not None:
                    if held or (call.settle_before_end and _ends(data)):
                        held.append(chunk)
                    else:
                        yield chunk
                item = await pump.next(deadline)
            yield b"data: [DONE]\n\n"
        finally:
            pump.disarm()
            if call.status is RequestState.pending:
                call.status = RequestState.disconnected  # the client left: stop the worker too
                pump.stop_or_finish(call)
            elif call.status is not RequestState.abandoned:
                pump.cancel()
            call.run_s = pump.queue.clock() - pump.started

    def _stream_failed(self, call: Call, pump: _Pump, item: object) -> bytes:
        """The final error event of a stream that passed its deadline or broke."""
        if item is _TIMEOUT:
            call.status = RequestState.abandoned
            pump.stop_or_finish(call)
            return _sse_error(call, self._deadline(call, "did not finish"))
        call.status = RequestState.failed
        log.warning("request %s: stream from %s broke: %s", call.request_id,
                    pump.lease.replica.id, item)
        self.owner.spawn(pump.queue.pool.check_replica(pump.lease.replica), "check")
        return _sse_error(call, UpstreamError(
            f"the worker serving {call.spec.id!r} failed mid-stream: {item}",
            code="worker_failed",
        ))

    def _chunk(self, call: Call, data: bytes) -> bytes | None:
        obj = _worker_event(data)
        if obj is None:
            return None
        usage = _count_usage(call, obj)
        obj["id"] = call.response_id
        obj["model"] = call.spec.id
        obj["object"] = "chat.completion.chunk" if call.is_chat else "text_completion"
        obj["choices"] = [
            shape.chat_chunk_choice(c) if call.is_chat else shape.text_choice(c, streaming=True)
            for c in obj.get("choices") or []
        ]
        call.marks.chunk(obj["choices"])
        if call.is_chat and obj["choices"] and (
                stream := call.tool_stream or tools.stream_for(call.payload)) is not None:
            call.tool_stream = stream  # the JSON answer is sent as tool calls at its end
            return tools.sse(obj, stream.feed(obj["choices"]), call.include_usage)
        if not obj["choices"] and usage:
            if not call.include_usage or not _usage_done(call):
                return None  # several choices: one usage chunk, once all are counted
            obj["choices"] = []
            obj["usage"] = call.usage
        elif call.include_usage:
            obj["usage"] = None
        out = b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
        if usage and obj["choices"] and call.include_usage and _usage_done(call):
            # llama-server's completions put usage on the last choice event: its own chunk here
            obj.update(choices=[], usage=call.usage)
            out += b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
        return out


_END = object()
_TIMEOUT = object()


def _worker_event(data: bytes) -> dict[str, Any] | None:
    """A worker event's object (None: llama-server's ``data: null``, which opens
    a completions stream with several choices)."""
    try:
        obj = json.loads(data)
    except ValueError:
        raise WorkerBroke("worker sent an event that is not JSON") from None
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise WorkerBroke("worker sent an event that is not an object")
    if "error" in obj:
        raise WorkerBroke(str(obj["error"])[:500])
    return obj


def _count_usage(call: Call, obj: dict[str, Any]) -> Any:
    """Take the event's usage and timings into ``call.usage``; returns its usage."""
    usage = obj.pop("usage", None)
    progress = _timings_usage(obj.pop("timings", None))
    if (several := call.choice_usage) is not None:
        several.see(obj.get("choices") or [], usage, progress)
        call.usage = several.total()
        return usage
    if progress:
        call.usage = progress
    if usage:
        call.usage = _usage(usage)
    return usage


def _usage_done(call: Call) -> bool:
    """Every choice's usage is in (always, for one choice)."""
    return call.choice_usage is None or call.choice_usage.complete


async def _stop_after(delay: float, stop: Callable[[], object]) -> None:
    await asyncio.sleep(delay)
    stop()


def _ends(data: bytes) -> bool:
    """A worker event that ends the answer: a choice's finish_reason, or usage."""
    return b'"finish_reason":"' in data or b'"finish_reason": "' in data or b'"usage"' in data


class _Pump:
    """Reads one worker stream in a task of its own and holds its slot.

    The client side waits on ``next`` with the request's deadline.  When the
    deadline passes, the read itself is not cancelled (that would close the
    connection and stop the worker): the pump is *abandoned* and reads on to
    the end, keeping the slot until the worker is done.  When the client goes
    away, the pump is cancelled, which closes the connection and stops the work.
    """

    def __init__(
        self, gateway: Gateway, call: Call, queue: ModelQueue, lease: Lease, stream: Any
    ) -> None:
        self.gateway = gateway
        self.call = call
        self.queue = queue
        self.lease = lease
        self.stream = stream
        self.items: asyncio.Queue[object] = asyncio.Queue()
        self.abandoned = False
        self.task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.started = queue.clock()

    async def run(self) -> None:
        try:
            replica = self.lease.replica
            async for data in self.stream.events():
                replica.last_output = self.queue.clock()
                replica.silent_misses = 0
                if self.abandoned:
                    self.gateway._chunk(self.call, data)  # keep the usage, drop the text
                else:
                    self.items.put_nowait(data)
            self.items.put_nowait(_END)
        except (WorkerBroke, WorkerUnreachable) as exc:
            self.items.put_nowait(exc)
        finally:
            self.stream.close()
            self.queue.release(self.lease)

    async def next(self, deadline: float) -> object:
        try:
            async with asyncio.timeout(max(0.0, deadline - self.queue.clock())):
                return await self.items.get()
        except TimeoutError:
            return _TIMEOUT

    def arm(self, deadline: float) -> None:
        """At the deadline the worker is stopped (or capped) even if the relay is
        stuck sending to a client that does not read: the slot is not held
        hostage by the client's socket.  The relay reports the deadline when
        it next reads."""
        self._timer = asyncio.get_running_loop().call_later(
            max(0.0, deadline - self.queue.clock()), self._expire)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self.task is not None and not self.task.done() and not self.abandoned:
            self.stop_or_finish(self.call)

    def stop_or_finish(self, call: Call) -> None:
        """Nobody reads this stream any more: stop the worker now, or let it
        finish within the model's cap (``Gateway._stop_work``)."""
        self.abandoned = True
        if self.task is not None:
            self.gateway._stop_work(call, self.cancel, self.task, self.started)

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()


def _sse_error(call: Call, error: ModelfleetError) -> bytes:
    call.marks.error(error)
    return b"data: " + json.dumps(error.body(), separators=(",", ":")).encode() + b"\n\n"
