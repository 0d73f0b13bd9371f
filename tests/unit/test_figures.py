"""Figures, PDF and their DICOM wrappers on a hand-made face (no MediaPipe): sizes, sides, no PHI,
deterministic UIDs."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import require_peer

from service.domain import Analysis, HeadMotion, Quality, RegionSymmetry, Side, StaticItem, Task, TaskResult
from service.errors import InvalidParameterError
from service.media.dicom_io import build_vl_photograph, write_dicom
from service.report import figures as fg
from service.report.jsonout import analysis_dict
from service.report.pdf import STATEMENT, render_pdf
from service.report.secondary import ENCAPSULATED_PDF_STORAGE, build_encapsulated_pdf, build_sc_images
from service.report.study_images import analysis_from_dict

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_face import smile_face, symmetric_face  # noqa: E402

W, H, SCALE = 640, 480, 110.0  # image size, pixels per D


def _to_px(norm: np.ndarray, mirrored: bool = False) -> np.ndarray:
    """Normalised face (x toward the patient's left, y up) → pixels of a frontal, non-mirrored camera:
    the patient's left on the image's right. ``mirrored``: a selfie picture (left on the image's left)."""
    x = W / 2 + (-1 if mirrored else 1) * SCALE * norm[:, 0]
    y = H / 2 - SCALE * norm[:, 1]
    return np.stack([x, y], axis=1)


def _image() -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W]
    grey = (60 + 120 * x / W + 40 * y / H).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def _task(**kw: object) -> TaskResult:
    series = tuple((0.25 * min(1.0, max(0.0, (i - 10) / 8)), 0.0) for i in range(40))
    base: dict[str, object] = dict(
        task=Task.SMILE, frames=(11, 39), rest_frames=(0, 10), peak_frames=(20, 30), left=0.25, right=0.0,
        asymmetry_index=1.0, activation_gate=1.0, asymmetry_score=0.0, cosine_index=0.0, cosine_score=12.5,
        weaker_side=Side.RIGHT, method="pixels", series=series,
        flow=(RegionSymmetry("forehead", 0.1, 0.1, 1.0), RegionSymmetry("eye", 0.2, 0.1, 0.62),
              RegionSymmetry("cheek", 1.1, 0.2, 0.0)),
    )
    base.update(kw)
    return TaskResult(**base)  # type: ignore[arg-type]


def _mask(rgb: np.ndarray, side: Side, tol: int = 12) -> np.ndarray:
    return (np.abs(rgb.astype(int) - np.array(fg.SIDE_RGB[side])).max(axis=2) <= tol)


def _not_blank(rgb: np.ndarray) -> None:
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert float(rgb.std()) > 20 and len(np.unique(rgb.reshape(-1, 3), axis=0)) > 100


def test_key_image_size_and_content() -> None:
    rest = symmetric_face()
    out = fg.key_image(_image(), _to_px(rest), _to_px(smile_face(rest, 0.25, 0.0)), _task())
    assert out.shape == (fg.KEY_IMAGE_SIZE[1], fg.KEY_IMAGE_SIZE[0], 3)
    _not_blank(out)


@pytest.mark.parametrize("moving", [Side.LEFT, Side.RIGHT])
def test_arrows_of_the_moving_side_are_where_that_side_is(moving: Side) -> None:
    """Only the patient's ``moving`` side smiles: its arrows (its colour, absent in the still figure)
    lie on the image's right for the patient's left and on the image's left for the right."""
    rest = symmetric_face()
    amounts = (0.25, 0.0) if moving is Side.LEFT else (0.0, 0.25)
    peak = smile_face(rest, *amounts)
    img = _image()
    moved = fg.key_image(img, _to_px(rest), _to_px(peak), _task())
    still = fg.key_image(img, _to_px(rest), _to_px(rest), _task())
    arrows = _mask(moved, moving) & ~_mask(still, moving)
    cols = np.flatnonzero(arrows.any(axis=0))
    assert arrows.sum() > 40
    half = moved.shape[1] / 2
    if moving is Side.LEFT:
        assert cols.min() > half
    else:
        assert cols.max() < half
    other = Side.RIGHT if moving is Side.LEFT else Side.LEFT
    assert not (_mask(moved, other) & ~_mask(still, other)).any()  # the still side has no arrow


def test_side_labels_follow_the_landmarks() -> None:
    """Every pixel in the patient's-left colour (landmarks, "L") is on the image's right for a frontal
    camera, and on its left for a mirrored picture: sides come from the landmarks, never assumed."""
    rest = symmetric_face()
    img = _image()
    for mirrored in (False, True):
        out = fg.key_image(img, _to_px(rest, mirrored), _to_px(rest, mirrored), _task())
        face = out[: int(0.8 * out.shape[0])]  # above the caption
        cols_left = np.flatnonzero(_mask(face, Side.LEFT).any(axis=0))
        cols_right = np.flatnonzero(_mask(face, Side.RIGHT).any(axis=0))
        half = out.shape[1] / 2
        if mirrored:
            assert cols_left.max() < half < cols_right.min()
        else:
            assert cols_right.max() < half < cols_left.min()


def test_motion_plot() -> None:
    plain = fg.motion_plot(_task(), 30.0, (0.02, 0.08))
    with_attention = fg.motion_plot(_task(), 30.0, (0.02, 0.08), attention=list(np.hanning(96)))
    for out in (plain, with_attention):
        assert out.shape == (fg.MOTION_PLOT_SIZE[1], fg.MOTION_PLOT_SIZE[0], 3)
        _not_blank(out)
    assert _mask(plain, Side.LEFT).sum() > 200 and _mask(plain, Side.RIGHT).sum() > 200
    assert not np.array_equal(plain, with_attention)
    with pytest.raises(InvalidParameterError):
        fg.motion_plot(_task(series=()), 30.0, (0.02, 0.08))


def test_flow_overlay() -> None:
    rest = _to_px(symmetric_face())
    out = fg.flow_overlay(_image(), rest, _task())
    assert out.shape == (fg.FLOW_OVERLAY_SIZE[1], fg.FLOW_OVERLAY_SIZE[0], 3)
    _not_blank(out)
    with pytest.raises(InvalidParameterError):
        fg.flow_overlay(_image(), rest, _task(flow=()))


def test_png_bytes() -> None:
    assert fg.png_bytes(np.zeros((4, 5, 3), np.uint8)).startswith(b"\x89PNG")


# ------------------------------------------------------------------------------------------ PDF
HEAD = HeadMotion(roll_deg=4.2, yaw_deg=7.65, pitch_deg=2.3, scale_pct=3.2, shift_d=0.1234, residual_d=0.0123)


def _findings() -> list[tuple[str, Analysis]]:
    ok = Analysis(Quality(True, (), ("face lost in 2 frames",), 38, 40),
                  (_task(notes=("pixel tracking lost 3 % of points",), head_motion=HEAD),
                   _task(task=Task.BROW_RAISE, flow=(), series=(),
                         head_motion=replace(HEAD, residual_d=0.0912, corrected=False)),
                   _task(task=Task.EYE_CLOSURE, flow=(), series=())))  # no head motion: an old result
    bad = Analysis(Quality(False, ("no face found in 30 of 30 frames",), (), 0, 30), ())
    rest = Analysis(Quality(True, (), (), 1, 1), (), (StaticItem("brow_height", 0.31, 0.27),))
    return [("Series 1 #1 smile", ok), ("Series 2 #1", bad), ("Series 3 #1 rest", rest)]


def _pdf() -> bytes:
    rest = symmetric_face()
    figs = [fg.key_image(_image(), _to_px(rest), _to_px(smile_face(rest, 0.25, 0.0)), _task()),
            fg.motion_plot(_task(), 30.0, (0.02, 0.08))]
    return render_pdf(_findings(), {("Series 1 #1 smile", Task.SMILE): figs},
                      study_description="Facial palsy pre-op", study_date="20240131",
                      engine_version="engine-9", model_versions=("grader 0.3 (synthetic)",))


def test_pdf_is_deterministic_a4() -> None:
    pdf = _pdf()
    assert pdf.startswith(b"%PDF") and pdf == _pdf()
    assert b"/MediaBox [ 0 0 595.44 841.68 ]" in pdf or b"/MediaBox [0 0 595.44 841.68]" in pdf


@pytest.mark.peers
def test_pdf_text(tmp_path: Path) -> None:
    exe = require_peer("pdftotext")
    path = tmp_path / "r.pdf"
    path.write_bytes(_pdf())
    text = subprocess.run([exe, "-layout", str(path), "-"], capture_output=True, text=True, check=True).stdout
    for expected in (STATEMENT, "Asymmetry Score", "0.0", "12.5", "2024-01-31", "engine-9",
                     "grader 0.3 (synthetic)", "NOT ANALYSABLE", "no face found in 30 of 30 frames",
                     "face lost in 2 frames", "pixel tracking lost 3 % of points", "brow height", "Figures"):
        assert expected in text, expected
    assert "1.00/0.62/0.00" in text  # flow SS per region
    # head motion per task (a quality figure), and a warning where it could not be removed
    flat = " ".join(text.split())
    assert ("Smile — Head motion: roll 4.2°, yaw 7.7°, pitch 2.3°, scale 3.2 %, shift 0.123 D; "
            "residual 0.012 D") in flat
    assert "Brow raise — Head motion: roll 4.2°" in flat and "residual 0.091 D (NOT corrected)" in flat
    assert "WARNING — Series 1 #1 smile, Brow raise: head motion NOT corrected (residual 0.091 D" in flat
    assert flat.count("Head motion: roll") == 2  # eye closure has none
    pages = subprocess.run([exe, str(path), "-"], capture_output=True, text=True, check=True).stdout
    assert pages.count("\f") == 2  # the summary, then a page of figures per task that has them
    assert "Series 1 #1 smile (AS 0.0" in flat and "smile: Smile" not in flat  # the task named once


@pytest.mark.peers
def test_pdf_gives_each_task_its_own_page_of_figures(tmp_path: Path) -> None:
    exe = require_peer("pdftotext")
    rest = symmetric_face()
    key = fg.key_image(_image(), _to_px(rest), _to_px(smile_face(rest, 0.25, 0.0)), _task())
    label, analysis = _findings()[0]
    figs = {(label, t.task): [key, fg.motion_plot(_task(), 30.0, (0.02, 0.08))] for t in analysis.tasks}
    path = tmp_path / "r.pdf"
    path.write_bytes(render_pdf([(label, analysis)], figs, study_description="x", study_date="20240131",
                                engine_version="engine-9"))
    text = subprocess.run([exe, str(path), "-"], capture_output=True, text=True, check=True).stdout
    pages = [" ".join(p.split()) for p in text.split("\f") if p.strip()]
    assert len(analysis.tasks) >= 2 and len(pages) == 1 + len(analysis.tasks)
    for page, task in zip(pages[1:], analysis.tasks, strict=True):  # one task per page, named once
        title = fg.TASK_TITLE[task.task]
        heading = label if task.task is Task.SMILE else f"{label}: {title}"
        assert f"{heading} (AS {task.asymmetry_score:.1f}" in page, page


# ----------------------------------------------------------------------------------- DICOM objects
def _evidence(tmp_path: Path) -> pydicom.Dataset:
    ds = build_vl_photograph(np.zeros((8, 8, 3), np.uint8), patient_name="DOE^JANE", patient_id="PID-1",
                             study_description="Facial palsy pre-op")
    ds.IssuerOfPatientID = "HOSP"
    return pydicom.dcmread(write_dicom(ds, tmp_path / "src.dcm"), stop_before_pixels=True)


def test_secondary_objects(tmp_path: Path) -> None:
    ev = _evidence(tmp_path)
    figs = [np.full((40, 50, 3), 200, np.uint8), np.full((30, 20, 3), 50, np.uint8)]
    uids = [str(ev.SOPInstanceUID)]
    sc = build_sc_images(figs, ev, engine_version="e1", source_sop_uids=uids)
    again = build_sc_images(figs, ev, engine_version="e1", source_sop_uids=uids)
    other = build_sc_images(figs, ev, engine_version="e2", source_sop_uids=uids)
    assert [d.SOPInstanceUID for d in sc] == [d.SOPInstanceUID for d in again]
    assert len({d.SOPInstanceUID for d in sc + other}) == 4
    assert len({d.SeriesInstanceUID for d in sc}) == 1
    for k, d in enumerate(sc):
        assert d.StudyInstanceUID == ev.StudyInstanceUID
        assert (d.PatientID, str(d.PatientName)) == ("PID-1", "DOE^JANE")
        assert d.IssuerOfPatientID == "HOSP" and d.StudyDescription == "Facial palsy pre-op"
        assert d.SeriesNumber == 9002 and d.InstanceNumber == k + 1
        assert d.PhotometricInterpretation == "RGB" and d.BurnedInAnnotation == "YES"
        assert np.array_equal(d.pixel_array, figs[k])
    doc = build_encapsulated_pdf(b"%PDF-1.4 x", ev, engine_version="e1", source_sop_uids=uids)
    assert doc.SOPClassUID == ENCAPSULATED_PDF_STORAGE
    assert doc.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert doc.SOPInstanceUID == build_encapsulated_pdf(b"%PDF-1.4 y", ev, engine_version="e1",
                                                        source_sop_uids=uids).SOPInstanceUID
    assert doc.SeriesInstanceUID != sc[0].SeriesInstanceUID and doc.StudyInstanceUID == ev.StudyInstanceUID
    assert bytes(doc.EncapsulatedDocument)[: doc.EncapsulatedDocumentLength] == b"%PDF-1.4 x"
    with pytest.raises(InvalidParameterError):
        build_encapsulated_pdf(b"not a pdf", ev, engine_version="e1", source_sop_uids=uids)
    for ds in [*sc, doc]:
        write_dicom(ds, tmp_path / f"{ds.SOPInstanceUID}.dcm")


def test_analysis_round_trips_through_the_stored_json() -> None:
    from service.domain import MediaInfo

    analysis = _findings()[0][1]
    doc = analysis_dict(analysis, MediaInfo("x", "video", 1, 1, 30.0, 40, "dicom"), 40)
    back = analysis_from_dict(doc)
    t, b = analysis.tasks[0], back.tasks[0]
    assert (b.task, b.rest_frames, b.peak_frames, b.weaker_side, b.flow) == (
        t.task, t.rest_frames, t.peak_frames, t.weaker_side, t.flow)
    assert b.asymmetry_score == pytest.approx(t.asymmetry_score)
    # The stored JSON keeps the per-frame signal (5 decimals), so the offline PDF has its motion plot.
    assert np.allclose(np.asarray(b.series), np.asarray(t.series), atol=1e-5, equal_nan=True)
    assert back.quality.warnings == analysis.quality.warnings
    # The gate's thresholds travel with the result (older stored results have none: None).
    with_gates = replace(analysis, tasks=(replace(t, gate_thresholds=(0.03, 0.2)),))
    doc = analysis_dict(with_gates, MediaInfo("x", "video", 1, 1, 30.0, 40, "dicom"), 40)
    assert doc["tasks"][0]["gate_thresholds"] == [0.03, 0.2]
    assert analysis_from_dict(doc).tasks[0].gate_thresholds == (0.03, 0.2)
    assert b.gate_thresholds is None and "gate_thresholds" not in analysis_dict(
        analysis, MediaInfo("x", "video", 1, 1, 30.0, 40, "dicom"), 40)["tasks"][0]
    # The head motion travels too (rounded as HeadMotion.to_json); a task without it has no key and reads
    # back None (results stored before head-motion compensation existed).
    doc = analysis_dict(analysis, MediaInfo("x", "video", 1, 1, 30.0, 40, "dicom"), 40)
    docs = [task.get("head_motion") for task in doc["tasks"]]
    assert docs == [HEAD.to_json(), replace(HEAD, residual_d=0.0912, corrected=False).to_json(), None]
    assert [t.head_motion for t in analysis_from_dict(doc).tasks] == [
        HeadMotion.from_json(HEAD.to_json()), replace(HEAD, residual_d=0.0912, corrected=False), None]
    assert "head_motion" not in doc["tasks"][2]
