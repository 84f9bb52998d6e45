"""The services of one running platform, built once and handed to the routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from modelfleet.admission import AdmissionStore, MemoryAdmission
from modelfleet.batches import BatchService
from modelfleet.catalog import Catalog, load_catalog
from modelfleet.catalogstore import CatalogStore, CatalogSync
from modelfleet.db import Database, VersionProbe, migrate
from modelfleet.engines.http import WorkerClient
from modelfleet.files import FileStore
from modelfleet.fleet import Fleet, ModelPool
from modelfleet.gateway import Gateway
from modelfleet.jobs import JobService, Signer
from modelfleet.keys import CreatedKey, KeyService, Scope
from modelfleet.ledger import Ledger
from modelfleet.metering import Metering
from modelfleet.metrics import Metrics, ModelSnapshot
from modelfleet.observe import Observer
from modelfleet.projects import ProjectService
from modelfleet.scheduler import Scheduler
from modelfleet.settings import Settings
from modelfleet.tasks import TaskOwner

if TYPE_CHECKING:
    from modelfleet.redisstore import ChangeFeed

log = logging.getLogger(__name__)


class StoreWatcher:
    """Reloads what this process caches when another one changed the store
    (a key revoked or a project topped up from the CLI): checked per request."""

    def __init__(self, probe: VersionProbe, keys: KeyService, projects: ProjectService,
                 ledger: Ledger) -> None:
        self.probe = probe
        self.keys = keys
        self.projects = projects
        self.ledger = ledger
        self.version = -1
        self._lock = asyncio.Lock()
        # The catalog's models, managed at runtime (catalogstore.py).
        self.catalog: CatalogSync | None = None

    async def start(self) -> None:
        self.version = await self.probe.read()
        if self.catalog is not None:
            await self.catalog.refresh()
        await self.projects.load()
        await self.ledger.load(self.version)

    async def check(self) -> None:
        version = await self.probe.read()
        if version == self.version:
            return
        async with self._lock:
            version = await self.probe.read()
            if version == self.version:
                return
            if self.catalog is not None:
                await self.catalog.refresh()  # a model added, changed or removed
            self.keys.forget_cached()
            await self.projects.load()
            await self.ledger.catch_up(version)
            self.version = version


def admission_store(settings: Settings) -> AdmissionStore:
    """In this process by default; in Redis when several gateways share it."""
    if settings.redis_url:
        from modelfleet.redisstore import RedisAdmission

        return RedisAdmission(settings.redis_url)
    return MemoryAdmission()


@dataclass
class Services:
    settings: Settings
    catalog: Catalog
    db: Database
    keys: KeyService
    client: WorkerClient
    fleet: Fleet
    scheduler: Scheduler
    gateway: Gateway
    projects: ProjectService
    ledger: Ledger
    metering: Metering
    watcher: StoreWatcher
    metrics: Metrics
    background: TaskOwner
    jobs: JobService
    batches: BatchService  # the Batch API's runner, and its files
    # Admin changes fanned out over Redis (with MODELFLEET_REDIS_URL).
    feed: ChangeFeed | None = None
    # The catalog in the store: models added, changed and removed at runtime.
    models: CatalogSync | None = None
    # Called with the key made on first start, to show it once to the operator.
    on_bootstrap_key: Callable[[CreatedKey], None] = lambda key: None

    @classmethod
    def build(cls, settings: Settings, catalog: Catalog | None = None) -> Services:
        catalog = catalog or load_catalog(settings.catalog_path)
        db = Database(settings.db_url)
        client = WorkerClient()
        fleet = Fleet(catalog, settings, client)
        scheduler = Scheduler(fleet, settings.stats_window_s)
        models = CatalogSync(CatalogStore(db), catalog, fleet, scheduler)
        keys = KeyService(db)
        projects = ProjectService(db, catalog)
        ledger = Ledger(db, admission_store(settings))
        metering = Metering(projects, ledger, enabled=settings.metering)
        metrics = Metrics(max_projects=settings.observe.max_project_labels)
        gateway = Gateway(catalog, fleet, scheduler, client, metering, metrics,
                          dispatch_retries=settings.fleet.dispatch_retries,
                          observer=Observer.from_settings(settings.observe))
        jobs = JobService(db=db, catalog=catalog, gateway=gateway, client=client,
                          metering=metering, ledger=ledger, settings=settings.jobs,
                          results_dir=settings.results_dir,
                          signer=Signer(settings.data_dir / "webhook-signing.key"))
        files = FileStore(db, settings.files_dir, settings.batches)
        batches = BatchService(db=db, gateway=gateway, files=files, settings=settings.batches,
                               leases=settings.jobs, owner=jobs.me)
        return cls(
            settings=settings,
            catalog=catalog,
            db=db,
            keys=keys,
            client=client,
            fleet=fleet,
            scheduler=scheduler,
            gateway=gateway,
            projects=projects,
            ledger=ledger,
            metering=metering,
            watcher=StoreWatcher(VersionProbe(db), keys, projects, ledger),
            models=models,
            metrics=metrics,
            background=TaskOwner("services"),
            jobs=jobs,
            batches=batches,
        )

    def __post_init__(self) -> None:
        for pool in self.fleet.pools.values():
            self._observe(pool)
        if self.models is not None:
            self.models.on_pool = self._observe
            self.watcher.catalog = self.models
        self.metrics.bind_live(self.snapshot)
        self._stopping = asyncio.Event()
        self._store_watch: asyncio.Task[None] | None = None

    def _observe(self, pool: ModelPool) -> None:
        metrics = self.metrics
        pool.on_event = lambda e: metrics.scale_decision(e.model, e.from_replicas, e.to_replicas)
        pool.on_cold_start = metrics.cold_start

    def snapshot(self) -> list[ModelSnapshot]:
        """Live fleet state for the metrics scrape."""
        out = []
        for model_id, pool in self.fleet.pools.items():
            states: dict[str, int] = {}
            for replica in pool.replicas:
                states[replica.state.value] = states.get(replica.state.value, 0) + 1
            out.append(ModelSnapshot(model=model_id,
                                     queued=self.scheduler.queue(model_id).waiting,
                                     replicas_by_state=states, desired=pool.desired,
                                     available=pool.availability()[0],
                                     running=sum(r.outstanding for r in pool.replicas)))
        return out

    async def start(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(migrate, self.settings.db_url)
        await self.ledger.store.start()
        if self.settings.redis_url:
            from modelfleet.redisstore import ChangeFeed

            self.feed = ChangeFeed(self.settings.redis_url)
            self.db.change_hooks.append(self.feed.changed)
            self.feed.listen(self.watcher.probe.nudge)
        if self.models is not None:
            await self.models.seed()  # the catalog file's models into the store
        await self.watcher.start()
        if self.settings.bootstrap_default_key and await self.keys.count_projects() == 0 \
                and (await self.keys.ensure_project("default"))[1]:
            # only the gateway that made the project (several may start at once) makes its key
            created = await self.keys.create("default", [Scope.inference.value], name="bootstrap")
            if self.settings.bootstrap_credit > 0:
                await self.ledger.credit(created.project_id, self.settings.bootstrap_credit,
                                         kind="topup", reason="welcome credit", actor="bootstrap")
            await self.watcher.check()
            self.on_bootstrap_key(created)
        await self.client.start()
        self.background.spawn(self.ledger.run_writer(), "ledger-writer")
        self.fleet.start()
        self.jobs.signer.load()
        await self.jobs.recover()
        from modelfleet.api.inference import RequestPath  # the path batch lines take too

        await self.batches.start(RequestPath(self))
        self.background.spawn(self._flush_keys(), "key-usage")
        self._store_watch = self.background.spawn(self._watch_store(), "store-watch")
        if self.ledger.store.dedupes:
            self.background.spawn(self._sweep_holds(), "hold-sweeper")

    async def _sweep_holds(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            try:
                await self.ledger.sweep_orphans()
            except Exception as exc:
                log.warning("could not sweep the holds of stopped gateways: %s", exc)

    async def _watch_store(self) -> None:
        """Changes made elsewhere (a model added through another gateway or the
        CLI) are taken up within a second even when no request comes in: the
        version probe is read every 0.5 s (a point read; on PostgreSQL at most
        every 0.25 s anyway, at once after a Redis nudge)."""
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), 0.5)
                return  # stopping: ended between reads, never cancelled inside one
            try:
                await self.watcher.check()
            except Exception as exc:
                log.warning("could not read the store's changes: %s", exc)

    async def _flush_keys(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            try:
                await self.keys.flush_last_used()
            except Exception:
                log.exception("could not record key usage")

    async def stop(self) -> None:
        self._stopping.set()
        await self.gateway.close()  # ends in-flight work, which settles it
        await self.jobs.close()  # unfinished jobs stay in the store and run after a restart
        await self.batches.close()  # so do unfinished batches, with the lines not yet run
        try:
            await asyncio.wait_for(self.ledger.drain(), 10)
        except Exception:
            log.exception("could not write every usage record before stopping")
        if self._store_watch is not None:
            await asyncio.wait({self._store_watch}, timeout=5.0)
        await self.background.close()
        await asyncio.to_thread(self.ledger.close)
        await self.fleet.close()
        await self.client.close()
        self.watcher.probe.close()
        try:
            await self.keys.flush_last_used()
        finally:
            if self.feed is not None:
                await self.feed.close()
            await self.ledger.store.close()
            await self.db.close()
