"""Stored responses (``POST /v1/responses`` with ``store``, the default):
kept per project for ``GET``, ``DELETE``, ``input_items`` and
``previous_response_id``, until their retention ends.  Another project's
ids are not found (404), as job ids are."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import delete

from modelfleet.db import Database
from modelfleet.errors import InvalidRequest, NotFound
from modelfleet.keys import Principal
from modelfleet.tables import StoredResponse

# Expired rows are deleted by the next save after this many seconds.
_SWEEP_EVERY_S = 60.0


class ResponseStore:
    def __init__(self, db: Database, retention_s: float) -> None:
        self.db = db
        self.retention_s = retention_s
        self._swept = 0.0

    async def save(self, principal: Principal, response: dict[str, Any],
                   input_items: list[dict[str, Any]], context: list[dict[str, Any]]) -> None:
        now = datetime.now(UTC)
        row = StoredResponse(
            id=response["id"], project_id=principal.project_id, key_id=principal.key_id,
            model_id=response["model"], status=response["status"],
            previous_response_id=response.get("previous_response_id"),
            body=orjson.dumps(response).decode(), input_items=orjson.dumps(input_items).decode(),
            context=orjson.dumps(context).decode(), created_at=now,
            expires_at=now + timedelta(seconds=self.retention_s))
        sweep = time.monotonic() - self._swept > _SWEEP_EVERY_S
        async with self.db.session() as session, session.begin():
            if sweep:
                await session.execute(delete(StoredResponse).where(StoredResponse.expires_at < now))
            session.add(row)
        if sweep:
            self._swept = time.monotonic()

    async def _row(self, principal: Principal, response_id: str) -> StoredResponse | None:
        async with self.db.session() as session:
            row = await session.get(StoredResponse, response_id)
        if row is None or row.project_id != principal.project_id or (
                row.expires_at is not None and row.expires_at < datetime.now(UTC)):
            return None
        return row

    async def get(self, principal: Principal, response_id: str) -> StoredResponse:
        row = await self._row(principal, response_id)
        if row is None:
            raise NotFound(f"response {response_id!r} does not exist",
                           code="response_not_found")
        return row

    async def previous(self, principal: Principal, response_id: str) -> list[dict[str, Any]]:
        """What a continuation of ``response_id`` starts from: every item its
        model saw, then its output (400 where it is not found, as OpenAI does)."""
        row = await self._row(principal, response_id)
        if row is None:
            raise InvalidRequest(f"previous response {response_id!r} was not found (it was "
                                 "not stored, was deleted, or belongs to another project)",
                                 param="previous_response_id",
                                 code="previous_response_not_found")
        body = orjson.loads(row.body)
        context: list[dict[str, Any]] = orjson.loads(row.context)
        return context + list(body.get("output") or [])

    async def delete(self, principal: Principal, response_id: str) -> None:
        row = await self.get(principal, response_id)
        async with self.db.session() as session, session.begin():
            await session.execute(delete(StoredResponse).where(StoredResponse.id == row.id))

    async def input_items(self, principal: Principal, response_id: str, *, limit: int,
                          order: str, after: str | None) -> dict[str, Any]:
        row = await self.get(principal, response_id)
        items: list[dict[str, Any]] = orjson.loads(row.input_items)
        if order == "desc":
            items.reverse()
        if after is not None:
            ids = [item.get("id") for item in items]
            if after not in ids:
                raise InvalidRequest(f"after: item {after!r} is not an input item of this "
                                     "response", param="after")
            items = items[ids.index(after) + 1:]
        page = items[:limit]
        return {"object": "list", "data": page,
                # an empty page (past the end) names where it starts
                "first_id": page[0]["id"] if page else after or "",
                "last_id": page[-1]["id"] if page else after or "",
                "has_more": len(items) > limit}
