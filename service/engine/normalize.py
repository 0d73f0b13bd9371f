"""Landmark normalisation: nose-tip origin, inter-eye scale, roll removal, and the mirror map.

Sides are always the PATIENT's (DESIGN.md, "Sides and coordinates"). Input landmarks are MediaPipe
FaceMesh points in PIXELS, shape (T, 478, 3) float32: x px (image right), y px (image DOWN), z in
MediaPipe's depth unit scaled by the image width (so also px; smaller = closer to the camera). In a
frontal, non-mirrored picture the patient's left is on the image's right, and MediaPipe's LEFT_* sets
(LEFT_EYE 263/362/386/374..., LEFT_EYEBROW 276..336, iris 473-477) are the patient's left.
Mirrored (selfie) input must be un-mirrored before landmark detection (flip the frames); nothing here
guesses.

The normalised frame (shape (T, 478, 2), dimensionless, unit D = inter-eye distance):

* origin at the nose tip (landmark 1);
* rotated about the nose tip so that the line through the two eye centres is horizontal;
* +x points toward the PATIENT's LEFT (image +x for non-mirrored input);
* +y points UP, toward the forehead (image y is flipped), so upward displacements are positive.

All index tables come from ``mirror_map.json`` next to this module, written by
``scripts/make_mirror_map.py`` from ``mediapipe.python.solutions.face_mesh_connections``; they are
baked in so importing the engine does not import MediaPipe.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "LEFT_BROW",
    "LEFT_EYE",
    "LEFT_EYE_CONTOUR",
    "LEFT_HALF",
    "LEFT_IRIS",
    "LEFT_IRIS_CENTRE",
    "LIPS",
    "MIDLINE",
    "MIRROR",
    "NOSE_TIP",
    "N_LANDMARKS",
    "RIGHT_BROW",
    "RIGHT_EYE",
    "RIGHT_EYE_CONTOUR",
    "RIGHT_HALF",
    "RIGHT_IRIS",
    "RIGHT_IRIS_CENTRE",
    "Normalization",
    "eye_centres",
    "head_pose",
    "interocular_distance",
    "mirror_points",
    "normalize",
    "shoelace_area",
]


def _load_table() -> dict[str, Any]:
    # The only I/O in this module: the committed, versioned table, read once at import.
    table: dict[str, Any] = json.loads(Path(__file__).with_name("mirror_map.json").read_text())
    return table


_TABLE = _load_table()
_REGIONS: dict[str, list[int]] = _TABLE["regions"]

N_LANDMARKS = 478
NOSE_TIP = 1
#: Forehead top and chin on the midline, used for the head's up axis in :func:`head_pose`.
_FOREHEAD, _CHIN = 10, 152

#: (478,) int: ``MIRROR[i]`` is the index of landmark i's left<->right partner; midline points map to
#: themselves. An involution (``MIRROR[MIRROR] == arange(478)``).
MIRROR: np.ndarray = np.asarray(_TABLE["mirror"], dtype=np.intp)
MIRROR.setflags(write=False)
if MIRROR.shape != (N_LANDMARKS,) or not np.array_equal(MIRROR[MIRROR], np.arange(N_LANDMARKS)):
    raise ImportError("mirror_map.json is not a 478-point involution; re-run scripts/make_mirror_map.py")
#: The six tessellation edges that MIRROR cannot send onto an edge: MediaPipe's mesh draws three quads'
#: diagonals the other way on the other side, so no map can (tests/unit/test_normalize.py proves it).
TESSELLATION_ASYMMETRIES: tuple[tuple[int, int], ...] = tuple(
    (int(a), int(b)) for pair in _TABLE["tessellation_asymmetries"] for a, b in pair
)

#: Index sets of the patient's left / right features (sorted), from MediaPipe's FACEMESH_* connections.
LEFT_EYE: tuple[int, ...] = tuple(_REGIONS["left_eye"])
RIGHT_EYE: tuple[int, ...] = tuple(_REGIONS["right_eye"])
LEFT_BROW: tuple[int, ...] = tuple(_REGIONS["left_brow"])
RIGHT_BROW: tuple[int, ...] = tuple(_REGIONS["right_brow"])
#: Iris RINGS (4 points each, as in FACEMESH_LEFT_IRIS / FACEMESH_RIGHT_IRIS); centres are separate.
LEFT_IRIS: tuple[int, ...] = tuple(_REGIONS["left_iris"])
RIGHT_IRIS: tuple[int, ...] = tuple(_REGIONS["right_iris"])
LEFT_IRIS_CENTRE = 473
RIGHT_IRIS_CENTRE = 468
#: Lip contours (outer and inner), both sides and the midline.
LIPS: tuple[int, ...] = tuple(_REGIONS["lips"])
#: The 16 eye-contour points ORDERED around the eye (for :func:`shoelace_area`): from the lateral
#: canthus along the upper lid to the medial canthus and back along the lower lid. The right contour
#: is the mirror of the left one point for point (``MIRROR[LEFT_EYE_CONTOUR] == RIGHT_EYE_CONTOUR``).
LEFT_EYE_CONTOUR: tuple[int, ...] = tuple(_REGIONS["left_eye_contour"])
RIGHT_EYE_CONTOUR: tuple[int, ...] = tuple(_REGIONS["right_eye_contour"])
#: The face's outline (MediaPipe's FACEMESH_FACE_OVAL): 36 points ORDERED around it from the forehead top
#: (10), so they make a polygon; inside it the picture is the face's own surface (no hair, no background).
FACE_OVAL: tuple[int, ...] = (
    10, 109, 67, 103, 54, 21, 162, 127, 234, 93, 132, 58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378,
    379, 365, 397, 288, 361, 323, 454, 356, 389, 251, 284, 332, 297, 338,
)
#: Mesh points on the facial midline (fixed by MIRROR), and each side's points (iris included).
MIDLINE: tuple[int, ...] = tuple(_REGIONS["midline"])
LEFT_HALF: tuple[int, ...] = tuple(_REGIONS["left_half"])
RIGHT_HALF: tuple[int, ...] = tuple(sorted(int(MIRROR[i]) for i in LEFT_HALF))

_LEFT_EYE_IDX = np.asarray(LEFT_EYE_CONTOUR, dtype=np.intp)
_RIGHT_EYE_IDX = np.asarray(RIGHT_EYE_CONTOUR, dtype=np.intp)
_LEFT_HALF_IDX = np.asarray(LEFT_HALF, dtype=np.intp)


def _check_points(points: np.ndarray, name: str = "points", min_dims: int = 2) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim < 2 or arr.shape[-2] != N_LANDMARKS or arr.shape[-1] < min_dims:
        raise ValueError(f"{name} must have shape (..., {N_LANDMARKS}, >= {min_dims}); got {arr.shape}")
    return arr


def eye_centres(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres of the patient's left and right eyes.

    The centre is the mean of the eye's 16 contour points (FACEMESH_LEFT_EYE / FACEMESH_RIGHT_EYE),
    not the iris centre (468/473): the lid contour does not move with gaze, so the inter-eye axis and
    scale stay put when the patient looks sideways. (It does move with lid closure, by a small,
    symmetric amount on a healthy face.)

    Parameters
    ----------
    points : ndarray, shape (..., 478, 2) or (..., 478, 3)
        Landmarks in any consistent 2-D frame (pixels or normalised); only x and y are used.

    Returns
    -------
    left, right : ndarray, shape (..., 2)
        The patient's left eye centre and right eye centre, in the input's units.
    """
    arr = _check_points(points)
    left = arr[..., _LEFT_EYE_IDX, :2].mean(axis=-2)
    right = arr[..., _RIGHT_EYE_IDX, :2].mean(axis=-2)
    return left, right


def interocular_distance(points: np.ndarray) -> np.ndarray:
    """Distance D between the two eye centres (see :func:`eye_centres`).

    Parameters
    ----------
    points : ndarray, shape (..., 478, 2) or (..., 478, 3)

    Returns
    -------
    ndarray, shape (...,)
        D in the input's units (pixels for raw landmarks).
    """
    left, right = eye_centres(points)
    return np.asarray(np.linalg.norm(left - right, axis=-1))


@dataclass(frozen=True)
class Normalization:
    """The per-frame similarity transform from pixels to the normalised frame.

    Attributes
    ----------
    origin : ndarray, shape (T, 2)
        Nose tip (landmark 1) in pixels (x right, y down).
    scale : ndarray, shape (T,)
        Inter-eye distance D in pixels.
    angle : ndarray, shape (T,)
        Roll of the eye line in radians, in image coordinates: ``atan2(yL - yR, xL - xR)`` of the
        vector from the patient's right eye centre to the left one; positive when the left eye is
        LOWER in the picture (head tilted toward the patient's left shoulder, for non-mirrored input).
    """

    origin: np.ndarray
    scale: np.ndarray
    angle: np.ndarray

    def __len__(self) -> int:
        return int(np.shape(self.scale)[0])

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Map pixel points (T, K, >=2) into the normalised frame (T, K, 2); T may broadcast with 1."""
        pts = np.asarray(points, dtype=np.float64)[..., :2]
        origin = np.asarray(self.origin, dtype=np.float64)[:, None, :]
        scale = np.asarray(self.scale, dtype=np.float64)[:, None]
        # A zero eye distance is a degenerate detection: that frame becomes NaN like a missing face.
        scale = np.where(scale > 0, scale, np.nan)
        c = np.cos(np.asarray(self.angle, dtype=np.float64))[:, None]
        s = np.sin(np.asarray(self.angle, dtype=np.float64))[:, None]
        dx = pts[..., 0] - origin[..., 0]
        dy = pts[..., 1] - origin[..., 1]
        # Rotate by -angle about the nose tip (eye line -> image +x), then flip y so that up is +y.
        x = (c * dx + s * dy) / scale
        y = -(-s * dx + c * dy) / scale
        return np.stack([x, y], axis=-1)


def _fit(points: np.ndarray) -> Normalization:
    left, right = eye_centres(points)
    v = left - right
    return Normalization(
        origin=points[:, NOSE_TIP, :2].copy(),
        scale=np.linalg.norm(v, axis=-1),
        angle=np.arctan2(v[:, 1], v[:, 0]),
    )


def normalize(
    points: np.ndarray, *, reference: Normalization | None = None
) -> tuple[np.ndarray, Normalization]:
    """Map pixel landmarks into the normalised face frame.

    The transform is a similarity: translate the nose tip (landmark 1) to the origin, rotate ABOUT THE
    NOSE TIP by minus the eye-line roll so the eye centres lie on a horizontal line, flip y so that it
    grows upward, and divide by the inter-eye distance D.

    Parameters
    ----------
    points : ndarray, shape (T, 478, 3) or (T, 478, 2)
        Landmarks in pixels (x right, y down); z, if present, is ignored.
    reference : Normalization, optional
        Transform to apply instead of each frame's own. Its arrays have length T, or length 1 to apply
        one frame's transform (e.g. the rest frame's) to every frame, so that head motion is NOT
        removed. With None (default) every frame uses its own origin, scale and roll.

    Returns
    -------
    norm : ndarray, shape (T, 478, 2), float64
        x toward the PATIENT's LEFT, y UP, in units of D; nose tip at (0, 0) when reference is None.
    transform : Normalization
        The transform used (``reference`` itself when given).

    Raises
    ------
    ValueError
        If ``points`` is not (T, 478, 2|3), or ``reference`` has a length other than 1 or T.

    Notes
    -----
    Frames without a face (NaN landmarks, as ``landmarks.py`` returns them) or with a zero eye
    distance come out all-NaN, with NaN in their ``Normalization`` entries; other frames are unaffected.
    """
    arr = _check_points(points)
    if arr.ndim != 3:
        raise ValueError(f"points must have shape (T, {N_LANDMARKS}, 2|3); got {arr.shape}")
    if reference is None:
        transform = _fit(arr)
    else:
        if len(reference) not in (1, arr.shape[0]):
            raise ValueError(f"reference has {len(reference)} frames; expected 1 or {arr.shape[0]}")
        transform = reference
    return transform.apply(arr), transform


def mirror_points(norm: np.ndarray) -> np.ndarray:
    """Reflect normalised landmarks across the midline (x -> -x) and swap left/right indices.

    ``out[..., i, :] = (-x, y)`` of landmark ``MIRROR[i]``, so a perfectly symmetric face maps onto
    itself, and for an asymmetric face ``out - norm`` is the per-landmark asymmetry (point i compared
    with its partner's reflection).

    Parameters
    ----------
    norm : ndarray, shape (..., 478, C), C >= 1
        Landmarks in the normalised frame (x toward the patient's left, midline at x = 0). Columns after
        x (y, and z if any) are carried over unchanged.

    Returns
    -------
    ndarray, same shape as ``norm``
    """
    arr = _check_points(norm, "norm", min_dims=1)
    out = arr[..., MIRROR, :].copy()
    out[..., 0] = -out[..., 0]
    return out


def head_pose(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """Approximate head orientation per frame from the 3-D landmarks.

    Head axes in camera coordinates (X image right, Y image UP, Z toward the camera; MediaPipe's
    z is negated): the lateral axis is the sum over all left/right pairs of (left point - right point),
    i.e. it points toward the patient's left and uses the whole mesh; the up axis is chin (152) ->
    forehead (10) made orthogonal to it; forward = lateral x up. Yaw and pitch are read from
    R = Rz(roll') Rx(-pitch) Ry(yaw), which keeps them unaffected by in-plane head tilt. Roll is taken
    from the 2-D eye line, as in :func:`normalize`.

    "Pitch 0" means the forehead and chin are at equal depth (a vertical facial plane); the estimate
    relies on MediaPipe's relative depth and is good to a few degrees, enough to flag non-frontal
    frames, not for measurement. An opening jaw moves the chin and biases pitch slightly upward.

    Parameters
    ----------
    points : ndarray, shape (T, 478, 3)
        Landmarks in pixels (x right, y down, z = MediaPipe z x image width).
    width, height : int
        Image size in pixels; checked only (the estimate is scale-free, and the landmark model's depth
        is already relative to the face, not perspective-projected from a known camera).

    Returns
    -------
    ndarray, shape (T, 3), float64, degrees (NaN for frames with NaN landmarks)
        ``yaw``: positive when the patient turns toward THEIR LEFT (nose toward image right for
        non-mirrored input); ``pitch``: positive when the patient looks UP (chin forward);
        ``roll``: positive when the head tilts toward the patient's LEFT shoulder (left eye lower in
        the picture). All about 0 for a frontal, upright face; yaw and roll change sign on a
        horizontally flipped picture.
    """
    arr = _check_points(points, min_dims=3)
    if arr.ndim != 3:
        raise ValueError(f"points must have shape (T, {N_LANDMARKS}, 3); got {arr.shape}")
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive; got {width}x{height}")
    cam = arr[..., :3] * np.array([1.0, -1.0, -1.0])

    lateral = (cam[:, _LEFT_HALF_IDX] - cam[:, MIRROR[_LEFT_HALF_IDX]]).sum(axis=1)
    lateral /= np.linalg.norm(lateral, axis=-1, keepdims=True)
    up = cam[:, _FOREHEAD] - cam[:, _CHIN]
    up -= lateral * np.sum(up * lateral, axis=-1, keepdims=True)
    up /= np.linalg.norm(up, axis=-1, keepdims=True)
    forward = np.cross(lateral, up)

    # R = [lateral up forward] = Rz(g) Rx(b) Ry(a): row 3 of R is (-sin a cos b, sin b, cos a cos b).
    yaw = np.arctan2(-lateral[:, 2], forward[:, 2])
    # b > 0 tips the forward axis downward, so looking up is -b.
    pitch = -np.arcsin(np.clip(up[:, 2], -1.0, 1.0))
    left, right = eye_centres(arr)
    v = left - right
    roll = np.arctan2(v[:, 1], v[:, 0])
    return np.degrees(np.stack([yaw, pitch, roll], axis=-1))


def shoelace_area(polygon: np.ndarray) -> np.ndarray:
    """Absolute area of simple polygons by the shoelace formula.

    Parameters
    ----------
    polygon : ndarray, shape (..., N, 2)
        Vertices in order around the polygon (either direction), e.g.
        ``norm[:, LEFT_EYE_CONTOUR]``; the closing edge is implied.

    Returns
    -------
    ndarray, shape (...,)
        Area in the input's units squared (D^2 for normalised landmarks).
    """
    p = np.asarray(polygon, dtype=np.float64)
    if p.ndim < 2 or p.shape[-1] != 2 or p.shape[-2] < 3:
        raise ValueError(f"polygon must have shape (..., N>=3, 2); got {p.shape}")
    x, y = p[..., 0], p[..., 1]
    cross = x * np.roll(y, -1, axis=-1) - np.roll(x, -1, axis=-1) * y
    return np.asarray(0.5 * np.abs(np.sum(cross, axis=-1)))
