"""Before/after: a patient with a pre-op study (strong one-sided weakness) and a post-op study (milder) gets
a comparison in the post-op PDF report showing the improvement."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import free_port, require_peer

from service.config import Destination, Settings
from service.demo import Receiver, send
from service.domain import Task

pytestmark = [pytest.mark.slow, pytest.mark.peers]
ROOT = Path(__file__).resolve().parents[2]
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"


def _study(tmp: Path, name: str, left: float, date: str) -> tuple[str, Path]:
    from service import phantom
    from service.media.dicom_io import build_video_photographic, write_dicom
    from service.media.encode import encode_mp4

    face = phantom.load_face(ROOT / "service/phantom/data/demo_face.jpg")
    clip = phantom.render(face, phantom.PhantomSpec(motions=(phantom.TaskMotion(Task.SMILE, left, 0.25),)))
    ds = build_video_photographic(encode_mp4(clip.frames(), clip.fps), width=clip.width, height=clip.height,
                                  n_frames=clip.n_frames, fps=clip.fps, series_description="Smile",
                                  study_description=name, patient_id="PALSY-7", patient_name="PHANTOM^PAULA")
    ds.StudyDate = date
    return str(ds.StudyInstanceUID), write_dicom(ds, tmp / f"{name}.dcm")


def test_post_op_report_compares_with_pre_op(tmp_path: Path) -> None:
    pdftotext = require_peer("pdftotext")
    from service.jobs.scheduler import FaceSymService
    from service.report.sr import read_impression

    pre_uid, pre = _study(tmp_path, "pre-op", 0.03, "20240108")
    post_uid, post = _study(tmp_path, "post-op", 0.2, "20240312")
    receiver = Receiver(0)
    settings = replace(Settings(), web_port=0, data_dir=tmp_path / "var", dicom_port=free_port(),
                       quiet_seconds=1.0, poll_seconds=0.2,
                       destinations=(Destination("FACESYM_DEMO", "127.0.0.1", receiver.port),))
    service = FaceSymService(settings)
    service.start()
    try:
        send([pre], "127.0.0.1", settings.dicom_port, "FACESYM")
        pre_sr = receiver.wait_for(pre_uid, 180)
        assert pre_sr is not None
        send([post], "127.0.0.1", settings.dicom_port, "FACESYM")
        post_sr = receiver.wait_for(post_uid, 180)
        assert post_sr is not None
    finally:
        service.stop()
        receiver.stop()
    (pdf,) = [ds for ds in receiver.received
              if ds.SOPClassUID == ENCAPSULATED_PDF and ds.StudyInstanceUID == post_uid]
    path = tmp_path / "post.pdf"
    path.write_bytes(bytes(pdf.EncapsulatedDocument)[: int(pdf.EncapsulatedDocumentLength)])
    text = subprocess.run([pdftotext, str(path), "-"], capture_output=True, text=True, check=True).stdout
    # The post-op SR references the pre-op SR (Pertinent Other Evidence) and stays valid.
    (ref,) = post_sr.PertinentOtherEvidenceSequence
    assert ref.StudyInstanceUID == pre_uid
    sop = ref.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert sop.ReferencedSOPInstanceUID == pre_sr.SOPInstanceUID
    sr_path = tmp_path / "post-sr.dcm"
    post_sr.save_as(sr_path, enforce_file_format=True)
    check = subprocess.run([require_peer("dciodvfy"), str(sr_path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    # The SR's Impression says it too, in the words of the FHIR conclusion.
    impression = read_impression(post_sr) or ""
    assert "Compared with 2024-01-08 pre-op: smile AS" in impression and "(+" in impression, impression
    assert "Compared with" not in (read_impression(pre_sr) or "")
    assert "Comparison with earlier studies" in text
    line = next(ln for ln in text.splitlines() if "pre-op" in ln)
    assert "2024-01-08" in line and "smile AS" in line and "(+" in line, line  # improved since pre-op
