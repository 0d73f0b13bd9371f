"""analyze: frames in, scores out. No I/O: callers decode media and hand frames in.

The one sequence every input goes through: landmarks per frame (FaceMesh) → quality control →
normalisation → which task and where (explicit or ``auto``) → rest and peak → per-side magnitudes,
measured on pixel motion under the landmarks where landmarks would hide a still side → scores.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from service.domain import Analysis, Frame, FrameTrace, HeadMotion, Quality, StaticItem, Task, TaskResult
from service.engine import headmotion as hm
from service.engine import normalize as nz
from service.engine import tasks as tk
from service.engine.flow import FlowParams, regional_symmetry
from service.engine.landmarks import FaceMeshDetector, TrackBuilder
from service.engine.pixels import CropStore, track_points_from
from service.engine.quality import QualityLimits, assess
from service.engine.scores import GateThresholds, score_task
from service.errors import InvalidParameterError, NotAnalysableError

log = logging.getLogger(__name__)
Progress = Callable[[int], None]
#: Told the name of each later stage as it starts ("measuring smile", "grading smile", …), for progress.
StageListener = Callable[[str], None]
#: Lucas–Kanade window for the eye contour, in D (5 crop pixels at the default 64 px per D): small, so the
#: still eyeball and skin around the lid margin do not outvote the lid. On warped closures with known
#: landmark truth (45 %), a 5-px window read 0.42/0.40 (demo face) and 0.36/0.39 (a validation face), 7 px
#: 0.34/0.37 and 0.28/0.35: the lids move about one crop pixel on these faces, so every pixel of window
#: that is not lid costs. On the validity corpus 5 px was better on both splits (README, "Validity").
EYE_WINDOW_D = 5 / 64
#: Lucas–Kanade window for the mouth, brows and the stable corners, in D (21 crop pixels at 64 px per D).
WINDOW_D = 21 / 64


def lk_window(window_d: float, crops: CropStore) -> int:
    """A window of ``window_d`` D in ``crops``' pixels: the odd number nearest below or at it (+1 when it is
    even), at least 3."""
    return max(3, 2 * int(window_d * crops.eye_distance_px / 2 + 1e-9) + 1)


def _default_gates() -> dict[Task, GateThresholds]:
    # a0 = noise floor measured on still faces; a1 = a clearly full movement (D or eye-area fraction).
    return {
        Task.SMILE: GateThresholds(0.02, 0.08),
        Task.EYE_CLOSURE: GateThresholds(0.05, 0.30),
        Task.BROW_RAISE: GateThresholds(0.01, 0.04),
    }


@dataclass(frozen=True)
class EngineParams:
    """Every tunable of the engine, with the defaults the tests and README document."""

    gates: Mapping[Task, GateThresholds] = field(default_factory=_default_gates)
    quality: QualityLimits = field(default_factory=QualityLimits)
    peak_fraction: float = 0.8
    #: Scale of the face crops that pixel tracking works in (crop pixels per D); the Lucas–Kanade windows
    #: are fixed in D (:data:`WINDOW_D`, :data:`EYE_WINDOW_D`) and scale with it. Memory grows with its
    #: square. 64 is what the validity corpus was measured with (README, "Validity": 96 and 128 measured).
    crop_eye_distance_px: float = 64.0
    pixel_tracking: bool = True
    max_lost_pixel_fraction: float = 0.3
    flow: FlowParams = field(default_factory=FlowParams)
    regional_flow: bool = True
    grader: bool = True
    grader_model_dir: str | None = None  # None: the model shipped in models/

    def __post_init__(self) -> None:
        if not 32 <= self.crop_eye_distance_px <= 256:
            raise InvalidParameterError(
                "crop_eye_distance_px must be in [32, 256] crop pixels per D, "
                f"got {self.crop_eye_distance_px!r}"
            )


def _landmark_pass(
    frames: Iterable[Frame], static: bool, progress: Progress | None, crop_eye_distance_px: float
) -> tuple[np.ndarray, np.ndarray, CropStore, int, int, np.ndarray]:
    crops = CropStore(eye_distance_px=crop_eye_distance_px)
    builder: TrackBuilder | None = None
    with FaceMeshDetector(static=static) as det:
        for n, frame in enumerate(frames, 1):
            if builder is None:
                builder = TrackBuilder(frame.rgb.shape[1], frame.rgb.shape[0])
            points, faces = det.detect(frame.rgb)
            builder.add(points, faces, frame.time_s)
            crops.add(frame.rgb, points if faces == 1 else None)
            if progress:
                progress(n)
    if builder is None:
        return np.zeros((0, 478, 3), np.float32), np.zeros(0, np.int16), crops, 0, 0, np.zeros(0)
    track = builder.build()
    return track.points, track.faces, crops, track.width, track.height, track.times


def _not_analysable(quality: Quality, reason: str) -> Analysis:
    q = Quality(
        False, quality.reasons + (reason,), quality.warnings, quality.valid_frames, quality.total_frames
    )
    return Analysis(q, ())


def analyze_frames(
    frames: Iterable[Frame],
    fps: float,
    task: Task | None = None,
    params: EngineParams | None = None,
    progress: Progress | None = None,
    *,
    on_stage: StageListener | None = None,
    keep_trace: bool = False,
) -> Analysis:
    """Analyse a video clip.

    Parameters
    ----------
    frames
        Decoded RGB frames in order (streamed; only landmarks and small grey face crops are kept).
    fps
        Frame rate (frames per second), for time-based windows.
    task
        The task the clip shows, or None to find the tasks in it (``--task auto``).
    progress
        Called with the number of frames through FaceMesh so far.
    on_stage
        Called with the name of each later stage as it starts.
    keep_trace
        Keep the per-frame evidence (:class:`~service.domain.FrameTrace`) in ``Analysis.trace``
        (about 6 kB a frame).
    """
    params = params or EngineParams()
    points, faces, crops, width, height, times = _landmark_pass(
        frames, static=False, progress=progress, crop_eye_distance_px=params.crop_eye_distance_px
    )
    pose = nz.head_pose(points, width, height) if len(points) else np.zeros((0, 3))
    quality, usable = assess(faces, pose, params.quality)
    trace = FrameTrace(times, faces, usable, pose, points) if keep_trace else None
    if not quality.ok:
        return Analysis(quality, (), trace=trace)
    return _analyze_track(points, usable, crops, fps, task, params, quality, trace=trace, on_stage=on_stage)


def analyze_photos(
    rest: np.ndarray,
    expression: np.ndarray | None,
    task: Task | None = None,
    params: EngineParams | None = None,
) -> Analysis:
    """Analyse a rest photo and, optionally, an expression photo of the same patient.

    With both, the rest photo is the rest frame and the expression photo the peak (same scores as a
    clip). With the rest photo alone, only the static items are measured (brow height, palpebral
    fissure height, commissure height; left vs right).
    """
    params = params or EngineParams()
    images = [rest] if expression is None else [rest, expression]
    frames = [Frame(i, float(i), img) for i, img in enumerate(images)]
    points, faces, crops, width, height, _ = _landmark_pass(
        frames, static=True, progress=None, crop_eye_distance_px=params.crop_eye_distance_px
    )
    pose = nz.head_pose(points, width, height)
    quality, usable = assess(faces, pose, params.quality, still=True)
    if not quality.ok:
        return Analysis(quality, ())
    norm, _ = nz.normalize(points)
    static = static_items(norm[0])
    if expression is None:
        return Analysis(quality, (), static)
    # Two unrelated stills: rest is frame 0, the expression frame 1 is both the segment and its peak.
    analysis = _analyze_track(points, usable, crops, 1.0, task, params, quality, photo_pair=True)
    return Analysis(analysis.quality, analysis.tasks, static)


def static_items(norm_rest: np.ndarray) -> tuple[StaticItem, ...]:
    """Auto-eFACE-style static items from one normalised rest pose (478, 2), in D, per patient side.

    brow_height: brow above the eye-contour centroid; palpebral_fissure_height: upper- to lower-lid
    mid-points; commissure_height: mouth corner relative to the nose tip (negative: below it).
    """
    def side(
        idx_brow: tuple[int, ...], idx_eye: tuple[int, ...], lid: tuple[int, int], corner: int
    ) -> tuple[float, float, float]:
        brow = float(norm_rest[list(idx_brow), 1].mean() - norm_rest[list(idx_eye), 1].mean())
        fissure = float(norm_rest[lid[0], 1] - norm_rest[lid[1], 1])
        return brow, fissure, float(norm_rest[corner, 1])

    left = side(tuple(nz.LEFT_BROW), tuple(nz.LEFT_EYE), (386, 374), 291)
    right = side(tuple(nz.RIGHT_BROW), tuple(nz.RIGHT_EYE), (159, 145), 61)
    names = ("brow_height", "palpebral_fissure_height", "commissure_height")
    return tuple(StaticItem(n, lv, rv) for n, lv, rv in zip(names, left, right, strict=True))


def _analyze_track(
    points: np.ndarray,
    usable: np.ndarray,
    crops: CropStore,
    fps: float,
    task: Task | None,
    params: EngineParams,
    quality: Quality,
    *,
    photo_pair: bool = False,
    trace: FrameTrace | None = None,
    on_stage: StageListener | None = None,
) -> Analysis:
    stage = on_stage or (lambda name: None)
    pts = points.copy()
    pts[~usable] = np.nan
    first_valid = np.flatnonzero(usable)
    k_rest = 1 if photo_pair else max(3, int(round(0.3 * fps)))
    norm = pose_normalized(pts, first_valid[:k_rest])
    rest_pose = np.nanmedian(norm[first_valid[:k_rest]], axis=0)
    signals = tk.landmark_signals(norm, rest_pose)
    a1 = {t: params.gates[t].a1 for t in Task}
    a0 = {t: params.gates[t].a0 for t in Task}

    if photo_pair:
        if task is None:
            rel = {t: float(np.nanmax(signals[t][1])) / a1[t] for t in Task}
            task = max(rel, key=lambda t: rel[t])
        segments = [tk.Segment(task, 1, 1, 0, 0)]
    elif task is not None:
        bil = tk.smooth(np.nanmean(signals[task], axis=1), max(1, int(round(0.1 * fps)) | 1))
        rest = tk.initial_rest(bil, usable, fps)
        last = int(first_valid[-1])
        segments = [tk.Segment(task, min(rest[1] + 1, last), last, rest[0], rest[1])]
    else:
        segments = tk.find_segments(signals, a1, a0, fps)
        if not segments:
            return _not_analysable(
                quality,
                "no facial movement found: name the task (--task) to score a clip with little or no movement",
            )
    results = []
    for seg in segments:
        stage(f"measuring {seg.task.value}")
        results.append(_measure(seg, pts, norm, usable, crops, fps, params, photo_pair))
    if task is not None and (note := wrong_task_note(signals, task, a1, usable)) is not None:
        results = [replace(r, notes=r.notes + (note,)) for r in results]
    if params.grader and not photo_pair:
        for k, r in enumerate(results):
            stage(f"grading {r.task.value}")
            results[k] = _with_grade(r, norm, params)
    if params.regional_flow and not photo_pair and crops.scale is not None:
        # Two photos are not consecutive frames: optical flow is for clips only.
        lm_crop = crops.to_crop(pts[..., :2])
        for k, r in enumerate(results):
            stage(f"regional flow {r.task.value}")
            results[k] = _with_flow(r, crops, lm_crop, fps, params)
    if trace is not None:
        trace = replace(trace, signals={t: np.where(usable[:, None], v, np.nan) for t, v in signals.items()})
    return Analysis(quality, tuple(results), trace=trace)


#: A named task's region counts as barely moving when it reached less than this fraction of a full
#: movement (the gate's a1) ...
WRONG_TASK_OWN = 0.25
#: ... while another region moved at least this many times more, relative to ITS full movement.
WRONG_TASK_RATIO = 4.0


def wrong_task_note(
    signals: Mapping[Task, np.ndarray], task: Task, full: Mapping[Task, float], usable: np.ndarray
) -> str | None:
    """A warning when the named ``task``'s region barely moved while another region clearly did.

    ``signals`` are the landmark signals (T, 2) per task in the head's frame, ``full`` each task's full
    movement (a1, same unit), ``usable`` the (T,) frames that count. Each region's activity is its larger
    side's 95th-percentile excursion over a full movement, so a one-sided movement counts whole. Returns
    None when the named region moved, or no other region moved much more.
    """
    def activity(t: Task) -> float:
        v = signals[t][usable]
        v = v[np.isfinite(v).all(axis=1)] if v.size else v
        return float(np.percentile(v, 95, axis=0).max()) / full[t] if len(v) else 0.0

    own = activity(task)
    others = {t: activity(t) for t in Task if t is not task}
    busiest = max(others, key=lambda t: others[t])
    if own >= WRONG_TASK_OWN or others[busiest] < WRONG_TASK_RATIO * max(own, 0.0) or others[busiest] < 0.5:
        return None
    return (
        f"wrong task? the {task.value.replace('_', ' ')} region moved {own:.2f} of a full movement while the "
        f"{busiest.value.replace('_', ' ')} region moved {others[busiest]:.2f}: check the task "
        "(--task auto finds the tasks in the clip)"
    )


def pose_normalized(points: np.ndarray, rest_frames: np.ndarray) -> np.ndarray:
    """Landmarks (T, 478, 3) px → the normalised frame (T, 478, 2) with the head's motion removed.

    Each frame is mapped into the head frame of the rest pose (median of ``rest_frames``) by a robust 3-D
    similarity on expression-stable points (:func:`service.engine.headmotion.frontalize`), then every
    frame gets the rest pose's normalisation (nose tip, eye line, D). So roll, yaw, pitch, scale and shift
    of the head do not read as movement, in the signals, the segmentation and the grader alike.
    """
    rest = _nanmedian(points[rest_frames])
    frontal = hm.frontalize(points, rest)
    reference = nz.normalize(rest[None])[1]
    return nz.normalize(frontal, reference=reference)[0]


def _face_axes(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Unit vectors (image px) toward the patient's left and up, and the inter-eye distance in px."""
    left_c, right_c = nz.eye_centres(landmarks[None, :, :2])
    v = (left_c - right_c)[0]
    d = float(np.linalg.norm(v))
    e = v / d
    return e, np.array([e[1], -e[0]]), d


def _pixel_displacements(
    task: Task,
    lo: int,
    hi: int,
    anchor: int,
    pts: np.ndarray,
    usable: np.ndarray,
    crops: CropStore,
    indices: list[int],
    rest_rel: slice,
    window_px: int,
    max_residual_d: float,
) -> tuple[np.ndarray, HeadMotion | None] | None:
    """Displacements (hi − lo + 1, len(indices), 2) in D, from rest, in the HEAD's frame at rest, of
    Lucas–Kanade-tracked landmarks, and the head motion removed.

    The points are seeded where FaceMesh puts the landmarks in frame ``anchor`` and tracked both ways
    through frames ``lo``..``hi``; rest is the median over ``rest_rel`` (relative to ``lo``). The head's
    rigid motion is removed before any displacement is taken (:mod:`service.engine.headmotion`): the
    mesh's rotation, refined on Shi–Tomasi corners found near the task's stable landmarks, inside the
    face's outline, in the anchor crop and tracked through the segment (their depth interpolated from
    the mesh at rest).
    """
    if crops.scale is None:
        return None
    stable = list(hm.STABLE_BY_TASK[task])
    seeds = crops.to_crop(pts[anchor, indices])
    st_seeds = crops.to_crop(pts[anchor, stable])
    anchor_crop = crops.crops[anchor]
    seg = pts[lo : hi + 1]
    rest_frames = [k for k in range(rest_rel.start, rest_rel.stop) if usable[lo + k]] or [rest_rel.start]
    rest3d = _nanmedian(seg[rest_frames])
    if not np.isfinite(rest3d[stable + indices]).all() or anchor_crop is None:
        return None
    e, u, d_px = _face_axes(rest3d)
    d_crop = d_px * crops.scale
    z = rest3d[:, 2] * crops.scale
    # Only inside the face's outline: hairline and background corners do not turn with the head (README,
    # "Stable corners inside the face's outline").
    outline = crops.to_crop(pts[anchor, list(nz.FACE_OVAL)])
    corners = hm.stable_corners(anchor_crop, st_seeds, hm.CORNER_RADIUS_D * d_crop, outline=outline)
    stable_window = lk_window(WINDOW_D, crops)
    st_tracked = track_points_from(crops.crops, anchor, lo, hi, corners, window_px=stable_window)
    st_xy = _nanmedian(st_tracked[rest_rel])
    keep = np.isfinite(st_xy).all(axis=1)  # a corner lost before rest cannot anchor anything
    from_pixels = int(keep.sum()) >= hm.MIN_CORNERS
    if from_pixels:
        st_tracked, st_xy = st_tracked[:, keep], st_xy[keep]
        st_z = hm.depth_at(st_xy, crops.to_crop(rest3d[:468, :2]), z[:468])
    else:  # too little texture: the stable landmarks' own pixels, for scale and shift only
        st_tracked = track_points_from(crops.crops, anchor, lo, hi, st_seeds, window_px=stable_window)
        st_xy = _nanmedian(st_tracked[rest_rel])
        keep = np.isfinite(st_xy).all(axis=1)
        st_tracked, st_xy, st_z = st_tracked[:, keep], st_xy[keep], z[stable][keep]
    st_rest = np.column_stack([st_xy, st_z])
    rotations = hm.rest_rotations(seg, rest3d, tuple(stable))
    fit = hm.fit_head_motion(
        st_tracked, st_rest, rotations, d_crop, from_pixels=from_pixels, max_residual_d=max_residual_d
    )
    positions = _tracked_in_head_frame(crops, fit, lo, hi, anchor, seeds, z[indices], window_px)
    rest = _nanmedian(positions[rest_rel])  # a point lost before rest stays NaN (counted as lost)
    disp = positions - rest
    out = np.full((hi - lo + 1, len(indices), 2), np.nan)
    out[..., 0] = (disp @ e) / d_crop
    out[..., 1] = (disp @ u) / d_crop
    return out, fit.motion


def _tracked_in_head_frame(
    crops: CropStore, fit: hm.HeadFit, lo: int, hi: int, anchor: int, seeds: np.ndarray,
    depth: np.ndarray, window_px: int,
) -> np.ndarray:
    """Head-frame positions (hi − lo + 1, N, 2) of points seeded at crop positions ``seeds`` in frame
    ``anchor``: tracked by Lucas–Kanade in crops stabilised to the head's rest frame
    (:func:`service.engine.headmotion.stabilize`, at the points' mean depth), then mapped back through
    the fit so each point's own depth is honoured."""
    z_mean = float(np.mean(depth))
    stable_crops: list[np.ndarray | None] = [None] * len(crops.crops)
    for t in range(lo, hi + 1):
        crop, cam = crops.crops[t], fit.cams[t - lo]
        if crop is not None and np.isfinite(cam).all():
            stable_crops[t] = hm.stabilize(crop, cam, fit.shifts[t - lo], z_mean)
    cam_a, shift_a = fit.cams[anchor - lo], fit.shifts[anchor - lo]
    if stable_crops[anchor] is None:
        return np.full((hi - lo + 1, len(seeds), 2), np.nan)
    seeds_h = np.linalg.solve(cam_a[:, :2], (seeds - shift_a - cam_a[:, 2] * z_mean).T).T
    tracked_h = track_points_from(stable_crops, anchor, lo, hi, seeds_h, window_px=window_px)
    # Back to image positions (as if tracked there), then the per-point depth solve.
    image = np.einsum("tij,tnj->tni", fit.cams[:, :, :2], tracked_h)
    image += (fit.shifts + fit.cams[:, :, 2] * z_mean)[:, None, :]
    return hm.head_positions(image, depth, fit)


def _landmark_head_motion(
    seg: np.ndarray, rest_rel: slice, task: Task, max_residual_d: float
) -> HeadMotion | None:
    """Head motion and fit residual from the landmarks alone (when pixel tracking was not used)."""
    rest3d = _nanmedian(seg[rest_rel])
    stable = list(hm.STABLE_BY_TASK[task])
    d = float(nz.interocular_distance(rest3d[None])[0])
    if not (np.isfinite(rest3d[stable]).all() and d > 0):
        return None
    scale, rot, shift = hm.robust_similarities_3d(rest3d[stable], seg[:, stable])
    angles, scales, moves, residuals = [], [], [], []
    for k in np.flatnonzero(np.isfinite(scale)):
        fitted = scale[k] * rest3d[stable] @ rot[k].T + shift[k]
        residuals.append(float(np.sqrt(np.mean(np.sum((seg[k, stable] - fitted) ** 2, axis=1)))) / d)
        moves.append(float(np.linalg.norm((fitted - rest3d[stable])[:, :2].mean(axis=0))) / d)
        angles.append(hm.euler_deg(rot[k]))
        scales.append(100.0 * (scale[k] - 1.0))
    return hm.motion_summary(angles, scales, moves, residuals, max_residual_d)


def _task_signal(
    task: Task, disp: np.ndarray, rest_pose: np.ndarray, indices: list[int], n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The task's (T, 2) signal and the (T, n, 2) left/right displacement vectors for the cosine score.

    ``disp`` holds displacements in D of the landmarks ``indices``: n left-group points, their n mirror
    partners, then (brow raise) the left and right canthi.
    """
    vl, vr = disp[:, :n], disp[:, n : 2 * n]
    if task is Task.EYE_CLOSURE:
        # The contour as it moved: rest positions plus the measured displacements, then 1 − A(t)/A(rest).
        moved = rest_pose[None].repeat(disp.shape[0], axis=0)
        moved[:, indices] = moved[:, indices] + disp
        return tk.eye_closure_signal(moved, rest_pose), vl, vr
    if task is Task.SMILE:
        return tk.smile_signal(vl, vr), vl, vr
    c_l, c_r = disp[:, 2 * n : 2 * n + 2], disp[:, 2 * n + 2 :]
    # Brow vectors relative to the canthi, like the signal.
    vl = vl - np.nanmean(c_l, axis=1, keepdims=True)
    vr = vr - np.nanmean(c_r, axis=1, keepdims=True)
    return tk.brow_signal(disp[:, :n], disp[:, n : 2 * n], c_l, c_r), vl, vr


def _nanmedian(a: np.ndarray) -> np.ndarray:
    """Median over axis 0 ignoring NaN; NaN (without numpy's warning) where a column has no value."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(a, axis=0)


def _lost_fraction(px: np.ndarray | None, first: int, last: int) -> float:
    """Fraction of (frame, point) pairs without a tracked position in frames ``first``..``last``."""
    return 1.0 if px is None else float(np.isnan(px[first : last + 1]).any(axis=2).mean())


def _peak_anchor(
    bilateral: np.ndarray, usable: np.ndarray, lo: int, start: int, end: int, peak_fraction: float
) -> int:
    """The usable frame nearest the middle of the peak interval of ``bilateral`` (frames ``lo``.., smoothed
    mean of both sides' signals), searched in frames ``start``..``end``; an absolute frame index."""
    p0, p1 = tk.peak_interval(bilateral, start - lo, end - lo, peak_fraction)
    middle = lo + (p0 + p1) // 2
    ok = np.flatnonzero(usable[lo : lo + len(bilateral)]) + lo
    return int(ok[np.argmin(np.abs(ok - middle))]) if len(ok) else lo


@functools.lru_cache(maxsize=4)
def _grader(model_dir: str | None) -> Any:
    from service.engine.grader import Grader

    return Grader.load(model_dir)


def _with_grade(result: TaskResult, norm: np.ndarray, params: EngineParams) -> TaskResult:
    """The deep grader over the task's segment (rest → end). A missing or tampered model is a note, never
    a crash and never a silent grade."""
    from service.errors import FaceSymError

    try:
        grader = _grader(params.grader_model_dir)
    except (FaceSymError, ImportError, OSError) as exc:
        log.error("grader not available: %s", exc)
        return replace(result, notes=result.notes + (f"grader not run: {exc}",))
    grade = grader.predict(norm[result.rest_frames[0] : result.frames[1] + 1])
    return replace(result, grade=grade)


def _with_flow(
    result: TaskResult, crops: CropStore, lm_crop: np.ndarray, fps: float, params: EngineParams
) -> TaskResult:
    """Add the regional optical-flow Symmetry Score over the task's rest → movement frames."""
    try:
        first, last = result.rest_frames[0], result.frames[1]
        flow = regional_symmetry(crops.crops, lm_crop, first, last, params.flow, fps=fps)
    except ValueError as exc:
        return replace(result, notes=result.notes + (f"optical-flow symmetry not measured: {exc}",))
    return replace(result, flow=flow)


def _measure(
    seg: tk.Segment,
    pts: np.ndarray,
    norm: np.ndarray,
    usable: np.ndarray,
    crops: CropStore,
    fps: float,
    params: EngineParams,
    photo_pair: bool,
) -> TaskResult:
    task = seg.task
    n_all = norm.shape[0]
    rest_idx = [i for i in range(seg.rest_start, seg.rest_end + 1) if usable[i]] or [seg.rest_start]
    rest_pose = np.nanmedian(norm[rest_idx], axis=0)
    width = 1 if photo_pair else max(1, int(round(0.1 * fps)) | 1)

    lm_sig = tk.landmark_signals(norm, rest_pose)[task]
    start, end = seg.start, seg.end
    if not photo_pair:
        bil = tk.smooth(np.nanmean(lm_sig, axis=1), width)
        start, end = tk.extend_to_motion(bil, seg, 0.1 * np.nanmax(bil[seg.start : seg.end + 1]), n_all)
    lo, hi = seg.rest_start, end
    rest_rel = slice(seg.rest_start - lo, seg.rest_end - lo + 1)
    left_idx, right_idx = tk.groups(task)
    notes: list[str] = []

    disp_lm = norm[lo : hi + 1] - rest_pose
    cl, cr = list(tk.CANTHI_LEFT), list(tk.mirrored(tk.CANTHI_LEFT))
    indices = list(left_idx) + list(right_idx) + (cl + cr if task is Task.BROW_RAISE else [])
    candidates: list[tuple[str, np.ndarray]] = []
    head_motion: HeadMotion | None = None
    if params.pixel_tracking:
        window = lk_window(EYE_WINDOW_D if task is Task.EYE_CLOSURE else WINDOW_D, crops)
        px: np.ndarray | None = None
        measured: tuple[np.ndarray, HeadMotion | None] | None = None
        limit = params.quality.max_head_residual_d
        if task is Task.SMILE:
            # The commissure is a fold, not a point of skin: seeded at rest, the tracked lip tissue rolls
            # into the opening mouth and lags the corner. Seed where FaceMesh puts the corner in the
            # middle of the peak instead (sharp there; the landmarks' timing is sound even where their
            # amplitude is not) and track back to rest: a still (palsied) side's dragged landmark sits on
            # skin that does not move, so that side still reads no motion.
            bilateral = tk.smooth(np.nanmean(lm_sig[lo : hi + 1], axis=1), width)
            anchor = _peak_anchor(bilateral, usable, lo, start, end, params.peak_fraction)
            measured = _pixel_displacements(
                task, lo, hi, anchor, pts, usable, crops, indices, rest_rel, window, limit
            )
            px = None if measured is None else measured[0]
            if _lost_fraction(px, start - lo, end - lo) > params.max_lost_pixel_fraction:
                notes.append("smile: tracking from the peak lost the corners; tracked from rest instead")
                px = None
        if px is None:
            measured = _pixel_displacements(
                task, lo, hi, lo, pts, usable, crops, indices, rest_rel, window, limit
            )
            px = None if measured is None else measured[0]
        lost = _lost_fraction(px, start - lo, end - lo)
        if px is not None and measured is not None and lost <= params.max_lost_pixel_fraction:
            candidates.append(("pixels", px))
            head_motion = measured[1]
        else:
            notes.append(
                f"pixel tracking lost {100 * lost:.0f} % of points; "
                "landmark positions used, which can understate asymmetry"
            )
    candidates.append(("landmarks", disp_lm[:, indices]))

    for method, disp in candidates:
        sig, vl, vr = _task_signal(task, disp, rest_pose, indices, len(left_idx))
        bil = tk.smooth(np.nanmean(sig, axis=1), width)
        p0, p1 = tk.peak_interval(bil, start - lo, end - lo, params.peak_fraction)
        peak = slice(p0, p1 + 1)
        with np.errstate(invalid="ignore"):
            left_raw = float(np.nanmedian(sig[peak, 0])) if np.isfinite(sig[peak, 0]).any() else np.nan
            right_raw = float(np.nanmedian(sig[peak, 1])) if np.isfinite(sig[peak, 1]).any() else np.nan
        if np.isfinite(left_raw) and np.isfinite(right_raw):
            break
        # Never a silent 0: a side that could not be measured falls back to landmarks, or fails the task.
        notes.append(f"{method}: the peak could not be measured on both sides")
    else:
        raise NotAnalysableError([f"{task.value}: movement could not be measured on both sides"])
    if method == "landmarks" or head_motion is None:
        head_motion = _landmark_head_motion(
            pts[lo : hi + 1], rest_rel, task, params.quality.max_head_residual_d
        )
    if head_motion is not None and not head_motion.corrected:
        notes.append(
            f"head motion not fully removed: residual {head_motion.residual_d:.3f} D > "
            f"{params.quality.max_head_residual_d:g} D (roll {head_motion.roll_deg:.1f}°, "
            f"yaw {head_motion.yaw_deg:.1f}°, pitch {head_motion.pitch_deg:.1f}°); read the scores with care"
        )
    left, right = max(0.0, left_raw), max(0.0, right_raw)
    v_left = np.nan_to_num(_nanmedian(vl[peak]))
    v_right = np.nan_to_num(_nanmedian(vr[peak]))
    s = score_task(left, right, v_left, v_right, params.gates[task])
    if s.insufficient_activation:
        notes.append(f"insufficient activation: gate {s.activation_gate:.2f} < 1")
    return TaskResult(
        task=task,
        frames=(int(start), int(end)),
        rest_frames=(int(seg.rest_start), int(seg.rest_end)),
        peak_frames=(int(lo + p0), int(lo + p1)),
        left=s.left,
        right=s.right,
        asymmetry_index=s.asymmetry_index,
        activation_gate=s.activation_gate,
        asymmetry_score=s.asymmetry_score,
        cosine_index=s.cosine_index,
        cosine_score=s.cosine_score,
        weaker_side=s.weaker_side,
        gate_thresholds=(params.gates[task].a0, params.gates[task].a1),
        method=method,
        notes=tuple(notes),
        head_motion=head_motion,
        series=tuple((float(a), float(b)) for a, b in sig[: end - lo + 1]),
    )
