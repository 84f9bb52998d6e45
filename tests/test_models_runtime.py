"""Models managed at runtime (issue 11, point 4): operators add, change and
remove catalog models through the admin API and the CLI, stored in the
database, and every gateway serves the change without a restart.

Real parts: llama-server workers on the bundled SmolLM2 GGUF, SQLite in the
data folder, and PostgreSQL + Redis (``tests/services.py``) for two gateways
sharing one store.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelfleet.api.app import create_app
from modelfleet.catalog import CatalogError, load_catalog
from modelfleet.catalogstore import CatalogStore
from modelfleet.db import Database, migrate
from modelfleet.keys import CreatedKey
from modelfleet.services import Services
from modelfleet.settings import Settings
from tests.conftest import SMOL_FILE

pytestmark = [pytest.mark.workers, pytest.mark.timeout(300)]

BASE = "base/smol"
NEW = "test/smol-runtime"
CATALOG = f"""
[[models]]
id = "{BASE}"
kind = "chat"
[models.engine]
type = "llama.cpp"
model_file = "{SMOL_FILE}"
threads = 1
[models.limits]
max_output_tokens = 256
context_length = 1024
"""
# A second alias of the bundled SmolLM2 GGUF, with its own limits.
NEW_MODEL: dict[str, Any] = {
    "id": NEW, "aliases": ["smol-rt"], "kind": "chat",
    "engine": {"type": "llama.cpp", "model_file": SMOL_FILE, "threads": 1},
    "limits": {"max_messages": 4, "max_output_tokens": 128, "context_length": 512},
    "defaults": {"max_tokens": 8},
    "scaling": {"concurrency": 2, "request_timeout_s": 60.0},
}
NEW_TOML = f"""
[[models]]
id = "{NEW}"
aliases = ["smol-rt"]
kind = "chat"
[models.engine]
type = "llama.cpp"
model_file = "{SMOL_FILE}"
threads = 1
[models.limits]
max_messages = 4
max_output_tokens = 128
context_length = 512
[models.defaults]
max_tokens = 8
[models.scaling]
concurrency = 2
"""


def chat(model: str, max_tokens: int = 8, content: str = "Say hello.") -> dict[str, Any]:
    return {"model": model, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": content}]}


@dataclass
class Gateway:
    services: Services
    client: httpx.AsyncClient
    tenant: CreatedKey
    admin: CreatedKey
    data_dir: Path

    @property
    def as_tenant(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tenant.key}"}

    @property
    def as_admin(self) -> dict[str, str]:
        return {"x-api-key": self.admin.key}

    async def chat(self, model: str, **kw: Any) -> httpx.Response:
        return await self.client.post("/v1/chat/completions", headers=self.as_tenant,
                                      json=chat(model, **kw))

    async def models(self) -> set[str]:
        reply = await self.client.get("/v1/models", headers=self.as_tenant)
        assert reply.status_code == 200, reply.text
        return {m["id"] for m in reply.json()["data"]}


def _write_catalog(tmp: Path) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    catalog = tmp / "catalog.toml"
    catalog.write_text(CATALOG)
    return catalog


@asynccontextmanager
async def gateway(tmp: Path, **store: str) -> AsyncIterator[Gateway]:
    """One gateway in this process (its own data folder and fleet) on ``store``
    (database_url / redis_url; default SQLite in the data folder)."""
    catalog = _write_catalog(tmp)
    settings = Settings(data_dir=tmp / "data", catalog_path=catalog,
                        bootstrap_default_key=False, **store)  # type: ignore[arg-type]
    services = Services.build(settings)
    app = create_app(settings, services)
    await services.start()
    try:
        tenant = await services.keys.create("tenant", ["inference"])
        admin = await services.keys.create("ops", ["admin"])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw",
                                     timeout=120) as client:
            yield Gateway(services, client, tenant, admin, settings.data_dir)
    finally:
        await services.stop()


def cli(*args: str, data_dir: Path, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "modelfleet", *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


async def within(seconds: float, condition: Callable[[], Awaitable[bool]]) -> float:
    """Seconds until ``condition`` holds (fails after ``seconds``)."""
    started = time.monotonic()
    while not await condition():
        assert time.monotonic() - started < seconds, f"not within {seconds}s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def error_code(reply: httpx.Response) -> str:
    return str(reply.json()["error"]["code"])


# -- the admin API -------------------------------------------------------------------


async def test_add_change_and_remove_a_model_through_the_admin_api(tmp_path: Path) -> None:
    async with gateway(tmp_path) as gw:
        admin = gw.as_admin
        listed = (await gw.client.get("/v1/admin/models", headers=admin)).json()
        assert [m["id"] for m in listed["data"]] == [BASE]  # the catalog file seeded the store
        assert (await gw.chat("smol-rt")).status_code == 404
        assert (await gw.client.get("/v1/admin/models", headers=gw.as_tenant)).status_code == 403

        # add: served at once, through the OpenAI API, by a real llama-server
        added = await gw.client.post("/v1/admin/models", headers=admin, json=NEW_MODEL)
        assert added.status_code == 201, added.text
        assert added.json()["model"]["limits"]["max_output_tokens"] == 128
        assert NEW in await gw.models()
        reply = await gw.chat("smol-rt")
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == NEW and reply.json()["usage"]["completion_tokens"] > 0
        pool = gw.services.fleet.pools[NEW]
        replica = pool.replicas[0]

        # change its limits: enforced on the next request, same replica (no restart)
        assert (await gw.chat(NEW, max_tokens=100)).status_code == 200
        patched = await gw.client.patch(f"/v1/admin/models/{NEW}", headers=admin,
                                        json={"limits": {"max_output_tokens": 16}})
        assert patched.status_code == 200, patched.text
        assert patched.json()["model"]["limits"] == {
            **added.json()["model"]["limits"], "max_output_tokens": 16}
        refused = await gw.chat(NEW, max_tokens=100)
        assert refused.status_code == 400 and "16" in refused.json()["error"]["message"]
        assert (await gw.chat(NEW, max_tokens=16)).status_code == 200
        assert gw.services.fleet.pools[NEW] is pool and pool.replicas == [replica]

        # a change to how it is launched (concurrency): a new pool; the old replica drains
        relaunched = await gw.client.patch(f"/v1/admin/models/{NEW}", headers=admin,
                                           json={"scaling": {"concurrency": 3}})
        assert relaunched.status_code == 200, relaunched.text
        assert gw.services.fleet.pools[NEW] is not pool
        assert (await gw.chat(NEW)).status_code == 200
        await within(10, lambda: _true(not pool.replicas))
        assert gw.services.fleet.pools[NEW].replicas[0].slots == 3

        # remove while a request runs: it finishes (200); the next one is 404
        new_pool = gw.services.fleet.pools[NEW]
        running = asyncio.create_task(gw.chat(NEW, max_tokens=16, content="Tell a long story."))
        await within(30, lambda: _true(any(r.outstanding for r in new_pool.replicas)))
        process = new_pool.replicas[0]  # (it may be gone by the time the request returns)
        removed = await gw.client.delete(f"/v1/admin/models/{NEW}", headers=admin)
        assert removed.status_code == 200, removed.text
        assert removed.json() == {"object": "catalog_model.deleted", "id": NEW, "deleted": True}
        gone = await gw.chat(NEW)
        assert gone.status_code == 404 and error_code(gone) == "model_not_found"
        assert (await gw.chat("smol-rt")).status_code == 404
        finished = await running
        assert finished.status_code == 200, finished.text
        assert NEW not in await gw.models()
        # then its replicas stop
        await within(10, lambda: _true(not new_pool.replicas and not gw.services.fleet.draining))
        assert process.state.value == "stopped"
        listed = (await gw.client.get("/v1/admin/models", headers=admin)).json()
        assert [m["id"] for m in listed["data"]] == [BASE]
        assert (await gw.client.get(f"/v1/admin/models/{NEW}", headers=admin)).status_code == 404

        # added again: served again
        again = await gw.client.post("/v1/admin/models", headers=admin, json=NEW_MODEL)
        assert again.status_code == 201, again.text
        assert (await gw.chat(NEW)).status_code == 200


async def _true(value: bool) -> bool:
    return value


async def test_bad_models_are_refused_and_change_nothing(tmp_path: Path) -> None:
    async with gateway(tmp_path) as gw:
        admin = gw.as_admin
        assert (await gw.client.post("/v1/admin/models", headers=admin,
                                     json=NEW_MODEL)).status_code == 201
        before = (await gw.client.get("/v1/admin/models", headers=admin)).json()
        version = await gw.services.watcher.probe.read()

        async def refused(method: str, path: str, body: Any, status: int, code: str,
                          mentions: str) -> None:
            reply = await gw.client.request(method, "/v1/admin" + path, headers=admin, json=body)
            assert reply.status_code == status, reply.text
            error = reply.json()["error"]
            assert error["code"] == code and mentions in error["message"], error

        unknown = {**NEW_MODEL, "id": "test/other",
                   "limits": {**NEW_MODEL["limits"], "max_output_tokns": 5}}
        await refused("POST", "/models", unknown, 422, "validation_error",
                      "limits: unknown key 'max_output_tokns'")
        await refused("POST", "/models", {**NEW_MODEL, "id": "test/other", "colour": "red"},
                      422, "validation_error", "unknown key 'colour'")
        await refused("POST", "/models", {**NEW_MODEL, "id": "test/other",
                                          "limits": {"max_output_tokens": 9000}},
                      400, "invalid_request", "max_output_tokens exceeds limits.context_length")
        await refused("POST", "/models", {**NEW_MODEL, "id": "test/other",
                                          "engine": {"type": "diffusers", "model_dir": "x"}},
                      400, "invalid_request", "cannot serve a chat model")
        await refused("POST", "/models", {**NEW_MODEL, "id": "test/other",
                                          "scaling": {"concurrency": 0}},
                      400, "invalid_request", "scaling.concurrency")
        await refused("POST", "/models", [NEW_MODEL], 422, "validation_error", "JSON object")
        await refused("POST", "/models", NEW_MODEL, 409, "model_exists", NEW)
        await refused("POST", "/models", {**NEW_MODEL, "id": "test/other"}, 409,
                      "model_conflict", "alias 'smol-rt'")
        await refused("POST", "/models", {**NEW_MODEL, "id": "test/other", "aliases": [BASE]},
                      409, "model_conflict", BASE)
        await refused("PATCH", f"/models/{NEW}", {"limits": {"max_tokens": 5}}, 422,
                      "validation_error", "unknown key 'max_tokens'")
        await refused("PATCH", f"/models/{NEW}", {"limits": {"max_output_tokens": 4}}, 400,
                      "invalid_request", "defaults.max_tokens exceeds limits.max_output_tokens")
        await refused("PATCH", f"/models/{NEW}", {"id": "test/renamed"}, 400, "invalid_request",
                      "id cannot change")
        await refused("PATCH", f"/models/{NEW}", {"scaling": {"min_replicas": 3}}, 400,
                      "invalid_request", "min_replicas must not exceed max_replicas")
        await refused("PATCH", "/models/nope", {"limits": {"max_output_tokens": 4}}, 404,
                      "model_not_found", "nope")
        await refused("DELETE", "/models/nope", None, 404, "model_not_found", "nope")

        assert (await gw.client.get("/v1/admin/models", headers=admin)).json() == before
        assert await gw.services.watcher.probe.read() == version
        assert await gw.models() == {BASE, NEW}
        assert gw.services.catalog.resolve(NEW).limits.max_output_tokens == 128  # type: ignore[union-attr]


# -- the CLI -------------------------------------------------------------------------


async def test_the_cli_adds_updates_and_removes_models_a_running_gateway_serves(
        tmp_path: Path) -> None:
    async with gateway(tmp_path) as gw:
        model_file = tmp_path / "model.toml"
        model_file.write_text(NEW_TOML)
        cli("models", "add", str(model_file), data_dir=gw.data_dir)
        seen = await within(1.0, lambda: _has(gw, NEW))
        reply = await gw.chat("smol-rt")
        assert reply.status_code == 200, reply.text

        listed = cli("models", "list", data_dir=gw.data_dir).stdout
        assert [line.split("\t")[0] for line in listed.splitlines()[1:]] == [BASE, NEW]
        shown = json.loads(cli("models", "show", "smol-rt", data_dir=gw.data_dir).stdout)
        assert shown["id"] == NEW and shown["limits"]["max_output_tokens"] == 128

        cli("models", "update", NEW, "--set", "limits.max_output_tokens=12",
            "--set", 'description="a second SmolLM2"', data_dir=gw.data_dir)
        await within(1.0, lambda: _true(
            gw.services.catalog.resolve(NEW).limits.max_output_tokens == 12))  # type: ignore[union-attr]
        assert (await gw.chat(NEW, max_tokens=13)).status_code == 400
        assert (await gw.chat(NEW, max_tokens=12)).status_code == 200
        assert gw.services.catalog.resolve(NEW).description == "a second SmolLM2"  # type: ignore[union-attr]

        # bad input: exit 2 with the key named; nothing changed
        bad = cli("models", "update", NEW, "--set", "limits.max_ouput_tokens=5",
                  data_dir=gw.data_dir, check=False)
        assert bad.returncode == 2 and "unknown key 'max_ouput_tokens'" in bad.stderr
        broken = tmp_path / "broken.toml"
        broken.write_text(NEW_TOML.replace(NEW, "test/broken").replace('"smol-rt"', '"x"')
                          .replace("concurrency = 2", "concurrency = 2\nreplicas = 4"))
        bad = cli("models", "add", str(broken), data_dir=gw.data_dir, check=False)
        assert bad.returncode == 2 and "scaling: unknown key 'replicas'" in bad.stderr
        bad = cli("models", "add", str(model_file), data_dir=gw.data_dir, check=False)
        assert bad.returncode == 2 and "exists" in bad.stderr
        two = tmp_path / "two.toml"  # a good model and one whose alias is taken: neither is added
        two.write_text(NEW_TOML.replace(NEW, "test/good").replace('"smol-rt"', '"good"')
                       + NEW_TOML.replace(NEW, "test/clash"))
        bad = cli("models", "add", str(two), data_dir=gw.data_dir, check=False)
        assert bad.returncode == 2 and "alias 'smol-rt'" in bad.stderr, bad.stderr
        await asyncio.sleep(0.6)
        assert await gw.models() == {BASE, NEW}

        cli("models", "remove", "smol-rt", data_dir=gw.data_dir)
        await within(1.0, lambda: _true(gw.services.catalog.resolve(NEW) is None))
        assert (await gw.chat(NEW)).status_code == 404
        bad = cli("models", "remove", NEW, data_dir=gw.data_dir, check=False)
        assert bad.returncode == 2 and "does not exist" in bad.stderr
    assert seen < 1.0


async def _has(gw: Gateway, model_id: str) -> bool:
    return gw.services.catalog.resolve(model_id) is not None


# -- the catalog file seeds the store ------------------------------------------------


async def test_the_catalog_file_seeds_the_store_and_later_edits_of_it_apply(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    url = f"sqlite+aiosqlite:///{data / 'modelfleet.db'}"
    await asyncio.to_thread(migrate, url)
    db = Database(url)
    store = CatalogStore(db)
    first = tmp_path / "one.toml"
    first.write_text(CATALOG + NEW_TOML)
    try:
        assert await store.seed(load_catalog(first)) is True
        assert sorted(await store.live()) == [BASE, NEW]
        assert await store.seed(load_catalog(first)) is False  # nothing new: nothing written
        # an operator's change survives a restart on the same file...
        await store.update(NEW, {"limits": {"max_output_tokens": 20}})
        await store.remove(BASE)
        await store.seed(load_catalog(first))
        assert sorted(await store.live()) == [NEW]
        assert (await store.get(NEW)).limits.max_output_tokens == 20
        # ...and an edit of the file is newer than it: the file's model wins
        first.write_text(CATALOG.replace("max_output_tokens = 256", "max_output_tokens = 300")
                         + NEW_TOML)
        await store.seed(load_catalog(first))
        assert (await store.get(BASE)).limits.max_output_tokens == 300
        assert (await store.get(NEW)).limits.max_output_tokens == 20
        # a model taken out of the file leaves the store, unless changed through the API
        first.write_text(NEW_TOML.replace(NEW, "test/third").replace('"smol-rt"', '"third"'))
        await store.seed(load_catalog(first))
        assert sorted(await store.live()) == [NEW, "test/third"]
        # a file whose alias clashes with a model added at runtime stops the start
        first.write_text(CATALOG.replace('kind = "chat"', 'aliases = ["smol-rt"]\nkind = "chat"'))
        with pytest.raises(CatalogError, match="smol-rt"):
            await store.seed(load_catalog(first))
    finally:
        await db.close()


# -- two gateways, one store ---------------------------------------------------------


async def test_two_gateways_on_one_store_see_each_change_within_a_second(
        tmp_path: Path, pg_url: str, redis_url: str) -> None:
    store = {"database_url": pg_url, "redis_url": redis_url}
    async with gateway(tmp_path / "one", **store) as one, \
            gateway(tmp_path / "two", **store) as two:
        added = await one.client.post("/v1/admin/models", headers=one.as_admin, json=NEW_MODEL)
        assert added.status_code == 201, added.text
        assert await within(1.0, lambda: _has(two, NEW)) < 1.0
        # gateway two serves it (with its own replica: it owns its own fleet here)
        two_key = {"Authorization": f"Bearer {one.tenant.key}"}
        reply = await two.client.post("/v1/chat/completions", headers=two_key, json=chat("smol-rt"))
        assert reply.status_code == 200, reply.text

        patched = await two.client.patch(f"/v1/admin/models/{NEW}", headers=two.as_admin,
                                         json={"limits": {"max_output_tokens": 10}})
        assert patched.status_code == 200, patched.text
        assert await within(1.0, lambda: _true(
            one.services.catalog.resolve(NEW).limits.max_output_tokens == 10)) < 1.0  # type: ignore[union-attr]
        assert (await one.chat(NEW, max_tokens=11)).status_code == 400

        env = {"MODELFLEET_DATABASE_URL": pg_url, "MODELFLEET_REDIS_URL": redis_url}
        await asyncio.to_thread(cli, "models", "remove", NEW, data_dir=tmp_path / "cli", env=env)
        for gw in (one, two):
            assert await within(1.0, lambda gw=gw: _true(gw.services.catalog.resolve(NEW) is None))
            gone = await gw.chat(NEW)
            assert gone.status_code == 404 and error_code(gone) == "model_not_found"
        await within(10, lambda: _true(not two.services.fleet.draining))


async def test_a_follower_gateway_serves_a_model_added_at_runtime_from_the_owners_replica(
        tmp_path: Path) -> None:
    """Two gateways on one data folder: one owns the fleet, the other follows
    it (fleetshare.py).  A model added through the follower is started once,
    by the owner, and the follower routes to that replica."""
    # The owner hears of the follower's requests through its reports; once the
    # model is removed it hears no more, so it stops the replica when its own
    # requests are done and the follower's last reported ones could have
    # finished (their deadline: a short one here).
    model = {**NEW_MODEL, "scaling": {"concurrency": 2, "request_timeout_s": 3.0}}
    async with gateway(tmp_path) as one, gateway(tmp_path) as two:
        assert one.services.fleet.share.owned and not two.services.fleet.share.owned
        added = await two.client.post("/v1/admin/models", headers=two.as_admin, json=model)
        assert added.status_code == 201, added.text
        assert await within(1.0, lambda: _has(one, NEW)) < 1.0
        reply = await two.chat("smol-rt")
        assert reply.status_code == 200, reply.text
        owned = one.services.fleet.pools[NEW].replicas
        mirrored = two.services.fleet.pools[NEW].replicas
        assert len(owned) == 1 and [r.id for r in mirrored] == [owned[0].id]
        assert mirrored[0].mirrored and not owned[0].mirrored

        removed = await one.client.delete(f"/v1/admin/models/{NEW}", headers=one.as_admin)
        assert removed.status_code == 200, removed.text
        await within(1.0, lambda: _true(two.services.catalog.resolve(NEW) is None))
        assert (await two.chat(NEW)).status_code == 404
        await within(15, lambda: _true(not one.services.fleet.draining and not owned[0].alive))
