"""Frozen value objects shared by every layer. No I/O, no pydicom.

Sides are always the PATIENT's (DESIGN.md, "Sides and coordinates").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import numpy as np


class Task(str, Enum):  # noqa: UP042 - StrEnum would change str()/format() output
    SMILE = "smile"
    EYE_CLOSURE = "eye_closure"
    BROW_RAISE = "brow_raise"

    @property
    def unit(self) -> str:
        """Unit of the task's movement signal: inter-eye distances or a fraction of the eye area."""
        return "fraction" if self is Task.EYE_CLOSURE else "D"


class Side(str, Enum):  # noqa: UP042 - StrEnum would change str()/format() output
    LEFT = "left"
    RIGHT = "right"


@dataclass(frozen=True)
class Frame:
    """One decoded picture: ``rgb`` is (H, W, 3) uint8, ``time_s`` its presentation time in seconds."""

    index: int
    time_s: float
    rgb: np.ndarray


@dataclass(frozen=True)
class MediaInfo:
    """What is known about a media source before its frames are decoded.

    ``frames`` is the container's frame count when it states one (may be None for streams);
    ``kind`` is "video" or "image"; ``source`` names the format ("mp4/h264", "dicom/video", "png", ...).
    """

    path: str
    kind: str
    width: int
    height: int
    fps: float
    frames: int | None
    source: str


class MediaSource(Protocol):
    """A decodable input: metadata now, frames streamed on demand (never the whole clip in memory)."""

    @property
    def info(self) -> MediaInfo: ...

    def frames(self) -> Iterator[Frame]: ...


@dataclass(frozen=True)
class Quality:
    """Quality-control verdict: ``ok`` False means "not analysable" and ``reasons`` says why.

    ``warnings`` are findings that did not stop the analysis (e.g. a face lost for a few frames).
    """

    ok: bool
    reasons: tuple[str, ...]
    warnings: tuple[str, ...]
    valid_frames: int
    total_frames: int


@dataclass(frozen=True)
class RegionSymmetry:
    """Regional optical-flow symmetry of one region ("forehead", "eye", "cheek"): the motion VS of the
    patient's left and right side (D/100 per frame) and the Symmetry Score SS in [0, 1]."""

    region: str
    left: float
    right: float
    symmetry_score: float


@dataclass(frozen=True)
class GradeResult:
    """One clip's grade.

    Attributes
    ----------
    label
        The most probable class (e.g. "III").
    probabilities
        Class → probability, in the model's class order (mildest first).
    model_version, trained_on
        Which model graded, and what it learnt from ("synthetic" for the shipped one).
    attention
        The stream-2 attention weights over the 96 resampled frames (sum 1): which frames mattered.
    """

    label: str
    probabilities: dict[str, float]
    model_version: str
    trained_on: str
    attention: list[float]

    @property
    def index(self) -> int:
        """0-based position of :attr:`label` in the class list."""
        return list(self.probabilities).index(self.label)

    @property
    def expected_index(self) -> float:
        """Σ p_k · k over the classes: a continuous grade (0 = mildest class)."""
        return float(sum(k * p for k, p in enumerate(self.probabilities.values())))

    def to_json(self) -> dict[str, Any]:
        """The CLI/report JSON: ``{"label", "probabilities", "model_version", "trained_on", "attention"}``."""
        return {
            "label": self.label,
            "probabilities": dict(self.probabilities),
            "model_version": self.model_version,
            "trained_on": self.trained_on,
            "attention": list(self.attention),
        }


@dataclass(frozen=True)
class HeadMotion:
    """The head's rigid motion during one task, removed before measuring, and what removing it left.

    All figures are relative to the task's rest pose, over the task's frames (rest → end of movement).

    Attributes
    ----------
    roll_deg, yaw_deg, pitch_deg
        Largest absolute rotation from rest about each axis, degrees (roll in the image plane; yaw and
        pitch out of it, from the FaceMesh 3-D mesh).
    scale_pct
        Largest absolute change of the head's apparent size from rest, percent.
    shift_d
        Largest translation of the head from rest, in D (inter-eye distances at rest).
    residual_d
        Quality figure: the 90th percentile over frames of the RMS distance, in D, between the
        expression-stable points as tracked and as the fitted rigid motion puts them (inliers only).
        Near 0 when the head moved rigidly and the fit removed it; large when it could not be removed.
    corrected
        False when the residual exceeded the limit: the result is flagged, not silently kept.
    """

    roll_deg: float
    yaw_deg: float
    pitch_deg: float
    scale_pct: float
    shift_d: float
    residual_d: float
    corrected: bool = True

    def to_json(self) -> dict[str, Any]:
        """``{"roll_deg", "yaw_deg", "pitch_deg", "scale_pct", "shift_d", "residual_d", "corrected"}``."""
        return {
            "roll_deg": round(self.roll_deg, 2),
            "yaw_deg": round(self.yaw_deg, 2),
            "pitch_deg": round(self.pitch_deg, 2),
            "scale_pct": round(self.scale_pct, 2),
            "shift_d": round(self.shift_d, 4),
            "residual_d": round(self.residual_d, 4),
            "corrected": self.corrected,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> HeadMotion:
        """The inverse of :meth:`to_json`."""
        return cls(
            float(obj["roll_deg"]), float(obj["yaw_deg"]), float(obj["pitch_deg"]),
            float(obj["scale_pct"]), float(obj["shift_d"]), float(obj["residual_d"]),
            bool(obj.get("corrected", True)),
        )


@dataclass(frozen=True)
class TaskResult:
    """The scores of one task (DESIGN.md, "Scores"). Magnitudes are per PATIENT side.

    Frame ranges are inclusive [first, last] indices into the analysed sequence. ``method`` is
    "pixels" (Lucas–Kanade motion under the landmarks) or "landmarks" (FaceMesh positions only).
    """

    task: Task
    frames: tuple[int, int]
    rest_frames: tuple[int, int]
    peak_frames: tuple[int, int]
    left: float
    right: float
    asymmetry_index: float
    activation_gate: float
    asymmetry_score: float
    cosine_index: float
    cosine_score: float
    weaker_side: Side | None
    method: str
    notes: tuple[str, ...] = ()
    flow: tuple[RegionSymmetry, ...] = ()
    #: The measured signal per frame, (left, right) in the task's unit, for frames rest_frames[0]..frames[1]
    #: (NaN where not measured): what the motion plot draws.
    series: tuple[tuple[float, float], ...] = ()
    #: The deep grader's grade of this task's segment (None when no grader ran).
    grade: GradeResult | None = None
    #: (a0, a1) the activation gate was computed with, in the task's unit (None: not recorded).
    gate_thresholds: tuple[float, float] | None = None
    #: The head motion removed before measuring and the residual of that fit (None: not measured, e.g.
    #: results stored before head-motion compensation existed).
    head_motion: HeadMotion | None = None

    @property
    def unit(self) -> str:
        return self.task.unit

    @property
    def insufficient_activation(self) -> bool:
        return self.activation_gate < 1.0


@dataclass(frozen=True)
class StaticItem:
    """A left-vs-right static measurement on a rest photo (Auto-eFACE static items), in D units."""

    name: str
    left: float
    right: float

    @property
    def difference(self) -> float:
        """left − right, in D (positive: the patient's left is higher / wider)."""
        return self.left - self.right


@dataclass(frozen=True, eq=False)
class FrameTrace:
    """Per-frame evidence behind a clip's result (kept only when asked for: ``--frames-csv``,
    ``--annotated``). T = decoded frames.

    Attributes
    ----------
    times
        (T,) presentation time of each frame, seconds.
    faces
        (T,) number of faces FaceMesh found.
    usable
        (T,) True where the frame counted for measurement (one face, pose within the QC limits).
    pose
        (T, 3) yaw, pitch, roll in degrees (:func:`service.engine.normalize.head_pose`; NaN without a face).
    points
        (T, 478, 3) landmarks in image pixels (x right, y down, z MediaPipe depth in pixels; NaN without
        one face).
    signals
        Per task, (T, 2) [left, right] landmark signal in the head's frame at rest (D, or a fraction of
        the eye area for eye closure); NaN in unusable frames. Empty when the clip was not analysable.
    """

    times: np.ndarray
    faces: np.ndarray
    usable: np.ndarray
    pose: np.ndarray
    points: np.ndarray
    signals: dict[Task, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Analysis:
    """What the engine says about one input (a clip, a photo pair or one photo)."""

    quality: Quality
    tasks: tuple[TaskResult, ...]
    static: tuple[StaticItem, ...] = ()
    #: Per-frame evidence of a clip, when the caller asked for it (never compared, never serialised).
    trace: FrameTrace | None = field(default=None, compare=False, repr=False)

    @property
    def grade(self) -> GradeResult | None:
        """The study-level grade: the worst (highest expected class) of the tasks' grades."""
        grades = [t.grade for t in self.tasks if t.grade is not None]
        return max(grades, key=lambda g: g.expected_index) if grades else None
