"""The store's tables (SQLAlchemy 2 declarative).  Schema changes go through
Alembic migrations in ``modelfleet/migrations``; the store writes rows as the
services give them (ids and timestamps are made by the services)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        return value.astimezone(UTC).replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    plan: Mapped[str] = mapped_column(String(50), default="default")


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100), default="")
    # The first characters of the key, shown in listings so a key can be recognised.
    prefix: Mapped[str] = mapped_column(String(16))
    # SHA-256 of the whole key, hex.  The key itself is never stored.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # Space-separated scope names.
    scopes: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (Index("ix_api_keys_project_id", "project_id"),)


class Meta(Base):
    """Small shared values; ``version`` is bumped by every admin change so that
    every process serving this store reloads what it caches."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(50), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


class Plan(Base):
    """A named tier: limits per key and per project (NULL: unlimited)."""

    __tablename__ = "plans"

    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    key_rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    key_tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    key_concurrency: Mapped[int | None] = mapped_column(Integer, nullable=True)
    project_rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    project_tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    project_concurrency: Mapped[int | None] = mapped_column(Integer, nullable=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    weight: Mapped[int] = mapped_column(Integer, default=1)
    # Percent off batch lines' prices for its projects (NULL: the model's or
    # the server's batch discount).
    batch_discount_pct: Mapped[int | None] = mapped_column(Integer, nullable=True)


class ProjectModel(Base):
    """A model deployed to a project; a project with no rows may use every model."""

    __tablename__ = "project_models"

    project_id: Mapped[str] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True
    )
    model_id: Mapped[str] = mapped_column(String(200), primary_key=True)


class PriceOverride(Base):
    """An operator's price for a model, over the catalog's."""

    __tablename__ = "prices"

    model_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    input_per_million: Mapped[int] = mapped_column(BigInteger)
    output_per_million: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class LedgerEntry(Base):
    """Every change of a project's money, appended, never updated.  Amounts are
    signed micro-units: top-ups positive, usage negative."""

    __tablename__ = "ledger"

    # BIGSERIAL on PostgreSQL; SQLite's rowid alias must be spelt INTEGER.
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                     autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    amount: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(20))  # topup, adjustment, usage
    reason: Mapped[str] = mapped_column(String(500), default="")
    request_id: Mapped[str | None] = mapped_column(String(36), nullable=True, unique=True)
    actor: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_ledger_project_seq", "project_id", "seq"),)


class UsageRecord(Base):
    """Exactly one per inference request that was admitted."""

    __tablename__ = "usage"

    request_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    key_id: Mapped[str] = mapped_column(String(36))
    model_id: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20))
    input_tokens: Mapped[int] = mapped_column(Integer)
    output_tokens: Mapped[int] = mapped_column(Integer)
    cost: Mapped[int] = mapped_column(BigInteger)
    wait_ms: Mapped[int] = mapped_column(Integer)
    run_ms: Mapped[int] = mapped_column(Integer)
    total_ms: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    images: Mapped[int] = mapped_column(Integer, default=0)

    __table_args__ = (
        Index("ix_usage_project_created", "project_id", "created_at"),
        Index("ix_usage_key", "key_id"),
    )


class Job(Base):
    """An async job (image generation): accepted, queued, run once, kept.

    ``status`` moves queued → running → succeeded | failed, or queued →
    cancelled; every move is a conditional UPDATE on the expected status, so
    two runners can never both take the same job.  ``attempts`` counts runs
    started; a run interrupted by a stop of the server is retried once.
    """

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    key_id: Mapped[str] = mapped_column(String(36))
    model_id: Mapped[str] = mapped_column(String(200))
    job_type: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20))
    # The merged, validated request as JSON (input images are files, not here).
    params: Mapped[str] = mapped_column(Text)
    input_images: Mapped[int] = mapped_column(Integer, default=0)
    images: Mapped[int] = mapped_column(Integer, default=0)  # results written
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error_code: Mapped[str | None] = mapped_column(String(50), nullable=True)
    error_message: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    deployment_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    cost: Mapped[int] = mapped_column(BigInteger, default=0)
    webhook_url: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    # none, pending, delivered, failed
    webhook_state: Mapped[str] = mapped_column(String(20), default="none")
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The gateway running the job ("host:pid:nonce") and until when; another
    # gateway claims the job once the lease has expired.
    lease_owner: Mapped[str | None] = mapped_column(String(100), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (
        Index("ix_jobs_status", "status"),
        Index("ix_jobs_project_created", "project_id", "created_at"),
    )


class StoredResponse(Base):
    """A response of ``POST /v1/responses`` kept for ``GET``, ``input_items``
    and ``previous_response_id`` (openai/responses.py).  ``body`` is the
    Response object as sent; ``input_items`` this request's input items (with
    ids); ``context`` every item the model saw before its output (the
    previous response's context and output, then this input), so a
    continuation reads one row."""

    __tablename__ = "responses"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    key_id: Mapped[str] = mapped_column(String(36))
    model_id: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20))
    previous_response_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    body: Mapped[str] = mapped_column(Text)
    input_items: Mapped[str] = mapped_column(Text)
    context: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (
        Index("ix_responses_project_created", "project_id", "created_at"),
        Index("ix_responses_expires", "expires_at"),
    )


class CatalogModel(Base):
    """One catalog model as the store holds it (``catalogstore.py``): added,
    changed and removed at runtime through the admin API and the CLI, seeded
    from the TOML catalog.  ``spec`` is the validated model as JSON with the
    TOML table's keys; ``file_spec`` what the catalog file said when it last
    seeded this row (None: added at runtime), so a later edit of the file is
    told apart from one made through the API.  A removed model keeps its row
    (``removed``), so the file does not bring it back unless it changes."""

    __tablename__ = "catalog_models"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    spec: Mapped[str] = mapped_column(Text)
    file_spec: Mapped[str | None] = mapped_column(Text, nullable=True)
    origin: Mapped[str] = mapped_column(String(10))  # "file" or "admin": who changed it last
    removed: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ConsoleSession(Base):
    """A web console sign-in (``modelfleet/console/sessions.py``): the browser
    holds a random token, the store only its SHA-256, so several gateways
    share sessions and a leaked table signs nobody in.  No key is minted for a
    session; it acts as the key it was opened with (``key_id``) while that
    key is valid.  ``csrf`` is the per-session secret every form carries."""

    __tablename__ = "console_sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Idle expiry, pushed forward as the session is used; never past max_expires_at.
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    max_expires_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_console_sessions_expires", "expires_at"),)


# The console's keys page pages through a project's keys newest first by id
# (time-ordered): keyset pagination on this index stays fast at any size.
Index("ix_api_keys_project_id_id", ApiKey.project_id, ApiKey.id)


class StoredFile(Base):
    """A file of the Files API (``files.py``): an uploaded batch input
    (``purpose`` batch, validated line by line) or a batch's output or error
    file (``batch_output``).  The content is a file in the files folder named
    by the id; ``endpoints`` the distinct request URLs of a batch input."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    purpose: Mapped[str] = mapped_column(String(20))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    lines: Mapped[int] = mapped_column(Integer, default=0)
    endpoints: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (
        Index("ix_files_project_id", "project_id", "id"),
        Index("ix_files_expires", "expires_at"),
    )


class Batch(Base):
    """A batch of the Batch API (``batches.py``).  ``status`` moves validating
    → in_progress → finalizing → completed | failed | expired, or to
    cancelling → cancelled; each move is a conditional UPDATE on the status
    it expects.  The counters move with each finished line, in the same
    transaction as its ``BatchLine``; the lease is held as a job's is."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    key_id: Mapped[str] = mapped_column(String(36))
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(10))
    status: Mapped[str] = mapped_column(String(20))
    # The client's metadata (JSON object) and the batch-level errors (JSON list).
    batch_metadata: Mapped[str | None] = mapped_column(Text, nullable=True)
    errors: Mapped[str | None] = mapped_column(Text, nullable=True)
    total: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    # Tokens of the answered lines, summed as they finish (OpenAI's Batch.usage).
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cached_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    in_progress_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finalizing_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    cancelling_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(100), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (
        Index("ix_batches_project_id", "project_id", "id"),
        Index("ix_batches_status", "status"),
    )


class BatchLine(Base):
    """One finished line of a batch (``line`` counts request lines from 0),
    written as it finishes: ``result`` is its output line as the output or
    error file will hold it (``ok``: the output file)."""

    __tablename__ = "batch_lines"

    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"),
                                          primary_key=True)
    line: Mapped[int] = mapped_column(Integer, primary_key=True)
    ok: Mapped[bool] = mapped_column(Boolean)
    result: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
