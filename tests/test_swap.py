"""Model swapping with real workers: two models that cannot both fit under the
configured memory budget are called alternately, and both answer."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import SMOL_FILE, Server, launch_server, stop_server

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
