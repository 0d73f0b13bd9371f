"""Named broken videos: each gives a clear outcome (not analysable with the reason, or an analysis with a
note) through `facesym analyze` and through the SCP -> worker path (read back from the SR the PACS receives).

| clip | outcome |
|---|---|
| truncated mid-GOP (phantom, left weak; MP4 cut at 75 %) | analysed (left weak), warning "...truncated..." |
| no face (../shared/data/faces/no_face.mp4) | not analysable: no face |
| two faces (the real clip beside its mirror image) | not analysable: more than one face |
| face lost (face_noface.mov, HEVC) | not analysable: face lost for part of the clip |
| rotated 90° (phantom pixels turned, nothing in the file says so) | not analysable: head roll |
| mirrored (phantom, left weak, flipped) | analysed: reads RIGHT weak; with --mirrored: left |

The mirrored clip is pinned on purpose: nothing in a file says it is mirrored, so a selfie-camera clip of a
left-weak face reads right-weak unless the operator says ``--mirrored`` (a setting, never a guess).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]
ROOT = Path(__file__).resolve().parents[2]
HEVC_MAIN = "1.2.840.10008.1.2.4.107"


@dataclass(frozen=True)
class Broken:
    path: Path
    ok: bool
    reason: str = ""  # start of the expected reason (not analysable)
    warning: str = ""  # part of the expected warning (analysed)
    weaker: str | None = None  # expected weaker side (analysed)


def _encode(frames: list[np.ndarray], path: Path, fps: int = 30) -> Path:
    """H.264 MP4 with its index in front (faststart) and a GOP of 10: cut anywhere, it still demuxes."""
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = 10
        stream.options = {"crf": "18", "preset": "veryfast", "bf": "0"}
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory, faces_dir: Path) -> dict[str, Broken]:
    from service import phantom
    from service.domain import Task

    out = tmp_path_factory.mktemp("broken")
    face = phantom.load_face(ROOT / "service/phantom/data/demo_face.jpg", target_eye_distance=60,
                             frame_size=(240, 240))
    clip = phantom.render(face, phantom.PhantomSpec(motions=(phantom.TaskMotion(Task.SMILE, 0.05, 0.25),),
                                                    rest_s=0.5, ramp_s=0.3, hold_s=0.5, tail_s=1.2))
    frames = list(clip.frames())
    whole = _encode(frames, out / "phantom.mp4").read_bytes()
    mdat = whole.find(b"mdat")
    cut = out / "truncated.mp4"
    cut.write_bytes(whole[: mdat + int(0.75 * (len(whole) - mdat))])  # mid-GOP, long after the smile
    with av.open(str(faces_dir / "single_face.mp4")) as container:
        real = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return {
        "truncated mid-GOP": Broken(cut, True, warning="truncated", weaker="left"),
        "no face": Broken(faces_dir / "no_face.mp4", False, reason="no face"),
        "two faces": Broken(_encode([np.hstack([f, f[:, ::-1]]) for f in real], out / "two_faces.mp4"), False,
                            reason="more than one face"),
        "face lost": Broken(faces_dir / "face_noface.mov", False, reason="face lost for part of the clip"),
        "rotated 90°": Broken(_encode([np.rot90(f) for f in frames], out / "rot90.mp4"), False,
                              reason="head roll"),
        "mirrored": Broken(_encode([f[:, ::-1] for f in frames], out / "mirrored.mp4"), True, weaker="right"),
    }


def _check(name: str, want: Broken, quality: dict[str, Any], tasks: list[dict[str, Any]]) -> None:
    assert quality["ok"] is want.ok, f"{name}: {quality}"
    if not want.ok:
        assert any(r.startswith(want.reason) for r in quality["reasons"]), f"{name}: {quality['reasons']}"
        assert not tasks, f"{name}: a clip that fails QC is never scored"
        return
    assert tasks and tasks[0]["weaker_side"] == want.weaker, f"{name}: {tasks}"
    if want.warning:
        assert any(want.warning in w for w in quality["warnings"]), f"{name}: {quality['warnings']}"


NAMES = ["truncated mid-GOP", "no face", "two faces", "face lost", "rotated 90°", "mirrored"]


@pytest.mark.parametrize("name", NAMES)
def test_broken_video_through_facesym_analyze(name: str, clips: dict[str, Broken], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main

    want = clips[name]
    out = tmp_path / "result.json"
    code = main(["analyze", str(want.path), "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == (0 if want.ok else 3), printed
    doc = json.loads(out.read_text())
    _check(name, want, doc["quality"], doc["tasks"])
    if want.ok:
        assert "not analysable" not in printed and doc["tasks"][0]["weaker_side"] in printed
        assert ("warning:" in printed) == bool(doc["quality"]["warnings"]), printed
    else:
        assert "not analysable:" in printed and want.reason in printed


def test_mirrored_clip_reads_left_again_with_the_mirrored_setting(clips: dict[str, Broken], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main

    out = tmp_path / "result.json"
    assert main(["analyze", str(clips["mirrored"].path), "--mirrored", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["tasks"][0]["weaker_side"] == "left"


def _as_dicom(path: Path, out: Path, study_uid: str, description: str) -> Path:
    """The clip's file as the one fragment of a Video Photographic object (H.264 .102, HEVC .107)."""
    from pydicom.uid import UID

    from service.media.decode import open_media
    from service.media.dicom_io import build_video_photographic, write_dicom

    info = open_media(path).info
    ds = build_video_photographic(path.read_bytes(), width=info.width, height=info.height,
                                  n_frames=info.frames or 1, fps=info.fps or 30.0, study_uid=study_uid,
                                  series_description=description)
    if "hevc" in info.source:
        ds.file_meta.TransferSyntaxUID = UID(HEVC_MAIN)
    return write_dicom(ds, out)


def test_broken_videos_through_scp_and_worker(clips: dict[str, Broken], tmp_path: Path,
                                              figures) -> None:  # type: ignore[no-untyped-def]
    from pydicom import dcmread
    from pydicom.uid import generate_uid
    from sqlalchemy import select

    from service.config import Settings
    from service.demo import send
    from service.jobs.scheduler import FaceSymService
    from service.report.sr import read_report
    from service.store.db import Job, JobState, Study

    settings = replace(Settings(), web_port=0, data_dir=tmp_path / "var", dicom_port=free_port(),
                       quiet_seconds=0.5, poll_seconds=0.2, max_attempts=1, min_free_disk_mb=1)
    studies = {name: generate_uid() for name in NAMES}
    files = [_as_dicom(clips[name].path, tmp_path / f"{k}.dcm", studies[name], "Smile")
             for k, name in enumerate(NAMES)]
    service = FaceSymService(settings)
    service.start()
    try:
        send(files, "127.0.0.1", settings.dicom_port, settings.ae_title)
        deadline = time.monotonic() + 240
        while True:
            with service.sessions() as s:
                rows = s.execute(select(Study.study_uid, Job.state, Job.sr_path, Job.reason)
                                 .join(Job, Job.study_pk == Study.id)).all()
            done = {uid: (state, sr, reason) for uid, state, sr, reason in rows
                    if state in (JobState.REPORTED, JobState.DELIVERED, JobState.FAILED)}
            if len(done) == len(NAMES) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
    finally:
        service.stop()
    outcomes = {}
    for name in NAMES:
        assert studies[name] in done, f"{name}: no finished job"
        state, sr_path, reason = done[studies[name]]
        assert state is JobState.REPORTED, f"{name}: job {state.value} {reason}"
        (group,) = read_report(dcmread(settings.files_dir / sr_path))  # what the PACS receives
        quality = {"ok": group["quality_ok"], "reasons": group["reasons"], "warnings": group["warnings"]}
        _check(name, clips[name], quality, group["tasks"])
        outcomes[name] = "analysed" if group["quality_ok"] else "not analysable"
    figures.record("broken videos", "clear outcomes via SCP -> worker -> SR",
                   ", ".join(f"{name}: {outcome}" for name, outcome in outcomes.items()))
