"""Deciding who calls, from the route that matched (never from a rebuilt path)."""

from __future__ import annotations

from starlette.requests import Request

from modelfleet.api.http import presented_key
from modelfleet.errors import PermissionDenied
from modelfleet.keys import KeyService, Principal, Scope


async def require(keys: KeyService, request: Request, scope: Scope | None) -> Principal:
    """The caller's principal: 401 without a valid key, 403 without ``scope``."""
    principal = await keys.authenticate(presented_key(request))
    if scope is not None and not principal.has(scope):
        raise PermissionDenied(
            f"this API key does not have the {scope.value!r} scope",
            code="insufficient_scope",
        )
    return principal
