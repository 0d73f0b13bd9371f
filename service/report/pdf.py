"""The study's PDF report: scores table, QC notes, versions, the research-use statement, the figures.

Drawn with matplotlib's PDF backend on A4 pages. All words are real PDF text (TrueType fonts embedded,
``pdf.fonttype`` 42), so ``pdftotext`` and a PACS's full-text index can read them; the figures are
embedded at their full resolution (zoom in a viewer to read their captions).

No PHI: the report names the study by its description and date only; instances by the caller's label.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure

from service import __version__
from service.domain import Analysis, Side, Task, TaskResult
from service.report.comparison import PriorStudy, changes, current_scores, iso_date, oldest_first
from service.report.figures import SIDE_RGB, TASK_TITLE, side_name
from service.report.head_motion import head_motion_text, not_corrected_text
from service.report.summary import impression

STATEMENT = "Research use only — not a diagnosis; weights trained on synthetic data"
TITLE = "FaceSym facial symmetry report"


@dataclass(frozen=True)
class ReportHeader:
    """Who and what the report is about, as the PACS holds it (a clinical report identifies its patient;
    the PDF goes back into the patient's own study). Empty strings are printed as "—"."""

    patient_name: str = ""
    patient_id: str = ""
    birth_date: str = ""  # DICOM DA or ISO
    sex: str = ""
    accession: str = ""
    study_time: str = ""  # DICOM TM
    referring_physician: str = ""

    @classmethod
    def from_dicom(cls, ds: Any) -> ReportHeader:
        """From a source instance's header (pydicom Dataset)."""
        def text(keyword: str) -> str:
            value = ds.get(keyword, "")
            return "" if value is None else str(value)

        def person(keyword: str) -> str:
            return " ".join(p for p in text(keyword).replace("^", " ").split() if p)

        return cls(person("PatientName"), text("PatientID"), text("PatientBirthDate"), text("PatientSex"),
                   text("AccessionNumber"), text("StudyTime"), person("ReferringPhysicianName"))

    def lines(self, study_date: str) -> list[str]:
        when = iso_date(study_date) or "—"
        tm = self.study_time.split(".")[0]
        if len(tm) >= 4 and tm[:4].isdigit():
            when += f" {tm[:2]}:{tm[2:4]}"
        return [
            f"Patient: {self.patient_name or '—'}    ID: {self.patient_id or '—'}    "
            f"Born: {iso_date(self.birth_date) or '—'}    Sex: {self.sex or '—'}",
            f"Accession: {self.accession or '—'}    Study date: {when}    "
            f"Referring physician: {self.referring_physician or '—'}",
        ]
PAGE_IN = (8.27, 11.69)  # A4 portrait, inches
_MARGIN = 0.6
_BOTTOM = 0.75  # footer zone
_REGIONS = ("forehead", "eye", "cheek")
#: The figures of one task: key image, flow overlay, motion plot (any subset), in that order.
#: Per (item label, task) the figures; anything ``np.asarray`` makes an (H, W, 3) uint8 image of (an
#: array, or :class:`service.report.study_images.Figure`).
FiguresByTask = Mapping[tuple[str, Task], Sequence[Any]]


class _Writer:
    """A top-down cursor over A4 pages (units: inches from the page's top-left corner)."""

    def __init__(self, pdf: PdfPages, footer: str) -> None:
        self.pdf, self.footer = pdf, footer
        self.fig: Figure | None = None
        self.y = 0.0
        self.pages = 0

    @property
    def width(self) -> float:
        return PAGE_IN[0] - 2 * _MARGIN

    def new_page(self) -> None:
        self.close_page()
        self.fig = Figure(figsize=PAGE_IN, dpi=100)
        self.pages += 1
        self.y = _MARGIN
        self._put(_MARGIN, PAGE_IN[1] - 0.4, f"{self.footer}   page {self.pages}", size=7.5, color="0.35")

    def close_page(self) -> None:
        if self.fig is not None:
            self.pdf.savefig(self.fig)
            self.fig = None

    def need(self, inches: float) -> None:
        if self.fig is None or self.y + inches > PAGE_IN[1] - _BOTTOM:
            self.new_page()

    def _put(self, x: float, y: float, s: str, *, size: float, weight: str = "normal", color: str = "black",
             ha: str = "left") -> None:
        assert self.fig is not None
        # Text from the input (labels, reasons quoting a decoder) is shown as it is: no mathtext ("$", "\\"
        # would be parsed as TeX and abort the page), control characters made visible.
        s = "".join(c if c.isprintable() else "\ufffd" for c in s)
        self.fig.text(x / PAGE_IN[0], 1 - y / PAGE_IN[1], s, fontsize=size, fontweight=weight, color=color,
                      ha=ha, va="top", parse_math=False)

    def line(self, s: str, *, size: float = 9.5, weight: str = "normal", color: str = "black",
             indent: float = 0.0, gap: float = 1.35) -> None:
        height = size * gap / 72
        self.need(height)
        self._put(_MARGIN + indent, self.y, s, size=size, weight=weight, color=color)
        self.y += height

    def wrapped(self, s: str, *, size: float = 9.5, indent: float = 0.0, weight: str = "normal",
                color: str = "black") -> None:
        chars = max(20, int((self.width - indent) * 72 / (0.55 * size)))
        for part in textwrap.wrap(s, chars, break_long_words=True) or [""]:
            self.line(part, size=size, indent=indent, weight=weight, color=color)

    def row(self, cells: Sequence[str], xs: Sequence[float], *, size: float = 8.5, weight: str = "normal",
            colors: Sequence[str] | None = None) -> None:
        height = size * 1.45 / 72
        self.need(height)
        for k, (cell, x) in enumerate(zip(cells, xs, strict=True)):
            colour = colors[k] if colors else "black"
            self._put(_MARGIN + x, self.y, cell, size=size, weight=weight, color=colour)
        self.y += height

    def rule(self) -> None:
        assert self.fig is not None
        y = 1 - (self.y + 0.02) / PAGE_IN[1]
        self.fig.add_artist(matplotlib.lines.Line2D(
            [_MARGIN / PAGE_IN[0], 1 - _MARGIN / PAGE_IN[0]], [y, y], color="0.6", linewidth=0.6))
        self.y += 0.06

    def space(self, inches: float) -> None:
        self.y += inches

    def images(self, images: Sequence[np.ndarray], height: float) -> None:
        """One row of images at a common ``height`` (inches), shrunk together to fit the width."""
        aspects = [im.shape[1] / im.shape[0] for im in images]
        gap = 0.1
        h = min(height, (self.width - gap * (len(images) - 1)) / sum(aspects))
        self.need(h)
        assert self.fig is not None
        x = _MARGIN
        for im, a in zip(images, aspects, strict=True):
            w = h * a
            box = (x / PAGE_IN[0], 1 - (self.y + h) / PAGE_IN[1], w / PAGE_IN[0], h / PAGE_IN[1])
            ax = self.fig.add_axes(box)
            ax.imshow(im, interpolation="none")
            ax.set_axis_off()
            x += w + gap
        self.y += h + 0.08


def _label(s: str, n: int = 30) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _flow_ss(task: TaskResult) -> str:
    ss = {r.region: r.symmetry_score for r in task.flow}
    if not ss:
        return "—"
    return "/".join(f"{ss[r]:.2f}" if r in ss else "—" for r in _REGIONS)


def _hex(rgb: tuple[int, int, int]) -> str:
    r, g, b = rgb
    return f"#{r:02x}{g:02x}{b:02x}"


_COLS = (0.0, 1.6, 2.4, 2.85, 3.3, 3.7, 4.2, 5.05, 5.75, 6.45)
_HEAD = ("Input", "Task", "AS", "CS", "AI", "gate", "weaker side", "L", "R", "flow SS")


def _scores(w: _Writer, findings: Sequence[tuple[str, Analysis]]) -> None:
    w.line("Scores per task", size=12.5, weight="bold", gap=1.6)
    w.row(_HEAD, _COLS, weight="bold")
    w.rule()
    any_task = False
    for label, analysis in findings:
        for task in analysis.tasks:
            any_task = True
            unit = "" if task.unit == "fraction" else f" {task.unit}"
            weaker = side_name(task.weaker_side).replace("patient's ", "")
            cells = (
                _label(label, 24),
                TASK_TITLE[task.task],
                f"{task.asymmetry_score:.1f}",
                f"{task.cosine_score:.1f}",
                f"{task.asymmetry_index:.2f}",
                f"{task.activation_gate:.2f}" + ("*" if task.insufficient_activation else ""),
                weaker,
                f"{task.left:.3f}{unit}",
                f"{task.right:.3f}{unit}",
                _flow_ss(task),
            )
            colours = ["black"] * len(cells)
            colours[7], colours[8] = _hex(SIDE_RGB[Side.LEFT]), _hex(SIDE_RGB[Side.RIGHT])
            w.row(cells, _COLS, colors=colours)
    if not any_task:
        w.line("No task could be scored in this study (see Quality control).", indent=0.1)
    for label, analysis in findings:
        for task in analysis.tasks:
            if task.head_motion is not None and not task.head_motion.corrected:
                warning = not_corrected_text(task.head_motion)
                w.wrapped(f"WARNING — {label}, {TASK_TITLE[task.task]}: {warning}", weight="bold",
                          color="#a00000")
    w.space(0.08)
    w.wrapped(
        "AS = Asymmetry Score and CS = Cosine Score (100 = symmetric movement, 0 = one side still); "
        "AI = Asymmetry Index |L − R| / max(L, R) (0 = symmetric); gate = activation gate (* below 1: "
        "insufficient activation, the scores are limited); L / R = the movement of the PATIENT's left / "
        "right side in the task's unit (D = inter-eye distances; eye closure as a fraction of the rest "
        "area); flow SS = optical-flow Symmetry Score per region, forehead / eye / cheek (1 = symmetric). "
        "Head motion (Quality control): the largest rigid head motion removed from rest before measuring, "
        "and the residual of that fit in D (near 0: removed cleanly).",
        size=8, color="0.25",
    )


def _static(w: _Writer, findings: Sequence[tuple[str, Analysis]]) -> None:
    rows = [(label, item) for label, a in findings for item in a.static]
    if not rows:
        return
    w.space(0.15)
    w.line("Static items (rest photos, D)", size=12.5, weight="bold", gap=1.6)
    cols = (0.0, 2.2, 4.4, 5.3, 6.2)
    w.row(("Input", "Item", "left", "right", "left − right"), cols, weight="bold")
    w.rule()
    for label, item in rows:
        w.row((_label(label, 36), item.name.replace("_", " "), f"{item.left:.3f}", f"{item.right:.3f}",
               f"{item.difference:+.3f}"), cols)


def _quality(w: _Writer, findings: Sequence[tuple[str, Analysis]]) -> None:
    w.space(0.15)
    w.line("Quality control", size=12.5, weight="bold", gap=1.6)
    for label, analysis in findings:
        q = analysis.quality
        frames = f" ({q.valid_frames} of {q.total_frames} frames usable)" if q.total_frames else ""
        verdict = "analysable" if q.ok else "NOT ANALYSABLE"
        w.wrapped(f"{label}: {verdict}{frames}", weight="bold" if not q.ok else "normal")
        for reason in q.reasons:
            w.wrapped(f"reason: {reason}", indent=0.25, color="#a00000")
        for warning in q.warnings:
            w.wrapped(f"warning: {warning}", indent=0.25)
        for task in analysis.tasks:
            if task.head_motion is not None:
                w.wrapped(f"{TASK_TITLE[task.task]} — Head motion: {head_motion_text(task.head_motion)}"
                          + ("" if task.head_motion.corrected else " (NOT corrected)"),
                          indent=0.25, color="black" if task.head_motion.corrected else "#a00000")
            for note in task.notes:
                w.wrapped(f"{TASK_TITLE[task.task]}: {note}", indent=0.25)


def _comparison(w: _Writer, findings: Sequence[tuple[str, Analysis]], priors: Sequence[PriorStudy]) -> None:
    """Before/after: each task's AS now against every earlier study (100 = symmetric)."""
    if not priors:
        return
    now = current_scores(analysis for _, analysis in findings)
    w.space(0.15)
    w.line("Comparison with earlier studies", size=12.5, weight="bold", gap=1.6)
    for prior in oldest_first(priors):
        parts = changes(prior, now)
        w.wrapped(f"{iso_date(prior.date, '—')} {prior.label or 'earlier study'}: "
                  + ("; ".join(parts) or "no common task"))
    w.wrapped("A positive change is a more symmetric face (100 = symmetric).", size=8, color="0.25")


def _versions(w: _Writer, engine_version: str, model_versions: Sequence[str]) -> None:
    w.space(0.15)
    w.line("Versions", size=12.5, weight="bold", gap=1.6)
    w.wrapped(f"FaceSym {__version__}; analysis engine {engine_version}")
    for model in model_versions:
        w.wrapped(f"model: {model}")
    w.space(0.05)
    w.wrapped(
        "Left and right are always the patient's. In the figures the patient's left is orange and "
        "labelled L, the right sky-blue and labelled R (for a frontal camera the patient's left is on the "
        "image's right).",
        size=8, color="0.25",
    )


def _figure_heading(label: str, task: TaskResult) -> str:
    """"Series 2 #1 Smile: AS 38.0, CS 41.2", the task named once (an input labelled after its task, as
    "Series 1 #1 Smile", is not followed by ": Smile" again)."""
    title = TASK_TITLE[task.task]
    named = label if label.lower().rstrip(" )").endswith(title.lower()) else f"{label}: {title}"
    return f"{named} (AS {task.asymmetry_score:.1f}, CS {task.cosine_score:.1f})"


def _figures(w: _Writer, findings: Sequence[tuple[str, Analysis]], figures: FiguresByTask) -> None:
    """A page per task, legible at print size: key image and flow overlay side by side (each about 3.4 in
    wide on A4), the motion plot below at the full text width."""
    blocks = [
        (label, task, [np.asarray(f) for f in figures.get((label, task.task), ())])
        for label, analysis in findings
        for task in analysis.tasks
    ]
    blocks = [b for b in blocks if b[2]]
    for k, (label, task, images) in enumerate(blocks):
        w.new_page()
        if k == 0:
            w.line("Figures", size=14, weight="bold", gap=1.6)
        w.line(_figure_heading(label, task), size=10, weight="bold")
        portrait = [im for im in images if im.shape[0] >= im.shape[1]]
        landscape = [im for im in images if im.shape[0] < im.shape[1]]
        for group in (portrait, landscape):
            if group:
                w.images(group, 4.6)
        w.space(0.1)


def render_pdf(
    findings: Sequence[tuple[str, Analysis]],
    figures_by_task: FiguresByTask,
    *,
    study_description: str,
    study_date: str,
    engine_version: str,
    model_versions: Sequence[str] = (),
    comparison: Sequence[PriorStudy] = (),
    header: ReportHeader | None = None,
) -> bytes:
    """The study's report as PDF bytes (A4; page 1: scores, QC, versions; then the figures).

    Parameters
    ----------
    findings
        (label, analysis) per analysed input, in report order; the label names the input in the report
        (e.g. "Series 2 #1 smile"): it must carry no PHI.
    figures_by_task
        The figures of each (label, task): key image, flow overlay, motion plot (see
        :mod:`service.report.figures`); a task without figures gets none.
    study_description, study_date
        Shown in the header (DICOM DA "YYYYMMDD" is printed as YYYY-MM-DD).
    engine_version, model_versions
        Printed under "Versions".
    header
        The patient and study identification printed at the top (:class:`ReportHeader`); None prints
        none (a report made outside a study).

    Returns
    -------
    bytes
        The PDF (its text is extractable; metadata holds no dates, so the same input gives the same bytes).
    """
    date = iso_date(study_date)
    buf = io.BytesIO()
    with matplotlib.rc_context({"pdf.fonttype": 42, "font.family": "DejaVu Sans"}):
        meta = {"Title": TITLE, "Creator": f"FaceSym {__version__}", "Producer": "FaceSym",
                "CreationDate": None}
        with PdfPages(buf, metadata=meta) as pdf:
            w = _Writer(pdf, f"FaceSym {engine_version} · {STATEMENT}")
            w.new_page()
            w.line(TITLE, size=18, weight="bold", gap=1.5)
            if header is not None:
                for text in header.lines(study_date):
                    w.line(text, size=10.5)
            w.line(f"Study: {study_description.strip() or '—'}    Date: {date or '—'}", size=10.5)
            w.space(0.05)
            w.wrapped(f"Finding: {impression([SimpleNamespace(analysis=a) for _, a in findings])}",
                      size=11, weight="bold")
            w.space(0.05)
            w.line(STATEMENT, size=11, weight="bold", color="#a00000")
            w.space(0.12)
            _scores(w, findings)
            _static(w, findings)
            _quality(w, findings)
            _comparison(w, findings, comparison)
            _versions(w, engine_version, model_versions)
            _figures(w, findings, figures_by_task)
            w.close_page()
    return buf.getvalue()
