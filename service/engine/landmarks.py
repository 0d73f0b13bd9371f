"""MediaPipe FaceMesh → per-frame landmarks in pixels, with quality control.

Coordinates: x, y in pixels of the decoded frame (x right, y down); z is MediaPipe's relative depth
scaled by the frame width (same scale as x). 478 points with ``refine_landmarks=True`` (468 mesh + 10 iris).
Sides: MediaPipe's LEFT_* sets are the subject's (patient's) left (DESIGN.md, "Sides and coordinates").
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import IO

import numpy as np

log = logging.getLogger(__name__)

N_LANDMARKS = 478


def _quiet_mediapipe() -> None:
    # MediaPipe's C++ side logs through glog to stderr; keep the CLI's output readable.
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


#: What MediaPipe 0.10.21's C++ side writes to stderr on every graph start (absl logs before
#: absl::InitializeLog, which no environment variable turns off): known, harmless, at DEBUG instead.
_BENIGN_NATIVE = (
    "inference_feedback_manager.cc", "landmark_projection_calculator.cc",
    "All log messages before absl::InitializeLog()", "Created TensorFlow Lite XNNPACK delegate",
    "gl_context.cc", "face_landmarker_graph.cc",
)


class _NativeStderrFilter:
    """File descriptor 2 captured while any detector is starting (shared, counted: detectors may start in
    several threads at once); when the last one is up, lines from :data:`_BENIGN_NATIVE` go to the log
    at DEBUG and every other line back to the real stderr, unchanged (nothing is lost: a thread that
    wrote meanwhile is only delayed). MediaPipe's graph threads write after ``FaceMesh()`` returns and
    again on the first frame with a face, so the capture lasts until that frame, or at most
    :data:`_STARTUP_FRAMES` frames (the service's own stderr logging is delayed that long, never lost)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved: int | None = None
        self._capture: IO[bytes] | None = None

    def acquire(self) -> None:
        with self._lock:
            self._users += 1
            if self._users > 1:
                return
            try:
                sys.stderr.flush()
                self._saved = os.dup(2)
            except (OSError, ValueError):  # no usable fd 2 (embedded): nothing to filter
                self._saved = None
                return
            self._capture = tempfile.TemporaryFile()  # noqa: SIM115 - closed in release()
            os.dup2(self._capture.fileno(), 2)

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users > 0 or self._saved is None or self._capture is None:
                return
            os.dup2(self._saved, 2)
            os.close(self._saved)
            capture, self._saved, self._capture = self._capture, None, None
        with capture:
            capture.seek(0)
            for line in capture.read().decode("utf-8", "replace").splitlines(keepends=True):
                if any(mark in line for mark in _BENIGN_NATIVE):
                    log.debug("mediapipe: %s", line.rstrip())
                else:
                    os.write(2, line.encode("utf-8"))


_native_stderr = _NativeStderrFilter()
#: Frames after which a detector stops filtering stderr even if it has not seen a face yet.
_STARTUP_FRAMES = 30


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
        _native_stderr.acquire()  # released after the first face (or _STARTUP_FRAMES, or on close)
        self._starting = True
        self._frames = 0
        try:
            import mediapipe as mp  # heavy import, only when a detector is built

            self._mesh = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=static,
                max_num_faces=max_faces,
                refine_landmarks=True,
                min_detection_confidence=min_detection_confidence,
                min_tracking_confidence=min_tracking_confidence,
            )
        except BaseException:
            self._started()
            raise

    def _started(self) -> None:
        if self._starting:
            self._starting = False
            _native_stderr.release()

    def detect(self, rgb: np.ndarray) -> tuple[np.ndarray | None, int]:
        """Landmarks of the largest face in ``rgb`` (H, W, 3) uint8.

        Returns ((478, 3) float32 px or None, face count).
        """
        h, w = rgb.shape[:2]
        try:
            result = self._mesh.process(rgb)
        except BaseException:
            self._started()
            raise
        faces = result.multi_face_landmarks or []
        self._frames += 1
        if faces or self._frames >= _STARTUP_FRAMES:
            self._started()
        if not faces:
            return None, 0
        arrays = [
            np.array([(p.x * w, p.y * h, p.z * w) for p in face.landmark], dtype=np.float32) for face in faces
        ]
        # The largest face is the patient's when a second (smaller) face is in the background.
        sizes = [np.ptp(a[:, 0]) * np.ptp(a[:, 1]) for a in arrays]
        return arrays[int(np.argmax(sizes))], len(arrays)

    def close(self) -> None:
        self._started()
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
