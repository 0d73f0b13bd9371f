"""Leases, so that several worker processes (any machines, one database) can share the queue.

A claimed job or delivery carries ``lease_expires_at`` (now + lease_seconds, renewed by a heartbeat while it
runs); a RUNNING job or a claimed delivery whose lease has expired belongs to a worker that died and may be
claimed by any other. Deliveries get ``claimed_by`` like jobs. Two indexes serve the claim queries.

Revision ID: 0002_leases
Revises: 0001_baseline
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_leases"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("job", sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "delivery", sa.Column("claimed_by", sa.String(length=128), nullable=False, server_default="")
    )
    op.add_column("delivery", sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_job_state_next_run", "job", ["state", "next_run_at"])
    op.create_index("ix_delivery_state_next_run", "delivery", ["state", "next_run_at"])


def downgrade() -> None:
    op.drop_index("ix_delivery_state_next_run", table_name="delivery")
    op.drop_index("ix_job_state_next_run", table_name="job")
    with op.batch_alter_table("delivery") as batch:
        batch.drop_column("lease_expires_at")
        batch.drop_column("claimed_by")
    with op.batch_alter_table("job") as batch:
        batch.drop_column("lease_expires_at")
