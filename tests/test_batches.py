"""The Batch API against the real server and model, through the official
``openai`` SDK: a batch completes at the discount with every line answered
once, malformed files are refused naming the line, cancel keeps finished
lines, other projects get 404, and a batch survives a kill -9 of the API
without charging any line twice."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from modelfleet.api.app import create_app
from modelfleet.batches import BATCH_PRIORITY, Terms, line_request_id
from modelfleet.catalog import Prices, load_catalog
from modelfleet.fairqueue import FairQueue
from modelfleet.ledger import cost_of
from modelfleet.projects import PlanLimits
from modelfleet.services import Services
from modelfleet.settings import BatchSettings, Settings
from tests import test_openai_schema
from tests.conftest import Server, _cli, catalog_text, launch_server, stop_server
from tests.test_money import new_project, sql, wait_usage

validator = test_openai_schema.validator  # the fixture: bodies checked against the spec

pytestmark = pytest.mark.workers
PRICED = "test/priced"  # 1 micro-unit per input token, 10 per output token
DISCOUNTED = (500_000, 5_000_000)  # at the default 50% batch discount
TERMINAL = ("completed", "failed", "expired", "cancelled")


def client(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def lines(count: int, *, max_tokens: int = 4, prefix: str = "req") -> bytes:
    out = []
    for i in range(count):
        out.append(orjson.dumps({
            "custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": PRICED, "max_tokens": max_tokens,
                     "messages": [{"role": "user", "content": f"Say a number: {i}"}],
                     "metadata": {"ignore_eos": True}}}))
    return b"\n".join(out) + b"\n"


def submit(api: openai.OpenAI, content: bytes) -> Any:
    uploaded = api.files.create(file=("batch.jsonl", content), purpose="batch")
    return api.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                              completion_window="24h", metadata={"run": "test"})


def wait_for(api: openai.OpenAI, batch_id: str, until: Any, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = api.batches.retrieve(batch_id)
        if until(batch):
            return batch
        assert time.monotonic() < deadline, f"batch stayed {batch.status}: {batch}"
        time.sleep(0.2)


def outputs(api: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [orjson.loads(line) for line in api.files.content(file_id).read().splitlines()]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("batches")
    running = launch_server(tmp, catalog_text(tmp, warm=False))
    try:
        yield running
    finally:
        stop_server(running.proc)


def test_batch_completes_at_the_discount(server: Server, validator: Any) -> None:
    key = new_project(server, "batch-a", credit=10_000_000)
    api = client(server, key)
    count = 200
    batch = submit(api, lines(count))
    assert batch.status == "validating" and batch.request_counts.total == count
    assert batch.metadata == {"run": "test"}
    done = wait_for(api, batch.id, lambda b: b.status in TERMINAL)
    assert done.status == "completed", done
    assert (done.request_counts.completed, done.request_counts.failed) == (count, 0)
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert done.error_file_id is None
    raw = httpx.get(f"{server.url}/v1/batches/{batch.id}",
                    headers={"Authorization": f"Bearer {key}"}).json()
    validator("Batch", raw)
    auth = {"Authorization": f"Bearer {key}"}
    validator("OpenAIFile", httpx.get(f"{server.url}/v1/files/{done.output_file_id}",
                                      headers=auth).json())
    validator("ListFilesResponse", httpx.get(f"{server.url}/v1/files", headers=auth).json())
    validator("ListBatchesResponse", httpx.get(f"{server.url}/v1/batches", headers=auth).json())
    results = outputs(api, done.output_file_id)
    assert [r["custom_id"] for r in results] == [f"req-{i}" for i in range(count)]  # input order
    ids = [line_request_id(batch.id, i) for i in range(count)]
    for r in results:
        assert r["error"] is None and r["response"]["status_code"] == 200
        assert r["response"]["body"]["object"] == "chat.completion"
        assert r["response"]["request_id"] == ids[int(r["custom_id"].split("-")[1])]
    usage = wait_usage(server, ids)
    assert len(usage) == count
    assert done.usage is not None
    assert done.usage.input_tokens == sum(u[1] for u in usage.values())
    assert done.usage.output_tokens == 4 * count
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
    for status, tokens_in, tokens_out, cost in usage.values():
        assert status == "succeeded" and tokens_out == 4
        assert cost == cost_of(tokens_in, tokens_out, DISCOUNTED)
        assert cost < cost_of(tokens_in, tokens_out, (1_000_000, 10_000_000))
    listed = api.batches.list(limit=5)
    assert listed.data[0].id == batch.id
    assert api.files.retrieve(done.output_file_id).purpose == "batch_output"


def test_malformed_lines_are_named(server: Server) -> None:
    api = client(server, server.key)
    good = lines(3).splitlines()
    cases = {
        "line 3": [good[0], good[1], b"{not json"],
        "line 2": [good[0], good[0]],  # the same custom_id twice
        "line 1": [b'{"custom_id": "a", "method": "GET", "url": "/v1/chat/completions",'
                   b' "body": {"model": "m"}}'],
    }
    for param, content in cases.items():
        with pytest.raises(openai.BadRequestError) as caught:
            api.files.create(file=("bad.jsonl", b"\n".join(content) + b"\n"), purpose="batch")
        error = caught.value.response.json()["error"]
        assert error["param"] == param, error
        assert error["message"].startswith(param + ":")
    uploaded = api.files.create(file=("ok.jsonl", lines(2)), purpose="batch")
    with pytest.raises(openai.BadRequestError) as caught:
        api.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings",
                           completion_window="24h")
    assert caught.value.response.json()["error"]["code"] == "mismatched_endpoint"


def test_a_line_the_model_refuses_is_an_error_line(server: Server) -> None:
    api = client(server, server.key)
    bad = orjson.dumps({"custom_id": "too-many", "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": {"model": PRICED, "max_tokens": 100_000,
                                 "messages": [{"role": "user", "content": "Hi"}]}})
    batch = submit(api, lines(2) + bad + b"\n")
    done = wait_for(api, batch.id, lambda b: b.status in TERMINAL)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)
    [error] = outputs(api, done.error_file_id)
    assert error["custom_id"] == "too-many"
    assert error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["param"] == "max_tokens"


def test_cancel_keeps_finished_lines(server: Server) -> None:
    key = new_project(server, "batch-cancel", credit=10_000_000)
    api = client(server, key)
    batch = submit(api, lines(40, max_tokens=24))
    wait_for(api, batch.id, lambda b: b.request_counts.completed >= 2)
    cancelling = api.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_for(api, batch.id, lambda b: b.status in TERMINAL)
    assert done.status == "cancelled" and done.cancelled_at
    finished = done.request_counts.completed
    assert 2 <= finished < 40 and done.request_counts.failed == 0
    results = outputs(api, done.output_file_id)
    assert len(results) == finished
    time.sleep(1.0)  # a line cut off by the cancel would have written its row by now
    rows = sql(server, "SELECT COUNT(*) FROM usage u JOIN projects p ON p.id = u.project_id "
               "WHERE p.name = ?", "batch-cancel")
    assert rows[0][0] == finished
    assert api.batches.cancel(batch.id).status == "cancelled"  # again: as it is
    with pytest.raises(openai.ConflictError):  # a completed batch is not cancelled
        api.batches.cancel(submit_and_finish(api).id)


def submit_and_finish(api: openai.OpenAI) -> Any:
    batch = submit(api, lines(1))
    return wait_for(api, batch.id, lambda b: b.status in TERMINAL)


def test_other_projects_get_404(server: Server) -> None:
    api = client(server, server.key)
    done = submit_and_finish(api)
    other = client(server, _cli("keys", "create", "--project", "batch-other", "--scope",
                                "inference", data_dir=server.data_dir))
    for call in (lambda: other.batches.retrieve(done.id),
                 lambda: other.batches.cancel(done.id),
                 lambda: other.files.retrieve(done.input_file_id),
                 lambda: other.files.content(done.output_file_id),
                 lambda: other.files.delete(done.output_file_id)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.NotFoundError):
        other.batches.create(input_file_id=done.input_file_id, endpoint="/v1/chat/completions",
                             completion_window="24h")
    assert other.batches.list().data == []
    assert other.files.list().data == []
    # the owner deletes its own output file
    assert api.files.delete(done.output_file_id).deleted
    with pytest.raises(openai.NotFoundError):
        api.files.content(done.output_file_id)


def test_batch_survives_kill_9(tmp_path: Path) -> None:
    first = launch_server(tmp_path, catalog_text(tmp_path, warm=False))
    restarted: Server | None = None
    try:
        key = new_project(first, "batch-kill", credit=10_000_000)
        api = client(first, key)
        batch = submit(api, lines(40, max_tokens=12))
        before = wait_for(api, batch.id, lambda b: b.request_counts.completed >= 6)
        os.killpg(first.proc.pid, signal.SIGKILL)  # mid-batch: lines in flight are cut off
        first.proc.wait()
        restarted = launch_server(tmp_path, catalog_text(tmp_path, warm=False), key=first.key)
        api = client(restarted, key)
        done = wait_for(api, batch.id, lambda b: b.status in TERMINAL)
        assert done.status == "completed", done
        assert before.request_counts.completed < 40
        assert "batches resumed" in restarted.log_text()
        assert (done.request_counts.completed, done.request_counts.failed) == (40, 0)
        results = outputs(api, done.output_file_id)
        assert sorted(r["custom_id"] for r in results) == sorted(f"req-{i}" for i in range(40))
        ids = [line_request_id(batch.id, i) for i in range(40)]
        usage = wait_usage(restarted, ids)
        assert len(usage) == 40
        project = "SELECT id FROM projects WHERE name = 'batch-kill'"
        charged = sql(restarted, f"SELECT COUNT(*), COALESCE(SUM(-amount), 0) FROM ledger "
                      f"WHERE kind = 'usage' AND project_id = ({project})")[0]
        recorded = sql(restarted, f"SELECT COUNT(*), SUM(cost) FROM usage "
                       f"WHERE project_id = ({project})")[0]
        assert charged == (40, recorded[1]) and recorded[0] == 40
    finally:
        for running in (first, restarted):
            if running is not None and running.proc.poll() is None:
                stop_server(running.proc)


def test_interactive_requests_overtake_batch_lines() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(3):
        queue.push(f"line-{i}", project="a", priority=BATCH_PRIORITY)
    queue.push("chat", project="b", priority=-1000)  # even a plan far below the default
    assert [queue.pop() for _ in range(4)] == ["chat", "line-0", "line-1", "line-2"]


@pytest.fixture
async def no_window(tmp_path: Path, database_url: str | None) -> AsyncIterator[
        tuple[httpx.AsyncClient, dict[str, str]]]:
    """The in-process app with a completion window of zero: every line expires."""
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(catalog_text(tmp_path, warm=False))
    settings = Settings(data_dir=tmp_path / "data", catalog_path=catalog,
                        database_url=database_url, bootstrap_default_key=False,
                        batches=BatchSettings(window_s=0.0))
    services = Services.build(settings)
    asgi = create_app(settings, services)
    await services.start()
    try:
        tenant = await services.keys.create("tenant", ["inference"])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi),
                                     base_url="http://test") as http:
            yield http, {"Authorization": f"Bearer {tenant.key}"}
    finally:
        await services.stop()


async def test_lines_past_the_window_expire(
        no_window: tuple[httpx.AsyncClient, dict[str, str]]) -> None:
    http, auth = no_window
    uploaded = await http.post("/v1/files", headers=auth, data={"purpose": "batch"},
                               files={"file": ("b.jsonl", lines(3))})
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json()["bytes"] == len(lines(3))
    created = await http.post("/v1/batches", headers=auth, json={
        "input_file_id": uploaded.json()["id"], "endpoint": "/v1/chat/completions",
        "completion_window": "24h"})
    assert created.status_code == 200, created.text
    for _ in range(200):
        batch = (await http.get(f"/v1/batches/{created.json()['id']}", headers=auth)).json()
        if batch["status"] == "expired":
            break
        await asyncio.sleep(0.05)
    assert batch["status"] == "expired" and batch["expired_at"], batch
    assert batch["request_counts"] == {"total": 3, "completed": 0, "failed": 3}
    assert "output_file_id" not in batch  # absent (the spec has it not nullable)
    content = await http.get(f"/v1/files/{batch['error_file_id']}/content", headers=auth)
    errors = [orjson.loads(line) for line in content.content.splitlines()]
    assert [e["custom_id"] for e in errors] == ["req-0", "req-1", "req-2"]
    assert all(e["response"] is None and e["error"]["code"] == "batch_expired" for e in errors)
    wrong = await http.post("/v1/files", headers=auth, data={"purpose": "fine-tune"},
                            files={"file": ("b.jsonl", lines(1))})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "purpose"


def test_a_plan_sets_its_batch_discount(server: Server) -> None:
    _cli("plans", "set", "bulk", "--batch-discount-pct", "80", data_dir=server.data_dir)
    key = new_project(server, "batch-bulk", credit=10_000_000, plan="bulk")
    api = client(server, key)
    batch = submit(api, lines(3))
    done = wait_for(api, batch.id, lambda b: b.status in TERMINAL)
    assert done.status == "completed", done
    usage = wait_usage(server, [line_request_id(batch.id, i) for i in range(3)])
    assert len(usage) == 3
    for _status, tokens_in, tokens_out, cost in usage.values():
        assert cost == cost_of(tokens_in, tokens_out, (200_000, 2_000_000))  # 80% off


def test_the_plan_then_the_model_then_the_server_set_the_discount() -> None:
    spec = next(iter(load_catalog()))
    terms = Terms(BATCH_PRIORITY, discount_pct=50)
    plain, bulk = PlanLimits(name="plain"), PlanLimits(name="bulk", batch_discount_pct=80)
    assert terms.discount_for(spec, plain) == 50
    cheap = spec.model_copy(update={"prices": Prices(batch_discount_pct=30)})
    assert terms.discount_for(cheap, plain) == 30
    assert terms.discount_for(cheap, bulk) == 80
    free = PlanLimits(name="free", batch_discount_pct=0)
    assert terms.discount_for(cheap, free) == 0  # 0 is a setting, not "unset"
