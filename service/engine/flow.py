"""Regional optical-flow Symmetry Score (Taufique, Savakis & Leckenby 2019; DESIGN.md, "Scores").

Pure numpy + OpenCV, no I/O. Input: the grey face crops of :class:`service.engine.pixels.CropStore` (one
per frame, None where there was no face) and every frame's landmarks in crop pixels.

Steps, for frames ``start..end``:

1. **Pose.** Every frame is warped onto the reference frame's face pose (frame ``start``, or the first
   frame with a face after it) by a similarity transform fitted to landmarks that expressions barely
   move (:data:`STABLE_LANDMARKS`: upper nasal dorsum, inner canthi, and the face outline at eye level),
   by least squares with one trimming pass (points off by more than 3× the median residual, and 1 px,
   are dropped and the fit repeated; LMEDS on the seven dorsum + canthi points was tried and measured
   worse: with 3 of 7 points moving together in a smile it kept them and turned a still head by 2°). The
   fitted parameters are then averaged over
   :data:`POSE_SMOOTH_FRAMES` consecutive frames, which removes the landmark jitter but keeps head motion.
   The same warp levels the eye line and resamples the face so that the inter-eye distance D is
   ``FlowParams.eye_distance_px`` pixels, into a window just big enough for the six regions. Head
   translation, rotation and scaling are therefore not counted as facial motion.
2. **Regions.** Six landmark polygons on the reference frame: forehead (above the brows, up to the
   highest forehead landmarks), eye (the brow, the eye and the lids down to the second landmark ring
   under the lower lid), cheek incl. mouth (under the eye to just inside the jaw line, lateral to the
   nose, with the lateral half of the lips and the mouth corner). The patient's left polygons are index
   lists (MediaPipe's LEFT_* side: the image's right in a non-mirrored frame); the right ones are their
   images under :data:`service.engine.normalize.MIRROR`, so the two sides are mirror images by
   construction. Rasterised once with ``cv2.fillPoly``.
3. **Flow.** Dense flow between consecutive warped frames (DIS: the ultrafast preset refined down to half
   resolution, see :class:`_Flow`; or Farneback). The
   lateral (x) component is divided by each side's half-face width (eye centre to facial midline) over
   D/2: a turned head foreshortens one side, which would otherwise read as weaker. Then, per frame pair,
   magnitudes below ``k`` × the crop's mean magnitude are set to zero (k = 6, the paper's value).
4. **Scores.** Per region and side, f_t = Σ_region m / M with M the region's pixel count;
   ``VS = Σ_t f_t / (N − 1)`` over the N − 1 consecutive frame pairs measured;
   ``SS = clip(1 − λ · |VS_L − VS_R|, 0, 1)`` with λ = 3.8.

Normalisation: what "the crop", M and the unit of VS are, and why
------------------------------------------------------------------
* **The crop's mean** is taken over the area of :class:`CropStore`'s window, :data:`CROP_AREA_D2` = 4 D ×
  4.6 D, with the flow outside the regions' window (hair, neck, background: not computed, for speed)
  counted as zero. The paper's k = 6 was set on whole video frames where the face is a fraction of the
  picture; over a face-tight window the moving cheeks are so large a part of the mean that nothing
  clears 6× it (measured: under 0.3 % of pixels kept, on every clip). Over the crop area, k = 6 keeps the few
  per cent of pixels that move clearly and drops landmark jitter and sensor noise.
* **M = the region's pixel count**: f is a per-pixel mean, so VS does not grow with a region's area
  (cheek ≫ eye) and the two sides compare fairly when their polygons differ in pixels.
* **Unit of VS: D/100 per frame** (:data:`VS_UNIT_D`), independent of the crop scale. In plain D per
  frame a full smile gives VS ≈ 0.001 and SS could never leave 0.99; in D/100 per frame, a real smile
  with one half frozen gives |VS_L − VS_R| ≈ 0.15, where the paper's λ = 3.8 puts a frozen-half cheek
  (SS ≈ 0.4–0.6). VS is per frame: with ``fps`` given it is rescaled to 30 frames/s
  (``VS × fps / 30``) so clips at other rates compare; either way it depends on how much of
  ``start..end`` is still, so pass the motion segment, not a whole session.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from service.domain import RegionSymmetry
from service.engine import normalize as nz
from service.errors import InvalidParameterError

__all__ = [
    "ALGORITHMS",
    "CROP_AREA_D2",
    "POSE_SMOOTH_FRAMES",
    "REFERENCE_FPS",
    "REGIONS",
    "REGION_POLYGONS_LEFT",
    "STABLE_LANDMARKS",
    "VS_UNIT_D",
    "FlowParams",
    "RegionSymmetry",
    "region_polygons",
    "regional_symmetry",
]

ALGORITHMS = ("dis", "farneback")
REGIONS = ("forehead", "eye", "cheek")
#: Landmarks fitted for the pose: upper nasal dorsum (168, 6), inner canthi (133, 362) and the face
#: outline at eye level (127/356, 234/454, 162/389). Measured on phantoms without head motion, the lower
#: dorsum (197, 195, 5) follows the nose in a smile and turned a still head by up to 2° and 7 % scale;
#: this set stays within 1° and 1.5 %.
STABLE_LANDMARKS: tuple[int, ...] = (168, 6, 133, 362, 127, 356, 234, 454, 162, 389)
#: Frames over which the pose parameters are averaged (odd; 1 = no smoothing).
POSE_SMOOTH_FRAMES = 5
#: Unit of VS and of the per-frame values: 1/100 of the inter-eye distance D (per frame).
VS_UNIT_D = 0.01
#: Area of CropStore's window (4 D × 4.6 D) over which "the crop's mean magnitude" is taken, in D².
CROP_AREA_D2 = 4.0 * 4.6
#: Reference frame rate for ``fps`` rescaling.
REFERENCE_FPS = 30.0
#: Margin around the regions' bounding box in the warped window, in D.
_MARGIN_D = 0.15
#: Landmarks on the facial midline used to split the window into the patient's left and right.
_MIDLINE = (10, 151, 9, 8, 168, 6, 197, 195, 5, 4, 1)

#: The patient's LEFT regions as closed landmark polygons (MediaPipe indices, in order around the region).
REGION_POLYGONS_LEFT: dict[str, tuple[int, ...]] = {
    # Brow upper edge (medial → lateral), then the forehead landmarks back to the one beside the midline.
    "forehead": (336, 296, 334, 293, 300, 301, 251, 284, 332, 297, 338, 337),
    # Brow upper edge, lateral canthal area, second ring under the lower lid (lateral → medial), up the
    # side of the nasal bridge to the brow's medial end (the brow lies inside: brow raise counts here
    # and in the forehead).
    "eye": (336, 296, 334, 293, 300, 383, 372, 446, 261, 448, 449, 450, 451, 452, 453, 464, 413, 285),
    # Under the eye (medial → lateral), down just inside the jaw line to the chin, up through the lips
    # ~0.2 D from the midline, beside the nostril and along the nose back to under the eye.
    "cheek": (
        453, 452, 451, 450, 449, 448, 261, 446, 372, 447, 366, 401, 435, 367, 364, 394, 395, 369, 396,
        421, 313, 314, 267, 393, 294, 279, 429, 437, 343, 357,
    ),
}


@dataclass(frozen=True)
class FlowParams:
    """Settings of the regional optical-flow symmetry.

    Attributes
    ----------
    k
        Per frame pair, magnitudes below ``k`` × the crop's mean magnitude are set to zero (paper: 6).
    lam
        λ in SS = clip(1 − λ·|VS_L − VS_R|, 0, 1) (paper: 3.8), per unit of VS (D/100 per frame).
    eye_distance_px
        Inter-eye distance the frames are resampled to before the flow, in pixels (the crop scale).
    algorithm
        "dis" (OpenCV DIS, ~1.5 ms a frame in all at 64 px on 2 cores) or "farneback" (~5× slower).
    """

    k: float = 6.0
    lam: float = 3.8
    eye_distance_px: float = 64.0
    algorithm: str = "dis"

    def __post_init__(self) -> None:
        for name in ("k", "lam"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not np.isfinite(v) or v < 0:
                raise InvalidParameterError(f"{name} must be a finite number >= 0, got {v!r}")
        d = self.eye_distance_px
        if isinstance(d, bool) or not isinstance(d, int | float) or not np.isfinite(d) or not 16 <= d <= 512:
            raise InvalidParameterError(f"eye_distance_px must be a number in [16, 512] pixels, got {d!r}")
        if self.algorithm not in ALGORITHMS:
            raise InvalidParameterError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")


_DEFAULT_PARAMS = FlowParams()


def region_polygons(side: str) -> dict[str, tuple[int, ...]]:
    """Landmark polygons of the PATIENT's ``side`` ("left" or "right"); right = MIRROR of left."""
    if side == "left":
        return dict(REGION_POLYGONS_LEFT)
    if side == "right":
        return {r: tuple(int(nz.MIRROR[i]) for i in p) for r, p in REGION_POLYGONS_LEFT.items()}
    raise InvalidParameterError(f"side must be 'left' or 'right', got {side!r}")


# Label image layout: 0 = no region, 1 + 2·r + s for region r (REGIONS order) and side s (0 left, 1 right).
_POLYS: list[tuple[int, ...]] = [
    poly for r in REGIONS for poly in (region_polygons("left")[r], region_polygons("right")[r])
]
_POLY_IDX = np.unique(np.concatenate([np.asarray(p) for p in _POLYS]))
_NEEDED = np.unique(
    np.concatenate([_POLY_IDX, STABLE_LANDMARKS, _MIDLINE, nz.LEFT_EYE_CONTOUR, nz.RIGHT_EYE_CONTOUR])
)


def _canonical(ref: np.ndarray, eye_px: float) -> tuple[np.ndarray, tuple[int, int]]:
    """3×3 similarity from reference crop pixels to the warped window (eye line level, D = eye_px), and
    the window's (width, height)."""
    left, right = nz.eye_centres(ref[None])
    v = (left - right)[0]
    d = float(np.hypot(v[0], v[1]))
    if not d > 0:
        raise ValueError("reference landmarks have a zero inter-eye distance")
    s = eye_px / d
    c, sn = v[0] / d * s, v[1] / d * s
    rot = np.array([[c, sn, 0.0], [-sn, c, 0.0], [0.0, 0.0, 1.0]])  # rotates the eye line onto +x
    pts = ref[_POLY_IDX] @ rot[:2, :2].T
    margin = _MARGIN_D * eye_px
    lo = pts.min(axis=0) - margin
    hi = pts.max(axis=0) + margin
    rot[:2, 2] = -lo
    size = np.ceil(hi - lo).astype(int)
    if (size > 8 * eye_px).any():
        raise ValueError(f"implausible reference landmarks: the regions span {size / eye_px} D")
    return rot, (int(size[0]), int(size[1]))


def _labels(ref_window: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) int32 label image of the six regions from the reference landmarks in window pixels."""
    lab = np.zeros((size[1], size[0]), np.int32)
    shift = 4  # sub-pixel vertices
    for n, poly in enumerate(_POLYS):
        pts = np.round(ref_window[list(poly)] * (1 << shift)).astype(np.int32)
        cv2.fillPoly(lab, [pts], (n + 1,), lineType=cv2.LINE_8, shift=shift)
    return lab


def _lateral_scale(ref_window: np.ndarray, size: tuple[int, int], eye_px: float) -> np.ndarray:
    """(H, W) float32 factor for the flow's x component: (D/2) / that side's half-face width.

    The facial midline x = a + b·y is fitted through :data:`_MIDLINE`; a side's half-width is the
    distance of its eye centre from it. Clipped to [2/3, 3/2] (a bad fit must not blow a side up).
    """
    mid = ref_window[list(_MIDLINE)]
    b, a = np.polyfit(mid[:, 1], mid[:, 0], 1)
    left, right = (c[0] for c in nz.eye_centres(ref_window[None]))
    norm = float(np.sqrt(1.0 + b * b))
    half_l = (left[0] - (a + b * left[1])) / norm
    half_r = ((a + b * right[1]) - right[0]) / norm
    half = 0.5 * eye_px
    f_l = float(np.clip(half / half_l, 2 / 3, 3 / 2)) if half_l > 0 else 1.0
    f_r = float(np.clip(half / half_r, 2 / 3, 3 / 2)) if half_r > 0 else 1.0
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    return np.where(xx > a + b * yy, f_l, f_r).astype(np.float32)


def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src (K, 2) onto dst
    (K, 2), as 3×3 (closed form: x' = a·x − b·y + tx, y' = b·x + a·y + ty)."""
    ms, md = src.mean(axis=0), dst.mean(axis=0)
    p, q = src - ms, dst - md
    var = float((p * p).sum())
    if not var > 0:
        m = np.eye(3)
        m[:2, 2] = md - ms
        return m
    a = float((p * q).sum()) / var
    b = float((p[:, 0] * q[:, 1] - p[:, 1] * q[:, 0]).sum()) / var
    rs = np.array([[a, -b], [b, a]])
    m = np.eye(3)
    m[:2, :2] = rs
    m[:2, 2] = md - rs @ ms
    return m


def _pose(points: np.ndarray, ref_stable: np.ndarray) -> np.ndarray:
    """Similarity (3×3) mapping a frame's crop pixels onto the reference frame's, fitted on the stable
    landmarks with one trimming pass."""
    src = points[list(STABLE_LANDMARKS)]
    m = _similarity(src, ref_stable)
    res = np.linalg.norm(src @ m[:2, :2].T + m[:2, 2] - ref_stable, axis=1)
    keep = res <= max(3.0 * float(np.median(res)), 1.0)
    if keep.sum() >= 3 and not keep.all():
        m = _similarity(src[keep], ref_stable[keep])
    return m


def _smooth_poses(poses: list[np.ndarray | None], width: int) -> list[np.ndarray | None]:
    """Average the similarity parameters (a, b, tx, ty) over ``width`` frames within each run of frames
    that have a pose (edges padded with the run's end values)."""
    out: list[np.ndarray | None] = list(poses)
    if width <= 1:
        return out
    half = width // 2
    t = 0
    while t < len(poses):
        if poses[t] is None:
            t += 1
            continue
        run_end = t
        while run_end < len(poses) and poses[run_end] is not None:
            run_end += 1
        run = [p for p in poses[t:run_end] if p is not None]
        par = np.array([[p[0, 0], p[1, 0], p[0, 2], p[1, 2]] for p in run])
        padded = np.concatenate([np.repeat(par[:1], half, 0), par, np.repeat(par[-1:], half, 0)])
        kernel = np.ones(width) / width
        sm = np.stack([np.convolve(padded[:, j], kernel, mode="valid") for j in range(4)], axis=1)
        for i, (a, b, tx, ty) in enumerate(sm):
            out[t + i] = np.array([[a, -b, tx], [b, a, ty], [0.0, 0.0, 1.0]])
        t = run_end
    return out


class _Flow:
    """Dense flow between two grey frames, (H, W, 2) float32 px."""

    def __init__(self, algorithm: str) -> None:
        self.dis = None
        if algorithm == "dis":
            # The ultrafast preset, but refined down to half resolution (finest scale 1 instead of 2,
            # quarter) with fewer descent steps: measured, the ultrafast preset's coarse flow read a
            # symmetric smile phantom as SS 0.79, this as 0.92, at ~1.4× its cost (~1 ms a frame, D = 64 px).
            self.dis = cv2.DISOpticalFlow.create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)
            self.dis.setFinestScale(1)
            self.dis.setGradientDescentIterations(8)

    def __call__(self, prev: np.ndarray, cur: np.ndarray) -> np.ndarray:
        # The cv2 stubs reject flow=None, which OpenCV accepts (it allocates the output).
        if self.dis is not None:
            return np.asarray(self.dis.calc(prev, cur, None))  # type: ignore[call-overload]
        flow = cv2.calcOpticalFlowFarneback(prev, cur, None, 0.5, 3, 15, 3, 5, 1.2, 0)  # type: ignore[call-overload]
        return np.asarray(flow)


def regional_symmetry(
    crops: Sequence[np.ndarray | None],
    landmarks_crop: np.ndarray,
    start: int,
    end: int,
    params: FlowParams = _DEFAULT_PARAMS,
    *,
    fps: float | None = None,
) -> tuple[RegionSymmetry, ...]:
    """Optical-flow Symmetry Score of the forehead, eye and cheek (incl. mouth) over frames ``start..end``.

    Parameters
    ----------
    crops
        Grey uint8 face crops, one per frame (:attr:`CropStore.crops`); None where there was no face.
    landmarks_crop
        (T, 478, 2 or 3) landmarks of every frame in CROP pixels (``CropStore.to_crop(points)``); NaN
        where there was no face. Only x, y are used.
    start, end
        First and last frame analysed (inclusive). The reference pose is frame ``start`` (or the first
        frame with a face after it).
    params
        Settings (:class:`FlowParams`).
    fps
        The clip's frame rate; when given, VS is rescaled to 30 frames/s (``VS × fps / 30``).

    Returns
    -------
    tuple of RegionSymmetry
        One per region in :data:`REGIONS` order: VS of the patient's left and right side in D/100 per
        frame (see the module docstring) and SS = clip(1 − λ·|VS_L − VS_R|, 0, 1).

    Raises
    ------
    ValueError
        Bad ranges or shapes, or no pair of consecutive frames with a face (nothing to measure).

    Notes
    -----
    Frame pairs where either frame lacks a crop or finite landmarks are skipped; N − 1 counts the pairs
    measured.
    """
    lm = np.asarray(landmarks_crop, dtype=np.float64)
    if lm.ndim != 3 or lm.shape[1] != nz.N_LANDMARKS or lm.shape[2] < 2:
        raise ValueError(f"landmarks_crop must be (T, {nz.N_LANDMARKS}, 2|3), got {lm.shape}")
    lm = lm[..., :2]
    n_frames = min(len(crops), lm.shape[0])
    if not 0 <= start < end < n_frames:
        raise ValueError(f"need 0 <= start < end < {n_frames} frames, got start={start}, end={end}")
    if fps is not None and not (np.isfinite(fps) and fps > 0):
        raise InvalidParameterError(f"fps must be > 0, got {fps!r}")

    frames = range(start, end + 1)
    ok = [crops[t] is not None and bool(np.isfinite(lm[t][_NEEDED]).all()) for t in frames]
    if not any(ok):
        raise ValueError(f"no frame with a face in {start}..{end}")
    ref = lm[start + ok.index(True)]
    eye_px = float(params.eye_distance_px)
    canon, size = _canonical(ref, eye_px)
    ref_window = ref @ canon[:2, :2].T + canon[:2, 2]
    labels = _labels(ref_window, size).ravel()
    inside = np.flatnonzero(labels)
    labels_in = labels[inside] - 1
    counts = np.bincount(labels_in, minlength=len(_POLYS)).astype(np.float64)
    if (counts == 0).any():
        raise ValueError("a region polygon is empty on the reference frame")
    x_scale = _lateral_scale(ref_window, size, eye_px)
    crop_area = CROP_AREA_D2 * eye_px * eye_px

    ref_stable = ref[list(STABLE_LANDMARKS)]
    poses = _smooth_poses(
        [_pose(lm[t], ref_stable) if good else None for t, good in zip(frames, ok, strict=True)],
        POSE_SMOOTH_FRAMES,
    )
    flow = _Flow(params.algorithm)
    sums = np.zeros(len(_POLYS))
    pairs = 0
    prev: np.ndarray | None = None
    for t, pose in zip(frames, poses, strict=True):
        crop = crops[t]
        cur = None
        if pose is not None and crop is not None:
            cur = cv2.warpAffine(
                crop, (canon @ pose)[:2], size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
            )
        if prev is not None and cur is not None:
            f = flow(prev, cur)
            mag = cv2.magnitude(f[..., 0] * x_scale, f[..., 1]).ravel()
            mag[mag < params.k * float(mag.sum()) / crop_area] = 0.0
            sums += np.bincount(labels_in, weights=mag[inside], minlength=len(_POLYS))
            pairs += 1
        prev = cur
    if pairs == 0:
        raise ValueError(f"no two consecutive frames with a face in {start}..{end}: no motion to measure")
    # px/frame in the window → D/frame → VS units; mean over each region's pixels, then over the pairs.
    vs = sums / counts / pairs / eye_px / VS_UNIT_D
    if fps is not None:
        vs = vs * (fps / REFERENCE_FPS)
    out = []
    for r, region in enumerate(REGIONS):
        left, right = float(vs[2 * r]), float(vs[2 * r + 1])
        ss = float(np.clip(1.0 - params.lam * abs(left - right), 0.0, 1.0))
        out.append(RegionSymmetry(region, left, right, ss))
    return tuple(out)
