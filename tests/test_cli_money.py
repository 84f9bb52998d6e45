"""The money and admin CLI (credits, plans, prices, projects set, keys rotate,
usage export) against a store in a temporary folder, in subprocesses; each
test twice: SQLite in the data folder, and a fresh PostgreSQL database that
the CLI finds in MODELFLEET_DATABASE_URL as an operator's would."""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import os
import re
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert

from modelfleet.db import Database
from modelfleet.errors import AuthenticationError
from modelfleet.ids import new_id
from modelfleet.keys import KeyService
from modelfleet.tables import UsageRecord
from tests.conftest import CHAT, catalog_text

HEADER = ["request_id", "created_at", "key_id", "model_id", "status", "input_tokens",
          "output_tokens", "cost", "wait_ms", "run_ms", "total_ms", "images"]


def cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelfleet", *args, "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=60,
    )


def ok(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    out = cli(*args, data_dir=data_dir)
    assert out.returncode == 0, out.stderr
    return out


def store_url(data_dir: Path) -> str:
    """The store the CLI uses: MODELFLEET_DATABASE_URL, else the data folder's SQLite."""
    return (os.environ.get("MODELFLEET_DATABASE_URL")
            or f"sqlite+aiosqlite:///{data_dir / 'modelfleet.db'}")


def sql(data_dir: Path, query: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of ``query`` (``?`` placeholders) read straight from the store."""
    url = store_url(data_dir)
    if url.startswith("postgresql"):
        # a loop of its own in a thread of its own: callers may be inside one
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(lambda: asyncio.run(_pg_rows(url, query, args))).result()
    conn = sqlite3.connect(data_dir / "modelfleet.db")
    try:
        return conn.execute(query, args).fetchall()
    finally:
        conn.close()


async def _pg_rows(url: str, query: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    import asyncpg

    numbers = itertools.count(1)
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        rows = await conn.fetch(re.sub(r"\?", lambda _: f"${next(numbers)}", query), *args)
        return [tuple(row) for row in rows]
    finally:
        await conn.close()


def version(data_dir: Path) -> int:
    return int(sql(data_dir, "SELECT value FROM meta WHERE key = 'version'")[0][0])


def ledger(data_dir: Path) -> list[tuple[Any, ...]]:
    return sql(data_dir, "SELECT amount, kind, reason, actor FROM ledger ORDER BY seq")


def project_id(data_dir: Path, name: str) -> str:
    return str(sql(data_dir, "SELECT id FROM projects WHERE name = ?", name)[0][0])


def run_store(data_dir: Path, work: Any) -> Any:
    async def main() -> Any:
        db = Database(store_url(data_dir))
        try:
            return await work(db)
        finally:
            await db.close()

    return asyncio.run(main())


@pytest.fixture
def store(tmp_path: Path, database_url: str | None, monkeypatch: pytest.MonkeyPatch) -> Path:
    if database_url is not None:
        monkeypatch.setenv("MODELFLEET_DATABASE_URL", database_url)
    data = tmp_path / "data"
    ok("projects", "create", "acme", data_dir=data)
    return data


def test_top_up_adjust_and_balance(store: Path) -> None:
    before = version(store)
    out = ok("credits", "topup", "--project", "acme", "--amount", "1500000", "--reason",
             "invoice 1", data_dir=store)
    assert "balance now 1500000" in out.stderr
    assert version(store) > before  # a running server picks the change up
    ok("credits", "adjust", "--project", "acme", "--amount=-500000", "--reason", "refund",
       data_dir=store)
    ok("credits", "adjust", "--project", "acme", "--amount", "7", "--reason", "goodwill",
       data_dir=store)
    balance = ok("credits", "balance", "--project", "acme", data_dir=store)
    assert balance.stdout.strip() == "1000007"
    assert "1.000007 units" in balance.stderr
    assert ledger(store) == [(1_500_000, "topup", "invoice 1", "cli"),
                             (-500_000, "adjustment", "refund", "cli"),
                             (7, "adjustment", "goodwill", "cli")]


BAD_MONEY = [
    (("credits", "topup", "--project", "nope", "--amount", "5"), "no project named 'nope'"),
    (("credits", "topup", "--project", "acme", "--amount=-5"), "positive"),
    (("credits", "topup", "--project", "acme", "--amount", "0"), "positive"),
    (("credits", "topup", "--project", "acme", "--amount", "1.5"), "integer"),
    (("credits", "topup", "--project", "acme", "--amount", "1e6"), "integer"),
    (("credits", "topup", "--project", "acme", "--amount", "true"), "integer"),
    (("credits", "topup", "--project", "acme", "--amount", "ten"), "integer"),
    (("credits", "topup", "--project", "acme", "--amount", "10" + "0" * 16), "at most"),
    (("credits", "topup", "--project", "acme"), "--amount"),
    (("credits", "adjust", "--project", "acme", "--amount", "5"), "--reason"),
    (("credits", "adjust", "--project", "acme", "--amount", "5", "--reason", " "), "reason"),
    (("credits", "adjust", "--project", "acme", "--amount", "0", "--reason", "x"), "zero"),
    (("credits", "adjust", "--project", "nope", "--amount", "5", "--reason", "x"),
     "no project named 'nope'"),
    (("credits", "balance", "--project", "nope"), "no project named 'nope'"),
]


def test_bad_money_input_exits_2_and_writes_nothing(store: Path) -> None:
    ok("credits", "topup", "--project", "acme", "--amount", "1000", data_dir=store)
    before, rows = version(store), ledger(store)
    for args, message in BAD_MONEY:
        out = cli(*args, data_dir=store)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert message in out.stderr, (args, out.stderr)
        assert out.stdout == ""
        assert ledger(store) == rows and version(store) == before, args
    assert ok("credits", "balance", "--project", "acme", data_dir=store).stdout.strip() == "1000"


def test_keys_rotate(store: Path) -> None:
    old = ok("keys", "create", "--project", "acme", "--name", "svc", data_dir=store).stdout.strip()
    old_id = sql(store, "SELECT id FROM api_keys WHERE prefix = ?", old[:11])[0][0]
    before = version(store)
    out = ok("keys", "rotate", old_id, "--grace-seconds", "0", data_dir=store)
    new = out.stdout.strip()
    assert new.startswith("mf-") and new != old and "shown only once" in out.stderr
    assert version(store) > before
    rows = sql(store, "SELECT id, name, scopes FROM api_keys WHERE prefix = ?", new[:11])
    assert [r[1:] for r in rows] == [("svc", "inference")]
    new_id_ = rows[0][0]

    async def check(db: Database) -> None:
        keys = KeyService(db)
        assert (await keys.authenticate(new)).project_id == project_id(store, "acme")
        with pytest.raises(AuthenticationError) as exc:
            await keys.authenticate(old)
        assert exc.value.code == "expired_api_key"

    run_store(store, check)
    # an expired key, an unknown one and a bad grace are refused
    for args, message in (((old_id, "--grace-seconds", "5"), "expired"),
                          (("nope", "--grace-seconds", "5"), "no key with id"),
                          ((new_id_, "--grace-seconds", "-1"), "grace")):
        bad = cli("keys", "rotate", *args, data_dir=store)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
    assert len(sql(store, "SELECT 1 FROM api_keys")) == 2


def test_keys_rotate_with_grace_keeps_the_old_key(store: Path) -> None:
    old = ok("keys", "create", "--project", "acme", data_dir=store).stdout.strip()
    old_id = sql(store, "SELECT id FROM api_keys WHERE prefix = ?", old[:11])[0][0]
    new = ok("keys", "rotate", old_id, "--grace-seconds", "60", data_dir=store).stdout.strip()

    async def check(db: Database) -> None:
        keys = KeyService(db)
        assert (await keys.authenticate(old)).key_id == old_id
        principal = await keys.authenticate(new)
        assert principal.key_id != old_id
        info = await keys.get(old_id)
        assert info.expires_at is not None
        assert timedelta(seconds=50) < info.expires_at - datetime.now(UTC) <= timedelta(seconds=60)

    run_store(store, check)


def test_plans_set_and_list(store: Path) -> None:
    before = version(store)
    ok("plans", "set", "gold", "--key-rpm", "50", "--project-tpm", "1000", "--priority", "2",
       data_dir=store)
    assert version(store) > before
    # only the given limits change; 'none' is unlimited
    ok("plans", "set", "gold", "--weight", "3", "--project-tpm", "none", data_dir=store)
    listing = ok("plans", "list", data_dir=store).stdout.splitlines()
    assert listing[0].split("\t") == ["name", "key_rpm", "key_tpm", "key_concurrency",
                                      "project_rpm", "project_tpm", "project_concurrency",
                                      "priority", "weight", "batch_discount_pct"]
    rows = {line.split("\t")[0]: line.split("\t") for line in listing[1:]}
    assert rows["gold"] == ["gold", "50", "none", "none", "none", "none", "none", "2", "3",
                            "default"]
    assert rows["default"][1] == "1000"
    ok("plans", "set", "gold", "--batch-discount-pct", "30", data_dir=store)
    assert sql(store, "SELECT batch_discount_pct FROM plans WHERE name = 'gold'") == [(30,)]
    ok("plans", "set", "gold", "--batch-discount-pct", "-1", data_dir=store)  # unset
    assert sql(store, "SELECT batch_discount_pct FROM plans WHERE name = 'gold'") == [(None,)]
    for args in (("--key-rpm", "0"), ("--key-tpm", "-5"), ("--key-rpm", "lots"),
                 ("--weight", "0"), ("--batch-discount-pct", "101")):
        bad = cli("plans", "set", "gold", *args, data_dir=store)
        assert bad.returncode == 2, bad.stderr
    assert sql(store, "SELECT key_rpm, weight FROM plans WHERE name = 'gold'") == [(50, 3)]


def test_projects_set(store: Path, tmp_path: Path) -> None:
    ok("plans", "set", "gold", "--key-rpm", "5", data_dir=store)
    pid = project_id(store, "acme")
    before = version(store)
    out = ok("projects", "set", "--project", "acme", "--plan", "gold", "--models",
             "smollm2,gemma3-270m", data_dir=store)
    assert "plan gold" in out.stderr
    assert version(store) > before
    assert sql(store, "SELECT plan FROM projects WHERE id = ?", pid) == [("gold",)]
    models = sorted(r[0] for r in sql(store, "SELECT model_id FROM project_models"))
    assert models == [CHAT, "google/gemma-3-270m"]
    # a model from another catalog needs --catalog
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(catalog_text(tmp_path, warm=False))
    assert cli("projects", "set", "--project", "acme", "--models", "test/priced",
               data_dir=store).returncode == 2
    ok("projects", "set", "--project", "acme", "--models", "test/priced", "--catalog",
       str(catalog), data_dir=store)
    assert sql(store, "SELECT model_id FROM project_models") == [("test/priced",)]
    for args, message in (
        (("--project", "nope", "--plan", "gold"), "no project named 'nope'"),
        (("--project", "acme", "--plan", "platinum"), "no plan named 'platinum'"),
        (("--project", "acme", "--models", "nope"), "not in the catalog"),
        (("--project", "acme", "--models", ","), "at least one"),
        (("--project", "acme", "--models", "smollm2", "--all-models"), "not both"),
        (("--project", "acme"), "nothing to change"),
        (("--project", "acme", "--models", "smollm2", "--catalog", "/nonexistent.toml"),
         "catalog"),
    ):
        bad = cli("projects", "set", *args, data_dir=store)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
    assert sql(store, "SELECT model_id FROM project_models") == [("test/priced",)]
    ok("projects", "set", "--project", "acme", "--all-models", data_dir=store)
    assert sql(store, "SELECT model_id FROM project_models") == []
    assert sql(store, "SELECT plan FROM projects WHERE id = ?", pid) == [("gold",)]


def test_prices_set(store: Path, tmp_path: Path) -> None:
    before = version(store)
    ok("prices", "set", "smollm2", "--input-per-million", "5", "--output-per-million", "7",
       data_dir=store)
    assert version(store) > before
    assert sql(store, "SELECT model_id, input_per_million, output_per_million FROM prices") == [
        (CHAT, 5, 7)]
    listing = ok("prices", "list", data_dir=store).stdout
    assert f"{CHAT}\t5\t7\tyes" in listing
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(catalog_text(tmp_path, warm=False))
    ok("prices", "set", "test/priced", "--input-per-million", "0", "--output-per-million", "1",
       "--catalog", str(catalog), data_dir=store)
    for args in (("nope", "--input-per-million", "1", "--output-per-million", "1"),
                 ("smollm2", "--input-per-million", "-1", "--output-per-million", "1"),
                 ("smollm2", "--input-per-million", "1.5", "--output-per-million", "1"),
                 ("smollm2", "--input-per-million", "1")):
        assert cli("prices", "set", *args, data_dir=store).returncode == 2
    assert len(sql(store, "SELECT 1 FROM prices")) == 2


def test_usage_export_csv(store: Path, tmp_path: Path) -> None:
    ok("projects", "create", "other", data_dir=store)
    pid, other = project_id(store, "acme"), project_id(store, "other")
    t0 = datetime(2025, 3, 1, 12, tzinfo=UTC)
    rows: list[dict[str, Any]] = []
    for i in range(2100):  # more than one page; many rows share a timestamp
        rows.append({"request_id": new_id(), "project_id": pid,
                     "key_id": "key-a" if i % 3 else "key-b", "model_id": CHAT,
                     "status": "succeeded", "input_tokens": i, "output_tokens": 1, "cost": i,
                     "wait_ms": 1, "run_ms": 2, "total_ms": 3,
                     "created_at": t0 + timedelta(days=i // 700, seconds=(i % 700) // 10)})
    rows.append({**rows[0], "request_id": new_id(), "project_id": other})

    async def fill(db: Database) -> None:
        async with db.session() as session, session.begin():
            await session.execute(insert(UsageRecord), rows)

    run_store(store, fill)

    out = ok("usage", "export", "--project", "acme", data_dir=store)
    table = list(csv.reader(io.StringIO(out.stdout)))
    assert table[0] == HEADER
    assert len(table) == 2101
    assert sorted(r[0] for r in table[1:]) == sorted(r["request_id"] for r in rows[:2100])
    first = dict(zip(HEADER, table[1], strict=True))
    assert first["created_at"] == "2025-03-01T12:00:00+00:00" and first["model_id"] == CHAT
    assert "2100 usage records" in out.stderr

    only_b = ok("usage", "export", "--project", "acme", "--key", "key-b", data_dir=store)
    body = list(csv.reader(io.StringIO(only_b.stdout)))[1:]
    assert len(body) == 700 and {r[2] for r in body} == {"key-b"}

    day = ok("usage", "export", "--project", "acme", "--since", "2025-03-02", "--until",
             "2025-03-02", "--out", str(tmp_path / "day.csv"), data_dir=store)
    assert day.stdout == ""
    with open(tmp_path / "day.csv", newline="") as handle:
        written = list(csv.reader(handle))
    assert written[0] == HEADER and len(written) == 701
    assert all(r[1].startswith("2025-03-02") for r in written[1:])

    empty = ok("usage", "export", "--project", "other", "--since", "2030-01-01", data_dir=store)
    assert list(csv.reader(io.StringIO(empty.stdout))) == [HEADER]

    for args in (("--project", "nope"), ("--project", "acme", "--since", "yesterday"),
                 ("--project", "acme", "--since", "2025-03-05", "--until", "2025-03-01")):
        target = tmp_path / "bad.csv"
        bad = cli("usage", "export", *args, "--out", str(target), data_dir=store)
        assert bad.returncode == 2 and "error:" in bad.stderr, bad.stderr
        assert not target.exists()
