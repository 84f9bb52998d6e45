"""The catalog in the store: models added, changed and removed at runtime.

The store's ``catalog_models`` table holds every model as its validated TOML
table (JSON).  The TOML catalog seeds it: at start, each model of the file is
written unless the store already has what the file says (so a fresh store gets
the whole file, a model added to the file appears, and a model edited in the
file takes the file's version), and a model that left the file is removed
unless an operator changed it through the API since.  From then on operators
change models with the admin API (``/v1/admin/models``) or the CLI
(``modelfleet models add|update|remove``).

Each change bumps the store version in its transaction, so every gateway
hears of it as it hears of a revoked key (``StoreWatcher``: the version probe,
and the Redis change feed when there is one) and calls ``CatalogSync.refresh``,
which reads the table (only then: nothing is read per request) and brings
the catalog, the fleet's pools and the scheduler's queues to it in one step of
the event loop.  A removed model answers 404 at once; its running requests
finish and its replicas stop after (``Fleet.retire``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, OperationalError

from modelfleet.catalog import Catalog, CatalogError, ModelSpec, model_errors, model_table, parse_model
from modelfleet.db import Database, bump_version
from modelfleet.errors import Conflict, InvalidRequest, ModelNotFound, ValidationFailed
from modelfleet.tables import CatalogModel

log = logging.getLogger(__name__)

# pydantic error types that mean "not the documented shape" (422); the others
# are values out of range or inconsistent (400), as elsewhere in the admin API.
_SHAPE_ERRORS = ("extra_forbidden", "missing", "union_tag", "model_type", "model_attributes_type",
                 "dict_type", "list_type", "string_type", "int_type", "float_type", "bool_type",
                 "enum", "literal_error")


def to_json(spec: ModelSpec) -> str:
    return orjson.dumps(model_table(spec), option=orjson.OPT_SORT_KEYS).decode()


def validate(raw: object) -> ModelSpec:
    """A model from a JSON object (API body, CLI file): checked as the catalog
    file checks it.  ValidationFailed (422) for an unknown key or a wrong
    type, InvalidRequest (400) for a value out of range; the message names
    every problem by its key, as the catalog file's errors do."""
    if not isinstance(raw, dict):
        raise ValidationFailed("a model is a JSON object with the keys of a [[models]] table")
    try:
        return parse_model(raw)
    except ValidationError as exc:
        problems = model_errors(raw, exc)
        message = "invalid model: " + "; ".join(f"{where}: {what}" for where, what in problems)
        param = problems[0][0] if problems else None
        shape = any(e["type"].startswith(_SHAPE_ERRORS) for e in exc.errors())
        raise (ValidationFailed if shape else InvalidRequest)(message, param=param) from None


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``patch`` over ``base``: tables merge key by key, anything else is
    replaced; an engine whose ``type`` changes is replaced whole."""
    out = dict(base)
    for key, value in patch.items():
        old = out.get(key)
        replace_engine = key == "engine" and isinstance(value, dict) and isinstance(old, dict) \
            and "type" in value and value["type"] != old.get("type")
        if isinstance(value, dict) and isinstance(old, dict) and not replace_engine:
            out[key] = merge(old, value)
        else:
            out[key] = value
    return out


def _same(stored: str | None, spec: ModelSpec) -> bool:
    """Whether stored JSON is ``spec`` (read as this version reads it: a key
    added since, with its default, does not count as a change)."""
    if stored is None:
        return False
    if stored == to_json(spec):
        return True
    try:
        return parse_model(orjson.loads(stored)) == spec
    except (ValidationError, ValueError):
        return False


def _read(model_id: str, text: str) -> ModelSpec | None:
    try:
        return parse_model(orjson.loads(text))
    except (ValidationError, ValueError) as exc:
        log.error("catalog model %s in the store is not valid here; skipped: %s", model_id, exc)
        return None


def _now() -> datetime:
    return datetime.now(UTC)


class CatalogStore:
    """The ``catalog_models`` rows: read, seeded from the file, and changed by
    operators (each change checked whole and bumping the store version)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def live(self) -> dict[str, str]:
        """Model id -> its JSON, for every model not removed."""
        async with self.db.session() as session:
            rows = await session.execute(
                select(CatalogModel.id, CatalogModel.spec).where(CatalogModel.removed.is_(False)))
            return {model_id: spec for model_id, spec in rows}

    async def specs(self) -> list[ModelSpec]:
        """The live models this version can read (a row it cannot is logged and
        left out, never served)."""
        return [spec for model_id, text in (await self.live()).items()
                if (spec := _read(model_id, text)) is not None]

    async def seed(self, catalog: Catalog) -> bool:
        """Bring the catalog file's models into the store (see the module's
        docstring); True if anything changed.  Gateways starting together
        retry after a clash."""
        for attempt in range(8):
            try:
                return await self._seed(catalog)
            except (IntegrityError, OperationalError):
                if attempt == 7:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
        return False

    async def _seed(self, catalog: Catalog) -> bool:
        changed = False
        now = _now()
        async with self.db.session() as session, session.begin():
            rows = {row.id: row for row in await session.scalars(select(CatalogModel))}
            in_file = set()
            for spec in catalog:
                in_file.add(spec.id)
                text = to_json(spec)
                row = rows.get(spec.id)
                if row is None:
                    session.add(CatalogModel(id=spec.id, spec=text, file_spec=text, origin="file",
                                             removed=False, updated_at=now))
                    changed = True
                elif not _same(row.file_spec, spec):  # the file was edited since: it is newest
                    row.spec, row.file_spec, row.origin, row.removed = text, text, "file", False
                    row.updated_at = now
                    changed = True
            for row in rows.values():
                if row.id not in in_file and row.file_spec is not None and row.origin == "file" \
                        and not row.removed:
                    row.removed, row.file_spec, row.updated_at = True, None, now
                    changed = True
            if changed:
                live = [read for r in rows.values()
                        if not r.removed and (read := _read(r.id, r.spec)) is not None]
                live += [spec for spec in catalog if spec.id not in rows]
                try:
                    catalog.check(live, "the catalog file with the store's models")
                except CatalogError as exc:
                    raise CatalogError(f"{exc} (change one with `modelfleet models update`)") \
                        from None
                await bump_version(session)
        return changed

    async def _check_with(self, specs: list[ModelSpec]) -> None:
        """The live models with ``specs`` in (new, or replacing theirs) must be
        one catalog: no id or alias used twice (409 ``model_conflict``)."""
        ids = {spec.id for spec in specs}
        models = [s for s in await self.specs() if s.id not in ids] + specs
        try:
            Catalog([]).check(models, "the catalog")
        except CatalogError as exc:
            raise Conflict(str(exc), code="model_conflict") from None

    async def add(self, spec: ModelSpec) -> ModelSpec:
        """A new model (409 if its id, or an alias, is taken)."""
        await self.add_many([spec])
        return spec

    async def add_many(self, specs: list[ModelSpec]) -> None:
        """New models, all or none (409 if an id or an alias is taken)."""
        live = await self.live()
        for spec in specs:
            if spec.id in live:
                raise Conflict(f"model {spec.id!r} exists; change it with PATCH "
                               f"/v1/admin/models/{spec.id} or `modelfleet models update`",
                               code="model_exists")
        await self._check_with(specs)
        try:
            async with self.db.session() as session, session.begin():
                for spec in specs:
                    text = to_json(spec)
                    row = await session.get(CatalogModel, spec.id)
                    if row is not None and not row.removed:
                        raise Conflict(f"model {spec.id!r} exists", code="model_exists")
                    if row is None:
                        session.add(CatalogModel(id=spec.id, spec=text, file_spec=None,
                                                 origin="admin", removed=False, updated_at=_now()))
                    else:  # removed before: added again
                        row.spec, row.origin, row.removed = text, "admin", False
                        row.updated_at = _now()
                await bump_version(session)
        except IntegrityError:
            raise Conflict("a model with this id exists", code="model_exists") from None

    async def get(self, ref: str) -> ModelSpec:
        """A live model by id or alias, or 404 ``model_not_found``."""
        live = await self.live()
        text = live.get(ref)
        if text is None:
            for known in await self.specs():
                if ref in known.aliases:
                    return known
            raise ModelNotFound(f"model {ref!r} does not exist", param="model")
        spec = _read(ref, text)
        if spec is None:
            raise ModelNotFound(f"model {ref!r} cannot be read by this version", param="model")
        return spec

    async def update(self, ref: str, patch: object) -> ModelSpec:
        """Change a model: ``patch`` (a JSON object, keys as in the TOML table)
        merged over it, then checked whole.  Its id cannot change."""
        if not isinstance(patch, dict):
            raise ValidationFailed("a model change is a JSON object with keys of a [[models]] table")
        current = await self.get(ref)
        if "id" in patch and patch["id"] != current.id:
            raise InvalidRequest("a model's id cannot change; add a new model and remove this one",
                                 param="id")
        spec = validate(merge(model_table(current), patch))
        await self._check_with([spec])
        async with self.db.session() as session, session.begin():
            changed = await session.execute(
                update(CatalogModel)
                .where(CatalogModel.id == spec.id, CatalogModel.removed.is_(False))
                .values(spec=to_json(spec), origin="admin", updated_at=_now()))
            if changed.rowcount == 0:  # type: ignore[attr-defined]
                raise ModelNotFound(f"model {ref!r} does not exist", param="model")
            await bump_version(session)
        return spec

    async def remove(self, ref: str) -> ModelSpec:
        """Remove a model (its row stays, marked removed: the catalog file does
        not bring it back unless the file's model changes)."""
        spec = await self.get(ref)
        async with self.db.session() as session, session.begin():
            await session.execute(
                update(CatalogModel).where(CatalogModel.id == spec.id)
                .values(removed=True, origin="admin", updated_at=_now()))
            await bump_version(session)
        return spec


class CatalogSync:
    """Keeps this gateway's catalog, fleet pools and queues equal to the
    store's models.  ``refresh`` runs when the store version changed (never per
    request); ``apply`` makes every change in one synchronous step."""

    def __init__(self, store: CatalogStore, catalog: Catalog, fleet: Any, scheduler: Any,
                 on_pool: Callable[[Any], None] = lambda pool: None) -> None:
        self.store = store
        self.catalog = catalog
        self.fleet = fleet
        self.scheduler = scheduler
        self.on_pool = on_pool
        self.file = Catalog(list(catalog), catalog.source)  # what seeds the store
        self._seen = {spec.id: to_json(spec) for spec in catalog}

    async def seed(self) -> None:
        await self.store.seed(self.file)

    async def refresh(self) -> None:
        live = await self.store.live()
        if live == self._seen:
            return
        specs: list[ModelSpec] = []
        current = {spec.id: spec for spec in self.catalog}
        for model_id, text in live.items():
            if self._seen.get(model_id) == text and model_id in current:
                specs.append(current[model_id])
                continue
            if (spec := _read(model_id, text)) is not None:
                specs.append(spec)
        self.apply(specs)
        self._seen = live

    def apply(self, specs: list[ModelSpec]) -> None:
        current = {spec.id: spec for spec in self.catalog}
        try:
            self.catalog.replace(specs)
        except CatalogError as exc:
            log.error("the store's catalog is not consistent; keeping the one in use: %s", exc)
            return
        wanted = {spec.id for spec in specs}
        for model_id in current.keys() - wanted:
            pool = self.fleet.remove_pool(model_id)
            if pool is not None:
                log.info("model %s removed; draining it", model_id)
                self.fleet.retire(pool)
        for spec in specs:
            old = current.get(spec.id)
            if old == spec:
                continue
            pool = self.fleet.pools.get(spec.id)
            if old is not None and pool is not None and same_launch(old, spec):
                pool.spec = spec  # limits, defaults, prices, capabilities, scaling: at once
                log.info("model %s changed", spec.id)
                if self.fleet.started and not pool.follower:
                    pool.scale_for_demand()
                continue
            pool, replaced = self.fleet.add_pool(spec)
            self.scheduler.attach(pool)
            self.on_pool(pool)
            if replaced is not None:
                log.info("model %s changed how it is launched; new replicas, the old ones drain",
                         spec.id)
                self.fleet.retire(replaced)
            else:
                log.info("model %s added", spec.id)


# What running replicas do not depend on: a change to these alone is taken up
# by the model's pool as it is.  Anything else (the engine, placement, keys
# added later) launches new replicas.
_NOT_LAUNCHED = {"aliases", "description", "owned_by", "defaults", "parameter_defaults",
                 "capabilities", "prices"}


def same_launch(old: ModelSpec, new: ModelSpec) -> bool:
    """Whether running replicas of ``old`` can serve ``new``: nothing their
    launch is made of changed (the engine, placement, the slots and each
    slot's context; limits and scaling otherwise apply per request)."""
    def launched(spec: ModelSpec) -> dict[str, Any]:
        table = {k: v for k, v in model_table(spec).items() if k not in _NOT_LAUNCHED}
        table["limits"] = {k: spec.limits.model_dump()[k]
                           for k in ("context_length", "max_input_tokens")}
        table["scaling"] = {"concurrency": spec.scaling.concurrency}
        return table

    return launched(old) == launched(new)
