"""Phantoms: the TPS warp, per-task motion fields, the clip timeline and truth, half-face freezes.

Sides are the patient's: the patient's left is on the image's right (image +x).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from service.domain import Side, Task
from service.errors import InvalidParameterError, NotAnalysableError, UnreadableInputError
from service.phantom import (
    MAX_EYE_CLOSURE,
    PhantomSpec,
    TaskMotion,
    WarpField,
    brow_raise_field,
    eye_closure_field,
    eye_distance,
    freeze_frames,
    freeze_half,
    freeze_mask,
    lateral_offset,
    load_face,
    render,
    render_photo_pair,
    scale_frames,
    smile_field,
    task_field,
    tps_warp,
    write_phantom,
)
from service.phantom import motion as mfields

FACES = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "faces"  # as tests/conftest.py
FACE_JPG = FACES / "single_face.jpg"
FACE_MP4 = FACES / "single_face.mp4"

needs_faces = pytest.mark.skipif(not FACE_JPG.is_file(), reason="shared test faces not present")


def _blob_centre(img: np.ndarray) -> np.ndarray:
    """Intensity-weighted centroid (x, y) of a dark blob on a white background."""
    w = 255.0 - img.astype(np.float64)
    ys, xs = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
    return np.array([(w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()])


# ------------------------------------------------------------------------------------------- warp
def _dot_image(
    h: int = 160, w: int = 200, centres: tuple[tuple[float, float], ...] = ((100.0, 80.0),)
) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    blob = sum(np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * 1.5**2)) for cx, cy in centres)
    return np.rint(np.clip(255.0 * (1.0 - blob), 0, 255)).astype(np.uint8)


def test_warp_moves_content_at_control_point_and_keeps_far_pixels() -> None:
    # A marker dot on the control point and one far from it (near a corner).
    img = _dot_image(centres=((100.0, 80.0), (20.0, 20.0)))
    pt, disp = np.array([[100.0, 80.0]]), np.array([[5.0, -3.0]])
    # As for faces: zero anchors on a ring, and the field faded out between r = 25 and the ring (r = 40),
    # since a spline pinned on a ring still overshoots beyond it.
    a = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    ring = np.stack([100 + 40 * np.cos(a), 80 + 40 * np.sin(a)], axis=1)
    ys, xs = np.mgrid[0:160, 0:200]
    u = np.clip((np.hypot(xs - 100, ys - 80) - 25) / 15, 0, 1)
    support = (1 - u * u * (3 - 2 * u)).astype(np.float32)
    wf = WarpField.from_controls(pt, disp, img.shape, anchors=ring, support=support)
    out = wf.apply(img, 1.0)
    near = (slice(60, 100), slice(80, 130))
    np.testing.assert_allclose(_blob_centre(out[near]) - _blob_centre(img[near]), [5.0, -3.0], atol=0.3)
    far = (slice(5, 36), slice(5, 36))
    assert np.array_equal(out[far], img[far])
    assert wf.roi[0] > 50 and wf.roi[1] > 30  # the far corner is outside the region that is warped at all
    # The spline is exact at the control point; the border anchors hold the frame edges still.
    np.testing.assert_allclose(wf.field[80, 100], [5.0, -3.0], atol=0.05)
    for edge in (wf.field[0], wf.field[-1], wf.field[:, 0], wf.field[:, -1]):
        assert np.abs(edge).max() < 0.05
    # Without the ring the plain spline spreads to the whole frame but still moves the dot.
    plain = tps_warp(img, pt, disp)
    np.testing.assert_allclose(_blob_centre(plain[near]) - _blob_centre(img[near]), [5.0, -3.0], atol=0.3)


def test_fixed_point_inverse_round_trips() -> None:
    pts = np.array([[60.0, 50.0], [140.0, 90.0], [100.0, 120.0]])
    disp = np.array([[6.0, -4.0], [-5.0, 3.0], [0.0, 0.0]])
    wf = WarpField.from_controls(pts, disp, (160, 200))
    x0, y0, x1, y1 = wf.roi
    px, py = wf.backward_map(1.0)
    d = cv2.remap(wf.field, px, py, cv2.INTER_LINEAR)
    qx, qy = np.meshgrid(np.arange(x0, x1), np.arange(y0, y1))
    err = np.hypot(px + d[..., 0] - qx, py + d[..., 1] - qy)
    assert err.max() < 0.3
    assert wf.min_jacobian() > 0.1


def test_zero_field_is_identity() -> None:
    img = _dot_image()[..., None]
    wf = WarpField.from_controls(np.array([[100.0, 80.0]]), np.zeros((1, 2)), img.shape[:2])
    assert np.array_equal(wf.apply(img, 1.0), img)


# ----------------------------------------------------------------------------------------- motion
@pytest.fixture(scope="module")
def face():
    if not FACE_JPG.is_file():
        pytest.skip("shared test faces not present")
    return load_face(FACE_JPG)


def test_load_face_frames_and_scales(face) -> None:
    assert face.width % 2 == 0 and face.height % 2 == 0
    assert (face.width, face.height) == (640, 480)
    assert face.landmarks.shape == (478, 3)
    assert abs(face.eye_distance - 100.0) < 8.0
    # Patient's left eye (473) on the image's right, left commissure (291) right of the right one (61).
    assert face.landmarks[473, 0] > face.landmarks[468, 0]
    assert face.landmarks[291, 0] > face.landmarks[61, 0]
    # Level: the eye line is horizontal within 2 degrees.
    c = mfields.eye_centres(face.landmarks)
    v = c[Side.LEFT] - c[Side.RIGHT]
    assert abs(np.degrees(np.arctan2(v[1], v[0]))) < 2.0
    # Forehead room above the brows.
    brows = list(mfields._sets()[Side.LEFT].brow)
    face_h = np.ptp(face.landmarks[:, 1])
    assert face.landmarks[brows, 1].min() > 0.5 * face_h


def test_smile_left_moves_291_up_and_out_only(face) -> None:
    lm, d = face.landmarks, face.eye_distance
    f = smile_field(lm, Side.LEFT, 0.25)
    assert f.shape == (478, 2)
    dx, dy = f[291]
    assert dx > 0 and dy < 0  # outward for the patient's left = image +x; up = image -y
    assert np.hypot(dx, dy) == pytest.approx(0.25 * d, rel=1e-9)
    assert dx == pytest.approx(-dy)  # 45 degrees
    assert np.all(f[61] == 0)
    lat = lateral_offset(lm)
    assert np.all(f[lat <= 0.05 * d] == 0)  # midline band and the whole right half are still
    np.testing.assert_allclose(smile_field(lm, "left", 0.5), 2 * f)  # linear in the amplitude
    r = smile_field(lm, Side.RIGHT, 0.25)
    assert r[61, 0] < 0 and r[61, 1] < 0 and np.all(r[291] == 0)


def test_eye_closure_field(face) -> None:
    lm = face.landmarks
    with pytest.raises(ValueError, match="fraction"):
        eye_closure_field(lm, Side.LEFT, 0.6)
    with pytest.raises(ValueError, match="right"):
        TaskMotion(Task.EYE_CLOSURE, 0.2, MAX_EYE_CLOSURE + 0.1)
    f = eye_closure_field(lm, Side.LEFT, 0.4)
    assert np.all(f[:, 0] == 0) and np.all(f[:, 1] >= 0)  # only down
    assert f[386, 1] > 0 and f[374, 1] == 0  # upper lid moves, lower lid stays
    assert np.all(f[473:478, 1] <= f[386, 1] + 1e-9)  # the iris is squeezed, never pushed past the lid
    assert np.all(f[lateral_offset(lm) < 0] == 0)  # the right eye is still
    # The eye contour's area shrinks by about the fraction.
    eye = list(mfields._sets()[Side.LEFT].eye)

    def area(p: np.ndarray) -> float:
        return 0.5 * abs(np.dot(p[:, 0], np.roll(p[:, 1], 1)) - np.dot(p[:, 1], np.roll(p[:, 0], 1)))

    moved = lm[:, :2] + f
    assert 1 - area(moved[eye]) / area(lm[eye, :2]) == pytest.approx(0.4, abs=0.05)


def test_brow_right_moves_right_brow_up_only(face) -> None:
    lm, d = face.landmarks, face.eye_distance
    f = brow_raise_field(lm, Side.RIGHT, 0.15)
    brow = list(mfields._sets()[Side.RIGHT].brow)
    np.testing.assert_allclose(f[brow, 1], -0.15 * d)
    assert np.all(f[:, 0] == 0) and np.all(f[:, 1] <= 0)
    moving = np.nonzero(f[:, 1] < 0)[0]
    assert np.all(lateral_offset(lm)[moving] < -0.05 * d)  # all on the patient's right = image left
    assert np.all(f[list(mfields._sets()[Side.RIGHT].eye)] == 0)
    np.testing.assert_allclose(task_field("brow_raise", lm, "right", 0.15), f)


def test_eye_distance_is_between_contour_centroids(face) -> None:
    c = mfields.eye_centres(face.landmarks)
    assert eye_distance(face.landmarks) == pytest.approx(float(np.linalg.norm(c[Side.LEFT] - c[Side.RIGHT])))


# ----------------------------------------------------------------------------------------- render
def _halves(face) -> tuple[np.ndarray, np.ndarray]:
    """Pixel masks of the image half on the patient's left (image right) and right of the midline."""
    a, b = mfields.midline(face.landmarks)
    ys, xs = np.mgrid[0 : face.height, 0 : face.width]
    off = xs - (a + b * ys)
    return off > 0, off < 0


def test_render_timeline_and_peak_side(face) -> None:
    spec = PhantomSpec((TaskMotion(Task.SMILE, 0.25, 0.0), TaskMotion(Task.BROW_RAISE, 0.0, 0.15)))
    ph = render(face, spec)
    per_task = 2 * 12 + 24 + 18
    assert ph.n_frames == 24 + 2 * per_task
    assert (ph.width % 2, ph.height % 2) == (0, 0)
    frames = list(ph.frames())
    assert len(frames) == ph.n_frames
    assert frames[0].shape == (ph.height, ph.width, 3) and frames[0].dtype == np.uint8
    assert np.array_equal(frames[0], face.rgb)
    left_half, right_half = _halves(face)
    for task, moved, still in ((0, left_half, right_half), (1, right_half, left_half)):
        k = ph.truth["tasks"][task]["peak_frames"][0]
        diff = np.abs(frames[k].astype(int) - face.rgb.astype(int)).sum(axis=2)
        assert diff[moved].mean() > 10 * max(diff[still].mean(), 0.01)
        # Between tasks the clip is back at rest.
        assert np.array_equal(frames[ph.truth["tasks"][task]["frames"][1] + 1], face.rgb)


def test_write_phantom_truth(face, tmp_path: Path) -> None:
    spec = PhantomSpec(
        (TaskMotion(Task.EYE_CLOSURE, 0.45, 0.15),), fps=25.0, rest_s=0.4, hold_s=0.4, tail_s=0.4
    )
    truth = write_phantom(face, spec, tmp_path / "p.mp4")
    on_disk = json.loads((tmp_path / "p.json").read_text())
    assert on_disk == truth
    assert truth["kind"] == "warp" and truth["fps"] == 25.0
    assert (truth["width"], truth["height"]) == (face.width, face.height)
    assert truth["eye_distance_px"] == pytest.approx(face.eye_distance, abs=1e-3)
    (t,) = truth["tasks"]
    assert t["task"] == "eye_closure" and t["unit"] == "fraction"
    assert (t["left"], t["right"]) == (0.45, 0.15)
    assert t["expected_asymmetry_index"] == pytest.approx(abs(0.45 - 0.15) / 0.45)
    assert t["weaker_side"] == "right"
    # 25 fps: rest 10, ramp 10, hold 10, ramp 10, tail 10 frames.
    assert t["rest_frames"] == [0, 9] and t["frames"] == [10, 39] and t["peak_frames"] == [20, 29]
    assert truth["n_frames"] == 50
    with av.open(str(tmp_path / "p.mp4")) as c:
        n = sum(1 for _ in c.decode(video=0))
    assert n == truth["n_frames"]


def test_symmetric_motion_has_no_weaker_side() -> None:
    tm = TaskMotion("smile", 0.2, 0.2)
    assert tm.task is Task.SMILE and tm.weaker_side is None and tm.expected_asymmetry_index == 0.0
    assert TaskMotion(Task.SMILE, 0.0, 0.0).expected_asymmetry_index == 0.0
    with pytest.raises(ValueError, match="left"):
        TaskMotion(Task.SMILE, -0.1, 0.0)


def test_photo_pair(face) -> None:
    rest, peak, truth = render_photo_pair(face, TaskMotion(Task.SMILE, 0.0, 0.2))
    assert np.array_equal(rest, face.rgb)
    left_half, right_half = _halves(face)
    diff = np.abs(peak.astype(int) - rest.astype(int)).sum(axis=2)
    assert diff[right_half].mean() > 10 * max(diff[left_half].mean(), 0.01)
    assert truth["weaker_side"] == "left" and truth["expected_asymmetry_index"] == 1.0


# ------------------------------------------------------------------------------------------ loading
def test_load_face_errors(tmp_path: Path) -> None:
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(UnreadableInputError):
        load_face(bad)
    with pytest.raises(UnreadableInputError):
        load_face(tmp_path / "missing.jpg")
    with pytest.raises(NotAnalysableError) as ei:
        load_face(np.full((240, 320, 3), 128, np.uint8))
    assert ei.value.reasons == ["no face"]


@needs_faces
def test_load_face_upscales_a_small_face() -> None:
    # Like scikit-image's astronaut: a face well under 100 px wide.
    bgr = cv2.imread(str(FACE_JPG))
    small = cv2.resize(bgr, None, fx=0.4, fy=0.4, interpolation=cv2.INTER_AREA)[..., ::-1]
    f = load_face(np.ascontiguousarray(small))
    assert abs(f.eye_distance - 100.0) < 10.0 and f.width % 2 == 0 and f.height % 2 == 0


def _astronaut() -> Path | None:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / "data" / "astronaut.png"
    return p if p.is_file() else None


def test_load_face_astronaut() -> None:
    path = _astronaut()
    if path is None:
        pytest.skip("scikit-image (astronaut.png) not installed")
    f = load_face(path)
    assert abs(f.eye_distance - 100.0) < 10.0


# ------------------------------------------------------------------------------------------- freeze
@pytest.mark.skipif(not FACE_MP4.is_file(), reason="shared test clip not present")
def test_freeze_half(tmp_path: Path) -> None:
    out = tmp_path / "frozen.mp4"
    truth = freeze_half(FACE_MP4, "left", out)
    assert json.loads(out.with_suffix(".json").read_text()) == truth
    assert truth["kind"] == "freeze_half"
    assert truth["frozen_side"] == truth["expected_weaker_side"] == "left"
    assert truth["n_frames"] == 72 and truth["fps"] == pytest.approx(30.0)
    with av.open(str(FACE_MP4)) as c:
        src = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    with av.open(str(out)) as c:
        got = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(got) == 72
    from service.engine.landmarks import detect_image

    lm = detect_image(src[0])
    frozen = freeze_mask(src[0].shape[:2], lm, Side.LEFT) >= 1.0
    other = freeze_mask(src[0].shape[:2], lm, Side.RIGHT) >= 1.0
    assert frozen.sum() > 5000 and not (frozen & other).any()
    # Patient's left = image right of the midline.
    assert np.nonzero(frozen)[1].mean() > np.nonzero(other)[1].mean()
    # Exact before encoding ...
    exact = list(freeze_frames(iter([src[0], src[-1]]), src[0], freeze_mask(src[0].shape[:2], lm, "left")))
    assert np.array_equal(exact[1][frozen], src[0][frozen])

    # ... and within codec noise after it; the live side moves (largest change over the clip).
    def mad(a: np.ndarray, b: np.ndarray, m: np.ndarray) -> float:
        return float(np.abs(a.astype(int) - b.astype(int))[m].mean())

    assert mad(got[-1], got[0], frozen) < 1.5
    live = max(mad(g, got[0], other) for g in got)
    assert live > 5 * max(mad(g, got[0], frozen) for g in got)
    assert mad(got[-1], got[0], other) > 2 * mad(got[-1], got[0], frozen)


def test_scale_frames_keeps_the_asked_fraction_of_a_known_shift() -> None:
    """A textured frame shifted by 6 px: where the mask is 1, amplitude 0.5 leaves a 3-px shift."""
    rng = np.random.default_rng(3)
    base = cv2.GaussianBlur(rng.uniform(0, 255, (120, 160)).astype(np.float32), (0, 0), 2.0)
    ref = np.repeat(cv2.normalize(base, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)[..., None], 3, axis=2)
    shifted = np.roll(ref, 6, axis=1)
    mask = np.zeros((120, 160), np.float32)
    mask[:, :80] = 1.0
    (out,) = scale_frames(iter([shifted]), ref, mask, 0.5)
    half = np.roll(ref, 3, axis=1)
    inner = (slice(20, 100), slice(20, 60))
    assert np.abs(out[inner].astype(int) - half[inner].astype(int)).mean() < 4
    assert np.abs(out[inner].astype(int) - shifted[inner].astype(int)).mean() > 10
    assert np.array_equal(out[:, 100:], shifted[:, 100:])  # mask 0: the frame as it was


def test_a_partial_half_in_the_heads_frame_keeps_the_head_motion_and_part_of_the_expression() -> None:
    """The head shifts everything by 4 px; inside the half the expression adds 6 px more. At amplitude
    0.5 in the head's frame the half keeps the head's 4 px whole and half the expression's: 7 px (the
    image-frame phantom would halve the head's part too: 5 px)."""
    from service.phantom.freeze import _UPPER_FACE, freeze_frames_in_head_frame

    rng = np.random.default_rng(5)
    base = cv2.GaussianBlur(rng.uniform(0, 255, (160, 200)).astype(np.float32), (0, 0), 2.0)
    ref = np.repeat(cv2.normalize(base, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)[..., None], 3, axis=2)
    lm = np.zeros((478, 3))
    ring = np.linspace(0.0, 2.0 * np.pi, len(_UPPER_FACE), endpoint=False)
    lm[list(_UPPER_FACE), 0] = 100 + 70 * np.cos(ring)  # the upper face: the top of the picture
    lm[list(_UPPER_FACE), 1] = 40 + 25 * np.sin(ring)
    frame = np.roll(ref, 4, axis=1)
    frame[90:150, 20:110] = np.roll(ref, 10, axis=1)[90:150, 20:110]
    mask = np.zeros((160, 200), np.float32)
    mask[80:160, 0:120] = 1.0
    (out,) = freeze_frames_in_head_frame(iter([frame]), ref, mask, lm, amplitude=0.5)
    inner = (slice(105, 135), slice(45, 85))

    def mad(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a[inner].astype(int) - b[inner].astype(int)).mean())

    assert mad(out, np.roll(ref, 7, axis=1)) < 4
    assert mad(out, np.roll(ref, 5, axis=1)) > 2 * mad(out, np.roll(ref, 7, axis=1))
    assert mad(out, frame) > 10
    assert np.array_equal(out[:70], frame[:70])  # mask 0: the frame as it was


@pytest.mark.parametrize("amplitude", [-0.1, 1.0, 1.5])
def test_freeze_half_refuses_an_amplitude_outside_0_1(tmp_path: Path, amplitude: float) -> None:
    with pytest.raises(InvalidParameterError, match="amplitude"):
        freeze_half(FACE_MP4, "left", tmp_path / "x.mp4", amplitude=amplitude)



def test_a_turn_moves_the_eyes_and_mouth_interior_with_the_head(face) -> None:
    """The tessellation has holes at the eyes and the mouth; the renderer closes them, so what lies
    inside an opening turns with the head (before, it stayed where the flat 2-D picture put it and a
    still eye's opening shrank at the seam, read as eye closure)."""
    from service.phantom.head import holes, move_head, rotation

    assert sorted(len(h) for h in holes()) == [16, 16, 20]  # two eye rings and the inner lips
    pose = {"roll": 0.0, "yaw": 10.0, "pitch": -10.0, "scale": 1.0, "shift_x": 0.0, "shift_y": 0.0}
    turned = move_head(face.rgb, face.landmarks, pose, face.eye_distance).astype(np.float64)
    mesh = face.landmarks[:468].astype(np.float64)
    c3 = mesh.mean(axis=0)
    rot = rotation(10.0, -10.0, 0.0)
    r = max(2, int(round(0.02 * face.eye_distance)))
    moves = []
    for ring in [h for h in holes() if len(h) == 16]:  # the eye openings (this photo's mouth is closed)
        centre = mesh[list(ring)].mean(axis=0)
        moved = (centre - c3) @ rot.T + c3
        x0, y0 = np.round(centre[:2]).astype(int)
        x1, y1 = np.round(moved[:2]).astype(int)
        src = face.rgb[y0 - r : y0 + r + 1, x0 - r : x0 + r + 1].astype(np.float64)
        dst = turned[y1 - r : y1 + r + 1, x1 - r : x1 + r + 1]
        flat = turned[y0 - r : y0 + r + 1, x0 - r : x0 + r + 1]  # where the flat picture would leave it
        assert np.abs(dst - src).mean() < 12.0  # the opening's content is where the turn takes it
        gain = np.abs(flat - src).mean() - np.abs(dst - src).mean()
        moves.append((float(np.abs(moved[:2] - centre[:2]).max()), float(gain)))
    far = max(moves)  # the eye that the turn moves most (the other lies near the rotation's centre)
    assert far[0] > 3.0 and far[1] > 0
