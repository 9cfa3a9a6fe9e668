"""deploy health checks: shadow and min_agreement on desired state and rollouts

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-12 10:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("desired", "rollouts")


def upgrade() -> None:
    # Nullable, no default: rows made before this migration keep deferring to each
    # device's own config, as they did.
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("shadow", sa.Boolean(), nullable=True))
            batch_op.add_column(sa.Column("min_agreement", sa.Float(), nullable=True))


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("min_agreement")
            batch_op.drop_column("shadow")
