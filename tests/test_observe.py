"""Operations visibility (observe.py): one log line per request, OpenTelemetry
spans with the GenAI attributes, and the vLLM-style metrics, over real
requests to real llama.cpp workers."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from modelfleet.api.app import create_app
from modelfleet.keys import CreatedKey
from modelfleet.metrics import OTHER_PROJECTS, Metrics
from modelfleet.observe import REQUEST_LOGGER, JsonFormatter, Observer, configure_logging
from modelfleet.services import Services
from modelfleet.settings import ObserveSettings, Settings, observe_from_env
from tests.conftest import _smol, launch_server, stop_server

pytestmark = pytest.mark.workers

PRICES = "[models.prices]\ninput_per_million = 1_000_000\noutput_per_million = 10_000_000\n"
CATALOG = "".join([
    _smol("test/obs", scaling="concurrency = 2\nmin_replicas = 1", extra=PRICES),
    _smol("test/obs-cold", scaling="concurrency = 1", extra=PRICES),
    _smol("test/obs-queue-timeout", scaling="request_timeout_s = 0.05"),
])
CANARY = "zebracanary"  # a word of the prompt: must never reach a log line
MSG = [{"role": "user", "content": f"Say {CANARY}."}]


@pytest.fixture
def database_url() -> None:
    """These tests are about the request path, not the store: SQLite only."""
    return None


@dataclass
class Observed:
    client: httpx.AsyncClient
    services: Services
    spans: InMemorySpanExporter
    log: io.StringIO
    tenant: CreatedKey
    others: list[CreatedKey]

    def auth(self, key: CreatedKey | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {(key or self.tenant).key}"}

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.getvalue().splitlines()]

    def line_of(self, request_id: str) -> dict[str, Any]:
        found = [x for x in self.lines() if x.get("request_id") == request_id]
        assert len(found) == 1, self.log.getvalue()
        return found[0]

    def trace_of(self, request_id: str) -> list[ReadableSpan]:
        spans = self.spans.get_finished_spans()
        root = [s for s in spans if s.attributes and
                s.attributes.get("modelfleet.request_id") == request_id]
        assert len(root) == 1, [s.name for s in spans]
        trace_id = root[0].context.trace_id
        return [s for s in spans if s.context.trace_id == trace_id]


@pytest.fixture(scope="module")
async def observed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Observed]:
    tmp = tmp_path_factory.mktemp("observe")
    (tmp / "catalog.toml").write_text(CATALOG)
    settings = Settings(data_dir=tmp / "data", catalog_path=tmp / "catalog.toml",
                        bootstrap_default_key=False,
                        observe=ObserveSettings(max_project_labels=3))
    services = Services.build(settings)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    services.gateway.observer = Observer(settings.observe, provider)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(REQUEST_LOGGER)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    asgi = create_app(settings, services)
    await services.start()
    try:
        tenant = await services.keys.create("acme", ["inference"])
        others = [await services.keys.create(f"team-{i}", ["inference"]) for i in range(3)]
        for key in (tenant, *others):
            await services.ledger.credit(key.project_id, 10_000_000, kind="topup", reason="test",
                                         actor="test")
        await services.watcher.check()
        transport = httpx.ASGITransport(app=asgi)
        async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                     timeout=60) as client:
            yield Observed(client, services, exporter, out, tenant, others)
    finally:
        await services.stop()
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


def scrape(services: Services) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = services.metrics.render()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def sample(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def chat(observed: Observed, model: str = "test/obs", key: CreatedKey | None = None,
               **extra: Any) -> httpx.Response:
    return await observed.client.post("/v1/chat/completions", headers=observed.auth(key), json={
        "model": model, "messages": MSG, "max_tokens": 6, "temperature": 0, **extra})


# -- logs ---------------------------------------------------------------------------


async def test_one_json_line_per_request_without_key_or_prompt(observed: Observed) -> None:
    r = await chat(observed)
    assert r.status_code == 200, r.text
    rid = r.headers["x-request-id"]
    line = observed.line_of(rid)
    usage = r.json()["usage"]
    assert line["message"] == "request"
    assert line["logger"] == REQUEST_LOGGER
    assert line["endpoint"] == "/v1/chat/completions"
    assert line["model"] == "test/obs"
    assert line["project"] == "acme"
    assert line["project_id"] == observed.tenant.project_id
    assert line["key_id"] == observed.tenant.key_id
    assert line["key_prefix"] == observed.tenant.prefix
    assert line["status"] == 200 and line["outcome"] == "succeeded"
    assert line["error_code"] is None
    assert line["input_tokens"] == usage["prompt_tokens"] > 0
    assert line["output_tokens"] == usage["completion_tokens"] > 0
    # 1 and 10 credits (micro-units) per token at these prices
    assert line["cost"] == usage["prompt_tokens"] + 10 * usage["completion_tokens"]
    assert line["replica"] == r.headers["x-deployment-id"]
    assert line["wait_ms"] >= 0 and line["run_ms"] > 0
    assert line["total_ms"] >= line["run_ms"]
    text = observed.log.getvalue()
    assert observed.tenant.key not in text
    assert observed.tenant.key[len(observed.tenant.prefix):] not in text
    assert CANARY not in text


async def test_refused_requests_are_logged_too(observed: Observed) -> None:
    r = await chat(observed, model="no/such-model")
    assert r.status_code == 404
    line = observed.line_of(r.headers["x-request-id"])
    assert line["status"] == 404 and line["outcome"] == "rejected"
    assert line["error_code"] == "model_not_found"
    assert line["project"] == "acme"
    assert CANARY not in observed.log.getvalue()


async def test_other_requests_get_an_access_line(observed: Observed) -> None:
    bad_key = "mf-" + "B" * 43
    r = await observed.client.post("/v1/chat/completions", json={"model": "test/obs"},
                                   headers={"Authorization": f"Bearer {bad_key}"})
    assert r.status_code == 401
    line = observed.line_of(r.headers["x-request-id"])
    assert line["status"] == 401 and line["outcome"] == "http"
    assert line["method"] == "POST" and line["endpoint"] == "/v1/chat/completions"
    r = await observed.client.get("/v1/inference/models")
    assert r.status_code == 200
    assert observed.line_of(r.headers["x-request-id"])["status"] == 200
    # an inference request has its request line only, not an access line too
    r = await chat(observed, max_tokens=1)
    assert observed.line_of(r.headers["x-request-id"])["outcome"] == "succeeded"
    r = await observed.client.get("/health")
    assert not [x for x in observed.lines() if x.get("request_id") == r.headers["x-request-id"]]
    assert "B" * 43 not in observed.log.getvalue()


def test_log_format_follows_the_setting_and_the_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    root = logging.getLogger()
    before = (root.handlers[:], root.level)
    try:
        assert configure_logging("info", None, Tty()) == "text"
        piped = io.StringIO()
        assert configure_logging("info", None, piped) == "json"
        logging.getLogger("modelfleet.test").info("hello %s", "there")
        record = json.loads(piped.getvalue().splitlines()[-1])
        assert record["message"] == "hello there" and record["level"] == "info"
        forced = Tty()
        assert configure_logging("warning", "json", forced) == "json"
    finally:
        root.handlers[:], _ = before
        root.setLevel(before[1])
    assert observe_from_env({"MODELFLEET_LOG_FORMAT": "JSON"}).log_format == "json"
    with pytest.raises(ValueError):
        observe_from_env({"MODELFLEET_LOG_FORMAT": "xml"})
    assert observe_from_env({}).traces_exporter is None
    assert observe_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}).traces_exporter == "otlp"
    assert observe_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                             "OTEL_SDK_DISABLED": "true"}).traces_exporter is None
    assert observe_from_env({"OTEL_TRACES_EXPORTER": "none",
                             "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}).traces_exporter is None


# -- traces ---------------------------------------------------------------------------


async def test_trace_of_a_cold_request(observed: Observed) -> None:
    r = await chat(observed, model="test/obs-cold")
    assert r.status_code == 200, r.text
    spans = {s.name: s for s in observed.trace_of(r.headers["x-request-id"])}
    assert set(spans) == {"chat test/obs-cold", "queue wait", "cold start", "worker call",
                          "settlement"}
    root = spans["chat test/obs-cold"]
    assert root.parent is None
    assert root.kind.name == "SERVER"
    for name in ("queue wait", "worker call", "settlement"):
        assert spans[name].parent is not None
        assert spans[name].parent.span_id == root.context.span_id
    cold = spans["cold start"]
    assert cold.parent is not None and cold.parent.span_id == spans["queue wait"].context.span_id
    assert cold.end_time is not None and cold.start_time is not None
    assert cold.end_time - cold.start_time > 1_000_000  # it took more than a millisecond
    attrs = dict(root.attributes or {})
    usage = r.json()["usage"]
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "test/obs-cold"
    assert attrs["gen_ai.response.model"] == "test/obs-cold"
    assert attrs["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert attrs["gen_ai.request.max_tokens"] == 6
    assert attrs["gen_ai.response.id"] == r.json()["id"]
    assert attrs["modelfleet.project"] == "acme"
    assert "error.type" not in attrs
    worker = dict(spans["worker call"].attributes or {})
    assert worker["server.address"] == "127.0.0.1"
    assert isinstance(worker["server.port"], int) and worker["server.port"] > 0
    assert root.start_time is not None and root.end_time is not None
    for span in spans.values():  # children lie within the request
        assert span.start_time is not None and span.end_time is not None
        assert root.start_time <= span.start_time <= span.end_time <= root.end_time
    assert observed.tenant.key not in json.dumps([dict(s.attributes or {}) for s in spans.values()])


async def test_trace_marks_a_failure(observed: Observed) -> None:
    r = await chat(observed, model="test/obs-queue-timeout")
    assert r.status_code == 504, r.text
    spans = {s.name: s for s in observed.trace_of(r.headers["x-request-id"])}
    root = spans["chat test/obs-queue-timeout"]
    assert root.status.status_code.name == "ERROR"
    assert dict(root.attributes or {})["error.type"] == "queue_timeout"
    assert "worker call" not in spans  # it never reached a worker
    line = observed.line_of(r.headers["x-request-id"])
    assert line["status"] == 504 and line["error_code"] == "queue_timeout"
    assert line["outcome"] == "cancelled"


# -- metrics --------------------------------------------------------------------------


async def test_stream_metrics_ttft_tpot_and_gauges(observed: Observed) -> None:
    before = scrape(observed.services)
    r = await chat(observed, stream=True, max_tokens=8, stream_options={"include_usage": True})
    assert r.status_code == 200
    assert r.text.rstrip().endswith("data: [DONE]")
    line = observed.line_of(r.headers["x-request-id"])
    assert line["stream"] is True and line["ttft_ms"] is not None
    assert line["output_tokens"] > 1 and line["tpot_ms"] is not None
    deadline = time.monotonic() + 5
    while True:  # the worker's slot is given back when its stream closes
        s = scrape(observed.services)
        if sample(s, "modelfleet_requests_running", model="test/obs") == 0:
            break
        assert time.monotonic() < deadline, "slot still taken"
        await asyncio.sleep(0.02)

    def grew(name: str, **labels: str) -> float:
        return (sample(s, name, **labels) or 0) - (sample(before, name, **labels) or 0)

    assert grew("modelfleet_time_to_first_token_seconds_count", model="test/obs") == 1
    assert grew("modelfleet_time_per_output_token_seconds_count", model="test/obs") == 1
    ttft = grew("modelfleet_time_to_first_token_seconds_sum", model="test/obs")
    assert 0 < ttft <= line["total_ms"] / 1000 + 0.01
    assert grew("modelfleet_prompt_tokens_total", model="test/obs") == line["input_tokens"]
    assert grew("modelfleet_generation_tokens_total", model="test/obs") == line["output_tokens"]
    assert grew("modelfleet_requests_total", model="test/obs", status="succeeded",
                project="acme") == 1
    assert sample(s, "modelfleet_requests_waiting", model="test/obs") == 0
    # the queue-wait histogram reaches cold starts
    assert sample(s, "modelfleet_wait_seconds_bucket", model="test/obs", le="600.0") is not None


async def test_project_labels_are_names_and_bounded(observed: Observed) -> None:
    # max_project_labels = 3: acme (earlier tests) and two teams get their name;
    # the third team shares "_other".
    for key in observed.others:
        r = await chat(observed, key=key, max_tokens=1)
        assert r.status_code == 200, r.text
    s = scrape(observed.services)
    projects = {dict(labels).get("project") for name, labels in s
                if name == "modelfleet_requests_total"}
    assert {"acme", "team-0", "team-1", OTHER_PROJECTS} <= projects
    assert "team-2" not in projects
    assert not projects & {observed.tenant.project_id, *(k.project_id for k in observed.others)}


def test_project_label_bound_unit() -> None:
    m = Metrics(max_projects=2)
    assert [m.project_label(p) for p in ("a", "b", "c", "a", "", "d")] == \
        ["a", "b", OTHER_PROJECTS, "a", "", OTHER_PROJECTS]


# -- a real server: the settings reach its logs and its trace exporter --------------------


class _Collector(ThreadingHTTPServer):
    """An OTLP/HTTP endpoint on loopback: keeps what is POSTed to /v1/traces."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path == "/v1/traces":
                    outer.bodies.append(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture(scope="module")
def json_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, _Collector]]:
    tmp = tmp_path_factory.mktemp("observe-server")
    collector = _Collector()
    thread = threading.Thread(target=collector.serve_forever, daemon=True)
    thread.start()
    try:
        running = launch_server(tmp, _smol("test/obs", scaling="min_replicas = 1"), env={
            "MODELFLEET_LOG_FORMAT": "json",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.server_port}",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_SERVICE_NAME": "modelfleet-test",
        })
        try:
            yield running, collector
        finally:
            stop_server(running.proc)
    finally:
        collector.shutdown()
        collector.server_close()
        thread.join()


def test_server_writes_json_request_lines_and_exports_spans(
        json_server: tuple[Any, _Collector]) -> None:
    server, collector = json_server
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   headers={"Authorization": f"Bearer {server.key}"},
                   json={"model": "test/obs", "messages": MSG, "max_tokens": 2})
    assert r.status_code == 200, r.text
    rid = r.headers["x-request-id"]
    deadline = time.monotonic() + 10
    while rid not in server.log_text() or not any(rid.encode() in b for b in collector.bodies):
        assert time.monotonic() < deadline, (server.log_text(), len(collector.bodies))
        time.sleep(0.05)
    lines = [json.loads(x) for x in server.log_text().splitlines() if x.startswith("{")]
    mine = [x for x in lines if x.get("request_id") == rid]
    assert len(mine) == 1 and mine[0]["project"] == "default" and mine[0]["status"] == 200
    assert any(x["logger"] != REQUEST_LOGGER for x in lines)  # the other logs are JSON too
    assert server.key not in server.log_text()
    assert CANARY not in server.log_text()
    exported = b"".join(collector.bodies)  # OTLP protobuf: the strings appear as they are
    for text in (b"chat test/obs", b"queue wait", b"worker call", b"settlement",
                 b"gen_ai.usage.output_tokens", b"modelfleet-test"):
        assert text in exported
    assert server.key.encode() not in exported and CANARY.encode() not in exported
