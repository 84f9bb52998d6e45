"""Console sessions in the store, so every gateway behind a load balancer
knows them.

Signing in exchanges an API key for a random session token: the browser
keeps the token in an HttpOnly cookie, the store keeps its SHA-256, the key
id it acts as, a CSRF secret and two expiries (idle, and absolute).  The key
itself is never stored, and no key is minted: a session is as good as its key,
so revoking or expiring the key ends every session opened with it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select

from modelfleet.db import Database
from modelfleet.keys import Principal
from modelfleet.tables import ApiKey, ConsoleSession, Project

IDLE = timedelta(minutes=30)  # signed out after this long without a page view
MAX_AGE = timedelta(hours=12)  # and after this long in any case
TOUCH_EVERY = timedelta(seconds=60)  # the idle expiry is written at most this often


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Session:
    token_hash: str
    principal: Principal
    csrf: str
    expires_at: datetime

    def csrf_ok(self, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(self.csrf, presented or "")


async def principal_of(db: Database, key_id: str) -> Principal | None:
    """The principal of a key by id, or None when it is unknown, revoked or
    expired (what ``KeyService.authenticate`` decides from the key itself)."""
    stmt = select(ApiKey, Project.name).join(Project).where(ApiKey.id == key_id)
    async with db.session() as session:
        found = (await session.execute(stmt)).first()
    if found is None:
        return None
    key, project_name = found
    if key.revoked_at is not None or (key.expires_at is not None and key.expires_at <= _now()):
        return None
    return Principal(key_id=key.id, project_id=key.project_id, project_name=project_name,
                     scopes=frozenset(key.scopes.split()), expires_at=key.expires_at)


class SessionStore:
    def __init__(self, db: Database, *, idle: timedelta = IDLE, max_age: timedelta = MAX_AGE,
                 clock: Callable[[], datetime] = _now) -> None:
        self.db = db
        self.idle = idle
        self.max_age = max_age
        self.clock = clock

    async def open(self, principal: Principal) -> tuple[str, Session]:
        """A new session for a key that just authenticated: (token, session)."""
        token = secrets.token_urlsafe(32)
        now = self.clock()
        row = ConsoleSession(token_hash=_hash(token), key_id=principal.key_id,
                             csrf=secrets.token_urlsafe(32), created_at=now, last_seen_at=now,
                             expires_at=min(now + self.idle, now + self.max_age),
                             max_expires_at=now + self.max_age)
        async with self.db.session() as session, session.begin():
            await session.execute(delete(ConsoleSession).where(ConsoleSession.expires_at < now))
            session.add(row)
        return token, Session(row.token_hash, principal, row.csrf, row.expires_at)

    async def find(self, token: str | None, *, touch: bool = True) -> Session | None:
        """The live session of a token, or None.  ``touch`` pushes the idle
        expiry forward (a page view does; a live-update poll does not)."""
        if not token or len(token) > 100:
            return None
        digest = _hash(token)
        now = self.clock()
        async with self.db.session() as session:
            row = await session.get(ConsoleSession, digest)
        if row is None or not hmac.compare_digest(row.token_hash, digest) or row.expires_at <= now:
            return None
        principal = await principal_of(self.db, row.key_id)
        if principal is None:  # the key was revoked or expired: so is the session
            await self.close(token)
            return None
        expires = row.expires_at
        if touch and now - row.last_seen_at >= TOUCH_EVERY:
            expires = min(now + self.idle, row.max_expires_at)
            async with self.db.session() as session, session.begin():
                stored = await session.get(ConsoleSession, digest)
                if stored is not None:
                    stored.last_seen_at, stored.expires_at = now, expires
        return Session(digest, principal, row.csrf, expires)

    async def close(self, token: str | None) -> None:
        if not token:
            return
        async with self.db.session() as session, session.begin():
            await session.execute(delete(ConsoleSession)
                                  .where(ConsoleSession.token_hash == _hash(token)))
