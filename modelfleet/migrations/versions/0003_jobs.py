"""async jobs; images on usage records

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

from modelfleet.tables import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("project_id", sa.String(36),
                  sa.ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
        sa.Column("key_id", sa.String(36), nullable=False),
        sa.Column("model_id", sa.String(200), nullable=False),
        sa.Column("job_type", sa.String(20), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("params", sa.Text(), nullable=False),
        sa.Column("input_images", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("images", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("error_code", sa.String(50), nullable=True),
        sa.Column("error_message", sa.String(1000), nullable=True),
        sa.Column("deployment_id", sa.String(100), nullable=True),
        sa.Column("cost", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("webhook_url", sa.String(2000), nullable=True),
        sa.Column("webhook_state", sa.String(20), nullable=False, server_default="none"),
        sa.Column("webhook_attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("expires_at", UTCDateTime(), nullable=True),
    )
    op.create_index("ix_jobs_status", "jobs", ["status"])
    op.create_index("ix_jobs_project_created", "jobs", ["project_id", "created_at"])
    with op.batch_alter_table("usage") as batch:
        batch.add_column(sa.Column("images", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("usage") as batch:
        batch.drop_column("images")
    op.drop_index("ix_jobs_project_created", "jobs")
    op.drop_index("ix_jobs_status", "jobs")
    op.drop_table("jobs")
