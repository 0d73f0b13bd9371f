"""Asymmetry and cosine scores (service/engine/scores.py), pinned formula by formula (DESIGN.md, "Scores").

Most cases run on hand-made 478-point faces in the normalised frame (x toward the PATIENT's left, y up,
unit D = inter-eye distance): a symmetric rest face, and a "peak" face with task groups displaced by
hand, through tasks.landmark_signals and scores.score_task (and pipeline._measure, the same path the
engine takes, without pixel tracking). Expected numbers are computed by hand in each test. No MediaPipe.
"""

from __future__ import annotations

import numpy as np
import pytest

from service.domain import Quality, Side, Task
from service.engine import normalize as nz
from service.engine import pipeline as pl
from service.engine import tasks as tk
from service.engine.scores import (
    WEAKER_SIDE_MIN_ASYMMETRY,
    GateThresholds,
    TaskScores,
    activation_gate,
    asymmetry_index,
    asymmetry_score,
    cosine_index,
    cosine_score,
    score_task,
    weaker_side,
)
from service.errors import InvalidParameterError

TOL = 1e-9
GATES = pl.EngineParams().gates  # smile (0.02, 0.08) D, eye closure (0.05, 0.30), brow (0.01, 0.04) D


from synthetic_face import EYE_A, EYE_B, U, brow_face, eye_face, smile_face, symmetric_face  # noqa: E402,F401

MAKE = {Task.SMILE: smile_face, Task.BROW_RAISE: brow_face, Task.EYE_CLOSURE: eye_face}
#: A clearly full movement per task (above a1), in the task's unit.
FULL = {Task.SMILE: 0.2, Task.BROW_RAISE: 0.1, Task.EYE_CLOSURE: 0.5}


def score_landmarks(task: Task, rest: np.ndarray, peak: np.ndarray) -> TaskScores:
    """DESIGN's definitions on one rest/peak pair: magnitudes = signals clipped at 0; vectors = the
    group's rest → peak displacements (brow relative to the canthi' mean, like the signal)."""
    sig = tk.landmark_signals(peak[None], rest)[task][0]
    disp = peak - rest
    gl, gr = tk.groups(task)
    vl, vr = disp[list(gl)], disp[list(gr)]
    if task is Task.BROW_RAISE:
        vl = vl - disp[list(tk.CANTHI_LEFT)].mean(axis=0)
        vr = vr - disp[list(tk.mirrored(tk.CANTHI_LEFT))].mean(axis=0)
    return score_task(max(0.0, sig[0]), max(0.0, sig[1]), vl, vr, GATES[task])


def measure(task: Task, rest: np.ndarray, peak: np.ndarray):
    """The engine's own per-task measurement on a photo pair (frame 0 rest, frame 1 peak), landmarks only."""
    params = pl.EngineParams(pixel_tracking=False)
    norm = np.stack([rest, peak])
    seg = tk.Segment(task, 1, 1, 0, 0)
    pts = np.concatenate([norm, np.zeros(norm.shape[:2] + (1,))], axis=2)  # flat "pixels", for head motion
    return pl._measure(seg, pts, norm, np.array([True, True]), None, 1.0, params, True)


def assert_scores(s, **expected):
    for name, value in expected.items():
        got = getattr(s, name)
        if value is None or isinstance(value, (Side, bool)):
            assert got == value, name
        else:
            assert got == pytest.approx(value, abs=TOL), name


@pytest.fixture(scope="module")
def rest() -> np.ndarray:
    return symmetric_face()


# --------------------------------------------------------------------------- 1. symmetric movement


@pytest.mark.parametrize("task", list(Task))
def test_symmetric_movement_scores_perfect(task, rest):
    a = FULL[task]
    peak = MAKE[task](rest, a, a)
    s = score_landmarks(task, rest, peak)
    assert_scores(
        s,
        left=a,
        right=a,
        asymmetry_index=0.0,
        activation_gate=1.0,
        asymmetry_score=100.0,
        cos_theta=1.0,
        magnitude_ratio=1.0,
        cosine_index=1.0,
        cosine_score=100.0,
        weaker_side=None,
    )
    assert s.insufficient_activation is False
    r = measure(task, rest, peak)
    assert_scores(
        r,
        left=a,
        right=a,
        asymmetry_index=0.0,
        activation_gate=1.0,
        asymmetry_score=100.0,
        cosine_index=1.0,
        cosine_score=100.0,
        weaker_side=None,
        insufficient_activation=False,
    )
    assert r.method == "landmarks" and r.peak_frames == (1, 1) and r.rest_frames == (0, 0)


def test_still_face_both_sides_zero(rest):
    """Nothing moved: AI 0 and CI 1 by definition, gate 0, so AS = CS = 100 — flagged insufficient."""
    s = score_landmarks(Task.SMILE, rest, rest)
    assert_scores(
        s,
        left=0.0,
        right=0.0,
        asymmetry_index=0.0,
        activation_gate=0.0,
        asymmetry_score=100.0,
        cos_theta=1.0,
        magnitude_ratio=1.0,
        cosine_index=1.0,
        cosine_score=100.0,
        weaker_side=None,
        insufficient_activation=True,
    )


# --------------------------------------------------------------------------- 2. one side still


@pytest.mark.parametrize("task", list(Task))
def test_one_side_still_right(task, rest):
    """Left moves fully, right is still: AI 1, AS 0, CI 0 (ρ 0), weaker = the patient's right.

    cos θ is undefined with a zero vector; the code reports 0 (and ρ 0, so CI 0 either way)."""
    a = FULL[task]
    s = score_landmarks(task, rest, MAKE[task](rest, a, 0.0))
    assert_scores(
        s,
        left=a,
        right=0.0,
        asymmetry_index=1.0,
        activation_gate=1.0,
        asymmetry_score=0.0,
        cos_theta=0.0,
        magnitude_ratio=0.0,
        cosine_index=0.0,
        cosine_score=0.0,
        weaker_side=Side.RIGHT,
    )
    r = measure(task, rest, MAKE[task](rest, a, 0.0))
    assert_scores(r, left=a, right=0.0, asymmetry_score=0.0, cosine_score=0.0, weaker_side=Side.RIGHT)


@pytest.mark.parametrize("task", list(Task))
def test_one_side_still_left_mirror_case(task, rest):
    a = FULL[task]
    s = score_landmarks(task, rest, MAKE[task](rest, 0.0, a))
    assert_scores(
        s,
        left=0.0,
        right=a,
        asymmetry_index=1.0,
        asymmetry_score=0.0,
        cosine_index=0.0,
        weaker_side=Side.LEFT,
    )
    assert measure(task, rest, MAKE[task](rest, 0.0, a)).weaker_side is Side.LEFT


def test_smile_left_moves_0_2_hand_numbers(rest):
    """Left corner group 0.2 D along (√½, √½): signal 0.2; the patient's left is x > 0 (column 0)."""
    peak = smile_face(rest, 0.2, 0.0)
    assert (rest[list(tk.groups(Task.SMILE)[0]), 0] > 0).all()
    assert rest[291] == pytest.approx([0.4, -0.9]) and rest[61] == pytest.approx([-0.4, -0.9])
    sig = tk.landmark_signals(peak[None], rest)[Task.SMILE]
    assert sig[0] == pytest.approx([0.2, 0.0], abs=TOL)
    s = score_landmarks(Task.SMILE, rest, peak)
    assert (s.left, s.right) == pytest.approx((0.2, 0.0), abs=TOL)
    assert s.weaker_side is Side.RIGHT


# --------------------------------------------------------------------------- 3. opposite directions


def test_smile_opposite_directions_landmarks(rest):
    """Left corner up-and-out 0.1 D, right corner down-and-in 0.1 D (mirror-opposite of a smile).

    What the code defines: the smile signal is a projection on the up-outward direction, so the right
    reads −0.1, and the magnitude clips it to 0 ("movement against the task's direction is no
    activation"). Hence AI = 1 (not 0), AS = 0, weaker right. The vectors are exact opposites after
    mirroring: cos θ = −1, ρ = 1, CI = ρ(1 + cos)/2 = 0, CS = 0.
    """
    peak = smile_face(rest, 0.1, -0.1)
    assert tk.landmark_signals(peak[None], rest)[Task.SMILE][0] == pytest.approx([0.1, -0.1], abs=TOL)
    s = score_landmarks(Task.SMILE, rest, peak)
    assert_scores(
        s,
        left=0.1,
        right=0.0,
        asymmetry_index=1.0,
        activation_gate=1.0,
        asymmetry_score=0.0,
        cos_theta=-1.0,
        magnitude_ratio=1.0,
        cosine_index=0.0,
        cosine_score=0.0,
        weaker_side=Side.RIGHT,
    )
    r = measure(Task.SMILE, rest, peak)
    assert_scores(r, left=0.1, right=0.0, asymmetry_index=1.0, cosine_index=0.0, weaker_side=Side.RIGHT)


def test_opposite_directions_equal_magnitudes_only_cosine_sees_it(rest):
    """Same vectors, equal magnitudes handed to score_task: AI 0 and AS 100, but CI 0 and CS 0."""
    peak = smile_face(rest, 0.1, -0.1)
    gl, gr = tk.groups(Task.SMILE)
    vl, vr = (peak - rest)[list(gl)], (peak - rest)[list(gr)]
    s = score_task(0.1, 0.1, vl, vr, GATES[Task.SMILE])
    assert_scores(
        s,
        asymmetry_index=0.0,
        asymmetry_score=100.0,
        cos_theta=-1.0,
        magnitude_ratio=1.0,
        cosine_index=0.0,
        cosine_score=0.0,
        weaker_side=None,
    )


def test_brow_opposite_directions(rest):
    """Left brow up 0.1, right brow down 0.1: signals (0.1, −0.1) → magnitudes (0.1, 0); cos θ −1."""
    s = score_landmarks(Task.BROW_RAISE, rest, brow_face(rest, 0.1, -0.1))
    assert_scores(s, left=0.1, right=0.0, asymmetry_index=1.0, cos_theta=-1.0, cosine_index=0.0)


def test_both_corners_dragged_toward_patient_left(rest):
    """Both corner groups shift +0.1 D in x (a head turn, not a smile). Signals ±0.1·√½, so the left
    reads 0.0707 and the right clips to 0; mirrored right vector (−0.1, 0) opposes (0.1, 0): cos −1."""
    peak = rest.copy()
    gl, gr = tk.groups(Task.SMILE)
    peak[list(gl) + list(gr), 0] += 0.1
    s = score_landmarks(Task.SMILE, rest, peak)
    assert_scores(s, left=0.1 * U, right=0.0, asymmetry_index=1.0, cos_theta=-1.0, cosine_index=0.0)


# --------------------------------------------------------------------------- cosine_index directly


def test_cosine_mirrored_right_equals_left_is_one():
    vl = np.array([[0.1, 0.2], [0.3, -0.1], [0.05, 0.0]])
    ci, cos, rho = cosine_index(vl, vl * np.array([-1.0, 1.0]))
    assert (ci, cos, rho) == pytest.approx((1.0, 1.0, 1.0), abs=TOL)


def test_cosine_same_x_not_mirrored_is_minus_one():
    vl = np.array([[0.1, 0.0], [0.2, 0.0]])
    ci, cos, rho = cosine_index(vl, vl.copy())
    assert (ci, cos, rho) == pytest.approx((0.0, -1.0, 1.0), abs=TOL)


def test_cosine_same_y_not_mirrored_is_one():
    """Pure vertical motion is its own mirror image: equal lifts on both sides are symmetric."""
    vl = np.array([[0.0, 0.1], [0.0, 0.3]])
    assert cosine_index(vl, vl.copy()) == pytest.approx((1.0, 1.0, 1.0), abs=TOL)


def test_cosine_hand_numbers():
    # mirrored right = [[1, 0], [−1, 0]]; a = (1, 0, 0, 1), b = (1, 0, −1, 0): a·b = 1, |a| = |b| = √2.
    ci, cos, rho = cosine_index(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[-1.0, 0.0], [1.0, 0.0]]))
    assert (cos, rho, ci) == pytest.approx((0.5, 1.0, 0.75), abs=TOL)
    # Perpendicular: cos 0, ρ 1, CI 0.5.
    assert cosine_index(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])) == pytest.approx((0.5, 0.0, 1.0))
    # Parallel after mirroring, |vL| = 0.5, |vR| = 1: ρ 0.5, CI 0.5.
    assert cosine_index(np.array([[0.3, 0.4]]), np.array([[-0.6, 0.8]])) == pytest.approx((0.5, 1.0, 0.5))


def test_cosine_zero_vectors():
    z = np.zeros((3, 2))
    assert cosine_index(z, z) == (1.0, 1.0, 1.0)
    assert cosine_index(np.ones((3, 2)), z) == (0.0, 0.0, 0.0)
    assert cosine_index(z, np.ones((3, 2))) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("vl", "vr"),
    [
        (np.zeros((3, 2)), np.zeros((2, 2))),
        (np.zeros((3, 2)), np.zeros((3, 3))),
        (np.zeros(4), np.zeros(4)),
        (np.zeros((2, 2, 2)), np.zeros((2, 2, 2))),
    ],
)
def test_cosine_shape_mismatch_raises(vl, vr):
    with pytest.raises(InvalidParameterError, match="v_left and v_right"):
        cosine_index(vl, vr)


def test_cosine_non_finite_raises():
    with pytest.raises(InvalidParameterError, match="finite"):
        cosine_index(np.array([[np.nan, 0.0]]), np.array([[0.0, 0.0]]))


# --------------------------------------------------------------------------- 4. activation gate


@pytest.mark.parametrize("task", list(Task))
def test_gate_halfway_between_a0_and_a1(task, rest):
    """Both sides move (a0 + a1)/2: g = 0.5 exactly; AI 0 so AS 100, but flagged insufficient."""
    g = GATES[task]
    a = (g.a0 + g.a1) / 2
    s = score_landmarks(task, rest, MAKE[task](rest, a, a))
    assert_scores(
        s, activation_gate=0.5, asymmetry_index=0.0, asymmetry_score=100.0, insufficient_activation=True
    )
    r = measure(task, rest, MAKE[task](rest, a, a))
    assert r.activation_gate == pytest.approx(0.5, abs=TOL)
    assert r.insufficient_activation is True
    assert "insufficient activation: gate 0.50 < 1" in r.notes


def test_sub_threshold_smile_hand_numbers(rest):
    """Left 0.05 D, right 0.03 D (smile gate a0 0.02, a1 0.08).

    g = (0.05 − 0.02)/(0.08 − 0.02) = 0.5; AI = 0.02/0.05 = 0.4; AS = 100(1 − 0.5·0.4) = 80;
    vectors parallel after mirroring: cos 1, ρ = 0.03/0.05 = 0.6, CI = 0.6, CS = 100(1 − 0.5·0.4) = 80;
    g·AI = 0.2 ≥ 0.1 → weaker right.
    """
    s = score_landmarks(Task.SMILE, rest, smile_face(rest, 0.05, 0.03))
    assert_scores(
        s,
        left=0.05,
        right=0.03,
        activation_gate=0.5,
        asymmetry_index=0.4,
        asymmetry_score=80.0,
        cos_theta=1.0,
        magnitude_ratio=0.6,
        cosine_index=0.6,
        cosine_score=80.0,
        weaker_side=Side.RIGHT,
        insufficient_activation=True,
    )
    r = measure(Task.SMILE, rest, smile_face(rest, 0.05, 0.03))
    assert_scores(
        r, activation_gate=0.5, asymmetry_score=80.0, cosine_score=80.0, insufficient_activation=True
    )


def test_below_noise_floor_gate_zero_is_still_a_finding(rest):
    """Left 0.015 D, right still (a0 = 0.02): AI 1 but g 0 → AS 100, CS 100, no weaker side — and
    insufficient_activation is True: a low gate is reported, never a silent 100."""
    s = score_landmarks(Task.SMILE, rest, smile_face(rest, 0.015, 0.0))
    assert_scores(
        s,
        left=0.015,
        right=0.0,
        asymmetry_index=1.0,
        activation_gate=0.0,
        asymmetry_score=100.0,
        cosine_index=0.0,
        cosine_score=100.0,
        weaker_side=None,
        insufficient_activation=True,
    )
    r = measure(Task.SMILE, rest, smile_face(rest, 0.015, 0.0))
    assert r.asymmetry_score == pytest.approx(100.0, abs=TOL)
    assert r.insufficient_activation is True
    assert any("insufficient activation" in n for n in r.notes)


def test_gate_formula():
    th = GateThresholds(0.1, 0.5)
    assert activation_gate(0.2, 0.0, th) == pytest.approx(0.25, abs=TOL)
    assert activation_gate(0.0, 0.2, th) == pytest.approx(0.25, abs=TOL)  # max of the two sides
    assert activation_gate(0.05, 0.1, th) == 0.0
    assert activation_gate(0.5, 0.0, th) == 1.0
    assert activation_gate(3.0, 2.0, th) == 1.0


def test_score_formulas():
    assert asymmetry_index(0.3, 0.1) == pytest.approx(2 / 3, abs=TOL)
    assert asymmetry_index(0.1, 0.3) == pytest.approx(2 / 3, abs=TOL)
    assert asymmetry_index(0.0, 0.0) == 0.0
    assert asymmetry_index(0.0, 0.2) == 1.0
    assert asymmetry_score(0.4, 0.5) == pytest.approx(80.0, abs=TOL)
    assert asymmetry_score(1.0, 1.0) == pytest.approx(0.0, abs=TOL)
    assert cosine_score(0.6, 0.5) == pytest.approx(80.0, abs=TOL)
    assert cosine_score(0.0, 0.0) == pytest.approx(100.0, abs=TOL)
    assert TaskScores(1, 1, 0, 0.999, 100, 1, 100, 1, 1, None).insufficient_activation is True
    assert TaskScores(1, 1, 0, 1.0, 100, 1, 100, 1, 1, None).insufficient_activation is False


# --------------------------------------------------------------------------- 6. weaker side threshold


def test_weaker_side_threshold_full_gate():
    th = GateThresholds(0.0, 0.5)  # g = 1 for max ≥ 0.5
    assert WEAKER_SIDE_MIN_ASYMMETRY == 0.1
    just_below = score_task(1.0, 0.9001, np.zeros((1, 2)), np.zeros((1, 2)), th)  # AI 0.0999
    assert just_below.asymmetry_index == pytest.approx(0.0999, abs=TOL)
    assert just_below.weaker_side is None
    assert score_task(1.0, 0.8999, np.zeros((1, 2)), np.zeros((1, 2)), th).weaker_side is Side.RIGHT
    assert score_task(0.8999, 1.0, np.zeros((1, 2)), np.zeros((1, 2)), th).weaker_side is Side.LEFT


def test_weaker_side_threshold_scales_with_gate():
    th = GateThresholds(0.0, 2.0)  # max 1.0 → g = 0.5: needs AI ≥ 0.2
    below = score_task(1.0, 0.81, np.zeros((1, 2)), np.zeros((1, 2)), th)  # g·AI = 0.095
    above = score_task(0.79, 1.0, np.zeros((1, 2)), np.zeros((1, 2)), th)  # g·AI = 0.105
    assert below.activation_gate == pytest.approx(0.5, abs=TOL)
    assert below.weaker_side is None
    assert above.weaker_side is Side.LEFT


def test_weaker_side_at_exactly_0_1_is_named():
    # 0.4 · 0.25 is exactly the double 0.1; the rule is g · AI ≥ 0.1.
    assert weaker_side(1.0, 0.75, 0.25, 0.4) is Side.RIGHT
    assert weaker_side(0.75, 1.0, 0.25, 0.4) is Side.LEFT
    assert weaker_side(1.0, 1.0, 0.0, 1.0) is None


# --------------------------------------------------------------------------- 7. argument checks


@pytest.mark.parametrize("bad", [-0.1, np.nan, np.inf, -np.inf])
def test_bad_magnitudes_raise_naming_the_argument(bad):
    with pytest.raises(InvalidParameterError, match="left"):
        asymmetry_index(bad, 0.1)
    with pytest.raises(InvalidParameterError, match="right"):
        asymmetry_index(0.1, bad)
    with pytest.raises(InvalidParameterError, match="right"):
        activation_gate(0.1, bad, GateThresholds(0.0, 1.0))
    with pytest.raises(InvalidParameterError, match="left"):
        score_task(bad, 0.1, np.zeros((1, 2)), np.zeros((1, 2)), GateThresholds(0.0, 1.0))


def test_invalid_parameter_error_is_a_value_error():
    with pytest.raises(ValueError):
        asymmetry_index(-1.0, 0.0)


@pytest.mark.parametrize(("a0", "a1"), [(0.5, 0.5), (0.6, 0.5), (-0.1, 0.5), (np.nan, 1.0), (0.0, np.inf)])
def test_gate_thresholds_need_0_le_a0_lt_a1(a0, a1):
    with pytest.raises(InvalidParameterError, match=r"a0.*a1"):
        GateThresholds(a0, a1)


def test_default_gates_per_task():
    assert (GATES[Task.SMILE].a0, GATES[Task.SMILE].a1) == (0.02, 0.08)
    assert (GATES[Task.EYE_CLOSURE].a0, GATES[Task.EYE_CLOSURE].a1) == (0.05, 0.30)
    assert (GATES[Task.BROW_RAISE].a0, GATES[Task.BROW_RAISE].a1) == (0.01, 0.04)


# --------------------------------------------------------------------------- 10. static items


def _static(norm: np.ndarray) -> dict[str, tuple[float, float, float]]:
    return {i.name: (i.left, i.right, i.difference) for i in pl.static_items(norm)}


def test_static_items_symmetric_face(rest):
    items = _static(rest)
    assert list(items) == ["brow_height", "palpebral_fissure_height", "commissure_height"]
    brow_mean = 0.6 + 0.05 * np.sin(np.linspace(0, np.pi, len(nz.LEFT_BROW))).mean()
    expected = {
        "brow_height": brow_mean - 0.3,  # brow mean y above the eye-contour centroid (y = 0.3)
        "palpebral_fissure_height": 2 * EYE_B,  # 386 at the ellipse top, 374 at its bottom
        "commissure_height": -0.9,  # mouth corner 0.9 D below the nose tip
    }
    for name, (left, right, diff) in items.items():
        assert left == pytest.approx(expected[name], abs=TOL), name
        assert right == pytest.approx(left, abs=TOL), name
        assert diff == pytest.approx(0.0, abs=TOL), name


def test_static_items_left_brow_raised(rest):
    items = _static(brow_face(rest, 0.1, 0.0))
    assert items["brow_height"][2] == pytest.approx(0.1, abs=TOL)
    assert items["palpebral_fissure_height"][2] == pytest.approx(0.0, abs=TOL)
    assert items["commissure_height"][2] == pytest.approx(0.0, abs=TOL)


def test_static_items_drooping_right_eye_and_corner(rest):
    """Right eye half closed: fissure 0.06 vs 0.12 → +0.06 (left wider). Right corner 0.1 D lower."""
    face = eye_face(rest, 0.0, 0.5)
    face[61, 1] -= 0.1
    items = _static(face)
    assert items["palpebral_fissure_height"] == pytest.approx((2 * EYE_B, EYE_B, EYE_B), abs=TOL)
    assert items["commissure_height"] == pytest.approx((-0.9, -1.0, 0.1), abs=TOL)


# --------------------------------------------------------------------------- photo pair, end to end


def test_photo_pair_track_from_pixels(rest):
    """The pixel path of a photo pair (normalise → auto task → measure), landmarks only: a one-sided smile
    drawn in a 640×480 picture with D = 100 px, the patient's left on the image's right (+x)."""
    peak = smile_face(rest, 0.2, 0.0)
    norm = np.stack([rest, peak])
    pts = np.zeros((2, nz.N_LANDMARKS, 3), np.float32)
    pts[..., 0] = 320 + 100 * norm[..., 0]
    pts[..., 1] = 240 - 100 * norm[..., 1]
    usable = np.array([True, True])
    quality = Quality(True, (), (), 2, 2)
    params = pl.EngineParams(pixel_tracking=False)
    analysis = pl._analyze_track(pts, usable, None, 1.0, None, params, quality, photo_pair=True)
    (r,) = analysis.tasks
    assert r.task is Task.SMILE
    assert (r.left, r.right) == pytest.approx((0.2, 0.0), abs=1e-5)  # float32 pixels
    assert r.asymmetry_index == pytest.approx(1.0, abs=1e-9)
    assert r.weaker_side is Side.RIGHT
