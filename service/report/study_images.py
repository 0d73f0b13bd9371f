"""From a study's analyses to the objects that go back to the PACS with the SR: the figures as Secondary
Capture images and the PDF report as Encapsulated PDF (and the PDF bytes for ``facesym report --pdf``).

For each analysed task of a video, the rest and peak frames are decoded again from the source file
(frame indices from the :class:`~service.domain.TaskResult`), their landmarks found with FaceMesh in
still mode, and the key image, motion plot and (when measured) optical-flow overlay drawn. An expression
photo gets a key image against the study's rest photo (the last one in study order, as the worker pairs
them); a photo without one gets no figure, but its scores are still in the PDF.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from service.domain import Analysis, HeadMotion, Quality, RegionSymmetry, Side, StaticItem, Task, TaskResult
from service.engine.scores import GateThresholds
from service.errors import FaceSymError
from service.media.dicom_io import DEFER_SIZE
from service.report import figures as fg
from service.report.comparison import PriorStudy
from service.report.pdf import ReportHeader, render_pdf
from service.report.secondary import build_encapsulated_pdf, build_sc_images
from service.report.sr import content_digest
from service.report.sr_regions import KeyImageRegions

log = logging.getLogger(__name__)

#: (a0, a1) or the engine's GateThresholds.
GateLike = tuple[float, float] | GateThresholds


@dataclass(frozen=True)
class StudyItem:
    """One analysed input of the study, as the figures need it.

    Attributes
    ----------
    label
        How the report names the input (no PHI), e.g. "Series 2 #1 (smile)".
    path
        The source file (DICOM, video or photo).
    analysis
        The engine's result for it.
    fps
        Frame rate (0 for photos).
    rest_path
        For an expression photo: the rest photo it was scored against (None: no key image).
    attention
        Optional grader attention per task, drawn on the motion plot.
    """

    label: str
    path: Path
    analysis: Analysis
    fps: float
    rest_path: Path | None = None
    attention: Mapping[Task, Sequence[float]] = field(default_factory=dict)
    sop_instance_uid: str = ""


@dataclass(frozen=True)
class Figure:
    """One figure and what it shows: ``kind`` is "key" (rest→peak key image), "flow" (optical-flow
    overlay) or "motion" (per-side signal plot). ``np.asarray(figure)`` is the (H, W, 3) uint8 image."""

    kind: str
    image: np.ndarray
    #: Key images: where the landmark groups and arrows are drawn (:func:`figures.key_image_with_marks`).
    marks: fg.Marks | None = None

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.image if dtype is None else self.image.astype(dtype)


#: Captions for the web console and anyone listing the figures.
FIGURE_CAPTIONS = {
    "key": "Key image: rest → peak displacement per side",
    "flow": "Optical-flow overlay by region",
    "motion": "Motion plot: per-side signal over time",
}


@dataclass(frozen=True)
class ReportObjects:
    """What :func:`render_report_objects` makes: the DICOM datasets, the PDF and the figures."""

    datasets: list[pydicom.Dataset]
    pdf: bytes
    figures: dict[tuple[str, Task], list[Figure]]
    #: Where each task's landmark groups lie on its key image, for the SR's SCOORDs.
    regions: list[KeyImageRegions] = field(default_factory=list)


def _gate(value: GateLike) -> tuple[float, float]:
    if isinstance(value, GateThresholds):
        return float(value.a0), float(value.a1)
    a0, a1 = value
    return float(a0), float(a1)


def _default_gates() -> dict[Task, tuple[float, float]]:
    from service.engine.pipeline import EngineParams

    return {t: _gate(g) for t, g in EngineParams().gates.items()}


def _frames(path: Path, wanted: set[int]) -> dict[int, np.ndarray]:
    """Decode ``path`` once, keeping the frames whose 0-based position is in ``wanted``."""
    from service.media.decode import open_media

    out: dict[int, np.ndarray] = {}
    if not wanted:
        return out
    last = max(wanted)
    for k, frame in enumerate(open_media(path).frames()):
        if k in wanted:
            out[k] = frame.rgb
        if k >= last:
            break
    return out


def _mid(r: tuple[int, int]) -> int:
    return (int(r[0]) + int(r[1])) // 2


class _Landmarks:
    """FaceMesh in still mode, one graph for the whole study (cached per (path, frame))."""

    def __init__(self) -> None:
        from service.engine.landmarks import FaceMeshDetector

        self._det = FaceMeshDetector(static=True, max_faces=1)

    def __call__(self, rgb: np.ndarray) -> np.ndarray | None:
        points, _ = self._det.detect(rgb)
        return None if points is None else points[:, :2]

    def close(self) -> None:
        self._det.close()


def _video_figures(
    item: StudyItem, det: _Landmarks, gates: Mapping[Task, tuple[float, float]]
) -> dict[Task, list[Figure]]:
    tasks = item.analysis.tasks
    wanted = {_mid(t.rest_frames) for t in tasks} | {_mid(t.peak_frames) for t in tasks}
    frames = _frames(item.path, wanted)
    points = {k: det(rgb) for k, rgb in frames.items()}
    out: dict[Task, list[Figure]] = {}
    for task in tasks:
        rest_k, peak_k = _mid(task.rest_frames), _mid(task.peak_frames)
        rest_p, peak_p = points.get(rest_k), points.get(peak_k)
        figs: list[Figure] = []
        if rest_p is not None and peak_p is not None:
            figs.append(Figure("key", *fg.key_image_with_marks(frames[peak_k], rest_p, peak_p, task)))
            if task.flow:
                figs.append(Figure("flow", fg.flow_overlay(frames[rest_k], rest_p, task)))
        else:
            log.warning("%s %s: no face found in frame %d or %d; no key image",
                        item.label, task.task.value, rest_k, peak_k)
        if task.series:
            # The thresholds the result was scored with, when it says so (older results: the settings').
            thresholds = task.gate_thresholds or gates[task.task]
            figs.append(Figure("motion", fg.motion_plot(task, item.fps, thresholds,
                                                        item.attention.get(task.task))))
        out[task.task] = figs
    return out


def _photo_figures(item: StudyItem, det: _Landmarks) -> dict[Task, list[Figure]]:
    if item.rest_path is None:
        return {}
    from service.media.decode import open_media

    rest = next(iter(open_media(item.rest_path).frames())).rgb
    expression = next(iter(open_media(item.path).frames())).rgb
    rest_p, expr_p = det(rest), det(expression)
    if rest_p is None or expr_p is None:
        log.warning("%s: no face found in the rest or expression photo; no key image", item.label)
        return {}
    return {t.task: [Figure("key", *fg.key_image_with_marks(expression, rest_p, expr_p, t))]
            for t in item.analysis.tasks}


def figures_by_task(
    items: Sequence[StudyItem], gates: Mapping[Task, GateLike] | None = None
) -> dict[tuple[str, Task], list[Figure]]:
    """The figures of every analysed task, keyed by (item label, task): key image, flow overlay (when the
    task has optical-flow results), motion plot (when it has a per-frame series). A source that cannot
    be decoded again, or whose faces are not found, gets fewer figures (logged), never an exception."""
    g = _default_gates()
    g.update({t: _gate(v) for t, v in (gates or {}).items()})
    out: dict[tuple[str, Task], list[Figure]] = {}
    if not any(i.analysis.tasks for i in items):
        return out
    det = _Landmarks()
    try:
        for item in items:
            if not item.analysis.tasks:
                continue
            try:
                # The worker gives photos fps 0.
                figs = _photo_figures(item, det) if item.fps <= 0 else _video_figures(item, det, g)
            except (FaceSymError, OSError, ValueError) as exc:
                log.warning("%s: figures not drawn: %s", item.label, exc)
                continue
            for task, images in figs.items():
                if images:
                    out[(item.label, task)] = images
    finally:
        det.close()
    return out


def render_study_figures(
    results: Sequence[StudyItem], gates: Mapping[Task, GateLike] | None = None
) -> list[np.ndarray]:
    """Every figure of the study in report order (per item, per task: key image, flow overlay, motion)."""
    figs = figures_by_task(results, gates)
    return [f.image for item in results for t in item.analysis.tasks
            for f in figs.get((item.label, t.task), [])]


# ------------------------------------------------------------------------------------------ study
def _header_value(ds: pydicom.Dataset, keyword: str) -> Any:
    """An attribute of a source header, or None when it is absent or malformed (an IS of "inf")."""
    try:
        return ds.get(keyword)
    except Exception:  # pydicom cannot convert the value: the label does without it
        return None


def _label(ds: pydicom.Dataset, k: int) -> str:
    series = _header_value(ds, "SeriesNumber")
    inst = _header_value(ds, "InstanceNumber")
    desc = str(_header_value(ds, "SeriesDescription") or "").strip()
    series = "?" if series in (None, "") else series
    inst = k + 1 if inst in (None, "") else inst
    base = f"Series {series} #{inst}"
    return f"{base} {desc[:24]}".strip()


def study_items(
    source_paths: Sequence[Path],
    analyses: Sequence[tuple[str, Analysis, float]],
    headers: Sequence[pydicom.Dataset] | None = None,
) -> list[StudyItem]:
    """StudyItems for the analyses ((SOP Instance UID, analysis, fps)) of the study's source files."""
    headers = list(headers) if headers is not None else [
        pydicom.dcmread(p, stop_before_pixels=True, defer_size=DEFER_SIZE) for p in source_paths
    ]
    by_uid = {str(ds.SOPInstanceUID): (Path(p), ds, k)
              for k, (p, ds) in enumerate(zip(source_paths, headers, strict=True))}
    # The worker pairs an expression photo with the study's last rest photo (a photo with static items
    # only); the same rule finds it here.
    rest_photo: Path | None = None
    for uid, analysis, fps in analyses:
        if uid in by_uid and fps <= 0 and analysis.static and not analysis.tasks:
            rest_photo = by_uid[uid][0]
    items = []
    seen: dict[str, int] = {}
    for uid, analysis, fps in analyses:
        if uid not in by_uid:
            raise ValueError(f"analysis for SOP instance {uid} has no source file")
        path, ds, k = by_uid[uid]
        label = _label(ds, k)
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{label} ({seen[label]})"
        rest = rest_photo if fps <= 0 and analysis.tasks and rest_photo != path else None
        items.append(StudyItem(label, path, analysis, float(fps), rest, sop_instance_uid=uid))
    return items


def render_report_objects(
    source_paths: Sequence[Path],
    analyses: Sequence[tuple[str, Analysis, float]],
    *,
    engine_version: str,
    gates: Mapping[Task, GateLike] | None = None,
    model_versions: Sequence[str] = (),
    comparison: Sequence[PriorStudy] = (),
) -> ReportObjects:
    """The SC images and Encapsulated PDF of a study (not written) and the PDF bytes.

    ``source_paths`` are every source file of the study (the SR's evidence); ``analyses`` are
    (SOP Instance UID, Analysis, fps) per analysed source.
    """
    started = time.perf_counter()
    paths = [Path(p) for p in source_paths]
    headers = [pydicom.dcmread(p, stop_before_pixels=True, defer_size=DEFER_SIZE) for p in paths]
    if not headers:
        raise ValueError("source_paths is empty")
    items = study_items(paths, analyses, headers)
    figs = figures_by_task(items, gates)
    placed = [(it, t.task, f)
              for it in items for t in it.analysis.tasks for f in figs.get((it.label, t.task), [])]
    ordered = [f.image for _, _, f in placed]
    first = headers[0]
    pdf = render_pdf(
        [(it.label, it.analysis) for it in items],
        figs,
        study_description=str(first.get("StudyDescription", "") or ""),
        study_date=str(first.get("StudyDate", "") or ""),
        engine_version=engine_version,
        model_versions=model_versions,
        comparison=comparison,
        header=ReportHeader.from_dicom(first),
    )
    uids = [str(ds.SOPInstanceUID) for ds in headers]
    classes = {str(ds.SOPInstanceUID): str(ds.SOPClassUID) for ds in headers}
    # New content (a corrected name, other results) gets new SOP Instance UIDs; the same content the same.
    content = content_digest(headers, [a for _, a, _ in analyses], list(comparison))
    datasets = build_sc_images(ordered, first, engine_version=engine_version, source_sop_uids=uids,
                               source_classes=classes, content=content)
    regions = [KeyImageRegions(it.sop_instance_uid, task, ds, f.marks)
               for (it, task, f), ds in zip(placed, datasets, strict=True)
               if f.kind == "key" and f.marks is not None and it.sop_instance_uid]
    datasets.append(build_encapsulated_pdf(pdf, first, engine_version=engine_version,
                                           source_sop_uids=uids, source_classes=classes, content=content))
    log.info("report objects: %d figure(s), PDF %d bytes, %.0f ms", len(ordered), len(pdf),
             1000 * (time.perf_counter() - started))
    return ReportObjects(datasets, pdf, figs, regions)


@dataclass(frozen=True)
class WrittenObjects:
    """What :func:`build_report_objects` wrote: the files, and where each task's landmark groups lie on
    its key image (for the SR's SCOORDs)."""

    paths: list[Path]
    regions: list[KeyImageRegions] = field(default_factory=list)


def build_report_objects(
    source_paths: Sequence[Path],
    analyses: Sequence[tuple[str, Analysis, float]],
    *,
    engine_version: str,
    out_dir: Path,
    gates: Mapping[Task, GateLike] | None = None,
    model_versions: Sequence[str] = (),
    comparison: Sequence[PriorStudy] = (),
) -> WrittenObjects:
    """Build the study's SC images and Encapsulated PDF and write them under ``out_dir``.

    Returns the written paths (``{SOPInstanceUID}.dcm``; the UIDs are deterministic, so a rerun
    overwrites the same files) and the key images' regions.
    """
    from service.media.dicom_io import write_dicom

    objects = render_report_objects(source_paths, analyses, engine_version=engine_version, gates=gates,
                                    model_versions=model_versions, comparison=comparison)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_pngs(objects.figures, out_dir / "figures")
    paths = [write_dicom(ds, out_dir / f"{ds.SOPInstanceUID}.dcm") for ds in objects.datasets]
    return WrittenObjects(paths, objects.regions)


def _write_pngs(figures: Mapping[tuple[str, Task], list[Figure]], folder: Path) -> None:
    """The same figures as PNG files for the web console: ``<n>-<task>-key|motion|flow.png``, named by
    what each one shows (an earlier version named them by position, and a flow overlay became "motion")."""
    from service.report.figures import png_bytes

    folder.mkdir(parents=True, exist_ok=True)
    ordered = sorted(figures.items(), key=lambda kv: (kv[0][0], kv[0][1].value))
    for n, ((_, task), figs) in enumerate(ordered):
        for fig in figs:
            path = folder / f"{n}-{task.value}-{fig.kind}.png"
            tmp = path.with_name(path.name + ".part")
            tmp.write_bytes(png_bytes(fig.image))
            tmp.replace(path)


def render_pdf_for_study(
    source_paths: Sequence[Path],
    analyses: Sequence[tuple[str, Analysis, float]],
    *,
    engine_version: str,
    gates: Mapping[Task, GateLike] | None = None,
    model_versions: Sequence[str] = (),
    pdf_path: Path | None = None,
) -> bytes:
    """The study's PDF report (``facesym report STUDY_UID --pdf out.pdf``): the same PDF as the
    Encapsulated PDF object :func:`build_report_objects` sends. Written to ``pdf_path`` when given."""
    objects = render_report_objects(source_paths, analyses, engine_version=engine_version, gates=gates,
                                    model_versions=model_versions)
    if pdf_path is not None:
        Path(pdf_path).write_bytes(objects.pdf)
    return objects.pdf


# ------------------------------------------------------------------------------ stored results
def analysis_from_dict(doc: Mapping[str, Any]) -> Analysis:
    """Rebuild an Analysis from the JSON document of :func:`service.report.jsonout.analysis_dict` (what
    the worker stores as a job's result), for an offline report. Rounded as stored; a ``series`` key
    per task (list of [left, right]) is read when present, else the report has no motion plot; so is a
    ``head_motion`` object (absent in results stored before head-motion compensation: None)."""
    q = doc.get("quality", {})
    quality = Quality(bool(q.get("ok")), tuple(q.get("reasons", ())), tuple(q.get("warnings", ())),
                      int(q.get("valid_frames", 0)), int(doc.get("input", {}).get("frames", 0) or 0))
    tasks = []
    for t in doc.get("tasks", ()):
        regions = (t.get("flow") or {}).get("regions", {})
        weaker = t.get("weaker_side")
        tasks.append(TaskResult(
            task=Task(t["task"]),
            frames=_pair(t["frames"]),
            rest_frames=_pair(t["rest_frames"]),
            peak_frames=_pair(t["peak_frames"]),
            left=float(t["left"]["magnitude"]),
            right=float(t["right"]["magnitude"]),
            asymmetry_index=float(t["asymmetry_index"]),
            activation_gate=float(t["activation_gate"]),
            asymmetry_score=float(t["asymmetry_score"]),
            cosine_index=float(t["cosine_index"]),
            cosine_score=float(t["cosine_score"]),
            weaker_side=Side(weaker) if weaker else None,
            method=str(t.get("method", "")),
            notes=tuple(t.get("notes", ())),
            flow=tuple(RegionSymmetry(name, float(r["left"]), float(r["right"]), float(r["symmetry_score"]))
                       for name, r in regions.items()),
            series=tuple((float(a), float(b)) for a, b in t.get("series", ())),
            gate_thresholds=(float(t["gate_thresholds"][0]), float(t["gate_thresholds"][1]))
            if t.get("gate_thresholds") else None,
            head_motion=HeadMotion.from_json(t["head_motion"]) if t.get("head_motion") else None,
        ))
    static = tuple(StaticItem(name, float(v["left"]), float(v["right"]))
                   for name, v in (doc.get("static") or {}).items())
    return Analysis(quality, tuple(tasks), static)


def _pair(v: Iterable[Any]) -> tuple[int, int]:
    a, b = (int(x) for x in v)
    return a, b
