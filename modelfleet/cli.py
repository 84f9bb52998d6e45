"""The ``modelfleet`` command: serve, keys, projects, credits, plans, prices, usage, models."""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import os
import re
import sys
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn, TextIO, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from modelfleet import reports
from modelfleet.catalog import DEFAULT_CATALOG, Catalog, CatalogError, load_catalog, model_table
from modelfleet.catalogstore import CatalogStore
from modelfleet.catalogstore import merge as merge_tables
from modelfleet.catalogstore import validate as validate_model
from modelfleet.db import Database, migrate
from modelfleet.errors import InvalidRequest, ModelfleetError, NotFound
from modelfleet.keys import CreatedKey, KeyService, Scope
from modelfleet.ledger import MAX_AMOUNT, write_credit
from modelfleet.observe import configure_logging
from modelfleet.projects import DEFAULT_PLAN, LIMIT_FIELDS, PlanLimits, ProjectInfo, ProjectService
from modelfleet.settings import Settings, default_data_dir

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
keys_app = typer.Typer(no_args_is_help=True, help="Create, list, revoke and rotate API keys.")
projects_app = typer.Typer(no_args_is_help=True, help="Create, list and configure projects.")
credits_app = typer.Typer(no_args_is_help=True,
                          help="Top up, adjust and read balances (integer micro-units).")
plans_app = typer.Typer(no_args_is_help=True, help="Plans (tiers): rate limits and priority.")
prices_app = typer.Typer(no_args_is_help=True, help="Per-model prices over the catalog's.")
usage_app = typer.Typer(no_args_is_help=True, help="Export usage records.")
models_app = typer.Typer(no_args_is_help=True,
                         help="The model catalog: list, add, update and remove models in the store.")
app.add_typer(keys_app, name="keys")
app.add_typer(projects_app, name="projects")
app.add_typer(credits_app, name="credits")
app.add_typer(plans_app, name="plans")
app.add_typer(prices_app, name="prices")
app.add_typer(usage_app, name="usage")
app.add_typer(models_app, name="models")

out = Console()
err = Console(stderr=True, soft_wrap=True)
T = TypeVar("T")
MAX_PRICE = MAX_AMOUNT
INT32_MAX = 2**31 - 1

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Data folder (default: $MODELFLEET_DATA_DIR or ~/.modelfleet)"),
]
CatalogOpt = Annotated[
    Path | None, typer.Option("--catalog", help="Catalog TOML file (default: the built-in one)")
]


def _settings(data_dir: Path | None, **extra: object) -> Settings:
    return Settings.from_env(data_dir=(data_dir or default_data_dir()).expanduser(), **extra)


def _fail(message: str) -> NoReturn:
    """Report bad input on stderr and exit 2."""
    err.print(Text.assemble(("error:", "red"), " ", message))
    raise typer.Exit(2)


def _with_db(data_dir: Path | None, work: Callable[[Database], Awaitable[T]]) -> T:
    """Run ``work`` against the store in the data folder (migrated first); a
    ModelfleetError becomes ``error: ...`` on stderr and exit code 2."""
    settings = _settings(data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings.db_url)

    async def main() -> T:
        db = Database(settings.db_url)
        feed = None
        if settings.redis_url:  # every gateway hears of the change at once
            from modelfleet.redisstore import ChangeFeed

            feed = ChangeFeed(settings.redis_url)
            db.change_hooks.append(feed.changed)
        try:
            return await work(db)
        finally:
            if feed is not None:
                await feed.close()
            await db.close()

    try:
        return asyncio.run(main())
    except ModelfleetError as exc:
        _fail(exc.message)


def _with_keys(data_dir: Path | None, work: Callable[[KeyService], Awaitable[T]]) -> T:
    """Run ``work`` with the store's keys and projects."""
    return _with_db(data_dir, lambda db: work(KeyService(db)))


def _catalog(path: Path | None, data_dir: Path | None) -> Catalog:
    """The models of ``--catalog FILE``; without it, the store's (models added at
    runtime included), or the built-in catalog's while no gateway seeded the store."""
    if path is None:
        specs = _with_db(data_dir, lambda db: CatalogStore(db).specs())
        if specs:
            return Catalog(specs)
    try:
        return load_catalog(path or DEFAULT_CATALOG)
    except CatalogError as exc:
        _fail(f"catalog error: {exc}")


async def _project_service(db: Database, catalog: Catalog) -> ProjectService:
    projects = ProjectService(db, catalog)
    await projects.load()
    return projects


def _find_project(projects: ProjectService, name: str) -> ProjectInfo:
    info = projects.by_name(name)
    if info is None:
        raise NotFound(f"no project named {name!r}", code="project_not_found")
    return info


_INT_RE = re.compile(r"^[+-]?\d[\d_]*$")


def _micro(value: str, *, positive: bool = False) -> int:
    """An amount of micro-units, from text: a plain integer, nothing else."""
    text = value.strip()
    if not _INT_RE.match(text):
        _fail(f"--amount must be an integer number of micro-units "
              f"(1 unit = 1000000), got {value!r}")
    amount = int(text)
    if positive and amount <= 0:
        _fail(f"a top-up must be a positive amount, got {amount}")
    return amount


def _show_key(created: CreatedKey, *, heading: str) -> None:
    err.print(f"[bold]{heading}[/bold] (project {created.project_name!r}, "
              f"scopes {', '.join(created.scopes)}, id {created.key_id})")
    err.print("Store it now: it is shown only once.")
    out.print(created.key, markup=False, highlight=False, soft_wrap=True)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8000,
    data_dir: DataDir = None,
    catalog: CatalogOpt = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
    workers: Annotated[int, typer.Option(
        min=1, help="Gateway processes sharing the port; one of them owns the model workers")] = 1,
    database_url: Annotated[str | None, typer.Option(
        help="The store: postgresql+asyncpg://user@host/db (default: SQLite in the data "
             "folder; env MODELFLEET_DATABASE_URL)")] = None,
    redis_url: Annotated[str | None, typer.Option(
        help="Redis shared by several gateways for limits, holds and change fan-out "
             "(env MODELFLEET_REDIS_URL)")] = None,
    ray_address: Annotated[str | None, typer.Option(
        help="A Ray cluster (host:6379): each replica runs as a Ray actor on a node with "
             "room for it, instead of a local process (env MODELFLEET_RAY_ADDRESS)")] = None,
    root_path: Annotated[str, typer.Option(
        help="The path prefix a reverse proxy serves modelfleet under (/mf), stripped by the "
             "proxy; the console's links start with it (or send X-Forwarded-Prefix)")] = "",
) -> None:
    """Run the API and its fleet of model workers."""
    from modelfleet.api import server
    from modelfleet.api.app import create_app
    from modelfleet.services import Services

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = _settings(data_dir, catalog_path=catalog or DEFAULT_CATALOG,
                             database_url=database_url, redis_url=redis_url,
                             ray_address=ray_address)
    except ValueError as exc:  # a MODELFLEET_HTTP_* value that is not a positive number
        _fail(f"settings: {exc}")
    settings = replace(settings, http=replace(settings.http, host=host, port=port))
    configure_logging(log_level, settings.observe.log_format)  # json or text (observe.py)
    try:
        parsed = load_catalog(settings.catalog_path)
    except CatalogError as exc:
        err.print(f"[red]catalog error:[/red] {exc}", markup=True, highlight=False)
        raise typer.Exit(2) from None
    if workers > 1:
        if root_path:
            _fail("--root-path is for one process; with --workers, have the proxy send "
                  "X-Forwarded-Prefix")
        _serve_workers(settings, len(parsed), workers, log_level)
        return
    services = Services.build(settings, parsed)
    services.on_bootstrap_key = lambda created: _show_key(
        created, heading="First start: created project 'default' and an inference key"
    )
    err.print(f"modelfleet: data in {settings.data_dir}; {len(parsed)} models from "
              f"{settings.catalog_path}; listening on http://{host}:{port}/v1")
    app = create_app(settings, services)
    if root_path:
        from modelfleet.console.prefix import RootPath

        try:
            app = RootPath(app, root_path)
        except ValueError as exc:
            _fail(str(exc))
    server.run(app, settings.http, log_level=log_level)


def _serve_workers(settings: Settings, models: int, workers: int, log_level: str) -> None:
    """``serve --workers N``: N uvicorn worker processes on one port, each a whole
    gateway (one of them owns the fleet: fleetshare.py).  The store is migrated
    and the first start's key made here, once, before any worker starts."""
    from modelfleet.api import server

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings.db_url)
    created = asyncio.run(_bootstrap(settings))
    if created is not None:
        _show_key(created, heading="First start: created project 'default' and an inference key")
    http = settings.http
    # What create_app_from_env (modelfleet/api/app.py) builds each worker's settings from.
    os.environ.update({
        "MODELFLEET_DATA_DIR": str(settings.data_dir),
        "MODELFLEET_CATALOG": str(settings.catalog_path),
        "MODELFLEET_HOST": http.host,
        "MODELFLEET_PORT": str(http.port),
        "MODELFLEET_LOG_LEVEL": log_level,
    })
    for name, value in (("MODELFLEET_DATABASE_URL", settings.database_url),
                        ("MODELFLEET_REDIS_URL", settings.redis_url),
                        ("MODELFLEET_RAY_ADDRESS", settings.ray_address)):
        if value:
            os.environ[name] = value
    err.print(f"modelfleet: data in {settings.data_dir}; {models} models from "
              f"{settings.catalog_path}; {workers} gateway processes listening on "
              f"http://{http.host}:{http.port}/v1")
    server.run("modelfleet.api.app:create_app_from_env", http, workers=workers,
               log_level=log_level, factory=True)


async def _bootstrap(settings: Settings) -> CreatedKey | None:
    """On an empty store: the ``default`` project, its inference key and welcome
    credit (what the server does at its first start in one process)."""
    if not settings.bootstrap_default_key:
        return None
    db = Database(settings.db_url)
    try:
        keys = KeyService(db)
        if await keys.count_projects() != 0:
            return None
        created = await keys.create("default", [Scope.inference.value], name="bootstrap")
        if settings.bootstrap_credit > 0:
            await write_credit(db, created.project_id, settings.bootstrap_credit, kind="topup",
                               reason="welcome credit", actor="bootstrap")
        return created
    finally:
        await db.close()


@keys_app.command("create")
def keys_create(
    project: Annotated[str, typer.Option(help="Project the key belongs to (created if new)")],
    scope: Annotated[
        list[str], typer.Option(help="inference, read or admin; repeat for several")
    ] = ["inference"],  # noqa: B006
    name: Annotated[str, typer.Option(help="A label for the key")] = "",
    expires_in_days: Annotated[float | None, typer.Option(help="Expire after this many days")] = None,
    data_dir: DataDir = None,
) -> None:
    """Create an API key and print it once."""
    expires = None
    if expires_in_days is not None:
        expires = datetime.now(UTC) + timedelta(days=expires_in_days)
    created = _with_keys(
        data_dir, lambda ks: ks.create(project, scope, name=name, expires_at=expires)
    )
    _show_key(created, heading="Created API key")


@keys_app.command("list")
def keys_list(
    project: Annotated[str | None, typer.Option(help="Only this project's keys")] = None,
    data_dir: DataDir = None,
) -> None:
    """List keys (prefixes only; keys themselves are never stored)."""
    rows = _with_keys(data_dir, lambda ks: ks.list_keys(project))
    _print_rows(
        ["id", "project", "name", "prefix", "scopes", "created", "expires", "revoked", "last used"],
        [[k.key_id, k.project_name, k.name, k.prefix, " ".join(k.scopes), _when(k.created_at),
          _when(k.expires_at), _when(k.revoked_at), _when(k.last_used_at)] for k in rows],
    )


@keys_app.command("revoke")
def keys_revoke(key_id: str, data_dir: DataDir = None) -> None:
    """Revoke a key by its id."""
    _with_keys(data_dir, lambda ks: ks.revoke(key_id))
    err.print(f"revoked {key_id}")


@keys_app.command("rotate")
def keys_rotate(
    key_id: str,
    grace_seconds: Annotated[
        float, typer.Option(help="Seconds the old key keeps working (0: it stops now)")
    ],
    data_dir: DataDir = None,
) -> None:
    """Replace a key with a new one (same project, scopes, name); print it once."""

    async def work(keys: KeyService) -> CreatedKey:
        old = await keys.get(key_id)
        if reports.key_status(old) == "expired":
            raise InvalidRequest("an expired key cannot be rotated; create a new one")
        return await keys.rotate(key_id, grace_seconds)

    created = _with_keys(data_dir, work)
    _show_key(created, heading=f"Rotated {key_id}; the old key stops in {grace_seconds:g} s")


@projects_app.command("create")
def projects_create(name: str, data_dir: DataDir = None) -> None:
    """Create a project."""
    project_id, created = _with_keys(data_dir, lambda ks: ks.ensure_project(name))
    err.print(f"{'created' if created else 'exists'}: {name} ({project_id})")


@projects_app.command("list")
def projects_list(data_dir: DataDir = None) -> None:
    """List projects."""
    rows = _with_keys(data_dir, lambda ks: ks.list_projects())
    _print_rows(["id", "name", "created"],
                [[project_id, name, _when(created)] for project_id, name, created in rows])


@projects_app.command("set")
def projects_set(
    project: Annotated[str, typer.Option(help="The project's name")],
    plan: Annotated[str | None, typer.Option(help="Put the project on this plan")] = None,
    models: Annotated[
        str | None, typer.Option(help="Comma-separated models the project may use (ids or aliases)")
    ] = None,
    all_models: Annotated[
        bool, typer.Option("--all-models", help="Let the project use every catalog model")
    ] = False,
    catalog: CatalogOpt = None,
    data_dir: DataDir = None,
) -> None:
    """Change a project's plan and deployed models."""
    if models is not None and all_models:
        _fail("give --models or --all-models, not both")
    names: list[str] | None = None
    if models is not None:
        names = [m.strip() for m in models.split(",") if m.strip()]
        if not names:
            _fail("--models needs at least one model name (or use --all-models)")
    if plan is None and names is None and not all_models:
        _fail("nothing to change: give --plan, --models or --all-models")
    parsed = _catalog(catalog, data_dir)

    async def work(db: Database) -> ProjectInfo:
        projects = await _project_service(db, parsed)
        info = _find_project(projects, project)
        return await projects.update_project(info.id, plan=plan, models=names,
                                             all_models=all_models)

    info = _with_db(data_dir, work)
    deployed = ", ".join(sorted(info.models)) if info.models is not None else "all models"
    err.print(Text(f"{info.name}: plan {info.plan}; models: {deployed}"))


# -- credits ------------------------------------------------------------------------


def _credit(data_dir: Path | None, project: str, amount: int, kind: str, reason: str) -> None:
    async def work(db: Database) -> tuple[dict[str, Any], int]:
        info = _find_project(await _project_service(db, load_catalog(DEFAULT_CATALOG)), project)
        entry = await write_credit(db, info.id, amount, kind=kind, reason=reason, actor="cli")
        return entry, await reports.ledger_balance(db, info.id)

    entry, balance = _with_db(data_dir, work)
    err.print(Text(f"{kind} of {entry['amount']} micro-units to {project} (entry {entry['id']}); "
                   f"balance now {balance} ({_units(balance)} units)"))


@credits_app.command("topup")
def credits_topup(
    project: Annotated[str, typer.Option(help="The project's name")],
    amount: Annotated[str, typer.Option(help="Micro-units to add (1 unit = 1000000); > 0")],
    reason: Annotated[str, typer.Option(help="Why, for the ledger")] = "",
    data_dir: DataDir = None,
) -> None:
    """Add credit to a project."""
    _credit(data_dir, project, _micro(amount, positive=True), "topup", reason)


@credits_app.command("adjust")
def credits_adjust(
    project: Annotated[str, typer.Option(help="The project's name")],
    amount: Annotated[
        str, typer.Option(help="Signed micro-units, not zero (use --amount=-5 for negatives)")
    ],
    reason: Annotated[str, typer.Option(help="Why (required; kept in the ledger)")],
    data_dir: DataDir = None,
) -> None:
    """Correct a project's balance by a signed amount, with a reason."""
    value = _micro(amount)
    if value == 0:
        _fail("an adjustment must not be zero")
    if not reason.strip():
        _fail("an adjustment needs a reason (--reason)")
    _credit(data_dir, project, value, "adjustment", reason)


@credits_app.command("balance")
def credits_balance(
    project: Annotated[str, typer.Option(help="The project's name")],
    data_dir: DataDir = None,
) -> None:
    """Print the project's balance in micro-units (the sum of its ledger)."""

    async def work(db: Database) -> int:
        info = _find_project(await _project_service(db, load_catalog(DEFAULT_CATALOG)), project)
        return await reports.ledger_balance(db, info.id)

    balance = _with_db(data_dir, work)
    err.print(Text(f"{project}: {_units(balance)} units"))
    print(balance)


def _units(micro: int) -> str:
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), 1_000_000)
    return f"{sign}{whole}.{frac:06d}"


# -- plans --------------------------------------------------------------------------


def _limit(name: str, value: str | None, current: int | None) -> int | None:
    """A limit option: a positive integer, or 'none' for unlimited; absent: unchanged."""
    if value is None:
        return current
    text = value.strip().lower()
    if text in ("none", "unlimited"):
        return None
    if not text.isdigit() or not 1 <= int(text) <= INT32_MAX:
        _fail(f"--{name.replace('_', '-')} must be a positive integer or 'none', got {value!r}")
    return int(text)


LimitOpt = Annotated[str | None, typer.Option(help="A positive integer, or 'none' for unlimited")]


@plans_app.command("set")
def plans_set(
    name: str,
    key_rpm: LimitOpt = None,
    key_tpm: LimitOpt = None,
    key_concurrency: LimitOpt = None,
    project_rpm: LimitOpt = None,
    project_tpm: LimitOpt = None,
    project_concurrency: LimitOpt = None,
    priority: Annotated[int | None, typer.Option(help="Higher is served first")] = None,
    weight: Annotated[int | None, typer.Option(help="Share among equal priorities (>= 1)")] = None,
    batch_discount_pct: Annotated[int | None, typer.Option(
        help="Percent off batch lines' prices (0-100; -1: unset, the model's or the "
             "server's)")] = None,
    data_dir: DataDir = None,
) -> None:
    """Create a plan, or change the given limits of an existing one."""
    given = {"key_rpm": key_rpm, "key_tpm": key_tpm, "key_concurrency": key_concurrency,
             "project_rpm": project_rpm, "project_tpm": project_tpm,
             "project_concurrency": project_concurrency}
    for field, value in given.items():
        _limit(field, value, None)  # reject bad values before touching the store
    if priority is not None and not -INT32_MAX <= priority <= INT32_MAX:
        _fail("--priority is out of range")
    if weight is not None and not 1 <= weight <= INT32_MAX:
        _fail("--weight must be a positive integer")
    if batch_discount_pct is not None and not -1 <= batch_discount_pct <= 100:
        _fail("--batch-discount-pct must be 0 to 100 (or -1 to unset)")

    async def work(db: Database) -> PlanLimits:
        projects = await _project_service(db, load_catalog(DEFAULT_CATALOG))
        current = next((p for p in projects.list_plans() if p.name == name), None)
        base = current or replace(DEFAULT_PLAN, name=name)
        changes: dict[str, Any] = {f: _limit(f, given[f], getattr(base, f)) for f in LIMIT_FIELDS}
        if priority is not None:
            changes["priority"] = priority
        if weight is not None:
            changes["weight"] = weight
        if batch_discount_pct is not None:
            changes["batch_discount_pct"] = None if batch_discount_pct < 0 else batch_discount_pct
        return await projects.set_plan(replace(base, **changes))

    plan = _with_db(data_dir, work)
    _print_plans([plan])


@plans_app.command("list")
def plans_list(data_dir: DataDir = None) -> None:
    """List plans and their limits ('none': unlimited)."""

    async def work(db: Database) -> list[PlanLimits]:
        return (await _project_service(db, load_catalog(DEFAULT_CATALOG))).list_plans()

    _print_plans(_with_db(data_dir, work))


def _print_plans(plans: list[PlanLimits]) -> None:
    headers = ["name", *LIMIT_FIELDS, "priority", "weight", "batch_discount_pct"]
    unset = {"batch_discount_pct": "default"}  # else None is unlimited
    _print_rows(headers, [[str(v) if v is not None else unset.get(k, "none")
                           for k, v in p.as_dict().items()] for p in plans])


# -- prices -------------------------------------------------------------------------


@prices_app.command("set")
def prices_set(
    model: str,
    input_per_million: Annotated[
        int, typer.Option(help="Micro-units per million input tokens (>= 0)")
    ],
    output_per_million: Annotated[
        int, typer.Option(help="Micro-units per million output tokens (>= 0)")
    ],
    catalog: CatalogOpt = None,
    data_dir: DataDir = None,
) -> None:
    """Set a model's price, over the catalog's."""
    parsed = _catalog(catalog, data_dir)
    spec = parsed.resolve(model)
    if spec is None:
        _fail(f"model {model!r} is not in the catalog")
    for flag, value in (("--input-per-million", input_per_million),
                        ("--output-per-million", output_per_million)):
        if not 0 <= value <= MAX_PRICE:
            _fail(f"{flag} must be between 0 and {MAX_PRICE}, got {value}")

    async def work(db: Database) -> None:
        projects = await _project_service(db, parsed)
        await projects.set_price(spec.id, input_per_million, output_per_million)

    _with_db(data_dir, work)
    err.print(Text(f"{spec.id}: {input_per_million} in, {output_per_million} out "
                   "(micro-units per million tokens)"))


@prices_app.command("list")
def prices_list(catalog: CatalogOpt = None, data_dir: DataDir = None) -> None:
    """Effective prices of every catalog model (micro-units per million tokens)."""
    parsed = _catalog(catalog, data_dir)

    async def work(db: Database) -> list[list[str]]:
        projects = await _project_service(db, parsed)
        overrides = await reports.price_overrides(db)
        return [[spec.id, *map(str, projects.prices(spec)),
                 "yes" if spec.id in overrides else "no"] for spec in parsed]

    _print_rows(["model", "input per million", "output per million", "overridden"],
                _with_db(data_dir, work))


# -- usage --------------------------------------------------------------------------


@usage_app.command("export")
def usage_export(
    project: Annotated[str, typer.Option(help="The project's name")],
    since: Annotated[str | None, typer.Option(help="From this ISO date or time (UTC)")] = None,
    until: Annotated[
        str | None, typer.Option(help="Before this ISO time; a date includes that day")
    ] = None,
    key: Annotated[str | None, typer.Option("--key", help="Only this key id's requests")] = None,
    out_file: Annotated[
        Path | None, typer.Option("--out", help="CSV file to write (default: stdout)")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Write a project's usage records as CSV (header first, oldest first)."""
    try:
        start, stop = reports.time_range(since, until)
    except InvalidRequest as exc:
        _fail(exc.message)

    async def work(db: Database) -> int:
        info = _find_project(await _project_service(db, load_catalog(DEFAULT_CATALOG)), project)
        if out_file is None:
            return await _write_csv(db, info.id, key, start, stop, sys.stdout)
        try:
            handle = out_file.open("w", newline="", encoding="utf-8")
        except OSError as exc:
            raise InvalidRequest(f"cannot write {out_file}: {exc.strerror}") from None
        with handle:
            return await _write_csv(db, info.id, key, start, stop, handle)

    count = _with_db(data_dir, work)
    err.print(Text(f"{count} usage records" + (f" written to {out_file}" if out_file else "")))


async def _write_csv(db: Database, project_id: str, key_id: str | None, since: datetime | None,
                     until: datetime | None, handle: TextIO) -> int:
    writer = csv.writer(handle)
    writer.writerow(reports.USAGE_COLUMNS)
    count = 0
    async for row in reports.iter_usage_records(db, project_id, key_id, since, until):
        writer.writerow([row[c] for c in reports.USAGE_COLUMNS])
        count += 1
    handle.flush()
    return count


@models_app.command("list")
def models_list(catalog: CatalogOpt = None, data_dir: DataDir = None) -> None:
    """List the store's models (what every gateway serves); with --catalog, check
    a catalog file and list its models instead."""
    if catalog is not None:
        try:
            specs = list(load_catalog(catalog))
        except CatalogError as exc:
            err.print(f"catalog error: {exc}", markup=False, highlight=False)
            raise typer.Exit(2) from None
    else:
        specs = _with_db(data_dir, lambda db: CatalogStore(db).specs())
        if not specs:
            err.print("the store has no models yet (a gateway seeds it from its catalog file "
                      "when it starts); the built-in catalog:", markup=False, highlight=False)
            specs = list(load_catalog(DEFAULT_CATALOG))
    _print_rows(
        ["id", "kind", "aliases", "engine", "max output", "replicas", "concurrency"],
        [[spec.id, spec.kind.value, ", ".join(spec.aliases), spec.backend,
          str(spec.limits.max_output_tokens),
          f"{spec.scaling.min_replicas}-{spec.scaling.max_replicas}",
          str(spec.scaling.concurrency)] for spec in sorted(specs, key=lambda s: s.id)],
    )


def _model_tables(path: Path) -> list[Any]:
    """The models in a file: TOML (``[[models]]`` tables, or one model's keys at
    the top level) or JSON (.json: one object or a list)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror}")
    try:
        raw: Any = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        _fail(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}")
    if isinstance(raw, dict) and set(raw) == {"models"} and isinstance(raw["models"], list):
        return list(raw["models"])
    return raw if isinstance(raw, list) else [raw]


def _setting(assignment: str) -> dict[str, Any]:
    """``limits.max_output_tokens=64`` as a nested table; the value is read as a
    TOML value (``64``, ``1.5``, ``true``, ``["a", "b"]``, ``"text"``), else as text."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        _fail(f"--set takes KEY=VALUE (a dotted key as in the catalog file), got {assignment!r}")
    try:
        parsed: Any = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    for part in reversed(key.strip().split(".")):
        parsed = {part: parsed}
    return dict(parsed)


@models_app.command("add")
def models_add(
    path: Annotated[Path, typer.Argument(help="A TOML file with [[models]] tables (as in the "
                                              "catalog), or a .json file")],
    data_dir: DataDir = None,
) -> None:
    """Add models to the store; every gateway serves them within a second."""
    tables = _model_tables(path)

    async def work(db: Database) -> list[str]:
        specs = [validate_model(table) for table in tables]
        await CatalogStore(db).add_many(specs)  # all of them, or none
        return [spec.id for spec in specs]

    for model_id in _with_db(data_dir, work):
        err.print(Text(f"added model {model_id}"))


@models_app.command("update")
def models_update(
    model: Annotated[str, typer.Argument(help="Model id or alias")],
    path: Annotated[Path | None, typer.Option("--file", help="TOML or .json file with the keys "
                                                             "to change")] = None,
    settings: Annotated[list[str] | None, typer.Option(
        "--set", help="KEY=VALUE, a dotted key as in the catalog file "
                      "(limits.max_output_tokens=64); repeatable")] = None,
    data_dir: DataDir = None,
) -> None:
    """Change a model in the store: the keys given are merged over its table,
    then the whole model is checked; every gateway uses it within a second."""
    patch: dict[str, Any] = {}
    if path is not None:
        tables = _model_tables(path)
        if len(tables) != 1 or not isinstance(tables[0], dict):
            _fail(f"{path}: give the keys of one model")
        patch = merge_tables(patch, tables[0])
    for assignment in settings or []:
        patch = merge_tables(patch, _setting(assignment))
    if not patch:
        _fail("nothing to change: give --file or --set")
    spec = _with_db(data_dir, lambda db: CatalogStore(db).update(model, patch))
    err.print(Text(f"updated model {spec.id}"))


@models_app.command("remove")
def models_remove(
    model: Annotated[str, typer.Argument(help="Model id or alias")],
    data_dir: DataDir = None,
) -> None:
    """Remove a model from the store: new requests get 404 within a second; running
    ones finish, then its replicas stop."""
    spec = _with_db(data_dir, lambda db: CatalogStore(db).remove(model))
    err.print(Text(f"removed model {spec.id}"))


@models_app.command("show")
def models_show(
    model: Annotated[str, typer.Argument(help="Model id or alias")],
    data_dir: DataDir = None,
) -> None:
    """A model of the store as JSON (the keys of its [[models]] table)."""
    spec = _with_db(data_dir, lambda db: CatalogStore(db).get(model))
    print(json.dumps(model_table(spec), indent=2))


@models_app.command("make-tiny-image")
def models_make_tiny_image(
    path: Annotated[Path | None, typer.Argument(
        help="Folder to write (default: the tiny-random-sd model's folder in the data folder)")] = None,
    data_dir: DataDir = None,
) -> None:
    """Build a tiny diffusers pipeline with RANDOM weights (a few MB, offline),
    so the image job flow can be tried without real weights: its images are noise."""
    from modelfleet.workers.tinydiffusion import build_tiny_pipeline

    _make_tiny(build_tiny_pipeline, "tiny-random-sd", path, data_dir)


@models_app.command("make-tiny-video")
def models_make_tiny_video(
    path: Annotated[Path | None, typer.Argument(help="Folder to write (default: the "
                    "tiny-random-video model's folder in the data folder)")] = None,
    data_dir: DataDir = None,
) -> None:
    """Build a tiny LTX-Video pipeline with RANDOM weights (under 1 MB, offline),
    so the video job flow can be tried without real weights: its videos are noise."""
    from modelfleet.workers.tinyvideo import build_tiny_video_pipeline

    _make_tiny(build_tiny_video_pipeline, "tiny-random-video", path, data_dir)


def _make_tiny(build: Callable[[Path], Path], name: str, path: Path | None,
               data_dir: Path | None) -> None:
    """Build the tiny model ``modelfleet/NAME`` into its catalog folder (or ``path``)."""
    target = path or _settings(data_dir).models_dir / f"modelfleet-{name}"
    build(target)
    err.print(f"tiny random pipeline written to {target}; model 'modelfleet/{name}' "
              "can serve now", markup=False, highlight=False)


def _print_rows(headers: list[str], rows: list[list[str]]) -> None:
    """A table on a terminal; tab-separated lines (header first) for scripts."""
    if out.is_terminal:
        table = Table(*headers)
        for row in rows:
            table.add_row(*row)
        out.print(table)
        return
    for row in [headers, *rows]:
        print("\t".join(row))


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def main() -> None:
    app()
