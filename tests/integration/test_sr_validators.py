"""The SR of a real phantom study passes the peers: dciodvfy (no errors), DCMTK dsr2xml (parses, numbers).

The study: a phantom DICOM video (smile, the patient's right side weaker) analysed by the real engine,
and a corrupt video of the same study that does not decode (not analysable, with its reason).
"""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from conftest import require_peer

from service import phantom
from service.domain import Analysis, HeadMotion, Quality, Task
from service.engine import ENGINE_VERSION
from service.engine.pipeline import analyze_frames
from service.errors import UnreadableInputError
from service.media.decode import open_media
from service.media.dicom_io import build_video_photographic, write_dicom
from service.report import codes
from service.report.sr import InstanceFinding, build_report, read_report, sr_number

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.peers, pytest.mark.slow]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Two instances of one study → engine → SR on disk."""
    tmp = tmp_path_factory.mktemp("sr-study")
    face = phantom.load_face(REPO / "service/phantom/data/demo_face.jpg")
    spec = phantom.PhantomSpec(motions=(phantom.TaskMotion(Task.SMILE, 0.25, 0.06),), rest_s=0.6, tail_s=0.4)
    clip = tmp / "smile.dcm"
    phantom.write_phantom(face, spec, clip, fmt="dicom")
    video = pydicom.dcmread(clip, stop_before_pixels=True)

    corrupt = build_video_photographic(
        b"\x00\x00\x00\x18ftypmp42 not a video at all",
        width=64,
        height=48,
        n_frames=10,
        fps=25.0,
        study_uid=video.StudyInstanceUID,
        patient_name=str(video.PatientName),
        patient_id=video.PatientID,
    )
    bad_path = write_dicom(corrupt, tmp / "corrupt.dcm")
    bad = pydicom.dcmread(bad_path, stop_before_pixels=True)

    source = open_media(clip)
    analysis = analyze_frames(source.frames(), source.info.fps, Task.SMILE)
    assert analysis.quality.ok, analysis.quality
    try:
        open_media(bad_path)
        pytest.fail("the corrupt video decoded")
    except UnreadableInputError as exc:
        not_analysable = Analysis(Quality(False, (str(exc),), (), 0, 0), ())

    findings = [
        InstanceFinding(video.SOPClassUID, video.SOPInstanceUID, int(video.NumberOfFrames), analysis),
        InstanceFinding(bad.SOPClassUID, bad.SOPInstanceUID, int(bad.NumberOfFrames), not_analysable),
    ]
    sr = build_report([video, bad], findings, engine_version=ENGINE_VERSION)
    path = tmp / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return {
        "path": path,
        "analysis": analysis,
        "reason": not_analysable.quality.reasons[0],
        "uids": (video.SOPInstanceUID, bad.SOPInstanceUID),
        "evidence": [video, bad],
        "findings": findings,
    }


@pytest.fixture(scope="module")
def head_motion_sr(study: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same study's SR with head-motion items in every task group: the engine's smile with a corrected
    head motion (whatever the engine measured), and a brow raise whose head motion was not corrected."""
    video, bad = study["findings"]
    (smile,) = video.analysis.tasks
    head = HeadMotion(roll_deg=3.25, yaw_deg=11.5, pitch_deg=6.75, scale_pct=4.5, shift_d=0.21,
                      residual_d=0.014)
    stuck = replace(head, residual_d=0.09, corrected=False)
    tasks = (replace(smile, head_motion=head), replace(smile, task=Task.BROW_RAISE, head_motion=stuck))
    findings = [replace(video, analysis=replace(video.analysis, tasks=tasks)), bad]
    path = tmp_path_factory.mktemp("sr-head") / "sr.dcm"
    build_report(study["evidence"], findings, engine_version=ENGINE_VERSION).save_as(
        path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("which", ["engine", "head_motion"])
def test_sr_passes_dciodvfy(study: dict, head_motion_sr: Path, which: str) -> None:
    exe = require_peer("dciodvfy")
    path = study["path"] if which == "engine" else head_motion_sr
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    print(out)
    assert proc.returncode == 0, out
    assert "Error" not in out, out
    # The only warnings: our local coding scheme (expected) and DICOMDIR hints inherited from the source.
    for line in out.splitlines():
        if line.startswith("Warning"):
            assert codes.SCHEME in line or "DICOMDIR" in line, line


def _num_items(root: ET.Element) -> list[tuple[str, float, str | None]]:
    """(concept code, value, laterality code or None) of every NUM content item of the dsr2xml output."""
    out = []
    for num in root.iter("num"):
        concept = num.findtext("concept/value")
        value = num.findtext("value")
        laterality = None
        for code in num.iter("code"):
            if code.findtext("concept/value") == "272741003":  # SCT Laterality
                laterality = code.findtext("value")
        assert concept is not None and value is not None
        out.append((concept, float(value), laterality))
    return out


def test_dsr2xml_parses_it_and_holds_the_numbers(study: dict) -> None:
    exe = require_peer("dsr2xml")
    proc = subprocess.run([exe, str(study["path"])], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    root = ET.fromstring(proc.stdout.encode("utf-8"))
    (task,) = study["analysis"].tasks
    nums = _num_items(root)
    by = {(concept, lat): value for concept, value, lat in nums}
    left, right = codes.LATERALITY.values()
    assert by[("FSY-MAG", left.value)] == pytest.approx(sr_number(task.left), abs=1e-12)
    assert by[("FSY-MAG", right.value)] == pytest.approx(sr_number(task.right), abs=1e-12)
    for code, want in (
        (codes.ASYMMETRY_INDEX, task.asymmetry_index),
        (codes.ACTIVATION_GATE, task.activation_gate),
        (codes.ASYMMETRY_SCORE, task.asymmetry_score),
        (codes.COSINE_INDEX, task.cosine_index),
        (codes.COSINE_SCORE, task.cosine_score),
    ):
        assert by[(code.value, None)] == pytest.approx(sr_number(want), abs=1e-12), code.meaning
    if task.head_motion is not None:  # the engine measured the head motion: its numbers are there too
        for code, attr, _ in codes.HEAD_MOTION_MEASUREMENTS:
            want = sr_number(getattr(task.head_motion, attr))
            assert by[(code.value, None)] == pytest.approx(want, abs=1e-12), attr
    # The reason the corrupt video is not analysable is in the document, as text.
    texts = [t.findtext("value") for t in root.iter("text") if t.findtext("concept/value") == "FSY-REASON"]
    assert texts == [study["reason"]]


def test_dsr2html_labels_every_value(study: dict) -> None:
    """DCMTK's renderer names each measurement (containers are SEPARATE, not CONTINUOUS running text)."""
    import html as html_lib
    import re

    exe = require_peer("dsr2html")
    proc = subprocess.run([exe, str(study["path"])], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = html_lib.unescape(re.sub(r"<[^>]+>", " ", proc.stdout))
    text = re.sub(r"\s+", " ", text)
    for code in (codes.ASYMMETRY_INDEX, codes.ASYMMETRY_SCORE, codes.COSINE_SCORE):
        assert re.search(re.escape(code.meaning) + r": [0-9.]+ ", text), code.meaning
    # Per-side values labelled with the patient's side, at most 3 significant digits.
    per_side = r"Movement magnitude: ([0-9.]+) \{D\}[^:]*(?:: [^:]*){0,4}?Laterality = (Left|Right)"
    sides = re.findall(per_side, text)
    assert [side for _, side in sides] == ["Left", "Right"], text[:2000]
    assert all(len(v.lstrip("0.").replace(".", "")) <= 3 for v, _ in sides), sides
    assert re.search(r"Impression: Patient's (left|right) weaker: smile AI [0-9.]+ \(AS [0-9]+\)", text)


def test_dsr2xml_holds_the_head_motion(head_motion_sr: Path) -> None:
    exe = require_peer("dsr2xml")
    proc = subprocess.run([exe, str(head_motion_sr)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    root = ET.fromstring(proc.stdout.encode("utf-8"))
    residuals = [v for concept, v, _ in _num_items(root) if concept == codes.HEAD_MOTION_RESIDUAL.value]
    assert residuals == [pytest.approx(0.014), pytest.approx(0.09)]
    verdicts = [c.findtext("value") for c in root.iter("code")
                if c.findtext("concept/value") == codes.HEAD_MOTION_CORRECTED.value]
    assert verdicts == [codes.YES.value, codes.NO.value]
    (smile, brow) = read_report(pydicom.dcmread(head_motion_sr))[0]["tasks"]
    assert smile["head_motion"]["yaw_deg"] == pytest.approx(11.5)
    assert smile["head_motion"]["corrected"] is True
    assert brow["head_motion"]["residual_d"] == pytest.approx(0.09)
    assert brow["head_motion"]["corrected"] is False


def test_read_report_matches_the_engine(study: dict) -> None:
    got = read_report(pydicom.dcmread(study["path"]))
    assert [g["sop_instance_uid"] for g in got] == list(study["uids"])
    (task,) = study["analysis"].tasks
    (read,) = got[0]["tasks"]
    assert read["task"] == "smile" and read["peak_frames"] == list(task.peak_frames)
    assert read["left"] == pytest.approx(sr_number(task.left), abs=1e-12)
    assert read["right"] == pytest.approx(sr_number(task.right), abs=1e-12)
    assert read["weaker_side"] == "right" == (task.weaker_side.value if task.weaker_side else None)
    assert got[1]["quality_ok"] is False and got[1]["reasons"] == [study["reason"]]
