"""The figures and the PDF report as DICOM objects of the study: a phantom DICOM video (smile, the
patient's right weak) is analysed, the SC images and Encapsulated PDF are built from it, and each object
must pass dciodvfy, keep its UIDs on a rebuild, and the PDF must render and hold the scores' text."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import require_peer
from PIL import Image

from service.domain import Analysis, Side, Task
from service.engine.pipeline import analyze_frames
from service.media.decode import open_media
from service.media.dicom_io import build_video_photographic, write_dicom
from service.media.encode import encode_mp4
from service.phantom import PhantomSpec, TaskMotion, load_face, render
from service.report.secondary import ENCAPSULATED_PDF_STORAGE, KEY_IMAGES_DESCRIPTION
from service.report.study_images import WrittenObjects, build_report_objects, render_pdf_for_study

pytestmark = [pytest.mark.slow, pytest.mark.peers]

REPO = Path(__file__).resolve().parents[2]
ENGINE = "test-engine-1"
PATIENT_NAME, PATIENT_ID = "DOE^JANE", "PID-55501"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Analysis, float]:
    face = load_face(REPO / "service/phantom/data/demo_face.jpg")
    ph = render(face, PhantomSpec(motions=(TaskMotion(Task.SMILE, 0.25, 0.05),)))
    mp4 = encode_mp4(ph.frames(), ph.fps)
    ds = build_video_photographic(
        mp4, width=ph.width, height=ph.height, n_frames=ph.n_frames, fps=ph.fps,
        patient_name=PATIENT_NAME, patient_id=PATIENT_ID, series_description="Facial palsy smile",
        study_description="Facial palsy pre-op",
    )
    path = write_dicom(ds, tmp_path_factory.mktemp("src") / "video.dcm")
    analysis = analyze_frames(open_media(path).frames(), ph.fps)
    assert analysis.quality.ok and analysis.tasks, analysis.quality
    return path, analysis, ph.fps


@pytest.fixture(scope="module")
def written(study: tuple[Path, Analysis, float], tmp_path_factory: pytest.TempPathFactory) -> WrittenObjects:
    path, analysis, fps = study
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    return build_report_objects(
        [path], [(uid, analysis, fps)], engine_version=ENGINE, out_dir=tmp_path_factory.mktemp("out"),
    )


@pytest.fixture(scope="module")
def objects(written: WrittenObjects) -> list[Path]:
    return written.paths


def _pdf(objects: list[Path], tmp_path: Path) -> Path:
    docs = [pydicom.dcmread(p) for p in objects if pydicom.dcmread(p).SOPClassUID == ENCAPSULATED_PDF_STORAGE]
    assert len(docs) == 1
    ds = docs[0]
    out = tmp_path / "report.pdf"
    out.write_bytes(bytes(ds.EncapsulatedDocument)[: int(ds.EncapsulatedDocumentLength)])
    return out


def test_objects_pass_dciodvfy(objects: list[Path]) -> None:
    exe = require_peer("dciodvfy")
    classes = sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in objects)
    # Smile with flow: key image, flow overlay, motion plot; then the PDF.
    assert classes == [ENCAPSULATED_PDF_STORAGE] + [SC_STORAGE] * 3
    for p in objects:
        proc = subprocess.run([exe, str(p)], capture_output=True, text=True, timeout=60)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
        assert proc.returncode == 0 and not errors, proc.stderr


def test_objects_are_in_the_study_with_their_own_series(
    study: tuple[Path, Analysis, float], objects: list[Path]
) -> None:
    src = pydicom.dcmread(study[0], stop_before_pixels=True)
    series = set()
    for p in objects:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        assert ds.StudyInstanceUID == src.StudyInstanceUID
        assert (ds.PatientID, str(ds.PatientName)) == (PATIENT_ID, PATIENT_NAME)
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID
        if ds.SOPClassUID == SC_STORAGE:
            assert ds.SeriesDescription == KEY_IMAGES_DESCRIPTION
            assert ds.BurnedInAnnotation == "YES"
            assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        series.add(str(ds.SeriesInstanceUID))
    assert len(series) == 2  # key images, PDF


def test_uids_are_the_same_on_a_resend(
    study: tuple[Path, Analysis, float], objects: list[Path], tmp_path: Path
) -> None:
    path, analysis, fps = study
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    again = build_report_objects(
        [path], [(uid, analysis, fps)], engine_version=ENGINE, out_dir=tmp_path
    ).paths

    def uids(paths: list[Path]) -> list[tuple[str, str]]:
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
        return sorted((str(d.SeriesInstanceUID), str(d.SOPInstanceUID)) for d in headers)

    assert uids(again) == uids(objects)
    assert sorted(p.name for p in again) == sorted(p.name for p in objects)


def test_pdf_renders_and_holds_the_scores(
    study: tuple[Path, Analysis, float], objects: list[Path], tmp_path: Path
) -> None:
    pdftoppm, pdftotext = require_peer("pdftoppm"), require_peer("pdftotext")
    pdf = _pdf(objects, tmp_path)
    subprocess.run([pdftoppm, "-png", "-r", "50", "-f", "1", "-l", "1", str(pdf), str(tmp_path / "page")],
                   check=True, timeout=60)
    (png,) = tmp_path.glob("page*.png")
    page = np.asarray(Image.open(png).convert("L"))
    assert page.shape[0] > 500 and (page < 128).mean() > 0.01  # text on a white page
    text = subprocess.run([pdftotext, "-layout", str(pdf), "-"], capture_output=True, text=True,
                          check=True, timeout=60).stdout
    task = study[1].tasks[0]
    assert "Asymmetry" in text
    assert re.search(rf"Smile\s+{task.asymmetry_score:.1f}\s+{task.cosine_score:.1f}", text), text
    assert "Research use only" in text and "synthetic data" in text
    # A clinical report identifies its patient (it goes back into the patient's own study) and leads
    # with the finding.
    assert re.search(r"Patient: DOE JANE\s+ID: PID-55501", text), text
    assert re.search(r"Finding: Patient's right weaker: smile AI [0-9.]+ \(AS [0-9]+\)", text), text
    assert text.index("Finding:") < text.index("Asymmetry")
    assert task.weaker_side is Side.RIGHT


def test_cli_pdf_is_the_sent_pdf(
    study: tuple[Path, Analysis, float], objects: list[Path], tmp_path: Path
) -> None:
    path, analysis, fps = study
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    out = tmp_path / "cli.pdf"
    pdf = render_pdf_for_study([path], [(uid, analysis, fps)], engine_version=ENGINE, pdf_path=out)
    assert out.read_bytes() == pdf == _pdf(objects, tmp_path).read_bytes()


def test_sr_draws_the_landmark_groups_on_the_key_image(
    study: tuple[Path, Analysis, float], written: WrittenObjects, tmp_path: Path
) -> None:
    """Per task and side, TID 1410 groups whose POLYLINEs reference the key image and lie where the key
    image drew the landmarks: every peak point sits on a dot of that side's colour; dciodvfy passes."""
    from service.report.figures import SIDE_RGB
    from service.report.sr import InstanceFinding, read_report
    from service.report.sr_io import write_report
    from service.report.sr_regions import read_regions

    path, analysis, _ = study
    src = pydicom.dcmread(path, stop_before_pixels=True)
    finding = InstanceFinding(
        str(src.SOPClassUID), str(src.SOPInstanceUID), int(src.NumberOfFrames), analysis
    )
    assert [r.task for r in written.regions] == [t.task for t in analysis.tasks]
    sr_path, _ = write_report([path], [finding], tmp_path, ENGINE, key_images=written.regions)
    ds = pydicom.dcmread(sr_path)
    regions = read_regions(ds)
    assert len(regions) == 6 * len(analysis.tasks)
    key = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in written.paths
           if pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID == SC_STORAGE}
    task = analysis.tasks[0]
    for r in regions:
        assert r["graphic_type"] == "POLYLINE" and r["image_uid"] in key and r["side"] in ("left", "right")
        assert len({g["tracking_uid"] for g in regions}) == len(regions)
        image = key[r["image_uid"]].pixel_array
        pts = r["points"]
        assert (pts >= 0).all() and (pts <= [image.shape[1], image.shape[0]]).all()
        if r["label"].endswith("peak"):
            assert r["values"]["Movement magnitude"] == pytest.approx(getattr(task, r["side"]), rel=1e-2)
            colour = np.array(SIDE_RGB[Side(r["side"])])
            for x, y in pts:
                patch = image[int(y) - 2 : int(y) + 3, int(x) - 2 : int(x) + 3].reshape(-1, 3).astype(int)
                assert np.abs(patch - colour).sum(axis=1).min() < 60, (r["label"], x, y)
    # The numbers are unchanged for readers of the TID 1501 groups; the key image is in the evidence.
    assert read_report(ds)[0]["tasks"][0]["asymmetry_index"] == pytest.approx(task.asymmetry_index, abs=1e-3)
    evidence = {str(s.ReferencedSOPInstanceUID) for st in ds.CurrentRequestedProcedureEvidenceSequence
                for se in st.ReferencedSeriesSequence for s in se.ReferencedSOPSequence}
    assert set(key) & evidence
    exe = require_peer("dciodvfy")
    proc = subprocess.run([exe, str(sr_path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert proc.returncode == 0 and not errors, proc.stderr
