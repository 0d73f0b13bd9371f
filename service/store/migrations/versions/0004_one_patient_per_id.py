"""One patient row per (PatientID, Issuer of Patient ID).

Until this revision a patient row was keyed by PatientID, issuer AND name, so a study re-sent with a
corrected PatientName made a second row for the same patient (and split the before/after comparison).
From now on a non-empty PatientID with its issuer identifies the patient; the name, birth date and sex
are attributes that the newest data updates. Rows without a PatientID stay keyed by name as well.

Upgrade: rows that share a non-empty (patient_id, issuer) are merged into the oldest one (its studies
re-pointed, the newest row's name / birth date / sex kept), then a partial unique index enforces it.

Revision ID: 0004_one_patient_per_id
Revises: 0003_audit_reconcile
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_one_patient_per_id"
down_revision = "0003_audit_reconcile"
branch_labels = None
depends_on = None

_WHERE = sa.text("patient_id != ''")


def upgrade() -> None:
    conn = op.get_bind()
    dupes = conn.execute(sa.text(
        "SELECT patient_id, issuer, MIN(id), MAX(id) FROM patient WHERE patient_id != '' "
        "GROUP BY patient_id, issuer HAVING COUNT(*) > 1"
    )).fetchall()
    for patient_id, issuer, keep, newest in dupes:
        name, birth, sex = conn.execute(
            sa.text("SELECT name, birth_date, sex FROM patient WHERE id = :i"), {"i": newest}
        ).one()
        key = {"p": patient_id, "s": issuer, "k": keep}
        conn.execute(sa.text(
            "UPDATE study SET patient_pk = :k WHERE patient_pk IN "
            "(SELECT id FROM patient WHERE patient_id = :p AND issuer = :s AND id != :k)"
        ), key)
        conn.execute(sa.text("DELETE FROM patient WHERE patient_id = :p AND issuer = :s AND id != :k"), key)
        conn.execute(sa.text("UPDATE patient SET name = :n, birth_date = :b, sex = :x WHERE id = :k"),
                     {"n": name, "b": birth, "x": sex, "k": keep})
    op.create_index("uq_patient_id_issuer", "patient", ["patient_id", "issuer"], unique=True,
                    sqlite_where=_WHERE, postgresql_where=_WHERE)


def downgrade() -> None:
    op.drop_index("uq_patient_id_issuer", table_name="patient")
