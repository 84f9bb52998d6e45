"""Fair ordering of waiting requests across projects.

Deficit round robin, weighted by plan: projects with waiting requests take
turns; on its turn a project earns ``weight`` credits and spends one per
request served, so over time projects get slots in proportion to their
weights however many requests each has queued.  A project with 500 queued
requests delays another project's single request by at most one turn.

Priority classes come first: a waiting request of a higher class is served
before any of a lower class.  A project at its running cap (its plan's
``project_concurrency``) is skipped until one of its requests ends.

Pure data structure, no I/O and no clock: the scheduler drives it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Flow(Generic[T]):
    project: str
    weight: int
    items: deque[T] = field(default_factory=deque)
    deficit: int = 0


class FairQueue(Generic[T]):
    def __init__(self) -> None:
        # priority -> round-robin order of projects with waiting items
        self._classes: dict[int, deque[_Flow[T]]] = {}
        self._flows: dict[tuple[int, str], _Flow[T]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, item: T, *, project: str, weight: int = 1, priority: int = 0) -> None:
        key = (priority, project)
        flow = self._flows.get(key)
        if flow is None:
            flow = self._flows[key] = _Flow(project, max(1, weight))
            self._classes.setdefault(priority, deque()).append(flow)
        flow.weight = max(1, weight)
        flow.items.append(item)
        self._size += 1

    def remove(self, item: T) -> bool:
        for key, flow in list(self._flows.items()):
            try:
                flow.items.remove(item)
            except ValueError:
                continue
            self._size -= 1
            if not flow.items:
                self._drop(key, flow)
            return True
        return False

    def _drop(self, key: tuple[int, str], flow: _Flow[T]) -> None:
        del self._flows[key]
        order = self._classes[key[0]]
        order.remove(flow)
        if not order:
            del self._classes[key[0]]

    def pop(self, eligible: Callable[[str], bool] = lambda project: True,
            above: int | None = None) -> T | None:
        """The next item in fair order among projects ``eligible`` allows (and
        classes above ``above``, if given), or None."""
        for priority in sorted(self._classes, reverse=True):
            if above is not None and priority <= above:
                break
            order = self._classes[priority]
            for _ in range(2 * len(order)):
                flow = order[0]
                if not eligible(flow.project):
                    order.rotate(-1)
                    continue
                if flow.deficit <= 0:
                    flow.deficit += flow.weight
                item = flow.items.popleft()
                self._size -= 1
                flow.deficit -= 1
                if not flow.items:
                    self._drop((priority, flow.project), flow)
                elif flow.deficit <= 0:
                    order.rotate(-1)  # its turn is spent: next project
                return item
        return None

    def waiting_above(self, priority: int) -> int:
        """Items waiting in classes above ``priority``."""
        return sum(len(flow.items) for (prio, _), flow in self._flows.items() if prio > priority)

    def waiting_by_project(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (_prio, project), flow in self._flows.items():
            out[project] = out.get(project, 0) + len(flow.items)
        return out
