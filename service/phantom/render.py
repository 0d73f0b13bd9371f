"""Warp phantoms: a real face photo animated with known per-side motion, plus the truth that goes with it.

A phantom clip plays its tasks in sequence::

    rest | ramp up, hold, ramp down, tail | ramp up, hold, ramp down, tail | ...
           ---------- task 1 -----------   ---------- task 2 -----------

Ramps follow a smoothstep. During a task the frame is the source photo warped by the task's field at
amplitude alpha(t) in [0, 1]; outside tasks the frame is the photo itself, so frame 0 equals
:attr:`SourceFace.rgb` exactly. Sides are the PATIENT's (DESIGN.md, "Sides and coordinates").
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from service.domain import Side, Task
from service.errors import InvalidParameterError, NotAnalysableError, UnreadableInputError
from service.phantom import motion as mfields
from service.phantom.warp import WarpField, face_ring_anchors, face_support

log = logging.getLogger(__name__)

#: A warp whose Jacobian determinant falls below this anywhere on the ramp is refused (near-fold).
MIN_JACOBIAN = 0.1
DEFAULT_FRAME = (640, 480)


@dataclass(frozen=True)
class TaskMotion:
    """One task and how far each side moves.

    Attributes
    ----------
    task
        The task (a :class:`Task` or its value).
    left, right
        The patient's left / right amplitude at the peak: D units (commissure excursion, brow lift) for
        smile and brow raise, closure fraction in [0, 0.5] for eye closure.
    """

    task: Task
    left: float
    right: float

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "task", Task(self.task))
        except ValueError:
            raise InvalidParameterError(
                f"task must be one of {[t.value for t in Task]}, got {self.task!r}"
            ) from None
        for name in ("left", "right"):
            v = float(getattr(self, name))
            if not np.isfinite(v) or v < 0:
                raise InvalidParameterError(f"{name} must be a finite amplitude >= 0, got {v!r}")
            if self.task is Task.EYE_CLOSURE and v > mfields.MAX_EYE_CLOSURE:
                raise InvalidParameterError(
                    f"{name} eye-closure fraction must be <= {mfields.MAX_EYE_CLOSURE} "
                    f"(more folds the warp), got {v}"
                )
            object.__setattr__(self, name, v)

    @property
    def expected_asymmetry_index(self) -> float:
        """|L - R| / max(L, R); 0 when both sides are still."""
        top = max(self.left, self.right)
        return abs(self.left - self.right) / top if top > 0 else 0.0

    @property
    def weaker_side(self) -> Side | None:
        """The side that moves less, None when both move equally."""
        if self.left == self.right:
            return None
        return Side.LEFT if self.left < self.right else Side.RIGHT


@dataclass(frozen=True)
class PhantomSpec:
    """What a phantom clip plays: tasks in order, frame rate and the timeline's phases in seconds."""

    motions: tuple[TaskMotion, ...]
    fps: float = 30.0
    rest_s: float = 0.8
    ramp_s: float = 0.4
    hold_s: float = 0.8
    tail_s: float = 0.6

    def __post_init__(self) -> None:
        object.__setattr__(self, "motions", tuple(self.motions))
        if not self.motions:
            raise InvalidParameterError("motions must name at least one task")
        if not (np.isfinite(self.fps) and self.fps > 0):
            raise InvalidParameterError(f"fps must be > 0, got {self.fps!r}")
        for name in ("rest_s", "hold_s", "tail_s"):
            if round(getattr(self, name) * self.fps) < 1:
                raise InvalidParameterError(f"{name} must last at least one frame at {self.fps} fps")
        if not self.ramp_s >= 0:
            raise InvalidParameterError(f"ramp_s must be >= 0, got {self.ramp_s!r}")

    def frames_of(self, seconds: float) -> int:
        return int(round(seconds * self.fps))


@dataclass(frozen=True)
class SourceFace:
    """A framed, level face photo and its landmarks.

    Attributes
    ----------
    rgb
        (H, W, 3) uint8, H and W even (H.264 yuv420p).
    landmarks
        (478, 3) float32 MediaPipe landmarks of ``rgb`` in pixels.
    source
        Where the photo came from (path or "<array>"), for the truth file.
    """

    rgb: np.ndarray
    landmarks: np.ndarray
    source: str = "<array>"

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def eye_distance(self) -> float:
        """D in pixels (eye-contour centroids)."""
        return mfields.eye_distance(self.landmarks)


# ----------------------------------------------------------------------------------------- loading
def _read_rgb(source: str | Path | np.ndarray) -> tuple[np.ndarray, str]:
    if isinstance(source, np.ndarray):
        arr = source
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.dtype != np.uint8:
            raise UnreadableInputError(
                f"image array must be (H, W, 3) uint8 RGB, got {arr.shape} {arr.dtype}"
            )
        return np.ascontiguousarray(arr[..., :3]), "<array>"
    path = Path(source)
    if not path.is_file():
        raise UnreadableInputError(f"face photo not found: {path}")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is not None:
        return np.ascontiguousarray(bgr[..., ::-1]), str(path)
    try:  # formats OpenCV lacks
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")), str(path)
    except Exception as exc:
        raise UnreadableInputError(f"cannot read {path} as an image: {exc}") from exc


def _detect(rgb: np.ndarray) -> np.ndarray | None:
    from service.engine.landmarks import detect_image

    pts = detect_image(rgb)
    if pts is None and max(rgb.shape[:2]) < 1200:
        # MediaPipe's face detector misses small faces; try again at twice the size.
        big = cv2.resize(rgb, None, fx=2.0, fy=2.0, interpolation=cv2.INTER_CUBIC)
        pts = detect_image(big)
        if pts is not None:
            pts = pts.copy()
            pts[:, :3] /= 2.0
    return pts


def _even(n: float) -> int:
    return int(np.ceil(n / 2.0) * 2)


def load_face(
    source: str | Path | np.ndarray,
    *,
    target_eye_distance: float = 100.0,
    frame_size: tuple[int, int] | None = None,
) -> SourceFace:
    """Read a frontal face photo, level and scale it so D ≈ ``target_eye_distance``, and frame it.

    The photo is rotated so the eye line is horizontal (the motion fields' "up" is image -y), scaled
    (cubic when enlarging, area when shrinking) and cropped around the face with room for the forehead
    (0.6 face heights above the brows) and the chin; parts of the frame beyond the photo are filled by
    reflection. Landmarks are detected again on the framed picture.

    Parameters
    ----------
    source
        Image file path (anything OpenCV or Pillow reads) or an (H, W, 3) uint8 RGB array.
    target_eye_distance
        Wanted D in pixels of the output.
    frame_size
        (width, height) of the output, made even; default 640x480, enlarged when the face needs more room.

    Returns
    -------
    SourceFace

    Raises
    ------
    UnreadableInputError
        The source is not a readable image.
    NotAnalysableError
        No face found (``reasons == ["no face"]``).
    """
    if not (np.isfinite(target_eye_distance) and target_eye_distance >= 20):
        raise InvalidParameterError(f"target_eye_distance must be >= 20 px, got {target_eye_distance!r}")
    rgb, name = _read_rgb(source)
    lm = _detect(rgb)
    if lm is None:
        raise NotAnalysableError(["no face"])
    centres = mfields.eye_centres(lm)
    eye_vec = centres[Side.LEFT] - centres[Side.RIGHT]  # patient's left eye is on the image's right
    d0 = float(np.linalg.norm(eye_vec))
    if d0 < 5:
        raise NotAnalysableError(["no face"])
    scale = target_eye_distance / d0
    if scale < 1.0:
        # warpAffine has no area filter; shrink first so a large photo does not alias.
        rgb = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        lm = lm * np.float32(scale)
        eye_vec = eye_vec * scale
        scale = 1.0
    angle = float(np.degrees(np.arctan2(eye_vec[1], eye_vec[0])))
    pivot = (mfields.eye_centres(lm)[Side.LEFT] + mfields.eye_centres(lm)[Side.RIGHT]) / 2.0
    rot = cv2.getRotationMatrix2D((float(pivot[0]), float(pivot[1])), angle, scale)
    xy = lm[:, :2].astype(np.float64) @ rot[:, :2].T + rot[:, 2]
    face_h = float(np.ptp(xy[:, 1]))
    face_w = float(np.ptp(xy[:, 0]))
    brows = list(mfields._sets()[Side.LEFT].brow) + list(mfields._sets()[Side.RIGHT].brow)
    top = float(xy[brows, 1].min()) - 0.6 * face_h
    bottom = float(xy[:, 1].max()) + 0.2 * face_h
    if frame_size is None:
        width = max(DEFAULT_FRAME[0], _even(1.7 * face_w))
        height = max(DEFAULT_FRAME[1], _even(bottom - top + 8))
    else:
        width, height = _even(frame_size[0]), _even(frame_size[1])
        if width < 64 or height < 64:
            raise InvalidParameterError(f"frame_size must be at least 64x64, got {frame_size!r}")
    a, b = mfields.midline(np.column_stack([xy, np.zeros(len(xy))]))
    mid_x = a + b * float(np.mean(xy[list(mfields.MIDLINE_FIT), 1]))
    # Centre the midline horizontally and the forehead-to-chin span vertically.
    rot[0, 2] += width / 2.0 - mid_x
    rot[1, 2] += height / 2.0 - (top + bottom) / 2.0
    framed = cv2.warpAffine(
        rgb, rot, (width, height), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT_101
    )
    lm2 = _detect(framed)
    if lm2 is None:
        raise NotAnalysableError(["no face"])
    d2 = mfields.eye_distance(lm2)
    if abs(d2 - target_eye_distance) > 0.15 * target_eye_distance:
        log.warning("framed face has D=%.1f px, wanted %.1f", d2, target_eye_distance)
    return SourceFace(np.ascontiguousarray(framed), lm2.astype(np.float32), name)


# ---------------------------------------------------------------------------------------- warping
def landmark_displacements(face: SourceFace, tm: TaskMotion) -> np.ndarray:
    """(478, 2) pixel displacements of ``tm`` at full amplitude: left field + right field (linear)."""
    out = np.zeros((mfields.N_LANDMARKS, 2))
    for side, amp in ((Side.LEFT, tm.left), (Side.RIGHT, tm.right)):
        if amp > 0:
            out += mfields.task_field(tm.task, face.landmarks, side, amp)
    return out


def task_warp(face: SourceFace, tm: TaskMotion) -> WarpField:
    """The TPS warp of ``tm`` at full amplitude, checked not to fold anywhere on its ramp.

    All 478 landmarks are control points (the still ones with zero displacement), plus zero anchors on
    a ring 1.25x the face oval and on the frame border; the field is then faded to zero between the
    oval and that ring (:func:`face_support`), so the background never moves.
    """
    disp = landmark_displacements(face, tm)
    wf = WarpField.from_controls(
        face.landmarks[:, :2],
        disp,
        face.rgb.shape[:2],
        anchors=face_ring_anchors(face.landmarks),
        support=face_support(face.landmarks, face.rgb.shape[:2]),
    )
    det = wf.min_jacobian()
    if det < MIN_JACOBIAN:
        raise InvalidParameterError(
            f"{tm.task.value} with left={tm.left}, right={tm.right} folds the warp "
            f"(min Jacobian {det:.2f}); use smaller amplitudes"
        )
    return wf


def _smoothstep(u: float) -> float:
    return u * u * (3.0 - 2.0 * u)


@dataclass
class Phantom:
    """A rendered-on-demand phantom clip.

    Attributes
    ----------
    face
        The source photo.
    spec
        What plays.
    schedule
        (n_frames,) int: index into ``spec.motions`` active in each frame, -1 at rest.
    alpha
        (n_frames,) float amplitude scale in [0, 1] of the active task.
    truth
        The truth dictionary (see :func:`render`).
    """

    face: SourceFace
    spec: PhantomSpec
    schedule: np.ndarray
    alpha: np.ndarray
    truth: dict[str, Any]
    warps: tuple[WarpField, ...] = field(repr=False)
    displacements: tuple[np.ndarray, ...] = field(repr=False)

    @property
    def width(self) -> int:
        return self.face.width

    @property
    def height(self) -> int:
        return self.face.height

    @property
    def fps(self) -> float:
        return float(self.spec.fps)

    @property
    def n_frames(self) -> int:
        return int(len(self.schedule))

    def frame(self, k: int) -> np.ndarray:
        """Frame ``k`` as (H, W, 3) uint8 RGB."""
        t, a = int(self.schedule[k]), float(self.alpha[k])
        if t < 0 or a == 0.0:
            return self.face.rgb.copy()
        return self.warps[t].apply(self.face.rgb, a)

    def frames(self) -> Iterator[np.ndarray]:
        """Stream every frame in order (one frame in memory at a time)."""
        for k in range(self.n_frames):
            yield self.frame(k)

    def expected_landmarks(self, k: int) -> np.ndarray:
        """(478, 2) pixel positions the driving landmarks are moved to in frame ``k``."""
        base = self.face.landmarks[:, :2].astype(np.float64)
        t = int(self.schedule[k])
        return base if t < 0 else base + float(self.alpha[k]) * self.displacements[t]


def _task_truth(tm: TaskMotion) -> dict[str, Any]:
    weaker = tm.weaker_side
    return {
        "task": tm.task.value,
        "unit": tm.task.unit,
        "left": tm.left,
        "right": tm.right,
        "expected_asymmetry_index": tm.expected_asymmetry_index,
        "weaker_side": None if weaker is None else weaker.value,
    }


def render(face: SourceFace, spec: PhantomSpec) -> Phantom:
    """Build the phantom clip of ``spec`` on ``face`` (frames are rendered lazily by ``frames()``).

    Truth (``Phantom.truth``)::

        {"kind": "warp", "source", "fps", "n_frames", "width", "height", "eye_distance_px",
         "timeline": {rest_s, ramp_s, hold_s, tail_s},
         "tasks": [{"task", "unit", "left", "right", "expected_asymmetry_index", "weaker_side",
                    "frames": [first, last],       # ramp up .. ramp down (the motion)
                    "rest_frames": [a, b],         # still frames just before it (start rest or previous tail)
                    "peak_frames": [a, b]}]}       # the hold at full amplitude

    Frame ranges are inclusive 0-based indices; amplitudes are in the task's unit (D or fraction).
    """
    n_rest, n_ramp = spec.frames_of(spec.rest_s), spec.frames_of(spec.ramp_s)
    n_hold, n_tail = spec.frames_of(spec.hold_s), spec.frames_of(spec.tail_s)
    ramp = [_smoothstep((k + 1) / (n_ramp + 1)) for k in range(n_ramp)]
    sched: list[int] = [-1] * n_rest
    alpha: list[float] = [0.0] * n_rest
    tasks = []
    rest = (0, n_rest - 1)
    for i, tm in enumerate(spec.motions):
        start = len(sched)
        sched += [i] * (2 * n_ramp + n_hold) + [-1] * n_tail
        alpha += ramp + [1.0] * n_hold + ramp[::-1] + [0.0] * n_tail
        peak = (start + n_ramp, start + n_ramp + n_hold - 1)
        entry = _task_truth(tm)
        entry.update(frames=[start, len(sched) - n_tail - 1], rest_frames=list(rest), peak_frames=list(peak))
        tasks.append(entry)
        rest = (len(sched) - n_tail, len(sched) - 1)
    warps, disps = [], []
    for tm in spec.motions:
        warps.append(task_warp(face, tm))
        disps.append(landmark_displacements(face, tm))
    truth = {
        "kind": "warp",
        "source": face.source,
        "fps": float(spec.fps),
        "n_frames": len(sched),
        "width": face.width,
        "height": face.height,
        "eye_distance_px": round(face.eye_distance, 3),
        "timeline": {
            "rest_s": spec.rest_s,
            "ramp_s": spec.ramp_s,
            "hold_s": spec.hold_s,
            "tail_s": spec.tail_s,
        },
        "tasks": tasks,
    }
    return Phantom(
        face, spec, np.asarray(sched, dtype=np.int32), np.asarray(alpha), truth, tuple(warps), tuple(disps)
    )


def render_photo_pair(face: SourceFace, motion: TaskMotion) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A rest photo and an expression photo at full amplitude, for the still-image path.

    Returns
    -------
    (rest, expression, truth)
        Two (H, W, 3) uint8 RGB images and ``{"kind": "warp_photo_pair", "source", "width", "height",
        "eye_distance_px", "task", "unit", "left", "right", "expected_asymmetry_index", "weaker_side"}``.
    """
    wf = task_warp(face, motion)
    truth = {
        "kind": "warp_photo_pair",
        "source": face.source,
        "width": face.width,
        "height": face.height,
        "eye_distance_px": round(face.eye_distance, 3),
        **_task_truth(motion),
    }
    return face.rgb.copy(), wf.apply(face.rgb, 1.0), truth


def _write_json(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def frames_with_head_motion(ph: Phantom, head_motion: Any = None) -> Iterator[np.ndarray]:
    """The phantom's frames with a :class:`service.phantom.head.HeadMotionSpec` laid over them (the mesh
    for yaw/pitch is the driving landmarks of each frame with the photo's FaceMesh depth)."""
    if head_motion is None or head_motion.still:
        return ph.frames()
    from service.phantom.head import apply_head_motion

    depth = ph.face.landmarks[:, 2]
    meshes = (np.column_stack([ph.expected_landmarks(k), depth]) for k in range(ph.n_frames))
    return apply_head_motion(ph.frames(), head_motion, ph.fps, ph.face.eye_distance, meshes)


def write_phantom(
    face: SourceFace, spec: PhantomSpec, out_path: str | Path, *, fmt: str = "mp4", head_motion: Any = None
) -> dict[str, Any]:
    """Render ``spec`` on ``face``, write the clip and its truth JSON beside it, return the truth.

    Parameters
    ----------
    head_motion
        A :class:`service.phantom.head.HeadMotionSpec` laid over the clip (rigid: the truth is unchanged;
        the truth JSON records it), or None.
    out_path
        The clip's path; the truth goes to ``out_path.with_suffix(".json")``.
    fmt
        "mp4" (H.264) or "dicom" (the same H.264 MP4 in a Video Photographic Image object whose Series
        Description names the tasks).
    """
    out_path = Path(out_path)
    if fmt not in ("mp4", "dicom"):
        raise InvalidParameterError(f"fmt must be 'mp4' or 'dicom', got {fmt!r}")
    ph = render(face, spec)
    if fmt == "mp4":
        from service.media.encode import write_mp4

        write_mp4(frames_with_head_motion(ph, head_motion), out_path, ph.fps)
    else:
        from service.media.dicom_io import build_video_photographic, write_dicom
        from service.media.encode import encode_mp4

        names = ", ".join(m.task.value for m in spec.motions)
        ds = build_video_photographic(
            encode_mp4(frames_with_head_motion(ph, head_motion), ph.fps),
            width=ph.width,
            height=ph.height,
            n_frames=ph.n_frames,
            fps=ph.fps,
            series_description=f"FaceSym phantom: {names}"[:64],
        )
        write_dicom(ds, out_path)
    truth = dict(ph.truth, format=fmt, file=out_path.name,
                 head_motion=None if head_motion is None else head_motion.to_json())
    _write_json(truth, out_path.with_suffix(".json"))
    return truth
