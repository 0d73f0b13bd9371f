"""A hand-made face in the normalised frame (x toward the PATIENT's left, y up, unit D), shared by the
unit tests of the signals and the scores. No MediaPipe."""

from __future__ import annotations

import numpy as np

from service.domain import Task
from service.engine import normalize as nz
from service.engine import tasks as tk

U = np.sqrt(0.5)  # component of the 45° smile direction
EYE_A, EYE_B = 0.15, 0.06  # eye-contour ellipse half-axes (D)


def symmetric_face(seed: int = 0) -> np.ndarray:
    """A (478, 2) face, exactly symmetric about x = 0, with eye centres at (±0.5, 0.3) so D = 1.

    Left-half points (x > 0) are placed first; every right-half point is its MIRROR partner at (−x, y);
    midline points sit at x = 0. The 16 eye-contour points lie on an ellipse in contour order (lateral
    canthus 263 at angle 0, upper lid, medial canthus 362 at π, lower lid), so their mean is the centre.
    """
    rng = np.random.default_rng(seed)
    pts = np.full((nz.N_LANDMARKS, 2), np.nan)
    left = np.asarray(nz.LEFT_HALF)
    pts[left, 0] = rng.uniform(0.1, 1.0, len(left))
    pts[left, 1] = rng.uniform(-1.5, 1.2, len(left))
    ang = 2 * np.pi * np.arange(16) / 16
    eye = list(nz.LEFT_EYE_CONTOUR)
    pts[eye, 0] = 0.5 + EYE_A * np.cos(ang)
    pts[eye, 1] = 0.3 + EYE_B * np.sin(ang)
    brow = list(nz.LEFT_BROW)
    pts[brow, 0] = np.linspace(0.2, 0.9, len(brow))
    pts[brow, 1] = 0.6 + 0.05 * np.sin(np.linspace(0, np.pi, len(brow)))
    pts[nz.LEFT_IRIS_CENTRE] = (0.5, 0.3)
    smile = list(tk.SMILE_LEFT)
    pts[smile, 0] = 0.4 + np.array([0.0, -0.03, -0.02, -0.02, 0.03])
    pts[smile, 1] = -0.9 + np.array([0.0, 0.0, -0.03, 0.03, -0.05])
    pts[nz.MIRROR[left]] = pts[left] * np.array([-1.0, 1.0])
    mid = list(nz.MIDLINE)
    pts[mid, 0] = 0.0
    pts[mid, 1] = rng.uniform(-1.5, 1.2, len(mid))
    pts[nz.NOSE_TIP] = (0.0, 0.0)
    assert np.isfinite(pts).all()
    return pts


def smile_face(rest: np.ndarray, left: float, right: float) -> np.ndarray:
    """Move the left mouth-corner group ``left`` D up-and-out at 45°, the right group ``right`` D along
    the mirror direction (negative amounts: down-and-in)."""
    peak = rest.copy()
    gl, gr = tk.groups(Task.SMILE)
    peak[list(gl)] += left * np.array([U, U])
    peak[list(gr)] += right * np.array([-U, U])
    return peak


def brow_face(
    rest: np.ndarray, left: float, right: float, canthi: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """Raise the left / right brow by ``left`` / ``right`` D and the canthi by ``canthi``."""
    peak = rest.copy()
    gl, gr = tk.groups(Task.BROW_RAISE)
    peak[list(gl), 1] += left
    peak[list(gr), 1] += right
    peak[list(tk.CANTHI_LEFT), 1] += canthi[0]
    peak[list(tk.mirrored(tk.CANTHI_LEFT)), 1] += canthi[1]
    return peak


def eye_face(rest: np.ndarray, left: float, right: float) -> np.ndarray:
    """Close each eye by the given fraction: scale its contour's vertical extent by (1 − fraction) about
    the contour centre, which scales the shoelace area by exactly (1 − fraction)."""
    peak = rest.copy()
    for contour, frac in ((nz.LEFT_EYE_CONTOUR, left), (nz.RIGHT_EYE_CONTOUR, right)):
        idx = list(contour)
        cy = peak[idx, 1].mean()
        peak[idx, 1] = cy + (1.0 - frac) * (peak[idx, 1] - cy)
    return peak
