"""``facesym analyze DIR_OR_GLOB... --out RESULTS_DIR``: many inputs, one JSON each and ``summary.csv``.

Resumable: an input whose JSON in RESULTS_DIR records the same engine version, the same analysis options
and the same file (size and modification time) is not analysed again; its row still goes into the summary.
Results are written whole or not at all, so an interrupted batch resumes where it stopped.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from service.errors import FaceSymError, UnreadableInputError

#: What a folder is searched for (case-insensitive suffixes); DICOM files without a suffix are found by
#: their preamble.
VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".m4v", ".avi", ".mkv", ".webm", ".mpg", ".mpeg"})
PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
_SKIP = frozenset({".json", ".csv", ".txt", ".md", ".part"})


def _wanted(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES | PHOTO_SUFFIXES | DICOM_SUFFIXES:
        return True
    if suffix in _SKIP or suffix:
        return False
    from service.media.dicom_io import is_dicom

    return is_dicom(path)


def discover(patterns: Sequence[str], exclude: Path | None = None) -> list[Path]:
    """Every input named by ``patterns``: files as given, folders searched recursively for videos,
    photos and DICOM objects, glob patterns (``*``, ``?``, ``[…]``, ``**``) expanded. Sorted, each once;
    nothing under ``exclude`` (the results folder). Raises UnreadableInputError naming a pattern that
    matches nothing."""
    found: dict[Path, None] = {}
    skip = exclude.resolve() if exclude is not None else None

    def add(p: Path) -> None:
        r = p.resolve()
        if skip is not None and (r == skip or skip in r.parents):
            return
        found.setdefault(r, None)

    for pattern in patterns:
        path = Path(pattern)
        if glob.has_magic(pattern):
            matches = [Path(m) for m in sorted(glob.glob(pattern, recursive=True))]
        else:
            matches = [path] if path.exists() else []
        if not matches:
            raise UnreadableInputError(f"{pattern}: no such file or folder (nor files matching it)")
        before = len(found)
        for m in matches:
            if m.is_dir():
                for f in sorted(m.rglob("*")):
                    if f.is_file() and not f.name.startswith(".") and _wanted(f):
                        add(f)
            elif m.is_file() and (m == path or _wanted(m)):
                add(m)
        if len(found) == before and not any(Path(m).resolve() in found for m in matches):
            raise UnreadableInputError(f"{pattern}: no video, photo or DICOM file found there")
    return sorted(found)


def result_names(paths: Sequence[Path]) -> dict[Path, str]:
    """A readable, unique result name per input: its path below the inputs' common folder, with the
    folder separators as ``__`` (``visit1/smile.mp4`` → ``visit1__smile.mp4``)."""
    if not paths:
        return {}
    parents = [str(p.parent) for p in paths]
    common = Path(os.path.commonpath(parents)) if len(paths) > 1 else paths[0].parent
    return {p: "__".join(p.relative_to(common).parts) for p in paths}


def batch_record(path: Path, options: dict[str, Any]) -> dict[str, Any]:
    """What a result must match to be reused: engine version, analysis options, file size and mtime."""
    from service import __version__
    from service.engine import ENGINE_VERSION

    st = path.stat()
    return {"engine_version": ENGINE_VERSION, "facesym_version": __version__, "options": options,
            "source": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def reusable(json_path: Path, record: dict[str, Any]) -> dict[str, Any] | None:
    """The earlier result in ``json_path`` if it matches ``record`` (:func:`batch_record`), else None."""
    import json

    try:
        doc = json.loads(json_path.read_text())
    except (OSError, ValueError):
        return None
    old = doc.get("batch") if isinstance(doc, dict) else None
    if not isinstance(old, dict):
        return None
    same = all(old.get(k) == record[k] for k in ("engine_version", "options", "size", "mtime_ns"))
    return doc if same else None


@dataclass(frozen=True)
class BatchOptions:
    """The analysis and output options every input of a batch gets."""

    task: str | None = None  # a Task value, or None for auto
    mirrored: bool = False
    frames_csv: bool = False
    annotated: bool = False
    figures: bool = False
    config: str | None = None
    verbose: bool = False

    def record(self) -> dict[str, Any]:
        """The options that change a result (outputs do not): part of the resume check."""
        return {"task": self.task or "auto", "mirrored": self.mirrored}


@dataclass
class BatchOutcome:
    analysed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    not_analysable: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    #: Inputs of this batch without scores (this run's or a reused result): not analysable or unreadable.
    failed: list[str] = field(default_factory=list)
    rows: list[dict[str, str]] = field(default_factory=list)


def _failure_doc(path: Path, reason: str) -> dict[str, Any]:
    from service import __version__

    return {"facesym_version": __version__, "input": {"path": str(path)},
            "quality": {"ok": False, "reasons": [reason], "valid_frames": 0, "warnings": []},
            "tasks": [], "error": reason}


def analyse_one(path: Path, name: str, out_dir: Path, options: BatchOptions, record: dict[str, Any],
                progress: Any = None) -> tuple[str, dict[str, Any]]:
    """Analyse one input of a batch and write its JSON (and the outputs asked for) into ``out_dir``.
    Returns (status, document): status "analysed", "not analysable" or "unreadable". Never raises for
    bad input: the reason goes into the document."""
    from service.config import load_settings
    from service.domain import Task
    from service.research.run import analyse_input, write_json, write_outputs

    settings = load_settings(options.config)
    task = Task(options.task) if options.task else None
    status = "analysed"
    try:
        result = analyse_input(
            str(path), None, task, options.mirrored, limits=settings.decode_limits,
            params=settings.engine_params, progress=progress,
            keep_trace=options.frames_csv or options.annotated,
        )
        doc = result.doc
        clip = result.is_clip  # a batch's photos get no per-frame outputs (no error: only one input of many)
        write_outputs(
            result,
            frames_csv=out_dir / f"{name}.frames.csv" if options.frames_csv and clip else None,
            annotated=out_dir / f"{name}.annotated.mp4" if options.annotated and clip else None,
            figures_dir=out_dir / "figures" if options.figures else None, progress=progress, stem=name,
        )
        if not doc["quality"]["ok"]:
            status = "not analysable"
    except UnreadableInputError as exc:
        status, doc = "unreadable", _failure_doc(path, f"unreadable: {exc}")
    except FaceSymError as exc:
        status, doc = "not analysable", _failure_doc(path, str(exc))
    except Exception as exc:  # noqa: BLE001 - one hostile file must not stop a batch of hundreds
        why = f"processing failed ({type(exc).__name__}: {exc})"[:300]
        status, doc = "unreadable", _failure_doc(path, why)
    doc["batch"] = record
    write_json(doc, out_dir / f"{name}.json")
    return status, doc


def _child_setup(verbose: bool) -> None:
    """A spawned batch process starts bare: the same PHI-safe logging and quiet pydicom as the command."""
    from service.cli import safe_process_logging

    safe_process_logging(verbose)


def _analyse_in_child(
    args: tuple[Path, str, Path, BatchOptions, dict[str, Any]],
) -> tuple[str, str, dict[str, Any]]:
    path, name, out_dir, options, record = args
    status, doc = analyse_one(path, name, out_dir, options, record)
    return name, status, doc


def run_batch(
    inputs: Sequence[Path], out_dir: Path, options: BatchOptions, *, jobs: int = 1, redo: bool = False,
    progress: Any = None,
) -> BatchOutcome:
    """Analyse ``inputs`` into ``out_dir`` (``jobs`` processes) and write ``summary.csv`` there."""
    from service.research.tables import summary_rows, write_summary_csv

    out_dir.mkdir(parents=True, exist_ok=True)
    names = result_names(inputs)
    outcome = BatchOutcome()
    docs: dict[str, dict[str, Any]] = {}
    todo: list[tuple[Path, str, Path, BatchOptions, dict[str, Any]]] = []
    for path in inputs:
        name = names[path]
        record = batch_record(path, options.record())
        earlier = None if redo else reusable(out_dir / f"{name}.json", record)
        if earlier is not None:
            docs[name] = earlier
            outcome.reused.append(name)
            if progress:
                progress.report_file(name, "already analysed with this engine version: skipped")
        else:
            todo.append((path, name, out_dir, options, record))

    def done(name: str, status: str, doc: dict[str, Any]) -> None:
        docs[name] = doc
        {"analysed": outcome.analysed, "not analysable": outcome.not_analysable,
         "unreadable": outcome.unreadable}[status].append(name)

    if jobs <= 1 or len(todo) <= 1:
        for path, name, out, opts, record in todo:
            if progress:
                progress.begin(name)
            status, doc = analyse_one(path, name, out, opts, record, progress)
            if progress:
                progress.end_file(status)
            done(name, status, doc)
    else:
        # Separate processes: FaceMesh and torch hold one core each; spawn, as forking a process that
        # has threads (the prefetcher, MediaPipe's) is not safe.
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=_child_setup,
                                 initargs=(options.verbose,)) as pool:
            futures = [pool.submit(_analyse_in_child, item) for item in todo]
            for future in as_completed(futures):
                name, status, doc = future.result()
                if progress:
                    progress.report_file(name, status)
                done(name, status, doc)
    outcome.failed = [n for n in sorted(docs) if not docs[n].get("quality", {}).get("ok")]
    for name in sorted(docs):
        outcome.rows.extend(summary_rows(docs[name], name, f"{name}.json"))
    write_summary_csv(outcome.rows, out_dir / "summary.csv")
    return outcome
