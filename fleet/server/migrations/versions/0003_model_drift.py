"""model drift: drift_max on telemetry_minutes, device_pipelines with the drift warning

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-19 10:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = 128  # fleet.server.db.schema.NAME, as it is in this revision
DRIFT = 500  # agent.protocol.PipelineState.drift's max_length
STATUSES = ("running", "degraded", "stopped")


def upgrade() -> None:
    # Nullable, no default: minutes written before this migration had no drift figure.
    with op.batch_alter_table("telemetry_minutes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("drift_max", sa.Float(), nullable=True))

    op.create_table(
        "device_pipelines",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("pipeline", sa.String(length=128), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("drift", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("device_id", "pipeline"),
    )
    with op.batch_alter_table("device_pipelines", schema=None) as batch_op:
        batch_op.create_index("ix_device_pipelines_drift", ["drift"], unique=False)

    # The pipelines of every stored state, so that a drift warning a device retains is
    # seen before its next state arrives.
    devices = sa.table("devices", sa.column("id", sa.String()), sa.column("state", sa.JSON()))
    pipelines = sa.table(
        "device_pipelines",
        sa.column("device_id", sa.String()),
        sa.column("pipeline", sa.String()),
        sa.column("model", sa.String()),
        sa.column("status", sa.String()),
        sa.column("drift", sa.Text()),
    )
    bind = op.get_bind()
    rows: list[dict[str, Any]] = []
    for device_id, state in bind.execute(sa.select(devices.c.id, devices.c.state)):
        rows.extend(_pipeline_rows(device_id, state))
    if rows:
        op.bulk_insert(pipelines, rows)


def _pipeline_rows(device_id: str, state: Any) -> list[dict[str, Any]]:
    """The rows of one stored state; anything malformed is left out, never fatal."""
    listed = state.get("pipelines") if isinstance(state, dict) else None
    rows: dict[str, dict[str, Any]] = {}
    for p in listed if isinstance(listed, list) else []:
        if not isinstance(p, dict) or not isinstance(p.get("name"), str) or not p["name"]:
            continue
        model, status, drift = p.get("model"), p.get("status"), p.get("drift")
        rows[p["name"][:NAME]] = {
            "device_id": device_id,
            "pipeline": p["name"][:NAME],
            "model": model[:NAME] if isinstance(model, str) else None,
            "status": status if status in STATUSES else "stopped",
            "drift": drift[:DRIFT] if isinstance(drift, str) and drift else None,
        }
    return list(rows.values())


def downgrade() -> None:
    with op.batch_alter_table("device_pipelines", schema=None) as batch_op:
        batch_op.drop_index("ix_device_pipelines_drift")
    op.drop_table("device_pipelines")
    with op.batch_alter_table("telemetry_minutes", schema=None) as batch_op:
        batch_op.drop_column("drift_max")
