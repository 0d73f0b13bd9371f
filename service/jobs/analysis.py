"""Analyse the instances of one study: decode each, run the engine with the task its rules assign, pair
rest and expression photos. Bad input becomes a "not analysable" finding with the reason, never a crash."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from service.domain import Analysis, MediaSource, Quality, Task
from service.engine.pipeline import EngineParams, analyze_frames, analyze_photos
from service.errors import NotAnalysableError, UnreadableInputError
from service.media.decode import media_warnings, open_media
from service.media.limits import DecodeLimits
from service.media.prefetch import prefetch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceInput:
    """One received object to analyse: where it is and what the rules say it shows."""

    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    task_hint: str | None  # "smile" | "eye_closure" | "brow_raise" | "rest" | None (auto)
    number_of_frames: int | None
    order: int  # instance number or arrival order, for pairing photos


@dataclass(frozen=True)
class InstanceAnalysis:
    source: InstanceInput
    analysis: Analysis
    frames: int
    fps: float


def _failed(reason: str) -> Analysis:
    return Analysis(Quality(False, (reason,), (), 0, 0), ())


def _task(hint: str | None) -> Task | None:
    return Task(hint) if hint in {t.value for t in Task} else None


def analyse_study(
    inputs: list[InstanceInput], limits: DecodeLimits | None = None, params: EngineParams | None = None
) -> list[InstanceAnalysis]:
    """Analyse every instance; photos are paired (rest + expression) within the study.

    ``limits``: the decode limits (default :class:`~service.media.limits.DecodeLimits`); an instance beyond
    them is "not analysable" with the reason. ``params``: the engine's settings (gates, QC limits, flow,
    grader model; default :class:`~service.engine.pipeline.EngineParams`).

    Pairing: photos whose rules say "rest" are rest photos; every other photo is an expression photo and is
    paired with the study's rest photo (the latest by instance order). Without any rest photo, two unlabelled
    photos pair in instance order (first = rest). A lone expression photo is "not analysable" with the
    reason; a lone rest photo gives the static items.
    """
    out: list[InstanceAnalysis] = []
    photos: list[InstanceInput] = []  # decoded again when paired: never all of a study's photos in memory
    for item in inputs:
        try:
            source = open_media(item.path, limits=limits)
        except UnreadableInputError as exc:
            log.warning("instance %s unreadable: %s", item.sop_instance_uid, exc)
            out.append(InstanceAnalysis(item, _failed(f"unreadable: {exc}"), 0, 0.0))
            continue
        info = source.info
        if info.kind == "image" and (info.frames or 1) == 1:
            photos.append(item)
            continue
        counted = [0]

        def tick(n: int, counted: list[int] = counted) -> None:
            counted[0] = n

        try:
            analysis = analyze_frames(
                prefetch(source.frames()), info.fps, _task(item.task_hint), params, progress=tick
            )
        except (UnreadableInputError, NotAnalysableError) as exc:
            reasons = exc.reasons if isinstance(exc, NotAnalysableError) else [f"unreadable: {exc}"]
            analysis = Analysis(Quality(False, tuple(reasons), (), 0, counted[0]), ())
        analysis = with_media_warnings(analysis, source)
        out.append(InstanceAnalysis(item, analysis, counted[0], info.fps))
    out.extend(_analyse_photos(photos, limits, params))
    order = {i.sop_instance_uid: k for k, i in enumerate(inputs)}
    return sorted((_without_paths(a) for a in out), key=lambda a: order[a.source.sop_instance_uid])


#: An absolute file path inside a message (not a ratio like 0.3/0.5, nor I/O).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:[^\s/:;,'\"()]+/)+[^\s/:;,'\"()]*")


def pathless(text: str, path: object, name: str) -> str:
    """``text`` with ``path`` said as ``name``, and any other absolute path as "<file>": reasons go into
    the SR, the PDF and FHIR that leave for the PACS and the EHR, where the server's layout has no place."""
    return _ABSOLUTE_PATH.sub("<file>", text.replace(str(path), name))


def _without_paths(a: InstanceAnalysis) -> InstanceAnalysis:
    name = f"instance {a.source.sop_instance_uid}"
    q = a.analysis.quality
    quality = replace(q, reasons=tuple(pathless(r, a.source.path, name) for r in q.reasons),
                      warnings=tuple(pathless(w, a.source.path, name) for w in q.warnings))
    return replace(a, analysis=replace(a.analysis, quality=quality))


def with_media_warnings(analysis: Analysis, source: MediaSource) -> Analysis:
    """``analysis`` with what decoding found (a truncated clip, a lying frame count) among its warnings."""
    extra = media_warnings(source)
    if not extra:
        return analysis
    return replace(analysis, quality=replace(analysis.quality, warnings=analysis.quality.warnings + extra))


def with_limits(
    analyser: Callable[[list[InstanceInput]], list[InstanceAnalysis]],
    limits: DecodeLimits,
    params: EngineParams | None = None,
) -> Callable[[list[InstanceInput]], list[InstanceAnalysis]]:
    """:func:`analyse_study` bound to the service's decode limits and engine settings (another analyser is
    returned as it is)."""
    return partial(analyse_study, limits=limits, params=params) if analyser is analyse_study else analyser


def _photo(item: InstanceInput, limits: DecodeLimits | None) -> np.ndarray:
    return next(iter(open_media(item.path, limits=limits).frames())).rgb


def _analyse_photos(
    photos: list[InstanceInput], limits: DecodeLimits | None = None, params: EngineParams | None = None
) -> list[InstanceAnalysis]:
    """Rest photos alone (static items), expression photos with the study's rest photo; at most two photos are
    decoded at a time."""
    photos = sorted(photos, key=lambda p: p.order)
    rests = [p for p in photos if p.task_hint == "rest"]
    others = [p for p in photos if p.task_hint != "rest"]
    if not rests and len(others) == 2 and all(p.task_hint is None for p in others):
        rests, others = [others[0]], [others[1]]
    out = []
    rest_rgb: np.ndarray | None = None
    for item in rests:
        try:
            rgb = _photo(item, limits)
            analysis = analyze_photos(rgb, None, params=params)
        except (UnreadableInputError, NotAnalysableError) as exc:
            analysis = _failed(_reason(exc))
            rgb = None
        if item is rests[-1]:
            rest_rgb = rgb  # the study's rest photo (the latest): every expression photo pairs with it
        out.append(InstanceAnalysis(item, analysis, 1, 0.0))
    for item in others:
        if not rests:
            out.append(
                InstanceAnalysis(item, _failed("expression photo without a rest photo in the study"), 1, 0.0)
            )
            continue
        if rest_rgb is None:
            out.append(InstanceAnalysis(item, _failed("the study's rest photo is not analysable"), 1, 0.0))
            continue
        try:
            analysis = analyze_photos(rest_rgb, _photo(item, limits), _task(item.task_hint), params)
        except (UnreadableInputError, NotAnalysableError) as exc:
            analysis = _failed(_reason(exc))
        out.append(InstanceAnalysis(item, analysis, 2, 0.0))
    return out


def _reason(exc: UnreadableInputError | NotAnalysableError) -> str:
    return "; ".join(exc.reasons) if isinstance(exc, NotAnalysableError) else f"unreadable: {exc}"
