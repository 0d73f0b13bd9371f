"""store.ingest's group commit: objects that arrive together share one transaction, one fsync per folder and
one commit, with the same outcomes as one by one; a batch that fails is undone and redone one by one."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import event, func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from service.engine import ENGINE_VERSION
from service.media.dicom_io import build_vl_photograph, write_dicom
from service.store import ingest as ing
from service.store.db import Instance, Job, Patient, Series, Study, open_database
from service.store.files import FileStore


@pytest.fixture
def store(tmp_path: Path):
    sessions = open_database(f"sqlite:///{tmp_path / 'facesym.db'}")
    files = FileStore(tmp_path / "files")
    commits: list[int] = []
    event.listen(sessions.kw["bind"], "commit", lambda conn: commits.append(1))
    yield sessions, files, commits
    sessions.kw["bind"].dispose()


def _photo(files: FileStore, seed: int = 0, **kw: Any) -> Path:
    rgb = np.random.default_rng(seed).integers(0, 255, (16, 20, 3), dtype=np.uint8)
    kw.setdefault("patient_id", "BATCH")
    return write_dicom(build_vl_photograph(rgb, **kw), files.incoming_dir() / f"{generate_uid()}.dcm")


def _pending(files: FileStore, path: Path, policy: str = "version") -> ing._Pending:
    """What an association's thread prepares before it queues the object (as ing._ingest does)."""
    head = ing._read_header(path)
    return ing._Pending(path, head, ing.dataset_sha256(path), path.stat().st_size, "TESTSCU", policy,
                        ENGINE_VERSION)


def _count(sessions, model) -> int:
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(model))


def _stored_files(files: FileStore) -> list[Path]:
    return [p for p in files.root.rglob("*.dcm") if ".incoming" not in p.parts]


def test_one_batch_one_commit_with_duplicates_and_versions_inside(store):
    sessions, files, commits = store
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    paths = [_photo(files, seed=i, study_uid=study, series_uid=series) for i in range(3)]
    paths.append(_photo(files, seed=10, study_uid=study, series_uid=series, sop_uid=sop))
    copy = files.new_incoming()
    copy.write_bytes(paths[-1].read_bytes())
    paths.append(copy)  # the same object again, byte for byte
    paths.append(_photo(files, seed=11, study_uid=study, series_uid=series, sop_uid=sop))  # other bytes
    paths.append(_photo(files, seed=20, study_uid=generate_uid()))  # another study, patient, series
    items = [_pending(files, p) for p in paths]
    before = len(commits)
    ing._commit_batch(sessions, files, items)
    assert len(commits) - before == 1  # one transaction for all seven
    assert [i.error for i in items] == [None] * 7
    outcomes = [(i.result.outcome, i.result.version) for i in items]  # type: ignore[union-attr]
    assert outcomes == [("stored", 1)] * 4 + [("duplicate", 1), ("new_version", 2), ("stored", 1)]
    assert _count(sessions, Instance) == 6 and len(_stored_files(files)) == 6
    assert _count(sessions, Study) == 2 and _count(sessions, Series) == 2 and _count(sessions, Job) == 2
    assert _count(sessions, Patient) == 1  # same PatientID/issuer/name: one patient
    with sessions() as s:
        for inst in s.scalars(select(Instance)):
            assert ing.dataset_sha256(files.abspath(inst.path)) == inst.sha256


def test_a_rejection_in_a_batch_undoes_it_and_the_rest_is_stored_one_by_one(store):
    sessions, files, commits = store
    series = generate_uid()
    first = _photo(files, seed=1, study_uid=generate_uid(), series_uid=series)
    ing.ingest(sessions, files, first, "TESTSCU", "version", ENGINE_VERSION)
    good = [_photo(files, seed=i, study_uid=generate_uid()) for i in range(2, 5)]
    bad = _photo(files, seed=9, study_uid=generate_uid(), series_uid=series)  # series of another study
    items = [_pending(files, p) for p in (good[0], bad, good[1], good[2])]
    before = len(commits)
    ing._commit_batch(sessions, files, items)
    results = [i.result for i in items]
    assert [r.outcome for r in results] == ["stored", "rejected", "stored", "stored"]  # type: ignore[union-attr]
    assert results[1].rejection == "inconsistent"  # type: ignore[union-attr]
    assert len(commits) - before == 3  # the batch rolled back; each good object committed alone
    assert _count(sessions, Instance) == 4 and len(_stored_files(files)) == 4
    assert bad.exists()  # left in the incoming folder for ingest() to delete, never placed


def test_a_failed_batch_commit_takes_every_file_back(store, monkeypatch):
    sessions, files, _ = store
    items = [_pending(files, _photo(files, seed=i, study_uid=generate_uid())) for i in range(4)]
    real_commit = Session.commit
    calls: list[int] = []

    def commit(self):
        calls.append(1)
        if len(calls) == 1:  # the batch's commit fails; the one-by-one commits go through
            assert len(_stored_files(files)) == 4  # placed before the commit
            raise OperationalError("COMMIT", {}, Exception("disk I/O error"))
        return real_commit(self)

    monkeypatch.setattr(Session, "commit", commit)
    ing._commit_batch(sessions, files, items)
    assert [i.result.outcome for i in items] == ["stored"] * 4  # type: ignore[union-attr]
    assert len(calls) == 5
    assert _count(sessions, Instance) == 4 and len(_stored_files(files)) == 4


def test_a_failing_database_fails_each_object_and_leaves_no_file(store, monkeypatch):
    sessions, files, _ = store
    items = [_pending(files, _photo(files, seed=i, study_uid=generate_uid())) for i in range(3)]

    def commit(self):
        raise OperationalError("COMMIT", {}, Exception("disk I/O error"))

    monkeypatch.setattr(Session, "commit", commit)
    ing._commit_batch(sessions, files, items)
    assert all(isinstance(i.error, OperationalError) and i.result is None for i in items)
    monkeypatch.undo()
    assert _stored_files(files) == [] and _count(sessions, Instance) == 0
    assert all(i.tmp.exists() for i in items)  # back in the incoming folder (ingest() deletes them)


def test_concurrent_ingests_are_grouped_and_all_stored(store, monkeypatch):
    """While one transaction runs, the objects that arrive queue up and go in the next one together."""
    sessions, files, commits = store
    sizes: list[int] = []
    real = ing._batch_transaction

    def slow_first(sessions_, files_, batch):
        sizes.append(len(batch))
        if len(sizes) == 1:
            time.sleep(0.5)  # everyone else arrives meanwhile
        return real(sessions_, files_, batch)

    monkeypatch.setattr(ing, "_batch_transaction", slow_first)
    study, series = generate_uid(), generate_uid()
    paths = [_photo(files, seed=i, study_uid=study, series_uid=series) for i in range(12)]
    results: list[Any] = []
    threads = [
        threading.Thread(target=lambda p=p: results.append(
            ing.ingest(sessions, files, p, "TESTSCU", "version", ENGINE_VERSION)))
        for p in paths
    ]
    for t in threads:
        t.start()
        if t is threads[0]:
            time.sleep(0.1)  # the first one is the writer, inside its slow transaction
    for t in threads:
        t.join(30)
    assert sorted(r.outcome for r in results) == ["stored"] * 12
    assert sizes[0] == 1 and max(sizes) >= 6, sizes  # grouped (11 queued; at least 6 in one go)
    assert sum(sizes) == 12 and len(sizes) < 12
    assert _count(sessions, Instance) == 12 and len(_stored_files(files)) == 12
    assert list(files.incoming_dir().iterdir()) == []
