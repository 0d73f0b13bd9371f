"""Regional optical-flow symmetry (service.engine.flow) on synthetic crops: textured noise with a known
patch moving, and a hand-made symmetric landmark layout. No MediaPipe, no video."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import pytest

from service.engine import flow as fl
from service.engine import normalize as nz
from service.errors import InvalidParameterError

# The landmarks the flow module needs, from the bundled demo face made exactly symmetric: the patient's
# left points (x toward the patient's left, y up, unit D = inter-eye distance) and the midline heights.
LEFT = {
    249: (0.666, 0.632), 251: (1.042, 1.031), 261: (0.796, 0.542), 263: (0.701, 0.648),
    267: (0.157, -0.236), 279: (0.343, 0.137), 284: (0.946, 1.220), 285: (0.203, 0.880),
    293: (0.815, 0.982), 294: (0.352, 0.042), 296: (0.462, 1.039), 297: (0.554, 1.473),
    300: (0.911, 0.888), 301: (0.976, 0.960), 313: (0.162, -0.768), 314: (0.159, -0.658),
    332: (0.791, 1.372), 334: (0.662, 1.038), 336: (0.234, 1.018), 337: (0.261, 1.279),
    338: (0.300, 1.520), 343: (0.220, 0.454), 356: (1.104, 0.584), 357: (0.215, 0.513),
    362: (0.277, 0.612), 364: (0.785, -0.641), 366: (1.091, 0.139), 367: (0.918, -0.505),
    369: (0.381, -1.034), 372: (0.979, 0.581), 373: (0.577, 0.613), 374: (0.501, 0.605),
    380: (0.424, 0.605), 381: (0.351, 0.608), 382: (0.303, 0.608), 383: (0.950, 0.750),
    384: (0.366, 0.672), 385: (0.446, 0.696), 386: (0.524, 0.703), 387: (0.601, 0.693),
    388: (0.650, 0.675), 389: (1.089, 0.832), 390: (0.629, 0.623), 393: (0.162, -0.143),
    394: (0.641, -0.788), 395: (0.512, -0.910), 396: (0.208, -1.116), 398: (0.306, 0.636),
    401: (1.068, -0.097), 413: (0.207, 0.699), 421: (0.183, -0.882), 429: (0.304, 0.215),
    435: (1.016, -0.315), 437: (0.223, 0.355), 446: (0.816, 0.623), 447: (1.095, 0.360),
    448: (0.743, 0.506), 449: (0.645, 0.483), 450: (0.518, 0.478), 451: (0.398, 0.492),
    452: (0.304, 0.516), 453: (0.240, 0.545), 454: (1.095, 0.347), 464: (0.191, 0.598),
    466: (0.679, 0.660),
}
MID_Y = {
    1: -0.000, 4: 0.113, 5: 0.260, 6: 0.611, 8: 0.854, 9: 0.993, 10: 1.529, 151: 1.275,
    168: 0.735, 195: 0.380, 197: 0.491,
}

D = 64.0  # crop pixels per inter-eye distance, as CropStore makes them
SIZE = (256, 294)  # CropStore's default window (width, height)
CENTRE = np.array([127.5, 140.0])  # the nose tip: cv2.flip mirrors the crop exactly about it
N_FRAMES = 12


def face_landmarks() -> np.ndarray:
    """(478, 2) crop pixels of a frontal, exactly symmetric face (NaN for landmarks the module ignores)."""
    norm = np.full((nz.N_LANDMARKS, 2), np.nan)
    for i, (x, y) in LEFT.items():
        norm[i] = (x, y)
        norm[nz.MIRROR[i]] = (-x, y)
    for i, y in MID_Y.items():
        norm[i] = (0.0, y)
    # Normalised frame: x toward the patient's left = image right; y up = image up.
    return CENTRE + D * norm * np.array([1.0, -1.0])


def texture(seed: int = 0, size: tuple[int, int] = SIZE) -> np.ndarray:
    """Smooth random texture that optical flow can track, uint8 (H, W)."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(size[1], size[0])).astype(np.float32)
    img = cv2.GaussianBlur(noise, (0, 0), 1.5)
    img = (img - img.min()) / (img.max() - img.min())
    return np.round(40 + 175 * img).astype(np.uint8)


def region_centre(side: str, region: str, lm: np.ndarray) -> np.ndarray:
    """A point well inside the polygon of ``region`` on the patient's ``side`` (crop pixels)."""
    poly = lm[list(fl.region_polygons(side)[region])]
    mask = np.zeros((SIZE[1], SIZE[0]), np.uint8)
    cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], (1,))
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([float(x), float(y)])


def moving_patches(
    centres: list[np.ndarray], steps: list[tuple[float, float]], half: int = 9, n: int = N_FRAMES
) -> list[np.ndarray]:
    """Frames of a still texture in which the square patch around each centre shows a second texture
    that moves ``step`` (dx, dy) pixels a frame."""
    base, moving = texture(0), texture(1)
    frames = []
    for t in range(n):
        frame = base.copy()
        for c, (dx, dy) in zip(centres, steps, strict=True):
            m = np.array([[1, 0, dx * t], [0, 1, dy * t]], np.float32)
            shifted = cv2.warpAffine(moving, m, SIZE, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            x0, y0 = int(c[0]) - half, int(c[1]) - half
            frame[y0 : y0 + 2 * half, x0 : x0 + 2 * half] = shifted[y0 : y0 + 2 * half, x0 : x0 + 2 * half]
        frames.append(frame)
    return frames


def scores(
    frames: Sequence[np.ndarray | None], lm: np.ndarray, **kw: object
) -> dict[str, fl.RegionSymmetry]:
    res = fl.regional_symmetry(frames, lm, 0, len(frames) - 1, **kw)  # type: ignore[arg-type]
    assert [r.region for r in res] == list(fl.REGIONS)
    return {r.region: r for r in res}


def still_landmarks(n: int = N_FRAMES) -> np.ndarray:
    return np.repeat(face_landmarks()[None], n, axis=0)


# ------------------------------------------------------------------------------------------ regions
def test_right_polygons_are_the_mirror_of_the_left() -> None:
    left, right = fl.region_polygons("left"), fl.region_polygons("right")
    assert set(left) == set(right) == set(fl.REGIONS)
    for region in fl.REGIONS:
        assert right[region] == tuple(int(nz.MIRROR[i]) for i in left[region])
        assert not set(left[region]) & set(right[region]), "a polygon crosses the midline"
    # MediaPipe's LEFT_* sets are the patient's left: the left eye region holds the left eye contour.
    assert set(nz.LEFT_EYE_CONTOUR) & set(left["eye"]) == set()  # the contour lies INSIDE the polygon
    lm = face_landmarks()
    for side, contour in (("left", nz.LEFT_EYE_CONTOUR), ("right", nz.RIGHT_EYE_CONTOUR)):
        poly = lm[list(fl.region_polygons(side)["eye"])].astype(np.float32)
        centre = lm[list(contour)].mean(axis=0)
        assert cv2.pointPolygonTest(poly, (float(centre[0]), float(centre[1])), False) > 0


def test_region_areas_match_on_a_symmetric_face() -> None:
    lm = face_landmarks()
    for region in fl.REGIONS:
        areas = [
            float(nz.shoelace_area(lm[list(fl.region_polygons(s)[region])])) for s in ("left", "right")
        ]
        assert areas[0] == pytest.approx(areas[1], rel=1e-6)
        assert areas[0] > 0.05 * D * D


# ------------------------------------------------------------------------------------ flow scores
def test_a_still_face_is_symmetric() -> None:
    frames = [texture(0)] * N_FRAMES
    res = scores(list(frames), still_landmarks())
    for r in res.values():
        assert r.left == r.right == 0.0
        assert r.symmetry_score == 1.0


def test_motion_in_the_left_cheek_only_lowers_the_cheek_score() -> None:
    lm = face_landmarks()
    c = region_centre("left", "cheek", lm)
    res = scores(moving_patches([c], [(2.0, 0.0)]), still_landmarks())
    cheek = res["cheek"]
    assert cheek.left > 0.05
    assert cheek.left > 10 * cheek.right
    assert cheek.symmetry_score < 0.9
    assert res["forehead"].symmetry_score >= 0.98
    assert res["eye"].symmetry_score >= 0.98


def test_motion_on_the_image_right_is_the_patients_left() -> None:
    lm = face_landmarks()
    c = region_centre("left", "cheek", lm)
    assert c[0] > CENTRE[0], "the patient's left cheek is on the image's right"
    res = scores(moving_patches([c], [(0.0, -2.0)]), still_landmarks())
    assert res["cheek"].left > res["cheek"].right
    # The same patch mirrored to the image's left moves the patient's right.
    mirrored = np.array([2 * CENTRE[0] - c[0], c[1]])
    res = scores(moving_patches([mirrored], [(0.0, -2.0)]), still_landmarks())
    assert res["cheek"].right > res["cheek"].left


def test_identical_motion_on_both_sides_is_symmetric() -> None:
    """The image's right half (patient's left: a patch moving in the cheek) mirrored onto its left half."""
    lm = face_landmarks()
    one_sided = moving_patches([region_centre("left", "cheek", lm)], [(2.0, -1.0)])
    half = SIZE[0] // 2
    frames = []
    for f in one_sided:
        sym = f.copy()
        sym[:, :half] = cv2.flip(f, 1)[:, :half]
        frames.append(sym)
    res = scores(frames, still_landmarks())
    cheek = res["cheek"]
    assert cheek.left > 0.05 and cheek.right > 0.05
    assert cheek.symmetry_score >= 0.95
    assert res["forehead"].symmetry_score >= 0.98
    assert res["eye"].symmetry_score >= 0.98


def test_motion_in_the_right_forehead_lowers_only_the_forehead_score() -> None:
    lm = face_landmarks()
    c = region_centre("right", "forehead", lm)
    res = scores(moving_patches([c], [(0.0, -2.0)], half=7), still_landmarks())
    assert res["forehead"].right > res["forehead"].left
    assert res["forehead"].symmetry_score < 0.95
    assert res["cheek"].symmetry_score >= 0.98


@pytest.mark.parametrize(
    "motion",
    [
        pytest.param((3.0, -2.0, 0.0, 1.0), id="translation"),
        pytest.param((0.0, 0.0, 1.5, 1.0), id="rotation"),
        pytest.param((1.5, 1.0, -1.0, 1.01), id="translation+rotation+scale"),
    ],
)
def test_head_motion_alone_leaves_the_face_symmetric(motion: tuple[float, float, float, float]) -> None:
    """The whole crop moves rigidly (head motion), landmarks with it: every SS stays >= 0.9."""
    dx, dy, deg, scale = motion
    base, lm0 = texture(0), face_landmarks()
    frames, lms = [], []
    for t in range(N_FRAMES):
        centre = (float(CENTRE[0]), float(CENTRE[1]))
        m = np.asarray(cv2.getRotationMatrix2D(centre, deg * t, scale**t), float)
        m[:, 2] += (dx * t, dy * t)
        frames.append(cv2.warpAffine(base, m, SIZE, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT))
        lms.append(lm0 @ m[:, :2].T + m[:, 2])
    res = scores(frames, np.stack(lms))
    for r in res.values():
        assert r.symmetry_score >= 0.9, r


def test_motion_with_head_motion_is_still_found_on_its_side() -> None:
    base_frames = moving_patches([region_centre("left", "cheek", face_landmarks())], [(2.0, 0.0)])
    lm0 = face_landmarks()
    frames, lms = [], []
    for t, f in enumerate(base_frames):
        m = np.asarray(cv2.getRotationMatrix2D((float(CENTRE[0]), float(CENTRE[1])), 0.8 * t, 1.0), float)
        m[:, 2] += (1.0 * t, -0.5 * t)
        frames.append(cv2.warpAffine(f, m, SIZE, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT))
        lms.append(lm0 @ m[:, :2].T + m[:, 2])
    res = scores(frames, np.stack(lms))
    assert res["cheek"].left > 5 * res["cheek"].right
    assert res["cheek"].symmetry_score < 0.9


def test_farneback_agrees_on_the_side() -> None:
    c = region_centre("left", "cheek", face_landmarks())
    frames = moving_patches([c], [(2.0, 0.0)])
    res = scores(frames, still_landmarks(), params=fl.FlowParams(algorithm="farneback"))
    assert res["cheek"].left > 5 * res["cheek"].right
    assert res["cheek"].symmetry_score < 0.95


def test_units_scale_with_fps_and_not_with_the_crop_scale() -> None:
    c = region_centre("left", "cheek", face_landmarks())
    frames = moving_patches([c], [(2.0, 0.0)])
    base = scores(frames, still_landmarks())["cheek"].left
    assert scores(frames, still_landmarks(), fps=60.0)["cheek"].left == pytest.approx(2 * base)
    # Resampling to D = 96 px instead of 64 measures the same motion in the same unit (D/100 per frame).
    big = scores(frames, still_landmarks(), params=fl.FlowParams(eye_distance_px=96.0))["cheek"].left
    assert big == pytest.approx(base, rel=0.35)


def test_k_zero_keeps_every_pixel_and_lam_scales_the_score() -> None:
    c = region_centre("left", "cheek", face_landmarks())
    frames = moving_patches([c], [(2.0, 0.0)])
    strict = scores(frames, still_landmarks())["cheek"]
    loose = scores(frames, still_landmarks(), params=fl.FlowParams(k=0.0))["cheek"]
    assert loose.left >= strict.left
    none = scores(frames, still_landmarks(), params=fl.FlowParams(lam=0.0))["cheek"]
    assert none.symmetry_score == 1.0


def test_frames_without_a_face_are_skipped() -> None:
    c = region_centre("left", "cheek", face_landmarks())
    frames: list[np.ndarray | None] = list(moving_patches([c], [(2.0, 0.0)]))
    lm = still_landmarks()
    frames[5] = None
    lm[6] = np.nan
    res = scores(frames, lm)
    assert res["cheek"].left > res["cheek"].right
    # Only one frame with a face: nothing to measure.
    with pytest.raises(ValueError, match="no two consecutive frames"):
        fl.regional_symmetry([frames[0], None, None], lm[:3], 0, 2)


def test_reference_is_the_first_frame_with_a_face() -> None:
    c = region_centre("left", "cheek", face_landmarks())
    frames: list[np.ndarray | None] = list(moving_patches([c], [(2.0, 0.0)]))
    frames[0] = None
    assert scores(frames, still_landmarks())["cheek"].left > 0.05


@pytest.mark.parametrize(("start", "end"), [(3, 3), (5, 2), (-1, 4), (0, N_FRAMES)])
def test_bad_ranges_are_refused(start: int, end: int) -> None:
    with pytest.raises(ValueError, match="start"):
        fl.regional_symmetry([texture(0)] * N_FRAMES, still_landmarks(), start, end)


def test_bad_landmark_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="landmarks_crop"):
        fl.regional_symmetry([texture(0)] * 3, np.zeros((3, 468, 2)), 0, 2)


def test_no_face_at_all_is_refused() -> None:
    with pytest.raises(ValueError, match="no frame with a face"):
        fl.regional_symmetry([None] * 3, np.full((3, 478, 2), np.nan), 0, 2)


# ------------------------------------------------------------------------------------- parameters
def test_defaults_are_the_papers() -> None:
    p = fl.FlowParams()
    assert (p.k, p.lam, p.eye_distance_px, p.algorithm) == (6.0, 3.8, 64.0, "dis")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"k": -1.0}, "k"),
        ({"k": float("nan")}, "k"),
        ({"k": "6"}, "k"),
        ({"lam": float("inf")}, "lam"),
        ({"lam": -0.5}, "lam"),
        ({"eye_distance_px": 0.0}, "eye_distance_px"),
        ({"eye_distance_px": 4096.0}, "eye_distance_px"),
        ({"eye_distance_px": True}, "eye_distance_px"),
        ({"algorithm": "lucas-kanade"}, "algorithm"),
    ],
)
def test_params_are_validated_with_the_field_named(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidParameterError, match=field):
        fl.FlowParams(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):  # InvalidParameterError is a ValueError too
        fl.FlowParams(**kwargs)  # type: ignore[arg-type]


def test_fps_is_validated() -> None:
    with pytest.raises(InvalidParameterError, match="fps"):
        fl.regional_symmetry([texture(0)] * 3, still_landmarks(3), 0, 2, fps=0.0)


def test_side_name_is_validated() -> None:
    with pytest.raises(InvalidParameterError, match="side"):
        fl.region_polygons("centre")
