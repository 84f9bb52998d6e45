"""plans, deployed models, prices, ledger, usage, meta version

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from modelfleet.tables import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "meta",
        sa.Column("key", sa.String(50), primary_key=True),
        sa.Column("value", sa.BigInteger(), nullable=False),
    )
    op.execute("INSERT INTO meta (key, value) VALUES ('version', 1)")
    op.create_table(
        "plans",
        sa.Column("name", sa.String(50), primary_key=True),
        sa.Column("key_rpm", sa.Integer(), nullable=True),
        sa.Column("key_tpm", sa.Integer(), nullable=True),
        sa.Column("key_concurrency", sa.Integer(), nullable=True),
        sa.Column("project_rpm", sa.Integer(), nullable=True),
        sa.Column("project_tpm", sa.Integer(), nullable=True),
        sa.Column("project_concurrency", sa.Integer(), nullable=True),
        sa.Column("priority", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("weight", sa.Integer(), nullable=False, server_default="1"),
    )
    op.execute("INSERT INTO plans (name, key_rpm, priority, weight) VALUES ('default', 1000, 0, 1)")
    with op.batch_alter_table("projects") as batch:
        batch.add_column(
            sa.Column("plan", sa.String(50), nullable=False, server_default="default")
        )
    op.create_table(
        "project_models",
        sa.Column("project_id", sa.String(36),
                  sa.ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("model_id", sa.String(200), primary_key=True),
    )
    op.create_table(
        "prices",
        sa.Column("model_id", sa.String(200), primary_key=True),
        sa.Column("input_per_million", sa.BigInteger(), nullable=False),
        sa.Column("output_per_million", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "ledger",
        # BIGSERIAL on PostgreSQL; SQLite's rowid alias must be spelt INTEGER.
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("id", sa.String(36), nullable=False, unique=True),
        sa.Column("project_id", sa.String(36),
                  sa.ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("reason", sa.String(500), nullable=False),
        sa.Column("request_id", sa.String(36), nullable=True, unique=True),
        sa.Column("actor", sa.String(100), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_ledger_project_seq", "ledger", ["project_id", "seq"])
    op.create_table(
        "usage",
        sa.Column("request_id", sa.String(36), primary_key=True),
        sa.Column("project_id", sa.String(36),
                  sa.ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
        sa.Column("key_id", sa.String(36), nullable=False),
        sa.Column("model_id", sa.String(200), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("cost", sa.BigInteger(), nullable=False),
        sa.Column("wait_ms", sa.Integer(), nullable=False),
        sa.Column("run_ms", sa.Integer(), nullable=False),
        sa.Column("total_ms", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_usage_project_created", "usage", ["project_id", "created_at"])
    op.create_index("ix_usage_key", "usage", ["key_id"])


def downgrade() -> None:
    op.drop_table("usage")
    op.drop_table("ledger")
    op.drop_table("prices")
    op.drop_table("project_models")
    with op.batch_alter_table("projects") as batch:
        batch.drop_column("plan")
    op.drop_table("plans")
    op.drop_table("meta")
