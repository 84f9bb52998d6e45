"""batch terms: a plan's batch discount, and a batch's token usage

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("plans", sa.Column("batch_discount_pct", sa.Integer(), nullable=True))
    for name in ("input_tokens", "output_tokens", "cached_tokens"):
        op.add_column("batches", sa.Column(name, sa.BigInteger(), nullable=False,
                                           server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        for name in ("input_tokens", "output_tokens", "cached_tokens"):
            batch.drop_column(name)
    with op.batch_alter_table("plans") as batch:
        batch.drop_column("batch_discount_pct")
