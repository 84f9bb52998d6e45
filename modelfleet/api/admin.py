"""The admin API under ``/v1/admin`` (``admin`` scope on every route): projects,
keys, credits, plans, prices and the catalog's models.

Bodies are strict JSON (unknown fields, wrong types, floats or booleans for
integers: 422); values of the right type that are out of range or make no
sense are 400.  Money is integer micro-units.  Each change goes through the
services, which bump the store version so every server process reloads.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from modelfleet import catalogstore, reports
from modelfleet.api import openapi_doc
from modelfleet.api.auth import require
from modelfleet.api.http import read_body
from modelfleet.catalog import model_table
from modelfleet.errors import Conflict, InvalidRequest, ModelNotFound, NotFound
from modelfleet.keys import Principal, Scope
from modelfleet.ledger import MAX_AMOUNT
from modelfleet.openai.common import Strict, parse_body, parse_json
from modelfleet.projects import LIMIT_FIELDS, PlanLimits, ProjectInfo, check_label
from modelfleet.services import Services

BODY_LIMIT = 64 * 1024
PROJECT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
MAX_EXPIRY_S = 10 * 366 * 86400  # keys may be made to expire within ten years
INT32_MAX = 2**31 - 1


# -- bodies ----------------------------------------------------------------------------


class ProjectCreate(Strict):
    name: str
    plan: str | None = None
    models: list[str] | None = None  # absent or null: every model


class ProjectPatch(Strict):
    plan: str | None = None
    models: list[str] | None = None  # null: every model; absent: unchanged


class KeyCreate(Strict):
    scopes: list[str]
    name: str = Field(default="", max_length=100)
    expires_at: str | None = None  # ISO 8601; no zone means UTC
    expires_in_seconds: int | None = None


class KeyRotate(Strict):
    grace_seconds: int


class TopUp(Strict):
    amount: int
    reason: str = Field(default="", max_length=500)


class Adjustment(Strict):
    amount: int
    reason: str = Field(max_length=500)


class PlanBody(Strict):
    key_rpm: int | None = PlanLimits.key_rpm
    key_tpm: int | None = None
    key_concurrency: int | None = None
    project_rpm: int | None = None
    project_tpm: int | None = None
    project_concurrency: int | None = None
    priority: int = 0
    weight: int = 1
    batch_discount_pct: int | None = None


class PriceBody(Strict):
    input_per_million: int
    output_per_million: int


def _openapi(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema()}}}}


def check_project_name(name: str) -> None:
    """The project-name alphabet, matched whole (a trailing newline is refused too)."""
    if not PROJECT_NAME.fullmatch(name):
        raise InvalidRequest("project names are 1-100 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit", param="name")


def _parse_expiry(body: KeyCreate) -> datetime | None:
    if body.expires_at is not None and body.expires_in_seconds is not None:
        raise InvalidRequest("send expires_at or expires_in_seconds, not both", param="expires_at")
    if body.expires_in_seconds is not None:
        if not 1 <= body.expires_in_seconds <= MAX_EXPIRY_S:
            raise InvalidRequest(f"expires_in_seconds must be between 1 and {MAX_EXPIRY_S}",
                                 param="expires_in_seconds")
        return datetime.now(UTC) + timedelta(seconds=body.expires_in_seconds)
    if body.expires_at is not None:
        try:
            when = datetime.fromisoformat(body.expires_at)
        except ValueError:
            raise InvalidRequest("expires_at must be an ISO 8601 date-time",
                                 param="expires_at") from None
        when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
        if when > datetime.now(UTC) + timedelta(seconds=MAX_EXPIRY_S):
            raise InvalidRequest("expires_at must be within ten years", param="expires_at")
        return when
    return None


class AdminRoutes:
    """The handlers; ``router`` binds them to paths."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.projects = services.projects
        self.ledger = services.ledger

    # -- helpers ---------------------------------------------------------------------

    async def admin(self, request: Request) -> Principal:
        return await require(self.services, request, Scope.admin)

    async def body_of(self, request: Request, model: type[Any]) -> Any:
        return parse_body(model, await read_body(request, BODY_LIMIT))

    def project_of(self, ref: str) -> ProjectInfo:
        """A project by id (or, failing that, by name), or 404."""
        info = self.projects.project(ref) or self.projects.by_name(ref)
        if info is None:
            raise NotFound(f"no project with id {ref!r}", code="project_not_found")
        return info

    async def project_out(self, info: ProjectInfo) -> dict[str, Any]:
        return {"object": "project", **info.as_dict(), **(await self.ledger.money(info.id))}

    def check_models(self, models: list[str] | None) -> None:
        if models is None:
            return
        if not models:
            raise InvalidRequest("models must name at least one model; null means every model",
                                 param="models")
        for name in models:
            if self.services.catalog.resolve(name) is None:
                raise InvalidRequest(f"model {name!r} is not in the catalog", param="models")

    def check_plan(self, plan: str | None) -> None:
        if plan is not None and plan not in {p.name for p in self.projects.list_plans()}:
            raise InvalidRequest(f"no plan named {plan!r}", param="plan")

    async def money_out(self, entry_id: str, project_id: str) -> dict[str, Any]:
        await self.services.watcher.check()
        return {"entry": await reports.ledger_entry(self.services.db, entry_id),
                "project_id": project_id, **(await self.ledger.money(project_id))}

    # -- projects --------------------------------------------------------------------

    async def create_project(self, request: Request) -> dict[str, Any]:
        """Create a project, optionally on a plan and limited to some models."""
        await self.admin(request)
        body: ProjectCreate = await self.body_of(request, ProjectCreate)
        check_project_name(body.name)
        self.check_plan(body.plan)  # everything is checked before anything is written
        self.check_models(body.models)
        if self.projects.by_name(body.name) is not None:
            raise Conflict(f"a project named {body.name!r} exists", code="project_exists")
        project_id, created = await self.services.keys.ensure_project(body.name)
        if not created:
            raise Conflict(f"a project named {body.name!r} exists", code="project_exists")
        if body.plan is not None or body.models is not None:
            await self.projects.update_project(project_id, plan=body.plan, models=body.models)
        await self.services.watcher.check()
        return await self.project_out(self.project_of(project_id))

    async def list_projects(self, request: Request) -> dict[str, Any]:
        """Every project with its plan, deployed models and money (micro-units)."""
        await self.admin(request)
        return {"object": "list",
                "data": [await self.project_out(p) for p in self.projects.list_projects()]}

    async def get_project(self, project_id: str, request: Request) -> dict[str, Any]:
        await self.admin(request)
        return await self.project_out(self.project_of(project_id))

    async def patch_project(self, project_id: str, request: Request) -> dict[str, Any]:
        """Change the plan and/or the deployed models (``models: null``: every model)."""
        await self.admin(request)
        info = self.project_of(project_id)
        body: ProjectPatch = await self.body_of(request, ProjectPatch)
        sent = body.model_fields_set
        if "plan" in sent and body.plan is None:
            raise InvalidRequest("plan cannot be null", param="plan")
        self.check_plan(body.plan)
        self.check_models(body.models)
        all_models = "models" in sent and body.models is None
        updated = await self.projects.update_project(info.id, plan=body.plan, models=body.models,
                                                     all_models=all_models)
        await self.services.watcher.check()
        return await self.project_out(updated)

    # -- keys ------------------------------------------------------------------------

    async def create_key(self, project_id: str, request: Request) -> dict[str, Any]:
        """Create a key; the secret is in this response only."""
        await self.admin(request)
        info = self.project_of(project_id)
        body: KeyCreate = await self.body_of(request, KeyCreate)
        check_label(body.name, "name", 100)
        expires = _parse_expiry(body)
        created = await self.services.keys.create(info.name, body.scopes, name=body.name,
                                                  expires_at=expires)
        return {"object": "api_key", "id": created.key_id, "key": created.key,
                "prefix": created.prefix, "scopes": list(created.scopes), "name": body.name,
                "project_id": created.project_id, "project_name": created.project_name,
                "expires_at": reports.iso(expires)}

    async def list_keys(self, project_id: str, request: Request) -> dict[str, Any]:
        """A project's keys (prefixes and state; never a secret)."""
        await self.admin(request)
        info = self.project_of(project_id)
        rows = await self.services.keys.list_keys(project_id=info.id)
        return {"object": "list", "project_id": info.id,
                "data": [reports.key_row(k) for k in rows]}

    async def revoke_key(self, key_id: str, request: Request) -> dict[str, Any]:
        """Revoke now: the next request with the key is refused (401)."""
        await self.admin(request)
        await self.services.keys.revoke(key_id)
        await self.services.watcher.check()
        return reports.key_row(await self.services.keys.get(key_id))

    async def rotate_key(self, key_id: str, request: Request) -> dict[str, Any]:
        """A new key (shown once) with the same project, scopes and name; the old
        one keeps working for ``grace_seconds`` (0: stops now)."""
        await self.admin(request)
        body: KeyRotate = await self.body_of(request, KeyRotate)
        keys = self.services.keys
        if reports.key_status(await keys.get(key_id)) == "expired":
            raise InvalidRequest("an expired key cannot be rotated; create a new one",
                                 param="key_id")
        created = await keys.rotate(key_id, body.grace_seconds)
        await self.services.watcher.check()
        return {"object": "api_key", "id": created.key_id, "key": created.key,
                "prefix": created.prefix, "scopes": list(created.scopes),
                "project_id": created.project_id, "project_name": created.project_name,
                "replaces": reports.key_row(await keys.get(key_id))}

    # -- money -----------------------------------------------------------------------

    async def top_up(self, project_id: str, request: Request) -> dict[str, Any]:
        """Add credit: a positive integer of micro-units."""
        principal = await self.admin(request)
        info = self.project_of(project_id)
        body: TopUp = await self.body_of(request, TopUp)
        entry = await self.ledger.credit(info.id, body.amount, kind="topup", reason=body.reason,
                                         actor=principal.key_id)
        return await self.money_out(entry["id"], info.id)

    async def adjust(self, project_id: str, request: Request) -> dict[str, Any]:
        """Correct the balance by a signed, non-zero amount, with a reason."""
        principal = await self.admin(request)
        info = self.project_of(project_id)
        body: Adjustment = await self.body_of(request, Adjustment)
        entry = await self.ledger.credit(info.id, body.amount, kind="adjustment",
                                         reason=body.reason, actor=principal.key_id)
        return await self.money_out(entry["id"], info.id)

    # -- plans -----------------------------------------------------------------------

    async def list_plans(self, request: Request) -> dict[str, Any]:
        await self.admin(request)
        return {"object": "list",
                "data": [{"object": "plan", **p.as_dict()} for p in self.projects.list_plans()]}

    async def put_plan(self, name: str, request: Request) -> dict[str, Any]:
        """Create or replace a plan; omitted fields take a new plan's defaults."""
        await self.admin(request)
        body: PlanBody = await self.body_of(request, PlanBody)
        for field in LIMIT_FIELDS:
            value = getattr(body, field)
            if value is not None and not 1 <= value <= INT32_MAX:
                raise InvalidRequest(f"{field} must be a positive integer or null", param=field)
        if not -INT32_MAX <= body.priority <= INT32_MAX:
            raise InvalidRequest("priority is out of range", param="priority")
        if not 1 <= body.weight <= INT32_MAX:
            raise InvalidRequest("weight must be a positive integer", param="weight")
        plan = await self.projects.set_plan(PlanLimits(name=name, **body.model_dump()))
        await self.services.watcher.check()
        return {"object": "plan", **plan.as_dict()}

    # -- prices ----------------------------------------------------------------------

    async def prices_out(self) -> list[dict[str, Any]]:
        overrides = await reports.price_overrides(self.services.db)
        rows = []
        for spec in self.services.catalog:
            effective = self.projects.prices(spec)
            override = overrides.get(spec.id)
            rows.append({
                "object": "price", "model": spec.id,
                "input_per_million": effective[0], "output_per_million": effective[1],
                "overridden": override is not None,
                "catalog": {"input_per_million": spec.prices.input_per_million,
                            "output_per_million": spec.prices.output_per_million},
                "updated_at": reports.iso(override[2]) if override else None,
            })
        return rows

    async def list_prices(self, request: Request) -> dict[str, Any]:
        """Effective prices (micro-units per million tokens) of every catalog model."""
        await self.admin(request)
        return {"object": "list", "data": await self.prices_out()}

    async def put_price(self, model_id: str, request: Request) -> dict[str, Any]:
        """Override a model's catalog price."""
        await self.admin(request)
        spec = self.services.catalog.resolve(model_id)
        if spec is None:
            raise ModelNotFound(f"model {model_id!r} is not in the catalog", param="model")
        body: PriceBody = await self.body_of(request, PriceBody)
        for field in ("input_per_million", "output_per_million"):
            if not 0 <= getattr(body, field) <= MAX_AMOUNT:
                raise InvalidRequest(f"{field} must be between 0 and {MAX_AMOUNT}", param=field)
        await self.projects.set_price(spec.id, body.input_per_million, body.output_per_million)
        await self.services.watcher.check()
        return next(row for row in await self.prices_out() if row["model"] == spec.id)


class ModelRoutes:
    """The catalog's models, managed at runtime (``catalogstore.py``): each
    change is stored, then taken up by this gateway before the answer and by
    every other one within a second."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.store = catalogstore.CatalogStore(services.db)

    async def model_out(self, model_id: str) -> dict[str, Any]:
        spec = await self.store.get(model_id)
        pool = self.services.fleet.pools.get(spec.id)
        return {"object": "catalog_model", "id": spec.id, "model": model_table(spec),
                "runtime": pool.describe() if pool is not None else None}

    async def list_models(self, request: Request) -> dict[str, Any]:
        """Every model in the store's catalog, as its TOML table (JSON), with its
        runtime state on this gateway."""
        await require(self.services, request, Scope.admin)
        return {"object": "list", "data": [await self.model_out(model_id)
                                           for model_id in sorted(await self.store.live())]}

    async def get_model(self, model_id: str, request: Request) -> dict[str, Any]:
        await require(self.services, request, Scope.admin)
        return await self.model_out(model_id)

    async def add_model(self, request: Request) -> dict[str, Any]:
        """Add a model: the body is one ``[[models]]`` table as JSON, checked as the
        catalog file is (unknown keys and wrong types 422, bad values 400, an id
        or alias in use 409)."""
        await require(self.services, request, Scope.admin)
        spec = catalogstore.validate(parse_json(await read_body(request, BODY_LIMIT)))
        await self.store.add(spec)
        await self.services.watcher.check()
        return await self.model_out(spec.id)

    async def patch_model(self, model_id: str, request: Request) -> dict[str, Any]:
        """Change a model: the body's keys are merged over its table (tables key by
        key), then the whole model is checked again."""
        await require(self.services, request, Scope.admin)
        spec = await self.store.update(model_id, parse_json(await read_body(request, BODY_LIMIT)))
        await self.services.watcher.check()
        return await self.model_out(spec.id)

    async def delete_model(self, model_id: str, request: Request) -> dict[str, Any]:
        """Remove a model: new requests get 404 at once; running ones finish, then
        its replicas stop."""
        await require(self.services, request, Scope.admin)
        spec = await self.store.remove(model_id)
        await self.services.watcher.check()
        return {"object": "catalog_model.deleted", "id": spec.id, "deleted": True}


MODEL_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "description": "A [[models]] table of the catalog, as JSON "
                                     "(docs/catalog.md): the model, or for PATCH the keys to change"}}}}}


def router(services: Services) -> APIRouter:
    api = APIRouter(prefix="/v1/admin", tags=["admin"])
    h = AdminRoutes(services)
    body_errors = (400, 413, 422)  # a body: its values (400), size (413), shape (422)
    routes: list[tuple[str, str, Any, int, type[BaseModel] | None, tuple[int, ...]]] = [
        ("POST", "/projects", h.create_project, 201, ProjectCreate, (*body_errors, 409)),
        ("GET", "/projects", h.list_projects, 200, None, ()),
        ("GET", "/projects/{project_id}", h.get_project, 200, None, (404,)),
        ("PATCH", "/projects/{project_id}", h.patch_project, 200, ProjectPatch, (*body_errors, 404)),
        ("POST", "/projects/{project_id}/keys", h.create_key, 201, KeyCreate, (*body_errors, 404)),
        ("GET", "/projects/{project_id}/keys", h.list_keys, 200, None, (404,)),
        ("POST", "/keys/{key_id}/revoke", h.revoke_key, 200, None, (404,)),
        ("POST", "/keys/{key_id}/rotate", h.rotate_key, 201, KeyRotate, (*body_errors, 404)),
        ("POST", "/projects/{project_id}/credits", h.top_up, 201, TopUp, (*body_errors, 404)),
        ("POST", "/projects/{project_id}/adjustments", h.adjust, 201, Adjustment,
         (*body_errors, 404)),
        ("GET", "/plans", h.list_plans, 200, None, ()),
        ("PUT", "/plans/{name}", h.put_plan, 200, PlanBody, body_errors),
        ("GET", "/prices", h.list_prices, 200, None, ()),
        ("PUT", "/prices/{model_id:path}", h.put_price, 200, PriceBody, (*body_errors, 404)),
    ]
    for method, path, endpoint, status, body, statuses in routes:
        api.add_api_route(path, endpoint, methods=[method], status_code=status,
                          openapi_extra=_openapi(body) if body else None,
                          responses=openapi_doc.errors(*statuses, scope="admin"))
    m = ModelRoutes(services)
    model_routes: list[tuple[str, str, Any, int, bool, tuple[int, ...]]] = [
        ("GET", "/models", m.list_models, 200, False, ()),
        ("POST", "/models", m.add_model, 201, True, (*body_errors, 409)),
        ("GET", "/models/{model_id:path}", m.get_model, 200, False, (404,)),
        ("PATCH", "/models/{model_id:path}", m.patch_model, 200, True, (*body_errors, 404, 409)),
        ("DELETE", "/models/{model_id:path}", m.delete_model, 200, False, (404,)),
    ]
    for method, path, endpoint, status, has_body, statuses in model_routes:
        api.add_api_route(path, endpoint, methods=[method], status_code=status,
                          openapi_extra=MODEL_BODY if has_body else None,
                          responses=openapi_doc.errors(*statuses, scope="admin"))
    return api
