"""The tables a researcher opens in a spreadsheet or pandas: ``summary.csv`` (one row per input × task,
from the JSON documents) and the per-frame CSV of one clip (README, "Research outputs").

Sides are the patient's. Empty cells are values that were not measured (NaN, no face, no flow).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.domain import Analysis, Task, TaskResult
from service.engine.flow import REGIONS

SUMMARY_COLUMNS: tuple[str, ...] = (
    "input", "expression_input", "task", "asymmetry_index", "asymmetry_score", "cosine_index",
    "cosine_score", "left", "right", "unit", "activation_gate", "insufficient_activation", "weaker_side",
    "method", *(f"flow_ss_{r}" for r in REGIONS), "grade", "grade_expected_index", "qc_ok", "qc_reasons",
    "qc_warnings", "head_residual_d", "head_motion_corrected", "notes", "frames", "peak_frames",
    "facesym_version", "result_json",
)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "" if value != value else repr(value)  # repr: the JSON's number, digit for digit
    if isinstance(value, (list, tuple)):
        return "–".join(str(v) for v in value)
    return str(value)


def summary_rows(doc: dict[str, Any], input_name: str, result_json: str = "") -> list[dict[str, str]]:
    """The summary rows of one result document: one per task; an input without tasks (not analysable,
    or a lone rest photo) one row with the task empty and the QC reasons."""
    q = doc.get("quality", {})
    base = {
        "input": input_name,
        "expression_input": doc.get("input", {}).get("expression_path"),
        "qc_ok": bool(q.get("ok")),
        "qc_reasons": "; ".join(q.get("reasons", [])),
        "qc_warnings": "; ".join(q.get("warnings", [])),
        "facesym_version": doc.get("facesym_version"),
        "result_json": result_json,
    }
    rows = []
    for t in doc.get("tasks", []):
        head = t.get("head_motion") or {}
        regions = (t.get("flow") or {}).get("regions", {})
        grade = t.get("grade") or {}
        rows.append({
            **base,
            "task": t["task"], "asymmetry_index": t["asymmetry_index"],
            "asymmetry_score": t["asymmetry_score"],
            "cosine_index": t["cosine_index"], "cosine_score": t["cosine_score"],
            "left": t["left"]["magnitude"], "right": t["right"]["magnitude"], "unit": t["unit"],
            "activation_gate": t["activation_gate"], "insufficient_activation": t["insufficient_activation"],
            "weaker_side": t["weaker_side"] or "none", "method": t["method"],
            **{f"flow_ss_{r}": (regions.get(r) or {}).get("symmetry_score") for r in REGIONS},
            "grade": grade.get("label"), "grade_expected_index": grade.get("expected_index"),
            "head_residual_d": head.get("residual_d"), "head_motion_corrected": head.get("corrected"),
            "notes": "; ".join(t.get("notes", [])), "frames": t["frames"], "peak_frames": t["peak_frames"],
        })
    if not rows:
        rows.append({**base, "notes": "no task scored"})
    return [{c: _cell(r.get(c)) for c in SUMMARY_COLUMNS} for r in rows]


def write_summary_csv(rows: Iterable[dict[str, str]], path: Path) -> Path:
    """Write summary rows (:func:`summary_rows`) to ``path`` whole or not at all."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(SUMMARY_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------- per frame
LANDMARKS = 478


def frame_columns() -> list[str]:
    """The per-frame CSV's header: see :func:`write_frames_csv`."""
    signals = [f"{t.value}_{side}" for t in Task for side in ("left", "right")]
    marks = [f"{axis}_{i}" for axis in "xyz" for i in range(LANDMARKS)]
    return ["frame", "time_s", "faces", "usable", "qc", "yaw_deg", "pitch_deg", "roll_deg", *signals,
            "task", "phase", "measured_left", "measured_right", *marks]


def task_phase(tasks: Sequence[TaskResult], k: int) -> tuple[TaskResult | None, str]:
    """The analysed task frame ``k`` belongs to and its phase there (rest, movement, peak), or (None, "")."""
    for t in tasks:
        if t.peak_frames[0] <= k <= t.peak_frames[1]:
            return t, "peak"
    for t in tasks:
        if t.frames[0] <= k <= t.frames[1]:
            return t, "movement"
    for t in tasks:
        if t.rest_frames[0] <= k <= t.rest_frames[1]:
            return t, "rest"
    return None, ""


def _qc(faces: int, usable: bool) -> str:
    if usable:
        return "ok"
    if faces == 0:
        return "no face"
    if faces > 1:
        return "several faces"
    return "pose beyond the QC limits"


def _fmt(values: np.ndarray, digits: int) -> list[str]:
    return ["" if not np.isfinite(v) else f"{v:.{digits}f}" for v in values]


def write_frames_csv(analysis: Analysis, path: Path) -> Path:
    """One row per decoded frame of a clip (wide format, like OpenFace's CSV).

    Columns: ``frame`` (0-based), ``time_s``; quality control: ``faces`` found, ``usable`` (counted for
    measurement), ``qc`` (ok, no face, several faces, pose beyond the QC limits); head pose ``yaw_deg``,
    ``pitch_deg``, ``roll_deg`` (positive: turned toward / tilted to the patient's left, looking up);
    the three landmark signals per side in the head's frame at rest (``smile_left`` … ``brow_raise_right``:
    D, eye closure a fraction of the eye area); the analysed ``task`` the frame belongs to, its ``phase``
    (rest, movement, peak) and the task's measured per-side signal there (``measured_left``,
    ``measured_right``: the series the scores come from, pixel-tracked when the method is ``pixels``);
    then the 478 FaceMesh landmarks in image pixels, ``x_0`` … ``x_477``, ``y_0`` … ``y_477`` (y down),
    ``z_0`` … ``z_477`` (MediaPipe depth in the same pixels, smaller = nearer the camera). Needs
    ``Analysis.trace`` (``analyze_frames(keep_trace=True)``).
    """
    from service.errors import InvalidParameterError

    trace = analysis.trace
    if trace is None:
        raise InvalidParameterError("the analysis kept no per-frame trace (analyze_frames(keep_trace=True))")
    n = len(trace.times)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(frame_columns())
    # (T, 6) [smile L, R, eye closure L, R, brow raise L, R]; NaN throughout when not analysable.
    signals = np.column_stack([trace.signals.get(t, np.full((n, 2), np.nan)) for t in Task])
    for k in range(n):
        task, phase = task_phase(analysis.tasks, k)
        j = k - task.rest_frames[0] if task is not None else -1
        own = task.series[j] if task is not None and 0 <= j < len(task.series) else (np.nan, np.nan)
        writer.writerow([
            k, f"{trace.times[k]:.4f}", int(trace.faces[k]), "true" if trace.usable[k] else "false",
            _qc(int(trace.faces[k]), bool(trace.usable[k])), *_fmt(trace.pose[k], 2), *_fmt(signals[k], 5),
            task.task.value if task else "", phase, *_fmt(np.asarray(own, float), 5),
            *_fmt(trace.points[k].T.ravel(), 2),
        ])
    path.write_text(buf.getvalue())
    return path
