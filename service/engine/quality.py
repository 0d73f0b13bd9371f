"""Quality control of a landmark track: is this clip or photo analysable, and which frames count?"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.domain import Quality
from service.engine.tasks import _runs


@dataclass(frozen=True)
class QualityLimits:
    """Configurable QC limits. Angles in degrees; fractions of the clip's frames."""

    max_yaw_deg: float = 25.0
    max_pitch_deg: float = 25.0
    max_roll_deg: float = 20.0
    max_lost_fraction: float = 0.25
    max_multi_face_fraction: float = 0.1
    max_pose_fraction: float = 0.25
    min_valid_frames: int = 10
    #: Head motion whose rigid fit leaves more than this (90th-percentile RMS of the stable points, in D)
    #: counts as not removed: the task's result says so.
    max_head_residual_d: float = 0.05


def _ranges(mask: np.ndarray) -> str:
    parts = [f"{a}" if a == b else f"{a}–{b}" for a, b in _runs(mask)]
    return ", ".join(parts[:4]) + (", …" if len(parts) > 4 else "")


def assess(
    faces: np.ndarray, pose: np.ndarray, limits: QualityLimits, *, still: bool = False
) -> tuple[Quality, np.ndarray]:
    """Quality verdict and the (T,) mask of frames fit for measurement.

    Parameters
    ----------
    faces
        (T,) number of faces found per frame.
    pose
        (T, 3) yaw, pitch, roll in degrees (NaN without a face).
    still
        True for photos: every photo must show exactly one face, and one valid frame is enough.
    """
    t = int(faces.shape[0])
    reasons: list[str] = []
    warnings: list[str] = []
    one = faces == 1
    if t == 0 or not (faces > 0).any():
        return Quality(False, ("no face",), (), 0, t), np.zeros(t, bool)

    multi = faces > 1
    if multi.any():
        msg = f"more than one face in {int(multi.sum())} of {t} frames"
        (reasons if still or multi.mean() > limits.max_multi_face_fraction else warnings).append(msg)

    lost = faces == 0
    if lost.any():
        msg = f"face lost for part of the clip: frames {_ranges(lost)} ({100 * lost.mean():.0f} % of {t})"
        if still:
            msg = "no face in one of the photos"
        (reasons if still or lost.mean() > limits.max_lost_fraction else warnings).append(msg)

    with np.errstate(invalid="ignore"):
        off = np.zeros(t, bool)
        for k, (name, lim) in enumerate(
            (("yaw", limits.max_yaw_deg), ("pitch", limits.max_pitch_deg), ("roll", limits.max_roll_deg))
        ):
            bad = one & (np.abs(pose[:, k]) > lim)
            if bad.any():
                msg = f"head {name} beyond ±{lim:g}° in {int(bad.sum())} frames"
                serious = still or bad.sum() > limits.max_pose_fraction * one.sum()
                (reasons if serious else warnings).append(msg)
            off |= bad
    usable = one & ~off
    need = 1 if still else limits.min_valid_frames
    if usable.sum() < need and not reasons:
        reasons.append(f"too few valid frames ({int(usable.sum())} < {need})")
    return Quality(not reasons, tuple(reasons), tuple(warnings), int(usable.sum()), t), usable
