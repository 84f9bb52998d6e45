"""Deciding who calls, from the route that matched (never from a rebuilt path)."""

from __future__ import annotations

from starlette.requests import Request

from modelfleet.api.http import presented_key
from modelfleet.errors import PermissionDenied
from modelfleet.keys import Principal, Scope
from modelfleet.services import Services


async def require(services: Services, request: Request, scope: Scope | None) -> Principal:
    """The caller's principal: 401 without a valid key, 403 without ``scope`` or
    with an ``x-project-id`` that is not the key's project."""
    await services.watcher.check()
    principal = await services.keys.authenticate(presented_key(request))
    claimed = request.headers.get("x-project-id")
    if claimed is not None and claimed not in (principal.project_id, principal.project_name):
        raise PermissionDenied(
            "x-project-id does not name this API key's project", code="project_mismatch"
        )
    if scope is not None and not principal.has(scope):
        raise PermissionDenied(
            f"this API key does not have the {scope.value!r} scope",
            code="insufficient_scope",
        )
    return principal
