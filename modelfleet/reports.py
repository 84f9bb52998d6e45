"""Read-only reports over the store: ledger pages, usage summaries, usage rows.

Every function runs bounded SQL (an index range, ``GROUP BY``, ``LIMIT``), so
nothing is loaded whole into memory however large the tables grow.  Used by
the account and admin routes and by the CLI.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.sql.elements import ColumnElement

from modelfleet.db import Database
from modelfleet.errors import InvalidRequest
from modelfleet.keys import KeyInfo
from modelfleet.tables import LedgerEntry, PriceOverride, UsageRecord

Group = Literal["day", "model", "day_model"]
GROUPS: tuple[str, ...] = ("day", "model", "day_model")
# The statuses a usage record can have (see modelfleet.gateway).
STATUSES = ("succeeded", "failed", "cancelled", "abandoned", "disconnected")
MAX_PAGE = 1000
MAX_GROUPS = 10_000
USAGE_COLUMNS = ("request_id", "created_at", "key_id", "model_id", "status", "input_tokens",
                 "output_tokens", "cost", "wait_ms", "run_ms", "total_ms", "images")

_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


# -- times ----------------------------------------------------------------------------


def parse_time(value: str, *, param: str, end: bool = False) -> datetime:
    """An ISO date or date-time as an aware UTC datetime.

    A date alone is the start of that day in UTC; with ``end`` (an ``until``
    bound, which is exclusive) it is the start of the next day, so the named
    day is included.  A date-time without a zone is taken as UTC.
    """
    text = value.strip()
    try:
        if _DATE_RE.match(text):
            start = datetime.combine(date.fromisoformat(text), time(), tzinfo=UTC)
            return start + timedelta(days=1) if end else start
        parsed = datetime.fromisoformat(text)
    except (ValueError, OverflowError):
        raise InvalidRequest(
            f"{param} must be an ISO date (2025-01-31) or date-time (2025-01-31T12:00:00Z), "
            f"got {value!r}", param=param,
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def time_range(since: str | None, until: str | None) -> tuple[datetime | None, datetime | None]:
    """Parsed ``since`` (inclusive) and ``until`` (exclusive) bounds; 400 if reversed."""
    start = parse_time(since, param="since") if since else None
    stop = parse_time(until, param="until", end=True) if until else None
    if start is not None and stop is not None and start >= stop:
        raise InvalidRequest("since must be before until", param="since")
    return start, stop


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


# -- plain data for responses -----------------------------------------------------------


def key_status(info: KeyInfo, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    if info.revoked_at is not None:
        return "revoked"
    if info.expires_at is not None and info.expires_at <= now:
        return "expired"
    return "active"


def key_row(info: KeyInfo) -> dict[str, Any]:
    """A key as shown in listings: never the secret (which is not stored anyway)."""
    return {
        "id": info.key_id,
        "object": "api_key",
        "project_id": info.project_id,
        "project_name": info.project_name,
        "name": info.name,
        "prefix": info.prefix,
        "scopes": list(info.scopes),
        "status": key_status(info),
        "created_at": iso(info.created_at),
        "expires_at": iso(info.expires_at),
        "revoked_at": iso(info.revoked_at),
        "last_used_at": iso(info.last_used_at),
    }


def _entry_row(row: LedgerEntry) -> dict[str, Any]:
    return {
        "seq": row.seq,
        "id": row.id,
        "object": "ledger_entry",
        "project_id": row.project_id,
        "amount": int(row.amount),
        "kind": row.kind,
        "reason": row.reason,
        "request_id": row.request_id,
        "actor": row.actor,
        "created_at": iso(row.created_at),
    }


# -- the ledger -----------------------------------------------------------------------


async def ledger_entries(db: Database, project_id: str, limit: int = 100,
                         before_seq: int | None = None) -> list[dict[str, Any]]:
    """A project's ledger entries, newest first, at most ``limit`` (≤ 1000);
    ``before_seq`` pages back from an entry's ``seq``."""
    limit = max(1, min(limit, MAX_PAGE))
    stmt = select(LedgerEntry).where(LedgerEntry.project_id == project_id)
    if before_seq is not None:
        stmt = stmt.where(LedgerEntry.seq < before_seq)
    stmt = stmt.order_by(LedgerEntry.seq.desc()).limit(limit)
    async with db.session() as session:
        return [_entry_row(row) for row in await session.scalars(stmt)]


async def ledger_entry(db: Database, entry_id: str) -> dict[str, Any] | None:
    async with db.session() as session:
        row = await session.scalar(select(LedgerEntry).where(LedgerEntry.id == entry_id))
        return _entry_row(row) if row is not None else None


async def ledger_balance(db: Database, project_id: str) -> int:
    """The sum of a project's ledger entries, from the store (not a server's memory)."""
    async with db.session() as session:
        total = await session.scalar(
            select(func.coalesce(func.sum(LedgerEntry.amount), 0))
            .where(LedgerEntry.project_id == project_id)
        )
    return int(total or 0)


async def ledger_count(db: Database, project_id: str) -> int:
    async with db.session() as session:
        count = await session.scalar(
            select(func.count()).select_from(LedgerEntry).where(LedgerEntry.project_id == project_id)
        )
    return int(count or 0)


# -- prices ---------------------------------------------------------------------------


async def price_overrides(db: Database) -> dict[str, tuple[int, int, datetime]]:
    """Operator prices by model id: (input, output per million, when set)."""
    async with db.session() as session:
        rows = await session.scalars(select(PriceOverride))
        return {r.model_id: (int(r.input_per_million), int(r.output_per_million), r.updated_at)
                for r in rows}


# -- usage ----------------------------------------------------------------------------


def _usage_filter(project_id: str, key_id: str | None, since: datetime | None,
                  until: datetime | None) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = [UsageRecord.project_id == project_id]
    if key_id is not None:
        where.append(UsageRecord.key_id == key_id)
    if since is not None:
        where.append(UsageRecord.created_at >= since)
    if until is not None:
        where.append(UsageRecord.created_at < until)
    return where


def _day(db: Database) -> ColumnElement[Any]:
    """The UTC calendar day of a usage record, as 'YYYY-MM-DD', in SQL."""
    if db.engine.dialect.name == "sqlite":
        # SQLite keeps the naive UTC time as text ('2025-01-31 12:00:00.000000').
        return func.date(UsageRecord.created_at)
    return func.to_char(func.timezone("UTC", UsageRecord.created_at), "YYYY-MM-DD")


def _aggregates() -> list[ColumnElement[Any]]:
    cols: list[ColumnElement[Any]] = [
        func.count().label("requests"),
        func.coalesce(func.sum(UsageRecord.input_tokens), 0).label("input_tokens"),
        func.coalesce(func.sum(UsageRecord.output_tokens), 0).label("output_tokens"),
        func.coalesce(func.sum(UsageRecord.cost), 0).label("cost"),
        func.coalesce(func.sum(UsageRecord.images), 0).label("images"),
    ]
    cols += [func.coalesce(func.sum(case((UsageRecord.status == s, 1), else_=0)), 0).label(s)
             for s in STATUSES]
    return cols


def _summary_row(row: Any, day: str | None, model_id: str | None) -> dict[str, Any]:
    statuses = {s: int(getattr(row, s)) for s in STATUSES}
    requests = int(row.requests)
    other = requests - sum(statuses.values())
    if other:
        statuses["other"] = other
    return {
        "day": day,
        "model_id": model_id,
        "requests": requests,
        "input_tokens": int(row.input_tokens),
        "output_tokens": int(row.output_tokens),
        "cost": int(row.cost),
        "images": int(row.images),
        "statuses": statuses,
    }


async def usage_summary(
    db: Database, project_id: str, *, key_id: str | None = None,
    since: datetime | None = None, until: datetime | None = None,
    group: str = "day", limit: int = MAX_GROUPS,
) -> list[dict[str, Any]]:
    """Usage per UTC day, per model, or per (day, model), oldest day first: the
    number of requests, tokens, cost (micro-units) and requests per status.
    ``since`` is inclusive, ``until`` exclusive."""
    if group not in GROUPS:
        raise InvalidRequest(f"group must be one of {', '.join(GROUPS)}", param="group")
    limit = max(1, min(limit, MAX_GROUPS))
    day = _day(db).label("day")
    keys: list[ColumnElement[Any]] = []
    if group in ("day", "day_model"):
        keys.append(day)
    if group in ("model", "day_model"):
        keys.append(UsageRecord.model_id.label("model_id"))
    stmt = (select(*keys, *_aggregates())
            .where(*_usage_filter(project_id, key_id, since, until))
            .group_by(*keys).order_by(*keys).limit(limit))
    async with db.session() as session:
        rows = (await session.execute(stmt)).all()
    return [
        _summary_row(
            row,
            str(row.day) if group != "model" else None,
            row.model_id if group != "day" else None,
        )
        for row in rows
    ]


async def usage_totals(
    db: Database, project_id: str, *, key_id: str | None = None,
    since: datetime | None = None, until: datetime | None = None,
) -> dict[str, Any]:
    """The same sums as ``usage_summary``, over the whole range."""
    stmt = select(*_aggregates()).where(*_usage_filter(project_id, key_id, since, until))
    async with db.session() as session:
        row = (await session.execute(stmt)).one()
    out = _summary_row(row, None, None)
    del out["day"], out["model_id"]
    return out


def _usage_record_row(row: UsageRecord) -> dict[str, Any]:
    return {
        "request_id": row.request_id,
        "created_at": iso(row.created_at),
        "key_id": row.key_id,
        "model_id": row.model_id,
        "status": row.status,
        "input_tokens": row.input_tokens,
        "output_tokens": row.output_tokens,
        "cost": int(row.cost),
        "images": int(row.images or 0),
        "wait_ms": row.wait_ms,
        "run_ms": row.run_ms,
        "total_ms": row.total_ms,
    }


async def _usage_page(
    db: Database, project_id: str, key_id: str | None, since: datetime | None,
    until: datetime | None, limit: int, after: tuple[datetime, str] | None,
) -> list[UsageRecord]:
    where = _usage_filter(project_id, key_id, since, until)
    if after is not None:
        when, request_id = after
        where.append(or_(UsageRecord.created_at > when,
                         and_(UsageRecord.created_at == when, UsageRecord.request_id > request_id)))
    stmt = (select(UsageRecord).where(*where)
            .order_by(UsageRecord.created_at, UsageRecord.request_id).limit(limit))
    async with db.session() as session:
        return list(await session.scalars(stmt))


async def usage_records(
    db: Database, project_id: str, key_id: str | None = None,
    since: datetime | None = None, until: datetime | None = None,
    limit: int = MAX_PAGE, after: tuple[datetime, str] | None = None,
) -> list[dict[str, Any]]:
    """Raw usage records, oldest first, at most ``limit`` (≤ 1000); ``after``,
    the (created_at, request_id) of the last row seen, continues from there."""
    limit = max(1, min(limit, MAX_PAGE))
    rows = await _usage_page(db, project_id, key_id, since, until, limit, after)
    return [_usage_record_row(r) for r in rows]


async def iter_usage_records(
    db: Database, project_id: str, key_id: str | None = None,
    since: datetime | None = None, until: datetime | None = None, batch: int = MAX_PAGE,
) -> AsyncIterator[dict[str, Any]]:
    """Every matching usage record, oldest first, read ``batch`` rows at a time
    (keyset pagination: memory stays bounded by ``batch``)."""
    batch = max(1, min(batch, MAX_PAGE))
    after: tuple[datetime, str] | None = None
    while True:
        rows = await _usage_page(db, project_id, key_id, since, until, batch, after)
        for row in rows:
            yield _usage_record_row(row)
        if len(rows) < batch:
            return
        after = (rows[-1].created_at, rows[-1].request_id)
