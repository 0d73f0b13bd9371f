"""Measurements that hold while the head moves (issue 12), pinned on a small subset of the validation
corpus (:mod:`service.phantom.corpus`; ``bench/validity.py`` prints the whole of it).

Thresholds are the issue's, loose enough for the machine and tight enough to fail on the engine before
head-motion removal. Commit 67dff70 read these cases: the healthy clip 0.29 still and 0.72 with ±5° roll;
the left-frozen single_face.mp4 with roll/scale weaker side RIGHT; the right-frozen second clip: no
movement found; the symmetric astronaut smile with roll/scale AI 0.78; the left-weak one under yaw and
pitch 0.80 for a truth of 0.6 (README, "What is measured").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.cli import analyze_path, main
from service.domain import Task
from service.phantom import corpus

pytestmark = pytest.mark.slow

CASES = {c.name: c for c in corpus.cases(("off", "inplane", "turn"))}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, faces_dir: Path, test_clips_dir: Path):
    src = corpus.Sources(faces_dir, test_clips_dir, tmp_path_factory.mktemp("corpus"))

    def make(name: str) -> tuple[corpus.Case, dict]:
        case = CASES[name]
        clip = corpus.make_case(case, src)
        doc = analyze_path(str(clip), None, case.analyse_task, False, False)
        return case, doc

    return make


def _task(doc: dict, task: Task) -> dict:
    found = [t for t in doc["tasks"] if t["task"] == task.value]
    assert found, f"{task.value} not found; found {[t['task'] for t in doc['tasks']]}"
    return found[0]


def test_five_degrees_of_roll_do_not_change_a_healthy_real_smile(made) -> None:
    """The issue asks for AI < 0.3 here; the still clip itself reads 0.33–0.35 in the corpus (re-encoded)
    in the head's frame (0.29 on the translation-only engine of 67dff70), and the rolled one 0.30, so what
    is pinned is that the roll adds nothing: the moving clip reads within 0.08 of the still one (67dff70:
    0.72 against 0.29)."""
    _, still = made("single_face-healthy-off")
    _, moving = made("single_face-healthy-roll5")
    a, b = _task(still, Task.SMILE), _task(moving, Task.SMILE)
    assert b["head_motion"]["roll_deg"] > 3.0  # the motion was there, and was measured
    assert abs(b["asymmetry_index"] - a["asymmetry_index"]) <= 0.08
    assert b["asymmetry_index"] < 0.4


@pytest.mark.parametrize(
    "name", ["single_face-frozen-left-inplane", "wolfgang-frozen-right-inplane", "wolfgang-frozen-left-turn"]
)
def test_a_half_frozen_in_the_heads_frame_is_found_by_auto_and_named(made, name: str) -> None:
    case, doc = made(name)
    assert case.analyse_task is None  # --task auto
    # The smile is found as a smile (the woman of the second clip also lifts her brows: a one-sided brow
    # raise may be found beside it, never instead of it).
    assert "smile" in [t["task"] for t in doc["tasks"]]
    smile = _task(doc, Task.SMILE)
    assert smile["asymmetry_index"] >= 0.8
    assert smile["weaker_side"] == case.frozen.value


def test_symmetric_smile_with_roll_and_scale_reads_symmetric_and_grades_mild(made) -> None:
    _, doc = made("astronaut-smile-1-1-inplane")  # a validation face, not the one the design was tuned on
    smile = _task(doc, Task.SMILE)
    assert smile["asymmetry_index"] <= 0.15
    assert smile["grade"]["label"] in ("I", "II")
    assert smile["head_motion"]["roll_deg"] > 3.0


def test_symmetric_open_mouth_smile_under_yaw_and_pitch_reads_symmetric(made) -> None:
    """The astronaut's smile (teeth showing) with ±10° yaw and pitch. With stable corners on her hairline
    (beyond the face's outline, which does not turn with the head) the fit read the turn as the mesh's 7°
    and the smile AI 0.17 (commit bfd1bfd); with corners only inside the outline it sees more of the turn
    and reads the smile symmetric."""
    _, doc = made("astronaut-smile-1-1-turn")
    smile = _task(doc, Task.SMILE)
    assert smile["asymmetry_index"] <= 0.15
    assert smile["head_motion"]["yaw_deg"] > 12.0


def test_one_sided_smile_under_yaw_and_pitch_keeps_its_side_and_size(made) -> None:
    case, doc = made("astronaut-smile-0.4-1-turn")
    smile = _task(doc, Task.SMILE)
    assert smile["weaker_side"] == "left"
    assert abs(smile["asymmetry_index"] - case.truth_ai) <= 0.12


def test_cli_phantom_lays_head_motion_over_a_clip(tmp_path: Path) -> None:
    out = tmp_path / "moving.mp4"
    assert main(["phantom", str(out), "--smile", "0.25", "0.25", "--roll", "4", "--scale", "5"]) == 0
    truth = json.loads(out.with_suffix(".json").read_text())
    assert truth["head_motion"]["roll_deg"] == 4.0 and truth["head_motion"]["scale_pct"] == 5.0
    smile = _task(analyze_path(str(out), None, Task.SMILE, False, False), Task.SMILE)
    assert smile["asymmetry_index"] <= 0.15
    assert smile["head_motion"]["roll_deg"] > 2.0


def test_symmetric_eye_closure_under_yaw_and_pitch_reads_symmetric(made) -> None:
    """The demo face's symmetric eye closure with ±10° yaw and pitch. Read 0.16 while the renderer left the
    eye openings flat (a hole in the tessellation: a still eye's opening shrank at the seam); with the
    holes closed the turn is rigid and the engine reads it symmetric."""
    _, doc = made("man-eye_closure-1-1-turn")
    closure = _task(doc, Task.EYE_CLOSURE)
    assert closure["asymmetry_index"] <= 0.15
    assert closure["head_motion"]["yaw_deg"] > 3.0 or closure["head_motion"]["pitch_deg"] > 3.0
