"""Recent wait / run / total times per model, for the catalog's
``recent_summary_stats``: count, p50 and p95 over a sliding window."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, round(q * len(sorted_values) + 0.4999999))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class RecentStats:
    def __init__(
        self,
        window_s: float = 900.0,
        max_samples: int = 2000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self._clock = clock
        self._samples: deque[tuple[float, float, float, float]] = deque(maxlen=max_samples)

    def record(self, wait_s: float, run_s: float) -> None:
        self._samples.append((self._clock(), wait_s, run_s, wait_s + run_s))

    def summary(self) -> dict[str, Any]:
        horizon = self._clock() - self.window_s
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()
        out: dict[str, Any] = {"window_seconds": self.window_s}
        for i, name in ((1, "wait"), (2, "run"), (3, "total")):
            values = sorted(s[i] for s in self._samples)
            if values:
                out[name] = {
                    "count": len(values),
                    "p50_seconds": round(_percentile(values, 0.50), 4),
                    "p95_seconds": round(_percentile(values, 0.95), 4),
                }
            else:
                out[name] = {"count": 0, "p50_seconds": None, "p95_seconds": None}
        return out
