"""Job queue: attempts limit, save-now / sample-now flags, memory routing and a per-job log.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("max_attempts", sa.Integer(), nullable=False, server_default="3"))
        batch.add_column(sa.Column("save_now", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("sample_now", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("min_memory_gb", sa.Double(), nullable=True))
        batch.add_column(sa.Column("log", sa.JSON(), nullable=False, server_default="[]"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for name in ("log", "min_memory_gb", "sample_now", "save_now", "max_attempts"):
            batch.drop_column(name)
