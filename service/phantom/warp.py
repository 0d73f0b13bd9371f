"""Thin-plate-spline image warp driven by control points, for phantom faces.

Conventions
-----------
Pixel coordinates are (x, y) with x to the right and y down, in pixels of the image being warped.
A displacement field is FORWARD: the content at source pixel ``p`` appears at ``p + d(p)`` in the
warped image. Rendering needs the BACKWARD map (for each output pixel ``q``, which source pixel to
read), which is found by fixed-point iteration ``p <- q - d(p)``; it converges while the field is a
contraction (|grad d| < 1), which :meth:`WarpField.min_jacobian` lets callers check.

Speed: the spline is evaluated once on a coarse grid and resized to full resolution, and because the
field is linear in the displacements it is precomputed once at full amplitude and scaled per frame;
per frame only the inversion and one ``cv2.remap`` run, and only inside the region where the field is
non-negligible.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy.interpolate import RBFInterpolator

from service.engine.normalize import FACE_OVAL

#: Below this many pixels of displacement (at full amplitude) a pixel is treated as still.
STILL_PX = 0.02


def _cycle(edges: frozenset[tuple[int, int]]) -> tuple[int, ...]:
    """Order the vertices of a set of edges forming one closed loop."""
    adj: dict[int, list[int]] = {}
    for a, b in edges:
        adj.setdefault(a, []).append(b)
        adj.setdefault(b, []).append(a)
    start = min(adj)
    order = [start]
    prev, cur = -1, start
    while True:
        nxt = next(n for n in adj[cur] if n != prev)
        if nxt == start:
            break
        order.append(nxt)
        prev, cur = cur, nxt
    return tuple(order)


def _resample_closed(poly: np.ndarray, n: int) -> np.ndarray:
    """``n`` points evenly spaced by arc length along the closed polygon ``poly`` (M, 2)."""
    closed = np.vstack([poly, poly[:1]])
    seg = np.linalg.norm(np.diff(closed, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.linspace(0.0, s[-1], n, endpoint=False)
    return np.stack([np.interp(t, s, closed[:, 0]), np.interp(t, s, closed[:, 1])], axis=1)


def face_ring_anchors(landmarks: np.ndarray, *, scale: float = 1.25, n: int = 24) -> np.ndarray:
    """Zero-motion anchors on a ring around the face.

    Parameters
    ----------
    landmarks
        (478, 2+) MediaPipe landmarks in pixels.
    scale
        The face-oval polygon is scaled by this factor about its centroid: far enough out that the
        cheeks and forehead can move, near enough that the motion stays on the face.
    n
        Number of anchors, evenly spaced along the scaled oval.

    Returns
    -------
    np.ndarray
        (n, 2) float64 pixel coordinates (some may lie outside the image; that is harmless).
    """
    oval = np.asarray(landmarks, dtype=np.float64)[list(FACE_OVAL), :2]
    centre = oval.mean(axis=0)
    return _resample_closed(centre + scale * (oval - centre), n)


def face_support(
    landmarks: np.ndarray, shape: tuple[int, ...], *, inner: float = 1.0, outer: float = 1.25
) -> np.ndarray:
    """Weight that confines a warp to the face: 1 inside the face oval scaled by ``inner``, 0 outside the
    oval scaled by ``outer`` (about its centroid), a smoothstep in between.

    A thin-plate spline pinned to zero on a ring still overshoots beyond it (it is the smoothest
    surface through the constraints, so it carries the slope across), which would move background
    pixels by a pixel or more; multiplying the field by this weight removes that, and leaves the
    control points inside the oval exact.

    Returns
    -------
    np.ndarray
        (H, W) float32 in [0, 1].
    """
    h, w = shape[:2]
    oval = np.asarray(landmarks, dtype=np.float64)[list(FACE_OVAL), :2]
    c = oval.mean(axis=0)
    ang = np.arctan2(oval[:, 1] - c[1], oval[:, 0] - c[0])
    rad = np.hypot(oval[:, 0] - c[0], oval[:, 1] - c[1])
    o = np.argsort(ang)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    a = np.arctan2(yy - c[1], xx - c[0])
    # The oval is star-shaped about its centroid: its radius in each direction, interpolated by angle.
    boundary = np.interp(a, ang[o], rad[o], period=2 * np.pi)
    u = np.clip((np.hypot(xx - c[0], yy - c[1]) / boundary - inner) / (outer - inner), 0.0, 1.0)
    return (1.0 - u * u * (3.0 - 2.0 * u)).astype(np.float32)


def border_anchors(width: int, height: int, *, per_side: int = 8) -> np.ndarray:
    """Zero-motion anchors on the image border, ``per_side`` per edge (corners included once).

    Returns
    -------
    np.ndarray
        (4 * per_side, 2) float64 pixel coordinates.
    """
    xs = np.linspace(0.0, width - 1.0, per_side + 1)[:-1]
    ys = np.linspace(0.0, height - 1.0, per_side + 1)[:-1]
    # Walk the perimeter clockwise; each edge starts at its corner so every corner appears once.
    top = np.stack([xs, np.zeros_like(xs)], axis=1)
    right = np.stack([np.full_like(ys, width - 1.0), ys], axis=1)
    bottom = np.stack([width - 1.0 - xs, np.full_like(xs, height - 1.0)], axis=1)
    left = np.stack([np.zeros_like(ys), height - 1.0 - ys], axis=1)
    return np.vstack([top, right, bottom, left])


def forward_field(
    points: np.ndarray,
    displacements: np.ndarray,
    shape: tuple[int, ...],
    *,
    anchors: np.ndarray | None = None,
    step: int = 8,
    fine_step: int = 1,
    fine_margin: float = 16.0,
) -> np.ndarray:
    """Dense forward displacement field interpolating control-point displacements with a thin-plate spline.

    Parameters
    ----------
    points
        (N, 2) control points (x, y) in pixels.
    displacements
        (N, 2) their forward displacements in pixels.
    shape
        (height, width, ...) of the image.
    anchors
        (M, 2) extra points with zero displacement; image-border anchors are always added so the
        frame edges stay put.
    step
        Spline evaluation grid spacing in pixels over the whole image; resized (bilinear) to full size.
    fine_step, fine_margin
        Grid spacing used instead inside the bounding box of the moving control points grown by
        ``fine_margin`` + the largest displacement (pixels); 1 evaluates every pixel there.

    Returns
    -------
    np.ndarray
        (H, W, 2) float32, ``field[y, x] = (dx, dy)``.
    """
    h, w = shape[:2]
    pts = np.asarray(points, dtype=np.float64)[:, :2]
    disp = np.asarray(displacements, dtype=np.float64)
    if pts.shape != disp.shape:
        raise ValueError(f"points {pts.shape} and displacements {disp.shape} must both be (N, 2)")
    extra = [border_anchors(w, h)]
    if anchors is not None:
        extra.append(np.asarray(anchors, dtype=np.float64).reshape(-1, 2))
    fixed = np.vstack(extra)
    # Anchors that land on a control point would make the spline system singular; the control point wins.
    if len(pts):
        near = np.min(np.linalg.norm(fixed[:, None, :] - pts[None, :, :], axis=2), axis=1) < 1.0
        fixed = fixed[~near]
    ctrl = np.vstack([pts, fixed])
    vals = np.vstack([disp, np.zeros_like(fixed)])
    rbf = RBFInterpolator(ctrl, vals, kernel="thin_plate_spline")
    full = _sample(rbf, 0, 0, w, h, step)
    moving = np.linalg.norm(disp, axis=1) > 0
    if fine_step < step and moving.any():
        # Where the control points move, the field bends on the scale of an eyelid (a few pixels), which
        # a coarse grid would smooth away: evaluate that box again on a fine grid.
        margin = fine_margin + float(np.abs(disp).max())
        lo = np.floor(pts[moving].min(axis=0) - margin).astype(int)
        hi = np.ceil(pts[moving].max(axis=0) + margin).astype(int)
        x0, y0 = max(0, int(lo[0])), max(0, int(lo[1]))
        x1, y1 = min(w, int(hi[0])), min(h, int(hi[1]))
        if x1 - x0 >= 2 and y1 - y0 >= 2:
            full[y0:y1, x0:x1] = _sample(rbf, x0, y0, x1, y1, fine_step)
    return full


def _sample(rbf: RBFInterpolator, x0: int, y0: int, x1: int, y1: int, step: int) -> np.ndarray:
    """The spline on the pixel box [x0, x1) x [y0, y1), sampled every ``step`` px, resized to full res."""
    w, h = x1 - x0, y1 - y0
    # Sample where cv2.resize (INTER_LINEAR) puts its source pixel centres, so the upsampled field is
    # not shifted by half a cell: coarse pixel i sits at full-res (i + 0.5) * w / w_c - 0.5.
    gw, gh = max(2, -(-w // step)), max(2, -(-h // step))
    gx = x0 + (np.arange(gw) + 0.5) * (w / gw) - 0.5
    gy = y0 + (np.arange(gh) + 0.5) * (h / gh) - 0.5
    grid = np.stack(np.meshgrid(gx, gy), axis=-1).reshape(-1, 2)
    coarse = rbf(grid).reshape(gh, gw, 2).astype(np.float32)
    if (gw, gh) == (w, h):
        return coarse
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR)


def min_jacobian(field: np.ndarray, scales: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)) -> float:
    """Smallest Jacobian determinant of ``p -> p + s * field(p)`` over pixels and the given scales.

    A value <= 0 means the warp folds (pixels swap order); det(I + sJ) is quadratic in s, so checking
    only s = 1 could miss a fold at an intermediate amplitude of the ramp.
    """
    dxdy, dxdx = np.gradient(field[..., 0])
    dydy, dydx = np.gradient(field[..., 1])
    worst = np.inf
    for s in scales:
        det = (1 + s * dxdx) * (1 + s * dydy) - (s * dxdy) * (s * dydx)
        worst = min(worst, float(det.min()))
    return worst


@dataclass(frozen=True)
class WarpField:
    """A forward field at full amplitude, with the region of the image it touches.

    Attributes
    ----------
    field
        (H, W, 2) float32 forward displacement in pixels at amplitude 1.
    roi
        (x0, y0, x1, y1): pixels outside this box move less than :data:`STILL_PX` at amplitude 1 and are
        copied unchanged.
    """

    field: np.ndarray
    roi: tuple[int, int, int, int]

    @classmethod
    def from_field(cls, field: np.ndarray) -> WarpField:
        mag = np.hypot(field[..., 0], field[..., 1])
        ys, xs = np.nonzero(mag > STILL_PX)
        h, w = mag.shape
        if len(xs) == 0:
            return cls(field, (0, 0, 0, 0))
        pad = 2
        roi = (
            max(0, int(xs.min()) - pad),
            max(0, int(ys.min()) - pad),
            min(w, int(xs.max()) + pad + 1),
            min(h, int(ys.max()) + pad + 1),
        )
        return cls(field, roi)

    @classmethod
    def from_controls(
        cls,
        points: np.ndarray,
        displacements: np.ndarray,
        shape: tuple[int, ...],
        *,
        anchors: np.ndarray | None = None,
        support: np.ndarray | None = None,
        step: int = 8,
        fine_step: int = 1,
    ) -> WarpField:
        """See :func:`forward_field` for the parameters; ``support`` (H, W) multiplies the field
        (e.g. :func:`face_support`)."""
        field = forward_field(points, displacements, shape, anchors=anchors, step=step, fine_step=fine_step)
        if support is not None:
            field *= support[..., None]
        return cls.from_field(field)

    def backward_map(self, scale: float = 1.0, *, iterations: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """Source coordinates for each output pixel of the ROI at amplitude ``scale``.

        Returns
        -------
        (map_x, map_y)
            Two (y1 - y0, x1 - x0) float32 arrays of absolute source pixel coordinates, ready for
            ``cv2.remap``; ``q = p + scale * field(p)`` holds to the fixed-point iteration's accuracy.
        """
        x0, y0, x1, y1 = self.roi
        qx, qy = np.meshgrid(np.arange(x0, x1, dtype=np.float32), np.arange(y0, y1, dtype=np.float32))
        px, py = qx.copy(), qy.copy()
        s = np.float32(scale)
        for _ in range(iterations):
            # Sample the forward field where the current estimate of the source pixel lies.
            d = cv2.remap(self.field, px, py, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            px = qx - s * d[..., 0]
            py = qy - s * d[..., 1]
        return px, py

    def apply(self, image: np.ndarray, scale: float = 1.0, *, iterations: int = 8) -> np.ndarray:
        """Warp ``image`` (H, W) or (H, W, C) by the field at amplitude ``scale``; a new array, same dtype."""
        out = image.copy()
        x0, y0, x1, y1 = self.roi
        if scale == 0.0 or x1 <= x0 or y1 <= y0:
            return out
        mx, my = self.backward_map(scale, iterations=iterations)
        warped = cv2.remap(image, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        # cv2 drops a trailing channel axis of length 1; put it back.
        out[y0:y1, x0:x1] = warped.reshape(out[y0:y1, x0:x1].shape)
        return out

    def min_jacobian(self) -> float:
        """See :func:`min_jacobian`: <= 0 means the warp folds somewhere on the ramp."""
        x0, y0, x1, y1 = self.roi
        if x1 <= x0 or y1 <= y0:
            return 1.0
        return min_jacobian(self.field[y0:y1, x0:x1])


def tps_warp(
    image: np.ndarray,
    points: np.ndarray,
    displacements: np.ndarray,
    *,
    anchors: np.ndarray | None = None,
    step: int = 8,
    fine_step: int = 1,
    iterations: int = 8,
) -> np.ndarray:
    """Warp ``image`` (H, W, C) so that content at each control point moves by its displacement.

    Parameters
    ----------
    image
        (H, W, C) array (uint8 or float).
    points, displacements
        (N, 2) control points and their forward displacements, pixels (x right, y down).
    anchors
        (M, 2) zero-motion points in addition to the image-border anchors.
    step, fine_step
        Spline grid spacing in pixels, coarse and around the moving points (see :func:`forward_field`).
    iterations
        Fixed-point iterations of the inversion.

    Returns
    -------
    np.ndarray
        The warped image, same shape and dtype.
    """
    wf = WarpField.from_controls(
        points, displacements, image.shape[:2], anchors=anchors, step=step, fine_step=fine_step
    )
    return wf.apply(image, 1.0, iterations=iterations)
