"""The per-model queue, deterministic: fake replicas (no process), no sleeps."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from modelfleet.catalog import load_catalog
from modelfleet.engines.http import WorkerClient
from modelfleet.errors import DeadlineExceeded, ModelUnavailable
from modelfleet.fleet import Fleet
from modelfleet.scheduler import BACKGROUND, Claim, ModelQueue
from modelfleet.settings import Settings
from modelfleet.stats import RecentStats
from modelfleet.supervisor import Replica, ReplicaState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fake_replica(queue: ModelQueue, name: str, slots: int) -> Replica:
    """A replica record with no process behind it (FAKE: stands in for a worker)."""
    from modelfleet.engines.base import LaunchPlan

    replica = Replica(replica_id=name, model_id=queue.pool.spec.id, port=1,
                      plan=LaunchPlan(argv=["true"]), slots=slots, log_path=Path("/dev/null"),
                      client=WorkerClient(), settings=queue.pool.fleet_settings,
                      clock=queue.clock)
    replica.state = ReplicaState.ready
    queue.pool.replicas.append(replica)
    return replica


@pytest.fixture
def queue(tmp_path: Path) -> ModelQueue:
    clock = Clock()
    settings = Settings(data_dir=tmp_path)
    fleet = Fleet(load_catalog(), settings, WorkerClient(), clock=clock)
    pool = fleet.pools["HuggingFaceTB/SmolLM2-135M-Instruct"]
    pool.scale_for_demand = lambda: None  # type: ignore[method-assign]  # no real starts
    return ModelQueue(pool, RecentStats(clock=clock), clock=clock)


async def test_free_slot_is_taken_at_once_least_loaded_first(queue: ModelQueue) -> None:
    a = fake_replica(queue, "a", 2)
    b = fake_replica(queue, "b", 2)
    first = await queue.acquire(deadline=queue.clock() + 10)
    second = await queue.acquire(deadline=queue.clock() + 10)
    assert {first.replica.id, second.replica.id} == {"a", "b"}
    assert a.outstanding == b.outstanding == 1


async def test_waiters_get_freed_slots_in_arrival_order(queue: ModelQueue) -> None:
    fake_replica(queue, "a", 1)
    held = await queue.acquire(deadline=queue.clock() + 10)
    order: list[int] = []
    waits: list[float] = []

    async def wait(i: int) -> None:
        lease = await queue.acquire(deadline=queue.clock() + 10)
        order.append(i)
        waits.append(lease.wait_s)
        queue.release(lease)

    tasks = [asyncio.create_task(wait(i)) for i in range(3)]
    await asyncio.sleep(0)
    assert queue.waiting == 3 and queue.demand() == 4
    queue.clock.now += 2.5  # type: ignore[attr-defined]
    queue.release(held)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    assert waits == [2.5, 2.5, 2.5]  # each waited from enqueue until the slot was handed over


async def test_deadline_passed_in_queue_is_504(queue: ModelQueue) -> None:
    fake_replica(queue, "a", 1)
    held = await queue.acquire(deadline=queue.clock() + 10)
    with pytest.raises(DeadlineExceeded) as exc:
        await queue.acquire(deadline=queue.clock())
    assert exc.value.code == "queue_timeout"
    assert queue.waiting == 0
    queue.release(held)
    assert queue.pool.replicas[0].outstanding == 0


async def test_unavailable_model_fails_waiters_and_refuses_new(queue: ModelQueue) -> None:
    task = asyncio.create_task(queue.acquire(deadline=queue.clock() + 10))
    await asyncio.sleep(0)
    assert queue.waiting == 1
    queue.pool.unavailable_reason = "broken"
    queue.pool._unavailable_until = queue.clock() + 60
    queue.fail_waiters("broken")
    with pytest.raises(ModelUnavailable):
        await task
    with pytest.raises(ModelUnavailable, match="broken"):
        await queue.acquire(deadline=queue.clock() + 10)
    queue.clock.now += 61  # type: ignore[attr-defined]
    assert queue.pool.availability() == (True, None)


async def test_cancelled_waiter_leaves_no_trace(queue: ModelQueue) -> None:
    fake_replica(queue, "a", 1)
    held = await queue.acquire(deadline=queue.clock() + 10)
    task = asyncio.create_task(queue.acquire(deadline=queue.clock() + 10))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    queue.release(held)
    assert queue.waiting == 0 and queue.pool.replicas[0].outstanding == 0


BATCH = Claim(project="batcher", priority=BACKGROUND)
CHAT = Claim(project="chatter")


async def test_background_work_leaves_a_slot_for_interactive_requests(queue: ModelQueue) -> None:
    replica = fake_replica(queue, "a", 4)
    deadline = queue.clock() + 10
    lines = [await queue.acquire(deadline, claim=BATCH) for _ in range(3)]
    assert replica.background == 3 and all(lease.background for lease in lines)
    fourth = asyncio.create_task(queue.acquire(deadline, claim=BATCH))
    await asyncio.sleep(0)
    assert queue.waiting == 1  # the last slot is kept free
    chat = await queue.acquire(deadline, claim=CHAT)  # taken at once, past the waiting line
    assert chat.replica is replica and not chat.background and queue.waiting == 1
    queue.release(lines[0])
    await asyncio.sleep(0)
    assert not fourth.done()  # 2 lines + 1 chat: a line would take the last slot
    queue.release(chat)
    line = await fourth
    assert line.background and replica.background == 3 and replica.outstanding == 3
    for lease in (*lines[1:], line):
        queue.release(lease)
    assert replica.background == replica.outstanding == 0


async def test_a_waiting_interactive_request_goes_before_waiting_lines(queue: ModelQueue) -> None:
    replica = fake_replica(queue, "a", 2)
    deadline = queue.clock() + 10
    held = [await queue.acquire(deadline, claim=CHAT) for _ in range(2)]
    order: list[str] = []

    async def take(name: str, claim: Claim) -> None:
        lease = await queue.acquire(deadline, claim=claim)
        order.append(name)
        queue.release(lease)

    tasks = [asyncio.create_task(take("line", BATCH)),
             asyncio.create_task(take("chat", CHAT))]
    await asyncio.sleep(0)
    queue.release(held[0])
    queue.release(held[1])
    await asyncio.gather(*tasks)
    assert order == ["chat", "line"] and replica.outstanding == 0


async def test_a_replica_running_only_lines_yields_to_interactive_requests(
        tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    fleet = Fleet(load_catalog(), settings, WorkerClient())
    chat_pool = fleet.pools["HuggingFaceTB/SmolLM2-135M-Instruct"]
    other = next(p for p in fleet.pools.values() if p is not chat_pool)
    queue = ModelQueue(chat_pool, RecentStats())
    replica = fake_replica(queue, "a", 4)
    chat_pool.desired = 1
    stopped: list[str] = []
    replica.background = replica.outstanding = 2
    replica.preemptible = {"l1": lambda: stopped.append("l1"),
                           "l2": lambda: stopped.append("l2")}
    other.interactive_waiting = lambda: 0
    assert not chat_pool.yields_to(replica, other)  # nobody interactive waits for room
    other.interactive_waiting = lambda: 1
    assert chat_pool.yields_to(replica, other)
    assert fleet.room is not None and fleet.room.victims(other) == [replica]
    replica.outstanding = 3  # an interactive request runs on it too: kept
    assert not chat_pool.yields_to(replica, other)
    replica.outstanding = 2
    chat_pool.interactive_waiting = lambda: 1  # its own interactive requests wait: kept
    assert not chat_pool.yields_to(replica, other)
    chat_pool.interactive_waiting = lambda: 0
    chat_pool.evict(replica, f"swapped out for {other.spec.id}")
    assert sorted(stopped) == ["l1", "l2"] and replica not in chat_pool.replicas
    assert "preempting 2 background requests" in chat_pool.events[-1].reason
    await fleet.close()


def test_stats_window_drops_old_samples() -> None:
    clock = Clock()
    stats = RecentStats(window_s=60, clock=clock)
    for v in (1.0, 2.0, 3.0, 4.0):
        stats.record(0.5, v)
    assert stats.summary()["run"] == {"count": 4, "p50_seconds": 2.0, "p95_seconds": 4.0}
    clock.now += 61
    assert stats.summary()["run"]["count"] == 0
