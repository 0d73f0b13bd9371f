"""Pixel motion under the landmarks: face crops at a fixed scale and Lucas–Kanade point tracking.

Why: FaceMesh's shape prior drags a still half-face along with the moving half (a frozen half moved ~85 %
as far as the moving one in a measured case), so landmarks alone hide palsy. Landmarks say WHERE the
regions are; the pixels say how far they moved.

Crop coordinates: a similarity transform of the image (no rotation) fixed for a whole clip, chosen from the
first frame with a face so that the inter-eye distance is ``eye_distance_px`` crop pixels.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

_LK_PARAMS: dict[str, Any] = dict(
    winSize=(21, 21),
    maxLevel=3,
    criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01),
)


class CropStore:
    """Grayscale face crops, one per frame (None before the first face), in one fixed window.

    Memory is O(T × crop), about 75 kB a frame at the default scale: a 60-s 60 fps clip keeps ~270 MB
    where the full 1080p frames would need 22 GB.

    Parameters
    ----------
    eye_distance_px
        Inter-eye distance of the first detected face in crop pixels.
    width_d, height_d
        Window size in inter-eye distances (generous, so head motion stays inside).
    """

    def __init__(self, eye_distance_px: float = 64.0, width_d: float = 4.0, height_d: float = 4.6) -> None:
        self.eye_distance_px = eye_distance_px
        self.size = (int(round(width_d * eye_distance_px)), int(round(height_d * eye_distance_px)))
        self.scale: float | None = None
        self.offset = np.zeros(2)  # crop = scale * image - offset
        self.crops: list[np.ndarray | None] = []

    def _init_window(self, landmarks: np.ndarray) -> None:
        from service.engine.normalize import interocular_distance

        d = float(interocular_distance(landmarks[None, :, :2])[0])
        self.scale = self.eye_distance_px / max(d, 1.0)
        # Centre slightly above the nose tip so the forehead (brow raise) stays in the window.
        centre = np.nanmean(landmarks[:, :2], axis=0) - np.array([0.0, 0.25 * d])
        self.offset = centre * self.scale - np.array(self.size) / 2.0

    def add(self, rgb: np.ndarray, landmarks: np.ndarray | None) -> None:
        """Store frame ``rgb`` (H, W, 3) uint8; ``landmarks`` (478, 3) px of this frame or None."""
        if self.scale is None and landmarks is not None:
            self._init_window(landmarks)
        if self.scale is None:
            self.crops.append(None)
            return
        m = np.array([[self.scale, 0.0, -self.offset[0]], [0.0, self.scale, -self.offset[1]]])
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        interp = cv2.INTER_AREA if self.scale < 1 else cv2.INTER_LINEAR
        self.crops.append(cv2.warpAffine(gray, m, self.size, flags=interp, borderMode=cv2.BORDER_REPLICATE))

    def to_crop(self, points_px: np.ndarray) -> np.ndarray:
        """(..., 2) image pixels → crop pixels."""
        assert self.scale is not None, "no face seen yet"
        return np.asarray(points_px)[..., :2] * self.scale - self.offset


def track_points(
    crops: list[np.ndarray | None],
    start: int,
    stop: int,
    seeds: np.ndarray,
    fb_max_px: float = 2.0,
    window_px: int = 21,
) -> np.ndarray:
    """Track crop-pixel points frame to frame with pyramidal Lucas–Kanade.

    Parameters
    ----------
    crops
        Grayscale crops from :class:`CropStore`.
    start, stop
        Track from frame ``start`` (where ``seeds`` are) through frame ``stop - 1``.
    seeds
        (N, 2) crop-pixel positions in frame ``start``.
    fb_max_px
        Forward–backward error above which a point counts as lost (NaN from then on).
    window_px
        Lucas–Kanade window (crop pixels): about a third of D for mouth and brow, smaller for the eyelids
        so that the still skin around the eye does not outvote the lid.

    Returns
    -------
    np.ndarray
        (stop − start, N, 2) float32 crop-pixel positions; NaN where lost or where a crop is missing.
    """
    n = seeds.shape[0]
    out = np.full((stop - start, n, 2), np.nan, dtype=np.float32)
    out[0] = seeds
    params: dict[str, Any] = dict(_LK_PARAMS, winSize=(window_px, window_px))
    alive = np.isfinite(seeds).all(axis=1)
    for k in range(1, stop - start):
        prev, cur = crops[start + k - 1], crops[start + k]
        if prev is None or cur is None or not alive.any():
            break
        p0 = out[k - 1][alive].reshape(-1, 1, 2).astype(np.float32)
        # The cv2 stubs reject nextPts=None, which OpenCV accepts (it allocates the output).
        p1, st1, _ = cv2.calcOpticalFlowPyrLK(prev, cur, p0, None, **params)  # type: ignore[call-overload]
        back, st2, _ = cv2.calcOpticalFlowPyrLK(cur, prev, p1, None, **params)  # type: ignore[call-overload]
        fb = np.linalg.norm((back - p0).reshape(-1, 2), axis=1)
        ok = (st1.ravel() == 1) & (st2.ravel() == 1) & (fb <= fb_max_px)
        idx = np.flatnonzero(alive)
        out[k, idx[ok]] = p1.reshape(-1, 2)[ok]
        alive[idx[~ok]] = False
    return out


def track_points_from(
    crops: list[np.ndarray | None],
    anchor: int,
    first: int,
    last: int,
    seeds: np.ndarray,
    fb_max_px: float = 2.0,
    window_px: int = 21,
) -> np.ndarray:
    """Track crop-pixel points seeded in frame ``anchor`` backward to ``first`` and forward to ``last``.

    Returns (last − first + 1, N, 2) float32 crop-pixel positions, row 0 = frame ``first`` (NaN where
    lost), as :func:`track_points` does one way. ``first <= anchor <= last``.
    """
    if not first <= anchor <= last:
        raise ValueError(f"anchor must lie in [first, last]; got {anchor} not in [{first}, {last}]")
    back = track_points(crops[first : anchor + 1][::-1], 0, anchor - first + 1, seeds, fb_max_px, window_px)
    fwd = track_points(crops, anchor, last + 1, seeds, fb_max_px, window_px)
    return np.concatenate([back[::-1], fwd[1:]], axis=0)
