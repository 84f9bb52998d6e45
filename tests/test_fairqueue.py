"""Fair queueing across projects: deterministic, no clock, no sleeps."""

from __future__ import annotations

import asyncio

from modelfleet.fairqueue import FairQueue
from modelfleet.scheduler import Claim, ModelQueue
from tests.test_scheduler import fake_replica, queue  # noqa: F401  (fixture)


def drain(q: FairQueue[str], **kw: object) -> list[str]:
    out = []
    while (item := q.pop(**kw)) is not None:  # type: ignore[arg-type]
        out.append(item)
    return out


def test_flood_does_not_delay_a_single_request() -> None:
    q: FairQueue[str] = FairQueue()
    for i in range(500):
        q.push(f"a{i}", project="A")
    q.push("b0", project="B")
    order = drain(q)
    assert order.index("b0") <= 1
    assert len(order) == 501 and len(q) == 0


def test_weights_share_slots_in_proportion() -> None:
    q: FairQueue[str] = FairQueue()
    for i in range(60):
        q.push(f"a{i}", project="A", weight=2)
        q.push(f"b{i}", project="B", weight=1)
    first = drain(q)[:30]
    assert sum(x.startswith("a") for x in first) == 20
    assert sum(x.startswith("b") for x in first) == 10


def test_priority_class_first() -> None:
    q: FairQueue[str] = FairQueue()
    q.push("low1", project="A", priority=0)
    q.push("low2", project="B", priority=0)
    q.push("high", project="C", priority=5)
    assert drain(q)[0] == "high"


def test_ineligible_projects_are_skipped_not_lost() -> None:
    q: FairQueue[str] = FairQueue()
    q.push("a0", project="A")
    q.push("a1", project="A")
    q.push("b0", project="B")
    assert q.pop(lambda p: p != "A") == "b0"
    assert q.pop(lambda p: p != "A") is None
    assert drain(q) == ["a0", "a1"]


def test_remove_and_waiting_by_project() -> None:
    q: FairQueue[str] = FairQueue()
    q.push("a0", project="A")
    q.push("b0", project="B")
    q.push("b1", project="B")
    assert q.waiting_by_project() == {"A": 1, "B": 2}
    assert q.remove("b0") and not q.remove("zz")
    assert drain(q) == ["a0", "b1"]


async def test_scheduler_serves_the_small_project_next(queue: ModelQueue) -> None:  # noqa: F811
    fake_replica(queue, "r", 1)
    held = await queue.acquire(queue.clock() + 100, claim=Claim(project="A"))
    served: list[str] = []

    async def one(project: str, i: int) -> None:
        lease = await queue.acquire(queue.clock() + 100, claim=Claim(project=project))
        served.append(f"{project}{i}")
        queue.release(lease)

    tasks = [asyncio.create_task(one("A", i)) for i in range(20)]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(one("B", 0)))
    await asyncio.sleep(0)
    queue.release(held)
    await asyncio.gather(*tasks)
    assert served.index("B0") <= 1


async def test_running_cap_holds_extra_requests_in_the_queue(queue: ModelQueue) -> None:  # noqa: F811
    fake_replica(queue, "r", 4)
    capped = Claim(project="A", cap=2)
    a1 = await queue.acquire(queue.clock() + 100, claim=capped)
    a2 = await queue.acquire(queue.clock() + 100, claim=capped)
    third = asyncio.create_task(queue.acquire(queue.clock() + 100, claim=capped))
    await asyncio.sleep(0)
    assert not third.done() and queue.waiting == 1  # a slot is free, but A is at its cap
    other = await queue.acquire(queue.clock() + 100, claim=Claim(project="B"))
    assert other.replica.id == "r"  # other projects are not held up by A's cap
    queue.release(a1)
    a3 = await third
    assert queue.running("A") == 2
    for lease in (a2, a3, other):
        queue.release(lease)
    assert queue.running("A") == 0


async def test_prefix_affinity_bounded_by_load(queue: ModelQueue) -> None:  # noqa: F811
    r1 = fake_replica(queue, "r1", 4)
    r2 = fake_replica(queue, "r2", 4)
    convo = Claim(project="A", prefix="conversation-1")
    first = await queue.acquire(queue.clock() + 100, claim=convo)
    queue.release(first)
    home = first.replica
    again = await queue.acquire(queue.clock() + 100, claim=convo)
    assert again.replica is home  # same conversation, same replica (equally loaded)
    # now home is more loaded than the other: load wins over affinity
    other = r2 if home is r1 else r1
    third = await queue.acquire(queue.clock() + 100, claim=convo)
    assert third.replica is other
    for lease in (again, third):
        queue.release(lease)

