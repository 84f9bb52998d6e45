"""Prometheus metrics: request outcomes, latencies, tokens, and the live state
of each model's pool (queue, replicas, desired size, availability).

Each :class:`Metrics` owns its own :class:`~prometheus_client.CollectorRegistry`
(never the process-wide default), so several apps or tests in one process do
not clash.  Events (a request finished, a scaling decision, a cold start) are
pushed through the methods below; the live gauges are pulled at scrape time from
the callable given to :meth:`Metrics.bind_live`.  See ``docs/metrics.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

PREFIX = "modelfleet_"

#: Latency buckets from 1 ms to 300 s (queue wait, run time, total time).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip

#: Queue wait and total time: a request that waits for a cold start (minutes for a
#: large model) or an async job that waits for a slot (up to an hour) still lands
#: in a finite bucket.
WAIT_BUCKETS: tuple[float, ...] = (*LATENCY_BUCKETS, 600.0, 1200.0, 3600.0)

#: Time to first token: arrival to the first streamed token, queue wait and cold
#: start included (vLLM's meaning), so it reaches minutes too.
TTFT_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0,
)  # fmt: skip

#: Time per output token (inter-token latency of a stream).
TPOT_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.035, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
)  # fmt: skip

#: The ``project`` label of the projects seen after the first ``max_projects``.
OTHER_PROJECTS = "_other"  # project names start with a letter or digit: no clash

#: Cold starts take from well under a second (tiny model, warm page cache) to minutes.
COLD_START_BUCKETS: tuple[float, ...] = (
    0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip

#: Replica states always exported per model (0 when none), so series do not vanish.
REPLICA_STATES: tuple[str, ...] = ("starting", "ready", "draining")


@dataclass(frozen=True)
class ModelSnapshot:
    """The live state of one model, read at scrape time."""

    model: str
    queued: int
    replicas_by_state: dict[str, int] = field(default_factory=dict)
    desired: int = 0
    available: bool = False
    running: int = 0  # requests on this gateway's replicas (their slots in use)


class _LiveCollector(Collector):
    """Builds the live gauges from ``snapshot()`` on every scrape."""

    def __init__(self) -> None:
        self.snapshot: Callable[[], list[ModelSnapshot]] | None = None

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                PREFIX + "queue_length", "Requests waiting in the model's queue.", labels=["model"]
            ),
            GaugeMetricFamily(
                PREFIX + "replicas", "Replicas of the model by state.", labels=["model", "state"]
            ),
            GaugeMetricFamily(
                PREFIX + "desired_replicas",
                "Replicas the autoscaler currently wants for the model.",
                labels=["model"],
            ),
            GaugeMetricFamily(
                PREFIX + "model_available",
                "1 if the model can serve requests (or wake to serve them), else 0.",
                labels=["model"],
            ),
            GaugeMetricFamily(
                PREFIX + "requests_running",
                "Requests running on the model's replicas (slots in use), as vLLM's num_requests_running.",
                labels=["model"],
            ),
            GaugeMetricFamily(
                PREFIX + "requests_waiting",
                "Requests waiting for a slot (the queue), as vLLM's num_requests_waiting.",
                labels=["model"],
            ),
        )

    def describe(self) -> Iterable[Metric]:
        # Names only (lets the registry detect clashes without calling snapshot()).
        return self._families()

    def collect(self) -> Iterable[Metric]:
        queue, replicas, desired, available, running, waiting = families = self._families()
        snapshot = self.snapshot
        if snapshot is None:
            return families
        try:
            models = snapshot()
        except Exception:
            # A broken snapshot must not take the whole scrape down with it.
            log.exception("metrics: live snapshot failed; live gauges omitted from this scrape")
            return families
        for snap in models:
            queue.add_metric([snap.model], float(snap.queued))
            counts = {str(state): n for state, n in snap.replicas_by_state.items()}
            for state in (*REPLICA_STATES, *sorted(set(counts) - set(REPLICA_STATES))):
                replicas.add_metric([snap.model, state], float(counts.get(state, 0)))
            desired.add_metric([snap.model], float(snap.desired))
            available.add_metric([snap.model], 1.0 if snap.available else 0.0)
            running.add_metric([snap.model], float(snap.running))
            waiting.add_metric([snap.model], float(snap.queued))
        return families


def _histogram(name: str, doc: str, registry: CollectorRegistry, buckets: tuple[float, ...]) -> Histogram:
    return Histogram(PREFIX + name, doc, ["model"], registry=registry, buckets=buckets)


class Metrics:
    """The gateway's metrics, in a registry of their own.

    ``project`` labels are project names; the first ``max_projects`` distinct
    names get their own label, later ones share ``_other`` (a bound on series)."""

    def __init__(self, max_projects: int = 100) -> None:
        self.max_projects = max_projects
        self._projects: set[str] = set()
        self.registry = CollectorRegistry(auto_describe=False)
        reg = self.registry
        self._requests = Counter(
            PREFIX + "requests",
            "Finished requests by outcome (succeeded, failed, abandoned, cancelled, "
            "disconnected, rejected_<http status>).",
            ["model", "status", "project"],
            registry=reg,
        )
        self._wait = _histogram(
            "wait_seconds",
            "Time a request waited in the queue before a replica took it.",
            reg,
            WAIT_BUCKETS,
        )
        self._run = _histogram("run_seconds", "Time a replica spent on a request.", reg, LATENCY_BUCKETS)
        self._total = _histogram(
            "total_seconds", "Queue wait plus run time of a request.", reg, WAIT_BUCKETS
        )
        self._ttft = _histogram(
            "time_to_first_token_seconds",
            "Streamed requests: arrival to the first token, queue wait and cold start included.",
            reg,
            TTFT_BUCKETS,
        )
        self._tpot = _histogram(
            "time_per_output_token_seconds",
            "Streamed requests: time between output tokens after the first one.",
            reg,
            TPOT_BUCKETS,
        )
        self._prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt (input) tokens processed.", ["model"], registry=reg
        )
        self._generation_tokens = Counter(
            PREFIX + "generation_tokens", "Generated (output) tokens.", ["model"], registry=reg
        )
        self._tokens = Counter(
            PREFIX + "tokens",
            "Tokens processed, by direction (input = prompt, output = completion).",
            ["model", "direction"],
            registry=reg,
        )
        self._decisions = Counter(
            PREFIX + "autoscaler_decisions",
            "Autoscaler decisions that changed a model's desired replicas, by direction.",
            ["model", "direction"],
            registry=reg,
        )
        self._scale_events = Counter(
            PREFIX + "scale_events",
            "Replicas added (up) or removed (down) by autoscaler decisions.",
            ["model", "direction"],
            registry=reg,
        )
        self._cold_start = _histogram(
            "cold_start_seconds",
            "Time from starting a replica until it was ready.",
            reg,
            COLD_START_BUCKETS,
        )
        self._live = _LiveCollector()
        reg.register(self._live)

    # -- events ---------------------------------------------------------------

    def request_finished(
        self,
        model: str,
        project: str,
        status: str,
        wait_s: float,
        run_s: float,
        input_tokens: int,
        output_tokens: int,
        *,
        ttft_s: float | None = None,
        tpot_s: float | None = None,
    ) -> None:
        """One request reached an outcome after being admitted to a queue
        (``ttft_s`` and ``tpot_s``: a stream's time to first token and time per
        output token, when it produced them)."""
        wait_s, run_s = max(0.0, wait_s), max(0.0, run_s)
        self._requests.labels(model, status, self.project_label(project)).inc()
        self._wait.labels(model).observe(wait_s)
        self._run.labels(model).observe(run_s)
        self._total.labels(model).observe(wait_s + run_s)
        if ttft_s is not None:
            self._ttft.labels(model).observe(max(0.0, ttft_s))
        if tpot_s is not None:
            self._tpot.labels(model).observe(max(0.0, tpot_s))
        if input_tokens > 0:
            self._tokens.labels(model, "input").inc(input_tokens)
            self._prompt_tokens.labels(model).inc(input_tokens)
        if output_tokens > 0:
            self._tokens.labels(model, "output").inc(output_tokens)
            self._generation_tokens.labels(model).inc(output_tokens)

    def request_rejected(self, model: str, project: str, http_status: int) -> None:
        """A request was refused before it was queued (status label ``rejected_<status>``)."""
        self._requests.labels(model, f"rejected_{http_status}", self.project_label(project)).inc()

    def project_label(self, project: str) -> str:
        """``project`` itself while fewer than ``max_projects`` names have been
        seen (or it is one of them), else ``_other``."""
        if project in self._projects or not project:
            return project
        if len(self._projects) < self.max_projects:
            self._projects.add(project)
            return project
        return OTHER_PROJECTS

    def scale_decision(self, model: str, before: int, after: int) -> None:
        """The autoscaler changed a model's desired replicas from ``before`` to ``after``.

        No-op when they are equal."""
        if after == before:
            return
        direction = "up" if after > before else "down"
        self._decisions.labels(model, direction).inc()
        self._scale_events.labels(model, direction).inc(abs(after - before))

    def cold_start(self, model: str, seconds: float) -> None:
        """A replica of ``model`` took ``seconds`` to become ready."""
        self._cold_start.labels(model).observe(max(0.0, seconds))

    # -- live state and exposition ---------------------------------------------

    def bind_live(self, snapshot: Callable[[], list[ModelSnapshot]]) -> None:
        """Read the live gauges from ``snapshot()`` at every scrape (replaces any earlier binding).

        ``snapshot`` is called synchronously from :meth:`render`; keep it cheap
        and non-blocking."""
        self._live.snapshot = snapshot

    def render(self) -> tuple[bytes, str]:
        """The exposition (text format) and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
