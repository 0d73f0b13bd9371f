"""Audit end to end: storescu → FaceSym → SR to a DICOM peer and a Bundle to a FHIR server leaves the
expected ordered records; changing one byte of one record makes `facesym audit verify` fail and name it;
the service's logs carry no patient name, ID or birth date."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import free_port, require_peer
from sqlalchemy import select
from test_fhir_delivery import TOKEN, FhirStore, fhir_server

from service.cli import main
from service.config import Destination, Settings
from service.demo import Receiver
from service.domain import Task
from service.store.db import Job, JobState

pytestmark = [pytest.mark.slow, pytest.mark.peers]
ROOT = Path(__file__).resolve().parents[2]
NAME, PATIENT_ID, BIRTH = "DOE^JANE", "MRN-4711", "19800101"
PATIENT_SYSTEM = "urn:oid:1.2.826.0.1.3680043.10.999"


def _exam(tmp: Path) -> tuple[str, Path]:
    from service import phantom
    from service.media.dicom_io import build_video_photographic, write_dicom
    from service.media.encode import encode_mp4

    face = phantom.load_face(ROOT / "service/phantom/data/demo_face.jpg")
    clip = phantom.render(face, phantom.PhantomSpec(motions=(phantom.TaskMotion(Task.SMILE, 0.05, 0.25),)))
    ds = build_video_photographic(encode_mp4(clip.frames(), clip.fps), width=clip.width, height=clip.height,
                                  n_frames=clip.n_frames, fps=clip.fps, series_description="Smile",
                                  patient_name=NAME, patient_id=PATIENT_ID)
    ds.PatientBirthDate = BIRTH
    return str(ds.StudyInstanceUID), write_dicom(ds, tmp / "smile.dcm")


def test_audit_trail_of_a_study(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    storescu = require_peer("storescu")
    from service.jobs.scheduler import FaceSymService

    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    caplog.set_level(logging.DEBUG)
    study_uid, path = _exam(tmp_path)
    ehr = FhirStore()
    ehr.seed({"resourceType": "Patient", "identifier": [{"system": PATIENT_SYSTEM, "value": PATIENT_ID}]})
    ehr.seed({"resourceType": "ImagingStudy", "status": "available",
              "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}]})
    receiver = Receiver(0)
    with fhir_server(ehr) as base_url:
        settings = replace(
            Settings(), web_port=0, data_dir=tmp_path / "var", dicom_port=free_port(), quiet_seconds=1.0,
            poll_seconds=0.2, fhir_base_url=base_url, fhir_token=TOKEN,
            fhir_patient_identifier_system=PATIENT_SYSTEM,
            destinations=(Destination("FACESYM_DEMO", "127.0.0.1", receiver.port),),
        )
        service = FaceSymService(settings)
        service.start()
        try:
            run = subprocess.run([storescu, "-R", "-xn", "-aet", "MODALITY", "-aec", "FACESYM", "127.0.0.1",
                                  str(settings.dicom_port), str(path)],
                                 env=dict(os.environ, TCP_NODELAY="1"), capture_output=True, text=True)
            assert run.returncode == 0, run.stderr
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                with service.sessions() as s:
                    if s.scalars(select(Job.state)).first() is JobState.DELIVERED:
                        break
                time.sleep(0.2)
            else:
                pytest.fail("SR and Bundle not delivered")
        finally:
            service.stop()
            receiver.stop()

    env = {"FACESYM_DATA_DIR": str(settings.data_dir)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    capsys.readouterr()
    assert main(["audit", "export", "--format", "jsonl"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    ids = [r["event_id"] for r in records]
    # start, (settings noted), import of the study, analysis begun/finished, SR out, Bundle out, stop.
    expected = ["110100", "110104", "110103", "110103", "110104", "110106", "110100"]
    it = iter(ids)
    assert all(e in it for e in expected), ids  # in this order (others may sit between)
    received = [r for r in records if r["event_id"] == "110104" and "MODALITY" in r["xml"]]
    assert received and study_uid in received[0]["xml"]
    assert any(r["event_id"] == "110106" and base_url.split("//")[1] in r["xml"] for r in records)
    for r in records:
        assert NAME not in r["xml"] and BIRTH not in r["xml"]  # PatientID only, as PS3.15 requires

    capsys.readouterr()
    assert main(["audit", "verify"]) == 0
    middle = records[len(records) // 2]["seq"]
    db = settings.data_dir / "facesym.db"
    with sqlite3.connect(db) as con:
        (xml,) = con.execute("select xml from audit_record where seq = ?", (middle,)).fetchone()
        con.execute("update audit_record set xml = ? where seq = ?", (xml.replace("<", " <", 1), middle))
    capsys.readouterr()
    assert main(["audit", "verify"]) == 1
    assert f"record {middle}" in capsys.readouterr().out

    logs = caplog.text
    for phi in (NAME, "DOE", PATIENT_ID, BIRTH):
        assert phi not in logs, f"{phi} in the service's logs"
