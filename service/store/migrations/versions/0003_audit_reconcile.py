"""Nothing received goes unaudited, and no study is analysed half-received after the receiver restarts.

- ``instance.audited``: a 110104 (DICOM Instances Transferred) record covers this object. The SCP writes that
  record when the association closes and then sets the flag; objects acknowledged in an association that a
  stop or crash cut short stay unflagged, and the next ``facesym serve`` records them at start-up. Rows that
  exist before this revision were received by a FaceSym that audited at association close: they are
  counted as audited (server default true); new rows are written with false.
- ``service_state``: small named timestamps shared by all processes on the database. The receiver writes
  ``receiver_started_at`` when it starts; no process promotes a study to analysis until a whole quiet
  period after it (a modality could not resend while we were down).

Revision ID: 0003_audit_reconcile
Revises: 0002_leases
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_audit_reconcile"
down_revision = "0002_leases"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("instance", sa.Column("audited", sa.Boolean(), nullable=False, server_default=sa.true()))
    op.create_index("ix_instance_audited", "instance", ["audited"])
    op.create_table(
        "service_state",
        sa.Column("name", sa.String(length=64), primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("service_state")
    op.drop_index("ix_instance_audited", table_name="instance")
    with op.batch_alter_table("instance") as batch:
        batch.drop_column("audited")
