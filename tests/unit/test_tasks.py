"""Motion signals, peak interval and task segmentation (service/engine/tasks.py), on hand-made arrays.

Landmarks are built directly in the normalised frame (DESIGN.md, "Sides and coordinates"): x toward
the PATIENT's left, y up, unit D = inter-eye distance, nose tip at the origin. No MediaPipe.
"""

from __future__ import annotations

import numpy as np
import pytest

from service.domain import Task
from service.engine import normalize as nz
from service.engine import tasks as tk

TOL = 1e-9


from synthetic_face import EYE_A, EYE_B, U, brow_face, eye_face, smile_face, symmetric_face  # noqa: E402,F401


def signals_of(rest: np.ndarray, peak: np.ndarray) -> dict[Task, np.ndarray]:
    """(2,) [left, right] signal of each task for a single peak frame."""
    sig = tk.landmark_signals(peak[None], rest)
    return {t: s[0] for t, s in sig.items()}


@pytest.fixture(scope="module")
def rest() -> np.ndarray:
    return symmetric_face()


# --------------------------------------------------------------------------- the face itself


def test_synthetic_face_is_symmetric_with_unit_eye_distance(rest):
    left_c, right_c = nz.eye_centres(rest)
    assert left_c == pytest.approx([0.5, 0.3], abs=TOL)
    assert right_c == pytest.approx([-0.5, 0.3], abs=TOL)
    assert float(nz.interocular_distance(rest)) == pytest.approx(1.0, abs=TOL)
    assert np.allclose(nz.mirror_points(rest), rest, atol=TOL)
    assert (rest[list(nz.LEFT_HALF), 0] > 0).all()


def test_still_face_gives_zero_signals(rest):
    for task, s in signals_of(rest, rest).items():
        assert s == pytest.approx([0.0, 0.0], abs=TOL), task


# --------------------------------------------------------------------------- groups and sides


@pytest.mark.parametrize("task", list(Task))
def test_groups_are_patient_left_and_its_mirror(task, rest):
    left, right = tk.groups(task)
    assert len(left) == len(right)
    assert right == tuple(int(nz.MIRROR[i]) for i in left)
    assert set(left) <= set(nz.LEFT_HALF)
    assert set(right) <= set(nz.RIGHT_HALF)
    # Patient's left is +x in the normalised frame.
    assert (rest[list(left), 0] > 0).all() and (rest[list(right), 0] < 0).all()


def test_canthi_and_known_pairs():
    assert tk.CANTHI_LEFT == (263, 362)
    assert tk.mirrored(tk.CANTHI_LEFT) == (33, 133)
    assert tk.mirrored((291,)) == (61,)
    assert tk.groups(Task.EYE_CLOSURE) == (nz.LEFT_EYE_CONTOUR, nz.RIGHT_EYE_CONTOUR)
    assert set(tk.STABLE) <= set(nz.MIDLINE)


@pytest.mark.parametrize(
    ("task", "make", "expected_left"),
    [
        (Task.SMILE, lambda r: smile_face(r, 0.2, 0.0), 0.2),
        (Task.BROW_RAISE, lambda r: brow_face(r, 0.1, 0.0), 0.1),
        (Task.EYE_CLOSURE, lambda r: eye_face(r, 0.5, 0.0), 0.5),
    ],
)
def test_moving_left_group_changes_column_0_only(task, make, expected_left, rest):
    """Displacing the patient's-left (x > 0) group shows in column 0 (tk.LEFT) and nowhere else."""
    s = signals_of(rest, make(rest))
    assert s[task][tk.LEFT] == pytest.approx(expected_left, abs=TOL)
    assert s[task][tk.RIGHT] == pytest.approx(0.0, abs=TOL)
    assert tk.LEFT == 0 and tk.RIGHT == 1


# --------------------------------------------------------------------------- smile signal


def test_smile_signal_projects_on_up_outward_direction(rest):
    s = signals_of(rest, smile_face(rest, 0.2, 0.05))[Task.SMILE]
    assert s == pytest.approx([0.2, 0.05], abs=TOL)
    # Mirror case: the patient's right moves, the left is still.
    s = signals_of(rest, smile_face(rest, 0.0, 0.2))[Task.SMILE]
    assert s == pytest.approx([0.0, 0.2], abs=TOL)


def test_smile_signal_is_negative_for_down_inward_motion(rest):
    """Movement against the smile direction is kept negative here (clipped only for the magnitude)."""
    s = signals_of(rest, smile_face(rest, 0.1, -0.1))[Task.SMILE]
    assert s == pytest.approx([0.1, -0.1], abs=TOL)


def test_smile_signal_ignores_motion_perpendicular_to_smile_direction(rest):
    """A pure shift toward the patient's left (as a head turn drags both corners) reads 0.1·√½ on the left
    and −0.1·√½ on the right, not 0.1 on both sides."""
    peak = rest.copy()
    gl, gr = tk.groups(Task.SMILE)
    peak[list(gl) + list(gr), 0] += 0.1
    s = signals_of(rest, peak)[Task.SMILE]
    assert s == pytest.approx([0.1 * U, -0.1 * U], abs=TOL)


def test_smile_signal_on_hand_made_displacements():
    # (T=2, N=2, 2): frame 1 left points move (0.3, 0.1) and (0.1, 0.3): mean (0.2, 0.2) → 0.4·√½.
    dl = np.array([[[0, 0], [0, 0]], [[0.3, 0.1], [0.1, 0.3]]], float)
    dr = np.array([[[0, 0], [0, 0]], [[-0.2, 0.0], [0.0, 0.0]]], float)  # mean (−0.1, 0) → 0.1·√½
    s = tk.smile_signal(dl, dr)
    assert s.shape == (2, 2)
    assert s[0] == pytest.approx([0.0, 0.0], abs=TOL)
    assert s[1] == pytest.approx([0.4 * U, 0.1 * U], abs=TOL)
    np.testing.assert_allclose(tk.SMILE_DIRECTION_LEFT, [U, U], atol=TOL)


def test_smile_signal_mean_ignores_nan_points():
    dl = np.array([[[0.2 * U, 0.2 * U], [np.nan, np.nan]]])
    dr = np.zeros((1, 2, 2))
    assert tk.smile_signal(dl, dr)[0] == pytest.approx([0.2, 0.0], abs=TOL)


# --------------------------------------------------------------------------- brow signal


def test_brow_raise_left_only(rest):
    assert signals_of(rest, brow_face(rest, 0.1, 0.0))[Task.BROW_RAISE] == pytest.approx([0.1, 0.0], abs=TOL)


def test_brow_moving_with_canthi_is_no_raise(rest):
    """Brow and canthi up together by 0.1 (a head nod, or a lid lift): 0 relative to the canthi."""
    peak = brow_face(rest, 0.1, 0.1, canthi=(0.1, 0.1))
    assert signals_of(rest, peak)[Task.BROW_RAISE] == pytest.approx([0.0, 0.0], abs=TOL)


def test_brow_relative_to_canthi_hand_numbers(rest):
    # Left brow +0.1, left canthi +0.04 → 0.06; right brow +0.02, right canthi −0.01 → 0.03.
    peak = brow_face(rest, 0.1, 0.02, canthi=(0.04, -0.01))
    assert signals_of(rest, peak)[Task.BROW_RAISE] == pytest.approx([0.06, 0.03], abs=TOL)


def test_brow_signal_ignores_horizontal_motion_and_keeps_lowering_negative(rest):
    peak = brow_face(rest, -0.05, 0.0)
    peak[list(tk.groups(Task.BROW_RAISE)[1]), 0] -= 0.2  # right brow slides outward only
    assert signals_of(rest, peak)[Task.BROW_RAISE] == pytest.approx([-0.05, 0.0], abs=TOL)


def test_brow_signal_on_hand_made_displacements():
    b_l = np.array([[[0.0, 0.1], [0.5, 0.3]]])  # mean dy 0.2
    b_r = np.array([[[0.0, 0.0], [0.0, 0.1]]])  # mean dy 0.05
    c_l = np.array([[[9.0, 0.05], [0.0, 0.05]]])  # mean dy 0.05
    c_r = np.array([[[0.0, -0.1], [0.0, 0.1]]])  # mean dy 0
    assert tk.brow_signal(b_l, b_r, c_l, c_r)[0] == pytest.approx([0.15, 0.05], abs=TOL)


# --------------------------------------------------------------------------- eye closure


def test_eye_closure_half_left(rest):
    assert signals_of(rest, eye_face(rest, 0.5, 0.0))[Task.EYE_CLOSURE] == pytest.approx([0.5, 0.0], abs=TOL)


def test_eye_closure_both_sides_hand_numbers(rest):
    assert signals_of(rest, eye_face(rest, 0.2, 0.9))[Task.EYE_CLOSURE] == pytest.approx([0.2, 0.9], abs=TOL)


def test_eye_closure_is_area_ratio_not_position(rest):
    """Translating an open eye (gaze or head motion in the frame) changes no area: closure 0. Widening it
    by a factor 1.25 vertically gives −0.25 (kept negative: an eye opened wider than at rest)."""
    peak = rest.copy()
    peak[list(nz.LEFT_EYE_CONTOUR)] += (0.07, -0.03)
    peak = eye_face(peak, 0.0, -0.25)
    assert signals_of(rest, peak)[Task.EYE_CLOSURE] == pytest.approx([0.0, -0.25], abs=TOL)


def test_eye_closure_shoelace_area_of_contour_polygon(rest):
    """The rest contour is a 16-gon inscribed in the ellipse: area = 8·a·b·sin(2π/16)."""
    area = float(nz.shoelace_area(rest[list(nz.LEFT_EYE_CONTOUR)]))
    assert area == pytest.approx(8 * EYE_A * EYE_B * np.sin(2 * np.pi / 16), abs=TOL)


def test_eye_closure_signal_over_time(rest):
    norm = np.stack([rest, eye_face(rest, 0.25, 0.25), eye_face(rest, 1.0, 0.5)])
    s = tk.eye_closure_signal(norm, rest)
    assert s.shape == (3, 2)
    assert s == pytest.approx(np.array([[0, 0], [0.25, 0.25], [1.0, 0.5]]), abs=TOL)


# --------------------------------------------------------------------------- smoothing and peak interval


def test_smooth_centred_moving_average_ignoring_nan():
    x = np.array([0.0, 0.0, 3.0, 0.0, 0.0])
    assert tk.smooth(x, 3) == pytest.approx([0.0, 1.0, 1.0, 1.0, 0.0], abs=TOL)
    y = np.array([np.nan, 2.0, np.nan, np.nan, np.nan])
    out = tk.smooth(y, 3)
    assert out[:3] == pytest.approx([2.0, 2.0, 2.0], abs=TOL)
    assert np.isnan(out[3:]).all()
    assert tk.smooth(x, 1) == pytest.approx(x)


PEAK_SIGNAL = np.array([0.0, 0.1, 0.5, 0.85, 0.9, 1.0, 0.95, 0.7, 0.9, 0.2])


def test_peak_interval_contiguous_region_around_max():
    # max 1.0 at 5; ≥ 0.8 contiguously over 3..6; the 0.9 at 8 lies behind the 0.7 dip: not included.
    assert tk.peak_interval(PEAK_SIGNAL, 0, 9) == (3, 6)


def test_peak_interval_fraction_and_window():
    assert tk.peak_interval(PEAK_SIGNAL, 0, 9, fraction=0.95) == (5, 6)
    assert tk.peak_interval(PEAK_SIGNAL, 0, 9, fraction=0.6) == (3, 8)
    # Within [7, 9] the maximum is 0.9 at 8 and its neighbours 0.7 and 0.2 are below 0.72.
    assert tk.peak_interval(PEAK_SIGNAL, 7, 9) == (8, 8)
    # The window bounds the interval: [4, 6] is all ≥ 0.8 but the search may not leave it.
    assert tk.peak_interval(PEAK_SIGNAL, 4, 6) == (4, 6)


def test_peak_interval_nan_breaks_region_and_all_nan():
    x = PEAK_SIGNAL.copy()
    x[4] = np.nan
    assert tk.peak_interval(x, 0, 9) == (5, 6)
    assert tk.peak_interval(np.full(5, np.nan), 1, 3) == (1, 1)


# --------------------------------------------------------------------------- segmentation

FPS = 30.0
A1 = {Task.SMILE: 0.08, Task.EYE_CLOSURE: 0.30, Task.BROW_RAISE: 0.04}
A0 = {Task.SMILE: 0.02, Task.EYE_CLOSURE: 0.05, Task.BROW_RAISE: 0.01}


def _quiet(n: int) -> dict[Task, np.ndarray]:
    return {t: np.zeros((n, 2)) for t in Task}


def test_find_segments_three_tasks_in_order_with_rest_before_each():
    """Smile on frames 30–59, eye closure on 90–119, brow raise on 150–179, quiet in between.

    The 3-frame smoothing (0.1 s at 30 fps) makes each square bump 1/3 of its height one frame early and
    late, above the 30 % activity threshold, so each segment is its bump widened by one frame. Rest runs
    from after the previous segment (or frame 0) to the frame before the segment, at most 1 s.
    """
    sig = _quiet(210)
    sig[Task.SMILE][30:60] = 0.1
    sig[Task.EYE_CLOSURE][90:120] = 0.5
    sig[Task.BROW_RAISE][150:180] = 0.05
    segs = tk.find_segments(sig, A1, A0, FPS)
    assert [s.task for s in segs] == [Task.SMILE, Task.EYE_CLOSURE, Task.BROW_RAISE]
    assert [(s.start, s.end) for s in segs] == [(29, 60), (89, 120), (149, 180)]
    assert [(s.rest_start, s.rest_end) for s in segs] == [(0, 28), (61, 88), (121, 148)]
    for s in segs:
        for t in Task:  # rest frames are quiet in every signal
            assert not sig[t][s.rest_start : s.rest_end + 1].any()


def test_find_segments_rest_is_at_most_one_second():
    sig = _quiet(150)
    sig[Task.SMILE][100:130] = 0.1
    (seg,) = tk.find_segments(sig, A1, A0, FPS)
    assert (seg.start, seg.end) == (99, 130)
    assert (seg.rest_start, seg.rest_end) == (69, 98)  # 30 frames = 1 s


def test_find_segments_blink_inside_smile_does_not_split_it():
    """A 3-frame eye closure (a blink) in the middle of a 2-s smile: its frames win the relative
    activation (0.6/0.3 > 0.1/0.08) but the run is shorter than 0.2 s, so it is dropped and the two
    smile runs around it merge into one segment."""
    sig = _quiet(120)
    sig[Task.SMILE][30:90] = 0.1
    sig[Task.EYE_CLOSURE][55:58] = 0.9
    segs = tk.find_segments(sig, A1, A0, FPS)
    assert [(s.task, s.start, s.end) for s in segs] == [(Task.SMILE, 29, 90)]
    assert (segs[0].rest_start, segs[0].rest_end) == (0, 28)


@pytest.mark.parametrize("blink", [0.6, 0.9])
def test_find_segments_ordinary_blink_inside_smile_keeps_one_smile(blink):
    """An ordinary 0.27-s blink (8 frames at 30 fps) in the middle of a 2-s smile (frames 30–89).

    One smile segment (29, 90), rest (0, 28) — as for the 3-frame blink: eye-closure runs shorter than
    0.5 s are blinks, not the task (it used to win the smile as cross-talk, or split it in two with
    "rest" frames taken inside the movement).
    """
    sig = _quiet(120)
    sig[Task.SMILE][30:90] = 0.1
    sig[Task.EYE_CLOSURE][55:63] = blink
    segs = tk.find_segments(sig, A1, A0, FPS)
    assert [(s.task, s.start, s.end, s.rest_start, s.rest_end) for s in segs] == [(Task.SMILE, 29, 90, 0, 28)]


def test_find_segments_drops_weak_cross_talk_next_to_strong_task():
    """Eyes narrowing a little (0.08, rel 0.27) just after a strong smile (rel 1.25): cross-talk."""
    sig = _quiet(150)
    sig[Task.SMILE][30:90] = 0.1
    sig[Task.EYE_CLOSURE][80:100] = 0.08
    segs = tk.find_segments(sig, A1, A0, FPS)
    assert [s.task for s in segs] == [Task.SMILE]


def test_find_segments_no_movement_or_noise_below_floor():
    assert tk.find_segments(_quiet(90), A1, A0, FPS) == []
    rng = np.random.default_rng(1)
    sig = {t: rng.uniform(0, 0.5 * A0[t], (90, 2)) for t in Task}
    assert tk.find_segments(sig, A1, A0, FPS) == []


def test_find_segments_drops_runs_shorter_than_min_duration():
    sig = _quiet(90)
    sig[Task.SMILE][40:42] = 0.1  # 2 frames (4 after smoothing) < 0.2 s = 6 frames
    assert tk.find_segments(sig, A1, A0, FPS) == []


# --------------------------------------------------------------------------- rest and ramps


def test_initial_rest_quiet_frames_before_20_percent():
    b = np.array([np.nan, 0.0, 0.01, 0.0, 0.1, 0.5, 1.0, 1.0])
    valid = np.isfinite(b)
    # First valid frame 1; frames 2, 3 stay below 0.2; frame 4 (0.1 < 0.2) too; frame 5 does not.
    assert tk.initial_rest(b, valid, fps=30.0) == (1, 4)
    # At most rest_max_s: 2 frames at 2 fps with rest_max_s = 1.
    assert tk.initial_rest(b, valid, fps=2.0) == (1, 2)


def test_extend_to_motion_widens_to_the_ramps():
    b = np.array([0.0, 0.0, 0.2, 0.5, 1.0, 1.0, 0.5, 0.2, 0.0])
    seg = tk.Segment(Task.SMILE, 4, 5, 0, 1)
    assert tk.extend_to_motion(b, seg, 0.1, len(b)) == (2, 7)
    # Never into the rest interval, never past limit.
    seg = tk.Segment(Task.SMILE, 4, 5, 0, 2)
    assert tk.extend_to_motion(b, seg, 0.1, 7) == (3, 6)


def test_find_segments_smile_squint_as_strong_as_the_smile_stays_one_smile():
    """A Duchenne smile whose squint reads as much full activation as the smile itself, alternating
    just above and below it frame by frame (as on a real smile under a head turn): one smile segment,
    not a few frames of each (per-frame argmax used to leave a 7-frame smile, rest and peak together)."""
    sig = _quiet(120)
    sig[Task.SMILE][30:90, 1] = 0.08 * 0.9
    sig[Task.EYE_CLOSURE][30:90, 1] = 0.3 * np.where(np.arange(60) % 8 < 4, 0.95, 0.85)
    segs = tk.find_segments(sig, A1, A0, FPS)
    assert [(s.task, s.start, s.end, s.rest_start, s.rest_end) for s in segs] == [(Task.SMILE, 29, 90, 0, 28)]


def test_find_segments_eye_closure_with_cheek_lift_stays_an_eye_closure():
    """A forceful eye closure (rel 3) lifts the cheeks and the mouth corners a little (rel 0.5): the
    closure is much stronger than its concurrent smile signal, so it is the task; the one-way smile→eye
    cross-talk rule does not take it."""
    sig = _quiet(150)
    sig[Task.EYE_CLOSURE][30:90] = 0.9
    sig[Task.SMILE][30:90] = 0.04
    segs = tk.find_segments(sig, A1, A0, FPS)
    assert [s.task for s in segs] == [Task.EYE_CLOSURE]
