"""Durable async jobs (image and video generation): accepted, queued, run
once, kept.  A job type (``OUTPUTS``) says which worker endpoint makes its
results, how they are stored and what they cost; the rest is shared.

    submit:  validate (400) → rate limits (429) and the worst case against the
             balance (403) → write inputs → row ``queued`` with this
             gateway's lease (committed before the client hears of it) → runner
    run:     ``Gateway.handle`` (the one request path): hold the worst case →
             fair queue for a slot (scale from zero, swapping) → row
             ``running`` → POST to the worker → write its PNGs (or MP4) →
             row ``succeeded`` → settled per result in handle's cleanup → webhook
    leases:  the gateway running a job renews its lease; a job whose lease
             expired (its gateway died, or its owner process is gone) is
             claimed by another gateway: ``queued`` rows run again,
             ``running`` rows were cut short and are queued again until
             ``max_attempts`` runs, then ``failed`` with the reason

Every status change is a conditional UPDATE on the status it expects, and a
claim is a conditional UPDATE on the lease, so one gateway runs each job; a
job cancelled while queued is never started, and a job is never finished
twice; its usage record's key is the job id, so it is never charged twice.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from sqlalchemy import and_, delete, or_, select, update

from modelfleet.admission import Ask, refuse_credit
from modelfleet.catalog import Catalog, ModelSpec
from modelfleet.db import Database
from modelfleet.engines.http import WorkerClient
from modelfleet.errors import Conflict, ModelfleetError, NotFound
from modelfleet.gateway import Call, Gateway
from modelfleet.ids import new_id
from modelfleet.keys import Principal
from modelfleet.ledger import Ledger
from modelfleet.metering import Metering
from modelfleet.netguard import (
    NOT_ALLOWED,
    DestinationNotAllowed,
    Guard,
    Policy,
    not_allowed,
)
from modelfleet.openai.images import ImageJob
from modelfleet.openai.videos import VideoJob, video_cost
from modelfleet.scheduler import Lease
from modelfleet.settings import JobSettings
from modelfleet.states import TERMINAL, JobState, RequestState
from modelfleet.tables import Job, UsageRecord
from modelfleet.tasks import TaskOwner
from modelfleet.workers.common import pid_alive

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Modelfleet-Signature"


def _now() -> datetime:
    return datetime.now(UTC)


def _ts(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


class _Cancelled(Exception):
    """The job was cancelled (or taken by another gateway) between winning a
    slot and starting."""


def owner_id() -> str:
    """This gateway process, as written in the leases it holds: host, pid, nonce."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"


def _owner_gone(owner: str | None) -> bool:
    """True when ``owner`` is a process of this host that no longer runs."""
    if not owner:
        return True
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname()[:40] or not pid.isdigit():
        return False
    return not pid_alive(int(pid))


@dataclass(frozen=True)
class Output:
    """What one job type asks its worker for, keeps and charges: ``count``
    results, each at ``unit_price`` (the usage record's ``images``)."""

    path: str  # the worker's endpoint
    field: str  # the answer's list of base64 results
    suffix: str  # of each result file
    media_type: str
    unit_price: Callable[[ModelSpec, dict[str, Any]], int]
    count: Callable[[dict[str, Any]], int]


OUTPUTS = {
    "image": Output("/v1/images/generate", "images", "png", "image/png",
                    lambda spec, _: spec.prices.per_image, lambda params: int(params.get("n", 1))),
    # one video per job, priced by its length
    "video": Output("/v1/videos/generate", "videos", "mp4", "video/mp4", video_cost,
                    lambda _: 1),
}


def _price(job_type: str, spec: ModelSpec, params: dict[str, Any]) -> tuple[int, int]:
    """(the price of one result, the worst case of the job)."""
    out = OUTPUTS[job_type]
    unit = out.unit_price(spec, params)
    return unit, unit * out.count(params)


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
    def __init__(self, *, db: Database, catalog: Catalog, gateway: Gateway,
                 client: WorkerClient, metering: Metering, ledger: Ledger,
                 settings: JobSettings, results_dir: Path, signer: Signer,
                 clock: Callable[[], datetime] = _now, owner: str | None = None) -> None:
        self.db = db
        self.catalog = catalog
        self.gateway = gateway
        self.client = client
        self.metering = metering
        self.ledger = ledger
        self.settings = settings
        self.me = owner or owner_id()
        self.results_dir = results_dir
        self.signer = signer
        # Webhooks connect only where the address policy allows (netguard).
        self.guard = Guard(Policy.parse(settings.webhook_allow))
        self._hooks: aiohttp.ClientSession | None = None
        self.clock = clock
        self.owner = TaskOwner("jobs")
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._done: dict[str, asyncio.Event] = {}
        self._user_cancelled: set[str] = set()
        self._finished: set[str] = set()

    # -- files ------------------------------------------------------------------

    def result_path(self, job_id: str, index: int, job_type: str = "image") -> Path:
        return self.results_dir / job_id / f"{index}.{OUTPUTS[job_type].suffix}"

    def _inputs_dir(self, job_id: str) -> Path:
        return self.results_dir / "inputs" / job_id

    # -- the request path ---------------------------------------------------------

    async def submit(self, principal: Principal, spec: ModelSpec, job: ImageJob | VideoJob,
                     base_url: str) -> tuple[Job, dict[str, str]]:
        """Accept a job: check its limits and its worst case against the balance,
        keep its inputs, commit its row; its runner holds the money when it runs."""
        headers: dict[str, str] = {}
        if self.metering.enabled:
            plan = self.metering.projects.plan_of(principal.project_id)
            # a job counts one request now; it does not hold a concurrency slot while queued
            grant = await self.metering.take(
                Ask(new_id(), plan, principal.key_id, principal.project_id))
            await self.metering.store.settle(grant, used_tokens=0, cost=0)
            headers = grant.headers
            worst = _price(job.job_type, spec, job.params)[1]
            balance, held = await self.metering.store.balance(principal.project_id)
            if worst > balance - held:
                raise refuse_credit(worst, balance - held)
        job_id = new_id()
        try:
            inputs = self._inputs_dir(job_id)
            if job.inputs:
                await asyncio.to_thread(_write_files, inputs, job.inputs)
            now = self.clock()
            row = Job(id=job_id, project_id=principal.project_id, key_id=principal.key_id,
                      model_id=spec.id, job_type=job.job_type, status=JobState.queued.value,
                      params=_Stored(job.params, base_url).dumps(), input_images=len(job.inputs),
                      images=0, attempts=0, cost=0, webhook_url=job.webhook_url,
                      webhook_state="none", webhook_attempts=0, created_at=now,
                      lease_owner=self.me, lease_expires_at=self._lease_end())
            async with self.db.session() as session, session.begin():
                session.add(row)
        except BaseException:
            shutil.rmtree(self._inputs_dir(job_id), ignore_errors=True)
            raise
        self._start(job_id)
        return row, headers

    def _lease_end(self) -> datetime:
        return self.clock() + timedelta(seconds=self.settings.lease_s)

    def _start(self, job_id: str) -> None:
        self._done.setdefault(job_id, asyncio.Event())
        self._tasks[job_id] = self.owner.spawn(self._run(job_id), job_id)

    async def get(self, principal: Principal, job_id: str) -> Job:
        """The job, to a key of its project; 404 to anyone else (ids are not probed)."""
        async with self.db.session() as session:
            row = await session.get(Job, job_id)
        if row is None or row.project_id != principal.project_id:
            raise NotFound(f"job {job_id!r} does not exist", code="job_not_found")
        return row

    async def list(self, principal: Principal, status: str | None, limit: int, *,
                   job_type: str | None = None, after: str | None = None,
                   ascending: bool = False) -> list[Job]:
        """This project's jobs, newest first (or oldest first); ``after``: those
        past the job of that id in this order (ids are time-ordered)."""
        query = select(Job).where(Job.project_id == principal.project_id)
        if status:
            query = query.where(Job.status == status)
        if job_type:
            query = query.where(Job.job_type == job_type)
        if after:
            query = query.where(Job.id > after if ascending else Job.id < after)
        order = (Job.created_at.asc(), Job.id.asc()) if ascending \
            else (Job.created_at.desc(), Job.id.desc())
        query = query.order_by(*order).limit(limit)
        async with self.db.session() as session:
            return list((await session.execute(query)).scalars())

    async def delete(self, principal: Principal, job_id: str) -> None:
        """Delete a finished job of this project and its results (409 while it
        is queued or running: cancel it first)."""
        row = await self.get(principal, job_id)
        if row.status not in TERMINAL:
            raise Conflict(f"job {job_id!r} is {row.status}; only a finished job can be "
                           "deleted (cancel a queued one first)", code="job_not_finished")
        await asyncio.to_thread(shutil.rmtree, self.results_dir / job_id, True)
        async with self.db.session() as session, session.begin():
            await session.execute(delete(Job).where(Job.id == job_id,
                                                    Job.status.in_([t.value for t in TERMINAL])))

    async def cancel(self, principal: Principal, job_id: str) -> Job:
        row = await self.get(principal, job_id)
        if row.status == JobState.cancelled:
            return row
        if row.status != JobState.queued:
            raise Conflict(f"job {job_id!r} is {row.status}; only a queued job can be cancelled",
                           code="job_not_cancellable")
        if not await self._move(job_id, JobState.queued, status=JobState.cancelled.value,
                                finished_at=self.clock(),
                                error_code="cancelled", error_message="cancelled by the client",
                                webhook_state="pending" if row.webhook_url else "none"):
            return await self.cancel(principal, job_id)  # it moved meanwhile: say what it is now
        self._user_cancelled.add(job_id)
        task = self._tasks.get(job_id)
        if task is not None and not task.done():
            task.cancel()  # the runner settles it and sends the webhook
        elif row.lease_owner is None or row.lease_owner == self.me:
            await self._finish_side_effects(job_id)
            self.owner.spawn(self._deliver(job_id), f"webhook:{job_id}")
        # else: the gateway holding its lease stops it and sends the webhook
        return await self.get(principal, job_id)

    async def wait(self, job_id: str, timeout: float) -> bool:
        """Wait until the job has ended; False if the timeout passed first."""
        event = self._done.setdefault(job_id, asyncio.Event())
        try:
            async with asyncio.timeout(timeout):
                while not event.is_set():
                    # another gateway may run it (after a takeover): look at the row too
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.5):
                            await event.wait()
                    if not event.is_set() and await self._status(job_id) in TERMINAL:
                        return True
        except TimeoutError:
            return False
        return True

    async def _status(self, job_id: str) -> str | None:
        async with self.db.session() as session:
            return await session.scalar(select(Job.status).where(Job.id == job_id))

    async def read_result(self, principal: Principal, job_id: str, index: int) -> bytes:
        return (await self.read_media(principal, job_id, index))[0]

    async def read_media(self, principal: Principal, job_id: str,
                         index: int) -> tuple[bytes, str]:
        """A result file of the job and its media type (image/png, video/mp4)."""
        row = await self.get(principal, job_id)
        if row.status != JobState.succeeded:
            raise Conflict(f"job {job_id!r} is {row.status}; it has no result",
                           code="result_not_ready")
        if row.expires_at is not None and row.expires_at <= self.clock():
            raise NotFound(f"the result of job {job_id!r} expired and was deleted",
                           code="result_expired")
        if not 0 <= index < row.images:
            raise NotFound(f"job {job_id!r} has {row.images} results; there is no result {index}",
                           code="result_not_found")
        try:
            path = self.result_path(job_id, index, row.job_type)
            return await asyncio.to_thread(path.read_bytes), OUTPUTS[row.job_type].media_type
        except FileNotFoundError:
            raise NotFound(f"the result of job {job_id!r} is no longer stored",
                           code="result_expired") from None

    # -- running ----------------------------------------------------------------

    async def _move(self, job_id: str, expected: str, **values: Any) -> bool:
        async with self.db.session() as session, session.begin():
            result = await session.execute(
                update(Job).where(Job.id == job_id, Job.status == expected).values(**values))
        return bool(getattr(result, "rowcount", 0) == 1)

    async def _run(self, job_id: str) -> None:
        """Run one job in this task, which owns it: its lease is renewed beside it."""
        async with self.db.session() as session:
            row = await session.get(Job, job_id)
        if row is None or row.lease_owner != self.me:
            return
        renewer = self.owner.spawn(self._renew(job_id, asyncio.current_task()), f"lease:{job_id}")
        try:
            if row.status == JobState.queued:
                await self._execute(row)
            await self._finish_side_effects(job_id)
            await self._deliver(job_id)
        finally:
            renewer.cancel()
        await self._release_lease(job_id)

    async def _execute(self, row: Job) -> None:
        spec = self.catalog.resolve(row.model_id)
        hook = "pending" if row.webhook_url else "none"
        try:
            if spec is None:
                raise JobFailed("model_not_found", f"model {row.model_id!r} is no longer served")
            if await self._already_charged(row, hook):
                return
            await self._generate(row, spec)
        except asyncio.CancelledError:
            if row.id not in self._user_cancelled:  # the server is stopping: runs after restart
                raise
        except _Cancelled:
            pass
        except JobFailed as exc:
            for expected in (JobState.running, JobState.queued):
                if await self._move(row.id, expected, status=JobState.failed.value,
                                    finished_at=self.clock(), error_code=exc.code,
                                    error_message=exc.message, webhook_state=hook):
                    break

    async def _already_charged(self, row: Job, hook: str) -> bool:
        """A run whose gateway died after the job was charged (its results
        written, its usage row committed) but before its row said succeeded:
        marked succeeded now, from the usage row, without running (or charging)
        it again."""
        async with self.db.session() as session:
            usage = await session.get(UsageRecord, row.id)
        if usage is None or usage.images <= 0:
            return False
        now = self.clock()
        if await self._move(row.id, JobState.queued, status=JobState.succeeded.value,
                            finished_at=now, images=usage.images, cost=usage.cost,
                            expires_at=now + timedelta(seconds=self.settings.retention_s),
                            webhook_state=hook):
            log.info("job %s was charged by an interrupted run; marked succeeded", row.id)
        return True

    def _call(self, row: Job, spec: ModelSpec, payload: dict[str, Any]) -> Call:
        call = Call(request_id=row.id, route_model=row.model_id, spec=spec, principal=Principal(
            key_id=row.key_id, project_id=row.project_id, project_name="", scopes=frozenset(),
            expires_at=None), path=OUTPUTS[row.job_type].path, payload=payload,
            claim=self.metering.claim_for(row.project_id),
            queue_timeout_s=self.settings.queue_timeout_s)
        if self.metering.enabled:
            unit, worst = _price(row.job_type, spec, payload)
            ask = Ask(row.id, self.metering.projects.plan_of(row.project_id), row.key_id,
                      row.project_id, amount=worst, counted=False,
                      ttl_s=self.settings.queue_timeout_s + spec.scaling.request_timeout_s)
            call.admit = lambda: self.metering.admit(ask, spec, per_image=unit)
        return call

    async def _generate(self, row: Job, spec: ModelSpec) -> None:
        payload = dict(_Stored.loads(row.params).params)
        if row.input_images:
            payload["input_images_base64"] = [
                base64.b64encode(data).decode() for data in await asyncio.to_thread(
                    _read_files, self._inputs_dir(row.id), row.input_images)]
        call = self._call(row, spec, payload)
        started = False

        async def starting(lease: Lease) -> None:
            nonlocal started
            if started:  # a retry on another replica: the row is running already
                await self._move(row.id, JobState.running, deployment_id=lease.replica.id)
                return
            if not await self._move(row.id, JobState.queued, status=JobState.running.value,
                                    started_at=self.clock(), attempts=row.attempts + 1,
                                    deployment_id=lease.replica.id):
                call.status = RequestState.cancelled
                raise _Cancelled  # cancelled (or claimed elsewhere) between the queue and here
            started = True

        try:
            async with self.gateway.handle(call, starting) as answer:
                body = answer.body or {}
                out = OUTPUTS[row.job_type]
                pngs = [base64.b64decode(b) for b in body.get(out.field) or []]
                if not pngs:
                    call.status = RequestState.failed
                    raise JobFailed("worker_failed", f"the worker returned no {out.field}")
                await asyncio.to_thread(_write_files, self.results_dir / row.id, pngs, out.suffix)
                # charged (the usage row committed) before the row says succeeded:
                # a crash in between leaves a paid job that the next run finds
                # paid and marks done (``_already_charged``), never an unpaid one
                call.images = len(pngs)
                call.status = RequestState.succeeded
                await self.gateway.settle_durably(call)
                now = self.clock()
                cost = _price(row.job_type, spec, payload)[0] * len(pngs) \
                    if self.metering.enabled else 0
                if not await self._move(row.id, JobState.running, status=JobState.succeeded.value,
                                        finished_at=now, images=len(pngs), cost=cost,
                                        expires_at=now + timedelta(seconds=self.settings.retention_s),
                                        webhook_state="pending" if row.webhook_url else "none"):
                    raise JobFailed("conflict", "the job changed state while it ran")
        except ModelfleetError as exc:
            raise JobFailed(_failure_code(exc), exc.message) from None

    async def _renew(self, job_id: str, runner: asyncio.Task[Any] | None) -> None:
        """Keep this gateway's lease on the job; stop the runner if the lease was
        lost or the job was cancelled through another gateway."""
        while True:
            await asyncio.sleep(self.settings.lease_s / 3)
            async with self.db.session() as session, session.begin():
                result = await session.execute(
                    update(Job).where(Job.id == job_id, Job.lease_owner == self.me)
                    .values(lease_expires_at=self._lease_end()))
                status = await session.scalar(select(Job.status).where(Job.id == job_id))
            lost = getattr(result, "rowcount", 0) != 1
            if (lost or status == JobState.cancelled) and runner is not None:
                if status == JobState.cancelled:
                    self._user_cancelled.add(job_id)
                log.warning("job %s: %s; stopping its run here", job_id,
                            "lease lost" if lost else "cancelled elsewhere")
                runner.cancel()
                return

    async def _release_lease(self, job_id: str) -> None:
        async with self.db.session() as session, session.begin():
            await session.execute(update(Job).where(Job.id == job_id, Job.lease_owner == self.me)
                                  .values(lease_owner=None, lease_expires_at=None))

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
            try:
                ok, detail = await self._post_hook(row.webhook_url, body, headers)
            except DestinationNotAllowed as exc:
                # Not retried, and told the same way whatever is (or is not)
                # listening there: failed, no attempts, "destination not allowed".
                log.warning("webhook for job %s: destination not allowed (%s)", job_id, exc.reason)
                await self._set_webhook(job_id, "failed", 0)
                return
            attempt += 1
            await self._set_webhook(job_id, "delivered" if ok else "pending", attempt)
            if ok:
                return
            log.warning("webhook for job %s: attempt %d failed (%s)", job_id, attempt, detail)
            if attempt < self.settings.webhook_attempts:
                await asyncio.sleep(self.settings.webhook_backoff_s * 2 ** (attempt - 1))
        await self._set_webhook(job_id, "failed", attempt)

    async def _post_hook(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[bool, str]:
        """One delivery attempt: (delivered, detail).  A 3xx is a failure (redirects
        are not followed); DestinationNotAllowed when the guard refused to connect."""
        self.guard.check_destination(url)
        if self._hooks is None:
            self._hooks = self.guard.session()
        try:
            async with self._hooks.post(
                url, data=body, headers=headers, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.settings.webhook_timeout_s),
            ) as resp:
                await resp.read()
                return 200 <= resp.status < 300, f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            if (refused := not_allowed(exc)) is not None:
                raise refused from None
            return False, str(exc) or type(exc).__name__

    async def _set_webhook(self, job_id: str, state: str, attempts: int) -> None:
        async with self.db.session() as session, session.begin():
            await session.execute(update(Job).where(Job.id == job_id).values(
                webhook_state=state, webhook_attempts=attempts))

    # -- start, stop, retention ---------------------------------------------------

    async def recover(self) -> dict[str, int]:
        """At start, and then every ``claim_interval_s``: take the jobs whose
        lease has expired or whose owner process is gone, and run them here."""
        counts = await self.claim()
        self.owner.spawn(self._claim_forever(), "claimer")
        self.owner.spawn(self._sweep_forever(), "sweeper")
        return counts

    async def claim(self) -> dict[str, int]:
        counts = {"requeued": 0, "failed": 0, "resumed": 0, "webhooks": 0}
        now = self.clock()
        unfinished = or_(Job.status.in_((JobState.queued.value, JobState.running.value)),
                         and_(Job.status.in_([t.value for t in TERMINAL]),
                              Job.webhook_state == "pending"))
        async with self.db.session() as session:
            rows = list((await session.execute(
                select(Job).where(unfinished, or_(Job.lease_owner.is_(None),
                                                  Job.lease_owner != self.me))
                .order_by(Job.created_at).limit(500))).scalars())
        for row in rows:
            expired = row.lease_expires_at is None or row.lease_expires_at <= now
            if not (expired or _owner_gone(row.lease_owner)) or not await self._take(row):
                continue
            if row.status == JobState.running:
                if not await self._requeue(row):
                    counts["failed"] += 1
                    self._start(row.id)  # delivers its webhook
                    continue
                counts["requeued"] += 1
            counts["webhooks" if row.status in TERMINAL else "resumed"] += 1
            self._start(row.id)
        if any(counts.values()):
            log.info("jobs claimed by %s: %s", self.me, counts)
        return counts

    async def _take(self, row: Job) -> bool:
        """Claim the job's lease from its previous holder (one claimer wins)."""
        async with self.db.session() as session, session.begin():
            cond = Job.lease_owner.is_(None) if row.lease_owner is None \
                else Job.lease_owner == row.lease_owner
            result = await session.execute(update(Job).where(Job.id == row.id, cond).values(
                lease_owner=self.me, lease_expires_at=self._lease_end()))
        return bool(getattr(result, "rowcount", 0) == 1)

    async def _requeue(self, row: Job) -> bool:
        """A run cut short (its gateway stopped or died): queue it again, or fail it
        after ``max_attempts`` runs.  False when it failed."""
        if row.attempts >= self.settings.max_attempts:
            await self._move(row.id, JobState.running, status=JobState.failed.value,
                             finished_at=self.clock(), error_code="interrupted",
                             error_message=f"the server stopped while this job ran, "
                             f"{row.attempts} times; not retried again",
                             webhook_state="pending" if row.webhook_url else "none")
            return False
        await self._move(row.id, JobState.running, status=JobState.queued.value)
        return True

    async def _claim_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.claim_interval_s)
            try:
                await self.claim()
            except Exception:
                log.exception("could not claim jobs")

    async def sweep(self) -> int:
        """Delete the files of results past their retention; returns how many jobs."""
        now = self.clock()
        async with self.db.session() as session:
            expired = list((await session.execute(
                select(Job.id).where(Job.status == JobState.succeeded.value, Job.images > 0,
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
        """Stop running jobs here; their leases end now, so another gateway (or
        this one after a restart) takes them at once."""
        await self.owner.close()
        if self._hooks is not None:
            await self._hooks.close()
            self._hooks = None
        try:
            async with self.db.session() as session, session.begin():
                await session.execute(update(Job).where(Job.lease_owner == self.me)
                                      .values(lease_expires_at=self.clock()))
        except Exception:
            log.exception("could not give back the leases of unfinished jobs")


def _write_files(folder: Path, blobs: list[bytes], suffix: str = "png") -> None:
    """Each blob as folder/<i>.<suffix>, written whole (temp file, then rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, blob in enumerate(blobs):
        tmp = folder / f".{i}.{suffix}.partial"
        tmp.write_bytes(blob)
        os.replace(tmp, folder / f"{i}.{suffix}")


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
        "webhook": _webhook_view(row) if row.webhook_url else None,
    }
    return out


def _webhook_view(row: Job) -> dict[str, Any]:
    view: dict[str, Any] = {"url": row.webhook_url, "state": row.webhook_state,
                            "attempts": row.webhook_attempts}
    if row.webhook_state == "failed" and row.webhook_attempts == 0:
        # never attempted: the address guard refused the destination
        view["error"] = NOT_ALLOWED
    return view


def _ms(start: datetime | None, end: datetime | None) -> int | None:
    if start is None or end is None:
        return None
    return max(0, round((end - start).total_seconds() * 1000))



def _failure_code(exc: ModelfleetError) -> str:
    """A job's error code for an error of the request path."""
    if exc.code in ("queue_timeout", "request_timeout", "insufficient_credits",
                    "billing_unavailable", "limits_unavailable", "worker_failed"):
        return exc.code
    if exc.status == 400:
        return "invalid_request"
    if exc.status == 503:
        return "model_unavailable"
    return "worker_failed"
