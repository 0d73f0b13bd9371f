"""Head motion for phantoms: a rigid head movement laid over any clip, with the expression's truth intact.

The head pose at frame k is a rotation (roll in the image plane; yaw and pitch out of it), a scale and a
shift, all relative to the clip's own frame k (so a clip without motion is returned unchanged):

* roll, scale and shift are a 2-D similarity of the whole picture about the face centre — that is what
  an in-plane head movement looks like through a camera (to first order; no perspective);
* yaw and pitch are made physical by rendering the face as the textured FaceMesh 3-D mesh: the 468
  mesh points of the frame (x, y and FaceMesh depth z, in pixels) are rotated about the face's centroid
  and projected orthographically, and each Delaunay triangle of the mesh is texture-mapped (piecewise
  affine) from the frame to its new place, nearer triangles painted over farther ones; the eye openings
  and the mouth, holes in MediaPipe's tessellation, are closed by fans so their interior turns too
  (:func:`_triangles`). Outside the face oval the picture follows the 2-D similarity only, so a seam can
  show at the face outline under yaw and pitch — the face itself, where everything is measured, is a
  rigid 3-D turn of the frame's face.

Truth: the head motion is rigid, so the expression's truth (per-side amplitudes in the head's frame,
freeze-half sides) is unchanged; the head pose per frame is recorded with it. The depth comes from
FaceMesh, the same model the engine uses to estimate out-of-plane rotation — a self-consistency that
makes yaw/pitch validation on these phantoms somewhat optimistic (README, "What is measured").
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import cv2
import numpy as np

from service.errors import InvalidParameterError

#: Periods (s) of the sinusoids that drive each axis: different, so the axes do not move in lock-step.
_PERIODS = {"roll": 2.3, "yaw": 2.9, "pitch": 3.7, "scale": 3.1, "shift_x": 2.6, "shift_y": 4.1}


@dataclass(frozen=True)
class HeadMotionSpec:
    """Peak amplitudes of a smooth head movement: degrees, percent, and D (inter-eye distances).

    Each axis follows ``amplitude · sin(2π t / period)`` with its own period (:data:`_PERIODS`), starting
    at 0 in frame 0, so the motion runs through rest, movement and hold alike, as a patient's head does.
    """

    roll_deg: float = 0.0
    yaw_deg: float = 0.0
    pitch_deg: float = 0.0
    scale_pct: float = 0.0
    shift_d: float = 0.0

    def __post_init__(self) -> None:
        limits = {"roll_deg": 20, "yaw_deg": 25, "pitch_deg": 25, "scale_pct": 30, "shift_d": 1.0}
        for name, lim in limits.items():
            v = float(getattr(self, name))
            if not (np.isfinite(v) and abs(v) <= lim):
                raise InvalidParameterError(f"{name} must be a finite amplitude within ±{lim}, got {v!r}")
            object.__setattr__(self, name, v)

    @property
    def still(self) -> bool:
        return not any(asdict(self).values())

    @property
    def out_of_plane(self) -> bool:
        return bool(self.yaw_deg or self.pitch_deg)

    def pose(self, k: int, fps: float) -> dict[str, float]:
        """The pose at frame ``k``: roll/yaw/pitch (deg), scale (factor), shift_x/shift_y (D)."""
        t = k / fps

        def wave(axis: str) -> float:
            return float(np.sin(2 * np.pi * t / _PERIODS[axis]))

        return {
            "roll": self.roll_deg * wave("roll"),
            "yaw": self.yaw_deg * wave("yaw"),
            "pitch": self.pitch_deg * wave("pitch"),
            "scale": 1.0 + self.scale_pct / 100.0 * wave("scale"),
            "shift_x": self.shift_d * wave("shift_x"),
            "shift_y": self.shift_d * wave("shift_y"),
        }

    def to_json(self) -> dict[str, Any]:
        return dict(asdict(self), periods_s=dict(_PERIODS), waveform="amplitude * sin(2 pi t / period)")


def rotation(yaw_deg: float, pitch_deg: float, roll_deg: float) -> np.ndarray:
    """R = Rz(roll) · Ry(yaw) · Rx(pitch) in image axes (x right, y down, z away from the camera)."""
    a, b, c = np.radians([yaw_deg, pitch_deg, roll_deg])
    ry = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return np.asarray(rz @ ry @ rx)


@lru_cache(maxsize=1)
def _tessellation() -> np.ndarray:
    """(M, 3) triangles over the 468 mesh points: the faces of MediaPipe's tessellation (its 3-cycles
    that are faces: every tessellation triangle is one), as index triples."""
    from mediapipe.python.solutions import face_mesh_connections as fmc

    adj: dict[int, set[int]] = {}
    for a, b in fmc.FACEMESH_TESSELATION:
        adj.setdefault(a, set()).add(b)
        adj.setdefault(b, set()).add(a)
    tris = {
        tuple(sorted((a, b, c)))
        for a in adj for b in adj[a] if b > a for c in adj[a] & adj[b] if c > b
    }
    return np.array(sorted(tris), dtype=np.int32)


@lru_cache(maxsize=1)
def holes() -> tuple[tuple[int, ...], ...]:
    """The tessellation's holes — the two eye openings and the mouth — each an ordered ring of mesh
    indices: every boundary loop of the mesh except the face outline (the longest)."""
    edges: dict[tuple[int, int], int] = {}
    for tri in _tessellation():
        for a, b in ((tri[0], tri[1]), (tri[1], tri[2]), (tri[0], tri[2])):
            key = (int(min(a, b)), int(max(a, b)))
            edges[key] = edges.get(key, 0) + 1
    nbrs: dict[int, list[int]] = {}
    for (a, b), n in edges.items():
        if n == 1:  # an edge of one triangle only lies on a boundary
            nbrs.setdefault(a, []).append(b)
            nbrs.setdefault(b, []).append(a)
    loops, seen = [], set()
    for start in sorted(nbrs):
        if start in seen:
            continue
        loop, prev, cur = [start], -1, start
        seen.add(start)
        while nxt := [v for v in nbrs[cur] if v != prev and v not in seen]:
            prev, cur = cur, nxt[0]
            loop.append(cur)
            seen.add(cur)
        loops.append(tuple(loop))
    loops.sort(key=len)
    return tuple(loops[:-1])


@lru_cache(maxsize=1)
def _triangles() -> np.ndarray:
    """(M, 3) triangles of the rendered head: the tessellation, plus each hole (:func:`holes`) closed by
    a fan from a virtual vertex at its centroid (index 468 + hole number; :func:`_with_hole_centres`).

    Why the holes are closed: the tessellation has no triangles across the eye openings and the mouth, so
    a turn rendered from it alone painted the eyes' and mouth's interior from the flat 2-D picture while
    the lids and lips around them turned in 3-D: under ±10° of yaw and pitch a still eye's opening shrank
    by up to a fifth at its seam, which read as eye closure (measured on warp phantoms with one eye
    frozen). Closed, what lies inside an opening turns with the head like the rest of the face."""
    fans = [
        (468 + h, ring[i], ring[(i + 1) % len(ring)])
        for h, ring in enumerate(holes()) for i in range(len(ring))
    ]
    return np.vstack([_tessellation(), np.array(fans, dtype=np.int32)])


def _with_hole_centres(mesh: np.ndarray) -> np.ndarray:
    """(468, 3) mesh points → (468 + holes, 3): each hole's centroid appended (the fans' apex)."""
    centres = [mesh[list(ring)].mean(axis=0) for ring in holes()]
    return np.vstack([mesh, np.array(centres)])


def _similarity(centre: np.ndarray, scale: float, roll_deg: float, shift_px: np.ndarray) -> np.ndarray:
    """2×3 forward map: rotate by roll (image y down: positive = clockwise on screen) and scale about
    ``centre``, then shift."""
    m = np.asarray(cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), -roll_deg, scale), float)
    m[:, 2] += shift_px
    return m


def move_head(
    rgb: np.ndarray, landmarks: np.ndarray | None, pose: dict[str, float], eye_distance: float
) -> np.ndarray:
    """One frame ``rgb`` (H, W, 3) uint8 with its face (FaceMesh ``landmarks`` (478, 3) px) moved by
    ``pose`` (:meth:`HeadMotionSpec.pose`). ``landmarks`` may be None only when yaw and pitch are 0."""
    h, w = rgb.shape[:2]
    out_of_plane = abs(pose["yaw"]) > 1e-9 or abs(pose["pitch"]) > 1e-9
    if landmarks is None:
        if out_of_plane:
            raise InvalidParameterError("yaw and pitch need the frame's landmarks (no face found)")
        centre = np.array([w / 2.0, h / 2.0])
    else:
        centre = np.asarray(landmarks[:468, :2], dtype=np.float64).mean(axis=0)
    shift = np.array([pose["shift_x"], pose["shift_y"]]) * eye_distance
    sim = _similarity(centre, pose["scale"], pose["roll"], shift)
    background = cv2.warpAffine(rgb, sim, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    if not out_of_plane:
        return background
    assert landmarks is not None
    src = _with_hole_centres(np.asarray(landmarks[:468], dtype=np.float64))
    c3 = src[:468].mean(axis=0)  # the face's centroid (not the holes' centres)
    # Roll, scale and shift as in the 2-D similarity (same sign convention), yaw/pitch in 3-D.
    rot = rotation(pose["yaw"], pose["pitch"], pose["roll"])
    dst = pose["scale"] * (src - c3) @ rot.T + c3
    dst[:, :2] += shift
    tris = _triangles()
    depth = dst[tris, 2].mean(axis=1)
    order = np.argsort(-depth)  # far (large z) first, near last
    ids = np.full((h, w), -1, np.int32)
    inv = np.zeros((len(tris), 2, 3))
    for k in order:
        a, b = dst[tris[k], :2], src[tris[k], :2]
        cross = (a[1, 0] - a[0, 0]) * (a[2, 1] - a[0, 1]) - (a[1, 1] - a[0, 1]) * (a[2, 0] - a[0, 0])
        if abs(cross) < 1e-6:
            continue
        inv[k] = cv2.getAffineTransform(a.astype(np.float32), b.astype(np.float32))
        cv2.fillConvexPoly(ids, np.round(a * 16).astype(np.int32), (int(k),), lineType=cv2.LINE_8, shift=4)
    yy, xx = np.nonzero(ids >= 0)
    m = inv[ids[yy, xx]]
    sx = m[:, 0, 0] * xx + m[:, 0, 1] * yy + m[:, 0, 2]
    sy = m[:, 1, 0] * xx + m[:, 1, 1] * yy + m[:, 1, 2]
    map_x = np.full((h, w), -1.0, np.float32)
    map_y = np.full((h, w), -1.0, np.float32)
    map_x[yy, xx], map_y[yy, xx] = sx, sy
    face = cv2.remap(rgb, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    inside = (ids >= 0).astype(np.float32)
    mask = np.asarray(cv2.GaussianBlur(cv2.erode(inside, np.ones((3, 3), np.uint8)), (5, 5), 0))[..., None]
    blended = face.astype(np.float32) * mask + background.astype(np.float32) * (1.0 - mask)
    return np.rint(blended).astype(np.uint8)


def apply_head_motion(
    frames: Iterable[np.ndarray],
    spec: HeadMotionSpec,
    fps: float,
    eye_distance: float,
    landmarks: Iterable[np.ndarray | None] | None = None,
) -> Iterator[np.ndarray]:
    """Stream ``frames`` with the head movement of ``spec`` laid over them.

    ``landmarks`` (per frame, (478, 3) px or None) are needed for yaw/pitch (the mesh) and used as the
    rotation centre; without them the picture's centre is used (roll/scale/shift only).
    """
    lms = iter(landmarks) if landmarks is not None else None
    for k, rgb in enumerate(frames):
        lm = next(lms) if lms is not None else None
        if spec.still:
            yield rgb
            continue
        yield move_head(rgb, lm, spec.pose(k, fps), eye_distance)


def apply_head_motion_to_clip(
    frames: Iterable[np.ndarray], spec: HeadMotionSpec, fps: float, eye_distance: float
) -> Iterator[np.ndarray]:
    """:func:`apply_head_motion` for a real clip: the mesh of each frame (for yaw/pitch and the rotation
    centre) comes from FaceMesh on that frame; a frame without a face keeps the last one found."""
    from service.engine.landmarks import FaceMeshDetector

    if spec.still:
        yield from frames
        return
    last: np.ndarray | None = None
    with FaceMeshDetector(static=False) as det:
        for k, rgb in enumerate(frames):
            lm, faces = det.detect(rgb)
            if lm is not None and faces == 1:
                last = lm
            if last is None and spec.out_of_plane:
                yield rgb  # no face yet: nothing to turn
                continue
            yield move_head(rgb, last, spec.pose(k, fps), eye_distance)
