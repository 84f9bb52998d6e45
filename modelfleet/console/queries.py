"""The console's reads over the store, each bounded: a page of keys by keyset
on an index, usage summed in SQL per 15-minute bucket then placed in the
viewer's days (every time zone's offset is a multiple of 15 minutes)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import Integer, cast, func, select
from sqlalchemy.sql.elements import ColumnElement

from modelfleet.db import Database
from modelfleet.keys import KeyInfo
from modelfleet.tables import ApiKey, Project, UsageRecord

BUCKET_S = 900
MAX_BUCKETS = 200_000  # rows of (bucket, model, key) read for one usage page
MAX_DAYS = 92


def zone_of(name: str | None) -> ZoneInfo:
    """The IANA zone the browser reported, or UTC if it is missing or unknown."""
    if name and len(name) < 64 and ".." not in name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    return ZoneInfo("UTC")


# -- keys ---------------------------------------------------------------------------


@dataclass
class KeyPage:
    rows: list[KeyInfo]
    next_before: str | None  # the id to page on from, or None on the last page
    total: int


async def key_page(db: Database, *, project_id: str | None, before: str | None,
                   limit: int = 50) -> KeyPage:
    """Newest keys first (ids are time-ordered), ``limit`` of them, older than
    the key id ``before``; by the (project_id, id) index or the primary key."""
    stmt = select(ApiKey, Project.name).join(Project, Project.id == ApiKey.project_id)
    count = select(func.count()).select_from(ApiKey)
    if project_id is not None:
        stmt = stmt.where(ApiKey.project_id == project_id)
        count = count.where(ApiKey.project_id == project_id)
    if before:
        stmt = stmt.where(ApiKey.id < before)
    stmt = stmt.order_by(ApiKey.id.desc()).limit(limit + 1)
    async with db.session() as session:
        found = (await session.execute(stmt)).all()
        total = int(await session.scalar(count) or 0)
    rows = [KeyInfo(key_id=k.id, project_id=k.project_id, project_name=name, name=k.name,
                    prefix=k.prefix, scopes=tuple(k.scopes.split()), created_at=k.created_at,
                    expires_at=k.expires_at, revoked_at=k.revoked_at,
                    last_used_at=k.last_used_at) for k, name in found[:limit]]
    return KeyPage(rows, rows[-1].key_id if len(found) > limit else None, total)


async def key_row(db: Database, key_id: str) -> ApiKey | None:
    async with db.session() as session:
        return await session.get(ApiKey, key_id)


# -- usage --------------------------------------------------------------------------


def _bucket(db: Database) -> ColumnElement[Any]:
    """The 15-minute UTC bucket of a usage record, as an integer."""
    if db.engine.dialect.name == "sqlite":
        seconds: ColumnElement[Any] = cast(func.strftime("%s", UsageRecord.created_at), Integer)
        return cast(seconds / BUCKET_S, Integer)
    return cast(func.floor(func.extract("epoch", UsageRecord.created_at) / BUCKET_S), Integer)


@dataclass
class Sums:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    images: int = 0
    cost: int = 0

    def add(self, row: Any) -> None:
        self.requests += int(row.requests)
        self.input_tokens += int(row.input_tokens)
        self.output_tokens += int(row.output_tokens)
        self.images += int(row.images)
        self.cost += int(row.cost)


@dataclass
class Usage:
    zone: str
    first: date
    last: date
    by_day: dict[date, Sums] = field(default_factory=dict)
    by_model: dict[str, Sums] = field(default_factory=dict)
    by_key: dict[str, Sums] = field(default_factory=dict)
    total: Sums = field(default_factory=Sums)
    truncated: bool = False

    def days(self) -> Iterable[date]:
        day = self.first
        while day <= self.last:
            yield day
            day += timedelta(days=1)


def day_bounds(first: date, last: date, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """The UTC instants at which ``first`` starts and the day after ``last`` starts, in ``zone``."""
    start = datetime.combine(first, datetime.min.time(), tzinfo=zone).astimezone(UTC)
    stop = datetime.combine(last + timedelta(days=1), datetime.min.time(),
                            tzinfo=zone).astimezone(UTC)
    return start, stop


async def usage(db: Database, project_id: str, *, zone: ZoneInfo, first: date, last: date,
                key_id: str | None = None) -> Usage:
    """Requests, tokens, images and cost per day (in ``zone``), model and key,
    for the days ``first`` to ``last`` inclusive, as they are in ``zone``."""
    start, stop = day_bounds(first, last, zone)
    bucket = _bucket(db).label("bucket")
    where = [UsageRecord.project_id == project_id, UsageRecord.created_at >= start,
             UsageRecord.created_at < stop]
    if key_id:
        where.append(UsageRecord.key_id == key_id)
    stmt = (select(bucket, UsageRecord.model_id, UsageRecord.key_id,
                   func.count().label("requests"),
                   func.coalesce(func.sum(UsageRecord.input_tokens), 0).label("input_tokens"),
                   func.coalesce(func.sum(UsageRecord.output_tokens), 0).label("output_tokens"),
                   func.coalesce(func.sum(UsageRecord.images), 0).label("images"),
                   func.coalesce(func.sum(UsageRecord.cost), 0).label("cost"))
            .where(*where).group_by(bucket, UsageRecord.model_id, UsageRecord.key_id)
            .limit(MAX_BUCKETS + 1))
    async with db.session() as session:
        rows = (await session.execute(stmt)).all()
    out = Usage(zone=str(zone.key), first=first, last=last, truncated=len(rows) > MAX_BUCKETS)
    for day in out.days():
        out.by_day[day] = Sums()
    for row in rows[:MAX_BUCKETS]:
        local = datetime.fromtimestamp(int(row.bucket) * BUCKET_S, UTC).astimezone(zone).date()
        out.by_day.setdefault(local, Sums()).add(row)
        out.by_model.setdefault(row.model_id, Sums()).add(row)
        out.by_key.setdefault(row.key_id, Sums()).add(row)
        out.total.add(row)
    return out
