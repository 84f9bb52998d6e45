"""Tenancy and money against the real server and model: holds under
concurrency, streamed charging, disconnects, revocation and rotation from
another process, rate limits and their headers."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from modelfleet.catalog import DEFAULT_CATALOG, load_catalog
from modelfleet.db import Database
from modelfleet.keys import KeyService
from modelfleet.ledger import cost_of, write_credit
from modelfleet.projects import PlanLimits, ProjectService
from tests.conftest import Server, _cli

pytestmark = pytest.mark.workers
PRICED = "test/priced"  # 1 micro-unit per input token, 10 per output token
PRICES = (1_000_000, 10_000_000)
MSG = [{"role": "user", "content": "Hi"}]


def store(server: Server) -> Database:
    return Database(f"sqlite+aiosqlite:///{server.data_dir / 'modelfleet.db'}")


def run(server: Server, work: Any) -> Any:
    """Run ``work(db)`` against the server's store from this (another) process."""

    async def main() -> Any:
        db = store(server)
        try:
            return await work(db)
        finally:
            await db.close()

    return asyncio.run(main())


def new_project(server: Server, name: str, *, credit: int = 0, plan: str | None = None) -> str:
    key = _cli("keys", "create", "--project", name, "--scope", "inference",
               data_dir=server.data_dir)

    async def setup(db: Database) -> None:
        projects = ProjectService(db, load_catalog(DEFAULT_CATALOG))
        await projects.load()
        info = projects.by_name(name)
        assert info is not None
        if credit:
            await write_credit(db, info.id, credit, kind="topup", reason="test", actor="test")
        if plan:
            await projects.update_project(info.id, plan=plan)

    run(server, setup)
    return key


def set_plan(server: Server, limits: PlanLimits) -> None:
    async def work(db: Database) -> None:
        projects = ProjectService(db, load_catalog(DEFAULT_CATALOG))
        await projects.load()
        await projects.set_plan(limits)

    run(server, work)


def sql(server: Server, query: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(server.data_dir / "modelfleet.db")
    try:
        return conn.execute(query, args).fetchall()
    finally:
        conn.close()


def project_id(server: Server, name: str) -> str:
    return str(sql(server, "SELECT id FROM projects WHERE name = ?", name)[0][0])


def balance(server: Server, name: str) -> int:
    rows = sql(server, "SELECT COALESCE(SUM(amount), 0) FROM ledger WHERE project_id = ?",
               project_id(server, name))
    return int(rows[0][0])


def wait_usage(server: Server, request_ids: list[str], timeout: float = 30) -> dict[str, tuple]:
    deadline = time.monotonic() + timeout
    marks = ",".join("?" * len(request_ids))
    while True:
        rows = sql(server, "SELECT request_id, status, input_tokens, output_tokens, cost FROM usage "
                   f"WHERE request_id IN ({marks})", *request_ids)
        if len(rows) == len(request_ids) or time.monotonic() > deadline:
            return {r[0]: r[1:] for r in rows}
        time.sleep(0.1)


def chat(server: Server, key: str, **over: Any) -> httpx.Response:
    body: dict[str, Any] = {"model": PRICED, "messages": MSG, "max_tokens": 8,
                            "metadata": {"ignore_eos": True}}
    body.update(over)
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {key}"})


@pytest.fixture(scope="module", autouse=True)
def warm(server: Server) -> Iterator[None]:
    assert chat(server, server.key).status_code == 200
    yield


def test_concurrent_requests_never_overdraw(server: Server) -> None:
    # actual cost ~ 40 input + 80 output = ~120; worst case held ~ 190
    key = new_project(server, "money-a", credit=6000)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=250)) as c:
            return await asyncio.gather(*[
                c.post(server.url + "/v1/chat/completions",
                       headers={"Authorization": f"Bearer {key}"},
                       json={"model": PRICED, "messages": MSG, "max_tokens": 8,
                             "metadata": {"ignore_eos": True}})
                for _ in range(200)
            ])

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 403}, codes
    refused = [r for r in responses if r.status_code == 403]
    assert refused and all(r.json()["error"]["code"] == "insufficient_credits" for r in refused)
    served = [r.headers["x-request-id"] for r in responses if r.status_code == 200]
    assert len(served) >= 20
    usage = wait_usage(server, served)
    assert len(usage) == len(served)  # exactly one usage record per served request
    total = sum(row[3] for row in usage.values())
    for status, tin, tout, cost in usage.values():
        assert status == "succeeded" and tout == 8
        assert cost == cost_of(tin, tout, PRICES)
    final = balance(server, "money-a")
    assert final == 6000 - total and final >= 0
    # refused requests left no usage and no hold behind: the project could afford
    # exactly what is left, and a request that fits is admitted again
    assert len(sql(server, "SELECT 1 FROM usage WHERE project_id = ?",
                   project_id(server, "money-a"))) == len(served)
    ledger = sql(server, "SELECT COUNT(*) FROM ledger WHERE project_id = ? AND kind = 'usage'",
                 project_id(server, "money-a"))
    assert ledger[0][0] == len(served)


def test_stream_without_usage_is_charged_like_its_twin(server: Server) -> None:
    key = new_project(server, "money-b", credit=100_000)
    body = {"temperature": 0, "seed": 5, "max_tokens": 16}
    plain = chat(server, key, **body)
    assert plain.status_code == 200
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {key}"},
                      json={"model": PRICED, "messages": MSG, "stream": True,
                            "metadata": {"ignore_eos": True}, **body}) as resp:
        assert resp.status_code == 200
        streamed_id = resp.headers["x-request-id"]
        lines = [x for x in resp.iter_lines() if x.startswith("data:")]
    assert lines[-1] == "data: [DONE]" and '"usage":{' not in "".join(lines)
    usage = wait_usage(server, [plain.headers["x-request-id"], streamed_id])
    a, b = usage[plain.headers["x-request-id"]], usage[streamed_id]
    assert a == b and a[0] == "succeeded" and a[2] == 16 and a[3] > 0


def test_client_that_leaves_a_stream_pays_for_what_was_generated(server: Server) -> None:
    key = new_project(server, "money-c", credit=1_000_000)
    before = balance(server, "money-c")
    received = 0
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {key}"},
                      json={"model": PRICED, "messages": MSG, "stream": True,
                            "max_tokens": 2000, "metadata": {"ignore_eos": True}}) as resp:
        request_id = resp.headers["x-request-id"]
        for line in resp.iter_lines():
            if '"content":"' in line:
                received += 1
            if received == 12:
                break  # leaving the with-block closes the connection
    row = wait_usage(server, [request_id])[request_id]
    status, tin, tout, cost = row
    assert status == "disconnected"
    assert received <= tout <= received + 40  # what was generated, not the 2000 asked
    assert cost == cost_of(tin, tout, PRICES)
    assert balance(server, "money-c") == before - cost


def test_revoked_key_refused_on_next_request_even_from_the_cli(server: Server) -> None:
    key = new_project(server, "money-d", credit=100_000)
    assert chat(server, key).status_code == 200
    key_id = sql(server, "SELECT id FROM api_keys WHERE prefix = ?", key[:11])[0][0]
    out = _cli("keys", "revoke", key_id, data_dir=server.data_dir)
    assert out == ""
    resp = chat(server, key)
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "revoked_api_key"


def test_rotated_key_works_until_its_grace_ends(server: Server) -> None:
    old = new_project(server, "money-e", credit=100_000)
    key_id = sql(server, "SELECT id FROM api_keys WHERE prefix = ?", old[:11])[0][0]

    async def rotate(db: Database) -> str:
        return (await KeyService(db).rotate(key_id, 2.0)).key

    new = run(server, rotate)
    assert chat(server, new).status_code == 200
    assert chat(server, old).status_code == 200  # within the grace period
    time.sleep(2.2)
    resp = chat(server, old)
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "expired_api_key"
    assert chat(server, new).status_code == 200


def test_rpm_limit_holds_under_concurrency_and_headers_count_down(server: Server) -> None:
    set_plan(server, PlanLimits(name="five-rpm", key_rpm=5))
    key = new_project(server, "money-f", credit=1_000_000, plan="five-rpm")
    first = chat(server, key, max_tokens=1)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit"] == "5"
    assert first.headers["x-ratelimit-remaining"] == "4"
    assert first.headers["x-ratelimit-tier"] == "five-rpm"
    assert first.headers["x-ratelimit-limit-requests"] == "5"
    assert int(first.headers["x-ratelimit-reset"]) >= int(time.time())

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*[
                c.post(server.url + "/v1/chat/completions",
                       headers={"Authorization": f"Bearer {key}"},
                       json={"model": PRICED, "messages": MSG, "max_tokens": 1})
                for _ in range(8)
            ])

    responses = asyncio.run(burst())
    ok = [r for r in responses if r.status_code == 200]
    limited = [r for r in responses if r.status_code == 429]
    assert len(ok) == 4 and len(limited) == 4
    remaining = sorted(int(r.headers["x-ratelimit-remaining"]) for r in ok)
    assert remaining == [0, 1, 2, 3]
    for r in limited:
        assert r.json()["error"]["code"] == "rate_limit_requests_per_minute_per_key"
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["x-ratelimit-remaining"] == "0"


def test_tpm_counts_the_worst_case_and_returns_the_rest(server: Server) -> None:
    # worst case of one request: ~108 prompt bound + 50 output = ~158 tokens
    set_plan(server, PlanLimits(name="tpm-300", key_rpm=None, key_tpm=300))
    key = new_project(server, "money-g", credit=1_000_000, plan="tpm-300")

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*[
                c.post(server.url + "/v1/chat/completions",
                       headers={"Authorization": f"Bearer {key}"},
                       json={"model": PRICED, "messages": MSG, "max_tokens": 50})
                for _ in range(4)
            ])

    responses = asyncio.run(burst())
    ok = [r for r in responses if r.status_code == 200]
    limited = [r for r in responses if r.status_code == 429]
    assert len(ok) == 1 and len(limited) == 3  # only one worst case fits at a time
    assert all(r.json()["error"]["code"] == "rate_limit_tokens_per_minute_per_key"
               for r in limited)
    # the unused part came back: another request fits right away
    again = chat(server, key, max_tokens=50, metadata={})
    assert again.status_code == 200, again.text
    assert int(again.headers["x-ratelimit-remaining-tokens"]) >= 0
    too_big = chat(server, key, max_tokens=400)
    assert too_big.status_code == 429 and "can never fit" in too_big.json()["error"]["message"]


def test_project_limited_to_deployed_models_and_project_header(server: Server) -> None:
    key = new_project(server, "money-h", credit=100_000)

    async def deploy(db: Database) -> None:
        projects = ProjectService(db, load_catalog(DEFAULT_CATALOG))
        await projects.load()
        info = projects.by_name("money-h")
        assert info is not None
        await projects.update_project(info.id, models=["smollm2"])

    run(server, deploy)
    headers = {"Authorization": f"Bearer {key}"}
    ids = [m["id"] for m in httpx.get(server.url + "/v1/models", headers=headers).json()["data"]]
    assert ids == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    other = httpx.get(server.url + "/v1/models/gemma3-270m", headers=headers)
    assert other.status_code == 404
    resp = httpx.post(server.url + "/v1/completions", headers=headers, timeout=60,
                      json={"model": "gemma3-270m", "prompt": "Hi", "max_tokens": 2})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
    assert chat(server, key, model="smollm2").status_code == 200
    pid = project_id(server, "money-h")
    ok = chat(server, key, model="smollm2")
    assert ok.status_code == 200
    wrong = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       headers={**headers, "x-project-id": project_id(server, "money-a")},
                       json={"model": "smollm2", "messages": MSG, "max_tokens": 1})
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "project_mismatch"
    right = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       headers={**headers, "x-project-id": pid},
                       json={"model": "smollm2", "messages": MSG, "max_tokens": 1})
    assert right.status_code == 200


def test_failed_and_abandoned_requests_cost_nothing(server: Server) -> None:
    key = new_project(server, "money-i", credit=100_000)
    before = balance(server, "money-i")
    resp = chat(server, key, messages=[{"role": "user", "content": "word " * 5000}],
                max_tokens=10)
    assert resp.status_code == 400  # context exceeded on the worker: failed
    row = wait_usage(server, [resp.headers["x-request-id"]])
    assert row[resp.headers["x-request-id"]][0] == "failed"
    assert row[resp.headers["x-request-id"]][3] == 0
    assert balance(server, "money-i") == before


def test_abandoned_request_is_recorded_and_not_charged(server: Server) -> None:
    model = "test/running-timeout"  # request_timeout_s = 1.5, min_replicas = 1
    key = new_project(server, "money-j", credit=100_000)
    before = balance(server, "money-j")
    resp = chat(server, key, model=model, max_tokens=300)
    assert resp.status_code == 504
    rid = resp.headers["x-request-id"]
    # settled by the request's owner when it answered 504, not when the worker ends
    row = wait_usage(server, [rid], timeout=10)[rid]
    status, _tin, _tout, cost = row
    assert status == "abandoned" and cost == 0
    assert balance(server, "money-j") == before


def test_error_responses_carry_rate_limit_headers(server: Server) -> None:
    key = new_project(server, "money-k", credit=100_000)
    resp = chat(server, key, temperature=5)
    assert resp.status_code == 400
    assert resp.headers["x-ratelimit-tier"] == "default"
    assert resp.headers["x-ratelimit-limit"] == "1000"
    assert "x-ratelimit-remaining" in resp.headers and "x-ratelimit-reset" in resp.headers
    assert resp.headers["x-model-used"] == PRICED
