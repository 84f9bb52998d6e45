"""The Batch API: a file of requests run in the capacity interactive traffic
leaves, at a discount, durably.

    create:   the input file (the project's, purpose batch) and the endpoint
              every line calls → row ``validating`` with this gateway's lease
              (committed before the client hears of it) → runner
    run:      ``validating`` → ``in_progress``; lines run ``concurrency`` at a
              time, each through the one request path (``RequestPath.prepare``
              then ``Gateway.handle``: validation, limits, hold and charge,
              the fair queue, deadlines) in the lowest priority class, priced
              ``discount_pct`` below the model's prices.  Each finished line
              is a ``batch_lines`` row, committed with the batch's counters.
              → ``finalizing``: output and error files → ``completed``
    stop:     cancel → ``cancelling``: no new line starts, lines in flight
              finish, finished ones are kept → files → ``cancelled``.  Past
              the completion window, the lines not run are ``batch_expired``
              errors → ``expired``
    durable:  the runner's gateway renews the batch's lease; a batch whose
              lease expired (its gateway died) is taken by another gateway,
              or by this one after a restart, and resumes with the lines that
              have no row.  A line's request id is derived from the batch id
              and its index, and its usage row is committed before its
              ``batch_lines`` row: a line whose usage row exists is never
              charged again (one cut off between the two runs again, unmetered)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from sqlalchemy import select, update

from modelfleet.catalog import ModelSpec
from modelfleet.db import Database
from modelfleet.errors import (
    Conflict,
    InvalidRequest,
    ModelfleetError,
    NotFound,
    Preempted,
    RateLimited,
)
from modelfleet.files import BATCH_URLS, FileStore, derived_file_id, request_lines
from modelfleet.gateway import Gateway
from modelfleet.ids import uuid7
from modelfleet.jobs import _owner_gone, owner_id
from modelfleet.keys import Principal, Scope
from modelfleet.projects import PlanLimits
from modelfleet.scheduler import BACKGROUND
from modelfleet.settings import BatchSettings, JobSettings
from modelfleet.tables import Batch, BatchLine, StoredFile, UsageRecord
from modelfleet.tasks import TaskOwner

if TYPE_CHECKING:
    from modelfleet.api.inference import Prepared

log = logging.getLogger(__name__)

# Below every plan's priority class: a waiting interactive request is always
# served first (fairqueue.py serves higher classes first).
BATCH_PRIORITY = BACKGROUND
WINDOWS = ("24h",)
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL = ("completed", "failed", "expired", "cancelled")
MAX_METADATA_PAIRS = 16
# A line preempted for interactive requests queues again after this long.
PREEMPTED_RETRY_S = 1.0
_LINE_IDS = uuid.UUID("5b0c9d8e-6a55-4c1e-9f3b-2d7f0e1a4c11")


def _now() -> datetime:
    return datetime.now(UTC)


def _ts(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


def new_batch_id() -> str:
    return f"batch_{uuid7().hex}"


def line_request_id(batch_id: str, index: int) -> str:
    """The request id of a batch's line ``index``: the same on every run, so its
    usage row (keyed by request id) is written at most once."""
    return str(uuid.uuid5(_LINE_IDS, f"{batch_id}:{index}"))


@dataclass(frozen=True)
class Terms:
    """How a request that no client waits for (a batch line) is queued and
    priced: its priority class, a discount on the model's prices, how long it
    may wait for a slot, and whether it is metered at all."""

    priority: int
    discount_pct: int = 0  # the server's; a plan's or the model's wins (discount_for)
    queue_timeout_s: float | None = None
    metered: bool = True

    def discount_for(self, spec: ModelSpec, plan: PlanLimits) -> int:
        """The discount on ``spec`` for a project on ``plan``: the plan's
        batch_discount_pct, else the model's prices.batch_discount_pct, else
        the server's."""
        if plan.batch_discount_pct is not None:
            return plan.batch_discount_pct
        if spec.prices.batch_discount_pct is not None:
            return spec.prices.batch_discount_pct
        return self.discount_pct


class LinePath(Protocol):
    """The request path a line takes (``api/inference.py``'s ``RequestPath``)."""

    async def prepare(self, principal: Principal, read: Callable[[], Awaitable[bytes]],
                      path: str, rid: str, presented: str | None,
                      terms: Terms | None = None) -> Prepared: ...


def check_metadata(metadata: Any) -> dict[str, str] | None:
    """OpenAI's metadata: at most 16 string pairs, keys up to 64 characters,
    values up to 512."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidRequest(f"metadata must be an object of at most {MAX_METADATA_PAIRS} pairs",
                             param="metadata")
    for key, value in metadata.items():
        if len(key) > 64 or not isinstance(value, str) or len(value) > 512:
            raise InvalidRequest("metadata keys are at most 64 characters and values strings of "
                                 "at most 512", param="metadata")
    return metadata


def batch_view(row: Batch) -> dict[str, Any]:
    """The batch as the API shows it (OpenAI's ``Batch``)."""
    errors = orjson.loads(row.errors) if row.errors else None
    view = {
        "id": row.id,
        "object": "batch",
        "endpoint": row.endpoint,
        "errors": {"object": "list", "data": errors} if errors else None,
        "input_file_id": row.input_file_id,
        "completion_window": row.completion_window,
        "status": row.status,
        "output_file_id": row.output_file_id,
        "error_file_id": row.error_file_id,
        "created_at": _ts(row.created_at),
        "in_progress_at": _ts(row.in_progress_at),
        "expires_at": _ts(row.expires_at),
        "finalizing_at": _ts(row.finalizing_at),
        "completed_at": _ts(row.completed_at),
        "failed_at": _ts(row.failed_at),
        "expired_at": _ts(row.expired_at),
        "cancelling_at": _ts(row.cancelling_at),
        "cancelled_at": _ts(row.cancelled_at),
        "request_counts": {"total": row.total, "completed": row.completed, "failed": row.failed},
        "usage": {"input_tokens": row.input_tokens or 0,
                  "input_tokens_details": {"cached_tokens": row.cached_tokens or 0},
                  "output_tokens": row.output_tokens or 0,
                  "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": (row.input_tokens or 0) + (row.output_tokens or 0)},
        "metadata": orjson.loads(row.batch_metadata) if row.batch_metadata else None,
    }
    # The spec's optional fields are not nullable: one not set is absent, not null.
    return {k: v for k, v in view.items() if v is not None}


def _output(rid: str, custom_id: str, status: int | None, body: Any,
            error: dict[str, str] | None = None) -> bytes:
    """One line of an output or error file (OpenAI's batch output line)."""
    response = None if status is None else {"status_code": status, "request_id": rid,
                                            "body": body}
    return orjson.dumps({"id": f"batch_req_{rid.replace('-', '')}", "custom_id": custom_id,
                         "response": response, "error": error})


def _expired_output(rid: str, custom_id: str) -> bytes:
    return _output(rid, custom_id, None, None, {
        "code": "batch_expired",
        "message": "This request could not be executed before the completion window expired."})


async def _given(raw: bytes) -> bytes:
    return raw


def _retry_after(exc: ModelfleetError) -> float:
    try:
        wait = float(exc.headers.get("Retry-After", "1"))
    except ValueError:
        wait = 1.0
    return min(max(wait, 0.2), 30.0)


class BatchService:
    def __init__(self, *, db: Database, gateway: Gateway, files: FileStore,
                 settings: BatchSettings, leases: JobSettings,
                 clock: Callable[[], datetime] = _now, owner: str | None = None) -> None:
        self.db = db
        self.gateway = gateway
        self.files = files
        self.settings = settings
        self.leases = leases
        self.clock = clock
        self.me = owner or owner_id()
        self.owner = TaskOwner("batches")
        self.path: LinePath | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping: set[str] = set()

    # -- the API ----------------------------------------------------------------

    async def create(self, principal: Principal, input_file_id: str, endpoint: str,
                     window: str, metadata: dict[str, str] | None) -> Batch:
        if endpoint not in BATCH_URLS:
            raise InvalidRequest(f"endpoint must be one of {', '.join(BATCH_URLS)}",
                                 param="endpoint", code="invalid_endpoint")
        if window not in WINDOWS:
            raise InvalidRequest("completion_window must be 24h", param="completion_window")
        try:
            source = await self.files.get(principal, input_file_id)
        except NotFound:
            raise NotFound(f"No such File object: {input_file_id}", code="file_not_found",
                           param="input_file_id") from None
        if source.purpose != "batch":
            raise InvalidRequest(f"file {input_file_id!r} has purpose {source.purpose!r}, not "
                                 "batch", param="input_file_id")
        others = set(source.endpoints.split(",")) - {endpoint}
        if others:
            raise InvalidRequest(f"the file's requests call {', '.join(sorted(others))}, not "
                                 f"the batch's endpoint {endpoint}", param="endpoint",
                                 code="mismatched_endpoint")
        now = self.clock()
        row = Batch(id=new_batch_id(), project_id=principal.project_id, key_id=principal.key_id,
                    endpoint=endpoint, input_file_id=source.id, completion_window=window,
                    status="validating", total=source.lines, completed=0, failed=0,
                    batch_metadata=orjson.dumps(metadata).decode() if metadata else None,
                    created_at=now, expires_at=now + timedelta(seconds=self.settings.window_s),
                    lease_owner=self.me, lease_expires_at=self._lease_end())
        async with self.db.session() as session, session.begin():
            session.add(row)
        self._start(row.id)
        return row

    async def get(self, principal: Principal, batch_id: str) -> Batch:
        """The batch, to a key of its project; 404 to anyone else."""
        async with self.db.session() as session:
            row = await session.get(Batch, batch_id)
        if row is None or row.project_id != principal.project_id:
            raise NotFound(f"No such Batch object: {batch_id}", code="batch_not_found",
                           param="batch_id")
        return row

    async def list(self, principal: Principal, after: str | None,
                   limit: int) -> tuple[list[Batch], bool]:
        """A page of the project's batches, newest first, and whether more follow."""
        query = select(Batch).where(Batch.project_id == principal.project_id)
        if after:
            query = query.where(Batch.id < after)
        query = query.order_by(Batch.id.desc()).limit(limit + 1)
        async with self.db.session() as session:
            rows = list((await session.execute(query)).scalars())
        return rows[:limit], len(rows) > limit

    async def cancel(self, principal: Principal, batch_id: str) -> Batch:
        row = await self.get(principal, batch_id)
        if row.status in ("cancelling", "cancelled"):
            return row
        if row.status not in ("validating", "in_progress"):
            raise Conflict(f"batch {batch_id!r} is {row.status}; it cannot be cancelled",
                           code="batch_not_cancellable")
        if not await self._move(row.id, row.status, status="cancelling",
                                cancelling_at=self.clock()):
            return await self.cancel(principal, batch_id)  # it moved meanwhile
        self._stopping.add(row.id)  # a runner here stops; one elsewhere sees it as it renews
        return await self.get(principal, batch_id)

    async def delete_file(self, principal: Principal, file_id: str) -> None:
        """Delete a file, unless an unfinished batch reads it (409)."""
        row = await self.files.get(principal, file_id)
        async with self.db.session() as session:
            using = await session.scalar(select(Batch.id).where(
                Batch.input_file_id == row.id, Batch.status.in_(ACTIVE)).limit(1))
        if using is not None:
            raise Conflict(f"file {file_id!r} is the input of batch {using}, which has not "
                           "finished", code="file_in_use")
        await self.files.delete(principal, file_id)

    # -- running ----------------------------------------------------------------

    def _lease_end(self) -> datetime:
        return self.clock() + timedelta(seconds=self.leases.lease_s)

    def _start(self, batch_id: str) -> None:
        if self.path is None:
            return  # not started yet: start() claims it
        task = self._tasks.get(batch_id)
        if task is None or task.done():
            self._tasks[batch_id] = self.owner.spawn(self._run(batch_id), batch_id)

    async def _move(self, batch_id: str, expected: str, **values: Any) -> bool:
        async with self.db.session() as session, session.begin():
            result = await session.execute(
                update(Batch).where(Batch.id == batch_id, Batch.status == expected)
                .values(**values))
        return bool(getattr(result, "rowcount", 0) == 1)

    async def _row(self, batch_id: str) -> Batch | None:
        async with self.db.session() as session:
            return await session.get(Batch, batch_id)

    async def _run(self, batch_id: str) -> None:
        """Run one batch in this task, which owns it: its lease is renewed beside it."""
        row = await self._row(batch_id)
        if row is None or row.lease_owner != self.me:
            return
        renewer = self.owner.spawn(self._renew(batch_id, asyncio.current_task()),
                                   f"lease:{batch_id}")
        try:
            if row.status == "validating":
                await self._validate(row)
            row = await self._row(batch_id)
            if row is not None and row.status in ("in_progress", "cancelling"):
                expired = await self._lines(row)
                await self._finalize(batch_id, expired)
            elif row is not None and row.status == "finalizing":
                await self._finalize(batch_id, False)
        finally:
            renewer.cancel()
            self._tasks.pop(batch_id, None)
        self._stopping.discard(batch_id)
        async with self.db.session() as session, session.begin():
            await session.execute(update(Batch).where(Batch.id == batch_id,
                                                      Batch.lease_owner == self.me)
                                  .values(lease_owner=None, lease_expires_at=None))

    async def _validate(self, row: Batch) -> None:
        async with self.db.session() as session:
            source = await session.get(StoredFile, row.input_file_id)
        if source is None or not self.files.path(source.id).exists():
            await self._move(row.id, "validating", status="failed", failed_at=self.clock(),
                             errors=orjson.dumps([{
                                 "code": "file_not_found", "line": None,
                                 "param": "input_file_id",
                                 "message": "the input file was deleted before the batch ran"}
                             ]).decode())
            return
        await self._move(row.id, "validating", status="in_progress",
                         in_progress_at=self.clock(), total=source.lines)

    async def _lines(self, row: Batch) -> bool:
        """Run the lines without a row yet, ``concurrency`` at a time, until all
        ran, the batch is cancelled, or its window passed (returns True then)."""
        assert self.path is not None
        lines = await asyncio.to_thread(request_lines, self.files.path(row.input_file_id))
        async with self.db.session() as session:
            done = set((await session.execute(
                select(BatchLine.line).where(BatchLine.batch_id == row.id))).scalars())
        pending: Iterator[int] = (i for i in range(len(lines)) if i not in done)
        expired = False
        if row.status == "cancelling":
            self._stopping.add(row.id)

        async def worker() -> None:
            nonlocal expired
            while row.id not in self._stopping:
                if self.clock() >= row.expires_at:
                    expired = True
                    return
                index = next(pending, None)  # taken only once it will run
                if index is None:
                    return
                await self._line(row, index, lines[index])

        async with asyncio.TaskGroup() as group:
            for _ in range(self.settings.concurrency):
                group.create_task(worker())
        if expired and row.id not in self._stopping:
            for index in pending:  # what no worker took: expired
                await self._expire_line(row, index, lines[index])
        return expired and row.id not in self._stopping

    async def _charged(self, rid: str) -> bool:
        async with self.db.session() as session:
            return await session.get(UsageRecord, rid) is not None

    async def _line(self, row: Batch, index: int, raw: bytes) -> None:
        """Run one line through the request path and keep its result."""
        assert self.path is not None
        entry = orjson.loads(raw)
        rid = line_request_id(row.id, index)
        project = self.gateway.metering.projects.project(row.project_id)
        principal = Principal(key_id=row.key_id, project_id=row.project_id,
                              project_name=project.name if project is not None else "",
                              scopes=frozenset({Scope.inference.value}), expires_at=None)
        terms = Terms(BATCH_PRIORITY, self.settings.discount_pct, self.settings.queue_timeout_s,
                      metered=not await self._charged(rid))
        body = orjson.dumps(entry["body"])
        usage: dict[str, Any] = {}
        while True:
            try:
                prepared = await self.path.prepare(principal, lambda: _given(body),
                                                   entry["url"], rid, None, terms)
                async with self.gateway.handle(prepared.call, prepared.starting) as answer:
                    answered = await prepared.render(answer.body or {})
                usage = prepared.call.usage
                result, ok = _output(rid, entry["custom_id"], 200, answered), True
            except Preempted:  # its replica went to interactive requests: not charged, again
                if row.id not in self._stopping and self.clock() < row.expires_at:
                    await asyncio.sleep(PREEMPTED_RETRY_S)
                    continue
                result, ok = _expired_output(rid, entry["custom_id"]), False
            except RateLimited as exc:  # a line waits for its limits, while its batch runs
                if row.id not in self._stopping and self.clock() < row.expires_at:
                    await asyncio.sleep(_retry_after(exc))
                    continue
                result, ok = _output(rid, entry["custom_id"], exc.status, exc.body()), False
            except ModelfleetError as exc:
                result, ok = _output(rid, entry["custom_id"], exc.status, exc.body()), False
            except Exception:
                log.exception("batch %s line %d failed", row.id, index)
                error = ModelfleetError("internal server error")
                result, ok = _output(rid, entry["custom_id"], 500, error.body()), False
            break
        await self._record(row.id, index, ok, result, usage)

    async def _expire_line(self, row: Batch, index: int, raw: bytes) -> None:
        entry = orjson.loads(raw)
        await self._record(row.id, index, False,
                           _expired_output(line_request_id(row.id, index), entry["custom_id"]))

    async def _record(self, batch_id: str, index: int, ok: bool, result: bytes,
                      usage: dict[str, Any] | None = None) -> None:
        """A finished line and the batch's counters and tokens, in one
        transaction (once)."""
        usage = usage or {}
        cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        async with self.db.session() as session, session.begin():
            if await session.get(BatchLine, (batch_id, index)) is not None:
                return
            session.add(BatchLine(batch_id=batch_id, line=index, ok=ok, result=result.decode(),
                                  created_at=self.clock()))
            counter = Batch.completed if ok else Batch.failed
            await session.execute(update(Batch).where(Batch.id == batch_id).values({
                counter: counter + 1,
                Batch.input_tokens: Batch.input_tokens + int(usage.get("prompt_tokens", 0)),
                Batch.output_tokens: Batch.output_tokens + int(usage.get("completion_tokens", 0)),
                Batch.cached_tokens: Batch.cached_tokens + int(cached or 0)}))

    async def _finalize(self, batch_id: str, expired: bool) -> None:
        """Write the output and error files, then end the batch."""
        row = await self._row(batch_id)
        if row is None:
            return
        if row.status == "in_progress":
            await self._move(batch_id, "in_progress", status="finalizing",
                             finalizing_at=self.clock())
        async with self.db.session() as session:
            results = list((await session.execute(
                select(BatchLine.ok, BatchLine.result).where(BatchLine.batch_id == batch_id)
                .order_by(BatchLine.line))).all())
        out = b"".join(r.encode() + b"\n" for ok, r in results if ok)
        err = b"".join(r.encode() + b"\n" for ok, r in results if not ok)
        ids: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
        for name, blob in (("output_file_id", out), ("error_file_id", err)):
            if blob:
                kept = await self.files.keep_output(
                    row.project_id, derived_file_id(batch_id, name),
                    f"{batch_id}_{name.split('_')[0]}.jsonl", blob)
                ids[name] = kept.id
        now = self.clock()
        if row.status == "cancelling":
            await self._move(batch_id, "cancelling", status="cancelled", cancelled_at=now, **ids)
        elif expired:
            await self._move(batch_id, "finalizing", status="expired", expired_at=now, **ids)
        else:
            await self._move(batch_id, "finalizing", status="completed", completed_at=now, **ids)

    async def _renew(self, batch_id: str, runner: asyncio.Task[Any] | None) -> None:
        """Keep this gateway's lease; a batch cancelled through another gateway
        stops starting lines; a lost lease stops the runner."""
        while True:
            await asyncio.sleep(self.leases.lease_s / 3)
            async with self.db.session() as session, session.begin():
                result = await session.execute(
                    update(Batch).where(Batch.id == batch_id, Batch.lease_owner == self.me)
                    .values(lease_expires_at=self._lease_end()))
                status = await session.scalar(select(Batch.status).where(Batch.id == batch_id))
            if status == "cancelling":
                self._stopping.add(batch_id)
            if getattr(result, "rowcount", 0) != 1 and runner is not None:
                log.warning("batch %s: lease lost; stopping its run here", batch_id)
                runner.cancel()
                return

    # -- start, stop, retention ---------------------------------------------------

    async def start(self, path: LinePath) -> dict[str, int]:
        """Take the batches whose lease expired or whose gateway is gone (after a
        restart: this gateway's own), then look again every claim interval."""
        self.path = path
        counts = await self.claim()
        self.owner.spawn(self._forever(self.claim, self.leases.claim_interval_s), "claimer")
        self.owner.spawn(self._forever(self.files.sweep, self.leases.sweep_interval_s),
                         "files-sweeper")
        return counts

    async def claim(self) -> dict[str, int]:
        now = self.clock()
        async with self.db.session() as session:
            rows = list((await session.execute(
                select(Batch).where(Batch.status.in_(ACTIVE)).order_by(Batch.id).limit(100)
            )).scalars())
        taken = 0
        for row in rows:
            expired = row.lease_expires_at is None or row.lease_expires_at <= now
            if row.lease_owner == self.me:
                task = self._tasks.get(row.id)
                if not expired or (task is not None and not task.done()):
                    continue  # running here (a runner that died lets its lease lapse)
            elif not (expired or _owner_gone(row.lease_owner)):
                continue
            async with self.db.session() as session, session.begin():
                cond = Batch.lease_owner.is_(None) if row.lease_owner is None \
                    else Batch.lease_owner == row.lease_owner
                result = await session.execute(update(Batch).where(Batch.id == row.id, cond)
                                               .values(lease_owner=self.me,
                                                       lease_expires_at=self._lease_end()))
            if getattr(result, "rowcount", 0) == 1:
                taken += 1
                self._start(row.id)
        if taken:
            log.info("batches resumed by %s: %d", self.me, taken)
        return {"resumed": taken}

    async def _forever(self, work: Callable[[], Awaitable[Any]], interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await work()
            except Exception:
                log.exception("batches: %s failed", getattr(work, "__name__", "work"))

    async def close(self) -> None:
        """Stop running batches here (lines in flight are cancelled and not
        charged); their leases end now, so they resume at once elsewhere or
        after a restart."""
        await self.owner.close()
        with contextlib.suppress(Exception):
            async with self.db.session() as session, session.begin():
                await session.execute(update(Batch).where(Batch.lease_owner == self.me)
                                      .values(lease_expires_at=self.clock()))
