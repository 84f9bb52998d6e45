"""Keys: shown once, stored hashed, never logged; CLI and first-start bootstrap.
The CLI tests run on SQLite and on PostgreSQL (MODELFLEET_DATABASE_URL)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Server
from tests.services import PostgresServer


@pytest.fixture
def store_url(database_url: str | None, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """The store the CLI subprocesses use: None (the data folder's SQLite) or
    a fresh PostgreSQL database in MODELFLEET_DATABASE_URL."""
    if database_url is not None:
        monkeypatch.setenv("MODELFLEET_DATABASE_URL", database_url)
    return database_url


def cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelfleet", *args, "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=60,
    )


def test_cli_creates_key_once_and_stores_only_its_hash(tmp_path: Path, store_url: str | None,
                                                       request: pytest.FixtureRequest) -> None:
    out = cli("keys", "create", "--project", "acme", "--scope", "inference", "--scope", "admin",
              "--name", "ci", data_dir=tmp_path)
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    assert key.startswith("mf-") and len(key) == 46
    assert "shown only once" in out.stderr
    if store_url is None:
        db = (tmp_path / "modelfleet.db").read_bytes()
        wal = tmp_path / "modelfleet.db-wal"
        blob = db + (wal.read_bytes() if wal.exists() else b"")
    else:  # all that the database holds, as pg_dump writes it
        postgres: PostgresServer = request.getfixturevalue("postgres")
        blob = postgres.dump(store_url.rsplit("/", 1)[1]).encode()
        assert b"api_keys" in blob
    assert key.encode() not in blob
    assert hashlib.sha256(key.encode()).hexdigest().encode() in blob
    listing = cli("keys", "list", "--project", "acme", data_dir=tmp_path)
    assert listing.returncode == 0
    assert key[:11] in listing.stdout and key not in listing.stdout
    assert "inference admin" in listing.stdout


def test_cli_rejects_unknown_scope_and_bad_project(tmp_path: Path, store_url: str | None) -> None:
    bad = cli("keys", "create", "--project", "acme", "--scope", "root", data_dir=tmp_path)
    assert bad.returncode == 2 and "unknown scope 'root'" in bad.stderr
    weird = cli("keys", "create", "--project", "../etc", data_dir=tmp_path)
    assert weird.returncode == 2 and "project names" in weird.stderr
    missing = cli("keys", "revoke", "nope", data_dir=tmp_path)
    assert missing.returncode == 2 and "no key with id" in missing.stderr


def test_projects_cli(tmp_path: Path, store_url: str | None) -> None:
    assert cli("projects", "create", "team-a", data_dir=tmp_path).returncode == 0
    listing = cli("projects", "list", data_dir=tmp_path)
    assert "team-a" in listing.stdout


def test_bootstrap_key_works_and_no_key_is_in_logs(server: Server) -> None:
    import httpx

    # a canary: a fresh key used for real requests, then searched for everywhere
    canary = cli("keys", "create", "--project", "canary", data_dir=server.data_dir).stdout.strip()
    for key in (server.key, canary):
        resp = httpx.get(server.url + "/v1/models", headers={"x-api-key": key}, timeout=10)
        assert resp.status_code == 200
    httpx.post(server.url + "/v1/chat/completions", timeout=60,
               headers={"Authorization": f"Bearer {canary}"},
               json={"model": "smollm2", "messages": [{"role": "user", "content": "x"}],
                     "max_tokens": 1})
    texts = [server.log_text()]
    texts += [p.read_text(errors="replace") for p in (server.data_dir / "logs").glob("*.log")]
    for text in texts:
        assert canary not in text and server.key not in text
    for path in server.data_dir.glob("modelfleet.db*"):
        assert canary.encode() not in path.read_bytes()
    # the bootstrap made exactly one project called default, with one inference key
    listing = cli("keys", "list", "--project", "default", data_dir=server.data_dir).stdout
    assert listing.count("mf-") == 1 and "inference" in listing
