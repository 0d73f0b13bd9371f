"""Before/after: a study's scores against the same patient's earlier analysed studies.

Shared by the PDF report and the FHIR DiagnosticReport conclusion, so both say the same thing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from service.domain import Analysis


@dataclass(frozen=True)
class PriorStudy:
    """An earlier analysed study of the same patient: its date (DICOM DA), label (StudyDescription, e.g.
    "pre-op") and Asymmetry Score per task."""

    date: str
    label: str
    asymmetry_scores: Mapping[str, float]


def iso_date(da: str, missing: str = "") -> str:
    """DICOM DA "YYYYMMDD" as YYYY-MM-DD; anything else as given (``missing`` when empty)."""
    d = da.strip()
    return f"{d[:4]}-{d[4:6]}-{d[6:]}" if len(d) == 8 and d.isdigit() else (d or missing)


def current_scores(analyses: Iterable[Analysis]) -> dict[str, float]:
    """Task → Asymmetry Score of this study (the first analysis that scored the task)."""
    now: dict[str, float] = {}
    for analysis in analyses:
        for t in analysis.tasks:
            now.setdefault(t.task.value, t.asymmetry_score)
    return now


def changes(prior: PriorStudy, now: Mapping[str, float]) -> list[str]:
    """"smile AS 31 → 78 (+47)" for each task scored in both studies (100 = symmetric)."""
    return [
        f"{task.replace('_', ' ')} AS {before:.0f} → {now[task]:.0f} ({now[task] - before:+.0f})"
        for task, before in prior.asymmetry_scores.items()
        if task in now
    ]


def oldest_first(priors: Sequence[PriorStudy]) -> list[PriorStudy]:
    return sorted(priors, key=lambda p: p.date)


def comparison_text(analyses: Iterable[Analysis], priors: Sequence[PriorStudy]) -> str:
    """" Compared with 2024-01-08 pre-op: smile AS 31 → 78 (+47)." for each earlier study of the patient
    that scored a task this study scored too (oldest first; empty without any)."""
    now = current_scores(analyses)
    out = []
    for prior in oldest_first(priors):
        parts = changes(prior, now)
        if parts:
            heading = f" Compared with {iso_date(prior.date)} {prior.label}".rstrip()
            out.append(f"{heading}: {'; '.join(parts)}.")
    return "".join(out)
