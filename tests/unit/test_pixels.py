"""Lucas–Kanade point tracking on synthetic textures with known motion."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from service.engine.pixels import track_points, track_points_from


def _texture_moving(shifts: list[tuple[float, float]]) -> list[np.ndarray | None]:
    """Frames of one smooth random texture translated by ``shifts`` (x, y) in pixels."""
    rng = np.random.default_rng(7)
    base = cv2.GaussianBlur(rng.uniform(0, 255, (160, 160)).astype(np.float32), (0, 0), 2.0)
    base = cv2.normalize(base, None, 0, 255, cv2.NORM_MINMAX)
    frames: list[np.ndarray | None] = []
    for dx, dy in shifts:
        m = np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]])
        frames.append(cv2.warpAffine(base, m, (160, 160), borderMode=cv2.BORDER_REFLECT).astype(np.uint8))
    return frames


SHIFTS = [(0.0, 0.0), (1.0, -0.5), (2.5, -1.5), (4.0, -3.0), (4.5, -3.5), (4.0, -3.0)]
SEEDS = np.array([[60.0, 70.0], [90.0, 80.0], [75.0, 100.0]], dtype=np.float32)


def test_seeded_in_a_middle_frame_the_points_are_followed_both_ways() -> None:
    frames = _texture_moving(SHIFTS)
    anchor = 3
    out = track_points_from(frames, anchor, 0, len(frames) - 1, SEEDS)
    assert out.shape == (len(frames), 3, 2)
    np.testing.assert_array_equal(out[anchor], SEEDS)
    for k, (dx, dy) in enumerate(SHIFTS):
        expected = SEEDS + np.array([dx, dy]) - np.array(SHIFTS[anchor])
        np.testing.assert_allclose(out[k], expected, atol=0.15, err_msg=f"frame {k}")


def test_anchored_at_the_first_frame_it_equals_forward_tracking() -> None:
    frames = _texture_moving(SHIFTS)
    np.testing.assert_array_equal(
        track_points_from(frames, 0, 0, len(frames) - 1, SEEDS), track_points(frames, 0, len(frames), SEEDS)
    )


def test_a_missing_crop_loses_the_points_beyond_it_only() -> None:
    frames = _texture_moving(SHIFTS)
    frames[1] = None
    out = track_points_from(frames, 3, 0, len(frames) - 1, SEEDS)
    assert np.isnan(out[:2]).all() and np.isfinite(out[2:]).all()


def test_an_anchor_outside_the_frames_is_refused() -> None:
    frames = _texture_moving(SHIFTS)
    with pytest.raises(ValueError, match="anchor"):
        track_points_from(frames, 6, 0, 5, SEEDS)
