"""The shared admission store: rate limits, concurrency and holds in Redis, for
several gateway processes (``MODELFLEET_REDIS_URL``).

Every call is one Lua script, so it is atomic across gateways:

    admit   concurrency + every window + the hold, checked, then all taken
    settle  concurrency freed, unused tokens returned, hold → pending cost
    apply   committed ledger entries into balances, each once (a marker per
            entry id); a usage debit releases its request's pending cost

Keys (all in one hash slot, ``{mf}``):

    {mf}:ready           balances were loaded from the database
    {mf}:bal  {mf}:held  project → micro-units (hashes)
    {mf}:holds           request id → "project amount gateway"
    {mf}:w:<scope>:<kind>:<cap>   a per-minute window: request id -> ms taken
    {mf}:w:<scope>:t:<cap>:a      ... and for tokens, request id -> tokens, "_s" sum
    {mf}:c:<scope>       running requests (sorted set, score = expiry ms)
    {mf}:ap:<entry id>   an applied ledger entry (kept 7 days)
    {mf}:gw:<gateway>    a live gateway's heartbeat

A gateway that dies leaves holds behind: every gateway sweeps the holds of
gateways whose heartbeat is gone, applying the debit if the usage row was
committed and releasing the rest.  Its concurrency entries expire on their
own.  If Redis cannot be reached within ``timeout_s``, admission fails closed
(503 ``limits_unavailable``); the client reconnects by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from modelfleet.admission import Ask, Grant, Posted, StoreNotReady, refuse_credit
from modelfleet.errors import ServiceUnavailable
from modelfleet.limits import Level, limit_headers, plan_limits, refusal
from modelfleet.projects import PlanLimits

log = logging.getLogger(__name__)

P = "{mf}:"
READY, BAL, HELD, HOLDS = P + "ready", P + "bal", P + "held", P + "holds"
CHANGES = P + "changes"
HEARTBEAT_S = 2.0
GATEWAY_TTL_S = 15.0

# A per-minute window is a sorted set of request ids scored by the time they
# were taken (ms) and, for tokens, a hash of request id -> tokens with their
# sum in field "_s".  trim() drops what left the window; it returns the total.
_WINDOW = """
local function trim(zk, hk, kind, now)
  local edge = now - 60000
  if kind == 'r' then
    redis.call('ZREMRANGEBYSCORE', zk, '-inf', edge)
    return redis.call('ZCARD', zk)
  end
  local old = redis.call('ZRANGEBYSCORE', zk, '-inf', edge)
  if #old > 0 then
    local freed = 0
    for _, m in ipairs(old) do
      freed = freed + tonumber(redis.call('HGET', hk, m) or '0')
      redis.call('HDEL', hk, m)
    end
    redis.call('HINCRBY', hk, '_s', -freed)
    redis.call('ZREMRANGEBYSCORE', zk, '-inf', edge)
  end
  return tonumber(redis.call('HGET', hk, '_s') or '0')
end
local function wait_ms(zk, hk, kind, excess, now)
  if kind == 'r' then
    local e = redis.call('ZRANGE', zk, excess - 1, excess - 1, 'WITHSCORES')
    return math.max(1, tonumber(e[2]) + 60000 - now)
  end
  local freed = 0
  local rows = redis.call('ZRANGE', zk, 0, -1, 'WITHSCORES')
  for j = 1, #rows, 2 do
    freed = freed + tonumber(redis.call('HGET', hk, rows[j]) or '0')
    if freed >= excess then return math.max(1, tonumber(rows[j + 1]) + 60000 - now) end
  end
  return 60000
end
local function newest(zk, now)
  local e = redis.call('ZRANGE', zk, -1, -1, 'WITHSCORES')
  if e[2] then return math.max(0, tonumber(e[2]) + 60000 - now) end
  return 0
end
"""

_ADMIT = _WINDOW + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-3} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rid, pid, gw = ARGV[1], ARGV[2], ARGV[3]
local amount, tokens = tonumber(ARGV[4]), tonumber(ARGV[5])
local counted, ttl, climit = ARGV[6] == '1', tonumber(ARGV[7]), tonumber(ARGV[8])
local nb = tonumber(ARGV[9])
if counted then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now)
  if climit > 0 and redis.call('ZCARD', KEYS[5]) >= climit then return {-1, now} end
end
local totals = {}
for i = 1, nb do
  local cap, kind = tonumber(ARGV[8 + 2 * i]), ARGV[9 + 2 * i]
  local zk, hk = KEYS[5 + 2 * i], KEYS[6 + 2 * i]
  local total = trim(zk, hk, kind, now)
  totals[i] = total
  local need = tokens
  if kind == 'r' then need = 1 end
  if need > cap then return {-2, i, -1, now} end
  if total + need > cap then return {-2, i, wait_ms(zk, hk, kind, total + need - cap, now), now} end
end
if amount > 0 then
  -- a job taken over from a gateway that died: its old hold is released first
  local prev = redis.call('HGET', KEYS[4], rid)
  if prev then
    local hp, ha = string.match(prev, '^(%S+) (%S+)')
    redis.call('HINCRBY', KEYS[3], hp, -tonumber(ha))
    redis.call('HDEL', KEYS[4], rid)
  end
  local bal = tonumber(redis.call('HGET', KEYS[2], pid) or '0')
  local held = tonumber(redis.call('HGET', KEYS[3], pid) or '0')
  if amount > bal - held then return {-4, bal - held} end
  redis.call('HINCRBY', KEYS[3], pid, amount)
  redis.call('HSET', KEYS[4], rid, pid .. ' ' .. amount .. ' ' .. gw)
end
local out = {1, now}
for i = 1, nb do
  local cap, kind = tonumber(ARGV[8 + 2 * i]), ARGV[9 + 2 * i]
  local zk, hk = KEYS[5 + 2 * i], KEYS[6 + 2 * i]
  local reset = newest(zk, now)
  if counted then
    local need = tokens
    if kind == 'r' then need = 1 end
    totals[i] = totals[i] + need
    redis.call('ZADD', zk, now, rid)
    redis.call('PEXPIRE', zk, 61000)
    if kind == 't' then
      redis.call('HSET', hk, rid, need)
      redis.call('HINCRBY', hk, '_s', need)
      redis.call('PEXPIRE', hk, 61000)
    end
    reset = 60000
  end
  out[#out + 1] = tostring(cap - totals[i])
  out[#out + 1] = tostring(reset)
end
if counted then
  redis.call('ZADD', KEYS[5], now + ttl, rid)
  redis.call('ZADD', KEYS[6], now + ttl, rid)
  redis.call('PEXPIRE', KEYS[5], ttl + 1000)
  redis.call('PEXPIRE', KEYS[6], ttl + 1000)
end
return out
"""

_SETTLE = """
local rid, pid, gw = ARGV[1], ARGV[2], ARGV[3]
local amount, cost, unused = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
redis.call('ZREM', KEYS[3], rid)
redis.call('ZREM', KEYS[4], rid)
if amount > 0 and redis.call('HEXISTS', KEYS[2], rid) == 1 then
  if cost > 0 then
    redis.call('HINCRBY', KEYS[1], pid, cost - amount)
    redis.call('HSET', KEYS[2], rid, pid .. ' ' .. cost .. ' ' .. gw)
  else
    redis.call('HINCRBY', KEYS[1], pid, -amount)
    redis.call('HDEL', KEYS[2], rid)
  end
end
if unused > 0 then
  for i = 5, #KEYS do
    local taken = redis.call('HGET', KEYS[i], rid)
    if taken then
      local back = math.min(unused, tonumber(taken))
      redis.call('HINCRBY', KEYS[i], rid, -back)
      redis.call('HINCRBY', KEYS[i], '_s', -back)
    end
  end
end
return 1
"""

_PEEK = _WINDOW + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, #ARGV do
  local zk, hk = KEYS[2 * i - 1], KEYS[2 * i]
  out[#out + 1] = tostring(trim(zk, hk, ARGV[i], now))
  out[#out + 1] = tostring(newest(zk, now))
end
return out
"""

_APPLY = """
local applied = 0
for i = 1, #ARGV, 4 do
  local id, pid, amount, rid = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]
  if redis.call('SET', KEYS[4] .. id, '1', 'NX', 'EX', 604800) then
    redis.call('HINCRBY', KEYS[1], pid, amount)
    applied = applied + 1
  end
  if rid ~= '' then
    local h = redis.call('HGET', KEYS[3], rid)
    if h then
      local hp, ha = string.match(h, '^(%S+) (%S+)')
      redis.call('HINCRBY', KEYS[2], hp, -tonumber(ha))
      redis.call('HDEL', KEYS[3], rid)
    end
  end
end
return applied
"""

_RELEASE = """
local h = redis.call('HGET', KEYS[2], ARGV[1])
if h and h == ARGV[2] then
  local hp, ha = string.match(h, '^(%S+) (%S+)')
  redis.call('HINCRBY', KEYS[1], hp, -tonumber(ha))
  redis.call('HDEL', KEYS[2], ARGV[1])
  return 1
end
return 0
"""

_LOAD = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
local n = tonumber(ARGV[1])
for i = 0, n - 1 do
  redis.call('HSET', KEYS[2], ARGV[2 + 2 * i], ARGV[3 + 2 * i])
end
for i = 2 + 2 * n, #ARGV do
  redis.call('SET', KEYS[5] .. ARGV[i], '1', 'EX', 604800)
end
redis.call('SET', KEYS[1], '1')
return 1
"""


def gateway_id() -> str:
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass
class _Taken:
    windows: list[str]  # the token windows' hashes
    counters: tuple[str, str]


def _unavailable(exc: BaseException) -> ServiceUnavailable:
    return ServiceUnavailable(
        f"rate limits and credit holds are unavailable ({type(exc).__name__}); not serving "
        "unmetered requests", code="limits_unavailable")


class RedisAdmission:
    """``AdmissionStore`` on Redis, shared by every gateway that points at it."""

    dedupes = True

    def __init__(self, url: str, *, timeout_s: float = 0.4, max_connections: int = 256,
                 gateway: str | None = None,
                 wall: Callable[[], float] = time.time) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError

        self.url = url
        self.gateway = gateway or gateway_id()
        self._wall = wall
        # One retry on a new connection (a pooled one may have died with a
        # restarted server); both attempts together stay under a second.
        # A bounded pool that waits (briefly) for a free connection under bursts.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=1.0, socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s, health_check_interval=0, decode_responses=True,
            retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError])
        self.redis = aioredis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 1),
                                    retry_on_error=[RedisConnectionError])
        self._admit = self.redis.register_script(_ADMIT)
        self._settle = self.redis.register_script(_SETTLE)
        self._apply = self.redis.register_script(_APPLY)
        self._release = self.redis.register_script(_RELEASE)
        self._load = self.redis.register_script(_LOAD)
        self._peek = self.redis.register_script(_PEEK)
        self._heartbeat: asyncio.Task[None] | None = None

    # -- life ----------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._beat()
        except Exception as exc:
            log.warning("redis at %s not reachable at start (%s); admissions fail closed "
                        "until it is", self.url, exc)
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat_forever())

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.redis.delete(P + "gw:" + self.gateway)
        await self.redis.aclose()

    async def _beat(self) -> None:
        await self.redis.set(P + "gw:" + self.gateway, "1", px=int(GATEWAY_TTL_S * 1000))

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self._beat()
            except Exception as exc:
                log.debug("redis heartbeat failed: %s", exc)

    # -- the request path ------------------------------------------------------------

    async def admit(self, ask: Ask) -> Grant:
        plan = ask.plan
        limits = plan_limits(plan, ask.key_id, ask.project_id) if ask.counted else []
        keys = [READY, BAL, HELD, HOLDS, f"{P}c:key:{ask.key_id}", f"{P}c:project:{ask.project_id}"]
        args: list[Any] = [ask.request_id, ask.project_id, self.gateway, ask.amount, ask.tokens,
                           1 if ask.counted else 0, int(ask.ttl_s * 1000),
                           (plan.key_concurrency or 0) if ask.counted else 0, len(limits)]
        for name, kind, cap, _scope in limits:
            keys += _window_keys(name, kind, cap)
            args += [cap, kind[0]]
        try:
            out = await self._admit(keys=keys, args=args)
        except Exception as exc:
            raise _unavailable(exc) from None
        code = int(out[0])
        if code == -3:
            raise StoreNotReady
        if code == -4:
            raise refuse_credit(ask.amount, int(out[1]))
        if code in (-1, -2):
            raise self._refused(ask, limits, out)
        headers = limit_headers(plan, _levels(limits, out[2:]), self._wall()) \
            if ask.counted else {}
        taken = _Taken([keys[7 + 2 * i] for i, (_n, kind, _c, _s) in enumerate(limits)
                        if kind == "tokens"], (keys[4], keys[5]))
        return Grant(ask, headers, taken)

    def _refused(self, ask: Ask, limits: list[tuple[str, str, int, str]], out: list[Any]) -> Any:
        plan = ask.plan
        buckets = [(Level(cap, cap, 0.0), kind, scope) for _n, kind, cap, scope in limits]
        if int(out[0]) == -1:
            return refusal(plan, buckets, "concurrent_requests_per_key",
                           f"{plan.key_concurrency} concurrent requests per key", 1.0, self._wall())
        index, wait_ms = int(out[1]) - 1, int(out[2])
        _name, kind, cap, scope = limits[index]
        buckets[index][0].level = 0.0
        code = f"{kind}_per_minute_per_{scope}"
        if wait_ms < 0:
            need = 1 if kind == "requests" else ask.tokens
            return refusal(plan, buckets, code,
                           f"{cap} {kind} per minute per {scope}; this request needs up to "
                           f"{need} (prompt plus max output), which can never fit", None,
                           self._wall())
        return refusal(plan, buckets, code, f"{cap} {kind} per minute per {scope}",
                       wait_ms / 1000, self._wall())

    async def settle(self, grant: Grant, *, used_tokens: int, cost: int) -> None:
        if grant.settled:
            return
        grant.settled = True
        ask = grant.ask
        taken: _Taken | None = grant.handle
        counters = taken.counters if taken else (f"{P}c:-", f"{P}c:-")
        windows = taken.windows if taken else []
        unused = max(0, ask.tokens - used_tokens) if ask.counted else 0
        try:
            await self._settle(
                keys=[HELD, HOLDS, *counters, *windows],
                args=[ask.request_id, ask.project_id, self.gateway, ask.amount, cost, unused])
        except Exception as exc:
            raise _unavailable(exc) from None

    async def peek(self, plan: PlanLimits, key_id: str, project_id: str) -> dict[str, str]:
        limits = plan_limits(plan, key_id, project_id)
        if not limits:
            return {"X-RateLimit-Tier": plan.name}
        keys: list[str] = []
        for name, kind, cap, _scope in limits:
            keys += _window_keys(name, kind, cap)
        try:
            out = await self._peek(keys=keys, args=[kind[0] for _n, kind, _c, _s in limits])
        except Exception as exc:
            raise _unavailable(exc) from None
        return limit_headers(plan, _levels(limits, out, taken=True), self._wall())

    # -- money -------------------------------------------------------------------------

    async def load(self, balances: dict[str, int], recent: Sequence[str] = ()) -> None:
        args: list[Any] = [len(balances)]
        for pid, amount in balances.items():
            args += [pid, amount]
        args += list(recent)
        try:
            loaded = await self._load(keys=[READY, BAL, HELD, HOLDS, P + "ap:"], args=args)
        except Exception as exc:
            raise _unavailable(exc) from None
        if loaded:
            log.info("loaded %d balances into redis", len(balances))

    async def apply(self, entries: Sequence[Posted]) -> None:
        for start in range(0, len(entries), 500):
            args: list[Any] = []
            for e in entries[start:start + 500]:
                args += [e.entry_id, e.project_id, e.amount, e.request_id or ""]
            await self._apply(keys=[BAL, HELD, HOLDS, P + "ap:"], args=args)

    async def balance(self, project_id: str) -> tuple[int, int]:
        try:
            balance, held = await self.redis.hmget(BAL, [project_id]), \
                await self.redis.hget(HELD, project_id)
        except Exception as exc:
            raise _unavailable(exc) from None
        return int(balance[0] or 0), int(held or 0)

    # -- a dead gateway's holds ----------------------------------------------------------

    async def sweep(self, committed: Callable[[list[str]], Awaitable[dict[str, Posted]]]) -> int:
        """Resolve the holds of gateways that stopped beating: a committed debit
        (``committed`` answers which request ids have one) is applied, anything
        else is released.  Returns holds resolved."""
        orphans: dict[str, str] = {}
        alive: dict[str, bool] = {}
        async for rid, value in self.redis.hscan_iter(HOLDS):
            gw = value.split(" ", 2)[2] if value.count(" ") >= 2 else ""
            if gw not in alive:
                alive[gw] = bool(await self.redis.exists(P + "gw:" + gw))
            if not alive[gw]:
                orphans[rid] = value
        if not orphans:
            return 0
        posted = await committed(list(orphans))
        if posted:
            await self.apply(list(posted.values()))
        for rid, value in orphans.items():
            if rid not in posted:
                await self._release(keys=[HELD, HOLDS], args=[rid, value])
        log.info("released %d holds of gateways that stopped", len(orphans))
        return len(orphans)

    # -- inspection (tests, admin) -------------------------------------------------------

    async def totals(self) -> tuple[int, int]:
        """(sum of held, number of holds) across every project."""
        held = await self.redis.hvals(HELD)
        return sum(int(v) for v in held), int(await self.redis.hlen(HOLDS))

    async def running(self, key_id: str) -> int:
        now = math.floor(self._wall() * 1000)
        return int(await self.redis.zcount(f"{P}c:key:{key_id}", now, "+inf"))


def _window_keys(name: str, kind: str, cap: int) -> list[str]:
    base = f"{P}w:{name}:{kind[0]}:{cap}"
    return [base, base + ":a"]


def _levels(limits: list[tuple[str, str, int, str]], out: Sequence[Any], *,
            taken: bool = False) -> list[tuple[Level, str, str]]:
    """Windows read by a script: pairs of (remaining or, with ``taken``, the
    total taken; ms until empty)."""
    levels = []
    for i, (_n, kind, cap, scope) in enumerate(limits):
        value = float(out[2 * i])
        levels.append((Level(cap, cap - value if taken else value, float(out[2 * i + 1]) / 1000),
                       kind, scope))
    return levels


class ChangeFeed:
    """Admin changes (a key revoked, a plan, price or credit changed) fanned out
    to every gateway over Redis pub/sub.

    A process that commits such a change publishes on ``{mf}:changes``; every
    gateway listening nudges its version probe, so its next request reloads
    what it caches from the database, within milliseconds.  The probe's own
    poll (``db.VersionProbe``, 0.25 s on PostgreSQL) stays as the safety net
    for a lost message or a Redis outage.
    """

    def __init__(self, url: str, *, timeout_s: float = 0.4) -> None:
        import redis.asyncio as aioredis

        self.redis = aioredis.Redis.from_url(url, socket_timeout=timeout_s,
                                             socket_connect_timeout=timeout_s,
                                             decode_responses=True)
        self._sent: set[asyncio.Task[None]] = set()
        self._listener: asyncio.Task[None] | None = None

    def changed(self) -> None:
        """A change was committed here (called on the event loop, synchronously)."""
        task = asyncio.get_running_loop().create_task(self._publish())
        self._sent.add(task)
        task.add_done_callback(self._sent.discard)

    async def _publish(self) -> None:
        try:
            await self.redis.publish(CHANGES, "1")
        except Exception as exc:  # the other gateways' poll still sees it
            log.debug("could not publish a change: %s", exc)

    def listen(self, on_change: Callable[[], None]) -> None:
        self._listener = asyncio.get_running_loop().create_task(self._listen(on_change))

    async def _listen(self, on_change: Callable[[], None]) -> None:
        while True:
            try:
                async with self.redis.pubsub(ignore_subscribe_messages=True) as sub:
                    await sub.subscribe(CHANGES)
                    on_change()  # anything missed while not subscribed
                    while True:
                        message = await sub.get_message(timeout=1.0)
                        if message is not None:
                            on_change()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("change feed: %s; resubscribing", exc)
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        """Sends what is still being published, then stops listening."""
        if self._sent:
            await asyncio.wait(set(self._sent), timeout=1.0)
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.redis.aclose()
