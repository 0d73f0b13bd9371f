"""Load: 20 concurrent associations x 50 small objects into a `facesym serve` subprocess.

Every C-STORE must be answered Success, and then all 1,000 objects must be on disk (byte for byte: the data
set's SHA-256 against the sent file's) and in the database (one row each, one study and job per
association). The client is pynetdicom in threads of the test process; the server is a separate process,
as in production. Timings are recorded as figures, never asserted (bench/ingest.py measures them).
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import free_port, stop_process
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from service.media.dicom_io import VL_PHOTOGRAPHIC, build_vl_photograph
from service.store.ingest import dataset_sha256

ROOT = Path(__file__).resolve().parents[2]
ASSOCIATIONS = 20
PER_ASSOCIATION = 50
VERIFICATION = "1.2.840.10008.1.1"


def _objects(folder: Path, sop_uids: dict[Path, str]) -> list[list[Path]]:
    """One study (one series, one patient) of PER_ASSOCIATION small VL photographs per association;
    ``sop_uids`` gets each file's SOP Instance UID."""
    folder.mkdir()
    rng = np.random.default_rng(7)
    batches = []
    for a in range(ASSOCIATIONS):
        study, series = generate_uid(), generate_uid()
        batch = []
        for i in range(PER_ASSOCIATION):
            rgb = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
            ds = build_vl_photograph(rgb, patient_name=f"LOADTEST^PATIENT{a:02d}",
                                     patient_id=f"LOADMRN{a:02d}", study_uid=study, series_uid=series,
                                     instance_number=i + 1, series_description="Rest")
            path = folder / f"{a:02d}_{i:02d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            sop_uids[path] = str(ds.SOPInstanceUID)
            batch.append(path)
        batches.append(batch)
    return batches


def _tune(assoc: Any) -> None:
    """Client side only (as bench/ingest.py): TCP_NODELAY, and a storage SCU's association reactor never
    takes a C-STORE response off the DIMSE queue (a race in pynetdicom 3.0's pause checkpoint that loses
    one now and then under load: send_c_store then waits for the DIMSE timeout)."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    blocking_get = assoc.dimse.get_msg
    assoc.dimse.get_msg = lambda block=False: blocking_get(block=True) if block else (None, None)


def _ae() -> AE:
    ae = AE(ae_title="LOADSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    return ae


def _echo(port: int) -> bool:
    ae = _ae()
    ae.acse_timeout = ae.network_timeout = 2
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title="FACESYM")
    if not assoc.is_established:
        return False
    ok = assoc.send_c_echo().get("Status") == 0
    assoc.release()
    return bool(ok)


def _serve(data: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, FACESYM_DATA_DIR=str(data), FACESYM_DICOM_HOST="127.0.0.1",
               FACESYM_DICOM_PORT=str(port), FACESYM_MAX_ASSOCIATIONS=str(ASSOCIATIONS + 5),
               FACESYM_WEB_PORT="0", FACESYM_QUIET_SECONDS="3600",  # storing only: no analysis starts
               FACESYM_MIN_FREE_DISK_MB="1", FACESYM_LOG_LEVEL="INFO")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"facesym serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if _echo(port):
            return proc
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"facesym serve did not answer C-ECHO within 60 s:\n{log.read_text()[-3000:]}")


def _send(port: int, paths: list[Path], barrier: threading.Barrier, out: dict[str, Any]) -> None:
    ae = _ae()
    ae.add_requested_context(VL_PHOTOGRAPHIC, [ExplicitVRLittleEndian])
    statuses: list[int] = []
    out["statuses"] = statuses
    assoc = ae.associate("127.0.0.1", port, ae_title="FACESYM")
    try:
        if not assoc.is_established:
            out["error"] = "association refused"
            barrier.abort()
            return
        _tune(assoc)
        barrier.wait(60)
        for path in paths:
            if not assoc.is_established:
                out["error"] = f"association lost after {len(statuses)} objects"
                return
            rsp = assoc.send_c_store(path)
            statuses.append(int(rsp.Status) if "Status" in rsp else -1)
    except Exception as exc:  # reported by the test
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if assoc.is_established:
            assoc.release()


def test_20_associations_x_50_objects_all_success_all_stored(tmp_path: Path, figures) -> None:
    sop_uids: dict[Path, str] = {}
    batches = _objects(tmp_path / "objects", sop_uids)
    sent = {p: dataset_sha256(p) for batch in batches for p in batch}
    data, port, log = tmp_path / "var", free_port(), tmp_path / "serve.log"
    proc = _serve(data, port, log)
    try:
        barrier = threading.Barrier(ASSOCIATIONS)
        outs: list[dict[str, Any]] = [{} for _ in batches]
        threads = [threading.Thread(target=_send, args=(port, batch, barrier, out))
                   for batch, out in zip(batches, outs, strict=True)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        wall = time.monotonic() - t0
        assert not any(t.is_alive() for t in threads), "a sender hung"
    finally:
        stop_process(proc)

    statuses = Counter(s for o in outs for s in o["statuses"])
    errors = [o["error"] for o in outs if "error" in o]
    total = ASSOCIATIONS * PER_ASSOCIATION
    with sqlite3.connect(f"file:{data / 'facesym.db'}?mode=ro", uri=True) as con:
        rows = con.execute("select sop_instance_uid, version, path, sha256 from instance").fetchall()
        per_study = con.execute("select count(*) from instance i join series s on i.series_pk = s.id "
                                "join study t on s.study_pk = t.id group by t.id").fetchall()
        jobs = con.execute("select state, count(*) from job group by state").fetchall()
    files = data / "files"
    on_disk = [p for p in files.rglob("*.dcm") if ".incoming" not in p.parts]
    by_path = {path: sha for _, _, path, sha in rows}
    intact = sum(1 for p in on_disk if dataset_sha256(p) == by_path.get(p.relative_to(files).as_posix()))
    lost = len(set(sop_uids.values()) - {uid for uid, *_ in rows})
    figures.record("load", "associations", ASSOCIATIONS)
    figures.record("load", "instances sent", total)
    figures.record("load", "C-STORE Success", statuses.get(0, 0))
    figures.record("load", "stored (rows / files / intact)", f"{len(rows)} / {len(on_disk)} / {intact}")
    figures.record("load", "lost", lost)
    figures.record("load", "wall s (not asserted)", f"{wall:.1f}")

    assert errors == [], errors
    assert statuses == Counter({0: total}), statuses
    assert len(rows) == total and {v for _, v, _, _ in rows} == {1}
    assert lost == 0
    assert sorted(n for (n,) in per_study) == [PER_ASSOCIATION] * ASSOCIATIONS
    assert jobs == [("RECEIVED", ASSOCIATIONS)]
    assert len(on_disk) == total and intact == total
    assert sorted(by_path.values()) == sorted(sent.values())  # the data sets arrived byte for byte
    assert list((files / ".incoming").iterdir()) == []
    text = log.read_text()
    assert text.count("stored SOP Instance") == total
    assert "LOADTEST" not in text and "LOADMRN" not in text  # no patient names or IDs in the log

