"""Orthanc (Debian's ``orthanc``) as the PACS: a study uploaded to Orthanc over REST is auto-routed to FaceSym
(Lua ``OnStableStudy``), and FaceSym's SR lands back in that study in Orthanc, once.

Orthanc listens on every address, so this runs only inside a private network namespace (.ci/run).
"""

from __future__ import annotations

import time
from dataclasses import replace
from io import BytesIO
from pathlib import Path

import pytest
from conftest import free_port, require_private_netns
from orthanc_peer import OrthancInstance, OrthancPeer

from service.config import Destination, Settings

pytestmark = [pytest.mark.slow, pytest.mark.peers]
ROOT = Path(__file__).resolve().parents[2]
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
VIDEO_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4.1"


@pytest.fixture(scope="module")
def exam(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Path]:
    """One phantom DICOM video (smile, left weak) in its own study: (study UID, SOP Instance UID, path)."""
    from service import phantom
    from service.domain import Task
    from service.media.dicom_io import build_video_photographic, write_dicom
    from service.media.encode import encode_mp4

    face = phantom.load_face(ROOT / "service/phantom/data/demo_face.jpg")
    clip = phantom.render(face, phantom.PhantomSpec(motions=(phantom.TaskMotion(Task.SMILE, 0.05, 0.25),)))
    ds = build_video_photographic(
        encode_mp4(clip.frames(), clip.fps),
        width=clip.width,
        height=clip.height,
        n_frames=clip.n_frames,
        fps=clip.fps,
        series_description="Smile",
    )
    path = tmp_path_factory.mktemp("exam") / "smile.dcm"
    write_dicom(ds, path)
    return str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), path


def _srs(orthanc: OrthancPeer, study_uid: str) -> list[OrthancInstance]:
    return [i for i in orthanc.study_instances(study_uid) if i.sop_class_uid == COMPREHENSIVE_SR]


def test_orthanc_routes_study_to_facesym_and_gets_the_sr_back(
    exam: tuple[str, str, Path], tmp_path: Path
) -> None:
    require_private_netns("Orthanc")
    import pydicom

    from service.jobs.scheduler import FaceSymService
    from service.report.sr import read_report

    study_uid, video_uid, path = exam
    facesym_port = free_port()
    with OrthancPeer(forward_to=("FACESYM", "127.0.0.1", facesym_port)) as orthanc:
        settings = replace(
            Settings(),
            web_port=0,
            data_dir=tmp_path / "var",
            dicom_port=facesym_port,
            quiet_seconds=1.0,
            poll_seconds=0.2,
            retry_base_seconds=0.5,
            retry_max_seconds=2.0,
            destinations=(Destination(orthanc.aet, "127.0.0.1", orthanc.dicom_port),),
        )
        service = FaceSymService(settings)
        service.start()
        try:
            orthanc.upload(path)
            sent = time.monotonic()
            deadline = time.monotonic() + 180
            while not (srs := _srs(orthanc, study_uid)):
                assert time.monotonic() < deadline, f"no SR in Orthanc after 180 s\n{orthanc.log_tail()}"
                time.sleep(0.5)
            print(f"SR in Orthanc {time.monotonic() - sent:.1f} s after the upload")
            sr = pydicom.dcmread(BytesIO(orthanc.download(srs[0].id)))
            assert str(sr.StudyInstanceUID) == study_uid
            (group,) = read_report(sr)
            assert group["sop_instance_uid"] == video_uid
            assert group["quality_ok"], group.get("reasons")
            assert [t["task"] for t in group["tasks"]] == ["smile"]
            # The SR makes the study change, so Orthanc's OnStableStudy fires again (StableAge 2 s): the Lua
            # must not send the SR (or the video again) to FaceSym, and no second SR may appear.
            time.sleep(orthanc.stable_age + 4)
            instances = orthanc.study_instances(study_uid)
            classes = sorted(i.sop_class_uid for i in instances)
            # The video, one SR, the key images (key image, motion plot, flow overlay) and the PDF report.
            assert classes.count(COMPREHENSIVE_SR) == 1, classes
            assert classes.count(SECONDARY_CAPTURE) == 3, classes
            assert classes.count(ENCAPSULATED_PDF) == 1, classes
            assert classes.count(VIDEO_PHOTOGRAPHIC) == 1, classes
            for i in instances:
                if i.sop_class_uid in (SECONDARY_CAPTURE, ENCAPSULATED_PDF):
                    obj = pydicom.dcmread(BytesIO(orthanc.download(i.id)))
                    assert str(obj.StudyInstanceUID) == study_uid and obj.Manufacturer == "FaceSym"
            log = orthanc.log_tail(1_000_000)
            assert log.count("Lua says: stable study ") >= 2, log  # the upload, then FaceSym's objects
            assert log.count("Lua says: forwarding ") == 1, log  # never FaceSym's own objects
        finally:
            service.stop()
