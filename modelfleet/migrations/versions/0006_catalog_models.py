"""catalog models managed at runtime (admin API and CLI), seeded from the TOML catalog

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

from modelfleet.tables import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "catalog_models",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.Column("file_spec", sa.Text(), nullable=True),
        sa.Column("origin", sa.String(10), nullable=False),
        sa.Column("removed", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("catalog_models")
