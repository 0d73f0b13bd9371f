"""Quality control of a landmark track (service/engine/quality.py) on hand-made face counts and poses."""

from __future__ import annotations

import numpy as np
import pytest

from service.engine.quality import QualityLimits, assess

LIMITS = QualityLimits()


def track(t: int, faces: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``t`` frames with ``faces`` faces each and a frontal pose (NaN where there is no face)."""
    f = np.full(t, faces, dtype=np.int16)
    pose = np.zeros((t, 3)) if faces else np.full((t, 3), np.nan)
    return f, pose


def lose(faces: np.ndarray, pose: np.ndarray, frames) -> None:
    faces[frames] = 0
    pose[frames] = np.nan


def test_good_clip():
    faces, pose = track(40)
    q, usable = assess(faces, pose, LIMITS)
    assert q.ok and q.reasons == () and q.warnings == ()
    assert (q.valid_frames, q.total_frames) == (40, 40)
    assert usable.dtype == bool and usable.all()


def test_no_face_at_all():
    q, usable = assess(*track(20, faces=0), LIMITS)
    assert not q.ok
    assert q.reasons == ("no face",)
    assert (q.valid_frames, q.total_frames) == (0, 20)
    assert not usable.any() and usable.shape == (20,)


def test_empty_clip():
    q, usable = assess(np.zeros(0, np.int16), np.zeros((0, 3)), LIMITS)
    assert not q.ok and q.reasons == ("no face",) and usable.shape == (0,)


def test_face_lost_60_percent_is_not_analysable():
    faces, pose = track(50)
    lose(faces, pose, slice(10, 40))  # 30 of 50 frames
    q, usable = assess(faces, pose, LIMITS)
    assert not q.ok
    assert len(q.reasons) == 1
    assert "face lost" in q.reasons[0]
    assert "frames 10–39" in q.reasons[0] and "(60 % of 50)" in q.reasons[0]
    assert q.valid_frames == 20 and usable.sum() == 20


def test_a_few_lost_frames_is_a_warning():
    faces, pose = track(40)
    lose(faces, pose, [3, 4, 5, 20])
    q, usable = assess(faces, pose, LIMITS)
    assert q.ok and q.reasons == ()
    assert len(q.warnings) == 1 and "face lost" in q.warnings[0]
    assert "frames 3–5, 20" in q.warnings[0]
    assert q.valid_frames == 36
    assert not usable[[3, 4, 5, 20]].any() and usable.sum() == 36


def test_lost_fraction_limit_is_strict_greater():
    faces, pose = track(40)
    lose(faces, pose, slice(0, 10))  # exactly 25 %: a warning, not a reason
    q, _ = assess(faces, pose, LIMITS)
    assert q.ok and len(q.warnings) == 1
    lose(faces, pose, slice(0, 11))
    assert not assess(faces, pose, LIMITS)[0].ok


def test_two_faces_in_most_frames():
    faces, pose = track(40)
    faces[5:35] = 2
    q, usable = assess(faces, pose, LIMITS)
    assert not q.ok
    assert any("more than one face in 30 of 40 frames" in r for r in q.reasons)
    assert q.valid_frames == 10 and not usable[5:35].any()


def test_two_faces_in_one_frame_is_a_warning_and_frame_dropped():
    faces, pose = track(40)
    faces[7] = 2
    q, usable = assess(faces, pose, LIMITS)
    assert q.ok
    assert any("more than one face" in w for w in q.warnings)
    assert not usable[7] and q.valid_frames == 39


@pytest.mark.parametrize(("k", "name", "limit"), [(0, "yaw", 25.0), (1, "pitch", 25.0), (2, "roll", 20.0)])
def test_pose_beyond_limit_in_most_frames(k, name, limit):
    faces, pose = track(40)
    pose[:30, k] = -(limit + 5.0)
    q, usable = assess(faces, pose, LIMITS)
    assert not q.ok
    assert any(name in r and "30 frames" in r for r in q.reasons)
    assert usable.sum() == 10


@pytest.mark.parametrize(("k", "name"), [(0, "yaw"), (1, "pitch"), (2, "roll")])
def test_pose_beyond_limit_in_a_few_frames_is_a_warning(k, name):
    faces, pose = track(40)
    pose[[1, 2], k] = 60.0
    q, usable = assess(faces, pose, LIMITS)
    assert q.ok
    assert any(name in w for w in q.warnings)
    assert not usable[[1, 2]].any() and q.valid_frames == 38


def test_pose_at_limit_is_fine():
    faces, pose = track(20)
    pose[:, 0] = 25.0
    q, usable = assess(faces, pose, LIMITS)
    assert q.ok and q.warnings == () and usable.all()


def test_too_few_valid_frames():
    q, usable = assess(*track(5), LIMITS)
    assert not q.ok
    assert q.reasons == ("too few valid frames (5 < 10)",)


def test_custom_limits():
    faces, pose = track(40)
    pose[:, 0] = 30.0
    q, _ = assess(faces, pose, QualityLimits(max_yaw_deg=40.0))
    assert q.ok
    q, _ = assess(*track(5), QualityLimits(min_valid_frames=5))
    assert q.ok


# --------------------------------------------------------------------------- photos (still=True)


def test_still_pair_ok():
    q, usable = assess(*track(2), LIMITS, still=True)
    assert q.ok and q.valid_frames == 2 and usable.all()


def test_still_single_photo_ok():
    q, _ = assess(*track(1), LIMITS, still=True)
    assert q.ok and q.valid_frames == 1


def test_still_one_photo_without_face_is_not_analysable():
    faces, pose = track(2)
    lose(faces, pose, [1])
    q, usable = assess(faces, pose, LIMITS, still=True)
    assert not q.ok
    assert q.reasons == ("no face in one of the photos",)
    assert usable.tolist() == [True, False]


def test_still_two_faces_in_a_photo_is_not_analysable():
    faces, pose = track(2)
    faces[0] = 2
    q, _ = assess(faces, pose, LIMITS, still=True)
    assert not q.ok and any("more than one face" in r for r in q.reasons)


def test_still_pose_beyond_limit_in_one_photo_is_not_analysable():
    faces, pose = track(2)
    pose[1, 0] = 40.0
    q, _ = assess(faces, pose, LIMITS, still=True)
    assert not q.ok and any("yaw" in r for r in q.reasons)
