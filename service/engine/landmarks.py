"""MediaPipe FaceMesh → per-frame landmarks in pixels, with quality control.

Coordinates: x, y in pixels of the decoded frame (x right, y down); z is MediaPipe's relative depth
scaled by the frame width (same scale as x). 478 points with ``refine_landmarks=True`` (468 mesh + 10 iris).
Sides: MediaPipe's LEFT_* sets are the subject's (patient's) left (DESIGN.md, "Sides and coordinates").
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

N_LANDMARKS = 478


def _quiet_mediapipe() -> None:
    # MediaPipe's C++ side logs through glog to stderr; keep the CLI's output readable.
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


class FaceMeshDetector:
    """One MediaPipe FaceMesh graph. Video mode tracks across frames; static mode treats each image alone.

    Parameters
    ----------
    static
        True for unrelated stills (photos), False for consecutive video frames.
    max_faces
        Faces to look for; 2 so that a second face is *seen* and reported, not silently ignored.
    min_detection_confidence, min_tracking_confidence
        MediaPipe's thresholds in [0, 1].
    """

    def __init__(
        self,
        *,
        static: bool,
        max_faces: int = 2,
        min_detection_confidence: float = 0.5,
        min_tracking_confidence: float = 0.5,
    ) -> None:
        _quiet_mediapipe()
        import mediapipe as mp  # heavy import, only when a detector is built

        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=static,
            max_num_faces=max_faces,
            refine_landmarks=True,
            min_detection_confidence=min_detection_confidence,
            min_tracking_confidence=min_tracking_confidence,
        )

    def detect(self, rgb: np.ndarray) -> tuple[np.ndarray | None, int]:
        """Landmarks of the largest face in ``rgb`` (H, W, 3) uint8.

        Returns ((478, 3) float32 px or None, face count).
        """
        h, w = rgb.shape[:2]
        result = self._mesh.process(rgb)
        faces = result.multi_face_landmarks or []
        if not faces:
            return None, 0
        arrays = [
            np.array([(p.x * w, p.y * h, p.z * w) for p in face.landmark], dtype=np.float32) for face in faces
        ]
        # The largest face is the patient's when a second (smaller) face is in the background.
        sizes = [np.ptp(a[:, 0]) * np.ptp(a[:, 1]) for a in arrays]
        return arrays[int(np.argmax(sizes))], len(arrays)

    def close(self) -> None:
        self._mesh.close()

    def __enter__(self) -> FaceMeshDetector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def detect_image(rgb: np.ndarray) -> np.ndarray | None:
    """Landmarks (478, 3) px of the largest face in one still image, or None when there is no face."""
    with FaceMeshDetector(static=True) as det:
        points, _ = det.detect(rgb)
    return points


@dataclass
class LandmarkTrack:
    """Landmarks of a clip or photo set.

    Attributes
    ----------
    points
        (T, 478, 3) float32 pixel coordinates; NaN in frames without a usable face.
    faces
        (T,) int: number of faces MediaPipe found in each frame.
    times
        (T,) float seconds (presentation time of each frame).
    width, height
        Frame size in pixels.
    """

    points: np.ndarray
    faces: np.ndarray
    times: np.ndarray
    width: int
    height: int
    valid: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.valid = self.faces == 1

    @property
    def n_frames(self) -> int:
        return int(self.points.shape[0])


class TrackBuilder:
    """Accumulates per-frame detections into a :class:`LandmarkTrack` (O(T × 478) memory, no pixels)."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self._points: list[np.ndarray] = []
        self._faces: list[int] = []
        self._times: list[float] = []

    def add(self, points: np.ndarray | None, faces: int, time_s: float) -> None:
        if points is None:
            points = np.full((N_LANDMARKS, 3), np.nan, dtype=np.float32)
        self._points.append(points)
        self._faces.append(faces)
        self._times.append(time_s)

    def build(self) -> LandmarkTrack:
        pts = np.stack(self._points) if self._points else np.zeros((0, N_LANDMARKS, 3), np.float32)
        return LandmarkTrack(
            points=pts,
            faces=np.asarray(self._faces, dtype=np.int16),
            times=np.asarray(self._times, dtype=np.float64),
            width=self.width,
            height=self.height,
        )
