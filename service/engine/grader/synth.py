"""Synthetic palsy sequences with known House–Brackmann grades, from real landmark tracks.

No clinical data is available to us, so the shipped grader learns from sequences made here. The
recipe, and what it assumes:

1. **Real tracks of healthy, symmetric movement.** FaceMesh tracks of warp phantoms (a real face photo
   animated with the SAME amplitude on both sides, :mod:`service.phantom`) of each task, and of real
   clips of healthy people. ``scripts/make_grader_data.py`` makes them and caches them (compact, in
   ``models/grader/data/``).
2. **The palsy is the weaker side's motion, attenuated.** Motion = displacement from the rest pose (the
   median of the clip's quiet first frames). Every landmark of the weaker side keeps a fraction ``f``
   of its motion; the fraction is drawn uniformly from the grade's band (:data:`GRADE_FRACTIONS`):
   I ≥ 0.9, II 0.7–0.9, III 0.45–0.7, IV 0.25–0.45, V 0.05–0.25, VI < 0.05. One number per clip: all
   regions of the weaker side are weakened alike (a peripheral, whole-nerve palsy, not a branch lesion),
   and the grade is the grade of THIS task's movement (HB is a whole-face grade; a clip shows one task).
3. **The detector leaks motion across the midline.** FaceMesh's landmarks on a still half-face follow
   the moving half (measured on the image-space palsy phantoms below: at a rendered fraction < 0.05 the
   still side's brow shows ~0.3 of the moving side's motion, the smile 0.2-0.6, and the ratios scatter
   widely between faces). A sequence made by attenuating landmarks directly would look like a
   perfect detector on a palsied face, so the weaker side also gets ``leak · (1 − f)`` of the stronger
   side's mirrored motion, ``leak`` uniform in [0, :data:`LEAK_MAX`] for the task. The training set also
   holds FaceMesh tracks of phantoms rendered WITH the weakness (image-space palsy, labelled by the
   rendered fraction): there the detector's own leak is in the data (``fraction=1`` below).
   After the attenuation the sequence is normalised again (eye line horizontal, unit inter-eye distance,
   from the eye contours it carries), so that a weaker eye's movement shifts the frame as it would in
   :func:`~service.engine.normalize.normalize`.
4. **Rest asymmetry for the severe grades.** Grades V–VI: a static droop of the weaker side, the brow
   and forehead down by :data:`BROW_DROOP_D`, the mouth corner group down and toward the midline by
   :data:`MOUTH_DROOP_D`, in D, uniform in each grade's range. HB IV is "normal symmetry at rest", so it
   gets at most a slight droop (≤ 0.015 D); I–III none.
5. **Jitter** so that the model does not learn one face or one timing: overall amplitude (both sides
   × 0.7–1.3), face shape (x and y scaled 0.93–1.07), timing (length × 0.8–1.25, a smooth monotone
   time warp, 0–8 extra rest frames at the start, 0–15 % of the tail cut), head pose (a slowly varying
   similarity: roll σ 0.3°, scale σ 0.5 %, shift σ 0.004 D, i.e. what normalisation leaves behind: it
   removes the head's roll, scale and position per frame, so only its error remains), and landmark
   noise (i.i.d. Gaussian, σ 0.0005–0.003 D on top of FaceMesh's own).

The weaker side is drawn at random (left or right). What is NOT modelled: synkinesis, contracture, the
eye's Bell's phenomenon, a healthy side that over-acts, branch-selective palsies, real patients' head
motion and bilateral palsy. Grades made this way are a test of the grader's mechanics, not of its
clinical validity.

Data layout: "pair tracks", (T, 2, P, 2) float, ``[:, 0]`` the patient's-left grader landmarks and
``[:, 1]`` their right partners in plain normalised coordinates (:func:`features.pair_tracks`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.engine.grader import features as F

HB_CLASSES: tuple[str, ...] = ("I", "II", "III", "IV", "V", "VI")
#: Fraction of the weaker side's motion kept, [low, high) per grade (I includes 1.0).
GRADE_FRACTIONS: dict[str, tuple[float, float]] = {
    "I": (0.9, 1.0),
    "II": (0.7, 0.9),
    "III": (0.45, 0.7),
    "IV": (0.25, 0.45),
    "V": (0.05, 0.25),
    "VI": (0.0, 0.05),
}
BROW_DROOP_D: dict[str, tuple[float, float]] = {"IV": (0.0, 0.015), "V": (0.015, 0.045), "VI": (0.03, 0.07)}
MOUTH_DROOP_D: dict[str, tuple[float, float]] = {"IV": (0.0, 0.015), "V": (0.02, 0.05), "VI": (0.035, 0.08)}
LEAK_MAX: dict[str, float] = {"smile": 0.4, "eye_closure": 0.3, "brow_raise": 0.35}

_slices: dict[str, slice] = {}
_start = 0
for _name, _idx in F.REGIONS.items():
    _slices[_name] = slice(_start, _start + len(_idx))
    _start += len(_idx)
BROW_SLICE = slice(_slices["brow"].start, _slices["forehead"].stop)
MOUTH_SLICE = _slices["perioral"]


def grade_of_fraction(fraction: float) -> str:
    """The HB grade whose band holds ``fraction`` (the weaker side's share of the stronger side's motion)."""
    f = float(fraction)
    for label in HB_CLASSES[1:]:
        lo, hi = GRADE_FRACTIONS[label]
        if lo <= f < hi:
            return label
    return "I" if f >= GRADE_FRACTIONS["I"][0] else "VI"


def draw_fraction(grade: str, rng: np.random.Generator) -> float:
    lo, hi = GRADE_FRACTIONS[grade]
    return float(rng.uniform(lo, hi))


@dataclass(frozen=True)
class Jitter:
    """Ranges of the nuisance variation (see the module docstring, item 5)."""

    amplitude: tuple[float, float] = (0.7, 1.3)
    shape: tuple[float, float] = (0.93, 1.07)
    length: tuple[float, float] = (0.8, 1.25)
    warp: float = 0.35
    extra_rest: int = 8
    tail_cut: float = 0.15
    roll_deg: float = 0.3
    scale: float = 0.005
    shift_d: float = 0.004
    noise_d: tuple[float, float] = (0.0005, 0.003)


def resample_time(pairs: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Linear interpolation of (T, ...) tracks at fractional frame positions ``times`` (clipped)."""
    t = pairs.shape[0]
    x = np.clip(np.asarray(times, dtype=np.float64), 0.0, t - 1.0)
    i0 = np.floor(x).astype(int)
    i1 = np.minimum(i0 + 1, t - 1)
    w = (x - i0).reshape((-1,) + (1,) * (pairs.ndim - 1))
    return np.asarray((1.0 - w) * pairs[i0] + w * pairs[i1])


def _smooth_walk(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """A slowly varying zero-mean series of std ~sigma (random walk, low-passed, rescaled)."""
    steps = rng.normal(size=n + 20).cumsum()
    k = np.hanning(15)
    walk = np.convolve(steps, k / k.sum(), mode="same")[10 : 10 + n]
    walk -= walk.mean()
    sd = walk.std()
    return np.asarray(walk / sd * sigma if sd > 0 else walk) + rng.normal(0.0, sigma)


_EYE = _slices["periocular"]


def renormalize(pairs: np.ndarray) -> np.ndarray:
    """Re-apply :func:`~service.engine.normalize.normalize`'s rotation and scale to pair tracks.

    The eye centres are the means of the two 16-point eye contours the pair tracks carry (the same points
    ``normalize`` uses); the origin (the nose tip, not part of the set) stays where it is. The identity
    on tracks that are already normalised.
    """
    c_l = pairs[:, 0, _EYE].mean(axis=1)
    c_r = pairs[:, 1, _EYE].mean(axis=1)
    v = c_l - c_r
    ang = np.arctan2(v[:, 1], v[:, 0])[:, None, None]
    d = np.linalg.norm(v, axis=-1)[:, None, None]
    c, s = np.cos(ang), np.sin(ang)
    x, y = pairs[..., 0], pairs[..., 1]
    return np.stack([(c * x + s * y) / d, (-s * x + c * y) / d], axis=-1)


def make_palsy(
    pairs: np.ndarray,
    rest_frames: int,
    *,
    grade: str,
    task: str,
    rng: np.random.Generator,
    fraction: float | None = None,
    weaker: int | None = None,
    jitter: Jitter | None = None,
) -> np.ndarray:
    """One synthetic sequence of ``grade`` from a real track.

    Parameters
    ----------
    pairs
        (T, 2, P, 2) pair tracks of a movement; the first ``rest_frames`` frames are at rest.
    grade
        The HB label the sequence should show (its rest droop; and its fraction when ``fraction`` is None).
    task
        "smile", "eye_closure" or "brow_raise" (sets the leak range).
    fraction
        Motion fraction to apply to the weaker side; None draws one from the grade's band. Use 1.0 for a
        track whose weakness is already in the pixels (an image-space palsy phantom).
    weaker
        0 = patient's left, 1 = right; None draws one. For image-space palsy tracks pass the rendered
        weaker side, so the droop lands on the same side.

    Returns
    -------
    ndarray (T', 2, P, 2)
    """
    jit = jitter or Jitter()
    arr = np.asarray(pairs, dtype=np.float64)
    if arr.ndim != 4 or arr.shape[1:] != (2, F.N_PAIRS, 2):
        raise ValueError(f"pairs must have shape (T, 2, {F.N_PAIRS}, 2); got {arr.shape}")
    ok = np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
    if ok.sum() < 2:
        raise ValueError("track has fewer than 2 complete frames")
    if not ok.all():  # fill gaps first: everything below works on complete frames
        arr = F.fill_and_resample(arr, len(arr))
    f = draw_fraction(grade, rng) if fraction is None else float(fraction)
    w = int(rng.integers(2)) if weaker is None else int(weaker)
    s = 1 - w
    mirror = np.array([-1.0, 1.0])

    rest = np.median(arr[: max(1, rest_frames)], axis=0)  # (2, P, 2)
    motion = (arr - rest) * rng.uniform(*jit.amplitude)
    if f < 1.0:
        leak = rng.uniform(0.0, LEAK_MAX.get(task, 0.2))
        motion[:, w] = f * motion[:, w] + leak * (1.0 - f) * motion[:, s] * mirror
    rest = rest.copy()
    if grade in BROW_DROOP_D:
        rest[w, BROW_SLICE, 1] -= rng.uniform(*BROW_DROOP_D[grade])
        drop = rng.uniform(*MOUTH_DROOP_D[grade])
        rest[w, MOUTH_SLICE, 1] -= drop
        # toward the midline: x shrinks in magnitude on either side
        rest[w, MOUTH_SLICE, 0] -= np.sign(rest[w, MOUTH_SLICE, 0]) * 0.4 * drop
    out = renormalize(rest + motion)
    out = out * np.array([rng.uniform(*jit.shape), rng.uniform(*jit.shape)])

    # timing: extra rest at the start, tail cut, overall length and a smooth monotone warp
    n = len(out)
    extra = int(rng.integers(0, jit.extra_rest + 1))
    keep = n - int(rng.uniform(0.0, jit.tail_cut) * n)
    n_out = max(8, int(round((keep + extra) * rng.uniform(*jit.length))))
    u = np.linspace(0.0, 1.0, n_out)
    c = rng.uniform(-jit.warp, jit.warp)
    u = u + c * np.sin(2 * np.pi * u) / (2 * np.pi)  # monotone for |c| < 1
    src = u * (keep - 1 + extra) - extra
    out = resample_time(out, np.maximum(src, 0.0))

    # head pose left over after normalisation: a slowly varying similarity about the nose tip
    m = len(out)
    roll = np.radians(_smooth_walk(rng, m, jit.roll_deg))
    scale = 1.0 + _smooth_walk(rng, m, jit.scale)
    tx, ty = _smooth_walk(rng, m, jit.shift_d), _smooth_walk(rng, m, jit.shift_d)
    cr, sr = np.cos(roll)[:, None, None], np.sin(roll)[:, None, None]
    x, y = out[..., 0], out[..., 1]
    sc = scale[:, None, None]
    out = np.stack(
        [sc * (cr * x - sr * y) + tx[:, None, None], sc * (sr * x + cr * y) + ty[:, None, None]], axis=-1
    )
    out = out + rng.normal(0.0, rng.uniform(*jit.noise_d), out.shape)
    return np.asarray(out)
