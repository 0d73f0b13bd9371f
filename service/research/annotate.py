"""``--annotated OUT.mp4``: the clip with what FaceSym measured drawn on every frame.

Per frame: the analysed task and its phase (rest, movement, peak) and the time; the task's landmark
groups per patient side with rest → current arrows (rest landmarks mapped into the frame by a similarity
on stable landmarks, so head motion is not drawn as movement); "L"/"R" at the patient's eyes; live bars of
the measured per-side signal as a fraction of a full movement (the gate's a1). Colours are the reports'.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from service.domain import Analysis, Side, TaskResult
from service.engine import normalize as nz
from service.engine import tasks as tk
from service.errors import InvalidParameterError
from service.report.figures import SIDE_RGB, TASK_TITLE, rest_in_frame
from service.research.tables import task_phase

if TYPE_CHECKING:
    from service.media.limits import DecodeLimits

_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _text(
    img: np.ndarray, text: str, org: tuple[int, int], scale: float, colour: tuple[int, int, int]
) -> None:
    """Text with a dark outline, readable on any skin or background."""
    thick = max(1, int(round(2 * scale)))
    cv2.putText(img, text, org, _FONT, scale, (0, 0, 0), thick + 2, cv2.LINE_AA)
    cv2.putText(img, text, org, _FONT, scale, colour, thick, cv2.LINE_AA)


def _rest_points(analysis: Analysis, task: TaskResult) -> np.ndarray | None:
    trace = analysis.trace
    assert trace is not None
    a, b = task.rest_frames
    rows = [k for k in range(a, b + 1) if trace.usable[k]]
    if not rows:
        return None
    return np.asarray(np.nanmedian(trace.points[rows, :, :2], axis=0))


def _bars(img: np.ndarray, task: TaskResult, values: tuple[float, float], unit_px: float) -> None:
    """Two vertical bars, the patient's left and right signal now, on one scale: up to 1.2 × the larger
    side's measured magnitude (or the gate's full movement a1, marked "a1", if that is larger)."""
    full = task.gate_thresholds[1] if task.gate_thresholds else 0.0
    top = 1.2 * max(task.left, task.right, full, 1e-6)
    h, w = img.shape[:2]
    bar_h, bar_w = int(0.3 * h), max(8, int(0.03 * w))
    x0, y1 = w - 3 * bar_w - int(0.03 * w), int(0.1 * h) + bar_h
    scale = 0.4 + 0.6 * unit_px / 400
    for i, (side, value) in enumerate(((Side.LEFT, values[0]), (Side.RIGHT, values[1]))):
        x = x0 + int(1.6 * i * bar_w)
        cv2.rectangle(img, (x, y1 - bar_h), (x + bar_w, y1), (40, 40, 40), -1)
        if np.isfinite(value):
            frac = float(np.clip(value / top, 0.0, 1.0))
            cv2.rectangle(img, (x, y1 - int(frac * bar_h)), (x + bar_w, y1), SIDE_RGB[side], -1)
            _text(img, f"{value:.2f}", (x - int(4 * scale), y1 - bar_h - int(8 * scale)), 0.4 * scale,
                  SIDE_RGB[side])
        _text(img, "L" if side is Side.LEFT else "R", (x, y1 + int(25 * scale)), 0.6 * scale, SIDE_RGB[side])
    if full > 0:
        full_y = y1 - int(bar_h * full / top)
        cv2.line(img, (x0 - 2, full_y), (x0 + int(2.6 * bar_w) + 2, full_y), (255, 255, 255), 1)
        _text(img, "a1", (x0 - int(28 * scale), full_y + 5), 0.45 * scale, (255, 255, 255))
    _text(img, task.unit, (x0, y1 + int(48 * scale)), 0.45 * scale, (230, 230, 230))


def annotate_frame(
    rgb: np.ndarray, k: int, analysis: Analysis, rest_cache: dict[int, np.ndarray | None]
) -> np.ndarray:
    """Frame ``k`` (H, W, 3 uint8 RGB, as decoded for the analysis) with the measurement drawn on it."""
    trace = analysis.trace
    if trace is None:
        raise InvalidParameterError("the analysis kept no per-frame trace (analyze_frames(keep_trace=True))")
    img = np.ascontiguousarray(rgb.copy())
    h, w = img.shape[:2]
    unit = float(min(h, w))
    scale = 0.4 + 0.6 * unit / 400
    task, phase = task_phase(analysis.tasks, k)
    time_s = float(trace.times[k]) if k < len(trace.times) else float("nan")
    label = f"{TASK_TITLE[task.task]}: {phase}" if task is not None else "no task here"
    _text(img, label, (int(0.02 * w), int(0.06 * h)), 0.8 * scale, (255, 255, 255))
    _text(img, f"frame {k}  {time_s:.2f} s  (sides: the patient's)",
          (int(0.02 * w), int(0.06 * h + 32 * scale)), 0.5 * scale, (230, 230, 230))
    points = trace.points[k, :, :2] if k < len(trace.points) else None
    if points is None or not np.isfinite(points).all():
        _text(img, "no face", (int(0.02 * w), int(0.06 * h + 64 * scale)), 0.6 * scale, (255, 80, 80))
        return img
    d = float(np.linalg.norm(np.subtract(*nz.eye_centres(points[None])).ravel()))
    for side, eye in ((Side.LEFT, nz.LEFT_EYE_CONTOUR), (Side.RIGHT, nz.RIGHT_EYE_CONTOUR)):
        cx, cy = points[list(eye)].mean(axis=0)
        outer = cx + 0.9 * (cx - points[nz.NOSE_TIP, 0])
        _text(img, "L" if side is Side.LEFT else "R", (int(outer), int(cy - 0.5 * d)), 0.9 * scale,
              SIDE_RGB[side])
    if task is None:
        return img
    key = task.rest_frames[0]
    if key not in rest_cache:
        rest_cache[key] = _rest_points(analysis, task)
    rest = rest_cache[key]
    left_idx, right_idx = tk.groups(task.task)
    radius = max(2, int(round(0.025 * d)))
    mapped = rest_in_frame(rest, points) if rest is not None else None
    for side, idx in ((Side.LEFT, left_idx), (Side.RIGHT, right_idx)):
        colour = SIDE_RGB[side]
        for i in idx:
            p = tuple(int(round(v)) for v in points[i])
            if mapped is not None and np.hypot(*(points[i] - mapped[i])) > 1.0:
                q = tuple(int(round(v)) for v in mapped[i])
                cv2.arrowedLine(img, q, p, colour, max(1, radius // 2), cv2.LINE_AA, tipLength=0.3)
            cv2.circle(img, p, radius, colour, -1, cv2.LINE_AA)
            cv2.circle(img, p, radius, (0, 0, 0), 1, cv2.LINE_AA)
    j = k - task.rest_frames[0]
    values = task.series[j] if 0 <= j < len(task.series) else (float("nan"), float("nan"))
    _bars(img, task, values, unit)
    return img


def annotated_frames(frames: Iterator[np.ndarray], analysis: Analysis) -> Iterator[np.ndarray]:
    """Every decoded frame annotated (:func:`annotate_frame`), padded to even width and height for
    H.264's 4:2:0 chroma."""
    cache: dict[int, np.ndarray | None] = {}
    for k, rgb in enumerate(frames):
        img = annotate_frame(rgb, k, analysis, cache)
        h, w = img.shape[:2]
        if h % 2 or w % 2:
            img = cv2.copyMakeBorder(img, 0, h % 2, 0, w % 2, cv2.BORDER_REPLICATE)
        yield img


def write_annotated(
    path: str, analysis: Analysis, fps: float, out: Path, *, mirrored: bool = False,
    limits: DecodeLimits | None = None,
) -> Path:
    """Decode the clip at ``path`` again (as it was decoded for ``analysis``) and write the annotated
    H.264 MP4 to ``out`` (same frame count and rate)."""
    from service.media.decode import open_media
    from service.media.encode import write_mp4

    source = open_media(path, mirrored=mirrored, limits=limits)
    return write_mp4(annotated_frames((f.rgb for f in source.frames()), analysis), out, fps or 25.0, crf=23)
