"""Leases on jobs and deliveries, on SQLite and on a real PostgreSQL (skipped locally without one): an expired
claim is taken over and the old claimant's result is dropped, the heartbeat keeps a live claim, a job whose
workers keep dying fails, a delivery has one sender at a time, racing promoters promote each study once.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import require_peer
from pg_server import PostgresServer, find_bindir
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.config import Destination, Settings
from service.domain import Analysis, Quality
from service.engine import ENGINE_VERSION
from service.jobs.analysis import InstanceAnalysis, InstanceInput
from service.jobs.worker import (
    Heartbeat,
    WorkerContext,
    _claim_delivery,
    claim_next_job,
    process_job,
    promote_stable_studies,
    recover_interrupted,
)
from service.store.db import Delivery, DeliveryState, Job, JobState, Patient, Study, open_database, utcnow
from service.store.files import FileStore

_COUNTER = iter(range(1_000_000))


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PostgresServer]:
    bindir = find_bindir()
    require_peer(str(bindir / "initdb") if bindir else "initdb")
    with PostgresServer(bindir) as server:  # type: ignore[arg-type]
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'facesym.db'}"
    else:
        url = request.getfixturevalue("pg_server").create_database(f"leases_{next(_COUNTER)}")
    factory = open_database(url)
    yield factory
    factory.kw["bind"].dispose()


def _jobs(sessions: sessionmaker[Session], n: int, state: JobState = JobState.QUEUED) -> list[int]:
    with sessions.begin() as s:
        patient = Patient(patient_id=f"P{next(_COUNTER)}", name="LEASE^TEST")
        jobs = [Job(study=Study(study_uid=f"1.2.826.0.9.{next(_COUNTER)}", patient=patient),
                    engine_version=ENGINE_VERSION, state=state, next_run_at=utcnow() - timedelta(seconds=1))
                for _ in range(n)]
        s.add_all(jobs)
        s.flush()
        return [j.id for j in jobs]


def _job(sessions: sessionmaker[Session], job_id: int) -> Job:
    with sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def _ctx(
    sessions: sessionmaker[Session], tmp_path: Path, worker_id: str, analyser: Any = None
) -> WorkerContext:
    settings = replace(Settings(), data_dir=tmp_path, lease_seconds=60,
                       destinations=(Destination("NOWHERE", "127.0.0.1", 9),))
    ctx = WorkerContext(settings, sessions, FileStore(tmp_path / "files"), ENGINE_VERSION, worker_id)
    if analyser is not None:
        ctx.analyser = analyser
    return ctx


def test_an_expired_claim_is_taken_over_and_the_old_claims_result_is_dropped(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """w1 hangs in its analysis past its lease; w2 takes the job over; w1's report is dropped (no SR, no
    deliveries), w2's counts."""
    import numpy as np
    from pydicom.uid import generate_uid

    from service.media.dicom_io import build_vl_photograph, write_dicom
    from service.store.ingest import ingest

    files = FileStore(tmp_path / "files")
    rgb = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    ds = build_vl_photograph(rgb, series_description="Smile", study_uid=generate_uid())
    path = write_dicom(ds, files.incoming_dir() / "photo.dcm")
    assert ingest(sessions, files, path, "TEST", "version", ENGINE_VERSION).outcome == "stored"
    assert promote_stable_studies(sessions, 0) != []
    now = utcnow()
    job_id = claim_next_job(sessions, "w1", now, lease_seconds=60)
    assert job_id is not None
    assert claim_next_job(sessions, "w2", now + timedelta(seconds=30), lease_seconds=60) is None  # held
    taken: list[int | None] = []

    def slow_analyser(inputs: list[InstanceInput]) -> list[InstanceAnalysis]:
        # While w1 "hangs" in here, its lease runs out and w2 takes the job over.
        taken.append(claim_next_job(sessions, "w2", utcnow() + timedelta(seconds=61), lease_seconds=60))
        return _fake(inputs)

    assert process_job(_ctx(sessions, tmp_path, "w1", slow_analyser), job_id) is JobState.RUNNING
    assert taken == [job_id]
    job = _job(sessions, job_id)
    assert (job.state, job.claimed_by, job.attempts) == (JobState.RUNNING, "w2", 2)
    assert job.sr_sop_instance_uid == ""
    with sessions() as s:
        assert s.scalars(select(Delivery)).all() == []
    assert process_job(_ctx(sessions, tmp_path, "w2", _fake), job_id) is JobState.REPORTED  # w2 finishes
    with sessions() as s:
        assert [d.state for d in s.scalars(select(Delivery))] == [DeliveryState.PENDING]


def _fake(inputs: list[InstanceInput]) -> list[InstanceAnalysis]:
    quality = Quality(False, ("fake",), (), 0, 1)
    return [InstanceAnalysis(i, Analysis(quality, ()), 1, 0.0) for i in inputs]


def test_the_heartbeat_renews_a_live_claim_and_notices_a_lost_one(sessions: sessionmaker[Session]) -> None:
    (job_id,) = _jobs(sessions, 1)
    assert claim_next_job(sessions, "w1", lease_seconds=0.6) == job_id
    first = _job(sessions, job_id).lease_expires_at
    claim = {"state": JobState.RUNNING, "claimed_by": "w1", "attempts": 1}
    with Heartbeat(sessions, Job, job_id, claim, lease_seconds=0.6) as beat:
        threading.Event().wait(1.0)
        renewed = _job(sessions, job_id).lease_expires_at
        assert not beat.lost
        with sessions.begin() as s:  # another worker takes it over
            job = s.get(Job, job_id)
            assert job is not None
            job.claimed_by, job.attempts = "w2", 2
        threading.Event().wait(0.6)
        assert beat.lost
    assert first is not None and renewed is not None and renewed > first


def test_a_job_whose_workers_keep_dying_fails_with_the_reason(sessions: sessionmaker[Session]) -> None:
    (job_id,) = _jobs(sessions, 1)
    t = utcnow()
    for attempt in (1, 2, 3):
        t += timedelta(seconds=61)  # each claimant dies: its lease expires
        assert claim_next_job(sessions, f"w{attempt}", t, lease_seconds=60, max_attempts=3) == job_id
    assert claim_next_job(sessions, "w4", t + timedelta(seconds=61), lease_seconds=60, max_attempts=3) is None
    job = _job(sessions, job_id)
    assert job.state is JobState.FAILED and "worker was lost 3 time(s)" in job.reason


def test_a_delivery_has_one_sender_at_a_time(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    (job_id,) = _jobs(sessions, 1, JobState.REPORTED)
    with sessions.begin() as s:
        s.add(Delivery(job_pk=job_id, destination="NOWHERE@127.0.0.1:9", state=DeliveryState.PENDING,
                       next_run_at=utcnow() - timedelta(seconds=1)))
    w1, w2 = _ctx(sessions, tmp_path, "w1"), _ctx(sessions, tmp_path, "w2")
    now = utcnow()
    got = _claim_delivery(w1, now, set())
    assert got is not None and got[1] == 1  # attempt 1
    assert _claim_delivery(w2, now + timedelta(seconds=30), set()) is None  # w1's lease holds
    again = _claim_delivery(w2, now + timedelta(seconds=61), set())  # w1 died while sending
    assert again is not None and again[0] == got[0] and again[1] == 2
    with sessions() as s:
        d = s.scalars(select(Delivery)).one()
        assert (d.claimed_by, d.attempts) == ("w2", 2)


def test_a_restarted_single_process_releases_its_jobs_and_deliveries_at_once(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """SQLite, one machine: `facesym serve` starting again after a crash takes back what the dead process
    held without waiting for the leases (recover_interrupted)."""
    (job_id,) = _jobs(sessions, 1)
    (reported,) = _jobs(sessions, 1, JobState.REPORTED)
    with sessions.begin() as s:
        s.add(Delivery(job_pk=reported, destination="NOWHERE@127.0.0.1:9", state=DeliveryState.PENDING,
                       next_run_at=utcnow() - timedelta(seconds=1)))
    ctx = _ctx(sessions, tmp_path, "dead")
    assert claim_next_job(sessions, "dead", lease_seconds=60) == job_id
    assert _claim_delivery(ctx, utcnow(), set()) is not None
    assert recover_interrupted(sessions) == 1
    assert claim_next_job(sessions, "new", lease_seconds=60) == job_id
    assert _claim_delivery(_ctx(sessions, tmp_path, "new"), utcnow(), set()) is not None


def test_racing_promoters_promote_each_study_once(sessions: sessionmaker[Session]) -> None:
    ids = set(_jobs(sessions, 40, JobState.RECEIVED))
    results: list[list[int]] = []
    lock = threading.Lock()
    go = threading.Barrier(4)

    def promoter() -> None:
        go.wait()
        for _ in range(3):
            got = promote_stable_studies(sessions, 0)
            with lock:
                results.append(got)

    threads = [threading.Thread(target=promoter) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    promoted = [job_id for got in results for job_id in got]
    assert sorted(promoted) == sorted(ids)  # all of them, none twice
    with sessions() as s:
        assert set(s.scalars(select(Job.state))) == {JobState.QUEUED}


def test_racing_claimers_claim_every_job_once(sessions: sessionmaker[Session], figures: Any) -> None:
    """PostgreSQL: FOR UPDATE SKIP LOCKED; SQLite: the writer lock and a conditional UPDATE."""
    ids = set(_jobs(sessions, 60))
    claims: list[tuple[str, int]] = []
    lock = threading.Lock()
    go = threading.Barrier(6)

    def claimer(name: str) -> None:
        go.wait()
        while (job_id := claim_next_job(sessions, name, lease_seconds=60)) is not None:
            with lock:
                claims.append((name, job_id))

    threads = [threading.Thread(target=claimer, args=(f"w{k}",)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    claimed = Counter(job_id for _, job_id in claims)
    assert set(claimed) == ids and set(claimed.values()) == {1}  # all claimed, none twice
    with sessions() as s:
        rows = s.execute(select(Job.claimed_by, Job.state, Job.lease_expires_at)).all()
    assert all(state is JobState.RUNNING and lease is not None for _, state, lease in rows)
    assert Counter(by for by, _, _ in rows) == Counter(name for name, _ in claims)
    dialect = sessions.kw["bind"].dialect.name
    figures.record("scale-out claims", f"{dialect}: jobs claimed by 6 racing threads", len(claims))
    figures.record("scale-out claims", f"{dialect}: claimed twice", sum(n - 1 for n in claimed.values()))
