"""The one-sentence finding of a study, for every place that leads with it (the SR's impression).

Pure text from domain objects. Sides are the PATIENT's. Example::

    Patient's left weaker: smile AI 0.62 (AS 38), brow raise AI 0.55 (AS 45); eye closure symmetric
    (AI 0.05, AS 95). Grade (deep grader): House-Brackmann III — facesym-grader 0.1.0, trained on
    synthetic data; research use only, not a diagnosis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.domain import Side, TaskResult


def _task_name(task: TaskResult) -> str:
    return task.task.value.replace("_", " ")


def _scored(task: TaskResult) -> str:
    text = f"{_task_name(task)} AI {task.asymmetry_index:.2f} (AS {task.asymmetry_score:.0f})"
    if task.insufficient_activation:
        text += ", insufficient activation"
    return text


def grade_statement(grade: Any) -> str:
    """What every report that shows a grade must say: which model, and what it learnt from."""
    return (f"facesym-grader {grade.model_version}, trained on {grade.trained_on} data; "
            "research use only, not a diagnosis")


def impression(findings: Sequence[Any]) -> str:
    """The study's finding in one sentence: weaker sides with their tasks' AI and AS, symmetric tasks,
    instances not analysable, and the worst grade with its caveat (:func:`grade_statement`).

    ``findings`` are :class:`service.report.sr.InstanceFinding`-like objects (an ``analysis`` each).
    """
    tasks = [t for f in findings for t in f.analysis.tasks]
    parts = []
    for side in (Side.LEFT, Side.RIGHT):
        weaker = [t for t in tasks if t.weaker_side is side]
        if weaker:
            parts.append(f"patient's {side.value} weaker: " + ", ".join(_scored(t) for t in weaker))
    for t in tasks:
        if t.weaker_side is None:
            extra = ", insufficient activation" if t.insufficient_activation else ""
            parts.append(f"{_task_name(t)} symmetric (AI {t.asymmetry_index:.2f}, AS "
                         f"{t.asymmetry_score:.0f}{extra})")
    text = "; ".join(parts) if parts else "no movement could be scored"
    text = text[0].upper() + text[1:] + "."
    bad = sum(1 for f in findings if not f.analysis.quality.ok)
    if bad:
        text += f" {bad} instance{'s' if bad != 1 else ''} not analysable."
    graded = [t.grade for t in tasks if t.grade is not None]
    if graded:
        worst = max(graded, key=lambda g: g.expected_index)
        text += f" Grade (deep grader): House-Brackmann {worst.label} — {grade_statement(worst)}."
    return text
