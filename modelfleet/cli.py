"""The ``modelfleet`` command: serve, keys, projects, models."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from modelfleet.catalog import DEFAULT_CATALOG, CatalogError, load_catalog
from modelfleet.db import Database, migrate
from modelfleet.errors import ModelfleetError
from modelfleet.keys import CreatedKey, KeyService
from modelfleet.settings import HttpSettings, Settings, default_data_dir

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
keys_app = typer.Typer(no_args_is_help=True, help="Create, list and revoke API keys.")
projects_app = typer.Typer(no_args_is_help=True, help="Create and list projects.")
models_app = typer.Typer(no_args_is_help=True, help="Inspect the model catalog.")
app.add_typer(keys_app, name="keys")
app.add_typer(projects_app, name="projects")
app.add_typer(models_app, name="models")

out = Console()
err = Console(stderr=True)
T = TypeVar("T")

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Data folder (default: $MODELFLEET_DATA_DIR or ~/.modelfleet)"),
]
CatalogOpt = Annotated[
    Path | None, typer.Option("--catalog", help="Catalog TOML file (default: the built-in one)")
]


def _settings(data_dir: Path | None, **extra: object) -> Settings:
    return Settings.from_env(data_dir=(data_dir or default_data_dir()).expanduser(), **extra)


def _with_keys(data_dir: Path | None, work: Callable[[KeyService], Awaitable[T]]) -> T:
    """Run ``work`` against the store in the data folder (migrated first)."""
    settings = _settings(data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings.db_url)

    async def main() -> T:
        db = Database(settings.db_url)
        try:
            return await work(KeyService(db))
        finally:
            await db.close()

    try:
        return asyncio.run(main())
    except ModelfleetError as exc:
        err.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(2) from None


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
) -> None:
    """Run the API and its fleet of model workers."""
    import uvicorn

    from modelfleet.api.app import create_app
    from modelfleet.services import Services

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _settings(
        data_dir, catalog_path=catalog or DEFAULT_CATALOG, http=HttpSettings(host=host, port=port)
    )
    try:
        parsed = load_catalog(settings.catalog_path)
    except CatalogError as exc:
        err.print(f"[red]catalog error:[/red] {exc}", markup=True, highlight=False)
        raise typer.Exit(2) from None
    services = Services.build(settings, parsed)
    services.on_bootstrap_key = lambda created: _show_key(
        created, heading="First start: created project 'default' and an inference key"
    )
    err.print(f"modelfleet: data in {settings.data_dir}; {len(parsed)} models from "
              f"{settings.catalog_path}; listening on http://{host}:{port}/v1")
    uvicorn.run(
        create_app(settings, services),
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        loop="uvloop",
        http="httptools",
        timeout_graceful_shutdown=10,
    )


@keys_app.command("create")
def keys_create(
    project: Annotated[str, typer.Option(help="Project the key belongs to (created if new)")],
    scope: Annotated[
        list[str], typer.Option(help="inference or admin; repeat for several")
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


@models_app.command("list")
def models_list(catalog: CatalogOpt = None) -> None:
    """List the catalog's models, or report what is wrong with the file."""
    try:
        parsed = load_catalog(catalog or DEFAULT_CATALOG)
    except CatalogError as exc:
        err.print(f"catalog error: {exc}", markup=False, highlight=False)
        raise typer.Exit(2) from None
    _print_rows(
        ["id", "kind", "aliases", "engine", "max output", "replicas", "concurrency"],
        [[spec.id, spec.kind.value, ", ".join(spec.aliases), spec.backend,
          str(spec.limits.max_output_tokens),
          f"{spec.scaling.min_replicas}-{spec.scaling.max_replicas}",
          str(spec.scaling.concurrency)] for spec in parsed],
    )


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
