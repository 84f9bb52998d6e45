"""A project's own account: balance, ledger, usage and keys (``read`` scope).

A key reads its own project (``{project_id}`` is its id, or ``current``); an
admin key reads any project.  A non-admin key naming another project gets 404
``project_not_found``, exactly as for a project that does not exist, so
project ids cannot be probed; the scope is checked only after that.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from modelfleet import reports
from modelfleet.api import openapi_doc
from modelfleet.api.auth import require
from modelfleet.errors import InvalidRequest, NotFound, PermissionDenied
from modelfleet.keys import Scope
from modelfleet.services import Services

CURRENT = "current"
MAX_GROUPS = 5000  # summary rows in one response


def router(services: Services) -> APIRouter:
    api = APIRouter()

    async def project_for(request: Request, project_ref: str) -> str:
        """The id of the project the caller may read, or 404/403."""
        principal = await require(services, request, None)
        project_id = principal.project_id if project_ref == CURRENT else project_ref
        missing = NotFound(f"no project with id {project_ref!r}", code="project_not_found")
        if project_id != principal.project_id and not principal.is_admin:
            raise missing  # never 403: another project's id must look like no project
        if not principal.has(Scope.read):
            raise PermissionDenied(
                f"this API key does not have the {Scope.read.value!r} scope",
                code="insufficient_scope",
            )
        if services.projects.project(project_id) is None:
            raise missing
        return project_id

    @api.get("/v1/projects/{project_id}/balance", tags=["account"],
             responses=openapi_doc.errors(404, scope="read"))
    async def balance(project_id: str, request: Request) -> dict[str, Any]:
        """Balance, held (reserved for running requests) and available, in micro-units."""
        pid = await project_for(request, project_id)
        return {"object": "balance", "project_id": pid, **(await services.ledger.money(pid))}

    @api.get("/v1/projects/{project_id}/ledger", tags=["account"],
             responses=openapi_doc.errors(400, 404, scope="read"))
    async def ledger(project_id: str, request: Request, limit: int = 100,
                     before_seq: int | None = None) -> dict[str, Any]:
        """Ledger entries, newest first; page back with ``before_seq``."""
        pid = await project_for(request, project_id)
        if not 1 <= limit <= reports.MAX_PAGE:
            raise InvalidRequest(f"limit must be between 1 and {reports.MAX_PAGE}", param="limit")
        if before_seq is not None and not 1 <= before_seq <= 2**63 - 1:
            raise InvalidRequest("before_seq must be a positive integer", param="before_seq")
        rows = await reports.ledger_entries(services.db, pid, limit + 1, before_seq)
        has_more = len(rows) > limit
        rows = rows[:limit]
        return {"object": "list", "project_id": pid, "data": rows, "has_more": has_more,
                "next_before_seq": rows[-1]["seq"] if has_more else None}

    @api.get("/v1/projects/{project_id}/usage", tags=["account"],
             responses=openapi_doc.errors(400, 404, scope="read"))
    async def usage(project_id: str, request: Request, group: str = "day",
                    key_id: str | None = None, since: str | None = None,
                    until: str | None = None) -> dict[str, Any]:
        """Usage per UTC day, model, or both; ``since`` inclusive, ``until``
        exclusive (a bare date includes that whole day)."""
        pid = await project_for(request, project_id)
        if group not in reports.GROUPS:
            raise InvalidRequest(f"group must be one of {', '.join(reports.GROUPS)}", param="group")
        start, stop = reports.time_range(since, until)
        rows = await reports.usage_summary(services.db, pid, key_id=key_id, since=start,
                                           until=stop, group=group, limit=MAX_GROUPS + 1)
        totals = await reports.usage_totals(services.db, pid, key_id=key_id, since=start,
                                            until=stop)
        return {"object": "usage_summary", "project_id": pid, "group": group, "key_id": key_id,
                "since": reports.iso(start), "until": reports.iso(stop),
                "data": rows[:MAX_GROUPS], "truncated": len(rows) > MAX_GROUPS,
                "totals": totals}

    @api.get("/v1/projects/{project_id}/keys", tags=["account"],
             responses=openapi_doc.errors(404, scope="read"))
    async def keys(project_id: str, request: Request) -> dict[str, Any]:
        """The project's keys: prefixes, scopes and state, never a secret."""
        pid = await project_for(request, project_id)
        rows = await services.keys.list_keys(project_id=pid)
        return {"object": "list", "project_id": pid, "data": [reports.key_row(k) for k in rows]}

    return api
