"""What an operator sees of each request: one log line and, when asked for, a trace.

    Gateway.handle ── marks on the call (lease, first and last token, error code)
        └─ _settle ── Observer.finished(call, ...)
                        ├─ one line on the logger ``modelfleet.requests`` (INFO)
                        └─ spans, when tracing is on, built from the marks:
                             "{operation} {model}"        (server; the request)
                               ├─ "queue wait"
                               │    └─ "cold start"       (it waited for a replica to start)
                               ├─ "worker call"           (client; server.address/port)
                               └─ "settlement"

The spans are made after the fact, with the recorded start and end times, so
the request path only notes a few timestamps; with tracing off nothing else
runs (one ``is None`` check).  The log line carries ids, names, counts and
times, never a key, a prompt, an answer or an error message (messages can
quote the input): there is no setting that would log them.

Any other HTTP request (a 401, the admin API) gets one access line from the
``AccessLog`` middleware instead.  ``configure_logging`` installs the
process's handler: JSON (one object per line) or text for a terminal.  See
docs/operations.md.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit

import orjson

from modelfleet.errors import ModelfleetError
from modelfleet.ledger import cost_of
from modelfleet.settings import ObserveSettings
from modelfleet.states import CHARGED, RequestState

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from modelfleet.gateway import Call
    from modelfleet.keys import Principal
    from modelfleet.scheduler import Lease

log = logging.getLogger(__name__)
REQUEST_LOGGER = "modelfleet.requests"

#: The GenAI semantic conventions' gen_ai.operation.name for each worker path.
OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
}
_FAILED = (RequestState.failed, RequestState.abandoned)
#: Paths scraped or probed all day: no access line.
QUIET_PATHS = frozenset({"/health", "/metrics"})


def operation_of(path: str) -> str:
    return OPERATIONS.get(path, "generate_content")


@dataclass
class Marks:
    """What the log line and the trace need beyond what the gateway keeps for
    itself: set at a few points of ``Gateway.handle``."""

    started: float = field(default_factory=time.monotonic)  # the scheduler's clock
    started_ns: int = field(default_factory=time.time_ns)  # the same moment, wall clock
    lease: Lease | None = None
    first_token: float | None = None
    last_token: float | None = None
    error_code: str | None = None
    http_status: int = 200
    cost: int = 0

    def ns(self, mono: float) -> int:
        """A monotonic time as wall-clock nanoseconds (span times)."""
        return self.started_ns + int((mono - self.started) * 1e9)

    def chunk(self, choices: list[Any]) -> None:
        """A streamed chunk arrived: note it if it carries output."""
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if choice.get("text") or (isinstance(delta, dict) and (
                    delta.get("content") or delta.get("tool_calls")
                    or delta.get("reasoning_content"))):
                now = time.monotonic()
                if self.first_token is None:
                    self.first_token = now
                self.last_token = now
                return

    def error(self, exc: BaseException) -> None:
        """The request ended with ``exc`` (the first one noted wins)."""
        if self.error_code is not None:
            return
        if isinstance(exc, ModelfleetError):
            self.error_code, self.http_status = exc.code, exc.status
        elif not isinstance(exc, (asyncio.CancelledError, GeneratorExit)) \
                and type(exc).__name__ != "ClientDisconnect":
            self.error_code, self.http_status = "internal_error", 500


def stream_times(call: Call) -> tuple[float | None, float | None]:
    """A stream's time to first token (from arrival) and time per output token."""
    marks = call.marks
    if marks.first_token is None:
        return None, None
    ttft = marks.first_token - marks.started
    out = int(call.usage.get("completion_tokens", 0))
    if marks.last_token is None or out < 2:
        return ttft, None
    return ttft, (marks.last_token - marks.first_token) / (out - 1)


#: Characters of a key shown as its prefix: ``mf-`` and 8 of its 43 random ones
#: (what keys.py stores and `keys list` shows; the rest stays secret).
KEY_PREFIX_CHARS = 11


def key_prefix(raw: str | None) -> str:
    """The public prefix of a presented key, never more of it."""
    return raw[:KEY_PREFIX_CHARS] if raw and raw.startswith("mf-") else ""


def charged(call: Call) -> int:
    """What settlement charged (metering.Metering.settle's rule): the actual cost
    of a charged outcome, never above the hold."""
    ticket = call.ticket
    if ticket is None or call.status not in CHARGED:
        return 0
    cost = cost_of(int(call.usage.get("prompt_tokens", 0)),
                   int(call.usage.get("completion_tokens", 0)), ticket.prices)
    return min(cost + ticket.per_image * call.images, ticket.grant.ask.amount)


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else round(seconds * 1000)


def request_record(call: Call, project: str, ended: float) -> dict[str, Any]:
    """The fields of one request's log line (no key, no prompt, no message)."""
    marks = call.marks
    principal = call.principal
    ttft, tpot = stream_times(call)
    return {
        "request_id": call.request_id,
        "endpoint": call.path,
        "model": call.spec.id,
        "route_model": call.route_model,
        "project": project,
        "project_id": principal.project_id if principal else None,
        "key_id": principal.key_id if principal else None,
        "key_prefix": call.key_prefix or None,
        "stream": call.stream,
        "status": marks.http_status,
        "outcome": call.status.value,
        "error_code": marks.error_code,
        "input_tokens": int(call.usage.get("prompt_tokens", 0)),
        "output_tokens": int(call.usage.get("completion_tokens", 0)),
        "images": call.images or None,
        "cost": marks.cost,
        "wait_ms": _ms(call.wait_s),
        "run_ms": _ms(call.run_s),
        "total_ms": _ms(ended - marks.started),
        "ttft_ms": _ms(ttft),
        "tpot_ms": None if tpot is None else round(tpot * 1000, 3),
        "replica": call.deployment_id,
    }


def rejected_record(request_id: str, principal: Principal | None, project: str, model: str,
                    endpoint: str, exc: ModelfleetError, key_prefix: str = "") -> dict[str, Any]:
    """The log line of a request refused before it was queued."""
    return {
        "request_id": request_id,
        "endpoint": endpoint,
        "model": model,
        "project": project,
        "project_id": principal.project_id if principal else None,
        "key_id": principal.key_id if principal else None,
        "key_prefix": key_prefix or None,
        "status": exc.status,
        "outcome": "rejected",
        "error_code": exc.code,
    }


class RequestLine:
    """A log message that is a record: JSON writes its fields, text a summary."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        f = self.fields
        if "method" in f:  # an access line (AccessLog)
            return (f"request {f['request_id']} {f['method']} {f['endpoint']} {f['status']} "
                    f"total={f['total_ms']}ms client={f['client']}")
        parts = [f"request {f['request_id']} {f['endpoint']} {f['model']} {f['status']} "
                 f"{f['outcome']}"]
        for name in ("error_code", "project", "key_prefix", "replica"):
            if f.get(name):
                parts.append(f"{name.removesuffix('_code')}={f[name]}")
        if "input_tokens" in f:
            parts.append(f"tokens={f['input_tokens']}+{f['output_tokens']} cost={f['cost']}")
        for name in ("wait_ms", "run_ms", "total_ms", "ttft_ms"):
            if f.get(name) is not None:
                parts.append(f"{name.removesuffix('_ms')}={f[name]}ms")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, and a request
    line's fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if isinstance(record.msg, RequestLine):
            out["message"] = "request"
            out.update(record.msg.fields)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")


def configure_logging(level: str, log_format: str | None, stream: TextIO | None = None) -> str:
    """The process's one log handler, on ``stream`` (stderr): ``json``, ``text``,
    or None for text on a terminal and JSON otherwise.  Returns the format."""
    stream = stream or sys.stderr
    chosen = log_format or ("text" if stream.isatty() else "json")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    return chosen


def tracer_provider(exporter: str) -> TracerProvider | None:
    """A provider that batches spans to ``exporter`` (otlp: OTLP over HTTP,
    configured by the standard OTEL_EXPORTER_OTLP_* variables; console)."""
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        log.warning("tracing asked for (%s) but opentelemetry-sdk is not installed "
                    "(pip install 'modelfleet[otel]'); tracing is off", exporter)
        return None
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "modelfleet"}))
    provider = TracerProvider(resource=resource)
    if exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        return provider
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        log.warning("OTLP tracing asked for but opentelemetry-exporter-otlp-proto-http is not "
                    "installed (pip install 'modelfleet[otel]'); tracing is off")
        return None
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


class Observer:
    """Writes each request's log line and, with a tracer provider, its spans."""

    def __init__(self, settings: ObserveSettings | None = None,
                 provider: TracerProvider | None = None) -> None:
        self.settings = settings or ObserveSettings()
        self.log = logging.getLogger(REQUEST_LOGGER)
        self.provider = provider
        self.tracer: Tracer | None = provider.get_tracer("modelfleet") if provider else None

    @classmethod
    def from_settings(cls, settings: ObserveSettings) -> Observer:
        exporter = settings.traces_exporter
        return cls(settings, tracer_provider(exporter) if exporter else None)

    def close(self) -> None:
        """Send the spans still batched (the provider's own shutdown)."""
        if self.provider is not None:
            self.provider.shutdown()

    def finished(self, call: Call, project: str, settle_started: float) -> None:
        """The request was settled: its line and its trace."""
        if not self.settings.log_requests and self.tracer is None:
            return
        ended = time.monotonic()
        fields = request_record(call, project, ended)
        if self.settings.log_requests and self.log.isEnabledFor(logging.INFO):
            _logged()
            self.log.info(RequestLine(fields))
        if self.tracer is not None:
            self._trace(self.tracer, call, fields, settle_started, ended)

    def rejected(self, fields: dict[str, Any]) -> None:
        """A request refused before it was queued (``rejected_record``)."""
        if self.settings.log_requests and self.log.isEnabledFor(logging.INFO):
            _logged()
            self.log.info(RequestLine(fields))
        if self.tracer is not None:
            span = self.tracer.start_span(
                f"{operation_of(fields['endpoint'])} {fields['model']}", kind=_server_kind(),
                attributes=_common(fields))
            _fail(span, str(fields["error_code"]))
            span.end()

    def _trace(self, tracer: Tracer, call: Call, fields: dict[str, Any], settle_started: float,
               ended: float) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind

        marks = call.marks
        attributes = _common(fields)
        attributes.update(_usage_attributes(call, fields))
        root = tracer.start_span(f"{operation_of(call.path)} {fields['route_model']}",
                                 kind=SpanKind.SERVER, start_time=marks.started_ns,
                                 attributes=attributes)
        context = trace.set_span_in_context(root)
        lease = marks.lease
        if lease is not None:
            _queue_spans(tracer, context, marks, lease)
            worker = tracer.start_span("worker call", context, kind=SpanKind.CLIENT,
                                       start_time=marks.ns(lease.acquired_at),
                                       attributes=_replica_attributes(lease))
            worker.end(end_time=marks.ns(settle_started))
        tracer.start_span("settlement", context, start_time=marks.ns(settle_started),
                          attributes={"modelfleet.cost": marks.cost}).end(end_time=marks.ns(ended))
        if marks.error_code is not None or call.status in _FAILED:
            _fail(root, marks.error_code or call.status.value)
        root.end(end_time=marks.ns(ended))


# The HTTP request being served, if AccessLog is in front: [True] once it has a
# request line (a list, so that a stream's child task can mark it).
_ACCESS: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar(
    "modelfleet_access", default=None)


def _logged() -> None:
    seen = _ACCESS.get()
    if seen is not None:
        seen[0] = True


class AccessLog:
    """ASGI middleware: one line for each HTTP request that got no request line
    from the gateway (a 401, the admin and account API, job reads), with
    method, path, status, time and the client's address; never headers, the
    query string or a body.  ``/health`` and ``/metrics`` are left out."""

    def __init__(self, app: ASGIApp, observer: Observer, id_key: str) -> None:
        self.app = app
        self.observer = observer
        self.id_key = id_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        logger = self.observer.log
        if scope["type"] != "http" or scope["path"] in QUIET_PATHS \
                or not self.observer.settings.log_requests or not logger.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = [500]
        seen = [False]
        token = _ACCESS.set(seen)

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            _ACCESS.reset(token)
            if not seen[0]:
                client = scope.get("client")
                logger.info(RequestLine({
                    "request_id": scope.get(self.id_key, ""),
                    "endpoint": scope["path"][:200],
                    "method": scope["method"],
                    "model": None,
                    "status": status[0],
                    "outcome": "http",
                    "total_ms": _ms(time.monotonic() - started),
                    "client": client[0] if client else None,
                }))


def _server_kind() -> Any:
    from opentelemetry.trace import SpanKind

    return SpanKind.SERVER


def _common(fields: dict[str, Any]) -> dict[str, Any]:
    out = {
        "gen_ai.operation.name": operation_of(fields["endpoint"]),
        "gen_ai.request.model": fields.get("route_model") or fields["model"],
        "modelfleet.request_id": fields["request_id"],
        "modelfleet.project": fields["project"],
        "modelfleet.outcome": fields["outcome"],
        "http.response.status_code": fields["status"],
    }
    return {k: v for k, v in out.items() if v is not None}


def _usage_attributes(call: Call, fields: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "gen_ai.response.model": call.spec.id,
        "gen_ai.usage.input_tokens": fields["input_tokens"],
        "gen_ai.usage.output_tokens": fields["output_tokens"],
        "modelfleet.cost": fields["cost"],
        "modelfleet.stream": call.stream,
    }
    max_tokens = call.payload.get("max_tokens")
    if isinstance(max_tokens, int):
        out["gen_ai.request.max_tokens"] = max_tokens
    if call.path in ("/v1/chat/completions", "/v1/completions"):
        out["gen_ai.response.id"] = call.response_id
    if fields["ttft_ms"] is not None:
        out["modelfleet.time_to_first_token_ms"] = fields["ttft_ms"]
    return out


def _replica_attributes(lease: Lease) -> dict[str, Any]:
    url = urlsplit(lease.replica.base_url)
    out: dict[str, Any] = {"modelfleet.replica": lease.replica.id}
    if url.hostname:
        out["server.address"] = url.hostname
    if url.port:
        out["server.port"] = url.port
    return out


def _queue_spans(tracer: Tracer, context: Any, marks: Marks, lease: Lease) -> None:
    wait = tracer.start_span("queue wait", context, start_time=marks.ns(lease.enqueued_at))
    ready_at = lease.replica.ready_at
    if ready_at is not None and lease.enqueued_at < ready_at <= lease.acquired_at:
        from opentelemetry import trace

        start = max(lease.replica.started_at, lease.enqueued_at)
        tracer.start_span("cold start", trace.set_span_in_context(wait),
                          start_time=marks.ns(start),
                          attributes={"modelfleet.replica": lease.replica.id}
                          ).end(end_time=marks.ns(ready_at))
    wait.end(end_time=marks.ns(lease.acquired_at))


def _fail(span: Span, error_type: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR))
