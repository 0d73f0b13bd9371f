"""Per-task landmark displacement fields with a known amount of motion on each side.

Every function takes MediaPipe landmarks of a frontal, upright, non-mirrored face in pixels and returns
(478, 2) forward pixel displacements (dx, dy), x to the image's right, y down. Sides are the PATIENT's
(DESIGN.md, "Sides and coordinates"): the patient's left is on the image's right, so "outward" for the
left side is image +x. Points that must not move get exactly zero, which keeps the warp local and the
truth exact: the moved side's driving landmarks move by exactly the stated amount.

All fields are linear in the amplitude, so ``field(a) == a * field(1)``; the renderer relies on this to
precompute one spline per task and scale it per frame.

D is the inter-eye distance: the distance between the centroids of the two 16-point eye contours.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from service.domain import Side, Task

N_LANDMARKS = 478
#: Eye closure above this fraction folds the warp (the upper lid would overrun the iris's squeeze room).
MAX_EYE_CLOSURE = 0.5

#: Landmarks on the facial midline used to fit the midline (forehead, glabella, nose bridge, tip, chin).
MIDLINE_FIT = (10, 168, 6, 1, 152)
#: Mouth corners (commissures): patient's left / right.
COMMISSURE = {Side.LEFT: 291, Side.RIGHT: 61}
#: Iris centre and its 4-point ring: 473-477 is the patient's LEFT iris, 468-472 the RIGHT.
IRIS = {Side.LEFT: (473, 474, 475, 476, 477), Side.RIGHT: (468, 469, 470, 471, 472)}

#: Half-width of the band around the midline that never moves, in D.
MIDLINE_BAND_D = 0.05
#: Width of the ramp from still (band edge) to fully mobile, in D; keeps the shear at the midline mild.
MIDLINE_TAPER_D = 0.15
SMILE_SIGMA_D = 0.3
#: Midline-to-mobile ramp for the smile, in D (the commissure sits about 0.45 D from the midline).
SMILE_TAPER_D = 0.3
#: The nose follows a smile only this much (the cheek beside it lifts; the nose barely does).
NOSE_FOLLOW = 0.5
#: Points within this distance of the commissure move with it fully (the mouth-corner group), in D.
SMILE_PLATEAU_D = 0.1
BROW_SIGMA_D = 0.35


@dataclass(frozen=True)
class _SideSets:
    eye: tuple[int, ...]  # 16-point eye contour, cycle order
    brow: tuple[int, ...]  # 10 eyebrow points
    brow_rows: tuple[tuple[int, ...], tuple[int, ...]]  # the eyebrow's two 5-point edges, unordered


@lru_cache(maxsize=1)
def _sets() -> dict[Side, _SideSets]:
    from mediapipe.python.solutions import face_mesh_connections as fmc

    from service.phantom.warp import _cycle

    out = {}
    for side, eye, brow in (
        (Side.LEFT, fmc.FACEMESH_LEFT_EYE, fmc.FACEMESH_LEFT_EYEBROW),
        (Side.RIGHT, fmc.FACEMESH_RIGHT_EYE, fmc.FACEMESH_RIGHT_EYEBROW),
    ):
        brow_pts = tuple(sorted({i for e in brow for i in e}))
        # The eyebrow set is two open polylines (upper and lower edge) of 5 points each.
        adj: dict[int, set[int]] = {}
        for a, b in brow:
            adj.setdefault(a, set()).add(b)
            adj.setdefault(b, set()).add(a)
        rows: list[list[int]] = []
        seen: set[int] = set()
        for start in (i for i in brow_pts if len(adj[i]) == 1):
            if start in seen:
                continue
            row, prev, cur = [start], -1, start
            while True:
                nxt = [n for n in adj[cur] if n != prev]
                if not nxt:
                    break
                prev, cur = cur, nxt[0]
                row.append(cur)
            seen.update(row)
            rows.append(row)
        out[side] = _SideSets(_cycle(eye), brow_pts, (tuple(rows[0]), tuple(rows[1])))
    return out


@lru_cache(maxsize=1)
def _nose_outline() -> tuple[int, ...]:
    from mediapipe.python.solutions.face_mesh_connections import FACEMESH_NOSE

    return tuple(sorted({i for e in FACEMESH_NOSE for i in e}))


def _in_nose(xy: np.ndarray) -> np.ndarray:
    """(478,) bool: landmarks on or inside the convex hull of the FACEMESH_NOSE outline."""
    import cv2

    hull = cv2.convexHull(xy[list(_nose_outline())].astype(np.float32))
    return np.array([cv2.pointPolygonTest(hull, (float(x), float(y)), False) >= 0 for x, y in xy])


def _xy(landmarks: np.ndarray) -> np.ndarray:
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.ndim != 2 or lm.shape[0] != N_LANDMARKS or lm.shape[1] < 2:
        raise ValueError(f"landmarks must be ({N_LANDMARKS}, 2 or 3) pixels, got {lm.shape}")
    if not np.all(np.isfinite(lm[:, :2])):
        raise ValueError("landmarks contain NaN or inf")
    return lm[:, :2]


def eye_centres(landmarks: np.ndarray) -> dict[Side, np.ndarray]:
    """Centroid (x, y) px of each 16-point eye contour, keyed by the patient's side."""
    xy = _xy(landmarks)
    return {s: xy[list(v.eye)].mean(axis=0) for s, v in _sets().items()}


def eye_distance(landmarks: np.ndarray) -> float:
    """D: distance in pixels between the two eye-contour centroids."""
    c = eye_centres(landmarks)
    return float(np.linalg.norm(c[Side.LEFT] - c[Side.RIGHT]))


def midline(landmarks: np.ndarray) -> tuple[float, float]:
    """Facial midline as ``x = a + b * y`` (pixels), least squares through landmarks 10, 168, 6, 1, 152."""
    p = _xy(landmarks)[list(MIDLINE_FIT)]
    b, a = np.polyfit(p[:, 1], p[:, 0], 1)
    return float(a), float(b)


def lateral_offset(landmarks: np.ndarray) -> np.ndarray:
    """(478,) horizontal offset of each landmark from the midline in pixels, positive toward the PATIENT's
    left (image +x)."""
    xy = _xy(landmarks)
    a, b = midline(landmarks)
    return xy[:, 0] - (a + b * xy[:, 1])


def _side_weight(landmarks: np.ndarray, side: Side, d: float, taper_d: float = MIDLINE_TAPER_D) -> np.ndarray:
    """(478,) 0 on the other side and in the midline band, rising smoothly to 1 over ``taper_d`` D."""
    sgn = 1.0 if side is Side.LEFT else -1.0
    off = sgn * lateral_offset(landmarks) - MIDLINE_BAND_D * d
    u = np.clip(off / (taper_d * d), 0.0, 1.0)
    return u * u * (3.0 - 2.0 * u)


def _check_side(side: Side | str) -> Side:
    try:
        return Side(side)
    except ValueError:
        raise ValueError(f"side must be 'left' or 'right', got {side!r}") from None


def _check_amplitude(name: str, value: float) -> float:
    v = float(value)
    if not np.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def smile_field(landmarks: np.ndarray, side: Side | str, amplitude: float = 1.0) -> np.ndarray:
    """Displacements of a one-sided smile.

    The commissure of ``side`` (landmark 291 for the patient's left, 61 for the right) moves
    ``amplitude * D`` along the direction 45 degrees up (image -y) and outward (image +x for the left,
    -x for the right). Landmarks on that side follow with a Gaussian falloff of their distance r to the
    commissure, ``exp(-max(r - 0.1 D, 0)**2 / (2 (0.3 D)**2))``: the flat top makes the mouth-corner
    cluster move as one, so a measured commissure excursion equals the amplitude. Midline points
    (|offset| <= 0.05 D from the midline) and the other side do not move; eyes, irises, brows and the
    nose (the hull of FACEMESH_NOSE) never move.

    Parameters
    ----------
    landmarks
        (478, 2 or 3) pixels.
    side
        The patient's side that smiles.
    amplitude
        Commissure excursion in D units (>= 0).

    Returns
    -------
    np.ndarray
        (478, 2) float64 pixel displacements.
    """
    side = _check_side(side)
    amplitude = _check_amplitude("amplitude", amplitude)
    xy = _xy(landmarks)
    d = eye_distance(landmarks)
    sgn = 1.0 if side is Side.LEFT else -1.0
    direction = np.array([sgn, -1.0]) / np.sqrt(2.0)
    r = np.linalg.norm(xy - xy[COMMISSURE[side]], axis=1)
    w = np.exp(-(np.maximum(r - SMILE_PLATEAU_D * d, 0.0) ** 2) / (2 * (SMILE_SIGMA_D * d) ** 2))
    # The lips need a wider taper: with a narrow one the half-lip next to the still midline rose
    # steeply and the upper lip took an S shape.
    w *= _side_weight(landmarks, side, d, SMILE_TAPER_D)
    sets = _sets()
    for s in (Side.LEFT, Side.RIGHT):
        w[list(sets[s].eye) + list(sets[s].brow) + list(IRIS[s])] = 0.0
    # A smile lifts the cheek beside the nose, not the nose: dragging the ala up looked like a tumour.
    w[_in_nose(xy)] *= NOSE_FOLLOW
    w[w < 1e-3] = 0.0  # tails this small are noise to the spline, and exact zeros keep the truth clean
    w[COMMISSURE[side]] = 1.0
    return (amplitude * d) * w[:, None] * direction[None, :]


def _brow_edges(xy: np.ndarray, side: Side) -> tuple[np.ndarray, np.ndarray]:
    """(upper edge, lower edge) of the eyebrow, each (2, 5) [x sorted; y] for np.interp."""
    rows = sorted(_sets()[side].brow_rows, key=lambda r: float(xy[list(r), 1].mean()))

    def curve(idx: tuple[int, ...]) -> np.ndarray:
        p = xy[list(idx)]
        o = np.argsort(p[:, 0])
        return np.stack([p[o, 0], p[o, 1]])

    return curve(rows[0]), curve(rows[1])


def _lids(xy: np.ndarray, side: Side) -> tuple[list[int], list[int], np.ndarray, np.ndarray]:
    """Split the eye contour at its corners: (upper indices, lower indices, upper y(x), lower y(x)).

    The y(x) arrays are (2, K) [x sorted; y] including the corners, for np.interp.
    """
    cyc = list(_sets()[side].eye)
    pts = xy[cyc]
    i0, i1 = int(np.argmin(pts[:, 0])), int(np.argmax(pts[:, 0]))
    n = len(cyc)
    path_a = [cyc[(i0 + k) % n] for k in range((i1 - i0) % n + 1)]
    path_b = [cyc[(i1 + k) % n] for k in range((i0 - i1) % n + 1)]
    if xy[path_a, 1].mean() < xy[path_b, 1].mean():
        upper, lower = path_a, path_b
    else:
        upper, lower = path_b, path_a

    def curve(idx: list[int]) -> np.ndarray:
        p = xy[idx]
        o = np.argsort(p[:, 0])
        return np.stack([p[o, 0], p[o, 1]])

    corners = {cyc[i0], cyc[i1]}
    return (
        [i for i in upper if i not in corners],
        [i for i in lower if i not in corners],
        curve(upper),
        curve(lower),
    )


def _lid_to_brow(xy: np.ndarray, side: Side) -> tuple[np.ndarray, np.ndarray]:
    """Where each landmark sits between the upper lid and the lower edge of the brow.

    Returns
    -------
    (band, t)
        (478,) bool: in the band (above the upper-lid curve, below the brow's lower edge, not an eye,
        iris or brow point), and (478,) float t in [0, 1]: 0 on the lid curve, 1 at the brow, by
        vertical position at the landmark's x. Beyond the ends of a curve its end point's y is used.
    """
    sets = _sets()[side]
    _, _, up, _ = _lids(xy, side)
    _, bl = _brow_edges(xy, side)
    x, y = xy[:, 0], xy[:, 1]
    y_lid = np.interp(x, up[0], up[1])
    y_brow = np.interp(x, bl[0], bl[1])
    band = (y < y_lid) & (y > y_brow)
    band[list(sets.eye) + list(sets.brow) + list(IRIS[side])] = False
    t = np.clip((y_lid - y) / np.maximum(y_lid - y_brow, 1e-6), 0.0, 1.0)
    return band, t


def eye_closure_field(landmarks: np.ndarray, side: Side | str, fraction: float) -> np.ndarray:
    """Displacements of a partial eye closure of ``side``.

    Each upper-lid point of the eye contour moves down by ``fraction`` times the vertical lid gap at
    its x (lower-lid y interpolated there minus its own y), so the eye-contour area shrinks by about
    ``fraction``. Lower-lid points and the corners stay. The iris points (centre and ring) are
    squeezed with the opening: a point at height h above the lower lid, in a gap g, moves down by
    ``fraction * g * clip(h / g, 0, 1)`` (a point above the upper lid moves like the lid, one below the
    lower lid stays). Moving the whole iris with the lid, as a rigid block, would push the bottom of the
    iris ring through the fixed lower lid and fold the warp. The skin between the lid and the brow follows
    the lid by ``(1 - t)**2``, t its height from lid (0) to the brow's lower edge (1).

    Parameters
    ----------
    landmarks
        (478, 2 or 3) pixels.
    side
        The patient's side whose eye closes.
    fraction
        Closure fraction in [0, 0.5]; larger values fold the warp and are rejected.

    Returns
    -------
    np.ndarray
        (478, 2) float64 pixel displacements (dx = 0).
    """
    if not (np.isfinite(float(fraction)) and 0.0 <= float(fraction) <= MAX_EYE_CLOSURE):
        raise ValueError(
            f"fraction must be in [0, {MAX_EYE_CLOSURE}] (more folds the warp), got {fraction!r}"
        )
    return float(fraction) * _eye_closure_unit(landmarks, _check_side(side))


def _eye_closure_unit(landmarks: np.ndarray, side: Side) -> np.ndarray:
    """The eye-closure field at fraction 1 (never rendered as such: see :data:`MAX_EYE_CLOSURE`)."""
    xy = _xy(landmarks)
    upper, _, up, lo = _lids(xy, side)
    out = np.zeros((N_LANDMARKS, 2))

    def gap(x: np.ndarray) -> np.ndarray:
        return np.maximum(np.interp(x, lo[0], lo[1]) - np.interp(x, up[0], up[1]), 0.0)

    out[upper, 1] = gap(xy[upper, 0])
    iris = list(IRIS[side])
    g = gap(xy[iris, 0])
    h = np.interp(xy[iris, 0], lo[0], lo[1]) - xy[iris, 1]
    out[iris, 1] = g * np.clip(h / np.maximum(g, 1e-6), 0.0, 1.0)
    band, t = _lid_to_brow(xy, side)
    # The skin over the lid follows it, less and less toward the brow: (1 - t)^2 compresses that band
    # smoothly instead of pinching it at individual landmarks. gap() is 0 beyond the eye corners.
    out[band, 1] = (1.0 - t[band]) ** 2 * gap(xy[band, 0])
    return out


def brow_raise_field(landmarks: np.ndarray, side: Side | str, amplitude: float = 1.0) -> np.ndarray:
    """Displacements of a one-sided brow raise.

    The 10 eyebrow points of ``side`` move up (image -y) by ``amplitude * D``. Landmarks above that brow
    on the same side move up with a Gaussian falloff of their distance to the nearest brow point
    (sigma 0.35 D). The upper-lid skin between lid and brow stretches evenly: a point at height t
    (0 on the lid curve, 1 at the brow's lower edge) moves by t (about 30 % for the skin just over the
    lid, all of it next to the brow, so the brow moves as a block). The eye contour and iris stay; the
    midline band and the other side stay.

    Parameters
    ----------
    landmarks
        (478, 2 or 3) pixels.
    side
        The patient's side whose brow rises.
    amplitude
        Brow lift in D units (>= 0).

    Returns
    -------
    np.ndarray
        (478, 2) float64 pixel displacements (dx = 0).
    """
    side = _check_side(side)
    amplitude = _check_amplitude("amplitude", amplitude)
    xy = _xy(landmarks)
    d = eye_distance(landmarks)
    sets = _sets()[side]
    brow = list(sets.brow)
    bu, _ = _brow_edges(xy, side)
    above = xy[:, 1] < np.interp(xy[:, 0], bu[0], bu[1])
    r = np.min(np.linalg.norm(xy[:, None, :] - xy[None, brow, :], axis=2), axis=1)
    w = np.where(above, np.exp(-(r**2) / (2 * (BROW_SIGMA_D * d) ** 2)), 0.0)
    band, t = _lid_to_brow(xy, side)
    # Lid skin stretches evenly between the still lid (t = 0) and the brow (t = 1): moving each skin
    # landmark by a fixed 30 % instead pinched the picture around the landmarks next to the brow. Beyond
    # the brow's ends the stretch fades out (sigma 0.15 D).
    bx = xy[brow, 0]
    outside = np.maximum(np.maximum(bx.min() - xy[:, 0], xy[:, 0] - bx.max()), 0.0)
    w[band] = t[band] * np.exp(-(outside[band] ** 2) / (2 * (0.15 * d) ** 2))
    w *= _side_weight(landmarks, side, d)
    w[w < 1e-3] = 0.0
    w[brow] = 1.0
    w[list(sets.eye) + list(IRIS[side])] = 0.0
    out = np.zeros((N_LANDMARKS, 2))
    out[:, 1] = -(amplitude * d) * w
    return out


def task_field(task: Task | str, landmarks: np.ndarray, side: Side | str, amplitude: float) -> np.ndarray:
    """Dispatch to the task's field: smile / brow raise amplitude in D, eye closure a fraction."""
    task = Task(task)
    if task is Task.SMILE:
        return smile_field(landmarks, side, amplitude)
    if task is Task.EYE_CLOSURE:
        return eye_closure_field(landmarks, side, amplitude)
    return brow_raise_field(landmarks, side, amplitude)
