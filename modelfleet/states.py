"""The states of a request and of a job, in one place (as arq keeps ``JobStatus``)."""

from __future__ import annotations

from enum import StrEnum


class RequestState(StrEnum):
    """Where one inference request ended (``pending`` while it runs)."""

    pending = "pending"
    succeeded = "succeeded"
    failed = "failed"
    abandoned = "abandoned"  # the deadline passed while the worker ran it
    cancelled = "cancelled"  # never reached a worker (deadline while queued, refused, stopped)
    disconnected = "disconnected"  # the client left a stream early


# What is charged: requests that succeeded, and streams the client left early
# (for the tokens generated until then).
CHARGED = frozenset({RequestState.succeeded, RequestState.disconnected})


class JobState(StrEnum):
    """An async job's row status."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})
