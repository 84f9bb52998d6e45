"""The Prometheus metrics layer: events, live gauges read at scrape time, the route."""

from __future__ import annotations

import logging

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from modelfleet.api.metrics_route import router
from modelfleet.metrics import LATENCY_BUCKETS, Metrics, ModelSnapshot

Labels = tuple[tuple[str, str], ...]


def scrape(metrics: Metrics) -> dict[tuple[str, Labels], float]:
    """Every sample of a render, keyed by (sample name, sorted labels)."""
    body, _ = metrics.render()
    samples: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict[tuple[str, Labels], float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_request_finished_counts_latencies_and_tokens() -> None:
    m = Metrics()
    m.request_finished(
        "chat-a", "proj1", "succeeded", wait_s=0.5, run_s=2.0, input_tokens=10, output_tokens=7
    )
    m.request_finished(
        "chat-a", "proj1", "succeeded", wait_s=0.25, run_s=1.0, input_tokens=5, output_tokens=0
    )
    m.request_finished("chat-a", "proj2", "failed", wait_s=0.0, run_s=0.0, input_tokens=0, output_tokens=0)
    m.request_finished(
        "chat-b", "proj1", "disconnected", wait_s=3.0, run_s=4.0, input_tokens=1, output_tokens=2
    )
    s = scrape(m)

    req = "modelfleet_requests_total"
    assert value(s, req, model="chat-a", status="succeeded", project="proj1") == 2
    assert value(s, req, model="chat-a", status="failed", project="proj2") == 1
    assert value(s, req, model="chat-b", status="disconnected", project="proj1") == 1
    assert value(s, req, model="chat-b", status="succeeded", project="proj1") is None

    assert value(s, "modelfleet_wait_seconds_count", model="chat-a") == 3
    assert value(s, "modelfleet_wait_seconds_sum", model="chat-a") == pytest.approx(0.75)
    assert value(s, "modelfleet_run_seconds_sum", model="chat-a") == pytest.approx(3.0)
    assert value(s, "modelfleet_total_seconds_count", model="chat-a") == 3
    assert value(s, "modelfleet_total_seconds_sum", model="chat-a") == pytest.approx(3.75)
    assert value(s, "modelfleet_total_seconds_sum", model="chat-b") == pytest.approx(7.0)
    # Buckets are cumulative: 0.0 and 0.25 fall in le=0.25, 0.5 joins at le=0.5.
    assert value(s, "modelfleet_wait_seconds_bucket", model="chat-a", le="0.25") == 2
    assert value(s, "modelfleet_wait_seconds_bucket", model="chat-a", le="0.5") == 3
    assert value(s, "modelfleet_wait_seconds_bucket", model="chat-a", le="+Inf") == 3

    tok = "modelfleet_tokens_total"
    assert value(s, tok, model="chat-a", direction="input") == 15
    assert value(s, tok, model="chat-a", direction="output") == 7
    assert value(s, tok, model="chat-b", direction="input") == 1
    assert value(s, tok, model="chat-b", direction="output") == 2


def test_latency_buckets_span_1ms_to_300s() -> None:
    assert LATENCY_BUCKETS[0] == 0.001
    assert LATENCY_BUCKETS[-1] == 300.0
    assert list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)


def test_negative_durations_are_clamped() -> None:
    m = Metrics()
    m.request_finished("x", "p", "succeeded", wait_s=-0.1, run_s=1.0, input_tokens=-3, output_tokens=1)
    s = scrape(m)
    assert value(s, "modelfleet_wait_seconds_sum", model="x") == 0.0
    assert value(s, "modelfleet_total_seconds_sum", model="x") == pytest.approx(1.0)
    assert value(s, "modelfleet_tokens_total", model="x", direction="input") is None


def test_request_rejected_uses_status_label() -> None:
    m = Metrics()
    m.request_rejected("chat-a", "proj1", 429)
    m.request_rejected("chat-a", "proj1", 429)
    m.request_rejected("chat-a", "proj2", 400)
    s = scrape(m)
    req = "modelfleet_requests_total"
    assert value(s, req, model="chat-a", status="rejected_429", project="proj1") == 2
    assert value(s, req, model="chat-a", status="rejected_400", project="proj2") == 1
    # A rejection was never queued: no latency observed.
    assert value(s, "modelfleet_wait_seconds_count", model="chat-a") is None


def test_scale_decisions_and_events() -> None:
    m = Metrics()
    m.scale_decision("chat-a", 0, 1)
    m.scale_decision("chat-a", 1, 3)
    m.scale_decision("chat-a", 3, 0)
    m.scale_decision("chat-a", 2, 2)  # no change: not a decision
    s = scrape(m)
    assert value(s, "modelfleet_autoscaler_decisions_total", model="chat-a", direction="up") == 2
    assert value(s, "modelfleet_autoscaler_decisions_total", model="chat-a", direction="down") == 1
    assert value(s, "modelfleet_scale_events_total", model="chat-a", direction="up") == 3
    assert value(s, "modelfleet_scale_events_total", model="chat-a", direction="down") == 3


def test_cold_start_histogram() -> None:
    m = Metrics()
    m.cold_start("chat-a", 1.5)
    m.cold_start("chat-a", 12.0)
    s = scrape(m)
    assert value(s, "modelfleet_cold_start_seconds_count", model="chat-a") == 2
    assert value(s, "modelfleet_cold_start_seconds_sum", model="chat-a") == pytest.approx(13.5)
    assert value(s, "modelfleet_cold_start_seconds_bucket", model="chat-a", le="2.0") == 1


def test_live_gauges_read_at_scrape_time() -> None:
    m = Metrics()
    assert value(scrape(m), "modelfleet_queue_length", model="chat-a") is None  # nothing bound yet

    state = {"queued": 4, "ready": 2, "desired": 3, "available": True}
    calls = 0

    def snapshot() -> list[ModelSnapshot]:
        nonlocal calls
        calls += 1
        return [
            ModelSnapshot(
                model="chat-a",
                queued=int(state["queued"]),
                replicas_by_state={"ready": int(state["ready"]), "starting": 1},
                desired=int(state["desired"]),
                available=bool(state["available"]),
            ),
            ModelSnapshot(model="chat-b", queued=0, replicas_by_state={}, desired=0, available=False),
        ]

    m.bind_live(snapshot)
    assert calls == 0  # binding does not call it; scraping does

    s = scrape(m)
    assert calls == 1
    assert value(s, "modelfleet_queue_length", model="chat-a") == 4
    assert value(s, "modelfleet_replicas", model="chat-a", state="ready") == 2
    assert value(s, "modelfleet_replicas", model="chat-a", state="starting") == 1
    assert value(s, "modelfleet_replicas", model="chat-a", state="draining") == 0
    assert value(s, "modelfleet_desired_replicas", model="chat-a") == 3
    assert value(s, "modelfleet_model_available", model="chat-a") == 1
    assert value(s, "modelfleet_queue_length", model="chat-b") == 0
    assert value(s, "modelfleet_replicas", model="chat-b", state="ready") == 0
    assert value(s, "modelfleet_model_available", model="chat-b") == 0

    state.update(queued=0, ready=1, desired=1, available=False)
    s = scrape(m)
    assert calls == 2
    assert value(s, "modelfleet_queue_length", model="chat-a") == 0
    assert value(s, "modelfleet_replicas", model="chat-a", state="ready") == 1
    assert value(s, "modelfleet_desired_replicas", model="chat-a") == 1
    assert value(s, "modelfleet_model_available", model="chat-a") == 0


def test_models_leaving_the_snapshot_leave_the_gauges() -> None:
    m = Metrics()
    models = ["chat-a", "chat-b"]
    m.bind_live(
        lambda: [
            ModelSnapshot(model=x, queued=1, replicas_by_state={}, desired=0, available=True) for x in models
        ]
    )
    assert value(scrape(m), "modelfleet_queue_length", model="chat-b") == 1
    models.remove("chat-b")
    assert value(scrape(m), "modelfleet_queue_length", model="chat-b") is None


def test_broken_snapshot_does_not_break_the_scrape(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics()
    m.request_rejected("chat-a", "p", 503)

    def broken() -> list[ModelSnapshot]:
        raise RuntimeError("boom")

    m.bind_live(broken)
    with caplog.at_level(logging.ERROR, logger="modelfleet.metrics"):
        s = scrape(m)
    assert value(s, "modelfleet_requests_total", model="chat-a", status="rejected_503", project="p") == 1
    assert not any(name == "modelfleet_queue_length" for name, _ in s)
    assert "live snapshot failed" in caplog.text


def test_instances_are_independent() -> None:
    a, b = Metrics(), Metrics()
    a.request_finished("chat-a", "p", "succeeded", 0.1, 0.2, 1, 1)
    a.bind_live(lambda: [ModelSnapshot("chat-a", 5, {"ready": 1}, 1, True)])
    b.bind_live(lambda: [ModelSnapshot("chat-a", 9, {"ready": 2}, 2, True)])
    sa, sb = scrape(a), scrape(b)
    assert value(sa, "modelfleet_requests_total", model="chat-a", status="succeeded", project="p") == 1
    assert value(sb, "modelfleet_requests_total", model="chat-a", status="succeeded", project="p") is None
    assert value(sa, "modelfleet_queue_length", model="chat-a") == 5
    assert value(sb, "modelfleet_queue_length", model="chat-a") == 9


def test_render_content_type() -> None:
    body, content_type = Metrics().render()
    assert content_type.startswith("text/plain")
    assert b"# TYPE modelfleet_requests_total counter" in body
    # The default registry (process collectors etc.) is not included.
    assert b"process_cpu_seconds_total" not in body
    assert b"python_gc_objects_collected_total" not in body


async def test_metrics_route() -> None:
    m = Metrics()
    m.request_finished("chat-a", "proj1", "succeeded", 0.01, 0.02, 3, 4)
    m.bind_live(lambda: [ModelSnapshot("chat-a", 2, {"ready": 1}, 1, True)])
    app = FastAPI()
    app.include_router(router(m))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert "version=" in r.headers["content-type"]
    assert "# TYPE modelfleet_requests_total counter" in r.text
    assert 'modelfleet_queue_length{model="chat-a"} 2.0' in r.text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }
    assert (
        value(samples, "modelfleet_requests_total", model="chat-a", status="succeeded", project="proj1") == 1
    )
