"""Head-motion removal on synthetic points whose true motion is known exactly."""

from __future__ import annotations

import numpy as np
import pytest

from service.domain import HeadMotion
from service.engine import headmotion as hm


def _rot(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rz(roll) · Ry(yaw) · Rx(pitch), degrees (the decomposition :func:`hm.euler_deg` inverts)."""
    y, p, r = np.radians([yaw, pitch, roll])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    return np.asarray(rz @ ry @ rx)


def _to_head_frame(
    points: np.ndarray, depth: np.ndarray, stable: np.ndarray, stable_rest: np.ndarray, rotations: np.ndarray,
    eye_distance: float, **kw: object,
) -> tuple[np.ndarray, HeadMotion | None]:
    """What the pipeline does: fit the head's pose on the stable points, then solve the measured ones."""
    fit = hm.fit_head_motion(stable, stable_rest, rotations, eye_distance, **kw)  # type: ignore[arg-type]
    return hm.head_positions(points, depth, fit), fit.motion


def _head(n: int = 40, seed: int = 0) -> np.ndarray:
    """A face-sized cloud of 3-D points (px), z spread like a face's depth."""
    rng = np.random.default_rng(seed)
    return rng.uniform([-60, -80, -30], [60, 80, 30], size=(n, 3))


@pytest.mark.parametrize("angles", [(0, 0, 0), (8, -5, 6), (-10, 10, -6)])
def test_euler_round_trip(angles: tuple[float, float, float]) -> None:
    assert np.allclose(hm.euler_deg(_rot(*angles)), angles, atol=1e-9)
    yaw, pitch, _ = angles
    assert np.allclose(hm.out_of_plane(_rot(*angles)), _rot(yaw, pitch, 0), atol=1e-9)


def test_robust_similarity_3d_ignores_points_an_expression_moved() -> None:
    src = _head()
    rot = _rot(7, -4, 5)
    dst = 1.06 * src @ rot.T + np.array([12.0, -5.0, 3.0])
    dst[:6] += np.array([0.0, -25.0, 0.0])  # a few "cheek" points lifted by a smile
    s, r, t = hm.robust_similarity_3d(src, dst)
    assert s == pytest.approx(1.06, abs=1e-6)
    assert np.allclose(r, rot, atol=1e-6) and np.allclose(t, [12, -5, 3], atol=1e-4)


def test_frontalize_removes_rigid_motion_and_keeps_expression() -> None:
    rest = np.zeros((478, 3))
    rest[:] = _head(478, seed=1)
    moved = 0.95 * rest @ _rot(-6, 8, 4).T + np.array([3.0, 7.0, 0.0])
    expression = np.zeros_like(rest)
    expression[61] = [-4.0, -3.0, 0.0]  # a mouth corner, not a stable point
    moved = moved + expression @ _rot(-6, 8, 4).T * 0.95
    out = hm.frontalize(np.stack([rest, moved]), rest)
    assert np.allclose(out[0], rest, atol=1e-6)
    assert np.allclose(out[1] - rest, expression, atol=1e-6)


@pytest.mark.parametrize("from_pixels", [True, False])
def test_head_frame_recovers_displacements_under_roll_yaw_pitch_scale(from_pixels: bool) -> None:
    stable = _head(30, seed=2)
    measured = _head(8, seed=3)
    motion = np.zeros((8, 2))
    motion[:4] = [-3.0, -2.0]  # "left" points move in the head's frontal plane; the rest stay still
    poses = [(0, 0, 0, 1.0), (6, -7, 5, 1.05), (-10, 10, -6, 0.93)]
    st, pts, rots = [], [], []
    for k, (yaw, pitch, roll, scale) in enumerate(poses):
        rot = _rot(yaw, pitch, roll)
        shift = np.array([4.0 * k, -3.0 * k])
        cam = scale * rot[:2]
        st.append(stable @ cam.T + shift)
        moved = measured.copy()
        if k:
            moved[:, :2] += motion
        pts.append(moved @ cam.T + shift)
        rots.append(rot)
    positions, head = _to_head_frame(
        np.array(pts), measured[:, 2], np.array(st), stable, np.array(rots), 100.0,
        from_pixels=from_pixels,
    )
    assert np.allclose(positions[0], measured[:, :2], atol=1e-6)
    for k in (1, 2):
        assert np.allclose(positions[k] - measured[:, :2], motion, atol=1e-6)
    assert head is not None and head.corrected
    assert head.roll_deg == pytest.approx(6, abs=1e-6)
    assert head.yaw_deg == pytest.approx(10, abs=1e-6)
    assert head.scale_pct == pytest.approx(7, abs=1e-4)
    assert head.residual_d == pytest.approx(0, abs=1e-9)


def test_head_frame_with_no_fittable_frame_reports_no_motion_not_nan() -> None:
    nan = np.full((2, 30, 2), np.nan)
    positions, head = _to_head_frame(
        np.zeros((2, 4, 2)), np.zeros(4), nan, _head(30), np.full((2, 3, 3), np.nan), 100.0,
        from_pixels=True,
    )
    assert head is None and np.isnan(positions).all()


def test_a_frame_the_stable_points_do_not_fit_is_flagged_not_corrected() -> None:
    stable = _head(30, seed=4)
    frames = np.stack([stable[:, :2], stable[:, :2] + np.random.default_rng(5).normal(0, 15, (30, 2))])
    _, head = _to_head_frame(
        frames[:, :4], stable[:4, 2], frames, stable, np.stack([np.eye(3)] * 2), 100.0,
        from_pixels=True, max_residual_d=0.05,
    )
    assert head is not None and head.residual_d > 0.05 and not head.corrected


def test_pixels_correct_a_mesh_that_under_reads_a_head_turn() -> None:
    """FaceMesh reads part of a turn; with textured stable points the parallax fit recovers the rest."""
    stable = _head(30, seed=6)
    measured = _head(6, seed=7)
    true_rot = _rot(10, -8, 3)
    mesh_rot = np.stack([np.eye(3), _rot(4, -3, 3)])  # the mesh saw 40 % of the yaw and pitch
    st = np.stack([stable[:, :2], stable @ true_rot[:2].T])
    pts = np.stack([measured[:, :2], measured @ true_rot[:2].T])
    fixed, _ = _to_head_frame(pts, measured[:, 2], st, stable, mesh_rot, 100.0, from_pixels=True)
    mesh_only, _ = _to_head_frame(pts, measured[:, 2], st, stable, mesh_rot, 100.0, from_pixels=False)
    err_fixed = np.abs(fixed[1] - measured[:, :2]).max()
    err_mesh = np.abs(mesh_only[1] - measured[:, :2]).max()
    assert err_fixed < 0.5  # px, on a 100-px D: first order in the 6° the mesh missed
    assert err_mesh > 4 * err_fixed


def test_stable_corners_stay_inside_the_face_outline_by_the_margin() -> None:
    """Texture beyond the face's outline (hair, background) does not turn with the head: no corner there,
    nor within the margin inside it; without an outline every textured place near a centre counts."""
    rng = np.random.default_rng(3)
    crop = (rng.uniform(0, 255, size=(120, 160)) > 127).astype(np.uint8) * 255  # texture everywhere
    crop = np.kron(crop[:60, :80], np.ones((2, 2), np.uint8))
    centres = np.array([[80.0, 60.0]])
    outline = np.array([[0.0, 0.0], [80.0, 0.0], [80.0, 119.0], [0.0, 119.0]])  # the image's left half
    free = hm.stable_corners(crop, centres, 40.0, max_corners=400)
    kept = hm.stable_corners(crop, centres, 40.0, max_corners=400, outline=outline, margin_px=10.0)
    assert (free[:, 0] > 95).sum() > 10 and (free[:, 0] < 65).sum() > 10
    assert len(kept) > 10
    assert kept[:, 0].max() <= 80 - 10 + 1  # inside the outline by the margin (distance transform: ±1 px)
