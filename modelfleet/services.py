"""The services of one running platform, built once and handed to the routes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from modelfleet.catalog import Catalog, load_catalog
from modelfleet.db import Database, migrate
from modelfleet.engines.http import WorkerClient
from modelfleet.fleet import Fleet
from modelfleet.gateway import Gateway
from modelfleet.keys import CreatedKey, KeyService, Scope
from modelfleet.scheduler import Scheduler
from modelfleet.settings import Settings
from modelfleet.tasks import TaskOwner

log = logging.getLogger(__name__)


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
    background: TaskOwner
    # Called with the key made on first start, to show it once to the operator.
    on_bootstrap_key: Callable[[CreatedKey], None] = lambda key: None

    @classmethod
    def build(cls, settings: Settings, catalog: Catalog | None = None) -> Services:
        catalog = catalog or load_catalog(settings.catalog_path)
        db = Database(settings.db_url)
        client = WorkerClient()
        fleet = Fleet(catalog, settings, client)
        scheduler = Scheduler(fleet, settings.stats_window_s)
        gateway = Gateway(
            catalog, fleet, scheduler, client, dispatch_retries=settings.fleet.dispatch_retries
        )
        return cls(
            settings=settings,
            catalog=catalog,
            db=db,
            keys=KeyService(db),
            client=client,
            fleet=fleet,
            scheduler=scheduler,
            gateway=gateway,
            background=TaskOwner("services"),
        )

    async def start(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(migrate, self.settings.db_url)
        if self.settings.bootstrap_default_key and await self.keys.count_projects() == 0:
            created = await self.keys.create("default", [Scope.inference.value], name="bootstrap")
            self.on_bootstrap_key(created)
        await self.client.start()
        self.fleet.start()
        self.background.spawn(self._flush_keys(), "key-usage")

    async def _flush_keys(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            try:
                await self.keys.flush_last_used()
            except Exception:
                log.exception("could not record key usage")

    async def stop(self) -> None:
        await self.background.close()
        await self.gateway.close()
        await self.fleet.close()
        await self.client.close()
        try:
            await self.keys.flush_last_used()
        finally:
            await self.db.close()
