"""Durable async jobs (image generation): accepted, queued, run once, kept.

    submit:  validate (400) → hold the worst case (403) → write inputs → row
             ``queued`` (committed before the client hears of it) → runner
    run:     fair queue for a slot (scale from zero, swapping) → row
             ``running`` → POST to the worker → write PNGs → row
             ``succeeded`` → settle per image → webhook
    restart: ``queued`` rows run again; ``running`` rows were cut short by
             the stop and are queued again until ``max_attempts`` runs, then
             ``failed`` with the reason

Every status change is a conditional UPDATE on the status it expects, so a
job cancelled while queued is never started, and a job is never finished
twice; its usage record's key is the job id, so it is never charged twice.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from sqlalchemy import select, update

from modelfleet.catalog import Catalog, ModelSpec
from modelfleet.db import Database
from modelfleet.engines.http import WorkerBroke, WorkerClient, WorkerUnreachable
from modelfleet.errors import (
    Conflict,
    DeadlineExceeded,
    ModelfleetError,
    ModelUnavailable,
    NotFound,
)
from modelfleet.ids import new_id
from modelfleet.keys import Principal
from modelfleet.ledger import Hold, Ledger
from modelfleet.metering import Metering
from modelfleet.metrics import Metrics
from modelfleet.openai.images import ImageJob
from modelfleet.scheduler import Claim, Scheduler
from modelfleet.settings import JobSettings
from modelfleet.tables import Job
from modelfleet.tasks import TaskOwner

log = logging.getLogger(__name__)

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
WORKER_PATH = "/v1/images/generate"
SIGNATURE_HEADER = "X-Modelfleet-Signature"


def _now() -> datetime:
    return datetime.now(UTC)


def _ts(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


class _Cancelled(Exception):
    """The job was cancelled between winning a slot and starting."""


class JobFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message[:1000]


@dataclass
class _Stored:
    """What the job row's ``params`` column holds."""

    params: dict[str, Any]
    base_url: str

    def dumps(self) -> str:
        return orjson.dumps({"params": self.params, "base_url": self.base_url}).decode()

    @classmethod
    def loads(cls, raw: str) -> _Stored:
        data = orjson.loads(raw)
        return cls(data["params"], data["base_url"])


class Signer:
    """Webhook signatures: HMAC-SHA256 over ``"{timestamp}.{body}"`` with the
    project's secret, sent as ``t=<unix seconds>,v1=<hex>``.  Each project's
    secret is derived from the server's signing key, so tenants cannot sign
    for one another."""

    def __init__(self, key_path: Path) -> None:
        self.key_path = key_path
        self._key: bytes | None = None

    def load(self) -> None:
        path = self.key_path
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        self._key = bytes.fromhex(path.read_text().strip())

    def secret(self, project_id: str) -> str:
        if self._key is None:
            self.load()
        assert self._key is not None
        return "whsec_" + hmac.new(self._key, f"webhook:{project_id}".encode(),
                                   hashlib.sha256).hexdigest()

    def sign(self, project_id: str, body: bytes, timestamp: int) -> str:
        digest = hmac.new(self.secret(project_id).encode(), str(timestamp).encode() + b"." + body,
                          hashlib.sha256).hexdigest()
        return f"t={timestamp},v1={digest}"


def verify_signature(secret: str, body: bytes, header: str, tolerance_s: float = 300.0,
                     now: float | None = None) -> bool:
    """What a webhook receiver does (documented in docs/jobs.md; used by the tests)."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((now or time.time()) - timestamp) > tolerance_s:
        return False
    expected = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body,
                        hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts.get("v1", ""))


class JobService:
    def __init__(self, *, db: Database, catalog: Catalog, scheduler: Scheduler,
                 client: WorkerClient, metering: Metering, ledger: Ledger, metrics: Metrics,
                 settings: JobSettings, results_dir: Path, signer: Signer,
                 clock: Callable[[], datetime] = _now) -> None:
        self.db = db
        self.catalog = catalog
        self.scheduler = scheduler
        self.client = client
        self.metering = metering
        self.ledger = ledger
        self.metrics = metrics
        self.settings = settings
        self.results_dir = results_dir
        self.signer = signer
        self.clock = clock
        self.owner = TaskOwner("jobs")
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._done: dict[str, asyncio.Event] = {}
        self._user_cancelled: set[str] = set()
        self._finished: set[str] = set()

    # -- files ------------------------------------------------------------------

    def result_path(self, job_id: str, index: int) -> Path:
        return self.results_dir / job_id / f"{index}.png"

    def _inputs_dir(self, job_id: str) -> Path:
        return self.results_dir / "inputs" / job_id

    # -- the request path ---------------------------------------------------------

    async def submit(self, principal: Principal, spec: ModelSpec, job: ImageJob,
                     base_url: str) -> tuple[Job, dict[str, str]]:
        """Accept a job: hold its worst-case cost, keep its inputs, commit its row."""
        headers: dict[str, str] = {}
        hold: Hold | None = None
        if self.metering.enabled:
            plan = self.metering.projects.plan_of(principal.project_id)
            admission = self.metering.limiter.admit(plan, principal.key_id, principal.project_id, 0)
            self.metering.limiter.release(admission, 0)  # a job counts per request, not while queued
            headers = admission.headers
            hold = self.ledger.hold(principal.project_id, spec.prices.per_image * job.images)
        job_id = new_id()
        try:
            inputs = self._inputs_dir(job_id)
            if job.inputs:
                await asyncio.to_thread(_write_files, inputs, job.inputs)
            now = self.clock()
            row = Job(id=job_id, project_id=principal.project_id, key_id=principal.key_id,
                      model_id=spec.id, job_type="image", status="queued",
                      params=_Stored(job.params, base_url).dumps(), input_images=len(job.inputs),
                      images=0, attempts=0, cost=0, webhook_url=job.webhook_url,
                      webhook_state="none", webhook_attempts=0, created_at=now)
            async with self.db.session() as session, session.begin():
                session.add(row)
        except BaseException:
            if hold is not None:
                self.ledger.release(hold)
            shutil.rmtree(self._inputs_dir(job_id), ignore_errors=True)
            raise
        self._start(job_id, hold)
        return row, headers

    def _start(self, job_id: str, hold: Hold | None) -> None:
        self._done.setdefault(job_id, asyncio.Event())
        self._tasks[job_id] = self.owner.spawn(self._run(job_id, hold), job_id)

    async def get(self, principal: Principal, job_id: str) -> Job:
        """The job, to a key of its project; 404 to anyone else (ids are not probed)."""
        async with self.db.session() as session:
            row = await session.get(Job, job_id)
        if row is None or row.project_id != principal.project_id:
            raise NotFound(f"job {job_id!r} does not exist", code="job_not_found")
        return row

    async def list(self, principal: Principal, status: str | None, limit: int) -> list[Job]:
        query = select(Job).where(Job.project_id == principal.project_id)
        if status:
            query = query.where(Job.status == status)
        query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
        async with self.db.session() as session:
            return list((await session.execute(query)).scalars())

    async def cancel(self, principal: Principal, job_id: str) -> Job:
        row = await self.get(principal, job_id)
        if row.status == "cancelled":
            return row
        if row.status != "queued":
            raise Conflict(f"job {job_id!r} is {row.status}; only a queued job can be cancelled",
                           code="job_not_cancellable")
        if not await self._move(job_id, "queued", status="cancelled", finished_at=self.clock(),
                                error_code="cancelled", error_message="cancelled by the client",
                                webhook_state="pending" if row.webhook_url else "none"):
            return await self.cancel(principal, job_id)  # it moved meanwhile: say what it is now
        self._user_cancelled.add(job_id)
        task = self._tasks.get(job_id)
        if task is not None and not task.done():
            task.cancel()  # the runner settles it and sends the webhook
        else:
            await self._finish_side_effects(job_id)
        return await self.get(principal, job_id)

    async def wait(self, job_id: str, timeout: float) -> bool:
        """Wait until the job has ended; False if the timeout passed first."""
        event = self._done.setdefault(job_id, asyncio.Event())
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            return False
        return True

    async def read_result(self, principal: Principal, job_id: str, index: int) -> bytes:
        row = await self.get(principal, job_id)
        if row.status != "succeeded":
            raise Conflict(f"job {job_id!r} is {row.status}; it has no result",
                           code="result_not_ready")
        if row.expires_at is not None and row.expires_at <= self.clock():
            raise NotFound(f"the result of job {job_id!r} expired and was deleted",
                           code="result_expired")
        if not 0 <= index < row.images:
            raise NotFound(f"job {job_id!r} has {row.images} images; there is no image {index}",
                           code="result_not_found")
        try:
            return await asyncio.to_thread(self.result_path(job_id, index).read_bytes)
        except FileNotFoundError:
            raise NotFound(f"the result of job {job_id!r} is no longer stored",
                           code="result_expired") from None

    # -- running ----------------------------------------------------------------

    async def _move(self, job_id: str, expected: str, **values: Any) -> bool:
        async with self.db.session() as session, session.begin():
            result = await session.execute(
                update(Job).where(Job.id == job_id, Job.status == expected).values(**values))
        return bool(getattr(result, "rowcount", 0) == 1)

    async def _run(self, job_id: str, hold: Hold | None) -> None:
        async with self.db.session() as session:
            row = await session.get(Job, job_id)
        if row is None or row.status != "queued":
            return
        stored = _Stored.loads(row.params)
        spec = self.catalog.resolve(row.model_id)
        status, images, wait_s, run_s = "failed", 0, 0.0, 0.0
        try:
            if spec is None:
                raise JobFailed("model_not_found", f"model {row.model_id!r} is no longer served")
            images, wait_s, run_s = await self._generate(row, spec, stored)
            status = "succeeded"
        except asyncio.CancelledError:
            if job_id not in self._user_cancelled:  # the server is stopping: runs after restart
                if hold is not None:
                    self.ledger.release(hold)
                raise
            status = "cancelled"
        except _Cancelled:
            status = "cancelled"
        except JobFailed as exc:
            await self._move(job_id, "running", status="failed", finished_at=self.clock(),
                             error_code=exc.code, error_message=exc.message,
                             webhook_state="pending" if row.webhook_url else "none") or \
                await self._move(job_id, "queued", status="failed", finished_at=self.clock(),
                                 error_code=exc.code, error_message=exc.message,
                                 webhook_state="pending" if row.webhook_url else "none")
        self._settle(row, spec, hold, status, images, wait_s, run_s)
        await self._finish_side_effects(job_id)

    async def _generate(self, row: Job, spec: ModelSpec,
                        stored: _Stored) -> tuple[int, float, float]:
        queue = self.scheduler.queue(spec.id)
        plan = self.metering.projects.plan_of(row.project_id)
        claim = Claim(project=row.project_id, weight=plan.weight, priority=plan.priority,
                      cap=plan.project_concurrency)
        payload = dict(stored.params)
        if row.input_images:
            inputs = self._inputs_dir(row.id)
            payload["input_images_base64"] = [
                base64.b64encode(data).decode() for data in await asyncio.to_thread(
                    _read_files, inputs, row.input_images)]
        enqueued = queue.clock()
        deadline = enqueued + self.settings.queue_timeout_s
        for attempt in range(3):
            try:
                lease = await queue.acquire(deadline, enqueued, claim)
            except ModelUnavailable as exc:
                raise JobFailed("model_unavailable", exc.message) from None
            except DeadlineExceeded:
                raise JobFailed("queue_timeout", f"no replica of {spec.id!r} was free within "
                                f"{self.settings.queue_timeout_s:g}s") from None
            started = queue.clock()
            try:
                if not await self._move(row.id, "queued", status="running", started_at=self.clock(),
                                        attempts=row.attempts + 1, deployment_id=lease.replica.id):
                    raise _Cancelled  # cancelled between the queue and here
                try:
                    async with asyncio.timeout(spec.scaling.request_timeout_s):
                        reply = await self.client.post(lease.replica.base_url + WORKER_PATH,
                                                       payload, lease.replica.headers)
                except TimeoutError:
                    raise JobFailed("request_timeout", f"the worker did not finish within "
                                    f"{spec.scaling.request_timeout_s:g}s") from None
                except WorkerUnreachable as exc:
                    await queue.pool.check_replica(lease.replica)
                    if attempt == 2:
                        raise JobFailed("model_unavailable", f"no replica answered: {exc}") from None
                    await self._move(row.id, "running", status="queued")
                    continue
                except WorkerBroke as exc:
                    await queue.pool.check_replica(lease.replica)
                    raise JobFailed("worker_failed", f"the worker failed: {exc}") from None
            finally:
                queue.release(lease)
            run_s = queue.clock() - started
            if reply.status != 200:
                err = reply.body.get("error")
                message = err.get("message") if isinstance(err, dict) else None
                code = "invalid_request" if reply.status == 400 else "worker_failed"
                raise JobFailed(code, f"the worker answered {reply.status}: {message or reply.body}")
            pngs = [base64.b64decode(b) for b in reply.body.get("images") or []]
            if not pngs:
                raise JobFailed("worker_failed", "the worker returned no images")
            await asyncio.to_thread(_write_files, self.results_dir / row.id, pngs)
            now = self.clock()
            expires = now + timedelta(seconds=self.settings.retention_s)
            cost = spec.prices.per_image * len(pngs) if self.metering.enabled else 0
            if not await self._move(row.id, "running", status="succeeded", finished_at=now,
                                    images=len(pngs), expires_at=expires, cost=cost,
                                    webhook_state="pending" if row.webhook_url else "none"):
                raise JobFailed("conflict", "the job changed state while it ran")
            return len(pngs), started - enqueued, run_s
        raise AssertionError("unreachable")  # pragma: no cover

    def _settle(self, row: Job, spec: ModelSpec | None, hold: Hold | None, status: str,
                images: int, wait_s: float, run_s: float) -> None:
        model = spec.id if spec else row.model_id
        self.metrics.request_finished(model, row.project_id, status, wait_s, run_s, 0, 0)
        if spec is not None and status == "succeeded":
            self.scheduler.queue(spec.id).stats.record(wait_s, run_s)
        if hold is None:
            return
        cost = (spec.prices.per_image * images) if spec and status == "succeeded" else 0
        self.ledger.settle(hold, cost, {
            "request_id": row.id, "project_id": row.project_id, "key_id": row.key_id,
            "model_id": model, "status": status, "input_tokens": 0, "output_tokens": 0,
            "images": images, "wait_ms": round(wait_s * 1000), "run_ms": round(run_s * 1000),
            "total_ms": round((wait_s + run_s) * 1000), "created_at": self.clock(),
        })

    async def _finish_side_effects(self, job_id: str) -> None:
        """Once a job has ended: inputs deleted, waiters woken, webhook sent (once)."""
        if job_id in self._finished:
            return
        self._finished.add(job_id)
        asyncio.get_running_loop().call_later(600, self._forget, job_id)
        self._tasks.pop(job_id, None)
        self._user_cancelled.discard(job_id)
        shutil.rmtree(self._inputs_dir(job_id), ignore_errors=True)
        self._done.setdefault(job_id, asyncio.Event()).set()
        self.owner.spawn(self._deliver(job_id), f"webhook:{job_id}")

    def _forget(self, job_id: str) -> None:
        self._finished.discard(job_id)
        self._done.pop(job_id, None)

    # -- webhooks ---------------------------------------------------------------

    async def _deliver(self, job_id: str) -> None:
        async with self.db.session() as session:
            row = await session.get(Job, job_id)
        if row is None or not row.webhook_url or row.webhook_state != "pending":
            return
        body = orjson.dumps(job_view(row, _Stored.loads(row.params).base_url))
        attempt = row.webhook_attempts
        while attempt < self.settings.webhook_attempts:
            timestamp = int(time.time())
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "modelfleet-webhooks",
                "X-Modelfleet-Event": f"job.{row.status}",
                "X-Modelfleet-Job-Id": row.id,
                "X-Modelfleet-Delivery": f"{row.id}-{attempt + 1}",
                SIGNATURE_HEADER: self.signer.sign(row.project_id, body, timestamp),
            }
            ok, detail = await self._post_hook(row.webhook_url, body, headers)
            attempt += 1
            await self._set_webhook(job_id, "delivered" if ok else "pending", attempt)
            if ok:
                return
            log.warning("webhook for job %s: attempt %d failed (%s)", job_id, attempt, detail)
            if attempt < self.settings.webhook_attempts:
                await asyncio.sleep(self.settings.webhook_backoff_s * 2 ** (attempt - 1))
        await self._set_webhook(job_id, "failed", attempt)

    async def _post_hook(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[bool, str]:
        try:
            async with self.client.session.post(
                url, data=body, headers=headers, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.settings.webhook_timeout_s),
            ) as resp:
                await resp.read()
                return 200 <= resp.status < 300, f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            return False, str(exc) or type(exc).__name__

    async def _set_webhook(self, job_id: str, state: str, attempts: int) -> None:
        async with self.db.session() as session, session.begin():
            await session.execute(update(Job).where(Job.id == job_id).values(
                webhook_state=state, webhook_attempts=attempts))

    # -- start, stop, retention ---------------------------------------------------

    async def recover(self) -> dict[str, int]:
        """After a start: run what was accepted and not finished; resend webhooks."""
        counts = {"requeued": 0, "failed": 0, "resumed": 0, "webhooks": 0}
        async with self.db.session() as session:
            rows = list((await session.execute(
                select(Job).where(Job.status.in_(("queued", "running")))
                .order_by(Job.created_at))).scalars())
            hooks = list((await session.execute(
                select(Job.id).where(Job.webhook_state == "pending",
                                     Job.status.in_(TERMINAL)))).scalars())
        for row in rows:
            if row.status == "running":
                if row.attempts >= self.settings.max_attempts:
                    await self._move(row.id, "running", status="failed", finished_at=self.clock(),
                                     error_code="interrupted",
                                     error_message=f"the server stopped while this job ran, "
                                     f"{row.attempts} times; not retried again",
                                     webhook_state="pending" if row.webhook_url else "none")
                    counts["failed"] += 1
                    hooks.append(row.id)
                    continue
                await self._move(row.id, "running", status="queued")
                counts["requeued"] += 1
            spec = self.catalog.resolve(row.model_id)
            hold = None
            if self.metering.enabled and spec is not None:
                try:
                    hold = self.ledger.hold(row.project_id, spec.prices.per_image *
                                            int(_Stored.loads(row.params).params.get("n", 1)))
                except ModelfleetError as exc:
                    await self._move(row.id, "queued", status="failed", finished_at=self.clock(),
                                     error_code=exc.code, error_message=exc.message,
                                     webhook_state="pending" if row.webhook_url else "none")
                    hooks.append(row.id)
                    counts["failed"] += 1
                    continue
            counts["resumed"] += 1
            self._start(row.id, hold)
        for job_id in hooks:
            counts["webhooks"] += 1
            self.owner.spawn(self._deliver(job_id), f"webhook:{job_id}")
        if any(counts.values()):
            log.info("jobs after restart: %s", counts)
        self.owner.spawn(self._sweep_forever(), "sweeper")
        return counts

    async def sweep(self) -> int:
        """Delete the files of results past their retention; returns how many jobs."""
        now = self.clock()
        async with self.db.session() as session:
            expired = list((await session.execute(
                select(Job.id).where(Job.status == "succeeded", Job.images > 0,
                                     Job.expires_at <= now))).scalars())
        for job_id in expired:
            await asyncio.to_thread(shutil.rmtree, self.results_dir / job_id, True)
        if expired:
            async with self.db.session() as session, session.begin():
                await session.execute(update(Job).where(Job.id.in_(expired)).values(images=0))
        return len(expired)

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:
                log.exception("could not delete expired results")
            await asyncio.sleep(self.settings.sweep_interval_s)

    async def close(self) -> None:
        await self.owner.close()


def _write_files(folder: Path, blobs: list[bytes]) -> None:
    """Each blob as folder/<i>.png, written whole (temp file, then rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, blob in enumerate(blobs):
        tmp = folder / f".{i}.png.partial"
        tmp.write_bytes(blob)
        os.replace(tmp, folder / f"{i}.png")


def _read_files(folder: Path, count: int) -> list[bytes]:
    try:
        return [(folder / f"{i}.png").read_bytes() for i in range(count)]
    except FileNotFoundError:
        raise JobFailed("input_missing", "the job's input images are no longer stored") from None


def job_view(row: Job, base_url: str) -> dict[str, Any]:
    """The job as the API shows it (and as webhooks send it)."""
    url = f"{base_url.rstrip('/')}/v1/inference/jobs/{row.id}"
    base = f"{url}/result"
    created, started, finished = row.created_at, row.started_at, row.finished_at
    timings: dict[str, int | None] = {
        "queue_ms": _ms(created, started or finished),
        "run_ms": _ms(started, finished),
        "total_ms": _ms(created, finished),
    }
    count = row.images
    params = _Stored.loads(row.params).params
    out: dict[str, Any] = {
        "id": row.id,
        "job_id": row.id,
        "object": "job",
        "url": url,
        "job_type": row.job_type,
        "model": row.model_id,
        "status": row.status,
        "created_at": _ts(created),
        "started_at": _ts(started),
        "finished_at": _ts(finished),
        "timings": timings,
        "attempts": row.attempts,
        "params": params,
        "input_images": row.input_images,
        "images": count,
        "result_url": base,
        "result_urls": [base if i == 0 else f"{base}/{i}" for i in range(count)]
        if row.status == "succeeded" else [],
        "expires_at": _ts(row.expires_at),
        "cost": row.cost,
        "error": {"code": row.error_code, "message": row.error_message}
        if row.error_code else None,
        "webhook": {"url": row.webhook_url, "state": row.webhook_state,
                    "attempts": row.webhook_attempts} if row.webhook_url else None,
    }
    return out


def _ms(start: datetime | None, end: datetime | None) -> int | None:
    if start is None or end is None:
        return None
    return max(0, round((end - start).total_seconds() * 1000))

