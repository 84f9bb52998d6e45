"""Projects' settings, plans (tiers) and prices, held in memory for the request
path and reloaded whenever the store's version changes."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select

from modelfleet.catalog import Catalog, ModelSpec
from modelfleet.db import Database, bump_version
from modelfleet.errors import InvalidRequest, NotFound
from modelfleet.tables import Plan, PriceOverride, Project, ProjectModel

LIMIT_FIELDS = ("key_rpm", "key_tpm", "key_concurrency",
                "project_rpm", "project_tpm", "project_concurrency")


@dataclass(frozen=True)
class PlanLimits:
    """A tier.  ``None`` is unlimited."""

    name: str
    key_rpm: int | None = 1000
    key_tpm: int | None = None
    key_concurrency: int | None = None
    project_rpm: int | None = None
    project_tpm: int | None = None
    project_concurrency: int | None = None
    priority: int = 0
    weight: int = 1
    # Percent off batch lines' prices (None: the model's, else the server's).
    batch_discount_pct: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


DEFAULT_PLAN = PlanLimits(name="default")


@dataclass(frozen=True)
class ProjectInfo:
    id: str
    name: str
    plan: str
    # Models deployed to the project; None: every model in the catalog.
    models: frozenset[str] | None
    created_at: datetime

    def may_use(self, model_id: str) -> bool:
        return self.models is None or model_id in self.models

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "plan": self.plan,
                "models": sorted(self.models) if self.models is not None else None,
                "created_at": self.created_at.isoformat()}


def _now() -> datetime:
    return datetime.now(UTC)


# Plan names are path segments (/v1/admin/plans/{name}): the project-name alphabet.
_PLAN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,49}")


def check_label(value: str, param: str, max_chars: int) -> None:
    """A free-text name shown in listings and logs (a key's name): at most
    ``max_chars``, with no control or format characters (newlines, escapes,
    bidirectional overrides, zero-width marks), which would forge log lines
    or disguise the name.  400 naming ``param``."""
    if len(value) > max_chars:
        raise InvalidRequest(f"{param} is longer than {max_chars} characters", param=param)
    bad = next((c for c in value if unicodedata.category(c)[0] == "C"
                or c in "\u2028\u2029"), None)
    if bad is not None:
        raise InvalidRequest(f"{param} must not contain control characters (found "
                             f"U+{ord(bad):04X})", param=param)


def check_discount(value: object, param: str = "batch_discount_pct") -> None:
    """A batch discount: a whole percent 0-100, or None (not set)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or not 0 <= value <= 100):
        raise InvalidRequest(f"{param} must be a whole percent from 0 to 100, or null",
                             param=param)


def check_plan_name(name: str) -> None:
    if not _PLAN_NAME.fullmatch(name):
        raise InvalidRequest("plan names are 1-50 letters, digits, '.', '_' or '-', starting "
                             "with a letter or digit", param="name")


class ProjectService:
    def __init__(self, db: Database, catalog: Catalog) -> None:
        self._db = db
        self._catalog = catalog
        self._projects: dict[str, ProjectInfo] = {}
        self._plans: dict[str, PlanLimits] = {"default": DEFAULT_PLAN}
        self._prices: dict[str, tuple[int, int]] = {}

    async def load(self) -> None:
        async with self._db.session() as session:
            projects = list(await session.scalars(select(Project)))
            models = list(await session.scalars(select(ProjectModel)))
            plans = list(await session.scalars(select(Plan)))
            prices = list(await session.scalars(select(PriceOverride)))
        deployed: dict[str, set[str]] = {}
        for row in models:
            deployed.setdefault(row.project_id, set()).add(row.model_id)
        self._projects = {
            p.id: ProjectInfo(p.id, p.name, p.plan,
                              frozenset(deployed[p.id]) if p.id in deployed else None,
                              p.created_at)
            for p in projects
        }
        self._plans = {p.name: PlanLimits(**{f.name: getattr(p, f.name) for f in fields(PlanLimits)})
                       for p in plans} or {"default": DEFAULT_PLAN}
        self._prices = {p.model_id: (p.input_per_million, p.output_per_million) for p in prices}

    # -- reads on the request path (memory only) ---------------------------------

    def project(self, project_id: str) -> ProjectInfo | None:
        return self._projects.get(project_id)

    def by_name(self, name: str) -> ProjectInfo | None:
        return next((p for p in self._projects.values() if p.name == name), None)

    def plan_of(self, project_id: str) -> PlanLimits:
        info = self._projects.get(project_id)
        name = info.plan if info else "default"
        return self._plans.get(name) or self._plans.get("default") or DEFAULT_PLAN

    def prices(self, spec: ModelSpec) -> tuple[int, int]:
        """Micro-units per million input and output tokens."""
        return self._prices.get(spec.id, (spec.prices.input_per_million,
                                          spec.prices.output_per_million))

    def list_projects(self) -> list[ProjectInfo]:
        return sorted(self._projects.values(), key=lambda p: p.created_at)

    def list_plans(self) -> list[PlanLimits]:
        return sorted(self._plans.values(), key=lambda p: p.name)

    # -- changes (each bumps the store version) ----------------------------------

    def _known_models(self, models: list[str]) -> list[str]:
        out = []
        for name in models:
            spec = self._catalog.resolve(name)
            if spec is None:
                raise InvalidRequest(f"model {name!r} is not in the catalog", param="models")
            out.append(spec.id)
        return sorted(set(out))

    async def update_project(
        self, project_id: str, *, plan: str | None = None,
        models: list[str] | None = None, all_models: bool = False,
    ) -> ProjectInfo:
        if plan is not None and plan not in self._plans:
            raise InvalidRequest(f"no plan named {plan!r}", param="plan")
        if models is not None and not models:
            raise InvalidRequest("deploy at least one model, or all models", param="models")
        ids = self._known_models(models) if models is not None else None
        async with self._db.session() as session, session.begin():
            row = await session.get(Project, project_id)
            if row is None:
                raise NotFound(f"no project with id {project_id!r}", code="project_not_found")
            if plan is not None:
                row.plan = plan
            if ids is not None or all_models:
                await session.execute(delete(ProjectModel).where(ProjectModel.project_id == project_id))
                for model_id in ids or []:
                    session.add(ProjectModel(project_id=project_id, model_id=model_id))
            await bump_version(session)
        await self.load()
        info = self.project(project_id)
        assert info is not None
        return info

    async def set_plan(self, limits: PlanLimits) -> PlanLimits:
        check_plan_name(limits.name)
        for name in LIMIT_FIELDS:
            value = getattr(limits, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InvalidRequest(f"{name} must be a positive integer or null", param=name)
        if limits.weight < 1:
            raise InvalidRequest("weight must be at least 1", param="weight")
        check_discount(limits.batch_discount_pct)
        async with self._db.session() as session, session.begin():
            row = await session.get(Plan, limits.name)
            if row is None:
                row = Plan(name=limits.name)
                session.add(row)
            for f in fields(PlanLimits):
                setattr(row, f.name, getattr(limits, f.name))
            await bump_version(session)
        await self.load()
        return self._plans[limits.name]

    async def set_price(self, model: str, input_per_million: int, output_per_million: int) -> None:
        spec = self._catalog.resolve(model)
        if spec is None:
            raise NotFound(f"model {model!r} is not in the catalog", code="model_not_found")
        for name, value in (("input_per_million", input_per_million),
                            ("output_per_million", output_per_million)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidRequest(f"{name} must be a non-negative integer", param=name)
        async with self._db.session() as session, session.begin():
            row = await session.get(PriceOverride, spec.id)
            if row is None:
                session.add(PriceOverride(model_id=spec.id, input_per_million=input_per_million,
                                          output_per_million=output_per_million, updated_at=_now()))
            else:
                row.input_per_million = input_per_million
                row.output_per_million = output_per_million
                row.updated_at = _now()
            await bump_version(session)
        await self.load()
