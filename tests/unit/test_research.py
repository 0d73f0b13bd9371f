"""Pieces of the researcher's CLI that need no video: finding a batch's inputs, result names, the resume
check, summary rows, and the wrong-task rule (issue 15)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.domain import Task
from service.engine.pipeline import wrong_task_note
from service.errors import UnreadableInputError
from service.research.batch import batch_record, discover, result_names, reusable
from service.research.tables import SUMMARY_COLUMNS, summary_rows


def test_discover_walks_folders_expands_patterns_and_skips_results(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.mp4", "a/b/y.MOV", "a/b/z.jpg", "a/notes.txt", "a/x.json", "a/.hidden.mp4", "c.dcm"):
        (tmp_path / name).write_bytes(b"0")
    (tmp_path / "a" / "results").mkdir()
    (tmp_path / "a" / "results" / "old.mp4").write_bytes(b"0")
    found = discover([str(tmp_path / "a"), str(tmp_path / "*.dcm")], exclude=tmp_path / "a" / "results")
    got = [p.relative_to(tmp_path).as_posix() for p in found]
    assert got == ["a/b/y.MOV", "a/b/z.jpg", "a/x.mp4", "c.dcm"]
    assert discover([str(tmp_path / "a" / "x.mp4"), str(tmp_path / "a")], exclude=None).count(
        (tmp_path / "a" / "x.mp4").resolve()) == 1
    with pytest.raises(UnreadableInputError, match="no such file"):
        discover([str(tmp_path / "missing*.mp4")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnreadableInputError, match="no video, photo or DICOM"):
        discover([str(tmp_path / "empty")])


def test_result_names_are_readable_and_unique(tmp_path: Path) -> None:
    paths = [tmp_path / "v1" / "smile.mp4", tmp_path / "v2" / "smile.mp4", tmp_path / "v2" / "eye.mp4"]
    names = result_names(paths)
    assert names == {paths[0]: "v1__smile.mp4", paths[1]: "v2__smile.mp4", paths[2]: "v2__eye.mp4"}
    assert result_names([paths[0]]) == {paths[0]: "smile.mp4"}


def test_a_result_is_reused_only_for_the_same_file_engine_and_options(tmp_path: Path) -> None:
    clip = tmp_path / "c.mp4"
    clip.write_bytes(b"12345")
    record = batch_record(clip, {"task": "auto", "mirrored": False})
    out = tmp_path / "c.mp4.json"
    out.write_text(json.dumps({"quality": {"ok": True}, "batch": record}))
    assert reusable(out, record) is not None
    assert reusable(out, batch_record(clip, {"task": "smile", "mirrored": False})) is None
    assert reusable(out, {**record, "engine_version": "0.0.0"}) is None
    clip.write_bytes(b"123456")  # the file changed
    assert reusable(out, batch_record(clip, {"task": "auto", "mirrored": False})) is None
    out.write_text("{ half a file")
    assert reusable(out, record) is None


def test_summary_rows_carry_the_documents_numbers() -> None:
    task = {"task": "smile", "frames": [10, 40], "peak_frames": [20, 30], "unit": "D",
            "left": {"magnitude": 0.0512}, "right": {"magnitude": 0.2}, "asymmetry_index": 0.744,
            "activation_gate": 1.0, "asymmetry_score": 25.6, "cosine_index": 0.31, "cosine_score": 69.0,
            "weaker_side": "left", "insufficient_activation": False, "method": "pixels", "notes": ["n1"],
            "head_motion": {"residual_d": 0.012, "corrected": True},
            "grade": {"label": "III", "expected_index": 2.4},
            "flow": {"regions": {"cheek": {"symmetry_score": 0.41}}}}
    doc = {"facesym_version": "x", "input": {}, "quality": {"ok": True, "reasons": [], "warnings": ["w"]},
           "tasks": [task]}
    (row,) = summary_rows(doc, "a.mp4", "a.mp4.json")
    assert list(row) == list(SUMMARY_COLUMNS)
    assert float(row["asymmetry_index"]) == 0.744 and row["weaker_side"] == "left" and row["grade"] == "III"
    assert row["flow_ss_cheek"] == "0.41" and row["flow_ss_eye"] == "" and row["frames"] == "10–40"
    assert row["qc_ok"] == "true" and row["qc_warnings"] == "w" and row["head_motion_corrected"] == "true"
    failed = {"quality": {"ok": False, "reasons": ["no face"], "warnings": []}, "tasks": []}
    (row,) = summary_rows(failed, "b.mp4")
    assert row["task"] == "" and row["qc_ok"] == "false" and row["qc_reasons"] == "no face"


def _signals(smile: float, eye: float, brow: float, n: int = 50) -> dict[Task, np.ndarray]:
    ramp = np.linspace(0, 1, n)[:, None] * np.ones((1, 2))
    return {Task.SMILE: smile * ramp, Task.EYE_CLOSURE: eye * ramp, Task.BROW_RAISE: brow * ramp}


def test_wrong_task_note_only_when_the_named_region_barely_moved_and_another_clearly_did() -> None:
    full = {Task.SMILE: 0.08, Task.EYE_CLOSURE: 0.3, Task.BROW_RAISE: 0.04}
    usable = np.ones(50, bool)
    note = wrong_task_note(_signals(0.12, 0.03, 0.002), Task.BROW_RAISE, full, usable)
    assert note is not None and "brow raise region moved 0.05" in note and "smile region moved 1.42" in note
    assert wrong_task_note(_signals(0.12, 0.03, 0.002), Task.SMILE, full, usable) is None
    # The named region moved (a weak raise is still a raise): no note.
    assert wrong_task_note(_signals(0.12, 0.03, 0.012), Task.BROW_RAISE, full, usable) is None
    # Nothing else moved much either: no note.
    assert wrong_task_note(_signals(0.03, 0.03, 0.002), Task.BROW_RAISE, full, usable) is None
    # A one-sided movement counts whole (the larger side).
    one_sided = _signals(0.12, 0.03, 0.002)
    one_sided[Task.SMILE][:, 0] = 0.0
    assert wrong_task_note(one_sided, Task.BROW_RAISE, full, usable) is not None
