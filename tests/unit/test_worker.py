"""The job state machine with fakes for analysis and a real SQLite store: stability, claiming, retries with
backoff, FAILED with a reason, crash recovery, and deliveries that wait for a destination that is down."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from service.config import Destination, Settings
from service.domain import Analysis, Quality
from service.engine import ENGINE_VERSION
from service.jobs.analysis import InstanceAnalysis, InstanceInput
from service.jobs.worker import (
    WorkerContext,
    backoff,
    claim_next_job,
    deliver_due,
    mark_receiver_started,
    process_job,
    promote_stable_studies,
    recover_interrupted,
)
from service.media.dicom_io import build_vl_photograph, write_dicom
from service.store.db import Delivery, DeliveryState, Job, JobState, open_database, utcnow
from service.store.files import FileStore
from service.store.ingest import ingest


class FakeAnalyser:
    """Says "not analysable: fake" for every instance, or raises ``error`` the first ``fail_times`` calls."""

    def __init__(self, fail_times: int = 0, error: Exception | None = None) -> None:
        self.calls = 0
        self.fail_times = fail_times
        self.error = error or RuntimeError("engine exploded")

    def __call__(self, inputs: list[InstanceInput]) -> list[InstanceAnalysis]:
        self.calls += 1
        if self.calls <= self.fail_times:
            raise self.error
        quality = Quality(False, ("fake",), (), 0, 1)
        return [InstanceAnalysis(i, Analysis(quality, ()), 1, 0.0) for i in inputs]


@pytest.fixture
def ctx(tmp_path: Path) -> WorkerContext:
    settings = replace(Settings(), data_dir=tmp_path, quiet_seconds=0, max_attempts=3, retry_base_seconds=10,
                       retry_max_seconds=25, destinations=(Destination("NOWHERE", "127.0.0.1", 9),))
    sessions = open_database(f"sqlite:///{tmp_path / 'facesym.db'}")
    files = FileStore(tmp_path / "files")
    return WorkerContext(settings, sessions, files, ENGINE_VERSION, "test-worker", FakeAnalyser())


def _receive(ctx: WorkerContext) -> str:
    rgb = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    ds = build_vl_photograph(rgb, series_description="Smile", study_uid=generate_uid())
    path = write_dicom(ds, ctx.files.incoming_dir() / "photo.dcm")
    result = ingest(ctx.sessions, ctx.files, path, "TEST", "version", ENGINE_VERSION)
    assert result.outcome == "stored"
    return str(ds.StudyInstanceUID)


def _job(ctx: WorkerContext) -> Job:
    with ctx.sessions() as s:
        return s.scalars(select(Job)).one()


def test_backoff_doubles_and_caps() -> None:
    s = replace(Settings(), retry_base_seconds=5, retry_max_seconds=30)
    assert [backoff(s, n).total_seconds() for n in (1, 2, 3, 4, 5)] == [5, 10, 20, 30, 30]


def test_quiet_period_then_queue_then_report(ctx: WorkerContext) -> None:
    _receive(ctx)
    assert _job(ctx).state is JobState.RECEIVED
    assert promote_stable_studies(ctx.sessions, 3600) == []  # not quiet long enough
    assert promote_stable_studies(ctx.sessions, 0) == [_job(ctx).id]
    job_id = claim_next_job(ctx.sessions, "w1")
    assert job_id is not None and claim_next_job(ctx.sessions, "w2") is None  # one claim only
    assert process_job(ctx, job_id) is JobState.REPORTED
    job = _job(ctx)
    assert job.state is JobState.REPORTED and job.sr_sop_instance_uid.startswith("2.25.")
    assert (ctx.files.root / job.sr_path).is_file()


def test_no_study_is_promoted_within_a_quiet_period_of_the_receivers_start(ctx: WorkerContext) -> None:
    """Any process promoting (serve or a worker) waits a whole quiet period after the receiver restarts."""
    _receive(ctx)
    quiet = 60.0
    started = utcnow() + timedelta(minutes=5)  # the receiver restarts long after the study went quiet
    mark_receiver_started(ctx.sessions, started)
    assert promote_stable_studies(ctx.sessions, quiet, now=started + timedelta(seconds=quiet / 2)) == []
    mark_receiver_started(ctx.sessions, started)  # a second start updates the one row
    job_id = _job(ctx).id
    assert promote_stable_studies(ctx.sessions, quiet, now=started + timedelta(seconds=quiet + 1)) == [job_id]


def test_report_figures_get_the_gate_thresholds_of_the_settings(
    ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The motion plots draw the thresholds the study was scored with: the settings', not the defaults."""
    import service.report.study_images as study_images
    from service.domain import Task

    seen: dict[str, object] = {}

    def recording_builder(*args: object, **kwargs: object) -> study_images.WrittenObjects:
        seen.update(kwargs)
        return study_images.WrittenObjects([])

    monkeypatch.setattr(study_images, "build_report_objects", recording_builder)
    ctx.settings = replace(ctx.settings, smile_gate_a0=0.03, smile_gate_a1=0.2)
    _receive(ctx)
    promote_stable_studies(ctx.sessions, 0)
    job_id = claim_next_job(ctx.sessions, "w1")
    assert job_id is not None and process_job(ctx, job_id) is JobState.REPORTED
    gates = seen["gates"]
    assert isinstance(gates, dict)
    assert (gates[Task.SMILE].a0, gates[Task.SMILE].a1) == (0.03, 0.2)


def test_a_failing_analysis_is_retried_with_backoff_then_failed_with_reason(ctx: WorkerContext) -> None:
    ctx.analyser = FakeAnalyser(fail_times=99)
    _receive(ctx)
    promote_stable_studies(ctx.sessions, 0)
    for attempt in (1, 2):
        job_id = claim_next_job(ctx.sessions, "w", now=utcnow() + timedelta(hours=attempt))
        assert job_id is not None
        before = utcnow()
        assert process_job(ctx, job_id) is JobState.QUEUED
        job = _job(ctx)
        assert job.attempts == attempt and "engine exploded" in job.reason
        wait = (job.next_run_at.replace(tzinfo=before.tzinfo) - before).total_seconds()
        assert wait == pytest.approx(min(25, 10 * 2 ** (attempt - 1)), abs=2)
    job_id = claim_next_job(ctx.sessions, "w", now=utcnow() + timedelta(hours=3))
    assert job_id is not None
    assert process_job(ctx, job_id) is JobState.FAILED
    assert _job(ctx).state is JobState.FAILED and "RuntimeError: engine exploded" in _job(ctx).reason


def test_running_jobs_left_by_a_crash_are_requeued(ctx: WorkerContext) -> None:
    _receive(ctx)
    promote_stable_studies(ctx.sessions, 0)
    assert claim_next_job(ctx.sessions, "crashed-worker") is not None
    assert _job(ctx).state is JobState.RUNNING
    assert recover_interrupted(ctx.sessions) == 1
    assert _job(ctx).state is JobState.QUEUED and _job(ctx).claimed_by == ""


def test_delivery_to_a_down_destination_waits_and_never_fails(ctx: WorkerContext) -> None:
    _receive(ctx)
    promote_stable_studies(ctx.sessions, 0)
    job_id = claim_next_job(ctx.sessions, "w")
    assert job_id is not None and process_job(ctx, job_id) is JobState.REPORTED
    for k in range(1, 4):
        assert deliver_due(ctx, now=utcnow() + timedelta(days=k)) == 0
        with ctx.sessions() as s:
            d = s.scalars(select(Delivery)).one()
        assert d.state is DeliveryState.PENDING and d.attempts == k and d.last_error
    assert _job(ctx).state is JobState.REPORTED  # delayed, not lost


def test_new_data_after_a_report_reopens_the_job(ctx: WorkerContext) -> None:
    study_uid = _receive(ctx)
    promote_stable_studies(ctx.sessions, 0)
    job_id = claim_next_job(ctx.sessions, "w")
    assert job_id is not None and process_job(ctx, job_id) is JobState.REPORTED
    rgb = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    ds = build_vl_photograph(rgb, series_description="Rest", study_uid=study_uid)
    path = write_dicom(ds, ctx.files.incoming_dir() / "rest.dcm")
    assert ingest(ctx.sessions, ctx.files, path, "TEST", "version", ENGINE_VERSION).outcome == "stored"
    assert _job(ctx).state is JobState.RECEIVED


@pytest.mark.parametrize("destination", ["dicom", "fhir-drop"])
def test_a_report_file_missing_from_the_store_fails_the_delivery_with_the_reason(
    ctx: WorkerContext, tmp_path: Path, destination: str
) -> None:
    """Retrying cannot bring back a deleted SR or Bundle: the delivery FAILS with the reason."""
    if destination == "fhir-drop":
        ctx.settings = replace(ctx.settings, destinations=(), fhir_drop_dir=str(tmp_path / "drop"),
                               fhir_patient_identifier_system="urn:oid:1.2.3")
    _receive(ctx)
    promote_stable_studies(ctx.sessions, 0)
    job_id = claim_next_job(ctx.sessions, "w")
    assert job_id is not None and process_job(ctx, job_id) is JobState.REPORTED
    sr = ctx.files.root / _job(ctx).sr_path
    (sr.with_suffix(".fhir.json") if destination == "fhir-drop" else sr).unlink()
    deliver_due(ctx, now=utcnow() + timedelta(days=1))
    with ctx.sessions() as s:
        d = s.scalars(select(Delivery)).one()
    assert d.state is DeliveryState.FAILED and d.attempts == 1
    assert "missing from the store" in d.last_error and "re-run the analysis" in d.last_error
