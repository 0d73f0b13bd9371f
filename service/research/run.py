"""One input through the engine, and what ``facesym analyze`` writes beside its result: the JSON, the
per-frame CSV, the annotated video and the figures."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.domain import Analysis, MediaInfo, Task
from service.research.progress import StageProgress

if TYPE_CHECKING:
    from service.engine.pipeline import EngineParams
    from service.media.limits import DecodeLimits


@dataclass(frozen=True)
class AnalysedInput:
    """An input's analysis: the engine's result, the media it came from and the JSON document."""

    path: str
    path2: str | None
    info: MediaInfo
    analysis: Analysis
    doc: dict[str, Any]
    mirrored: bool = False
    limits: DecodeLimits | None = None

    @property
    def is_clip(self) -> bool:
        return self.info.kind != "image" and self.path2 is None


def analyse_input(
    path: str, path2: str | None, task: Task | None, mirrored: bool, *,
    limits: DecodeLimits | None = None, params: EngineParams | None = None,
    progress: StageProgress | None = None, keep_trace: bool = False,
) -> AnalysedInput:
    """Decode ``path`` (and the expression photo ``path2``) and analyse it.

    Raises UnreadableInputError for undecodable input (LimitExceededError beyond ``limits``). A clip that
    fails quality control is a result (``quality.ok`` false), not an error. ``keep_trace`` keeps the
    per-frame evidence for :func:`write_frames_csv` and :func:`write_annotated`.
    """
    from service.engine.pipeline import analyze_frames, analyze_photos
    from service.jobs.analysis import with_media_warnings  # a truncated clip, a lying frame count
    from service.media.decode import open_media
    from service.media.prefetch import prefetch
    from service.report.jsonout import analysis_dict

    source = open_media(path, mirrored=mirrored, limits=limits)
    info = source.info
    name = Path(path).name
    if info.kind == "image" or path2:
        if progress:
            progress.start_file(name, None)
        rest = next(iter(source.frames())).rgb
        expression = None
        if path2:
            second = open_media(path2, mirrored=mirrored, limits=limits)
            expression = next(iter(second.frames())).rgb
        analysis = analyze_photos(rest, expression, task, params)
        doc = analysis_dict(analysis, info, 2 if path2 else 1, [path2] if path2 else None)
        return AnalysedInput(path, path2, info, analysis, doc, mirrored, limits)

    counted = [0]

    def tick(n: int) -> None:
        counted[0] = n
        if progress:
            progress.frames(n)

    if progress:
        progress.start_file(name, info.frames)
    analysis = analyze_frames(
        prefetch(source.frames()), info.fps, task, params, progress=tick,
        on_stage=progress.stage if progress else None, keep_trace=keep_trace,
    )
    analysis = with_media_warnings(analysis, source)
    doc = analysis_dict(analysis, info, counted[0])
    return AnalysedInput(path, None, info, analysis, doc, mirrored, limits)


def write_json(doc: dict[str, Any], path: Path) -> None:
    """Write ``doc`` to ``path`` whole or not at all (a batch interrupted mid-write leaves no half file
    that a resumed run would take for a result)."""
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def write_outputs(
    result: AnalysedInput, *, frames_csv: Path | None = None, annotated: Path | None = None,
    figures_dir: Path | None = None, progress: StageProgress | None = None, stem: str | None = None,
) -> list[Path]:
    """Write the per-frame CSV, the annotated video and the figures that were asked for; returns the
    files written. A clip that failed quality control gets only its CSV (the per-frame QC flags say why).
    Outputs that need a clip (CSV, video) raise InvalidParameterError for photos."""
    from service.errors import InvalidParameterError

    written: list[Path] = []
    if not result.doc["quality"]["ok"]:
        frames_csv = frames_csv if result.is_clip else None
        annotated = figures_dir = None
    if (frames_csv or annotated) and not result.is_clip:
        raise InvalidParameterError("--frames-csv and --annotated need a video clip, not photos")
    if frames_csv is not None:
        from service.research.tables import write_frames_csv

        if progress:
            progress.stage("frames CSV")
        written.append(write_frames_csv(result.analysis, frames_csv))
    if annotated is not None:
        from service.research.annotate import write_annotated

        if progress:
            progress.stage("annotated video")
        written.append(write_annotated(result.path, result.analysis, result.info.fps, annotated,
                                       mirrored=result.mirrored, limits=result.limits))
    if figures_dir is not None and result.analysis.tasks:
        if progress:
            progress.stage("figures")
        written.extend(write_figures(result, figures_dir, stem))
    return written


def write_figures(result: AnalysedInput, folder: Path, stem: str | None = None) -> list[Path]:
    """The key images, flow overlays and motion plots the service sends to the PACS, as PNG files named
    ``<stem>_<task>_<kind>.png`` in ``folder`` (stem: the input's file name without suffix)."""
    from service.report.figures import png_bytes
    from service.report.study_images import StudyItem, figures_by_task

    folder.mkdir(parents=True, exist_ok=True)
    stem = stem or Path(result.path2 or result.path).stem
    if result.is_clip:
        item = StudyItem(stem, Path(result.path), result.analysis, result.info.fps)
    else:  # a photo pair: the expression photo drawn against the rest photo
        expression = Path(result.path2) if result.path2 else Path(result.path)
        rest = Path(result.path) if result.path2 else None
        item = StudyItem(stem, expression, result.analysis, 0.0, rest_path=rest)
    out: list[Path] = []
    for (_, task), figures in figures_by_task([item]).items():
        for fig in figures:
            target = folder / f"{stem}_{task.value}_{fig.kind}.png"
            target.write_bytes(png_bytes(fig.image))
            out.append(target)
    return out
