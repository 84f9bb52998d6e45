"""Model swapping with real workers: two models that cannot both fit under the
configured memory budget are called alternately, and both answer."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import orjson
import pytest

from modelfleet.batches import TERMINAL, line_request_id
from tests.conftest import SMOL_FILE, Server, launch_server, stop_server
from tests.test_money import sql, wait_usage

pytestmark = pytest.mark.workers

TWO_MODELS = "".join(f"""
[[models]]
id = "swap/{name}"
kind = "chat"
[models.engine]
type = "llama.cpp"
model_file = "{SMOL_FILE}"
threads = 1
memory_mib = 500
[models.scaling]
concurrency = 2
idle_timeout_s = 600.0
""" for name in ("a", "b"))


@pytest.fixture(scope="module")
def small_machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("swap")
    # room for one 500 MiB replica, not two
    server = launch_server(tmp, TWO_MODELS, env={"MODELFLEET_FLEET_MEMORY_MIB": "800"})
    try:
        yield server
    finally:
        stop_server(server.proc)


def test_two_models_that_do_not_fit_together_both_answer(small_machine: Server) -> None:
    s = small_machine
    headers = {"Authorization": f"Bearer {s.key}"}
    admin = {"Authorization": f"Bearer {s.admin_key}"}
    for model in ("swap/a", "swap/b", "swap/a", "swap/b"):
        resp = httpx.post(s.url + "/v1/chat/completions", headers=headers, timeout=120,
                          json={"model": model, "max_tokens": 3,
                                "messages": [{"role": "user", "content": "Hi"}]})
        assert resp.status_code == 200, resp.text
        live = httpx.get(s.url + "/v1/admin/replicas", headers=admin).json()["replicas"]
        assert [r["model"] for r in live] == [model]  # never both at once
    events = httpx.get(s.url + "/v1/admin/replicas", headers=admin).json()["scale_events"]
    swaps = [e for e in events if e["reason"].startswith("swapped out for")]
    assert len(swaps) == 3
    assert {e["reason"] for e in swaps} == {"swapped out for swap/a", "swapped out for swap/b"}
    listed = httpx.get(s.url + "/v1/admin/scale-events?model=swap/a", headers=admin).json()
    assert listed["data"] and all(e["model"] == "swap/a" for e in listed["data"])
    assert {"at", "model", "from_replicas", "to_replicas", "reason"} <= set(listed["data"][0])


def test_batch_lines_never_hold_a_replica_an_interactive_request_waits_for(
        small_machine: Server) -> None:
    """swap/a runs a batch; a chat request to swap/b needs its room: swap/a is
    swapped out at once (its running lines preempted, not charged), swap/b
    answers, then the batch finishes with every line answered and charged once."""
    s = small_machine
    api = openai.OpenAI(base_url=s.url + "/v1", api_key=s.key, max_retries=0, timeout=120)
    admin = {"Authorization": f"Bearer {s.admin_key}"}
    count = 10
    content = b"\n".join(orjson.dumps({
        "custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "swap/a", "max_tokens": 48, "metadata": {"ignore_eos": True},
                 "messages": [{"role": "user", "content": f"Count to {i}"}]}})
        for i in range(count))
    uploaded = api.files.create(file=("b.jsonl", content), purpose="batch")
    batch = api.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                               completion_window="24h")
    deadline = time.monotonic() + 120
    while api.batches.retrieve(batch.id).request_counts.completed < 1:  # swap/a is busy
        assert time.monotonic() < deadline
        time.sleep(0.1)
    answer = httpx.post(s.url + "/v1/chat/completions", timeout=120,
                        headers={"Authorization": f"Bearer {s.key}"},
                        json={"model": "swap/b", "max_tokens": 3,
                              "messages": [{"role": "user", "content": "Hi"}]})
    assert answer.status_code == 200, answer.text
    events = httpx.get(s.url + "/v1/admin/scale-events?model=swap/a", headers=admin).json()
    assert any(e["reason"].startswith("swapped out for swap/b") for e in events["data"])
    while (done := api.batches.retrieve(batch.id)).status not in TERMINAL:
        assert time.monotonic() < deadline + 120, done
        time.sleep(0.2)
    assert done.status == "completed", done
    assert (done.request_counts.completed, done.request_counts.failed) == (count, 0)
    assert done.usage is not None and done.usage.output_tokens == 48 * count
    ids = [line_request_id(batch.id, i) for i in range(count)]
    rows = wait_usage(s, ids)
    assert len(rows) == count and {r[0] for r in rows.values()} == {"succeeded"}
    assert sql(s, "SELECT COUNT(*) FROM usage WHERE request_id IN "
               f"({','.join('?' * count)})", *ids) == [(count,)]
