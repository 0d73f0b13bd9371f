"""Grader inputs from normalised landmark tracks: the landmark set, resampling and the two streams.

Everything is in the normalised frame of :mod:`service.engine.normalize` (x toward the PATIENT's left,
y up, unit D = inter-eye distance, origin at the nose tip). Sides are the PATIENT's.

Landmark set (:data:`LEFT_POINTS`, P = 40 pairs): each patient's-LEFT point and its MIRROR partner on
the right. The seed names brow, forehead and periocular landmarks; those alone see nothing of a smile
(a smile moves neither brows nor lids), so the perioral mouth-corner group is added:

* brow (10): MediaPipe's FACEMESH_LEFT_EYEBROW, :data:`~service.engine.normalize.LEFT_BROW`;
* forehead (6): the mesh points above the left brow, 333 299 337 332 297 338 (frontalis);
* periocular (16): the ordered left eye contour, :data:`~service.engine.normalize.LEFT_EYE_CONTOUR`;
* perioral (8): the commissure group of :mod:`service.engine.tasks` (291 308 375 409 287), the upper and
  lower lip beside it (270, 321) and the cheek above it (425).

Regions are kept together in that order so that neighbouring columns of the symmetry map are neighbours
on the face (the CNN's 3x3 kernels see a region at a time).

Streams (T = :data:`N_FRAMES` = 96 after resampling):

* stream 1, the symmetry map, shape (C = 6, T, P): channels 0-1 are (dx, dy) = left point − mirrored
  right partner (x → −x), i.e. the positional asymmetry including any asymmetry at rest (a drooping
  brow or mouth corner), times :data:`MAP_SCALE`; channels 2-3 are the left side's motion from the
  rest pose and channels 4-5 the mirrored right side's motion (their difference is the motion
  asymmetry; keeping both lets the CNN relate the weaker side's motion to the stronger side's, which is
  what a grade is), divided by the clip's motion scale (the 99th percentile of the per-point motion
  of both sides, at least :data:`MIN_MOTION_D`), so that a 0.03 D eye closure and a 0.25 D smile
  reach the CNN at the same size; the absolute amplitude stays visible in stream 2;
* stream 2, the frame-to-frame displacement of the landmarks, shape (T, 4P): per frame, for each pair,
  (dx, dy) of the left point and (dx, dy) of the mirrored right partner; frame 0 is zero.

Fixed scales (:data:`MAP_SCALE`, :data:`VELOCITY_SCALE`) bring typical values to order 1; they are
stored in the model's metadata. Rest = median of the first :data:`REST_FRAMES`
resampled frames (clips start at rest: the pipeline's task segments and the training data both do).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.engine import normalize as nz
from service.errors import NotAnalysableError

#: Bumped whenever the inputs below change meaning; a model records the version it was trained on.
FEATURE_VERSION = 2
N_FRAMES = 96
REST_FRAMES = 6
MAP_SCALE = 10.0
MOTION_PERCENTILE = 99.0
MIN_MOTION_D = 0.01
VELOCITY_SCALE = 50.0

BROW: tuple[int, ...] = tuple(nz.LEFT_BROW)
FOREHEAD: tuple[int, ...] = (333, 299, 337, 332, 297, 338)
PERIOCULAR: tuple[int, ...] = tuple(nz.LEFT_EYE_CONTOUR)
PERIORAL: tuple[int, ...] = (291, 308, 375, 409, 287, 270, 321, 425)
REGIONS: dict[str, tuple[int, ...]] = {
    "brow": BROW,
    "forehead": FOREHEAD,
    "periocular": PERIOCULAR,
    "perioral": PERIORAL,
}
#: The patient's-left landmark of every pair, region by region.
LEFT_POINTS: tuple[int, ...] = BROW + FOREHEAD + PERIOCULAR + PERIORAL
#: Their MIRROR partners on the patient's right, in the same order.
RIGHT_POINTS: tuple[int, ...] = tuple(int(nz.MIRROR[i]) for i in LEFT_POINTS)
N_PAIRS = len(LEFT_POINTS)
N_CHANNELS = 6
MOTION_FEATURES = 4 * N_PAIRS

_left_set = set(nz.LEFT_HALF)
if len(set(LEFT_POINTS)) != N_PAIRS or not set(LEFT_POINTS) <= _left_set:
    raise ImportError("grader landmark set must be distinct points of the patient's left half")


@dataclass(frozen=True)
class Features:
    """One clip's model inputs: ``symmetry`` (6, 96, P) and ``motion`` (96, 4P), float32."""

    symmetry: np.ndarray
    motion: np.ndarray


def pair_tracks(norm: np.ndarray) -> np.ndarray:
    """Pick the grader's landmarks out of full normalised tracks.

    Parameters
    ----------
    norm : ndarray, shape (T, 478, 2)
        Normalised landmarks (NaN rows for frames without a face are allowed).

    Returns
    -------
    ndarray, shape (T, 2, P, 2), float64
        ``[:, 0]`` the patient's-left points :data:`LEFT_POINTS`, ``[:, 1]`` their right partners
        :data:`RIGHT_POINTS`, both in plain normalised coordinates (NOT mirrored).
    """
    arr = np.asarray(norm, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[1] != nz.N_LANDMARKS or arr.shape[2] < 2:
        raise ValueError(f"norm must have shape (T, {nz.N_LANDMARKS}, 2); got {arr.shape}")
    return np.stack([arr[:, LEFT_POINTS, :2], arr[:, RIGHT_POINTS, :2]], axis=1)


def swap_sides(pairs: np.ndarray) -> np.ndarray:
    """The same face seen in a mirror: left and right swap and x changes sign. (T, 2, P, 2) → same."""
    out = np.asarray(pairs, dtype=np.float64)[:, ::-1].copy()
    out[..., 0] = -out[..., 0]
    return out


def fill_and_resample(pairs: np.ndarray, n_frames: int = N_FRAMES) -> np.ndarray:
    """Fill frames without a face by linear interpolation in time and resample to ``n_frames``.

    A frame is missing when any of its grader landmarks is not finite. Gaps inside the clip are
    interpolated; leading and trailing gaps take the nearest valid frame. Input frames are taken as
    equally spaced in time.

    Raises
    ------
    NotAnalysableError
        Fewer than 2 frames have every grader landmark.
    """
    arr = np.asarray(pairs, dtype=np.float64)
    if arr.ndim != 4 or arr.shape[1:] != (2, N_PAIRS, 2):
        raise ValueError(f"pairs must have shape (T, 2, {N_PAIRS}, 2); got {arr.shape}")
    t = arr.shape[0]
    flat = arr.reshape(t, -1)
    valid = np.isfinite(flat).all(axis=1)
    if valid.sum() < 2:
        raise NotAnalysableError(["grader: fewer than 2 frames with a face"])
    src = np.flatnonzero(valid).astype(np.float64)
    good = flat[valid]
    # Output sample k sits at input time k * (t - 1) / (n - 1): the clip's first to last frame.
    grid = np.clip(np.linspace(0.0, t - 1.0, n_frames), src[0], src[-1])
    hi = np.clip(np.searchsorted(src, grid, side="right"), 1, len(src) - 1)
    lo = hi - 1
    w = ((grid - src[lo]) / (src[hi] - src[lo]))[:, None]
    out = (1.0 - w) * good[lo] + w * good[hi]
    return out.reshape(n_frames, 2, N_PAIRS, 2)


def streams(resampled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both streams from resampled pair tracks (..., 96, 2, P, 2); leading batch axes are kept.

    Returns ``symmetry`` (..., 6, 96, P) and ``motion`` (..., 96, 4P), float32.
    """
    res = np.asarray(resampled, dtype=np.float64)
    if res.shape[-4:] != (N_FRAMES, 2, N_PAIRS, 2):
        raise ValueError(f"resampled tracks must end in ({N_FRAMES}, 2, {N_PAIRS}, 2); got {res.shape}")
    left = res[..., 0, :, :]
    right_m = res[..., 1, :, :] * np.array([-1.0, 1.0])  # right partner reflected onto the left side
    rest_l = np.median(left[..., :REST_FRAMES, :, :], axis=-3, keepdims=True)
    rest_r = np.median(right_m[..., :REST_FRAMES, :, :], axis=-3, keepdims=True)
    move = np.concatenate([left - rest_l, right_m - rest_r], axis=-1)  # (..., T, P, 4)
    # The clip's motion scale: a high percentile of the per-point motion of both sides (>= MIN_MOTION_D)
    mag = np.sqrt(move[..., 0::2] ** 2 + move[..., 1::2] ** 2)
    flat = mag.reshape(mag.shape[:-3] + (-1,))
    scale = np.maximum(np.percentile(flat, MOTION_PERCENTILE, axis=-1), MIN_MOTION_D)
    sym = np.concatenate(
        [MAP_SCALE * (left - right_m), move / scale[..., None, None, None]], axis=-1
    )  # (..., T, P, 6)
    symmetry = np.moveaxis(sym, -1, -3)
    both = np.concatenate([left, right_m], axis=-1)  # (..., T, P, 4)
    vel = np.zeros_like(both)
    vel[..., 1:, :, :] = both[..., 1:, :, :] - both[..., :-1, :, :]
    motion = (VELOCITY_SCALE * vel).reshape(res.shape[:-4] + (N_FRAMES, MOTION_FEATURES))
    return symmetry.astype(np.float32), motion.astype(np.float32)


def extract(pairs: np.ndarray) -> Features:
    """The two streams of one clip from its pair tracks (see the module docstring).

    Parameters
    ----------
    pairs : ndarray, shape (T, 2, P, 2)
        From :func:`pair_tracks`; any T with >= 2 complete frames.
    """
    symmetry, motion = streams(fill_and_resample(pairs))
    return Features(symmetry, motion)


def features_from_norm(norm: np.ndarray) -> Features:
    """:func:`extract` of :func:`pair_tracks` for full normalised tracks (T, 478, 2)."""
    return extract(pair_tracks(norm))
