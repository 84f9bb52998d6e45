"""The web console (modelfleet/console, docs/console.md).

In process (httpx over ASGI): sessions, CSRF, tenant isolation, the time
zone of usage days, CSV, path prefixes.  In a real browser (headless
Chromium through Playwright) against a real ``modelfleet serve`` under a path
prefix: sign-in as operator and tenant, keys made and revoked in the UI and
used against the API, a sleeping model woken from the playground, the pages'
screenshots (docs/console/*.png)."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import insert, select

from modelfleet.api.app import create_app
from modelfleet.catalog import DEFAULT_CATALOG
from modelfleet.console.sessions import SessionStore
from modelfleet.db import Database, sync_engine
from modelfleet.ids import new_id
from modelfleet.keys import CreatedKey
from modelfleet.services import Services
from modelfleet.settings import Settings
from modelfleet.tables import ApiKey, ConsoleSession, Job, Project, UsageRecord
from tests.conftest import ROOT, Server, _cli, catalog_text, launch_server, stop_server

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass
class Console:
    client: httpx.AsyncClient
    services: Services
    tenant: CreatedKey
    other: CreatedKey
    admin: CreatedKey


@pytest.fixture
async def console(tmp_path: Path, database_url: str | None) -> AsyncIterator[Console]:
    """The app in process, on SQLite and on PostgreSQL, with three actors."""
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(catalog_text(tmp_path, warm=False))
    settings = Settings(data_dir=tmp_path / "data", catalog_path=catalog,
                        database_url=database_url, bootstrap_default_key=False)
    services = Services.build(settings)
    asgi = create_app(settings, services)
    await services.start()
    try:
        tenant = await services.keys.create("tenant", ["inference", "read"])
        other = await services.keys.create("other", ["inference"])
        admin = await services.keys.create("ops", ["admin"])
        await services.watcher.check()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi),
                                     base_url="http://test") as client:
            yield Console(client, services, tenant, other, admin)
    finally:
        await services.stop()


async def sign_in(client: httpx.AsyncClient, key: str, *, prefix: str = "",
                  headers: dict[str, str] | None = None, tz: str = "UTC") -> str:
    """Sign in through the form; the session's CSRF token."""
    page = await client.get("/console/login", headers=headers)
    assert page.status_code == 200, page.text
    token = CSRF.search(page.text)
    assert token is not None
    answer = await client.post("/console/login", headers=headers,
                               data={"csrf_token": token.group(1), "key": key, "tz": tz})
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == f"{prefix}/console/models"
    models = await client.get("/console/models", headers=headers)
    assert models.status_code == 200
    found = CSRF.search(models.text)
    assert found is not None
    return found.group(1)


async def test_sign_in_sets_a_strict_http_only_session_cookie(console: Console) -> None:
    client = console.client
    assert (await client.get("/console/models")).headers["location"] == "/console/login"
    await sign_in(client, console.tenant.key)
    cookie = next(c for c in client.cookies.jar if c.name == "mf_console")
    assert cookie.path == "/console"
    assert cookie.has_nonstandard_attr("HttpOnly")
    assert cookie.get_nonstandard_attr("SameSite") in ("strict", "Strict")
    assert console.tenant.key not in cookie.value  # the key is never the session
    keys_before = len(await console.services.keys.list_keys())
    page = await client.get("/console/models")
    assert console.tenant.key not in page.text
    assert len(await console.services.keys.list_keys()) == keys_before  # no key minted


async def test_a_bad_key_is_refused_at_sign_in(console: Console) -> None:
    client = console.client
    page = await client.get("/console/login")
    token = CSRF.search(page.text)
    assert token is not None
    answer = await client.post("/console/login", data={"csrf_token": token.group(1),
                                                       "key": "mf-" + "x" * 43})
    assert answer.status_code == 401
    assert "invalid API key" in answer.text


async def test_forms_without_the_csrf_token_are_refused(console: Console) -> None:
    client = console.client
    csrf = await sign_in(client, console.admin.key)
    project = console.services.projects.by_name("tenant")
    assert project is not None
    for data in ({}, {"csrf_token": "wrong"}):
        answer = await client.post("/console/keys", data={**data, "project": project.id,
                                                          "scope_inference": "1"})
        assert answer.status_code == 403
        assert "CSRF" in answer.text
    made = await client.post("/console/keys", data={"csrf_token": csrf, "project": project.id,
                                                    "scope_inference": "1", "name": "ui"})
    assert made.status_code == 200 and "mf-" in made.text
    # the sign-in form too (login CSRF), and the playground's JSON calls
    fresh = httpx.AsyncClient(transport=client._transport, base_url="http://test")
    async with fresh:
        refused = await fresh.post("/console/login", data={"key": console.tenant.key})
        assert refused.status_code == 403
    chat = await client.post("/console/playground/chat", json={"model": "x", "messages": []})
    assert chat.status_code == 403


async def test_sign_out_ends_the_session_and_revoking_the_key_does_too(console: Console) -> None:
    client = console.client
    csrf = await sign_in(client, console.tenant.key)
    out = await client.post("/console/logout", data={"csrf_token": csrf})
    assert out.status_code == 303
    assert (await client.get("/console/models")).status_code == 303
    await sign_in(client, console.tenant.key)
    await console.services.keys.revoke(console.tenant.key_id)
    assert (await client.get("/console/keys")).headers["location"] == "/console/login"


async def test_sessions_expire_when_idle(console: Console) -> None:
    now = [datetime.now(UTC)]
    store = SessionStore(console.services.db, idle=timedelta(minutes=30), clock=lambda: now[0])
    principal = await console.services.keys.authenticate(console.tenant.key)
    token, _ = await store.open(principal)
    now[0] += timedelta(minutes=20)
    assert await store.find(token) is not None  # used: pushed forward
    now[0] += timedelta(minutes=20)
    assert await store.find(token, touch=False) is not None
    now[0] += timedelta(minutes=31)
    assert await store.find(token) is None
    async with console.services.db.session() as session:
        hashes = list(await session.scalars(select(ConsoleSession.token_hash)))
    assert token not in hashes  # only its hash is stored


async def test_every_gateway_knows_every_session(console: Console) -> None:
    """Sessions are rows in the store: a gateway other than the one that
    opened a session (its own Database and SessionStore) finds it."""
    principal = await console.services.keys.authenticate(console.tenant.key)
    token, _ = await SessionStore(console.services.db).open(principal)
    other_gateway = Database(console.services.settings.db_url)
    try:
        found = await SessionStore(other_gateway).find(token)
        assert found is not None and found.principal.key_id == console.tenant.key_id
        await SessionStore(other_gateway).close(token)
    finally:
        await other_gateway.close()
    assert await SessionStore(console.services.db).find(token) is None


async def test_a_tenant_sees_its_own_project_only(console: Console) -> None:
    client = console.client
    await sign_in(client, console.tenant.key)
    other = console.services.projects.by_name("other")
    assert other is not None
    for path in ("/console/usage", "/console/credits", "/console/jobs", "/console/keys"):
        assert (await client.get(path, params={"project": other.id})).status_code == 404, path
        assert (await client.get(path)).status_code == 200, path
    assert (await client.get(f"/console/jobs/{new_id()}")).status_code == 404
    assert (await client.get("/console/operators")).status_code == 403
    keys = await client.get("/console/keys")
    assert console.tenant.key_id in keys.text and console.other.key_id not in keys.text
    assert console.admin.key_id not in keys.text
    csrf = CSRF.search(keys.text)
    assert csrf is not None
    revoke = await client.post(f"/console/keys/{console.other.key_id}/revoke",
                               data={"csrf_token": csrf.group(1)})
    assert revoke.status_code == 404
    # no scope beyond its own
    tenant = console.services.projects.by_name("tenant")
    assert tenant is not None
    escalate = await client.post("/console/keys", data={"csrf_token": csrf.group(1),
                                                         "project": tenant.id, "scope_admin": "1"})
    assert escalate.status_code == 403


async def _usage_row(services: Services, project_id: str, key_id: str, when: datetime,
                     cost: int) -> None:
    async with services.db.session() as session, session.begin():
        session.add(UsageRecord(request_id=new_id(), project_id=project_id, key_id=key_id,
                                model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
                                status="succeeded", input_tokens=3, output_tokens=5, cost=cost,
                                wait_ms=1, run_ms=2, total_ms=3, created_at=when, images=0))


async def test_usage_days_are_the_viewers_days_and_the_csv_is_what_is_shown(
        console: Console) -> None:
    client = console.client
    tenant = console.services.projects.by_name("tenant")
    assert tenant is not None
    # 23:30 UTC on Jan 9 is Jan 10 in Tokyo (UTC+9) and Jan 9 in New York.
    late = datetime(2026, 1, 9, 23, 30, tzinfo=UTC)
    await _usage_row(console.services, tenant.id, console.tenant.key_id, late, 1_000)
    await _usage_row(console.services, tenant.id, console.tenant.key_id,
                     datetime(2026, 1, 9, 12, 0, tzinfo=UTC), 20)
    await sign_in(client, console.tenant.key, tz="Asia/Tokyo")
    params = {"since": "2026-01-08", "until": "2026-01-11"}
    page = await client.get("/console/usage", params=params)
    assert "Asia/Tokyo" in page.text
    rows = csv.DictReader(io.StringIO((await client.get("/console/usage.csv", params=params)).text))
    days = {r["day"]: int(r["cost_micro_units"]) for r in rows if r["table"] == "day"}
    assert days == {"2026-01-08": 0, "2026-01-09": 20, "2026-01-10": 1_000, "2026-01-11": 0}
    client.cookies.set("mf_tz", "America/New_York", path="/console")
    text = (await client.get("/console/usage.csv", params=params)).text
    rows = csv.DictReader(io.StringIO(text))
    days = {r["day"]: int(r["cost_micro_units"]) for r in rows if r["table"] == "day"}
    assert days["2026-01-09"] == 1_020 and days["2026-01-10"] == 0
    assert "America/New_York" in text
    other_key = {**params, "key": console.other.key_id}
    rows = csv.DictReader(io.StringIO((await client.get("/console/usage.csv", params=other_key)).text))
    assert sum(int(r["requests"]) for r in rows) == 0  # one key's usage only
    # India is UTC+5:30: a quarter-hour bucket, not an hour, decides the day
    await _usage_row(console.services, tenant.id, console.tenant.key_id,
                     datetime(2026, 1, 10, 18, 35, tzinfo=UTC), 7)  # 00:05 Jan 11 in Kolkata
    client.cookies.set("mf_tz", "Asia/Kolkata", path="/console")
    rows = csv.DictReader(io.StringIO((await client.get("/console/usage.csv", params=params)).text))
    days = {r["day"]: int(r["cost_micro_units"]) for r in rows if r["table"] == "day"}
    assert days["2026-01-11"] == 7 and days["2026-01-10"] == 1_000


class StripPrefix:
    """A reverse proxy in front of the app: serves it under ``prefix``, strips
    that from the path and says so in ``X-Forwarded-Prefix`` (as nginx or
    Traefik are set up to)."""

    def __init__(self, app: Any, prefix: str) -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope["path"]
        if scope["type"] == "http" and path.startswith(self.prefix + "/"):
            headers = [*scope["headers"], (b"x-forwarded-prefix", self.prefix.encode())]
            scope = {**scope, "path": path[len(self.prefix):], "raw_path": None,
                     "headers": headers}
        await self.app(scope, receive, send)


async def test_urls_follow_the_forwarded_prefix(console: Console) -> None:
    proxy = StripPrefix(console.client._transport.app, "/edge/mf")  # type: ignore[attr-defined]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=proxy),
                                 base_url="http://test/edge/mf") as client:
        await sign_in(client, console.admin.key, prefix="/edge/mf")
        cookie = next(c for c in client.cookies.jar if c.name == "mf_console")
        assert cookie.path == "/edge/mf/console"
        page = await client.get("/console/models")
        assert 'href="/edge/mf/console/keys"' in page.text
        assert 'src="/edge/mf/console/static/htmx/htmx.min.js"' in page.text
        assert '"/console/' not in page.text
        assert (await client.get("/console/static/htmx/htmx.min.js")).status_code == 200
    unsafe = await console.client.get("/console/login",
                                      headers={"X-Forwarded-Prefix": '/a"><script>'})
    assert "<script>" not in unsafe.text.split("</head>")[1]


async def test_operator_pages_render_and_change_things(console: Console) -> None:
    client = console.client
    csrf = await sign_in(client, console.admin.key)
    for path in ("/console/models", "/console/models/live", "/console/keys", "/console/usage",
                 "/console/credits", "/console/jobs", "/console/playground", "/console/operators"):
        assert (await client.get(path)).status_code == 200, path
    tenant = console.services.projects.by_name("tenant")
    assert tenant is not None
    top = await client.post("/console/credits", data={"csrf_token": csrf, "project": tenant.id,
                                                      "kind": "topup", "amount": "12.5",
                                                      "reason": "test"})
    assert top.status_code == 303
    assert (await console.services.ledger.money(tenant.id))["balance"] == 12_500_000
    plan = await client.post("/console/operators/plans", data={"csrf_token": csrf, "name": "gold",
                                                               "key_rpm": "5", "weight": "2"})
    assert plan.status_code == 303
    moved = await client.post(f"/console/operators/projects/{tenant.id}",
                              data={"csrf_token": csrf, "plan": "gold", "models": ""})
    assert moved.status_code == 303
    info = console.services.projects.project(tenant.id)
    assert info is not None and info.plan == "gold"
    made = await client.post("/console/operators/projects", data={"csrf_token": csrf,
                                                                  "name": "newco", "plan": "gold"})
    assert made.status_code == 303 and console.services.projects.by_name("newco") is not None
    scale = await client.post("/console/models/scale", data={
        "csrf_token": csrf, "model": "test/idle", "direction": "up"})
    assert scale.status_code == 303


async def _job(services: Services, project_id: str, key_id: str, status: str,
               images: int = 0) -> str:
    job_id = new_id()
    now = datetime.now(UTC)
    async with services.db.session() as session, session.begin():
        session.add(Job(id=job_id, project_id=project_id, key_id=key_id,
                        model_id="modelfleet/tiny-random-sd", job_type="image", status=status,
                        params=orjson.dumps({"params": {"prompt": "a lighthouse"},
                                             "base_url": ""}).decode(),
                        input_images=0, images=images, attempts=1, cost=0,
                        webhook_state="none", webhook_attempts=0, created_at=now,
                        started_at=now if status != "queued" else None,
                        finished_at=now if status == "succeeded" else None))
    return job_id


async def test_jobs_show_thumbnails_and_cancel_queued_ones(console: Console) -> None:
    from PIL import Image

    services, client = console.services, console.client
    tenant = services.projects.by_name("tenant")
    assert tenant is not None
    done = await _job(services, tenant.id, console.tenant.key_id, "succeeded", images=1)
    path = services.jobs.result_path(done, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path, format="PNG")
    queued = await _job(services, tenant.id, console.tenant.key_id, "queued")
    await sign_in(client, console.tenant.key)
    page = await client.get("/console/jobs")
    assert f'src="/console/jobs/{done}/result/0?project={tenant.id}"' in page.text
    image = await client.get(f"/console/jobs/{done}/result/0")
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    csrf = CSRF.search(page.text)
    assert csrf is not None and f"/console/jobs/{queued}/cancel" in page.text
    cancel = await client.post(f"/console/jobs/{queued}/cancel",
                               data={"csrf_token": csrf.group(1)})
    assert cancel.status_code == 303
    assert (await services.jobs.get(
        await services.keys.authenticate(console.tenant.key), queued)).status == "cancelled"
    # another project's job and its image: 404, as in the API
    await sign_in(client, console.other.key)
    assert (await client.get(f"/console/jobs/{done}")).status_code == 404
    assert (await client.get(f"/console/jobs/{done}/result/0")).status_code == 404


async def test_rotating_a_key_keeps_the_old_one_for_its_grace(console: Console) -> None:
    client = console.client
    csrf = await sign_in(client, console.admin.key)
    rotated = await client.post(f"/console/keys/{console.other.key_id}/rotate",
                                data={"csrf_token": csrf, "grace_seconds": "600"})
    assert rotated.status_code == 200
    secret = re.search(r'value="(mf-[^"]+)"', rotated.text)
    assert secret is not None and secret.group(1)
    headers = {"Authorization": f"Bearer {secret.group(1)}"}
    assert (await client.get("/v1/models", headers=headers)).status_code == 200
    old = {"Authorization": f"Bearer {console.other.key}"}
    assert (await client.get("/v1/models", headers=old)).status_code == 200  # in its grace
    info = await console.services.keys.get(console.other.key_id)
    assert info.expires_at is not None
    assert timedelta(seconds=590) < info.expires_at - datetime.now(UTC) <= timedelta(seconds=600)


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


# -- in a real browser, against a real server under a path prefix ---------------------

PREFIX = "/mf"
SHOTS = ROOT / "docs" / "console"


@dataclass
class Live:
    server: Server
    base: str  # the console's URL, with the prefix
    ops_job: str  # a job of the operators' project
    ops_project: str


def serve_under_prefix(tmp: Path, prefix: str) -> Server:
    """``modelfleet serve --root-path PREFIX`` with the built-in catalog."""
    return launch_server(tmp, DEFAULT_CATALOG.read_text(), args=("--root-path", prefix))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    if chromium_path() is None:
        pytest.skip("Debian's chromium is missing: scripts/test-services install")
    pytest.importorskip("playwright")
    tmp = tmp_path_factory.mktemp("console")
    _cli("models", "make-tiny-image", data_dir=tmp / "data")  # random weights, a few MB
    server = serve_under_prefix(tmp, PREFIX)
    try:
        settings = Settings(data_dir=server.data_dir)
        engine = sync_engine(settings.db_url)
        with engine.begin() as conn:
            ops = conn.execute(select(Project.id).where(Project.name == "ops")).scalar_one()
            key = conn.execute(select(ApiKey.id).where(ApiKey.project_id == ops)).scalar_one()
            job_id = new_id()
            now = datetime.now(UTC)
            conn.execute(insert(Job).values(
                id=job_id, project_id=ops, key_id=key, model_id="modelfleet/tiny-random-sd",
                job_type="image", status="failed", input_images=0, images=0, attempts=1,
                params=orjson.dumps({"params": {"prompt": "a lighthouse", "width": 64,
                                                "height": 64}, "base_url": ""}).decode(),
                error_code="model_unavailable", error_message="weights not installed",
                cost=0, webhook_state="none", webhook_attempts=0, created_at=now,
                started_at=now, finished_at=now))
        engine.dispose()
        yield Live(server, server.url + PREFIX + "/console", job_id, ops)
    finally:
        stop_server(server.proc)


@pytest.fixture(scope="module")
def browser(live: Live) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=chromium_path(), headless=True,
                                      args=["--no-sandbox", "--disable-gpu"])
        try:
            yield chromium
        finally:
            chromium.close()


PAGE_ERRORS: list[str] = []  # script errors and CSP refusals, in any page of the tests


def watch_errors(page: Any) -> None:
    page.on("pageerror", lambda exc: PAGE_ERRORS.append(f"{page.url}: {exc}"))
    page.on("console", lambda msg: PAGE_ERRORS.append(f"{page.url}: {msg.text}")
            if "Content Security Policy" in msg.text else None)


@pytest.fixture(autouse=True)
def no_page_errors() -> Iterator[None]:
    PAGE_ERRORS.clear()
    yield
    assert PAGE_ERRORS == []


def open_console(browser: Any, live: Live, key: str, zone: str = "Europe/Paris") -> Any:
    context = browser.new_context(viewport={"width": 1280, "height": 800}, timezone_id=zone)
    context.set_default_timeout(20_000)
    context.on("page", watch_errors)
    page = context.new_page()
    page.goto(live.base + "/login")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(live.base + "/models")
    return page


def shot(page: Any, name: str) -> None:
    """A screenshot: taken on every run (the page renders), and written over
    docs/console/ only with MODELFLEET_UPDATE_SCREENSHOTS=1, so a test run
    leaves the checkout as it was."""
    image = page.screenshot()
    assert image[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("MODELFLEET_UPDATE_SCREENSHOTS") == "1":
        SHOTS.mkdir(parents=True, exist_ok=True)
        (SHOTS / f"{name}.png").write_bytes(image)


def test_browser_operator_makes_and_revokes_a_key(browser: Any, live: Live) -> None:
    page = open_console(browser, live, live.server.admin_key)
    assert page.get_by_test_id("zone").inner_text() == "Europe/Paris"
    page.keyboard.press("Tab")  # the keyboard's first stop skips the navigation
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Models"
    assert "operator" in page.locator(".who").inner_text()
    # a key for the default project, made in the UI, works against the API
    page.get_by_role("link", name="Keys", exact=True).click()
    page.get_by_label("Project", exact=True).first.select_option(label="default")
    page.get_by_role("button", name="Show").click()
    page.locator("#nk-name").fill("made in the console")
    page.get_by_role("button", name="Create key").click()
    secret = page.get_by_test_id("secret").input_value()
    key_id = page.get_by_test_id("new-key-id").inner_text()
    assert secret.startswith("mf-")
    headers = {"Authorization": f"Bearer {secret}"}
    assert httpx.get(live.server.url + "/v1/models", headers=headers).status_code == 200
    page.get_by_role("link", name="Back to the keys").click()
    row = page.locator(f"tr[data-key-id='{key_id}']")
    assert row.locator("code.id").inner_text() == key_id  # never cut
    shot(page, "keys")
    row.get_by_role("button", name="Revoke").click()
    page.wait_for_selector(f"tr[data-key-id='{key_id}'] .status-revoked")
    refused = httpx.get(live.server.url + "/v1/models", headers=headers)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "revoked_api_key"
    # a form posted without its CSRF token is refused, and changes nothing
    page.goto(live.base + f"/credits?project={live.ops_project}")
    page.locator("#ca").fill("25")
    page.locator("form[action$='/credits'] input[name=csrf_token]").evaluate("e => e.remove()")
    page.get_by_role("button", name="Record").click()
    assert "Form refused" in page.locator("h1").inner_text()
    page.goto(live.base + f"/credits?project={live.ops_project}")
    assert page.get_by_test_id("balance").inner_text() == "0.00"
    page.locator("#ca").fill("25")
    page.locator("#cr").fill("console test")
    page.get_by_role("button", name="Record").click()
    assert page.get_by_test_id("balance").inner_text() == "25.00"
    shot(page, "credits")
    page.goto(live.base + "/operators")
    shot(page, "operators")
    page.goto(live.base + f"/jobs?project={live.ops_project}")
    assert live.ops_job in page.locator("table.jobs").inner_text()
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(live.base + "/login")
    page.goto(live.base + "/keys")
    assert page.url == live.base + "/login"
    page.context.close()


def test_browser_playground_wakes_a_sleeping_model(browser: Any, live: Live) -> None:
    tenant = open_console(browser, live, live.server.key, zone="Asia/Tokyo")
    assert "project default" in tenant.locator(".who").inner_text()
    watch = tenant.context.new_page()
    watch.goto(live.base + "/models?poll_ms=250")
    row = watch.locator("tr[data-model='HuggingFaceTB/SmolLM2-135M-Instruct']")
    assert row.get_by_test_id("state").inner_text() == "sleeping"
    # every state the row shows, as htmx swaps it in (the page is never reloaded)
    watch.evaluate("""() => { window.seen = []; window.loaded = performance.timeOrigin;
        const note = () => { const el = document.querySelector(
            "tr[data-model='HuggingFaceTB/SmolLM2-135M-Instruct'] [data-testid=state]");
            if (el && window.seen[window.seen.length - 1] !== el.textContent)
                window.seen.push(el.textContent); };
        new MutationObserver(note).observe(document.getElementById("live"),
                                           {childList: true, subtree: true}); note(); }""")
    tenant.goto(live.base + "/playground")
    tenant.get_by_label("Message").fill("Say hello.")
    tenant.get_by_role("button", name="Send").click()
    tenant.wait_for_function(
        "() => document.querySelector('[data-testid=cost]').textContent.includes('cost:')",
        timeout=60_000)
    assert tenant.get_by_test_id("answer").inner_text().strip()
    shown = tenant.get_by_test_id("headers").inner_text()
    assert "HTTP 200" in shown and "x-request-id:" in shown and "x-deployment-id:" in shown
    assert "x-ratelimit-limit:" in shown
    assert '"stream": true' in tenant.get_by_test_id("request").inner_text()
    shot(tenant, "playground")
    watch.wait_for_function("() => window.seen.includes('ready')", timeout=60_000)
    seen = watch.evaluate("window.seen")
    assert seen[0] == "sleeping" and "starting" in seen and seen[-1] == "ready", seen
    assert watch.evaluate("performance.timeOrigin") == watch.evaluate("window.loaded")
    # the tenant's usage: its own request, its own project only, days in Tokyo
    tenant.goto(live.base + "/usage")
    assert tenant.get_by_test_id("usage-zone").inner_text() == "Asia/Tokyo"
    models = tenant.get_by_test_id("usage-models").inner_text()
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in models
    assert tenant.locator("#chart canvas").count() == 1  # uPlot drew the chart
    shot(tenant, "usage")
    for path in (f"/jobs/{live.ops_job}", f"/usage?project={live.ops_project}",
                 f"/jobs?project={live.ops_project}"):
        answer = tenant.goto(live.base + path)
        assert answer is not None and answer.status == 404, path
    assert httpx.get(f"{live.server.url}/v1/inference/jobs/{live.ops_job}", headers={
        "Authorization": f"Bearer {live.server.key}"}).status_code == 404
    login = tenant.context.browser.new_page(viewport={"width": 1280, "height": 800})
    login.goto(live.base + "/login")
    shot(login, "login")
    login.close()
    tenant.context.close()


def test_browser_image_job_from_the_playground_shows_its_thumbnail(browser: Any,
                                                                    live: Live) -> None:
    tenant = open_console(browser, live, live.server.key, zone="America/New_York")
    tenant.goto(live.base + "/playground")
    tenant.get_by_label("Model").nth(1).select_option("modelfleet/tiny-random-sd")
    tenant.get_by_label("Prompt").fill("a lighthouse at dusk")
    tenant.get_by_role("button", name="Submit job").click()
    tenant.wait_for_function(
        "() => document.querySelector('[data-testid=answer]').textContent.includes('job_id')")
    assert "HTTP 202" in tenant.get_by_test_id("headers").inner_text()
    job_id = re.search(r'"job_id": "([^"]+)"', tenant.get_by_test_id("answer").inner_text())
    assert job_id is not None
    tenant.get_by_role("link", name="Jobs", exact=True).click()
    row = tenant.locator(f"tr[data-job-id='{job_id.group(1)}']")
    # the table refreshes itself while the job is queued or running (a worker cold start)
    thumb = row.locator("img.thumb")
    thumb.wait_for(timeout=150_000)
    assert row.locator("td").nth(2).inner_text().startswith("succeeded")
    tenant.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=thumb.element_handle())
    shot(tenant, "jobs")
    tenant.context.close()
    # the operator's view of the fleet now: replicas that served, scale events, timings
    operator = open_console(browser, live, live.server.admin_key)
    ready = operator.locator("tr[data-model='HuggingFaceTB/SmolLM2-135M-Instruct']")
    assert ready.get_by_test_id("state").inner_text() == "ready"
    assert ready.get_by_test_id("ready").inner_text() == "1/1"
    shot(operator, "models")
    operator.get_by_role("heading", name="Replicas").scroll_into_view_if_needed()
    operator.evaluate("window.scrollBy(0, -60)")
    assert "smollm2" in operator.locator("h2 + .scroll").first.inner_text()
    shot(operator, "models-operator")
    operator.context.close()
