"""The one-sentence finding of a study, for every place that leads with it (the SR's impression, the
console's study page). Pure text. Sides are the PATIENT's. Example::

    Patient's left weaker: smile AI 0.62 (AS 38), brow raise AI 0.55 (AS 45); eye closure symmetric
    (AI 0.05, AS 95). Grade (deep grader): House-Brackmann III — facesym-grader 0.1.0, trained on
    synthetic data; research use only, not a diagnosis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TaskLine:
    """What the sentence needs of one scored task (from domain results or from stored JSON)."""

    task: str  # "smile", "eye_closure", "brow_raise"
    asymmetry_index: float
    asymmetry_score: float
    weaker_side: str | None  # "left" / "right" (the patient's) or None
    insufficient_activation: bool = False


def grade_statement(grade: Any) -> str:
    """What every report that shows a grade must say: which model, and what it learnt from
    (``grade``: anything with ``model_version`` and ``trained_on``)."""
    return (f"facesym-grader {grade.model_version}, trained on {grade.trained_on} data; "
            "research use only, not a diagnosis")


def _name(line: TaskLine) -> str:
    return line.task.replace("_", " ")


def finding_sentence(
    lines: Sequence[TaskLine], not_analysable: int = 0, grade: tuple[str, str] | None = None
) -> str:
    """Weaker sides with their tasks' AI and AS, then symmetric tasks, instances not analysable, and the
    grade (``(label, statement)``, the statement from :func:`grade_statement`)."""
    parts = []
    for side in ("left", "right"):
        weaker = [t for t in lines if t.weaker_side == side]
        if weaker:
            parts.append(f"patient's {side} weaker: " + ", ".join(
                f"{_name(t)} AI {t.asymmetry_index:.2f} (AS {t.asymmetry_score:.0f})"
                + (", insufficient activation" if t.insufficient_activation else "") for t in weaker))
    for t in lines:
        if t.weaker_side is None:
            extra = ", insufficient activation" if t.insufficient_activation else ""
            parts.append(f"{_name(t)} symmetric (AI {t.asymmetry_index:.2f}, "
                         f"AS {t.asymmetry_score:.0f}{extra})")
    text = "; ".join(parts) if parts else "no movement could be scored"
    text = text[0].upper() + text[1:] + "."
    if not_analysable:
        text += f" {not_analysable} instance{'s' if not_analysable != 1 else ''} not analysable."
    if grade is not None:
        text += f" Grade (deep grader): House-Brackmann {grade[0]} — {grade[1]}."
    return text


def impression(findings: Sequence[Any]) -> str:
    """:func:`finding_sentence` of :class:`service.report.sr.InstanceFinding`-like objects (an
    ``analysis`` each), with the worst task's grade."""
    tasks = [t for f in findings for t in f.analysis.tasks]
    lines = [TaskLine(t.task.value, t.asymmetry_index, t.asymmetry_score,
                      None if t.weaker_side is None else t.weaker_side.value, t.insufficient_activation)
             for t in tasks]
    graded = [t.grade for t in tasks if t.grade is not None]
    worst = max(graded, key=lambda g: g.expected_index) if graded else None
    bad = sum(1 for f in findings if not f.analysis.quality.ok)
    return finding_sentence(lines, bad, None if worst is None else (worst.label, grade_statement(worst)))


_GRADES = ("I", "II", "III", "IV", "V", "VI")


def finding_of_documents(docs: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> str | None:
    """:func:`finding_sentence` of stored results: ``docs`` the per-instance JSON documents (their
    ``quality`` and ``grade``), ``rows`` their task rows (``task``, ``asymmetry_index``,
    ``asymmetry_score``, ``weaker_side``, ``insufficient_activation``). None before any result."""
    if not docs:
        return None
    lines = [TaskLine(str(r["task"]), float(r["asymmetry_index"] or 0.0), float(r["asymmetry_score"] or 0.0),
                      r.get("weaker_side"), bool(r.get("insufficient_activation")))
             for r in rows if r.get("asymmetry_index") is not None and r.get("asymmetry_score") is not None]
    bad = sum(1 for d in docs if not (d.get("quality") or {}).get("ok", True))
    grades = [g for g in (d.get("grade") for d in docs) if isinstance(g, dict) and g.get("label") in _GRADES]
    worst = max(grades, key=lambda g: _GRADES.index(g["label"])) if grades else None
    grade = None
    if worst is not None:
        from types import SimpleNamespace

        grade = (str(worst["label"]), grade_statement(SimpleNamespace(
            model_version=worst.get("model_version", "?"), trained_on=worst.get("trained_on", "?"))))
    return finding_sentence(lines, bad, grade)
