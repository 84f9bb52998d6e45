"""The Files API's store: batch input files (validated line by line as they
are uploaded) and batch output files, each owned by one project.

    upload:  JSONL, at most ``max_file_bytes`` and ``max_lines`` request lines;
             each line ``{"custom_id", "method": "POST", "url", "body"}`` with a
             unique ``custom_id``, a batchable ``url`` and a ``body`` object
             naming a ``model`` (400 naming the line: ``param`` "line 7")
    stored:  content at ``<files folder>/<id>.jsonl`` (written whole: a temp
             file, then a rename), the row after it; deleted when its
             ``expires_at`` passes (retention), or on DELETE
    read:    a file of another project is 404, as one that does not exist
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import orjson
from sqlalchemy import delete, select

from modelfleet.db import Database
from modelfleet.errors import InvalidRequest, NotFound
from modelfleet.ids import uuid7
from modelfleet.keys import Principal
from modelfleet.settings import BatchSettings
from modelfleet.tables import StoredFile

# The endpoints a batch line may call (OpenAI's, where modelfleet serves them).
BATCH_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
LINE_KEYS = frozenset({"custom_id", "method", "url", "body"})
MAX_CUSTOM_ID_CHARS = 512
MAX_FILENAME_CHARS = 255
PURPOSES = ("batch", "batch_output")


def _now() -> datetime:
    return datetime.now(UTC)


def _ts(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


def new_file_id() -> str:
    return f"file-{uuid7().hex}"


def derived_file_id(owner: str, name: str) -> str:
    """The id of a file made for ``owner`` (a batch's output): the same on
    every try, so finalizing a batch twice makes its files once."""
    return f"file-{uuid.uuid5(uuid.NAMESPACE_URL, f'modelfleet:{owner}:{name}').hex}"


@dataclass
class Checked:
    """What validating a batch input file found."""

    lines: int = 0
    size: int = 0
    endpoints: set[str] = field(default_factory=set)


def _bad(number: int, message: str, code: str = "invalid_batch_line") -> InvalidRequest:
    return InvalidRequest(f"line {number}: {message}", param=f"line {number}", code=code)


def check_line(number: int, raw: bytes, seen: dict[str, int]) -> dict[str, Any]:
    """One request line of a batch input file, validated (``number`` counts from 1)."""
    try:
        entry = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _bad(number, "not valid JSON", "invalid_json_line") from None
    if not isinstance(entry, dict):
        raise _bad(number, "must be a JSON object")
    missing = sorted(LINE_KEYS - entry.keys())
    if missing:
        raise _bad(number, f"missing {', '.join(missing)}")
    unknown = sorted(entry.keys() - LINE_KEYS)
    if unknown:
        raise _bad(number, f"unrecognized field {unknown[0]!r}")
    custom_id = entry["custom_id"]
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID_CHARS:
        raise _bad(number, f"custom_id must be a string of 1 to {MAX_CUSTOM_ID_CHARS} characters")
    if custom_id in seen:
        raise _bad(number, f"custom_id {custom_id!r} appears twice (first on line "
                   f"{seen[custom_id]})", "duplicate_custom_id")
    seen[custom_id] = number
    if entry["method"] != "POST":
        raise _bad(number, "method must be POST")
    if entry["url"] not in BATCH_URLS:
        raise _bad(number, f"url must be one of {', '.join(BATCH_URLS)}")
    body = entry["body"]
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise _bad(number, "body must be an object with a model")
    if body.get("stream"):
        raise _bad(number, "a batch request cannot stream (stream must be false)")
    return entry


def check_batch_file(src: IO[bytes], dest: Path, max_lines: int) -> Checked:
    """Validate ``src`` line by line while copying it to ``dest`` (blocking:
    run in a thread).  Blank lines are skipped; line numbers count them."""
    checked = Checked()
    seen: dict[str, int] = {}
    last = b""
    with open(dest, "wb") as out:
        for number, raw in enumerate(src, start=1):
            checked.size += len(raw)
            out.write(raw)
            last = raw
            if not raw.strip():
                continue
            entry = check_line(number, raw, seen)
            checked.lines += 1
            if checked.lines > max_lines:
                raise _bad(number, f"a batch file holds at most {max_lines} requests",
                           "too_many_lines")
            checked.endpoints.add(entry["url"])
        if last and not last.endswith(b"\n"):
            out.write(b"\n")  # the last line ends like the others
            checked.size += 1
    if not checked.lines:
        raise InvalidRequest("the file holds no requests", param="file", code="empty_file")
    return checked


def request_lines(path: Path) -> list[bytes]:
    """The request lines of a stored batch input file, in order (blocking)."""
    with open(path, "rb") as src:
        return [raw for raw in src if raw.strip()]


def file_view(row: StoredFile) -> dict[str, Any]:
    """The file as the API shows it (OpenAI's ``OpenAIFile``)."""
    view = {"id": row.id, "object": "file", "bytes": row.bytes, "created_at": _ts(row.created_at),
            "filename": row.filename, "purpose": row.purpose, "status": "processed"}
    if row.expires_at is not None:  # the spec's fields are not nullable: absent, not null
        view["expires_at"] = _ts(row.expires_at)
    return view


class FileStore:
    def __init__(self, db: Database, folder: Path, settings: BatchSettings,
                 clock: Callable[[], datetime] = _now) -> None:
        self.db = db
        self.folder = folder
        self.settings = settings
        self.clock = clock

    def path(self, file_id: str) -> Path:
        return self.folder / f"{file_id}.jsonl"

    def _expiry(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self.settings.files_retention_s)

    async def upload_batch(self, principal: Principal, filename: str,
                           src: IO[bytes]) -> StoredFile:
        """Validate and keep an uploaded batch input file."""
        if len(filename) > MAX_FILENAME_CHARS:
            filename = filename[:MAX_FILENAME_CHARS]
        file_id = new_file_id()
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.folder / f".{file_id}.partial"
        try:
            checked = await asyncio.to_thread(check_batch_file, src, partial,
                                              self.settings.max_lines)
            await asyncio.to_thread(os.replace, partial, self.path(file_id))
            now = self.clock()
            row = StoredFile(id=file_id, project_id=principal.project_id, purpose="batch",
                             filename=filename, bytes=checked.size, lines=checked.lines,
                             endpoints=",".join(sorted(checked.endpoints)), created_at=now,
                             expires_at=self._expiry(now))
            async with self.db.session() as session, session.begin():
                session.add(row)
        except BaseException:
            partial.unlink(missing_ok=True)
            self.path(file_id).unlink(missing_ok=True)
            raise
        return row

    async def keep_output(self, project_id: str, file_id: str, filename: str,
                          blob: bytes) -> StoredFile:
        """A batch's output or error file (kept once, whatever the tries)."""
        async with self.db.session() as session:
            existing = await session.get(StoredFile, file_id)
        if existing is not None:
            return existing
        self.folder.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(_write_whole, self.path(file_id), blob)
        now = self.clock()
        row = StoredFile(id=file_id, project_id=project_id, purpose="batch_output",
                         filename=filename, bytes=len(blob), lines=blob.count(b"\n"),
                         endpoints="", created_at=now, expires_at=self._expiry(now))
        async with self.db.session() as session, session.begin():
            session.add(row)
        return row

    async def get(self, principal: Principal, file_id: str) -> StoredFile:
        """The file, to a key of its project; 404 to anyone else."""
        async with self.db.session() as session:
            row = await session.get(StoredFile, file_id)
        if row is None or row.project_id != principal.project_id:
            raise NotFound(f"No such File object: {file_id}", code="file_not_found", param="id")
        return row

    async def list(self, principal: Principal, purpose: str | None, limit: int, order: str,
                   after: str | None) -> tuple[list[StoredFile], bool]:
        """A page of the project's files by id (time-ordered), and whether more follow."""
        query = select(StoredFile).where(StoredFile.project_id == principal.project_id)
        if purpose:
            query = query.where(StoredFile.purpose == purpose)
        if after:
            query = query.where(StoredFile.id > after if order == "asc" else StoredFile.id < after)
        query = query.order_by(StoredFile.id.asc() if order == "asc" else StoredFile.id.desc())
        async with self.db.session() as session:
            rows = list((await session.execute(query.limit(limit + 1))).scalars())
        return rows[:limit], len(rows) > limit

    async def content(self, principal: Principal, file_id: str) -> Path:
        row = await self.get(principal, file_id)
        path = self.path(row.id)
        if not path.exists():
            raise NotFound(f"the content of file {file_id!r} is no longer stored",
                           code="file_not_found")
        return path

    async def delete(self, principal: Principal, file_id: str) -> None:
        row = await self.get(principal, file_id)
        async with self.db.session() as session, session.begin():
            await session.execute(delete(StoredFile).where(StoredFile.id == row.id))
        await asyncio.to_thread(self.path(row.id).unlink, True)

    async def sweep(self) -> int:
        """Delete the files past their retention; returns how many."""
        now = self.clock()
        async with self.db.session() as session:
            expired = list((await session.execute(
                select(StoredFile.id).where(StoredFile.expires_at <= now).limit(1000))).scalars())
        if not expired:
            return 0
        async with self.db.session() as session, session.begin():
            await session.execute(delete(StoredFile).where(StoredFile.id.in_(expired)))
        for file_id in expired:
            await asyncio.to_thread(self.path(file_id).unlink, True)
        return len(expired)


def _write_whole(path: Path, blob: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(blob)
    os.replace(tmp, path)
