"""The validation corpus's cases and how their truth is defined (service.phantom.corpus)."""

from __future__ import annotations

from service.domain import Side, Task
from service.phantom import corpus


def test_case_names_are_unique_and_every_motion_is_covered() -> None:
    cases = corpus.cases()
    assert len({c.name for c in cases}) == len(cases)
    assert {c.motion for c in cases} == {"off", "inplane", "turn", "roll5"}


def test_a_partial_half_has_a_weaker_side_as_truth_and_no_exact_ai() -> None:
    partial = [c for c in corpus.cases() if c.kind == "partial"]
    # Both real clips, both sides, each head motion.
    assert {(c.source, c.frozen, c.motion) for c in partial} == {
        (clip, side, motion)
        for clip in corpus.CLIPS for side in Side for motion in ("off", "inplane", "turn")
    }
    for c in partial:
        assert c.truth_ai is None and c.frozen is not None and c.truth_weaker == c.frozen.value
        assert c.analyse_task is None  # --task auto: the movement must be found as well
        assert c.to_json()["truth_weaker"] == c.frozen.value


def test_warp_truth_is_the_set_amplitudes() -> None:
    (case,) = [c for c in corpus.cases(("off",)) if c.name == "man-smile-0.4-1-off"]
    assert case.task is Task.SMILE and case.truth_weaker == "left"
    assert abs((case.truth_ai or 0.0) - 0.6) < 1e-9
