"""Autoscaler decisions and the swap policy, deterministic: an injected clock,
replica records without processes (FAKE: they stand in for workers), and
launches recorded instead of performed."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelfleet.catalog import Catalog, ModelKind, ModelSpec
from modelfleet.engines.base import LaunchPlan
from modelfleet.engines.http import WorkerClient
from modelfleet.fleet import Fleet, ModelPool
from modelfleet.settings import FleetSettings, Settings
from modelfleet.supervisor import Replica, ReplicaState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def spec(model_id: str, *, memory: int = 400, threads: int = 1, **scaling: float) -> ModelSpec:
    return ModelSpec.model_validate({
        "id": model_id, "kind": ModelKind.chat,
        "engine": {"type": "llama.cpp", "model_file": "/x.gguf", "threads": threads,
                   "memory_mib": memory},
        "scaling": {"concurrency": 2, "max_replicas": 3, "scale_up_after_s": 5.0, **scaling},
    })


class Rig:
    """A fleet whose launches create ready FAKE replicas at once."""

    def __init__(self, tmp: Path, specs: list[ModelSpec], *, memory: int = 10_000) -> None:
        self.clock = Clock()
        settings = Settings(data_dir=tmp, fleet=FleetSettings(cpu_threads=8, memory_mib=memory))
        self.fleet = Fleet(Catalog(specs), settings, WorkerClient(), clock=self.clock)
        self.waiting: dict[str, int] = {s.id: 0 for s in specs}
        for pool in self.fleet.pools.values():
            pool.availability = lambda: (True, None)  # type: ignore[method-assign]
            pool.waiting = (lambda p=pool: self.waiting[p.spec.id])  # type: ignore[misc]
            pool.interactive_waiting = pool.waiting  # every simulated request is interactive
            pool.demand = (lambda p=pool: self.waiting[p.spec.id]  # type: ignore[misc]
                           + sum(r.outstanding for r in p.replicas))
            pool._launch = (lambda p=pool: self.add(p))  # type: ignore[method-assign]
            pool.wall = self.clock

    def add(self, pool: ModelPool, state: ReplicaState = ReplicaState.ready) -> Replica:
        replica = Replica(replica_id=f"{pool.spec.id}-{len(pool.replicas)}",
                          model_id=pool.spec.id, port=1, plan=LaunchPlan(argv=["true"]),
                          slots=pool.spec.scaling.concurrency, log_path=Path("/dev/null"),
                          client=WorkerClient(), settings=pool.fleet_settings, clock=self.clock)
        replica.state = state
        replica.resources = pool.engine.resources()
        pool.replicas.append(replica)
        return replica

    def pool(self, model_id: str) -> ModelPool:
        return self.fleet.pools[model_id]


def test_scale_from_zero_at_once_then_up_only_after_sustained_queueing(tmp_path: Path) -> None:
    rig = Rig(tmp_path, [spec("m")])
    pool = rig.pool("m")
    assert pool.desired == 0 and pool.state == "sleeping"
    rig.waiting["m"] = 1
    pool.scale_for_demand()
    assert pool.desired == 1 and len(pool.replicas) == 1  # cold start: no waiting window
    first = pool.replicas[0]
    first.outstanding = 2  # both slots busy
    rig.waiting["m"] = 5
    pool.scale_for_demand()  # pressure starts now
    rig.clock.now += 4.9
    rig.fleet.tick()
    assert pool.desired == 1  # not yet sustained
    rig.clock.now += 0.2
    rig.fleet.tick()
    assert pool.desired == 2 and len(pool.replicas) == 2
    pool.replicas[1].outstanding = 2
    rig.clock.now += 5.1
    rig.fleet.tick()
    assert pool.desired == 3
    rig.clock.now += 60
    rig.fleet.tick()
    assert pool.desired == 3  # max_replicas
    reasons = [e.reason for e in pool.events]
    assert reasons[0] == "request waiting for a sleeping model"
    assert all("queue sustained" in r for r in reasons[1:])
    assert [(e.from_replicas, e.to_replicas) for e in pool.events] == [(0, 1), (1, 2), (2, 3)]
    assert pool.events[1].at == pytest.approx(1005.1)


def test_queued_batch_lines_wake_a_model_but_never_add_replicas(tmp_path: Path) -> None:
    rig = Rig(tmp_path, [spec("m")])
    pool = rig.pool("m")
    pool.interactive_waiting = lambda: 0  # what waits is background work only
    rig.waiting["m"] = 40
    pool.scale_for_demand()
    assert pool.desired == 1 and len(pool.replicas) == 1  # woken: one replica
    pool.replicas[0].outstanding = 2  # every slot busy, 40 lines queued
    for _ in range(5):
        rig.clock.now += 10
        rig.fleet.tick()
    assert pool.desired == 1 and len(pool.replicas) == 1
    pool.interactive_waiting = lambda: 1  # an interactive request waits too: pressure
    pool.scale_for_demand()
    rig.clock.now += 5.1
    rig.fleet.tick()
    assert pool.desired == 2


def test_no_scale_up_while_queue_drains(tmp_path: Path) -> None:
    rig = Rig(tmp_path, [spec("m")])
    pool = rig.pool("m")
    rig.waiting["m"] = 1
    pool.scale_for_demand()
    pool.replicas[0].outstanding = 2
    rig.waiting["m"] = 3
    pool.scale_for_demand()
    rig.clock.now += 3
    rig.waiting["m"] = 0  # the queue emptied: pressure resets
    rig.fleet.tick()
    rig.waiting["m"] = 3
    rig.clock.now += 3
    rig.fleet.tick()
    assert pool.desired == 1


async def test_idle_replicas_scale_to_zero_and_min_replicas_stay(tmp_path: Path) -> None:
    rig = Rig(tmp_path, [spec("m", idle_timeout_s=30), spec("keep", min_replicas=1)])
    m, keep = rig.pool("m"), rig.pool("keep")
    rig.fleet.tick()
    assert keep.desired == 1 and len(keep.replicas) == 1
    rig.waiting["m"] = 1
    m.scale_for_demand()
    rig.waiting["m"] = 0
    rig.clock.now += 31
    await m.reap_idle()
    await keep.reap_idle()
    assert m.replicas == [] and m.desired == 0 and m.state == "sleeping"
    assert len(keep.replicas) == 1
    assert m.events[-1].to_replicas == 0 and "idle" in m.events[-1].reason


async def test_swap_stops_least_recently_used_idle_model(tmp_path: Path) -> None:
    rig = Rig(tmp_path, [spec("a"), spec("b"), spec("c")], memory=900)
    a, b, c = rig.pool("a"), rig.pool("b"), rig.pool("c")
    ra = rig.add(a)
    rb = rig.add(b)
    ra.last_active, rb.last_active = 50.0, 10.0  # b is the least recently used
    a.desired = b.desired = 1
    rig.waiting["c"] = 1
    c.scale_for_demand()
    assert [r.model_id for r in c.replicas] == ["c"]
    assert b.replicas == [] and a.replicas == [ra]
    assert b.events[-1].reason == "swapped out for c"
    await rig.fleet.owner.close()


async def test_swap_never_takes_busy_or_waited_for_replicas(tmp_path: Path) -> None:
    rig = Rig(tmp_path, [spec("a"), spec("b"), spec("c")], memory=900)
    a, b, c = rig.pool("a"), rig.pool("b"), rig.pool("c")
    ra, rb = rig.add(a), rig.add(b)
    ra.outstanding = 1  # busy
    rig.waiting["b"] = 2  # b has requests waiting
    rig.waiting["c"] = 1
    c.scale_for_demand()
    assert c.replicas == [] and a.replicas == [ra] and b.replicas == [rb]
    assert c.blocked is not None and "waiting for room" in c.blocked
    # a finishes its work: the next retry swaps a out for c
    ra.outstanding = 0
    rig.fleet.room.retry_blocked()
    assert [r.model_id for r in c.replicas] == ["c"] and a.replicas == []
    await rig.fleet.owner.close()


def test_model_larger_than_the_machine_is_blocked_with_reason(tmp_path: Path) -> None:
    rig = Rig(tmp_path, [spec("huge", memory=5000)], memory=900)
    rig.waiting["huge"] = 1
    rig.pool("huge").scale_for_demand()
    assert rig.pool("huge").replicas == []
    assert "needs 1 threads, 5000 MiB" in (rig.pool("huge").blocked or "")


async def test_used_resources_never_exceed_budget(tmp_path: Path) -> None:
    rig = Rig(tmp_path, [spec(f"m{i}") for i in range(5)], memory=1300)
    for i in range(5):
        rig.waiting[f"m{i}"] = 1
        rig.pool(f"m{i}").scale_for_demand()
        assert rig.fleet.room.used().memory_mib <= 1300
    assert sum(len(p.replicas) for p in rig.fleet.pools.values()) == 3
    await rig.fleet.owner.close()
