"""Mirror map and landmark normalisation (service/engine/normalize.py).

Sides are the patient's: on a non-mirrored frontal picture the patient's left is on the image's right.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from service.engine import normalize as nz

cv2 = pytest.importorskip("cv2")
fmc = pytest.importorskip("mediapipe.python.solutions.face_mesh_connections")

MIDLINE = (0, 1, 4, 10, 13, 14, 17, 152)
PAIRS = ((61, 291), (33, 263), (133, 362), (159, 386), (145, 374), (70, 300), (105, 334), (468, 473))


def _face_image() -> Path:
    candidates = [
        Path(os.environ.get("FACESYM_TEST_FACES", "/nonexistent")) / "single_face.jpg",
        Path(__file__).resolve().parents[1] / "data" / "faces" / "single_face.jpg",
        Path("/work/shared/data/faces/single_face.jpg"),
    ]
    for p in candidates:
        if p.exists():
            return p
    pytest.skip("single_face.jpg not found (set FACESYM_TEST_FACES)")


def _edges(conn) -> set[frozenset[int]]:
    return {frozenset(e) for e in conn}


def _vset(conn) -> set[int]:
    return {v for e in conn for v in e}


# ----------------------------------------------------------------------------- real landmarks


@pytest.fixture(scope="module")
def face_bgr() -> np.ndarray:
    img = cv2.imread(str(_face_image()))
    assert img is not None
    return img


@pytest.fixture(scope="module")
def landmarker():
    mp = pytest.importorskip("mediapipe")
    opts = {"static_image_mode": True, "refine_landmarks": True, "max_num_faces": 1}
    with mp.solutions.face_mesh.FaceMesh(**opts) as fm:
        yield fm


def _landmarks(fm, bgr: np.ndarray) -> np.ndarray:
    """(1, 478, 3) pixel landmarks, as service/engine/landmarks.py produces them."""
    res = fm.process(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    assert res.multi_face_landmarks, "no face found"
    h, w = bgr.shape[:2]
    lm = res.multi_face_landmarks[0].landmark
    return np.array([[[p.x * w, p.y * h, p.z * w] for p in lm]], dtype=np.float32)


@pytest.fixture(scope="module")
def face_points(landmarker, face_bgr) -> np.ndarray:
    return _landmarks(landmarker, face_bgr)


# ----------------------------------------------------------------------------- mirror map


def test_mirror_is_involution_with_fixed_midline_and_known_pairs():
    m = nz.MIRROR
    assert m.shape == (478,)
    assert np.array_equal(m[m], np.arange(478))
    for v in MIDLINE:
        assert m[v] == v
    for a, b in PAIRS:
        assert m[a] == b and m[b] == a
    # Only the mesh's midline is fixed; iris points all have partners.
    assert set(np.flatnonzero(m == np.arange(478))) == set(nz.MIDLINE)


def test_mirror_maps_tessellation_edges_onto_edges_except_three_flipped_quads():
    # MediaPipe's tessellation is not exactly symmetric: three quads have their diagonal drawn the
    # other way on each side. Every other edge must map onto an edge.
    tess = _edges(fmc.FACEMESH_TESSELATION)
    broken = {frozenset(e) for e in tess if frozenset(int(nz.MIRROR[v]) for v in e) not in tess}
    flipped = {frozenset(e) for e in nz.TESSELLATION_ASYMMETRIES}
    quads = ((75, 166), (289, 290), (79, 238), (250, 459), (161, 247), (260, 466))
    assert flipped == {frozenset(e) for e in quads}
    assert broken == flipped
    assert len(tess) == 1322
    for e in flipped:
        a, b = (int(nz.MIRROR[v]) for v in e)
        common = [c for c in range(468) if frozenset((a, c)) in tess and frozenset((b, c)) in tess]
        assert len(common) == 2 and frozenset(common) in tess  # the other diagonal of a quad


def _forced_map(tess: set[frozenset[int]], start: dict[int, int]) -> tuple[dict[int, int], set[int]]:
    """Extend ``start`` (the images of one triangle's vertices) to the map that preserving every
    tessellation edge forces: across each interior edge (u, v) of triangle (u, v, w) lies one other
    triangle (u, v, x), and its image must be the other triangle on (σu, σv). Returns the map and the
    vertices where that is impossible (the image edge is missing, or x is forced to two images)."""
    from collections import deque

    adj: dict[int, set[int]] = {}
    for e in tess:
        a, b = tuple(e)
        adj.setdefault(a, set()).add(b)
        adj.setdefault(b, set()).add(a)
    sigma = dict(start)
    u0, v0, w0 = start
    queue = deque([(u0, v0, w0), (u0, w0, v0), (v0, w0, u0)])
    seen: set[tuple[frozenset[int], int]] = set()
    conflicts: set[int] = set()
    while queue:
        u, v, w = queue.popleft()
        if (frozenset((u, v)), w) in seen:
            continue
        seen.add((frozenset((u, v)), w))
        across = (adj[u] & adj[v]) - {w}
        if len(across) != 1:
            continue  # a border edge (or a non-facial 3-cycle): nothing is forced across it
        (x,) = across
        su, sv = sigma[u], sigma[v]
        image = (adj.get(su, set()) & adj.get(sv, set())) - {sigma[w]}
        if frozenset((su, sv)) not in tess:
            conflicts.update((u, v))
            continue
        if len(image) != 1:
            continue
        (y,) = image
        if sigma.setdefault(x, y) != y:
            conflicts.add(x)
            continue
        queue.extend([(u, x, v), (v, x, u)])
    return sigma, conflicts


def test_no_map_can_send_every_tessellation_edge_onto_an_edge():
    """DESIGN's check "every tessellation edge maps onto an edge" cannot hold for MediaPipe 0.10.21's mesh.

    Proof by the mesh itself: a map that fixes the midline points 1 and 4 and keeps every edge must send
    the two triangles on edge 1–4, (1, 4, 44) and (1, 4, 274), onto themselves or onto each other, and
    from there every other vertex's image is forced, triangle by triangle. Keeping them is the identity
    (which breaks 61↔291); swapping them runs into contradictions, all at the three flipped quads.
    """
    tess = _edges(fmc.FACEMESH_TESSELATION)
    on_1_4 = {v for v in range(468) if frozenset((1, v)) in tess and frozenset((4, v)) in tess}
    assert on_1_4 == {44, 274}
    identity, _ = _forced_map(tess, {1: 1, 4: 4, 44: 44})
    assert identity[61] == 61 and identity[291] == 291  # keeping the triangles cannot pair 61 with 291
    swapped, conflicts = _forced_map(tess, {1: 1, 4: 4, 44: 274})
    assert conflicts, "an edge-preserving mirror exists after all: make the mirror-map check strict"
    quads = {v for e in nz.TESSELLATION_ASYMMETRIES for v in e}
    assert len(quads) == 12
    near = quads | {n for q in quads for e in tess if q in e for n in e}
    assert conflicts <= near | {int(nz.MIRROR[v]) for v in near}
    # Away from the flipped quads the forced map is the committed mirror map.
    agree = [v for v, m in swapped.items() if v not in near and int(nz.MIRROR[v]) not in near]
    assert len(agree) > 400 and all(swapped[v] == nz.MIRROR[v] for v in agree)


@pytest.mark.parametrize("side", ["EYE", "EYEBROW", "IRIS"])
def test_mirror_maps_left_feature_onto_right(side):
    left = _edges(getattr(fmc, f"FACEMESH_LEFT_{side}"))
    right = _edges(getattr(fmc, f"FACEMESH_RIGHT_{side}"))
    assert {frozenset(int(nz.MIRROR[v]) for v in e) for e in left} == right


@pytest.mark.parametrize("name", ["LIPS", "FACE_OVAL", "NOSE"])
def test_mirror_maps_midline_features_onto_themselves(name):
    vs = _vset(getattr(fmc, f"FACEMESH_{name}"))
    assert {int(nz.MIRROR[v]) for v in vs} == vs


def test_index_sets_match_mediapipe_connections():
    assert tuple(sorted(_vset(fmc.FACEMESH_LEFT_EYE))) == nz.LEFT_EYE
    assert tuple(sorted(_vset(fmc.FACEMESH_RIGHT_EYE))) == nz.RIGHT_EYE
    assert tuple(sorted(_vset(fmc.FACEMESH_LEFT_EYEBROW))) == nz.LEFT_BROW
    assert tuple(sorted(_vset(fmc.FACEMESH_RIGHT_EYEBROW))) == nz.RIGHT_BROW
    assert tuple(sorted(_vset(fmc.FACEMESH_LEFT_IRIS))) == nz.LEFT_IRIS
    assert tuple(sorted(_vset(fmc.FACEMESH_RIGHT_IRIS))) == nz.RIGHT_IRIS
    assert tuple(sorted(_vset(fmc.FACEMESH_LIPS))) == nz.LIPS
    assert (nz.LEFT_IRIS_CENTRE, nz.RIGHT_IRIS_CENTRE) == (473, 468)
    # Halves: disjoint, mirror images of each other, and with the midline they cover all 478 points.
    assert set(nz.RIGHT_HALF) == {int(nz.MIRROR[v]) for v in nz.LEFT_HALF}
    assert not set(nz.LEFT_HALF) & set(nz.RIGHT_HALF)
    assert len(nz.LEFT_HALF) + len(nz.RIGHT_HALF) + len(nz.MIDLINE) == 478
    assert set(nz.LEFT_EYE) | set(nz.LEFT_BROW) | set(nz.LEFT_IRIS) | {473} <= set(nz.LEFT_HALF)


@pytest.mark.parametrize(
    ("contour", "conn"),
    [(nz.LEFT_EYE_CONTOUR, fmc.FACEMESH_LEFT_EYE), (nz.RIGHT_EYE_CONTOUR, fmc.FACEMESH_RIGHT_EYE)],
)
def test_eye_contours_walk_the_eye_cycle(contour, conn):
    assert len(contour) == 16 and len(set(contour)) == 16
    edges = _edges(conn)
    assert {frozenset((contour[i], contour[(i + 1) % 16])) for i in range(16)} == edges
    assert tuple(int(nz.MIRROR[v]) for v in nz.LEFT_EYE_CONTOUR) == nz.RIGHT_EYE_CONTOUR


def test_face_oval_walks_the_outline_cycle_and_is_its_own_mirror():
    oval = nz.FACE_OVAL
    assert len(oval) == 36 and len(set(oval)) == 36
    assert {frozenset((oval[i], oval[(i + 1) % 36])) for i in range(36)} == _edges(fmc.FACEMESH_FACE_OVAL)
    assert set(int(nz.MIRROR[v]) for v in oval) == set(oval)


def test_reflection_error_on_a_real_face_is_small(face_points):
    # Reflect the real face across its best-fit 3-D symmetry plane given the pairing: each point must
    # land near its partner. A wrong pair costs a mesh spacing (~0.05-0.1 D) or much more.
    p = face_points[0].astype(np.float64)
    d = p - p[nz.MIRROR]
    n = np.linalg.svd(d, full_matrices=False)[2][0]
    c = np.mean((p + p[nz.MIRROR]) @ n) / 2
    refl = p - 2 * ((p @ n) - c)[:, None] * n
    err = np.linalg.norm(refl - p[nz.MIRROR], axis=1) / nz.interocular_distance(p)
    assert err.mean() < 0.05, err.mean()
    assert err.max() < 0.1, (err.max(), int(err.argmax()))


# ----------------------------------------------------------------------------- normalize


def _synthetic_face(rng: np.random.Generator) -> np.ndarray:
    """A (1, 478, 3) pixel face: a real-ish layout without MediaPipe (upright, frontal, D ~ 80 px).

    Built symmetric (left half = mirror of right half about x = 320) plus a small asymmetric jitter,
    with the patient's left on the image's right and the brows above the eyes.
    """
    pts = np.zeros((478, 3))
    right_half = [int(nz.MIRROR[v]) for v in nz.LEFT_HALF]
    pts[right_half, 0] = 320 - rng.uniform(5, 90, len(right_half))
    pts[right_half, 1] = rng.uniform(150, 400, len(right_half))
    pts[list(nz.MIDLINE), 0] = 320
    pts[list(nz.MIDLINE), 1] = rng.uniform(150, 400, len(nz.MIDLINE))
    # Eyes at y = 240, brows at y = 205 (image y grows downward), nose tip lower.
    for side, sign in ((nz.RIGHT_EYE_CONTOUR, -1), (nz.LEFT_EYE_CONTOUR, 1)):
        ang = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        pts[list(side), 0] = 320 + sign * (40 + 15 * np.cos(ang))
        pts[list(side), 1] = 240 + 6 * np.sin(ang)
    pts[list(nz.RIGHT_BROW), 1] = 205
    pts[list(nz.LEFT_BROW), 1] = 205
    pts[nz.NOSE_TIP, :2] = (320, 300)
    pts[10, :2], pts[152, :2] = (320, 150), (320, 400)  # forehead top, chin
    left = list(nz.LEFT_HALF)
    pts[left, 0] = 640 - pts[nz.MIRROR[left], 0]
    pts[left, 1] = pts[nz.MIRROR[left], 1]
    pts[:, :2] += rng.normal(0, 0.5, (478, 2))
    pts[:, 2] = rng.normal(0, 5, 478)
    return pts[None].astype(np.float32)


def _similarity(points: np.ndarray, angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    a = np.radians(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    out = points.astype(np.float64).copy()
    out[..., :2] = scale * out[..., :2] @ rot.T + np.asarray(shift)
    out[..., 2] *= scale
    return out


def test_normalize_is_invariant_to_translation_scale_and_rotation():
    face = _synthetic_face(np.random.default_rng(0)).astype(np.float64)
    base, _ = nz.normalize(face)
    moves = [(17, 1.7, (40, -25)), (-33, 0.4, (-300, 90)), (0, 1, (0, 0))]
    moved = np.concatenate([_similarity(face, a, s, t) for a, s, t in moves])
    norm, tf = nz.normalize(moved)
    assert norm.shape == (3, 478, 2)
    np.testing.assert_allclose(norm, np.repeat(base, 3, axis=0), atol=1e-5)
    np.testing.assert_allclose(np.degrees(tf.angle) - np.degrees(_fit_angle(face)), [17, -33, 0], atol=1e-6)
    np.testing.assert_allclose(tf.scale / tf.scale[2], [1.7, 0.4, 1.0], rtol=1e-9)


def _fit_angle(face: np.ndarray) -> float:
    return float(nz.normalize(face)[1].angle[0])


def test_normalized_frame_conventions():
    face = _synthetic_face(np.random.default_rng(1))
    norm, tf = nz.normalize(_similarity(face, 12, 1.3, (5, 7)))
    np.testing.assert_allclose(norm[:, nz.NOSE_TIP], 0, atol=1e-12)
    left, right = nz.eye_centres(norm)
    np.testing.assert_allclose(left[:, 1], right[:, 1], atol=1e-12)  # eye line horizontal
    np.testing.assert_allclose(nz.interocular_distance(norm), 1.0, rtol=1e-12)  # unit D
    assert left[0, 0] > 0 > right[0, 0]  # patient's left toward +x
    # y grows upward: brows above eyes, nose tip below the eyes.
    assert norm[0, list(nz.LEFT_BROW), 1].mean() > left[0, 1]
    assert norm[0, list(nz.RIGHT_BROW), 1].mean() > right[0, 1]
    assert left[0, 1] > 0
    assert tf.origin.shape == (1, 2) and tf.scale.shape == (1,) and tf.angle.shape == (1,)


def test_normalize_with_reference_keeps_head_motion():
    face = _synthetic_face(np.random.default_rng(2)).astype(np.float64)
    clip = np.concatenate([face, _similarity(face, 0, 1, (10, 0))])
    rest = nz.normalize(clip[:1])[1]
    norm, tf = nz.normalize(clip, reference=rest)
    assert tf is rest
    shift = norm[1] - norm[0]
    np.testing.assert_allclose(shift, np.broadcast_to(shift[0], shift.shape), atol=1e-12)
    assert shift[0, 0] > 0  # moved toward image right = patient's left
    with pytest.raises(ValueError):
        nz.normalize(np.concatenate([clip, clip[:1]]), reference=nz.normalize(clip)[1])
    with pytest.raises(ValueError):
        nz.normalize(np.zeros((2, 468, 3)))


@pytest.mark.filterwarnings("error")
def test_frames_without_a_face_stay_nan():
    face = _synthetic_face(np.random.default_rng(5)).astype(np.float64)
    clip = np.concatenate([face, np.full_like(face, np.nan), face])
    norm, tf = nz.normalize(clip)
    assert np.isnan(norm[1]).all() and np.isnan(tf.scale[1])
    np.testing.assert_allclose(norm[2], norm[0], atol=0)
    pose = nz.head_pose(clip, 640, 480)
    assert np.isnan(pose[1]).all() and np.isfinite(pose[[0, 2]]).all()
    assert nz.head_pose(np.zeros((0, 478, 3)), 640, 480).shape == (0, 3)


def test_mirror_points_of_a_reflected_face_reproduces_it():
    rng = np.random.default_rng(3)
    norm, _ = nz.normalize(_synthetic_face(rng))
    # A face built as the reflection of an arbitrary face maps exactly onto it.
    reflected = norm[:, nz.MIRROR].copy()
    reflected[..., 0] *= -1
    np.testing.assert_allclose(nz.mirror_points(reflected), norm, atol=1e-12)
    # An exactly symmetric face is its own mirror image; the involution undoes itself.
    sym = (norm + nz.mirror_points(norm)) / 2
    np.testing.assert_allclose(nz.mirror_points(sym), sym, atol=1e-12)
    np.testing.assert_allclose(sym[:, list(nz.MIDLINE), 0], 0, atol=1e-12)
    np.testing.assert_allclose(nz.mirror_points(nz.mirror_points(norm)), norm, atol=0)


def test_shoelace_area():
    square = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], float)
    assert nz.shoelace_area(square) == pytest.approx(1.0)
    assert nz.shoelace_area(square[::-1]) == pytest.approx(1.0)
    batch = np.stack([square * 2, square * 3])[None]  # (1, 2, 4, 2)
    np.testing.assert_allclose(nz.shoelace_area(batch), [[4.0, 9.0]])
    ang = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    ellipse = np.stack([15 * np.cos(ang), 6 * np.sin(ang)], -1)
    # A 16-gon inscribed in an ellipse: (16/2) sin(2 pi/16) a b.
    assert nz.shoelace_area(ellipse) == pytest.approx(8 * np.sin(2 * np.pi / 16) * 90)


def test_eye_areas_are_positive_on_a_real_face(face_points):
    norm, _ = nz.normalize(face_points)
    a_left = nz.shoelace_area(norm[:, list(nz.LEFT_EYE_CONTOUR)])
    a_right = nz.shoelace_area(norm[:, list(nz.RIGHT_EYE_CONTOUR)])
    assert a_left.shape == (1,) and 0.005 < a_left[0] < 0.2 and 0.005 < a_right[0] < 0.2
    left, right = nz.eye_centres(norm)
    assert left[0, 0] > 0 > right[0, 0]
    assert norm[0, list(nz.LEFT_BROW), 1].mean() > left[0, 1]


# ----------------------------------------------------------------------------- head pose


def _rotate(bgr: np.ndarray, deg: float) -> np.ndarray:
    h, w = bgr.shape[:2]
    return cv2.warpAffine(bgr, cv2.getRotationMatrix2D((w / 2, h / 2), deg, 1.0), (w, h))


def test_head_pose_on_real_face(landmarker, face_bgr, face_points):
    h, w = face_bgr.shape[:2]
    yaw, pitch, roll = nz.head_pose(face_points, w, h)[0]
    assert abs(roll) < 3
    # The photo is near-frontal; this man is turned slightly toward his right (his nose is left of
    # the eye midpoint in the picture) and looks slightly down.
    assert abs(yaw) < 15 and abs(pitch) < 15
    # OpenCV's +10 deg turns the picture counter-clockwise: the image-right (patient's left) eye rises.
    r_pos = nz.head_pose(_landmarks(landmarker, _rotate(face_bgr, 10)), w, h)[0]
    r_neg = nz.head_pose(_landmarks(landmarker, _rotate(face_bgr, -10)), w, h)[0]
    assert r_pos[2] < -7 and r_neg[2] > 7
    assert r_pos[2] == pytest.approx(roll - 10, abs=3) and r_neg[2] == pytest.approx(roll + 10, abs=3)
    # In-plane rotation must not leak into yaw/pitch.
    assert r_pos[0] == pytest.approx(yaw, abs=3) and r_neg[0] == pytest.approx(yaw, abs=3)
    flipped = nz.head_pose(_landmarks(landmarker, cv2.flip(face_bgr, 1)), w, h)[0]
    assert np.sign(flipped[0]) == -np.sign(yaw) and abs(yaw) > 2
    assert flipped[0] == pytest.approx(-yaw, abs=3)
    assert flipped[1] == pytest.approx(pitch, abs=3)


def test_head_pose_synthetic_rotations():
    # A symmetric 3-D face turned by known angles about the vertical axis: yaw follows the turn.
    face = _synthetic_face(np.random.default_rng(4)).astype(np.float64)
    left = list(nz.LEFT_HALF)
    face[0, left, 2] = face[0, nz.MIRROR[left], 2]  # symmetric depth too
    face[0, nz.MIDLINE, 2] = -20.0
    face[0, 10, 2] = face[0, 152, 2] = 0.0  # vertical facial plane: pitch 0
    pose0 = nz.head_pose(face, 640, 480)[0]
    np.testing.assert_allclose(pose0[:2], 0, atol=1e-6)
    for deg in (-20, 15):
        a = np.radians(deg)
        # Turning toward the patient's left moves the nose toward image +x: x' = x cos + (-z) sin.
        c = face[0, :, :3] - [320, 0, 0]
        turned = c.copy()
        turned[:, 0] = c[:, 0] * np.cos(a) - c[:, 2] * np.sin(a)
        turned[:, 2] = c[:, 0] * np.sin(a) + c[:, 2] * np.cos(a)
        yaw = nz.head_pose((turned + [320, 0, 0])[None], 640, 480)[0, 0]
        assert yaw == pytest.approx(deg, abs=1e-3)
