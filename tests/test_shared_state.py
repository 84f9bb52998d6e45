"""The admission stores (memory and Redis) under the same tests, and the
request path under a thread-switch stress: one owner per request leaves
nothing held and no counter taken.

The upstream here is a FAKE worker (an aiohttp server in the test's loop that
answers like llama-server in microseconds): the stress test is about the
gateway's accounting over 2,000 requests, which a real CPU model cannot
answer in bounded time on this machine.  The real model runs in
tests/test_gateways.py.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from modelfleet.admission import AdmissionStore, Ask, MemoryAdmission, Posted, StoreNotReady
from modelfleet.api.app import create_app
from modelfleet.errors import InsufficientCredits, RateLimited, ServiceUnavailable
from modelfleet.limits import RateLimiter
from modelfleet.projects import PlanLimits
from modelfleet.redisstore import RedisAdmission
from modelfleet.services import Services
from modelfleet.settings import Settings
from tests.conftest import free_port
from tests.services import RedisServer

# redis-py drops the socket of a connection the server closed (a restarted
# Redis) without closing it; Python reports that when it is collected.
pytestmark = [pytest.mark.filterwarnings("ignore::ResourceWarning"),
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]
PLAN = PlanLimits(name="t", key_rpm=5, key_tpm=1000, key_concurrency=2)


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[AdmissionStore]:
    made: AdmissionStore
    if request.param == "memory":
        made = MemoryAdmission()
    else:
        made = RedisAdmission(str(request.getfixturevalue("redis_url")))
    await made.start()
    await made.load({"p": 1000})
    try:
        yield made
    finally:
        await made.close()


def ask(rid: str, *, tokens: int = 10, amount: int = 100, plan: PlanLimits = PLAN,
        counted: bool = True) -> Ask:
    return Ask(rid, plan, "k", "p", tokens=tokens, amount=amount, counted=counted)


async def test_hold_settle_apply_moves_money_exactly(store: AdmissionStore) -> None:
    g = await store.admit(ask("r1", amount=600))
    assert await store.balance("p") == (1000, 600)
    with pytest.raises(InsufficientCredits):
        await store.admit(ask("r2", amount=500))  # 400 available
    await store.settle(g, used_tokens=4, cost=250)
    assert await store.balance("p") == (1000, 250)  # the cost is pending until committed
    await store.apply([Posted("e1", "p", -250, "r1")])
    assert await store.balance("p") == (750, 0)
    await store.apply([Posted("t1", "p", 500)])
    assert await store.balance("p") == (1250, 0)


async def test_concurrency_rpm_and_tokens_are_refused_with_headers(store: AdmissionStore) -> None:
    a = await store.admit(ask("a", amount=0))
    assert a.headers["x-ratelimit-limit-requests"] == "5"
    assert a.headers["x-ratelimit-remaining-requests"] == "4"
    assert a.headers["x-ratelimit-remaining-tokens"] == "990"
    b = await store.admit(ask("b", amount=0))
    with pytest.raises(RateLimited) as third:
        await store.admit(ask("c", amount=0))
    assert third.value.code == "rate_limit_concurrent_requests_per_key"
    await store.settle(a, used_tokens=10, cost=0)
    await store.settle(b, used_tokens=2, cost=0)  # 8 tokens come back
    c = await store.admit(ask("c", amount=0))
    assert c.headers["x-ratelimit-remaining-tokens"] in ("978", "979")
    await store.settle(c, used_tokens=10, cost=0)
    with pytest.raises(RateLimited) as never:
        await store.admit(ask("big", tokens=5000, amount=0))
    assert never.value.code == "rate_limit_tokens_per_minute_per_key"
    assert "Retry-After" not in never.value.headers  # it can never fit
    for rid in ("d", "e"):
        await store.settle(await store.admit(ask(rid, amount=0)), used_tokens=0, cost=0)
    with pytest.raises(RateLimited) as rpm:
        await store.admit(ask("f", amount=0))
    assert rpm.value.code == "rate_limit_requests_per_minute_per_key"
    assert int(rpm.value.headers["Retry-After"]) >= 1
    assert rpm.value.headers["X-RateLimit-Remaining"] == "0"
    peek = await store.peek(PLAN, "k", "p")
    assert peek["X-RateLimit-Remaining"] == "0"


def test_per_minute_limits_are_sliding_windows() -> None:
    """At most the limit in ANY 60 s window (a token bucket would let 60 through
    at once and 60 more as it refills within the same minute)."""
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0], wall=lambda: 1e9 + now[0])
    plan = PlanLimits(name="w", key_rpm=60, key_tpm=0)
    admitted: list[float] = []
    retry_after: list[int] = []
    while now[0] < 180.0:
        try:
            limiter.release(limiter.admit(plan, "k", "p", 1), 1)
            admitted.append(now[0])
        except RateLimited as exc:
            retry_after.append(int(exc.headers["Retry-After"]))
        now[0] += 0.25
    worst = max(sum(1 for t in admitted if start <= t < start + 60.0) for start in admitted)
    assert worst == 60
    assert len(admitted) == 180  # the limit is still given: 60 per minute over 3 minutes
    assert admitted[:60] == [0.25 * i for i in range(60)]
    assert admitted[60] == 60.0  # the first one left the window
    assert retry_after and max(retry_after) <= 60


def test_unused_tokens_return_to_the_window() -> None:
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    plan = PlanLimits(name="w", key_rpm=0, key_tpm=100)
    first = limiter.admit(plan, "k", "p", 80)
    with pytest.raises(RateLimited):
        limiter.admit(plan, "k", "p", 30)
    limiter.release(first, 10)  # 70 come back
    now[0] = 30.0
    second = limiter.admit(plan, "k", "p", 85)
    assert second.headers["x-ratelimit-remaining-tokens"] == "5"
    now[0] = 60.0  # the first admission (10 tokens) left the window
    limiter.release(second, 85)
    assert limiter.peek(plan, "k", "p")["x-ratelimit-remaining-tokens"] == "15"
    now[0] = 90.0
    assert limiter.peek(plan, "k", "p")["x-ratelimit-remaining-tokens"] == "100"


async def test_a_refused_admission_takes_nothing(store: AdmissionStore) -> None:
    with pytest.raises(InsufficientCredits):
        await store.admit(ask("r", amount=5000))
    assert await store.balance("p") == (1000, 0)
    peek = await store.peek(PLAN, "k", "p")  # the refusal used up no request, no token
    assert peek["x-ratelimit-remaining-requests"] == "5"
    assert peek["x-ratelimit-remaining-tokens"] == "1000"
    held = await store.admit(ask("job", amount=300, counted=False))  # a job's run: hold only
    assert held.headers == {}
    await store.settle(held, used_tokens=0, cost=0)
    assert await store.balance("p") == (1000, 0)


async def test_redis_applies_each_entry_once_and_reloads_after_a_restart(
        redis_server: RedisServer, redis_url: str) -> None:
    a, b = RedisAdmission(redis_url), RedisAdmission(redis_url)  # two gateways
    await a.start()
    await b.start()
    try:
        await a.load({"p": 1000})
        await b.load({"p": 999_999})  # already loaded: ignored
        g = await a.admit(ask("r1", amount=400))
        await a.settle(g, used_tokens=1, cost=100)
        entry = Posted("e1", "p", -100, "r1")
        await a.apply([entry])
        await b.apply([entry])  # the same committed entry, seen by another gateway
        assert await b.balance("p") == (900, 0)
        redis_server.restart()  # empty, like a crash without persistence
        with pytest.raises(StoreNotReady):
            await a.admit(ask("r2"))
        await a.load({"p": 900}, recent=["e1"])
        await a.apply([entry])  # committed before the restart: not applied twice
        assert await a.balance("p") == (900, 0)
    finally:
        await a.close()
        await b.close()


async def test_redis_down_fails_closed_fast_and_recovers(redis_server: RedisServer,
                                                         redis_url: str) -> None:
    store = RedisAdmission(redis_url)
    await store.start()
    try:
        await store.load({"p": 1000})
        redis_server.stop()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ServiceUnavailable) as down:
            await store.admit(ask("r"))
        assert down.value.code == "limits_unavailable" and down.value.status == 503
        assert loop.time() - started < 1.0
        redis_server.resume()
        with pytest.raises(StoreNotReady):
            await store.admit(ask("r"))
        await store.load({"p": 1000})
        await store.settle(await store.admit(ask("r")), used_tokens=0, cost=0)
    finally:
        redis_server.resume()
        await store.close()


async def test_holds_of_a_dead_gateway_are_swept(redis_url: str) -> None:
    dead, alive = RedisAdmission(redis_url), RedisAdmission(redis_url)
    await dead.start()
    await alive.start()
    await alive.load({"p": 1000})
    g1 = await dead.admit(ask("charged", amount=300))
    await dead.admit(ask("never", amount=200))
    await dead.settle(g1, used_tokens=1, cost=120)
    await dead.close()  # its heartbeat is gone, its holds stay
    try:
        assert await alive.balance("p") == (1000, 320)

        async def committed(ids: list[str]) -> dict[str, Posted]:
            assert sorted(ids) == ["charged", "never"]
            return {"charged": Posted("e", "p", -120, "charged")}

        assert await alive.sweep(committed) == 2
        assert await alive.balance("p") == (880, 0)
        assert await alive.totals() == (0, 0)
    finally:
        await alive.close()


async def test_a_job_taken_over_replaces_the_dead_gateways_hold(redis_url: str) -> None:
    """A job re-admitted under the same id by the gateway that took it over
    holds once, not twice (the dead one's hold is released in the same step)."""
    dead, alive = RedisAdmission(redis_url), RedisAdmission(redis_url)
    await dead.start()
    await alive.start()
    await alive.load({"p": 1000})
    await dead.admit(ask("job", amount=300, counted=False))
    await dead.close()
    try:
        again = await alive.admit(ask("job", amount=300, counted=False))
        assert await alive.balance("p") == (1000, 300)
        await alive.settle(again, used_tokens=0, cost=200)
        await alive.apply([Posted("e", "p", -200, "job")])
        assert await alive.balance("p") == (800, 0)
        assert await alive.totals() == (0, 0)
    finally:
        await alive.close()


# -- the request path under stress ------------------------------------------------


@pytest.fixture
async def fake_worker() -> AsyncIterator[str]:
    """A FAKE llama-server: answers every chat request at once with 3 tokens."""

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({
            "id": "x", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "hi there"}}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def fake_catalog(url: str) -> str:
    return f"""
[[models]]
id = "fake/chat"
kind = "chat"
[models.engine]
type = "external"
url = "{url}"
[models.scaling]
concurrency = 64
[models.prices]
input_per_million = 1_000_000
output_per_million = 10_000_000
"""


@pytest.fixture
def switchy() -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@pytest.mark.parametrize("mode", ["embedded", pytest.param("shared", marks=pytest.mark.postgresql)])
async def test_stress_leaves_no_hold_and_no_counter(mode: str, fake_worker: str, tmp_path: Path,
                                                     request: pytest.FixtureRequest,
                                                     switchy: None) -> None:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(fake_catalog(fake_worker))
    extra: dict[str, Any] = {}
    if mode == "shared":
        extra = {"database_url": request.getfixturevalue("pg_url"),
                 "redis_url": request.getfixturevalue("redis_url")}
    settings = Settings(data_dir=tmp_path / "data", catalog_path=catalog,
                        bootstrap_default_key=False, **extra)
    services = Services.build(settings)
    asgi = create_app(settings, services)
    await services.start()
    try:
        key = await services.keys.create("stress", ["inference"])
        await services.projects.set_plan(PlanLimits(name="wide", key_rpm=None, key_concurrency=50))
        await services.projects.update_project(key.project_id, plan="wide")
        await services.ledger.credit(key.project_id, 10**9, kind="topup", reason="t", actor="t")
        await services.watcher.check()
        transport = httpx.ASGITransport(app=asgi)
        body = {"model": "fake/chat", "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": 8}
        statuses: list[int] = []
        async with httpx.AsyncClient(transport=transport, base_url="http://t",
                                     headers={"Authorization": f"Bearer {key.key}"}) as client:
            for _ in range(10):  # 2,000 requests, 200 at a time
                replies = await asyncio.gather(*[client.post("/v1/chat/completions", json=body)
                                                 for _ in range(200)])
                statuses += [r.status_code for r in replies]
        assert statuses.count(200) + statuses.count(429) == 2000
        assert statuses.count(200) >= 500  # the rest hit the key's concurrency cap (429)
        await services.ledger.drain()
        store = services.ledger.store
        balance, held = await store.balance(key.project_id)
        assert held == 0
        if isinstance(store, MemoryAdmission):
            assert store.active() == 0 and store.total_held() == 0
        else:
            assert isinstance(store, RedisAdmission)
            assert await store.totals() == (0, 0)
            assert await store.running(key.key_id) == 0
        async with services.db.session() as session:
            from sqlalchemy import func, select

            from modelfleet.tables import UsageRecord
            rows, charged = (await session.execute(
                select(func.count(), func.sum(UsageRecord.cost))
                .where(UsageRecord.project_id == key.project_id))).one()
        assert rows == statuses.count(200)
        assert balance == 10**9 - int(charged)
        assert int(charged) == rows * 37  # 7 in at 1/token, 3 out at 10/token
    finally:
        await services.stop()
