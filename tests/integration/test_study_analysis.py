"""jobs.analysis.analyse_study on real DICOM objects: rules pick the task, photos pair, bad input is a
finding with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from service import phantom
from service.config import DEFAULT_TASK_RULES
from service.domain import Task
from service.jobs.analysis import InstanceInput, analyse_study
from service.jobs.rules import assign_task
from service.media.dicom_io import build_vl_photograph, write_dicom

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _input(path: Path, uid: str, hint: str | None, order: int) -> InstanceInput:
    return InstanceInput(uid, "1.2.840.10008.5.1.4.1.1.77.1.4", path, hint, None, order)


@pytest.mark.parametrize(("text", "task"), [
    ("Smile", "smile"), ("EYE CLOSURE gentle", "eye_closure"), ("blink", "eye_closure"),
    ("Brow raise", "brow_raise"), ("forehead wrinkle", "brow_raise"), ("Rest", "rest"),
    ("neutral face", "rest"),
    ("Whistle", None), ("", None),
])
def test_default_rules(text: str, task: str | None) -> None:
    assert assign_task([text], DEFAULT_TASK_RULES) == task


def test_rest_and_expression_photos_pair_and_score(tmp_path: Path) -> None:
    face = phantom.load_face(ROOT / "service/phantom/data/demo_face.jpg")
    rest, smile, truth = phantom.render_photo_pair(face, phantom.TaskMotion(Task.SMILE, 0.25, 0.05))
    paths = []
    for name, rgb in (("rest", rest), ("smile", smile)):
        ds = build_vl_photograph(rgb, series_description=name.title())
        paths.append((write_dicom(ds, tmp_path / f"{name}.dcm"), str(ds.SOPInstanceUID)))
    inputs = [
        _input(p, uid, assign_task([p.stem], DEFAULT_TASK_RULES), k) for k, (p, uid) in enumerate(paths)
    ]
    rest_result, smile_result = analyse_study(inputs)
    assert rest_result.analysis.tasks == () and rest_result.analysis.static  # rest photo: static items
    (task,) = smile_result.analysis.tasks
    assert task.task is Task.SMILE and task.weaker_side is not None and task.weaker_side.value == "right"
    assert abs(task.asymmetry_index - truth["expected_asymmetry_index"]) <= 0.1


def test_lone_expression_photo_and_garbage_are_findings_not_crashes(tmp_path: Path) -> None:
    face = phantom.load_face(ROOT / "service/phantom/data/demo_face.jpg")
    ds = build_vl_photograph(face.rgb, series_description="Smile")
    photo = write_dicom(ds, tmp_path / "smile.dcm")
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\x00" * 500)
    results = analyse_study([_input(photo, "1.2.3", "smile", 0), _input(garbage, "1.2.4", None, 1)])
    assert [r.source.sop_instance_uid for r in results] == ["1.2.3", "1.2.4"]
    assert not results[0].analysis.quality.ok
    assert "without a rest photo" in results[0].analysis.quality.reasons[0]
    assert not results[1].analysis.quality.ok and results[1].analysis.quality.reasons[0].startswith(
        "unreadable"
    )
    # The reason goes into the SR sent to the PACS: it names the instance, never the server's paths.
    for r in results:
        for text in r.analysis.quality.reasons + r.analysis.quality.warnings:
            assert str(tmp_path) not in text and "garbage.dcm" not in text, text


def test_paths_in_reasons_are_replaced() -> None:
    from service.jobs.analysis import pathless

    text = "unreadable: cannot decode /srv/var/files/1.2/3.dcm as a video (ratio 0.3/0.5, I/O) see /tmp/x.log"
    assert pathless(text, "/srv/var/files/1.2/3.dcm", "instance 1.2.3") == (
        "unreadable: cannot decode instance 1.2.3 as a video (ratio 0.3/0.5, I/O) see <file>")
