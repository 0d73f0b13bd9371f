"""Retention purge (service/store/purge.py, `facesym purge`): what goes, what stays and why, the audit record,
and that a failure or a concurrent C-STORE loses nothing. Real SQLite store, real files, real ingest."""

from __future__ import annotations

import json
import os
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.audit import AuditTrail
from service.cli import main
from service.engine import ENGINE_VERSION
from service.media.dicom_io import build_vl_photograph, write_dicom
from service.store import purge as purge_mod
from service.store.db import (
    AuditRecord,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Patient,
    Series,
    Study,
    open_database,
)
from service.store.files import FileStore
from service.store.ingest import ingest
from service.store.purge import PURGING, purge

NOW = datetime.now(UTC)
PHI_NAME = "DOE^JANE"


class Store:
    def __init__(self, root: Path, url: str = "") -> None:
        self.root = root
        self.sessions = open_database(url or f"sqlite:///{root / 'facesym.db'}")
        self.files = FileStore(root / "files")
        self.trail = AuditTrail(self.sessions)

    def receive(self, study_uid: str, patient_id: str, seed: int = 0) -> str:
        rgb = np.random.default_rng(seed).integers(0, 255, (16, 20, 3), dtype=np.uint8)
        ds = build_vl_photograph(rgb, patient_name=PHI_NAME, patient_id=patient_id, study_uid=study_uid,
                                 series_description="Smile")
        path = write_dicom(ds, self.files.incoming_dir() / f"{generate_uid()}.dcm")
        result = ingest(self.sessions, self.files, path, "TESTSCU", "version", ENGINE_VERSION)
        assert result.outcome == "stored"
        return str(ds.SOPInstanceUID)

    def study(
        self,
        days_old: float,
        job_state: JobState | None = JobState.DELIVERED,
        deliveries: tuple[DeliveryState, ...] = (DeliveryState.DELIVERED,),
        patient_id: str = "",
        delivered_days_ago: float | None = None,
    ) -> str:
        """A study received ``days_old`` days ago with two instances, its report files, a job in
        ``job_state`` (None: no job row) and deliveries in the given states."""
        uid = generate_uid()
        self.receive(uid, patient_id or f"MRN-{uid[-6:]}", 1)
        self.receive(uid, patient_id or f"MRN-{uid[-6:]}", 2)
        when = NOW - timedelta(days=days_old)
        reports = self.files.root / "reports" / uid
        (reports / "figures").mkdir(parents=True)
        for name in ("sr.dcm", "sr.fhir.json", "sc.dcm", "figures/0-smile-key.png"):
            (reports / name).write_bytes(b"x" * 100)
        with self.sessions.begin() as s:
            study = s.scalars(select(Study).where(Study.study_uid == uid)).one()
            study.last_received_at = when
            s.execute(update(Instance).where(Instance.series_pk.in_(
                select(Series.id).where(Series.study_pk == study.id))).values(received_at=when))
            job = s.scalars(select(Job).where(Job.study_pk == study.id)).one()
            if job_state is None:
                s.delete(job)
                return uid
            job.state, job.created_at, job.updated_at = job_state, when, when
            job.sr_path = f"reports/{uid}/sr.dcm"
            job.report_files = json.dumps([f"reports/{uid}/sc.dcm"])
            ago = delivered_days_ago if delivered_days_ago is not None else days_old
            delivered = NOW - timedelta(days=ago)
            for n, state in enumerate(deliveries):
                s.add(Delivery(job_pk=job.id, destination=f"PACS{n}@127.0.0.1:{104 + n}", state=state,
                               delivered_at=delivered if state is DeliveryState.DELIVERED else None))
        return uid

    def count(self, model: Any, *where: Any) -> int:
        with self.sessions() as s:
            return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)

    def study_rows(self, uid: str) -> int:
        return self.count(Study, Study.study_uid == uid)

    def folders(self, uid: str) -> tuple[bool, bool]:
        return (self.files.root / uid).exists(), (self.files.root / "reports" / uid).exists()

    def deleted_records(self) -> list[AuditRecord]:
        with self.sessions() as s:
            return list(s.scalars(select(AuditRecord).where(AuditRecord.event_id == "110105")))

    def purge(self, days: float = 30, **kw: Any) -> purge_mod.PurgeReport:
        return purge(self.sessions, self.files, older_than_days=days, audit=self.trail.append,
                     user="tester (facesym purge)", **kw)


@pytest.fixture
def store(tmp_path: Path):
    st = Store(tmp_path)
    yield st
    st.sessions.kw["bind"].dispose()


@pytest.fixture(scope="module")
def postgres():
    """A throw-away PostgreSQL (Debian's postgresql-15, as in tests/scaleout) for the purge's locking path."""
    from conftest import require_peer
    from scaleout.pg_server import PostgresServer, find_bindir

    bindir = find_bindir()
    require_peer(str(bindir / "initdb") if bindir else "initdb")
    if os.geteuid() == 0:
        require_peer("runuser")
    with PostgresServer(bindir) as server:  # type: ignore[arg-type]
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path):
    """The same checks on SQLite (BEGIN IMMEDIATE) and PostgreSQL (SELECT ... FOR UPDATE)."""
    url = ""
    if request.param == "postgresql":
        pg = request.getfixturevalue("postgres")
        url = pg.create_database(f"purge_{secrets.token_hex(4)}")
    st = Store(tmp_path, url)
    yield st
    st.sessions.kw["bind"].dispose()


def test_old_delivered_study_is_removed_whole_and_audited(any_store: Store) -> None:
    store = any_store
    old = store.study(90, patient_id="MRN-OLD")
    recent = store.study(2)
    assert store.folders(old) == (True, True)

    report = store.purge(30)

    assert [(d.study_uid, d.action) for d in report.decisions] == [(old, "removed")]
    assert report.decisions[0].files == 6  # two received objects + SR, Bundle, SC, figure
    assert "older than 30 days" in report.decisions[0].reason
    assert report.recent == 1
    assert store.folders(old) == (False, False)
    assert store.study_rows(old) == 0
    assert store.count(Patient, Patient.patient_id == "MRN-OLD") == 0  # no study left for that patient
    # what is left is the recent study's
    assert store.count(Instance) == 2 and store.count(Series) == 2 and store.count(Job) == 1
    assert store.count(Delivery) == 1  # the recent study's
    assert store.folders(recent) == (True, True) and store.study_rows(recent) == 1
    assert not any((store.files.root / PURGING).iterdir())

    [rec] = store.deleted_records()
    assert 'csd-code="110105"' in rec.xml and 'EventActionCode="D"' in rec.xml
    assert f'ParticipantObjectID="{old}"' in rec.xml and "NumberOfInstances=\"2\"" in rec.xml
    assert 'ParticipantObjectID="MRN-OLD"' in rec.xml  # the Patient ID, captured before the rows went
    assert "tester (facesym purge)" in rec.xml and PHI_NAME not in rec.xml
    assert store.trail.verify().ok


@pytest.mark.parametrize(
    ("job_state", "deliveries", "why"),
    [
        (JobState.RUNNING, (), "is RUNNING: running"),
        (JobState.QUEUED, (), "is QUEUED: not analysed yet"),
        (JobState.RECEIVED, (), "is RECEIVED: not analysed yet"),
        (JobState.FAILED, (), "FAILED: no result was delivered"),
        (JobState.REPORTED, (DeliveryState.DELIVERED, DeliveryState.PENDING), "1 PENDING delivery"),
        (JobState.REPORTED, (DeliveryState.FAILED, DeliveryState.FAILED), "2 FAILED deliveries"),
    ],
)
def test_unfinished_or_undelivered_studies_are_kept_unless_forced(
    store: Store, job_state: JobState, deliveries: tuple[DeliveryState, ...], why: str
) -> None:
    uid = store.study(400, job_state, deliveries)

    [kept] = store.purge(30).decisions
    assert (kept.study_uid, kept.action) == (uid, "kept") and why in kept.reason
    assert store.folders(uid) == (True, True) and store.study_rows(uid) == 1
    assert store.deleted_records() == []

    [forced] = store.purge(30, force=True).decisions
    assert forced.action == "removed" and "forced" in forced.reason and why in forced.reason
    assert store.folders(uid) == (False, False) and store.study_rows(uid) == 0
    [rec] = store.deleted_records()
    assert "forced" in rec.xml


def test_a_study_without_a_job_and_one_reported_with_nothing_to_deliver_go(store: Store) -> None:
    no_job = store.study(60, job_state=None)  # e.g. only FaceSym's own objects routed back
    nothing_to_send = store.study(60, JobState.REPORTED, deliveries=())
    report = store.purge(30)
    assert sorted(d.study_uid for d in report.with_action("removed")) == sorted([no_job, nothing_to_send])


def test_dry_run_lists_and_changes_nothing(store: Store) -> None:
    old = store.study(90)
    blocked = store.study(90, JobState.FAILED)
    report = store.purge(30, dry_run=True)
    assert {d.study_uid: d.action for d in report.decisions} == {old: "would remove", blocked: "kept"}
    assert report.decisions[0].files == 6 and report.decisions[0].bytes > 0
    assert store.folders(old) == (True, True) and store.study_rows(old) == 1
    assert store.deleted_records() == []


def test_recent_activity_of_any_kind_keeps_an_old_study(store: Store) -> None:
    delivered_yesterday = store.study(90, delivered_days_ago=1)  # received long ago, result sent yesterday
    report = store.purge(30)
    assert report.decisions == [] and report.recent == 1
    assert store.study_rows(delivered_yesterday) == 1


def test_patient_with_another_study_is_kept(store: Store) -> None:
    old = store.study(90, patient_id="MRN-SHARED")
    store.study(1, patient_id="MRN-SHARED")
    store.purge(30)
    assert store.study_rows(old) == 0
    assert store.count(Patient, Patient.patient_id == "MRN-SHARED") == 1


def test_failed_commit_puts_everything_back(any_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    store = any_store
    old = store.study(90)
    before = sorted(p.relative_to(store.files.root) for p in store.files.root.rglob("*") if p.is_file())

    def broken_commit(self: Session) -> None:
        raise OSError("disk full while committing")

    monkeypatch.setattr(Session, "commit", broken_commit)
    [d] = store.purge(30).decisions
    monkeypatch.undo()

    assert d.action == "error" and "disk full" in d.reason
    after = sorted(p.relative_to(store.files.root) for p in store.files.root.rglob("*") if p.is_file())
    assert after == before  # every file back where it was
    assert store.study_rows(old) == 1 and store.count(Instance) == 2 and store.count(Delivery) == 1
    assert store.deleted_records() == []


def test_object_arriving_during_the_purge_keeps_the_study(
    any_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = any_store
    old = store.study(90, patient_id="MRN-LATE")
    real_lock = purge_mod._lock_study
    late: list[str] = []

    def lock_after_a_late_cstore(s: Session, study_pk: int) -> Study | None:
        late.append(store.receive(old, "MRN-LATE", seed=3))  # commits between the listing and the lock
        return real_lock(s, study_pk)

    monkeypatch.setattr(purge_mod, "_lock_study", lock_after_a_late_cstore)
    report = store.purge(30)
    assert report.decisions == [] and report.recent == 1  # checked again under the lock: recent now
    assert store.study_rows(old) == 1 and store.count(Instance) == 3
    assert store.folders(old) == (True, True)
    assert store.deleted_records() == []


def test_leftovers_of_an_interrupted_purge_are_swept(store: Store) -> None:
    aside = store.files.root / PURGING / "1.2.3.deadbeef"
    aside.mkdir(parents=True)
    (aside / "x.dcm").write_bytes(b"x")
    report = store.purge(30)
    assert report.leftovers_removed == 1 and not aside.exists()


def test_days_must_be_positive(store: Store) -> None:
    from service.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="older-than"):
        store.purge(0)


def test_cli_dry_run_then_purge(store: Store, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    old = store.study(90, patient_id="MRN-CLI")
    blocked = store.study(90, JobState.REPORTED, (DeliveryState.PENDING,))
    monkeypatch.setenv("FACESYM_DATA_DIR", str(store.root))
    for key in ("FACESYM_DATABASE_URL", "FACESYM_AE_TITLE"):
        monkeypatch.delenv(key, raising=False)

    assert main(["purge", "--older-than", "30", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert old in out and "would remove" in out and blocked in out and "PENDING" in out
    assert "would remove 1 study" in out and "kept 1" in out
    assert store.study_rows(old) == 1

    assert main(["purge", "--older-than", "30"]) == 0
    out = capsys.readouterr().out
    assert "removed 1 study" in out and old in out
    assert "MRN-CLI" not in out and PHI_NAME not in out  # UIDs only, no patient data
    assert store.study_rows(old) == 0 and store.study_rows(blocked) == 1
    assert len(store.deleted_records()) == 1

    assert main(["purge", "--older-than", "0"]) != 0
    assert "older-than" in capsys.readouterr().out
