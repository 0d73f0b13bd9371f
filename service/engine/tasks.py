"""The three motion signals, task segmentation, rest and peak detection.

All positions are in the normalised frame of :mod:`service.engine.normalize`: origin at the nose tip,
unit D (inter-eye distance), x toward the PATIENT's left, y up. Signals are per patient side, shape
(T, 2) with column 0 = left, column 1 = right.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.domain import Task
from service.engine import normalize as nz

LEFT, RIGHT = 0, 1

#: Mouth-corner group on the patient's left: the commissure and the lip points around it.
SMILE_LEFT: tuple[int, ...] = (291, 308, 375, 409, 287)
#: Canthi on the patient's left: brow lift is measured relative to them, which cancels head nods.
CANTHI_LEFT: tuple[int, ...] = (263, 362)
#: Points that a smile, eye closure or brow raise hardly move: the nasal dorsum. On the midline, so a
#: palsied (or, in a phantom, frozen) half cannot drag the reference.
STABLE: tuple[int, ...] = (168, 6, 197, 195, 5)


def mirrored(indices: tuple[int, ...]) -> tuple[int, ...]:
    """The patient's-right partners of left-side landmark indices (the committed mirror map)."""
    return tuple(int(nz.MIRROR[i]) for i in indices)


def groups(task: Task) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(left, right) landmark indices whose displacement defines ``task``; right[i] mirrors left[i]."""
    if task is Task.SMILE:
        left = SMILE_LEFT
    elif task is Task.BROW_RAISE:
        left = tuple(nz.LEFT_BROW)
    else:
        left = tuple(nz.LEFT_EYE_CONTOUR)
    return left, mirrored(left)


#: Direction of a smile's commissure excursion on the patient's left (x toward the left, y up): up and
#: outward at 45°; the right side's is its mirror image.
SMILE_DIRECTION_LEFT = np.array([np.sqrt(0.5), np.sqrt(0.5)])


def smile_signal(disp_left: np.ndarray, disp_right: np.ndarray) -> np.ndarray:
    """Commissure excursion: the mouth-corner group's mean displacement from rest along the smile direction.

    ``disp_*`` are (T, N, 2) displacements in D (x toward the patient's left, y up); returns (T, 2)
    [left, right] in D. Why a projection and not the plain distance: a still corner that the head or the
    healthy side drags (down or toward the midline) would otherwise read as movement; a smile lifts the
    corner up and out. Negative values (moved against the smile) are kept here and clipped to 0 only
    when the magnitude is taken.
    """
    right_dir = SMILE_DIRECTION_LEFT * np.array([-1.0, 1.0])
    return np.stack(
        [np.nanmean(d, axis=1) @ u for d, u in ((disp_left, SMILE_DIRECTION_LEFT), (disp_right, right_dir))],
        axis=1,
    )


def brow_signal(
    brow_left: np.ndarray, brow_right: np.ndarray, canthi_left: np.ndarray, canthi_right: np.ndarray
) -> np.ndarray:
    """Upward brow displacement relative to the canthi: mean dy(brow) − mean dy(canthi), (T, 2) in D.

    Inputs are (T, N, 2) displacements from rest (y up); negative values (brow lowered) are kept here
    and clipped only when the magnitude is taken.
    """
    return np.stack(
        [
            np.nanmean(b[..., 1], axis=1) - np.nanmean(c[..., 1], axis=1)
            for b, c in ((brow_left, canthi_left), (brow_right, canthi_right))
        ],
        axis=1,
    )


def eye_closure_signal(norm: np.ndarray, rest_pose: np.ndarray) -> np.ndarray:
    """Closure fraction 1 − A(t)/A(rest) of each eye's 16-point contour (shoelace area), (T, 2)."""
    out = []
    for contour in (nz.LEFT_EYE_CONTOUR, nz.RIGHT_EYE_CONTOUR):
        idx = list(contour)
        area_rest = float(nz.shoelace_area(rest_pose[idx]))
        area = nz.shoelace_area(norm[:, idx])
        out.append(1.0 - area / max(area_rest, 1e-9))
    return np.stack(out, axis=1)


def landmark_signals(norm: np.ndarray, rest_pose: np.ndarray) -> dict[Task, np.ndarray]:
    """All three signals from normalised landmarks (T, 478, 2) against a rest pose (478, 2)."""
    disp = norm - rest_pose[None]
    sl, sr = groups(Task.SMILE)
    bl, br = groups(Task.BROW_RAISE)
    cl = list(CANTHI_LEFT)
    cr = list(mirrored(CANTHI_LEFT))
    return {
        Task.SMILE: smile_signal(disp[:, list(sl)], disp[:, list(sr)]),
        Task.EYE_CLOSURE: eye_closure_signal(norm, rest_pose),
        Task.BROW_RAISE: brow_signal(disp[:, list(bl)], disp[:, list(br)], disp[:, cl], disp[:, cr]),
    }


def smooth(x: np.ndarray, width: int) -> np.ndarray:
    """Centred moving average over ``width`` samples ignoring NaN (NaN where the window has no data)."""
    if width <= 1:
        return x.astype(float)
    finite = np.isfinite(x)
    kernel = np.ones(width)
    num = np.convolve(np.where(finite, x, 0.0), kernel, mode="same")
    den = np.convolve(finite.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1e-12), np.nan)


def peak_interval(bilateral: np.ndarray, lo: int, hi: int, fraction: float = 0.8) -> tuple[int, int]:
    """Contiguous frames around the maximum of ``bilateral`` within [lo, hi] where it stays ≥ fraction·max."""
    seg = bilateral[lo : hi + 1]
    if not np.isfinite(seg).any():
        return lo, lo
    k = int(np.nanargmax(seg))
    top = seg[k]
    level = fraction * top if top > 0 else top
    a = k
    while a > 0 and np.isfinite(seg[a - 1]) and seg[a - 1] >= level:
        a -= 1
    b = k
    while b < len(seg) - 1 and np.isfinite(seg[b + 1]) and seg[b + 1] >= level:
        b += 1
    return lo + a, lo + b


@dataclass(frozen=True)
class Segment:
    """One task's movement in a clip: [start, end] inclusive frames; rest [rest_start, rest_end]."""

    task: Task
    start: int
    end: int
    rest_start: int
    rest_end: int


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Inclusive [a, b] runs of True in a 1-D boolean array."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1, strict=True))


def _stronger_side(signal: np.ndarray) -> np.ndarray:
    """(T, 2) per-side signal → (T,) the larger side per frame (NaN where neither side has a value)."""
    finite = np.isfinite(signal)
    out = np.where(finite, signal, -np.inf).max(axis=1)
    return np.where(finite.any(axis=1), out, np.nan)


#: Involuntary movement that a task causes elsewhere: {moved: cause}. A smile narrows the eyes.
CROSS_TALK: dict[Task, Task] = {Task.EYE_CLOSURE: Task.SMILE}
#: How much stronger (in units of full activation) a movement must be than a concurrent or neighbouring
#: one to count as a task of its own rather than its cross-talk.
CROSS_TALK_RATIO = 2.0


def find_segments(
    signals: dict[Task, np.ndarray],
    full_activation: dict[Task, float],
    noise_floor: dict[Task, float],
    fps: float,
    *,
    active_fraction: float = 0.3,
    min_duration_s: float = 0.2,
    merge_gap_s: float = 0.3,
    rest_max_s: float = 1.0,
    min_blink_free_s: float = 0.5,
) -> list[Segment]:
    """Find which tasks a clip contains and where (``--task auto``).

    Each task's stronger-side signal, in units of its full activation a1, is active where it exceeds
    ``active_fraction`` of its clip maximum (and that maximum exceeds the noise floor a0). Every active
    frame goes to the task with the largest relative activation, except that an eye closure concurrent with
    a smile is the smile's unless much stronger (:data:`CROSS_TALK`); runs shorter than ``min_duration_s`` go,
    runs of one task closer than ``merge_gap_s`` merge, and a run next to a much stronger run of another
    task is cross-talk (a smile narrows the eyes) and goes too.
    """
    tasks = list(signals)
    n_frames = next(iter(signals.values())).shape[0]
    width = max(1, int(round(0.1 * fps)) | 1)
    rel = {}
    active = {}
    for task in tasks:
        # Either side moving is a movement: the stronger side's signal, not the bilateral mean, which a
        # still (palsied) half would halve.
        sig = smooth(_stronger_side(signals[task]), width)
        rel[task] = sig / full_activation[task]
        top = np.nanmax(sig) if np.isfinite(sig).any() else 0.0
        active[task] = (
            (sig >= max(noise_floor[task], active_fraction * top))
            if top > noise_floor[task]
            else np.zeros(n_frames, bool)
        )
    stack = np.stack([np.where(active[t], np.nan_to_num(rel[t], nan=-np.inf), -np.inf) for t in tasks])
    label = np.where(np.isfinite(stack.max(axis=0)), stack.argmax(axis=0), -1)
    # Physiological cross-talk is one-way: a smile narrows the eyes (the cheeks rise), while closing the
    # eyes does not lift the mouth corners up and out. So a frame where both are active is the smile's
    # unless the closure is much stronger; a per-frame tie would otherwise split one smile into runs.
    for moved, causes in CROSS_TALK.items():
        if moved in tasks and causes in tasks:
            m, c = tasks.index(moved), tasks.index(causes)
            both = (label == m) & active[causes]
            moved_rel, cause_rel = np.nan_to_num(rel[moved], nan=0.0), np.nan_to_num(rel[causes], nan=0.0)
            weak = moved_rel <= CROSS_TALK_RATIO * cause_rel
            label = np.where(both & weak, c, label)

    runs: list[list[int]] = []  # [task_index, a, b]
    for ti in range(len(tasks)):
        for a, b in _runs(label == ti):
            runs.append([ti, int(a), int(b)])
    runs.sort(key=lambda r: r[1])
    # Drop blips first, then merge what they interrupted. Blinks (up to ~0.4 s) are not the eye-closure
    # task, which is held for a second or more.
    def min_len(task: Task) -> int:
        seconds = max(min_duration_s, min_blink_free_s) if task is Task.EYE_CLOSURE else min_duration_s
        return max(2, int(round(seconds * fps)))

    runs = [r for r in runs if r[2] - r[1] + 1 >= min_len(tasks[r[0]])]
    merged: list[list[int]] = []
    gap = int(round(merge_gap_s * fps))
    for r in runs:
        if merged and merged[-1][0] == r[0] and r[1] - merged[-1][2] <= gap:
            merged[-1][2] = r[2]
        else:
            merged.append(r)

    def peak(r: list[int]) -> float:
        return float(np.nanmax(rel[tasks[r[0]]][r[1] : r[2] + 1]))

    kept = []
    for i, r in enumerate(merged):
        neighbours = [m for j, m in enumerate(merged) if j != i and m[0] != r[0]
                      and (abs(m[1] - r[2]) <= gap or abs(r[1] - m[2]) <= gap or (m[1] <= r[1] <= m[2]))]
        if any(peak(m) > CROSS_TALK_RATIO * peak(r) for m in neighbours):
            continue
        kept.append(r)

    segments = []
    prev_end = -1
    rest_max = max(2, int(round(rest_max_s * fps)))
    for ti, a, b in kept:
        rest_end = a - 1
        if rest_end - prev_end < 2:  # no quiet frames before it: use the first frames of the segment
            rest_start, rest_end = a, min(a + 2, b)
        else:
            rest_start = max(prev_end + 1, rest_end - rest_max + 1)
        segments.append(Segment(tasks[ti], a, b, rest_start, rest_end))
        prev_end = b
    return segments


def extend_to_motion(bilateral: np.ndarray, seg: Segment, level: float, limit: int) -> tuple[int, int]:
    """Widen [start, end] to the ramps: while the smoothed signal stays above ``level``, within [0, limit)."""
    a, b = seg.start, seg.end
    while a > seg.rest_end + 1 and np.isfinite(bilateral[a - 1]) and bilateral[a - 1] > level:
        a -= 1
    while b < limit - 1 and np.isfinite(bilateral[b + 1]) and bilateral[b + 1] > level:
        b += 1
    return a, b


def initial_rest(
    bilateral: np.ndarray, valid: np.ndarray, fps: float, rest_max_s: float = 1.0
) -> tuple[int, int]:
    """Quiet frames at the start of a single-task clip: valid frames before the signal reaches 20 % of its
    maximum, at most ``rest_max_s``, at least 2 frames."""
    first = int(np.flatnonzero(valid)[0])
    top = np.nanmax(bilateral) if np.isfinite(bilateral).any() else 0.0
    end = first
    limit = first + max(2, int(round(rest_max_s * fps)))
    while end + 1 < min(limit, len(bilateral)) and (
        not np.isfinite(bilateral[end + 1]) or bilateral[end + 1] < 0.2 * top
    ):
        end += 1
    return first, max(end, min(first + 1, len(bilateral) - 1))
