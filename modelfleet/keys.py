"""Projects and API keys: create, authenticate, list, revoke.

A key is ``mf-`` followed by 43 URL-safe characters (256 random bits).  It is
shown once; the store keeps only its SHA-256 and its first characters.  A
fast hash is right here: the keys are random, not passwords, so there is
nothing to brute-force, and authentication stays a few microseconds.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from modelfleet.db import Database, bump_version
from modelfleet.errors import AuthenticationError, InvalidRequest, NotFound
from modelfleet.ids import new_id
from modelfleet.tables import ApiKey, Project

KEY_PREFIX = "mf-"
_KEY_RE = re.compile(r"^mf-[A-Za-z0-9_-]{43}$")
_PROJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class Scope(StrEnum):
    inference = "inference"  # call models
    read = "read"  # read its own project's usage, ledger and balance
    admin = "admin"  # manage the platform (implies the others)


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id and project, and what it may do."""

    key_id: str
    project_id: str
    project_name: str
    scopes: frozenset[str]
    expires_at: datetime | None

    def has(self, scope: Scope) -> bool:
        return scope.value in self.scopes or Scope.admin.value in self.scopes

    @property
    def is_admin(self) -> bool:
        return Scope.admin.value in self.scopes


@dataclass(frozen=True)
class CreatedKey:
    key: str  # the secret, returned once
    key_id: str
    project_id: str
    project_name: str
    prefix: str
    scopes: tuple[str, ...]


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    project_id: str
    project_name: str
    name: str
    prefix: str
    scopes: tuple[str, ...]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


def _now() -> datetime:
    return datetime.now(UTC)


def parse_scopes(values: Iterable[str]) -> tuple[str, ...]:
    scopes: list[str] = []
    for value in values:
        try:
            scope = Scope(value)
        except ValueError:
            known = ", ".join(s.value for s in Scope)
            raise InvalidRequest(f"unknown scope {value!r} (known: {known})", param="scope") from None
        if scope.value not in scopes:
            scopes.append(scope.value)
    if not scopes:
        raise InvalidRequest("a key needs at least one scope", param="scope")
    return tuple(scopes)


class KeyService:
    """Keys and projects in the store, with a short-lived cache of valid keys.

    The cache keeps a request from touching the database; it holds a key for
    ``cache_ttl_s`` seconds at most, and revocation through this service drops
    it at once.
    """

    def __init__(
        self,
        db: Database,
        *,
        cache_ttl_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._db = db
        self._ttl = cache_ttl_s
        self._clock = clock
        self._cache: dict[str, tuple[float, Principal]] = {}
        self._used: dict[str, datetime] = {}

    # -- projects -----------------------------------------------------------

    async def ensure_project(self, name: str) -> tuple[str, bool]:
        """The project's id, and whether it was created now."""
        if not _PROJECT_RE.fullmatch(name):
            raise InvalidRequest(
                "project names are 1-100 letters, digits, '.', '_' or '-'", param="project"
            )
        try:
            async with self._db.session() as session, session.begin():
                found = await session.scalar(select(Project).where(Project.name == name))
                if found is not None:
                    return found.id, False
                project = Project(id=new_id(), name=name, created_at=_now(), plan="default")
                session.add(project)
                await bump_version(session)
                return project.id, True
        except IntegrityError:
            # Another process made it between our look and our insert (two
            # gateways starting on one empty database): theirs is the one.
            async with self._db.session() as session:
                existing = await session.scalar(select(Project.id).where(Project.name == name))
            if existing is None:
                raise
            return existing, False

    async def list_projects(self) -> list[tuple[str, str, datetime]]:
        async with self._db.session() as session:
            rows = await session.scalars(select(Project).order_by(Project.created_at))
            return [(p.id, p.name, p.created_at) for p in rows]

    async def count_projects(self) -> int:
        return len(await self.list_projects())

    # -- keys ---------------------------------------------------------------

    async def create(
        self,
        project: str,
        scopes: Iterable[str],
        *,
        name: str = "",
        expires_at: datetime | None = None,
    ) -> CreatedKey:
        scope_list = parse_scopes(scopes)
        if any(not ch.isprintable() for ch in name):
            raise InvalidRequest("key names must not contain control characters", param="name")
        if expires_at is not None and expires_at <= _now():
            raise InvalidRequest("expires_at must be in the future", param="expires_at")
        project_id, _ = await self.ensure_project(project)
        raw = generate_key()
        row = ApiKey(
            id=new_id(),
            project_id=project_id,
            name=name[:100],
            prefix=raw[:11],
            key_hash=hash_key(raw),
            scopes=" ".join(scope_list),
            created_at=_now(),
            expires_at=expires_at,
        )
        async with self._db.session() as session, session.begin():
            session.add(row)
        return CreatedKey(raw, row.id, project_id, project, row.prefix, scope_list)

    async def list_keys(
        self, project: str | None = None, *, project_id: str | None = None
    ) -> list[KeyInfo]:
        self_used = dict(self._used)
        stmt = select(ApiKey, Project.name).join(Project).order_by(ApiKey.created_at)
        if project is not None:
            stmt = stmt.where(Project.name == project)
        if project_id is not None:
            stmt = stmt.where(ApiKey.project_id == project_id)
        async with self._db.session() as session:
            rows = (await session.execute(stmt)).all()
        return [
            KeyInfo(
                key_id=k.id,
                project_id=k.project_id,
                project_name=pname,
                name=k.name,
                prefix=k.prefix,
                scopes=tuple(k.scopes.split()),
                created_at=k.created_at,
                expires_at=k.expires_at,
                revoked_at=k.revoked_at,
                last_used_at=self_used.get(k.id, k.last_used_at),
            )
            for k, pname in rows
        ]

    @staticmethod
    def _no_key(key_id: str) -> NotFound:
        # never echo what may be a secret pasted where an id belongs
        shown = "(a key, not a key id)" if key_id.startswith(KEY_PREFIX) else repr(key_id[:64])
        return NotFound(f"no key with id {shown}", code="key_not_found")

    async def get(self, key_id: str) -> KeyInfo:
        for info in await self.list_keys():
            if info.key_id == key_id:
                return info
        raise self._no_key(key_id)

    async def revoke(self, key_id: str, *, project_id: str | None = None) -> None:
        """Revoke now; the next request with the key is refused (401)."""
        async with self._db.session() as session, session.begin():
            row = await session.get(ApiKey, key_id)
            if row is None or (project_id is not None and row.project_id != project_id):
                raise self._no_key(key_id)
            if row.revoked_at is None:
                row.revoked_at = _now()
            digest = row.key_hash
            await bump_version(session)
        self._cache.pop(digest, None)

    async def rotate(
        self, key_id: str, grace_s: float, *, project_id: str | None = None
    ) -> CreatedKey:
        """A new key with the same project, scopes and name; the old one keeps
        working for ``grace_s`` seconds (0: stops now), then expires."""
        if not 0 <= grace_s <= 30 * 86400:
            raise InvalidRequest("grace must be between 0 and 30 days", param="grace_seconds")
        async with self._db.session() as session, session.begin():
            row = await session.get(ApiKey, key_id)
            if row is None or (project_id is not None and row.project_id != project_id):
                raise self._no_key(key_id)
            if row.revoked_at is not None:
                raise InvalidRequest("a revoked key cannot be rotated", param="key_id")
            if row.expires_at is not None and row.expires_at <= _now():
                raise InvalidRequest("an expired key cannot be rotated", param="key_id")
            project = await session.get(Project, row.project_id)
            assert project is not None
            raw = generate_key()
            new = ApiKey(
                id=new_id(), project_id=row.project_id, name=row.name, prefix=raw[:11],
                key_hash=hash_key(raw), scopes=row.scopes, created_at=_now(),
                expires_at=row.expires_at,
            )
            session.add(new)
            ends = datetime.fromtimestamp(_now().timestamp() + grace_s, UTC)
            if row.expires_at is None or row.expires_at > ends:
                row.expires_at = ends
            digest = row.key_hash
            await bump_version(session)
        self._cache.pop(digest, None)
        return CreatedKey(raw, new.id, new.project_id, project.name, new.prefix,
                          tuple(new.scopes.split()))

    def forget_cached(self) -> None:
        """Drop every cached key (the store changed in another process)."""
        self._cache.clear()

    async def authenticate(self, raw: str | None) -> Principal:
        """The principal behind a presented key, or AuthenticationError (401)."""
        if not raw:
            raise AuthenticationError(
                "missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                code="missing_api_key",
            )
        if not _KEY_RE.match(raw):
            raise AuthenticationError("malformed API key", code="invalid_api_key")
        digest = hash_key(raw)
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            principal = cached[1]
        else:
            principal = await self._load(digest)
            self._cache[digest] = (now + self._ttl, principal)
        if principal.expires_at is not None and principal.expires_at <= _now():
            self._cache.pop(digest, None)
            raise AuthenticationError("API key has expired", code="expired_api_key")
        self._used[principal.key_id] = _now()
        return principal

    async def _load(self, digest: str) -> Principal:
        stmt = select(ApiKey, Project.name).join(Project).where(ApiKey.key_hash == digest)
        async with self._db.session() as session:
            found = (await session.execute(stmt)).first()
        # The lookup is by an index on the hash; compare once more in constant time.
        if found is None or not hmac.compare_digest(found[0].key_hash, digest):
            raise AuthenticationError("invalid API key", code="invalid_api_key")
        key, project_name = found
        if key.revoked_at is not None:
            raise AuthenticationError("API key has been revoked", code="revoked_api_key")
        return Principal(
            key_id=key.id,
            project_id=key.project_id,
            project_name=project_name,
            scopes=frozenset(key.scopes.split()),
            expires_at=key.expires_at,
        )

    async def flush_last_used(self) -> None:
        """Write the last-used times gathered since the previous flush."""
        used, self._used = self._used, {}
        if not used:
            return
        async with self._db.session() as session, session.begin():
            for key_id, when in used.items():
                await session.execute(
                    update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=when)
                )
