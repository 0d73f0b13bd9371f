"""store.ingest and store.files without a network: outcomes, job transitions, durability, concurrency."""

from __future__ import annotations

import hashlib
import logging
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from service.engine import ENGINE_VERSION
from service.errors import InvalidParameterError
from service.media.dicom_io import build_vl_photograph, write_dicom
from service.store.db import Instance, Job, JobState, Patient, Series, Study, open_database
from service.store.files import FileStore, UnsafeUidError, check_uid, instance_relpath
from service.store.ingest import dataset_sha256, ingest

PHI_NAME = "DOE^JANE"
PHI_ID = "MRN-4711"


@pytest.fixture
def store(tmp_path: Path):
    sessions = open_database(f"sqlite:///{tmp_path / 'facesym.db'}")
    files = FileStore(tmp_path / "files")
    yield sessions, files
    sessions.kw["bind"].dispose()


def _photo(files: FileStore, *, in_incoming: bool = True, seed: int = 0, **kw: Any) -> Path:
    rgb = np.random.default_rng(seed).integers(0, 255, (16, 20, 3), dtype=np.uint8)
    kw.setdefault("patient_name", PHI_NAME)
    kw.setdefault("patient_id", PHI_ID)
    ds = build_vl_photograph(rgb, **kw)
    folder = files.incoming_dir() if in_incoming else files.root.parent
    return write_dicom(ds, folder / f"{generate_uid()}.dcm")


def _ingest(sessions, files, path, policy="version", **kw):
    return ingest(sessions, files, path, "TESTSCU", policy, ENGINE_VERSION, **kw)


def _count(sessions, model) -> int:
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(model))


def _job(sessions, study_uid: str) -> Job:
    with sessions() as s:
        return s.scalars(select(Job).join(Study).where(Study.study_uid == study_uid)).one()


def _set_job(sessions, study_uid: str, state: JobState, **fields) -> None:
    with sessions() as s:
        job = s.scalars(select(Job).join(Study).where(Study.study_uid == study_uid)).one()
        job.state = state
        for k, v in fields.items():
            setattr(job, k, v)
        s.commit()


def test_new_object_is_stored_with_rows_and_a_received_job(store, caplog):
    sessions, files = store
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    src = _photo(files, study_uid=study, series_uid=series, sop_uid=sop, series_description="smile")
    digest = dataset_sha256(src)
    caplog.set_level(logging.DEBUG)
    res = _ingest(sessions, files, src)
    assert (res.outcome, res.version, res.sop_instance_uid, res.study_uid) == ("stored", 1, sop, study)
    assert res.path == f"{study}/{series}/{sop}.dcm"
    placed = files.abspath(res.path)
    assert placed.is_file() and dataset_sha256(placed) == digest
    assert not src.exists()  # consumed from .incoming
    assert list(files.incoming_dir().iterdir()) == []
    with sessions() as s:
        inst = s.scalars(select(Instance)).one()
        assert (inst.sha256, inst.version, inst.calling_ae, inst.size) == (
            digest,
            1,
            "TESTSCU",
            placed.stat().st_size,
        )
        assert inst.sop_class_uid == "1.2.840.10008.5.1.4.1.1.77.1.4"
        assert inst.transfer_syntax_uid == "1.2.840.10008.1.2.1"
        assert inst.series.series_uid == series and inst.series.series_description == "smile"
        assert inst.series.modality == "XC" and inst.series.study.study_uid == study
        patient = s.scalars(select(Patient)).one()
        assert (patient.name, patient.patient_id) == (PHI_NAME, PHI_ID)
    job = _job(sessions, study)
    assert (job.state, job.engine_version, job.attempts) == (JobState.RECEIVED, ENGINE_VERSION, 0)
    text = caplog.text
    assert sop in text and PHI_NAME not in text and "DOE" not in text and PHI_ID not in text


def test_identical_resend_is_a_duplicate_and_leaves_the_job_alone(store):
    sessions, files = store
    first = _photo(files)
    again = files.incoming_dir() / "again.dcm"
    again.write_bytes(first.read_bytes())
    res1 = _ingest(sessions, files, first)
    _set_job(sessions, res1.study_uid, JobState.REPORTED, attempts=2, reason="kept")
    with sessions() as s:
        before = s.scalars(select(Study)).one().last_received_at
    res2 = _ingest(sessions, files, again)
    assert (res2.outcome, res2.version, res2.path) == ("duplicate", 1, res1.path)
    assert _count(sessions, Instance) == 1
    assert not again.exists() and list(files.incoming_dir().iterdir()) == []
    job = _job(sessions, res1.study_uid)
    assert (job.state, job.attempts, job.reason) == (JobState.REPORTED, 2, "kept")
    with sessions() as s:
        assert s.scalars(select(Study)).one().last_received_at == before


def test_same_uid_other_bytes_is_a_new_version_or_rejected(store):
    sessions, files = store
    uids: dict[str, Any] = dict(study_uid=generate_uid(), series_uid=generate_uid(), sop_uid=generate_uid())
    res1 = _ingest(sessions, files, _photo(files, seed=1, **uids))
    res2 = _ingest(sessions, files, _photo(files, seed=2, **uids))
    assert (res2.outcome, res2.version) == ("new_version", 2)
    assert res2.path.endswith(f"{uids['sop_uid']}.v2.dcm")
    assert files.abspath(res1.path).is_file() and files.abspath(res2.path).is_file()
    # resending version 1's bytes is a duplicate of version 1
    copy = files.incoming_dir() / "copy.dcm"
    copy.write_bytes(files.abspath(res1.path).read_bytes())
    dup = _ingest(sessions, files, copy)
    assert (dup.outcome, dup.version) == ("duplicate", 1)
    rej = _ingest(sessions, files, _photo(files, seed=3, **uids), policy="reject")
    assert (rej.outcome, rej.rejection) == ("rejected", "conflict")
    with sessions() as s:
        versions = s.scalars(select(Instance.version).order_by(Instance.version)).all()
    assert versions == [1, 2]
    assert list(files.incoming_dir().iterdir()) == []


def test_identical_bytes_are_a_duplicate_even_with_other_file_meta(store):
    """The hash covers the data set only: the same object written by another toolkit is a duplicate."""
    sessions, files = store
    src = _photo(files)
    res1 = _ingest(sessions, files, src)
    ds = pydicom.dcmread(files.abspath(res1.path))
    ds.file_meta.ImplementationVersionName = "OTHER_TOOLKIT"
    ds.file_meta.SourceApplicationEntityTitle = "ELSEWHERE"
    other = write_dicom(ds, files.incoming_dir() / "other.dcm")
    assert other.read_bytes() != files.abspath(res1.path).read_bytes()
    assert _ingest(sessions, files, other).outcome == "duplicate"


@pytest.mark.parametrize("start", [JobState.REPORTED, JobState.DELIVERED, JobState.FAILED, JobState.QUEUED])
def test_new_data_sends_the_job_back_to_received(store, start):
    sessions, files = store
    study, series = generate_uid(), generate_uid()
    res = _ingest(sessions, files, _photo(files, study_uid=study, series_uid=series))
    _set_job(sessions, study, start, attempts=3, reason="earlier failure", claimed_by="w1")
    res2 = _ingest(sessions, files, _photo(files, seed=5, study_uid=study, series_uid=series))
    assert res2.outcome == "stored" and res2.study_uid == res.study_uid
    job = _job(sessions, study)
    assert job.state == JobState.RECEIVED
    if start != JobState.QUEUED:
        assert (job.attempts, job.reason, job.claimed_by) == (0, "", "")
    assert _count(sessions, Job) == 1 and _count(sessions, Study) == 1 and _count(sessions, Series) == 1


def test_running_job_is_left_alone_but_the_study_clock_moves(store):
    sessions, files = store
    study = generate_uid()
    _ingest(sessions, files, _photo(files, study_uid=study))
    _set_job(sessions, study, JobState.RUNNING, claimed_by="w1")
    with sessions() as s:
        st = s.scalars(select(Study)).one()
        st.last_received_at = st.last_received_at - timedelta(minutes=5)
        s.commit()
        before = st.last_received_at
    _ingest(sessions, files, _photo(files, seed=9, study_uid=study))  # another series of the same study
    job = _job(sessions, study)
    assert (job.state, job.claimed_by) == (JobState.RUNNING, "w1")
    with sessions() as s:
        assert s.scalars(select(Study)).one().last_received_at > before
    assert _count(sessions, Series) == 2


def test_another_engine_version_gets_its_own_job(store):
    sessions, files = store
    src = _photo(files)
    ingest(sessions, files, src, "A", "version", "0.0.9")
    ingest(sessions, files, _photo(files, seed=4), "A", "version", "0.0.9")
    assert _count(sessions, Job) == 2  # two studies (random UIDs)


@pytest.mark.parametrize(
    "missing", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"]
)
def test_missing_required_uid_is_rejected_and_nothing_kept(store, missing):
    sessions, files = store
    src = _photo(files)
    ds = pydicom.dcmread(src)
    delattr(ds, missing)
    ds.save_as(src, enforce_file_format=False)
    res = _ingest(sessions, files, src)
    assert (res.outcome, res.rejection, res.version) == ("rejected", "missing_uid", 0)
    assert missing in res.reason
    assert _count(sessions, Instance) == 0 and _count(sessions, Study) == 0 and _count(sessions, Job) == 0
    assert list(files.incoming_dir().iterdir()) == []
    assert [p for p in files.root.iterdir() if p.name != ".incoming"] == []


def test_unreadable_and_unsafe_uids_and_mismatch_are_rejected(store):
    sessions, files = store
    junk = files.incoming_dir() / "junk.dcm"
    junk.write_bytes(b"\x00garbage" * 100)
    res = _ingest(sessions, files, junk)
    assert res.outcome == "rejected" and res.rejection in ("unreadable", "missing_uid")
    bad = _photo(files, study_uid="1.2.3/../../etc")
    res = _ingest(sessions, files, bad)
    assert (res.outcome, res.rejection) == ("rejected", "bad_uid")
    src = _photo(files)
    res = _ingest(sessions, files, src, expected_sop_class="1.2.840.10008.5.1.4.1.1.2")
    assert (res.outcome, res.rejection) == ("rejected", "mismatch")
    assert _count(sessions, Instance) == 0
    assert list(files.incoming_dir().iterdir()) == []


def test_failed_commit_takes_the_placed_file_away(store, monkeypatch):
    sessions, files = store
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    src = _photo(files, study_uid=study, series_uid=series, sop_uid=sop)
    calls = []

    def boom(self):
        calls.append(1)
        placed = files.abspath(instance_relpath(study, series, sop))
        assert placed.is_file()  # placed (and fsynced) before the commit
        raise OperationalError("COMMIT", {}, Exception("disk I/O error"))

    monkeypatch.setattr(Session, "commit", boom)
    with pytest.raises(OperationalError):
        _ingest(sessions, files, src)
    monkeypatch.undo()
    assert len(calls) == 2  # retried once
    assert not files.abspath(instance_relpath(study, series, sop)).exists()
    assert list(files.incoming_dir().iterdir()) == []
    assert _count(sessions, Instance) == 0 and _count(sessions, Job) == 0


def test_file_outside_incoming_is_copied_and_left_in_place(store):
    sessions, files = store
    src = _photo(files, in_incoming=False)
    data = src.read_bytes()
    res = _ingest(sessions, files, src)
    assert res.outcome == "stored"
    assert src.read_bytes() == data
    assert files.abspath(res.path).read_bytes() == data


def test_concurrent_associations_share_one_study_and_version_in_order(store):
    sessions, files = store
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    srcs = [_photo(files, seed=i, study_uid=study, series_uid=series) for i in range(8)]
    srcs += [_photo(files, seed=100 + i, study_uid=study, series_uid=series, sop_uid=sop) for i in range(6)]
    results, errors = [], []

    def run(p):
        try:
            results.append(_ingest(sessions, files, p))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in srcs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(r.outcome for r in results).count("stored") == 9  # 8 + the first of the shared SOP
    shared = sorted(r.version for r in results if r.sop_instance_uid == sop)
    assert shared == [1, 2, 3, 4, 5, 6]
    assert _count(sessions, Study) == 1 and _count(sessions, Series) == 1 and _count(sessions, Job) == 1
    assert _count(sessions, Patient) == 1 and _count(sessions, Instance) == 14
    with sessions() as s:
        for inst in s.scalars(select(Instance)):
            assert dataset_sha256(files.abspath(inst.path)) == inst.sha256


def test_bad_duplicate_policy_raises(store):
    sessions, files = store
    with pytest.raises(InvalidParameterError, match="duplicate_policy"):
        _ingest(sessions, files, _photo(files), policy="overwrite")


# ----------------------------------------------------------------------------------------- FileStore
def test_filestore_layout_and_uid_sanitising(tmp_path):
    files = FileStore(tmp_path / "store")
    assert files.incoming_dir() == (tmp_path / "store" / ".incoming").resolve()
    assert instance_relpath("1.2", "1.3", "1.4") == "1.2/1.3/1.4.dcm"
    assert instance_relpath("1.2", "1.3", "1.4", 3) == "1.2/1.3/1.4.v3.dcm"
    for bad in ("", "..", "1.2/3", "1.2.", ".1", "1..2", "1.2 ", "a.b", "1" * 65, "1.2\x00"):
        with pytest.raises(UnsafeUidError):
            check_uid(bad)
    with pytest.raises(UnsafeUidError):
        instance_relpath("1.2", "../x", "1.4")
    with pytest.raises(InvalidParameterError):
        files.abspath("../outside.dcm")
    outside = tmp_path / "outside.dcm"
    outside.write_bytes(b"x")
    with pytest.raises(InvalidParameterError, match="incoming"):
        files.place(outside, "1.2/1.3/1.4.dcm")
    tmp = files.new_incoming()
    tmp.write_bytes(b"payload")
    placed = files.place(tmp, "1.2/1.3/1.4.dcm")
    assert placed.read_bytes() == b"payload" and not tmp.exists()
    assert hashlib.sha256(placed.read_bytes()).hexdigest()
    files.remove("1.2/1.3/1.4.dcm")
    assert not placed.exists()
    assert files.free_mb() > 0


def test_adopt_copies_when_hard_links_fail(tmp_path, monkeypatch):
    """pynetdicom's temp dir on another filesystem (EXDEV): the file is copied into .incoming."""
    import os

    files = FileStore(tmp_path / "store")
    src = tmp_path / "elsewhere.dcm"
    src.write_bytes(b"dicom bytes")

    def no_link(*_args, **_kw):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    dest = files.adopt(src)
    assert dest.parent == files.incoming_dir() and dest.read_bytes() == b"dicom bytes"
    assert src.exists() and not os.path.samefile(src, dest)
