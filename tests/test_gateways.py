"""Three gateway processes on one PostgreSQL and one Redis, requests spread
round-robin over them, with the real SmolLM2 model (one llama-server, owned
by one of them) and the tiny image pipeline:

- 200 concurrent requests against a balance that covers about 50: no
  overdraft, balance == top-ups - sum of usage exactly, one usage row per
  answer, no hold left;
- a plan of 60 requests per minute per key: at most 60 (+3, one per gateway)
  admitted across the three;
- a key revoked with the CLI is refused by all three within 1 s;
- kill -9 of one gateway under load: every answer a client received has
  exactly one usage row, nothing is charged twice, and the image jobs it had
  accepted finish exactly once on another gateway;
- Redis stopped: 503 ``limits_unavailable`` within 1 s, nothing charged
  twice, and service back when Redis returns.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from modelfleet.catalog import DEFAULT_CATALOG
from modelfleet.workers.tinydiffusion import build_tiny_pipeline
from tests.conftest import SMOL_FILE, Server, launch_server
from tests.services import PostgresServer, RedisServer
from tests.test_fleet_owner import launch_peer, stop_gateway

pytestmark = [pytest.mark.workers, pytest.mark.timeout(600)]

MODEL = "test/shared-priced"
TINY = "modelfleet/tiny-random-sd"
CATALOG = DEFAULT_CATALOG.read_text() + f"""
[[models]]
id = "{MODEL}"
kind = "chat"
[models.engine]
type = "llama.cpp"
model_file = "{SMOL_FILE}"
threads = 1
[models.limits]
max_messages = 4
max_output_tokens = 64
context_length = 512
[models.defaults]
max_tokens = 16
[models.scaling]
min_replicas = 1
concurrency = 8
request_timeout_s = 120.0
[models.prices]
input_per_million = 1_000_000
output_per_million = 10_000_000
"""


@dataclass
class Fleet3:
    gateways: list[Server]
    pg: PostgresServer
    database: str
    redis_server: RedisServer
    redis_url: str
    env: dict[str, str]
    tmp: Path

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "modelfleet", *args, "--data-dir",
             str(self.gateways[0].data_dir)],
            check=True, capture_output=True, text=True, timeout=60,
            env={**os.environ, **self.env})
        return out.stdout.strip()

    def sql(self, query: str) -> list[list[str]]:
        out = self.pg.psql(query, database=self.database).stdout
        return [line.split("\t") for line in out.splitlines() if line]

    def scalar(self, query: str) -> int:
        rows = self.sql(query)
        return int(rows[0][0] or 0) if rows and rows[0][0] else 0

    def project_id(self, name: str) -> str:
        return self.sql(f"SELECT id FROM projects WHERE name = '{name}'")[0][0]

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, decode_responses=True)

    def holds(self) -> tuple[int, int]:
        """(sum held, holds) across every project, in Redis."""
        client = self.redis()
        try:
            held = sum(int(v) for v in client.hvals("{mf}:held"))
            return held, int(client.hlen("{mf}:holds"))
        finally:
            client.close()


@pytest.fixture(scope="module")
def fleet3(tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer,
           redis_server: RedisServer) -> Iterator[Fleet3]:
    tmp = tmp_path_factory.mktemp("gateways")
    redis_server.resume()
    database_url = postgres.create_database()
    env = {"MODELFLEET_DATABASE_URL": database_url,
           "MODELFLEET_REDIS_URL": redis_server.fresh_url(),
           "MODELFLEET_JOBS_CLAIM_INTERVAL_S": "0.5"}
    build_tiny_pipeline(tmp / "data" / "models" / "modelfleet-tiny-random-sd")
    started: list[Server] = []
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():  # what launch_server's CLI calls and the peers inherit
            patch.setenv(name, value)
        try:
            started.append(launch_server(tmp, CATALOG))
            started.append(launch_peer(started[0], tmp, "second"))
            started.append(launch_peer(started[0], tmp, "third"))
            yield Fleet3(started, postgres, database_url.rsplit("/", 1)[1], redis_server,
                         env["MODELFLEET_REDIS_URL"], env, tmp)
        finally:
            for server in started:
                stop_gateway(server.proc)
            redis_server.resume()


def chat(url: str, key: str, *, max_tokens: int = 4, timeout: float = 120) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=timeout,
                      json={"model": MODEL, "max_tokens": max_tokens,
                            "messages": [{"role": "user", "content": "Say hi"}]},
                      headers={"Authorization": f"Bearer {key}"})


def round_robin(gateways: list[Server], count: int, call: Callable[[str], httpx.Response],
                workers: int) -> list[httpx.Response | Exception]:
    def one(i: int) -> httpx.Response | Exception:
        try:
            return call(gateways[i % len(gateways)].url)
        except httpx.HTTPError as exc:
            return exc

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(count)))


def new_key(fleet: Fleet3, project: str, *extra: str) -> str:
    return fleet.cli("keys", "create", "--project", project, *extra).splitlines()[-1].strip()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def balance_api(fleet: Fleet3, project_id: str) -> dict[str, Any]:
    admin = fleet.gateways[0]
    reply = httpx.get(f"{admin.url}/v1/projects/{project_id}/balance", timeout=10,
                      headers={"Authorization": f"Bearer {admin.admin_key}"})
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


def test_200_concurrent_requests_against_a_balance_for_about_50(fleet3: Fleet3) -> None:
    key = new_key(fleet3, "money3")
    pid = fleet3.project_id("money3")
    fleet3.cli("credits", "topup", "--project", "money3", "--amount", "2000")
    first = chat(fleet3.gateways[1].url, key)
    assert first.status_code == 200, first.text
    wait_for(lambda: fleet3.scalar(
        f"SELECT COUNT(*) FROM usage WHERE project_id = '{pid}'") == 1, 10, "the first usage row")
    one = fleet3.scalar(f"SELECT cost FROM usage WHERE project_id = '{pid}'")
    assert one > 0
    fleet3.cli("credits", "topup", "--project", "money3", "--amount", str(50 * one))
    topups = 2000 + 50 * one

    replies = round_robin(fleet3.gateways, 200, lambda url: chat(url, key), workers=200)
    statuses = [r.status_code for r in replies if isinstance(r, httpx.Response)]
    assert len(statuses) == 200, [r for r in replies if not isinstance(r, httpx.Response)]
    ok = statuses.count(200)
    assert set(statuses) <= {200, 403}, statuses
    assert all(r.json()["error"]["code"] == "insufficient_credits"
               for r in replies if isinstance(r, httpx.Response) and r.status_code == 403)
    assert 10 <= ok <= 51 + 2000 // one, (ok, one)

    # Every answer is billed before the client got it: no waiting for a writer.
    rows = fleet3.scalar(f"SELECT COUNT(*) FROM usage WHERE project_id = '{pid}'")
    assert rows == ok + 1
    charged = fleet3.scalar(f"SELECT SUM(cost) FROM usage WHERE project_id = '{pid}'")
    debits = fleet3.scalar(
        f"SELECT -SUM(amount) FROM ledger WHERE project_id = '{pid}' AND kind = 'usage'")
    balance = fleet3.scalar(f"SELECT SUM(amount) FROM ledger WHERE project_id = '{pid}'")
    assert debits == charged
    assert balance == topups - charged
    assert balance >= 0
    wait_for(lambda: balance_api(fleet3, pid)["held"] == 0, 5, "holds to clear")
    money = balance_api(fleet3, pid)
    assert money["balance"] == balance
    assert fleet3.holds() == (0, 0)
    # a request id is charged once
    assert fleet3.scalar(f"SELECT COUNT(DISTINCT request_id) FROM usage "
                         f"WHERE project_id = '{pid}'") == rows


def test_60_requests_per_minute_across_three_gateways(fleet3: Fleet3) -> None:
    fleet3.cli("plans", "set", "rpm60", "--key-rpm", "60")
    key = new_key(fleet3, "rpm3")
    fleet3.cli("projects", "set", "--project", "rpm3", "--plan", "rpm60")
    fleet3.cli("credits", "topup", "--project", "rpm3", "--amount", "10000000")
    time.sleep(1.0)  # every gateway has seen the plan change (the fan-out)
    admitted: list[float] = []
    refused = 0
    started = time.monotonic()
    end = started + 12.0

    def hammer(i: int) -> None:
        nonlocal refused
        url = fleet3.gateways[i % 3].url
        while time.monotonic() < end:
            reply = chat(url, key, max_tokens=1)
            if reply.status_code == 429:
                assert reply.json()["error"]["code"] == "rate_limit_requests_per_minute_per_key"
                refused += 1
                time.sleep(0.02)
            else:
                assert reply.status_code == 200, reply.text
                admitted.append(time.monotonic() - started)

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(hammer, range(12)))
    assert refused > 0
    assert len(admitted) <= 60 + 3, len(admitted)
    assert len(admitted) >= 50, len(admitted)  # the limit is given, not starved


def test_cli_revoke_is_refused_by_every_gateway_within_a_second(fleet3: Fleet3) -> None:
    key = new_key(fleet3, "revoke3")
    key_id = fleet3.sql("SELECT id FROM api_keys ORDER BY created_at DESC LIMIT 1")[0][0]
    headers = {"Authorization": f"Bearer {key}"}
    for gw in fleet3.gateways:  # every gateway has the key cached as valid
        assert httpx.get(gw.url + "/v1/models", headers=headers).status_code == 200
    fleet3.cli("keys", "revoke", key_id)
    revoked_at = time.monotonic()
    seen: dict[str, float] = {}
    while len(seen) < 3 and time.monotonic() - revoked_at < 5:
        for gw in fleet3.gateways:
            if gw.url not in seen and httpx.get(gw.url + "/v1/models",
                                                headers=headers).status_code == 401:
                seen[gw.url] = time.monotonic() - revoked_at
        time.sleep(0.02)
    assert len(seen) == 3, seen
    assert max(seen.values()) < 1.0, seen


def test_kill_9_of_a_gateway_under_load(fleet3: Fleet3) -> None:
    key = new_key(fleet3, "kill3")
    pid = fleet3.project_id("kill3")
    fleet3.cli("credits", "topup", "--project", "kill3", "--amount", "100000000")
    victim = fleet3.gateways[2]  # a follower: the fleet's replicas stay up
    jobs = []
    for _ in range(4):
        reply = httpx.post(victim.url + "/v1/inference/image", timeout=30,
                           headers={"Authorization": f"Bearer {key}"},
                           json={"model": TINY, "prompt": "a fox", "n": 2, "steps": 2})
        assert reply.status_code == 202, reply.text
        jobs.append(reply.json()["job_id"])
    delivered: list[str] = []
    stop = time.monotonic() + 6.0

    def load(i: int) -> None:
        url = fleet3.gateways[i % 3].url
        while time.monotonic() < stop:
            try:
                reply = chat(url, key, max_tokens=8, timeout=60)
            except httpx.HTTPError:
                continue  # the victim died under this request
            if reply.status_code == 200:
                delivered.append(reply.json()["id"].removeprefix("chatcmpl-"))

    with ThreadPoolExecutor(9) as pool:
        running = [pool.submit(load, i) for i in range(9)]
        time.sleep(2.5)
        os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait()
        for future in running:
            future.result()
    assert delivered
    ids = ",".join(f"'{rid}'" for rid in delivered)
    rows = fleet3.sql(f"SELECT request_id, COUNT(*) FROM usage WHERE request_id IN ({ids}) "
                      "GROUP BY request_id")
    counts = {rid: int(n) for rid, n in rows}
    assert set(counts) == set(delivered), set(delivered) - set(counts)
    assert set(counts.values()) == {1}

    # the victim's accepted jobs finish exactly once elsewhere
    survivor = fleet3.gateways[0]

    def finished() -> bool:
        for job_id in jobs:
            job = httpx.get(f"{survivor.url}/v1/inference/jobs/{job_id}", timeout=10,
                            headers={"Authorization": f"Bearer {key}"}).json()
            if job["status"] not in ("succeeded", "failed"):
                return False
        return True

    wait_for(finished, 120, "the dead gateway's jobs")
    for job_id in jobs:
        job = httpx.get(f"{survivor.url}/v1/inference/jobs/{job_id}", timeout=10,
                        headers={"Authorization": f"Bearer {key}"}).json()
        assert job["status"] == "succeeded", job
        usage = fleet3.sql(f"SELECT images, cost FROM usage WHERE request_id = '{job_id}'")
        assert len(usage) == 1, usage
        assert int(usage[0][0]) == 2
        debits = fleet3.scalar(f"SELECT COUNT(*) FROM ledger WHERE request_id = '{job_id}'")
        assert debits == 1
    # the dead gateway's holds are swept within seconds; balance exact
    wait_for(lambda: balance_api(fleet3, pid)["held"] == 0, 30, "the dead gateway's holds")
    charged = fleet3.scalar(f"SELECT SUM(cost) FROM usage WHERE project_id = '{pid}'")
    assert balance_api(fleet3, pid)["balance"] == 100000000 - charged
    assert fleet3.scalar(f"SELECT SUM(amount) FROM ledger WHERE project_id = '{pid}'") \
        == 100000000 - charged


def test_redis_stopped_fails_closed_fast_and_recovers(fleet3: Fleet3) -> None:
    alive = [gw for gw in fleet3.gateways if gw.proc.poll() is None]
    key = new_key(fleet3, "redis3")
    pid = fleet3.project_id("redis3")
    fleet3.cli("credits", "topup", "--project", "redis3", "--amount", "10000000")
    time.sleep(0.5)
    assert chat(alive[0].url, key).status_code == 200
    before = fleet3.scalar(f"SELECT COUNT(*) FROM usage WHERE project_id = '{pid}'")
    fleet3.redis_server.stop()
    try:
        for gw in alive:
            started = time.monotonic()
            reply = chat(gw.url, key, timeout=10)
            took = time.monotonic() - started
            assert reply.status_code == 503, reply.text
            assert reply.json()["error"]["code"] == "limits_unavailable"
            assert took < 1.0, took
    finally:
        fleet3.redis_server.resume()

    def serving() -> bool:
        return all(chat(gw.url, key).status_code == 200 for gw in alive)

    wait_for(serving, 15, "service to come back")
    rows = fleet3.scalar(f"SELECT COUNT(*) FROM usage WHERE project_id = '{pid}'")
    assert fleet3.scalar(f"SELECT COUNT(DISTINCT request_id) FROM usage "
                         f"WHERE project_id = '{pid}'") == rows
    assert rows >= before + len(alive)
    charged = fleet3.scalar(f"SELECT SUM(cost) FROM usage WHERE project_id = '{pid}'")
    wait_for(lambda: balance_api(fleet3, pid)["held"] == 0, 10, "holds to clear")
    assert balance_api(fleet3, pid)["balance"] == 10000000 - charged
