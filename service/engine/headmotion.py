"""Head-motion compensation: the head's rigid motion, estimated robustly and removed before measuring.

Patients move their heads while they smile, strain to close an eye or raise their brows. A displacement
measured in the image is expression plus head motion; this module removes the second part so that what
is measured is the face's movement in the HEAD's own frame at rest:

* **The rotation** starts from a robust 3-D similarity (Umeyama, with iteratively reweighted Tukey
  weights) of FaceMesh's 3-D landmarks on expression-stable points, from the rest pose to each frame:
  FaceMesh's mesh sees out-of-plane turns that 2-D points alone see poorly (a free weak-perspective fit
  to tracked pixels was measured unstable: 7–15° of spurious pitch on compact point sets).
* **Roll, scale, shift and what the mesh missed of yaw and pitch** are then fitted on the same stable
  points as TRACKED IN THE PIXELS (Lucas–Kanade), with Tukey-reweighted least squares, after the mesh's
  yaw and pitch have been applied to their rest positions: a 2-D similarity plus the linear parallax
  that a residual turn gives points at different depths. Pixels, not landmarks, because FaceMesh's
  shape prior drags the mesh with the expression (measured on warped phantoms: about 1° of spurious roll
  and 2° of pitch at a smile's peak), reads only part of a head turn (20–50 % of a rendered 10° yaw),
  and a palsied half, moving rigidly with the head, must read as still. The tracked points are
  Shi–Tomasi corners near the stable landmarks (:func:`stable_corners`): on smooth skin (a forehead) a
  point seeded on the landmark itself sticks and under-reads roll (measured gain 0.89 on a real clip,
  which moves the mouth corners sideways by the error times a lever of about 1.2 D), and only inside
  the face's outline (hair slides and a background stays put when the head turns). With fewer than
  :data:`MIN_CORNERS` corners the mesh's rotation is kept whole and only scale and shift are fitted.
* The measured points are tracked in crops resampled into the rest pose (:func:`stabilize`), then a
  point's head-frame position solves ``M_t[:, :2] h = p − c_t − M_t[:, 2] z`` (``M_t`` the
  fitted 2×3 weak-perspective camera, ``z`` the point's FaceMesh depth at rest): the movement is taken
  to lie in the head's frontal plane, which holds for the commissure, lids and brows to first order.

Which points are stable depends on the task (a smile lifts the cheeks, a brow raise the forehead): each
task has its own set, chosen from anatomy, not from clips; outlier rejection handles the rest.

Coordinates are image pixels (or crop pixels): x right, y DOWN, z MediaPipe depth in the same pixels
(away from the camera). That frame is right-handed, so rotations are proper (det +1).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from service.domain import HeadMotion, Task

#: Nasal dorsum from the nasion to the tip: moved by none of the three tasks.
_NOSE = (168, 6, 197, 195, 5, 4)
#: Upper forehead (hairline side), glabella and temples: still during a smile and an eye closure.
_FOREHEAD = (10, 109, 338, 67, 297, 151, 9, 108, 337)
_TEMPLES = (21, 251, 54, 284, 103, 332)
#: Inner canthi: fixed to the nasal bones by the medial canthal tendons.
_CANTHI = (133, 362, 243, 463)
#: Nose wings, upper lip below the nose, chin: still during a brow raise and an eye closure.
_LOWER = (64, 294, 98, 327, 2, 164, 152, 175, 199)
#: Cheekbones below the lateral orbit: still during a brow raise.
_CHEEKBONES = (116, 345, 123, 352, 50, 280)

#: Expression-stable landmarks per task (pixel-tracked, then outlier-rejected).
STABLE_BY_TASK: dict[Task, tuple[int, ...]] = {
    Task.SMILE: _NOSE + _FOREHEAD + _TEMPLES + _CANTHI,
    Task.EYE_CLOSURE: _NOSE + _FOREHEAD[:5] + _LOWER,
    Task.BROW_RAISE: _NOSE + _CANTHI + _LOWER + _CHEEKBONES,
}
#: For landmark-only work (segmentation, the grader): points that none of the tasks moves much.
STABLE_ALL: tuple[int, ...] = tuple(sorted(set(_NOSE + _CANTHI + _TEMPLES + _LOWER[:4] + _FOREHEAD[:5])))


# ------------------------------------------------------------------------------------------ 3-D fits
def robust_similarity_3d(
    src: np.ndarray, dst: np.ndarray, iterations: int = 4
) -> tuple[float, np.ndarray, np.ndarray]:
    """Robust 3-D similarity ``dst ≈ s R src + t`` of one frame (:func:`robust_similarities_3d`):
    points (N, 3) → (s, R (3, 3) proper, t (3,)). NaN rows are ignored; needs ≥ 4 finite points."""
    s, rot, t = robust_similarities_3d(src, np.asarray(dst, dtype=np.float64)[None], iterations)
    if not np.isfinite(s[0]):
        raise ValueError("fewer than 4 stable points")
    return float(s[0]), rot[0], t[0]


def euler_deg(rot: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees of a rotation in image axes (x right, y down, z away):
    R = Rz(roll) · Ry(yaw) · Rx(pitch). Signs are conventions of this decomposition; the quality figures
    use their magnitudes."""
    yaw = float(np.degrees(np.arcsin(np.clip(-rot[2, 0], -1.0, 1.0))))
    pitch = float(np.degrees(np.arctan2(rot[2, 1], rot[2, 2])))
    roll = float(np.degrees(np.arctan2(rot[1, 0], rot[0, 0])))
    return yaw, pitch, roll


def out_of_plane(rot: np.ndarray) -> np.ndarray:
    """The yaw and pitch part ``Ry(yaw) · Rx(pitch)`` of a rotation (:func:`euler_deg`), roll removed."""
    yaw, pitch, _ = np.radians(euler_deg(rot))
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cp, -sp], [0.0, sp, cp]])
    return np.asarray(ry @ rx)


def robust_similarities_3d(
    src: np.ndarray, dst: np.ndarray, iterations: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted Umeyama fits ``dst[t] ≈ s R src + t`` for many frames at once, reweighted with Tukey's
    biweight (scale 4.685 × 1.4826 × median residual) so that points an expression moves lose their say:
    ``src`` (K, 3), ``dst`` (T, K, 3) → (s (T,), R (T, 3, 3) proper, t (T, 3)); NaN for frames with fewer
    than 4 finite points. Batched (one SVD call for all frames per iteration): a per-frame loop cost more
    than the rest of the analysis."""
    n_t = len(dst)
    finite = np.isfinite(dst).all(axis=2) & np.isfinite(src).all(axis=1)[None]
    dst0, src0 = np.where(finite[..., None], dst, 0.0), np.nan_to_num(src)
    good = finite.sum(axis=1) >= 4
    w = finite.astype(np.float64)
    for it in range(iterations + 1):
        wn = w / np.maximum(w.sum(axis=1), 1e-12)[:, None]
        mu_s, mu_d = wn @ src0, np.einsum("tk,tkj->tj", wn, dst0)
        a, b = src0[None] - mu_s[:, None], dst0 - mu_d[:, None]
        u, sig, vt = np.linalg.svd(np.einsum("tki,tkj->tij", b * wn[..., None], a))
        fix = np.ones((n_t, 3))
        fix[:, 2] = np.where(np.linalg.det(u @ vt) < 0, -1.0, 1.0)
        rot = np.einsum("tij,tj,tjk->tik", u, fix, vt)
        var = np.einsum("tk,tk->t", wn, np.sum(a * a, axis=2))
        s = np.sum(sig * fix, axis=1) / np.maximum(var, 1e-12)
        t = mu_d - s[:, None] * np.einsum("tij,tj->ti", rot, mu_s)
        if it == iterations:
            break
        fitted = s[:, None, None] * np.einsum("kj,tij->tki", src0, rot) + t[:, None]
        res = np.where(finite, np.linalg.norm(dst0 - fitted, axis=2), np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: frames without a face
            med = np.nanmedian(res, axis=1)
        c = 4.685 * 1.4826 * np.maximum(np.nan_to_num(med, nan=1.0), 1e-6)
        new_w = np.nan_to_num(np.clip(1.0 - (res / c[:, None]) ** 2, 0.0, None) ** 2)
        keep = (new_w > 0).sum(axis=1) >= 4  # else the frame keeps its weights, as the one-frame fit
        w[keep] = new_w[keep]
    s[~good], rot[~good], t[~good] = np.nan, np.nan, np.nan
    return s, rot, t


def rest_rotations(landmarks: np.ndarray, rest: np.ndarray, stable: tuple[int, ...]) -> np.ndarray:
    """Per frame, the head's rotation from ``rest`` (478, 3) to ``landmarks`` (T, 478, 3), fitted on the
    ``stable`` points: (T, 3, 3); NaN for frames without a face."""
    idx = list(stable)
    return robust_similarities_3d(rest[idx], np.asarray(landmarks, dtype=np.float64)[:, idx])[1]


def frontalize(landmarks: np.ndarray, rest: np.ndarray, stable: tuple[int, ...] = STABLE_ALL) -> np.ndarray:
    """Landmarks (T, 478, 3) mapped into the head frame of ``rest`` (478, 3): each frame's robust 3-D
    similarity to rest (on ``stable``) is undone, so only non-rigid (expression) motion remains.
    Frames without a face stay NaN."""
    idx = list(stable)
    lm = np.asarray(landmarks, dtype=np.float64)
    s, rot, t = robust_similarities_3d(rest[idx], lm[:, idx])
    # R^T (x − t) / s, row-wise per frame.
    return np.einsum("tkj,tji->tki", lm - t[:, None], rot) / s[:, None, None]


# ---------------------------------------------------------------------------------------- pixels
def _tukey(res: np.ndarray, floor: float = 1e-3) -> np.ndarray:
    """Tukey biweights of residuals ``res`` (K,), scale 4.685 × 1.4826 × their median (at least ``floor``).
    The median by partition: np.median's overhead dominated these small per-frame fits."""
    k = len(res) // 2
    if len(res) % 2:
        med = float(np.partition(res, k)[k])
    else:
        med = float(np.partition(res, [k - 1, k])[k - 1 : k + 1].mean())
    c = 4.685 * 1.4826 * max(med, floor)
    return np.asarray(np.clip(1.0 - (res / c) ** 2, 0.0, None) ** 2)


def _scale_shift(
    src: np.ndarray, dst: np.ndarray, iterations: int = 5
) -> tuple[np.ndarray, np.ndarray] | None:
    """Tukey-IRLS fit ``dst ≈ s · src + c`` on (K, 2) points: the 2×3 matrix and the inlier mask
    (weight > 0), or None with < 3 inliers."""
    w = np.ones(len(src))
    for _ in range(iterations + 1):
        if (w > 0).sum() < 3:
            return None
        wn = w / w.sum()
        ms, md = wn @ src, wn @ dst
        a, b = src - ms, dst - md
        s = float(np.sum(wn[:, None] * a * b)) / max(float(np.sum(wn[:, None] * a * a)), 1e-12)
        c = md - s * ms
        w = _tukey(np.linalg.norm(dst - (s * src + c), axis=1))
    return np.array([[s, 0.0, c[0]], [0.0, s, c[1]]]), w > 0


def _similarity_with_parallax(
    src: np.ndarray, dst: np.ndarray, iterations: int = 5
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Tukey-IRLS fit of ``dst (K, 2) ≈ cam · src (K, 3) + c`` with ``cam = [[a, −b, g], [b, a, h]]``: a
    2-D similarity (roll, scale) of x, y plus the parallax ``(g, h) · z`` that a small residual yaw and
    pitch give points at different depths (linearised: first order in the residual angles). Returns
    (cam, c, inlier mask), or None with < 5 inliers."""
    n = len(src)
    x, y, z = src[:, 0], src[:, 1], src[:, 2]
    zero, one = np.zeros(n), np.ones(n)
    design = np.vstack([
        np.column_stack([x, -y, z, zero, one, zero]),
        np.column_stack([y, x, zero, z, zero, one]),
    ])
    rhs = np.concatenate([dst[:, 0], dst[:, 1]])
    w = np.ones(n)
    for _ in range(iterations + 1):
        if (w > 0).sum() < 5:
            return None
        ww = np.concatenate([w, w])
        weighted = design.T * ww  # normal equations: 6×6, far cheaper than lstsq per frame
        try:
            a, b, g, h, cx, cy = np.linalg.solve(weighted @ design, weighted @ rhs)
        except np.linalg.LinAlgError:
            return None
        cam, c = np.array([[a, -b, g], [b, a, h]]), np.array([cx, cy])
        w = _tukey(np.linalg.norm(dst - (src @ cam.T + c), axis=1))
    return cam, c, w > 0


#: How many tracked stable corners the pixel fit needs; with fewer (a face without texture where the
#: stable points are) the mesh's rotation is kept whole and the pixels give only scale and shift.
MIN_CORNERS = 8
#: Corners are looked for within this radius (D) of each stable landmark: near enough to share its
#: stillness, wide enough to find texture (an inner canthus, a nostril rim, brows' and skin's grain).
CORNER_RADIUS_D = 0.2
#: Shi–Tomasi quality level (a fraction of the strongest corner's response in the mask). Inside the
#: face's outline the strongest corners are an eye's canthi, and at OpenCV's customary 0.01 the skin's
#: fainter texture was cut: 20–35 corners were left on the real clips, the forehead and temples all but
#: lost. At 0.001 the mask yields the 80 asked for, spread over all the stable landmarks; the robust fit
#: rejects any that track badly.
CORNER_QUALITY = 0.001


def stable_corners(
    crop: np.ndarray,
    centres: np.ndarray,
    radius_px: float,
    max_corners: int = 80,
    *,
    outline: np.ndarray | None = None,
    margin_px: float = 0.0,
) -> np.ndarray:
    """Shi–Tomasi corners (K, 2) of a grey ``crop`` within ``radius_px`` of the (N, 2) ``centres`` and,
    with ``outline`` (M, 2) the face's outline polygon (:data:`service.engine.normalize.FACE_OVAL`, crop
    pixels), at least ``margin_px`` inside it.

    Why corners and not the stable landmarks themselves: the skin under a landmark is often smooth (a
    forehead: measured Shi–Tomasi eigenvalue ≈ 0 on a real clip), where a Lucas–Kanade point sticks to
    the crop instead of following the skin and under-reads roll; a corner beside it tracks.
    Why inside the outline: several stable landmarks (forehead top, temples) lie ON it, and the texture
    just beyond is hair, which slides, or background, which stays where it is when the head turns: a
    hairline corner there tracked little of a rendered 18° yaw and pulled the fit to the mesh's 7°
    (README, "Validity"). A margin keeps more of the tracking window on the face too; the pipeline uses
    none (0, ¼ and ½ of its window were measured alike or worse on the corpus's tune split, README).
    """
    mask = np.zeros(crop.shape[:2], np.uint8)
    for c in centres:
        if np.isfinite(c).all():
            cv2.circle(mask, (int(round(c[0])), int(round(c[1]))), max(1, int(round(radius_px))), (255,), -1)
    if outline is not None and np.isfinite(outline).all():
        face = np.zeros(crop.shape[:2], np.uint8)
        cv2.fillPoly(face, [np.round(outline).astype(np.int32)], (255,))
        inside = cv2.distanceTransform(face, cv2.DIST_L2, 5) >= max(margin_px, 1.0)
        mask[~inside] = 0
    found = cv2.goodFeaturesToTrack(crop, max_corners, CORNER_QUALITY, 3, mask=mask)
    return np.zeros((0, 2)) if found is None else found.reshape(-1, 2).astype(np.float64)


def depth_at(points: np.ndarray, mesh_xy: np.ndarray, mesh_z: np.ndarray, k: int = 3) -> np.ndarray:
    """Depth (K,) at (K, 2) ``points``: inverse-distance mean of the ``k`` nearest mesh points' z
    (``mesh_xy`` (M, 2), ``mesh_z`` (M,), same pixels)."""
    d = np.linalg.norm(points[:, None, :] - mesh_xy[None], axis=2)
    idx = np.argsort(d, axis=1)[:, :k]
    w = 1.0 / (np.take_along_axis(d, idx, axis=1) + 1e-3)
    return np.asarray((w * mesh_z[idx]).sum(axis=1) / w.sum(axis=1))


def _camera(
    rest: np.ndarray, dst: np.ndarray, rotation: np.ndarray, from_pixels: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Weak-perspective camera ``dst (K, 2) ≈ cam · rest (K, 3) + c`` (cam ≈ s · R[:2], 2×3).

    The mesh's ``rotation`` is the start. With ``from_pixels`` its yaw and pitch are applied to the rest
    points and the tracked pixels fit the rest: roll, scale, shift and the parallax of what yaw and pitch
    the mesh missed (:func:`_similarity_with_parallax`; FaceMesh reads only part of a head turn: measured
    20–50 % of a rendered 10° yaw). Otherwise the whole mesh rotation is kept and only scale and shift
    are fitted on the pixels. Returns (cam, c, inlier mask) or None."""
    if from_pixels:
        oop = out_of_plane(rotation)
        fit = _similarity_with_parallax(rest @ oop.T, dst)
        if fit is None:
            return None
        cam, c, inl = fit
        return cam @ oop, c, inl
    scaled = _scale_shift((rest @ rotation.T)[:, :2], dst)
    if scaled is None:
        return None
    m, inl = scaled
    return m[0, 0] * rotation[:2], m[:, 2], inl


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.sum(a * a, axis=-1))))


@dataclass(frozen=True)
class HeadFit:
    """The head's pose per frame relative to rest: ``p ≈ cams[t] · (h, z) + shifts[t]`` for a point at
    head-frame position h (rest pixels) and rest depth z.

    Attributes
    ----------
    cams
        (T, 2, 3) weak-perspective cameras (≈ s · R[:2]); NaN for frames that could not be fitted.
    shifts
        (T, 2) image shifts; NaN likewise.
    motion
        The head motion and the fit's residual over the fitted frames; None when no frame was fitted.
    """

    cams: np.ndarray
    shifts: np.ndarray
    motion: HeadMotion | None


def motion_summary(
    angles: Sequence[tuple[float, float, float]],
    scales_pct: Sequence[float],
    shifts_d: Sequence[float],
    residuals_d: Sequence[float],
    max_residual_d: float,
) -> HeadMotion | None:
    """The quality figure of a segment from per-frame fits: the largest |yaw|, |pitch|, |roll|
    (``angles`` as :func:`euler_deg` gives them), |scale change| and shift, and the 90th percentile of
    the fits' residuals (D), corrected when that is at most ``max_residual_d``. None without a frame."""
    if not len(residuals_d):
        return None
    a = np.abs(np.asarray(angles, dtype=np.float64))
    resid = float(np.percentile(residuals_d, 90))
    return HeadMotion(
        roll_deg=float(a[:, 2].max()), yaw_deg=float(a[:, 0].max()), pitch_deg=float(a[:, 1].max()),
        scale_pct=float(np.max(np.abs(scales_pct))), shift_d=float(np.max(np.abs(shifts_d))),
        residual_d=resid, corrected=resid <= max_residual_d,
    )


def fit_head_motion(
    stable: np.ndarray,
    stable_rest: np.ndarray,
    rotations: np.ndarray,
    eye_distance: float,
    *,
    from_pixels: bool,
    max_residual_d: float = 0.05,
) -> HeadFit:
    """Fit the head's pose in every frame from tracked stable points.

    Parameters
    ----------
    stable
        (T, K, 2) tracked pixel positions of the stable points (NaN where lost).
    stable_rest
        (K, 3) the stable points at rest: tracked x, y and FaceMesh z (the measured points' depths must
        share its origin; only differences count).
    rotations
        (T, 3, 3) head rotation from rest per frame (:func:`rest_rotations`); a frame whose rotation is
        not finite is not fitted.
    eye_distance
        D at rest in these pixels (for the figures in D).
    from_pixels
        Fit roll and refine yaw and pitch on the tracked stable points (enough of them, textured) rather
        than take the mesh's rotation whole.
    max_residual_d
        Above this 90th-percentile residual (RMS of the stable inliers, D) the motion counts as not
        corrected.
    """
    n_t = len(stable)
    cams, shifts = np.full((n_t, 2, 3), np.nan), np.full((n_t, 2), np.nan)
    angles: list[tuple[float, float, float]] = []
    scales, moves, residuals = [], [], []
    centre_rest = stable_rest.mean(axis=0)
    for t in range(n_t):
        ok = np.isfinite(stable[t]).all(axis=1)
        if ok.sum() < 5 or not np.isfinite(rotations[t]).all():
            continue
        src3, dst = stable_rest[ok], stable[t][ok]
        fit = _camera(src3, dst, rotations[t], from_pixels)
        if fit is None or abs(np.linalg.det(fit[0][:, :2])) < 1e-9:
            continue
        cam, c, inl = fit
        cams[t], shifts[t] = cam, c
        s = float(np.linalg.norm(cam[0]))
        residuals.append(_rms(dst[inl] - (src3[inl] @ cam.T + c)) / eye_distance)
        angles.append(euler_deg(np.vstack([cam / s, np.cross(cam[0], cam[1]) / s**2])))
        scales.append(100.0 * (s - 1.0))
        moves.append(float(np.linalg.norm(cam @ centre_rest + c - centre_rest[:2])) / eye_distance)
    return HeadFit(cams, shifts, motion_summary(angles, scales, moves, residuals, max_residual_d))


def head_positions(points: np.ndarray, depth: np.ndarray, fit: HeadFit) -> np.ndarray:
    """(T, N, 2) image points of rest depth ``depth`` (N,) → head-frame positions: the solve of
    ``cams[t][:, :2] h = p − shifts[t] − cams[t][:, 2] z``. NaN where the frame was not fitted."""
    out = np.full(points.shape, np.nan)
    for t in range(len(points)):
        cam = fit.cams[t]
        if np.isfinite(cam).all():
            rhs = points[t] - fit.shifts[t] - np.outer(depth, cam[:, 2])
            out[t] = np.linalg.solve(cam[:, :2], rhs.T).T
    return out


def stabilize(crop: np.ndarray, cam: np.ndarray, shift: np.ndarray, depth: float) -> np.ndarray:
    """``crop`` resampled into the head's rest frame for skin at rest depth ``depth``: pixel h of the
    result is the crop at ``cam[:, :2] h + shift + cam[:, 2] depth``. Tracking in these images follows
    only the expression: Lucas–Kanade's translation model does not have to follow the head's rotation and
    scale (measured: a brow tracked through 11° of roll lagged by ~0.01 D, an AI error of ~0.15)."""
    m = np.column_stack([cam[:, :2], shift + cam[:, 2] * depth])
    h, w = crop.shape[:2]
    return np.asarray(cv2.warpAffine(crop, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                     borderMode=cv2.BORDER_REPLICATE))
