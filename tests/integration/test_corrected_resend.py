"""A study re-sent with the same UIDs but a corrected PatientName and StudyDescription (issue 14, finding 4):
FaceSym re-analyses it and sends a NEW SR (new SOP Instance UID, same series) that names the first one in
its Predecessor Documents Sequence, and keeps ONE patient row. Received by DCMTK's storescp; the SRs pass
dciodvfy. storescp listens on every address: private network namespace only.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from conftest import free_port, phantom_smile_dicom, require_peer, require_private_netns, wait_until

from service.config import Destination, Settings

pytestmark = [pytest.mark.slow, pytest.mark.peers]


def _srs(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name.startswith("SR")]


def test_corrected_resend_gets_a_new_sr_that_supersedes_the_first(tmp_path: Path) -> None:
    storescu, storescp = require_peer("storescu"), require_peer("storescp")
    dciodvfy = require_peer("dciodvfy")
    require_private_netns("DCMTK storescp")
    from service.jobs.scheduler import FaceSymService

    _, first = phantom_smile_dicom(tmp_path, patient_name="DOE^JANE", patient_id="PID-77",
                                   study_description="Facial palsy pre-op")
    corrected_dir = tmp_path / "corrected"
    corrected_dir.mkdir()
    ds = pydicom.dcmread(first)
    ds.PatientName = "DOE^JANET"  # the registration clerk's fix
    ds.StudyDescription = "Facial palsy pre-op (corrected)"
    corrected = corrected_dir / "smile.dcm"
    ds.save_as(corrected, enforce_file_format=True)

    recv = tmp_path / "received"
    recv.mkdir()
    scp_port = free_port()
    env = dict(os.environ, TCP_NODELAY="1")
    scp = subprocess.Popen([storescp, "-aet", "DCMTKDEST", "-od", str(recv), "+xa", str(scp_port)], env=env)
    settings = replace(Settings(), web_port=0, data_dir=tmp_path / "var", dicom_port=free_port(),
                       quiet_seconds=1.0, poll_seconds=0.2, retry_base_seconds=0.5, retry_max_seconds=2.0,
                       destinations=(Destination("DCMTKDEST", "127.0.0.1", scp_port),))
    service = FaceSymService(settings)
    service.start()
    try:
        for path, expected in ((first, 1), (corrected, 2)):
            command = [storescu, "-R", "-xn", "-aec", "FACESYM", "127.0.0.1", str(settings.dicom_port)]
            command.append(str(path))
            run = subprocess.run(command, env=env, capture_output=True, text=True)
            assert run.returncode == 0, run.stderr
            wait_until(lambda n=expected: len(_srs(recv)) >= n, 240, f"SR number {expected} at storescp")
    finally:
        service.stop()
        scp.terminate()
        scp.wait(10)
    old, new = sorted(_srs(recv), key=lambda d: str(d.PatientName))  # DOE^JANE, then DOE^JANET
    assert str(old.PatientName) == "DOE^JANE" and str(new.PatientName) == "DOE^JANET"
    assert new.SOPInstanceUID != old.SOPInstanceUID and new.SeriesInstanceUID == old.SeriesInstanceUID
    assert new.StudyDescription == "Facial palsy pre-op (corrected)"
    (pred,) = new.PredecessorDocumentsSequence
    ref = pred.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == old.SOPInstanceUID
    assert "PredecessorDocumentsSequence" not in old
    # The key images and the PDF are new objects too (the PDF prints the name).
    docs = [p.name for p in recv.iterdir() if p.name.startswith(("SC", "DOC", "PDF"))]
    assert len(docs) == 2 * 4, docs
    for sr_file in [p for p in recv.iterdir() if p.name.startswith("SR")]:
        check = subprocess.run([dciodvfy, str(sr_file)], capture_output=True, text=True)
        assert check.returncode == 0 and "Error" not in check.stderr, check.stderr
    with sqlite3.connect(tmp_path / "var" / "facesym.db") as con:
        assert con.execute("SELECT patient_id, name FROM patient").fetchall() == [("PID-77", "DOE^JANET")]
