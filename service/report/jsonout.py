"""The analysis result as the documented JSON document (README, "JSON schema").

Later issues extend this document; they never rename a key.
"""

from __future__ import annotations

from typing import Any

from service import __version__
from service.domain import Analysis, MediaInfo, TaskResult


def _r(x: float) -> float:
    return round(float(x), 4)


def _num(x: float) -> float | None:
    """A JSON number, or null for NaN (JSON has no NaN)."""
    return None if x != x else round(float(x), 5)


def task_dict(t: TaskResult) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "task": t.task.value,
        "frames": list(t.frames),
        "rest_frames": list(t.rest_frames),
        "peak_frames": list(t.peak_frames),
        "unit": t.unit,
        "left": {"magnitude": _r(t.left)},
        "right": {"magnitude": _r(t.right)},
        "asymmetry_index": _r(t.asymmetry_index),
        "activation_gate": _r(t.activation_gate),
        **({"gate_thresholds": [_r(v) for v in t.gate_thresholds]} if t.gate_thresholds else {}),
        "asymmetry_score": round(t.asymmetry_score, 2),
        "cosine_index": _r(t.cosine_index),
        "cosine_score": round(t.cosine_score, 2),
        "weaker_side": t.weaker_side.value if t.weaker_side else None,
        "insufficient_activation": t.insufficient_activation,
        "method": t.method,
        "notes": list(t.notes),
    }
    if t.head_motion is not None:
        # The head's rigid motion removed before measuring and the residual of that fit (quality figure).
        doc["head_motion"] = t.head_motion.to_json()
    if t.grade is not None:
        doc["grade"] = {"label": t.grade.label, "expected_index": _r(t.grade.expected_index)}
    if t.series:
        # The measured signal per frame from rest_frames[0] on: [left, right] (null where not measured).
        doc["series"] = [[_num(a), _num(b)] for a, b in t.series]
    if t.flow:
        doc["flow"] = {
            "regions": {
                r.region: {"left": _r(r.left), "right": _r(r.right), "symmetry_score": _r(r.symmetry_score)}
                for r in t.flow
            }
        }
    return doc


def analysis_dict(
    analysis: Analysis, info: MediaInfo, frames: int, extra_inputs: list[str] | None = None
) -> dict[str, Any]:
    """The JSON document for one analysed input (``frames``: how many frames were decoded)."""
    q = analysis.quality
    doc: dict[str, Any] = {
        "facesym_version": __version__,
        "input": {
            "path": info.path,
            "frames": frames,
            "fps": _r(info.fps),
            "width": info.width,
            "height": info.height,
            "source": info.source,
        },
        "quality": {
            "ok": q.ok,
            "reasons": list(q.reasons),
            "valid_frames": q.valid_frames,
            "warnings": list(q.warnings),
        },
        "tasks": [task_dict(t) for t in analysis.tasks],
    }
    if analysis.grade is not None:
        # The worst task's grade; every report that shows it says which model and what it learnt from.
        doc["grade"] = analysis.grade.to_json()
    if extra_inputs:
        doc["input"]["expression_path"] = extra_inputs[0]
    if analysis.static:
        doc["static"] = {
            s.name: {"left": _r(s.left), "right": _r(s.right), "difference": _r(s.difference), "unit": "D"}
            for s in analysis.static
        }
    return doc
