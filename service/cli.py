"""The facesym command: the one place that wires settings, logging, media, engine and reports.

Exit codes (analyze): 0 analysed, 2 unreadable input, 3 not analysable (QC reasons printed).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from service import __version__
from service.domain import Analysis, Side, Task
from service.errors import FaceSymError, InvalidParameterError, NotAnalysableError, UnreadableInputError

if TYPE_CHECKING:
    from service.config import Settings
    from service.engine.pipeline import EngineParams
    from service.jobs.scheduler import FaceSymService
    from service.media.limits import DecodeLimits
    from service.report.fhir import StudyIdentity

log = logging.getLogger("facesym")
EXIT_OK, EXIT_UNREADABLE, EXIT_NOT_ANALYSABLE = 0, 2, 3


def _parse_task(value: str) -> Task | None:
    if value == "auto":
        return None
    try:
        return Task(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--task must be auto, smile, eye_closure or brow_raise, not {value!r}"
        ) from None


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows each option's default where it has a real one (not None, False or an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" not in text and default not in (None, False, [], "", argparse.SUPPRESS)
                and action.option_strings and not isinstance(action, argparse._VersionAction)):
            text = (text + " " if text else "") + "(default: %(default)s)"
        return text


#: "Given, but without a value": in a batch, that output goes to RESULTS_DIR for every input.
PER_INPUT = "<per input>"

ANALYZE_DESCRIPTION = """\
Analyse a clip (smile, eye closure, brow raise), a rest + expression photo pair, or one rest photo; or,
with --out, a batch: every video, photo and DICOM object in the folders and glob patterns given.

examples:
  facesym analyze smile.mp4                       table of scores on the terminal
  facesym analyze smile.mp4 --json - | jq .      only JSON on stdout (messages on stderr)
  facesym analyze smile.mp4 --frames-csv f.csv --annotated a.mp4 --figures figs/
  facesym analyze rest.jpg smile.jpg --task smile
  facesym analyze clips/ 'visit2/*.mp4' --out results/ --jobs 2 --frames-csv
      results/NAME.json per input and results/summary.csv; run again: finished inputs are skipped

exit status: 0 analysed, 2 unreadable input, 3 not analysable (QC reasons printed); a batch: 0 when every
input was analysed, 3 when any was not analysable or unreadable (summary.csv says which and why).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="facesym", description="Facial-palsy analysis (smile, eye closure, brow raise).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"facesym {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    # The same flag after the subcommand (SUPPRESS: absent there, the top-level value stands).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log at DEBUG level")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        parent: Any, name: str, help_text: str, description: str | None = None
    ) -> argparse.ArgumentParser:
        """A subcommand with a description (its help as a sentence unless given), defaults shown, and the
        global flags (-v) accepted after it too."""
        about = description or help_text[:1].upper() + help_text[1:] + "."
        made: argparse.ArgumentParser = parent.add_parser(
            name, help=help_text, description=about, parents=[common], formatter_class=_HelpFormatter)
        return made

    a = command(sub, "analyze", "analyse a clip, a photo pair, one rest photo, or a batch (--out)",
                ANALYZE_DESCRIPTION)
    a.add_argument("paths", nargs="+", metavar="PATH",
                   help="video (mp4/mov/avi...), DICOM object or photo; PATH PATH2: rest and expression "
                   "photo; with --out: files, folders (searched recursively) and glob patterns")
    a.add_argument("--task", type=_parse_task, default=None, metavar="auto|smile|eye_closure|brow_raise",
                   help="task shown (default auto: find the tasks in the clip)")
    a.add_argument("--json", metavar="FILE", help="write the result as JSON (- for stdout: only JSON there)")
    a.add_argument("--mirrored", action="store_true", help="input is mirrored (selfie camera)")
    a.add_argument("--config", help="TOML settings file: decode limits, engine settings (FACESYM_* "
                   "environment variables override it)")
    a.add_argument("--out", metavar="RESULTS_DIR", type=Path,
                   help="batch: one JSON per input and summary.csv (one row per input and task) in "
                   "RESULTS_DIR")
    a.add_argument("--jobs", type=int, default=1, metavar="N", help="batch: inputs analysed in parallel")
    a.add_argument("--redo", action="store_true",
                   help="batch: analyse again inputs whose results are already in RESULTS_DIR")
    a.add_argument("--frames-csv", nargs="?", const=PER_INPUT, metavar="FILE",
                   help="per-frame CSV: time, QC, head pose, per-side signals, 478 landmarks (README, "
                   "'Research outputs'); in a batch without FILE: RESULTS_DIR/NAME.frames.csv")
    a.add_argument("--annotated", nargs="?", const=PER_INPUT, metavar="OUT.mp4",
                   help="the clip with landmark groups, rest→current arrows, L/R, per-side bars and the "
                   "phase drawn (H.264); in a batch without a file: RESULTS_DIR/NAME.annotated.mp4")
    a.add_argument("--figures", nargs="?", const=PER_INPUT, metavar="DIR",
                   help="key images, flow overlays and motion plots as PNG (those sent to the PACS); in a "
                   "batch without DIR: RESULTS_DIR/figures/")
    a.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    a.add_argument("--fhir", metavar="FILE",
                   help="DICOM input only: also write the FHIR R4 transaction Bundle FaceSym would send "
                   "for it (identity from the DICOM header)")
    a.add_argument("--patient-system", metavar="URI", help="identifier system of the Patient ID for --fhir "
                   "(default: fhir_patient_identifier_system setting, else IssuerOfPatientID if a URI/OID)")

    ph = command(sub, "phantom", "synthesise a clip with known per-side motion (for validation)")
    ph.add_argument("out", help="output file (.mp4 or .dcm); the ground truth JSON goes beside it")
    ph.add_argument("--face", help="real face photo to warp (default: the bundled demo face)")
    for task in Task:
        ph.add_argument(f"--{task.value.replace('_', '-')}", nargs=2, type=float, metavar=("LEFT", "RIGHT"),
                        help=f"{task.value} amplitude per patient side ({task.unit})")
    ph.add_argument("--format", choices=["mp4", "dicom"], help="default: from the file suffix")
    ph.add_argument("--freeze-half", choices=["left", "right"],
                    help="instead: hold this half of a real clip's face still (needs --clip)")
    ph.add_argument("--clip", help="real clip for --freeze-half")
    ph.add_argument("--amplitude", type=float, default=0.0,
                    help="with --freeze-half: fraction of that half's motion kept (0 <= A < 1; 0: frozen)")
    ph.add_argument("--in-head-frame", action="store_true",
                    help="with --freeze-half: the frozen half moves rigidly with the clip's head, as a "
                    "palsied half does (with --amplitude: it keeps that part of its motion relative to "
                    "the head)")
    for axis, unit in (("roll", "degrees"), ("yaw", "degrees"), ("pitch", "degrees"), ("scale", "percent"),
                       ("shift", "inter-eye distances")):
        ph.add_argument(f"--{axis}", type=float, default=0.0, metavar="AMPLITUDE",
                        help=f"head motion laid over the clip: peak {axis} ({unit}), a sinusoid (default 0)")

    sv = command(sub, "serve", "run the DICOM service: storage SCP, scheduler and workers")
    sv.add_argument("--config", help="TOML settings file (FACESYM_* environment variables override it)")

    wk = command(sub, "worker", "analyse and deliver only (no SCP, no web): scale out beside a "
                        "`facesym serve` with workers = 0, sharing its database and file store")
    wk.add_argument("--config", help="TOML settings file (FACESYM_* environment variables override it)")

    db = command(sub, "db", "the database schema (Alembic migrations)")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    dbu = command(db_sub, "upgrade", "bring the database to the newest schema revision (an old "
                            "create_all database is stamped at the baseline first)")
    dbu.add_argument("--config", help="TOML settings file (the database is found as serve finds it)")
    dbu.add_argument("--create", action="store_true",
                     help="make a new SQLite database where none exists (without it, a missing file is an "
                          "error: a wrong data_dir must not silently become an empty database)")
    dbc = command(db_sub, "current", "print the database's schema revision (exit 1 if not the newest)")
    dbc.add_argument("--config", help="TOML settings file")

    rp = command(sub, "report", "render an analysed study's PDF report offline")
    rp.add_argument("study_uid", help="Study Instance UID of a study FaceSym has analysed")
    rp.add_argument("--pdf", required=True, metavar="FILE", help="where to write the PDF")
    rp.add_argument("--config", help="TOML settings file (the database is found as serve finds it)")

    us = command(sub, "user", "local users of the web console and the REST API")
    us_sub = us.add_subparsers(dest="user_command", required=True)
    ua = command(us_sub, "add", "create a user (password asked for, or read from --password-file)")
    ua.add_argument("username")
    ua.add_argument("--role", choices=["viewer", "operator", "admin"], default="viewer")
    ua.add_argument("--password-file", help="read the password from this file instead of asking")
    ua.add_argument("--update", action="store_true", help="change an existing user's password and role")
    ua.add_argument("--config", help="TOML settings file")
    ut = command(us_sub, "token", "issue a new API token for a user (printed once)")
    ut.add_argument("username")
    ut.add_argument("--config", help="TOML settings file")
    ul = command(us_sub, "list", "list users and roles")
    ul.add_argument("--config", help="TOML settings file")

    tr = command(sub, "train", "train the deep grader (manifest CSV: path, task, grade[, patient_id])")
    tr.add_argument("manifest", help="CSV of clips, DICOM objects or .npz landmark tracks with their grades")
    tr.add_argument("--out", default="models", help="models folder (writes OUT/NAME/VERSION/)")
    tr.add_argument("--name", default="facesym-grader", help="model name")
    tr.add_argument("--version", required=True, help="model version, e.g. 0.2.0 (never overwritten)")
    tr.add_argument("--seed", type=int, default=0, help="random seed (same seed, same model)")
    tr.add_argument("--epochs", type=int, default=12, help="training epochs")
    tr.add_argument("--folds", type=int, default=5, help="patient-grouped cross-validation folds")
    tr.add_argument("--test", help="held-out test manifest (CSV) for the model card's metrics")

    au = command(sub, "audit", "the audit trail: verify its hash chain, export records")
    au_sub = au.add_subparsers(dest="audit_command", required=True)
    av = command(au_sub, "verify", "check the chain; names the first broken record (exit 1)")
    av.add_argument("--config", help="TOML settings file (the trail is found as serve finds it)")
    ax = command(au_sub, "export", "print records as JSON lines or DICOM audit XML")
    ax.add_argument("--config", help="TOML settings file")
    ax.add_argument("--since", help="ISO date/time: only records from then on")
    ax.add_argument("--format", choices=["jsonl", "xml"], default="jsonl")

    pu = command(sub, "purge", "remove studies (files, rows, reports) whose last activity is older "
                        "than DAYS; each removal is audited (110105)")
    pu.add_argument("--older-than", type=float, required=True, metavar="DAYS",
                    help="remove studies with no activity (received, analysed, delivered) for this many days")
    pu.add_argument("--dry-run", action="store_true", help="only list what would be removed and kept")
    pu.add_argument("--force", action="store_true",
                    help="also remove studies with unfinished or FAILED jobs or undelivered results")
    pu.add_argument("--config", help="TOML settings file (store and database found as serve finds them)")

    dm = command(sub, "demo", "send a phantom exam to FaceSym over DICOM and print the SR's scores")
    dm.add_argument("--config", help="TOML settings file (where FaceSym listens)")
    dm.add_argument(
        "--receiver-port", type=int, default=None,
        help="port of the demo's SR receiver (default: demo_receiver_port, 11113, where `make run` sends "
        "reports; 0: a free one)"
    )
    return p


def _console(stderr: bool = False) -> Console:
    """Where messages go: stdout, or stderr when stdout carries machine-readable output (``--json -``).
    Pipes and CI logs get a fixed width wide enough for the result table (rich assumes 80 columns)."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, highlight=False, width=None if stream.isatty() else 120)


#: Narrower than this (columns), the scores table is split in two so that no cell is cut short.
WIDE_TABLE_COLUMNS = 110


def result_tables(doc: dict[str, Any], width: int = 200) -> list[Table]:
    """The scores as one table, or on a terminal narrower than :data:`WIDE_TABLE_COLUMNS` two: the
    scores, then frames, gate and method."""
    rows = []
    for t in doc["tasks"]:
        gate = f"{t['activation_gate']:.2f}" + (" (low)" if t["insufficient_activation"] else "")
        rows.append({
            "task": t["task"], "frames": f"{t['frames'][0]}–{t['frames'][1]}",
            "left": f"{t['left']['magnitude']:.3f}", "right": f"{t['right']['magnitude']:.3f}",
            "AI": f"{t['asymmetry_index']:.2f}", "gate": gate, "AS": f"{t['asymmetry_score']:.0f}",
            "CI": f"{t['cosine_index']:.2f}", "CS": f"{t['cosine_score']:.0f}",
            "weaker": t["weaker_side"] or "none",
            "method": t["method"], "grade*": _grade_cell((t.get("grade") or {}).get("label")),
        })
    texts = ("task", "weaker", "method", "grade*")
    wide = ("task", "frames", "left", "right", "AI", "gate", "AS", "CI", "CS", "weaker", "method", "grade*")
    layouts = [wide] if width >= WIDE_TABLE_COLUMNS else [
        ("task", "left", "right", "AI", "AS", "CI", "CS", "weaker", "grade*"),
        ("task", "frames", "gate", "method"),
    ]
    tables = []
    for k, columns in enumerate(layouts):
        table = Table(title="FaceSym result (sides are the patient's)" if k == 0 else None)
        for col in columns:
            table.add_column(col, justify="left" if col in texts else "right", no_wrap=True)
        for r in rows:
            table.add_row(*(r[c] for c in columns))
        tables.append(table)
    return tables


def finding_line(doc: dict[str, Any]) -> str | None:
    """The one-sentence finding of one analysed input (as the SR's impression and the console say it),
    with the grade's caveat; the table's "grade*" refers to it."""
    from service.report.summary import finding_of_documents

    return finding_of_documents([doc], doc.get("tasks", []))


def analyze_path(
    path: str, path2: str | None, task: Task | None, mirrored: bool, show_progress: bool,
    limits: DecodeLimits | None = None, params: EngineParams | None = None,
) -> dict[str, Any]:
    """Decode, analyse and return the JSON document. Raises UnreadableInputError for undecodable input
    (LimitExceededError beyond ``limits``, default :class:`~service.media.limits.DecodeLimits`); ``params``
    are the engine's settings (default :class:`~service.engine.pipeline.EngineParams`)."""
    from service.research.progress import StageProgress
    from service.research.run import analyse_input

    progress = StageProgress(sys.stderr) if show_progress else None
    try:
        return analyse_input(path, path2, task, mirrored, limits=limits, params=params, progress=progress).doc
    finally:
        if progress is not None:
            progress.close()


def _one_output(value: str | None, option: str) -> Path | None:
    if value == PER_INPUT:
        raise InvalidParameterError(f"{option} needs a file name for one input (without one it is a batch "
                                    "option: add --out RESULTS_DIR)")
    return Path(value) if value else None


def cmd_analyze(args: argparse.Namespace) -> int:
    from service.config import load_settings

    console = _console(stderr=args.json == "-")  # with --json -, stdout carries the JSON and nothing else
    settings = load_settings(args.config)  # + FACESYM_* environment variables: decode limits, engine settings
    if args.jobs < 1:
        raise InvalidParameterError(f"--jobs must be 1 or more, got {args.jobs}")
    if args.out is not None:
        return _analyze_batch(args)
    from service.research.batch import discover

    if len(args.paths) > 2 or any(Path(p).is_dir() or glob.has_magic(p) and not Path(p).exists()
                                  for p in args.paths):
        raise InvalidParameterError("several inputs, a folder or a pattern make a batch: add --out "
                                    f"RESULTS_DIR (got {len(args.paths)} input(s))")
    if args.redo:
        raise InvalidParameterError("--redo applies to a batch (--out RESULTS_DIR)")
    path, path2 = args.paths[0], (args.paths[1] if len(args.paths) == 2 else None)
    discover(args.paths)  # a missing file is named before anything is decoded
    frames_csv = _one_output(args.frames_csv, "--frames-csv")
    annotated = _one_output(args.annotated, "--annotated")
    figures = _one_output(args.figures, "--figures")
    for target in (frames_csv, annotated, Path(args.fhir) if args.fhir else None,
                   Path(args.json) if args.json and args.json != "-" else None):
        if target is not None and not target.parent.is_dir():
            raise InvalidParameterError(f"cannot write {target}: folder {target.parent} does not exist")
    fhir = _check_fhir(args, settings) if args.fhir else None
    from service.research.progress import StageProgress
    from service.research.run import analyse_input, write_outputs

    progress = None if args.quiet else StageProgress(sys.stderr)
    try:
        try:
            result = analyse_input(path, path2, args.task, args.mirrored, limits=settings.decode_limits,
                                   params=settings.engine_params, progress=progress,
                                   keep_trace=bool(frames_csv or annotated))
            doc = result.doc
            write_outputs(result, frames_csv=frames_csv, annotated=annotated, figures_dir=figures,
                          progress=progress)
        finally:
            if progress is not None:
                progress.close()
    except UnreadableInputError as exc:
        console.print(f"[bold red]unreadable input:[/] {escape(str(exc))}", soft_wrap=True)
        return EXIT_UNREADABLE
    except (FaceSymError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - a bug on hostile input: a message and exit 2, never a traceback
        log.debug("analysis of %s failed", path, exc_info=True)
        console.print(f"[bold red]unreadable input:[/] {escape(path)}: processing failed "
                      f"({type(exc).__name__}: {escape(str(exc)[:200])}); run with -v for details")
        return EXIT_UNREADABLE
    if args.fhir and fhir is not None:
        _write_fhir(path, result.analysis, Path(args.fhir), *fhir, settings.fhir_reference_mode)
    if args.json:
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    if not doc["quality"]["ok"]:
        reasons = escape("; ".join(doc["quality"]["reasons"]))
        console.print(f"[bold red]not analysable:[/] {reasons}", soft_wrap=True)
        return EXIT_NOT_ANALYSABLE
    if args.json != "-":
        _print_result(console, doc)
    return EXIT_OK


def _print_result(console: Console, doc: dict[str, Any]) -> None:
    from service.report.head_motion import head_motion_of, head_motion_text, not_corrected_text

    for table in result_tables(doc, console.width):
        console.print(table)
    if (finding := finding_line(doc)) is not None:
        console.print(f"Finding: {finding}", soft_wrap=True, markup=False)
    for w in doc["quality"]["warnings"]:
        console.print(f"[yellow]warning:[/] {escape(w)}")
    for t in doc["tasks"]:
        for note in t["notes"]:
            console.print(f"[yellow]{t['task']}:[/] {escape(note)}")
        if (head := head_motion_of(t)) is not None:
            console.print(f"{t['task']} head motion: {head_motion_text(head)}")
            if not head.corrected:
                console.print(f"[bold red]{t['task']}:[/] {escape(not_corrected_text(head))}")
    for name, item in doc.get("static", {}).items():
        console.print(f"static {name}: left {item['left']:.3f} D, right {item['right']:.3f} D")


def _analyze_batch(args: argparse.Namespace) -> int:
    from service.research.batch import BatchOptions, discover, run_batch
    from service.research.progress import StageProgress

    if args.fhir or args.json:
        raise InvalidParameterError("--fhir and --json are for one input; a batch writes "
                                    "RESULTS_DIR/NAME.json")
    for value, option in ((args.frames_csv, "--frames-csv"), (args.annotated, "--annotated"),
                          (args.figures, "--figures")):
        if value not in (None, PER_INPUT):
            raise InvalidParameterError(f"in a batch, give {option} without a file name: each input's "
                                        f"goes to {args.out}")
    inputs = discover(args.paths, exclude=args.out)
    options = BatchOptions(
        task=args.task.value if args.task else None, mirrored=args.mirrored,
        frames_csv=args.frames_csv is not None, annotated=args.annotated is not None,
        figures=args.figures is not None, config=args.config, verbose=args.verbose,
    )
    progress = None if args.quiet else StageProgress(sys.stderr, files=len(inputs))
    try:
        outcome = run_batch(inputs, args.out, options, jobs=args.jobs, redo=args.redo, progress=progress)
    finally:
        if progress is not None:
            progress.close()
    said = _console(stderr=True)  # a batch's results are files; what it says goes to stderr
    said.print(f"{len(inputs)} input(s): {len(outcome.analysed)} analysed, {len(outcome.reused)} already "
               f"done (skipped), {len(outcome.not_analysable)} not analysable, {len(outcome.unreadable)} "
               f"unreadable; summary: {args.out / 'summary.csv'}", soft_wrap=True, markup=False)
    for name in outcome.failed:
        said.print(f"  no scores: {name} (why: {args.out / (name + '.json')}, quality.reasons)",
                   soft_wrap=True, markup=False)
    return EXIT_NOT_ANALYSABLE if outcome.failed else EXIT_OK


def _check_fhir(args: argparse.Namespace, settings: Settings) -> tuple[StudyIdentity, str]:
    """Before analysing: the input is DICOM and the Patient ID's identifier system is known. Returns the
    study's identity from the header and that system."""
    from service.media.dicom_io import is_dicom
    from service.report.fhir import resolve_patient_system, study_identity_from_dicom

    path = args.paths[0]
    if not is_dicom(path):
        raise InvalidParameterError(
            f"--fhir needs a DICOM object (the identity comes from its header): {path}")
    identity = study_identity_from_dicom(path)
    try:
        system = resolve_patient_system(args.patient_system or settings.fhir_patient_identifier_system,
                                        identity.issuer_of_patient_id)
    except InvalidParameterError as exc:
        raise InvalidParameterError(
            f"--fhir: {exc}. Give --patient-system URI, or set fhir_patient_identifier_system in the "
            "--config file or FACESYM_FHIR_PATIENT_IDENTIFIER_SYSTEM"
        ) from None
    return identity, system


def _write_fhir(
    path: str, analysis: Analysis, out: Path, identity: StudyIdentity, system: str, reference_mode: str
) -> None:
    """The Bundle the service would send for this one DICOM object (same builder, same identifiers)."""
    from datetime import UTC, datetime

    from service.engine import ENGINE_VERSION
    from service.media.dicom_io import dicom_summary
    from service.report.fhir import build_bundle
    from service.report.sr import InstanceFinding, report_uids

    summary = dicom_summary(path)
    frames = summary.get("number_of_frames")
    finding = InstanceFinding(summary["sop_class_uid"], summary["sop_instance_uid"],
                              int(frames) if frames else None, analysis)
    bundle = build_bundle(
        identity, [finding],
        sr_sop_instance_uid=report_uids([summary["sop_instance_uid"]], ENGINE_VERSION)[1],
        engine_version=ENGINE_VERSION, issued=datetime.now(UTC),
        patient_identifier_system=system, reference_mode=reference_mode,  # type: ignore[arg-type]
    )
    out.write_text(json.dumps(bundle, indent=2, ensure_ascii=False) + "\n")


def _default_face() -> Path:
    return Path(__file__).resolve().parent / "phantom" / "data" / "demo_face.jpg"


def cmd_phantom(args: argparse.Namespace) -> int:
    from service import phantom

    out = Path(args.out)
    fmt = args.format or ("dicom" if out.suffix.lower() in (".dcm", ".dicom") else "mp4")
    head = phantom.HeadMotionSpec(roll_deg=args.roll, yaw_deg=args.yaw, pitch_deg=args.pitch,
                                  scale_pct=args.scale, shift_d=args.shift)
    if args.in_head_frame and not args.freeze_half:
        raise InvalidParameterError("--in-head-frame applies to --freeze-half")
    if args.freeze_half:
        if not args.clip:
            raise NotAnalysableError(["--freeze-half needs --clip PATH (a real clip)"])
        truth = phantom.freeze_half(args.clip, Side(args.freeze_half), out, fmt=fmt,
                                    amplitude=args.amplitude, in_head_frame=args.in_head_frame,
                                    head_motion=head)
    else:
        motions = tuple(
            phantom.TaskMotion(task, *getattr(args, task.value))
            for task in Task
            if getattr(args, task.value) is not None
        )
        if not motions:
            motions = (phantom.TaskMotion(Task.SMILE, 0.25, 0.25),)
        face = phantom.load_face(args.face or _default_face())
        truth = phantom.write_phantom(face, phantom.PhantomSpec(motions=motions), out, fmt=fmt,
                                      head_motion=None if head.still else head)
    _console().print(f"wrote {out} and {out.with_suffix('.json')}")
    _console().print_json(json.dumps(truth))
    return EXIT_OK


_SERVICE_DIR = str(Path(__file__).resolve().parent)


def phi_safe_warnings() -> None:
    """Every Python warning goes to logging (logger ``py.warnings``, WARNING) instead of stderr, and a
    warning raised outside FaceSym's own code is logged WITHOUT its text: libraries quote the values they
    check (highdicom: 'The string "Hopper" is unlikely to represent the intended person name…', three
    times per study), and those values are patient data. Category and code location stay, for support."""
    import warnings

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        where = f"{Path(filename).name}:{lineno}"
        if str(Path(filename).resolve()).startswith(_SERVICE_DIR):
            text = f"{category.__name__} at {where}: {message}"
        else:
            module = Path(filename).parent.name
            text = f"{category.__name__} from {module}/{where} (text withheld: it may quote patient data)"
        logging.getLogger("py.warnings").warning(text)

    warnings.showwarning = show


class PhiSafeFormatter(logging.Formatter):
    """Log lines as usual, tracebacks without third-party exception TEXT: the frames (file, line, function)
    and the exception's type stay, for support; the message stays for FaceSym's own errors (worded by us)
    and OSErrors (errno and strerror only), and is withheld for the rest, which quote the values they
    choke on (a highdicom or pydicom ValueError names the patient). Chained exceptions alike."""

    WITHHELD = "(message withheld: it may quote patient data)"

    @classmethod
    def message_of(cls, exc: BaseException) -> str:
        if isinstance(exc, FaceSymError):
            return str(exc)
        if isinstance(exc, OSError):
            return f"[Errno {exc.errno}] {exc.strerror}" if exc.errno is not None else cls.WITHHELD
        return cls.WITHHELD

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        import traceback

        chain: list[BaseException] = []
        exc: BaseException | None = ei[1]
        while exc is not None and all(exc is not e for e in chain):
            chain.append(exc)
            exc = exc.__cause__ or exc.__context__
        lines: list[str] = []
        for k, e in enumerate(reversed(chain)):
            if k:
                lines.append("The above exception led to the following one:")
            lines.append("Traceback (most recent call last):")
            lines += [f'  File "{fs.filename}", line {fs.lineno}, in {fs.name}'
                      for fs in traceback.extract_tb(e.__traceback__)]
            lines.append(f"{type(e).__module__}.{type(e).__qualname__}: {self.message_of(e)}")
        return "\n".join(lines)


def phi_safe_logging() -> None:
    """Every handler of the root logger formats tracebacks with :class:`PhiSafeFormatter`, and uncaught
    exceptions (main thread and other threads) are logged through it instead of Python's default printer,
    which writes the exception's text to stderr."""
    import sys
    import threading

    for handler in logging.getLogger().handlers:
        handler.setFormatter(PhiSafeFormatter(LOG_FORMAT))

    def uncaught(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        logging.getLogger("facesym").critical("uncaught exception", exc_info=(kind, value, tb))

    sys.excepthook = uncaught
    threading.excepthook = lambda a: uncaught(a.exc_type, a.exc_value or a.exc_type(), a.exc_traceback)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Commands that create or change the data dir (database, received objects, reports, audit, keys).
PATIENT_DATA_COMMANDS = ("serve", "worker", "db", "purge", "audit", "user", "report", "demo")


def private_files(data_dir: Path | None = None) -> None:
    """Files this process creates are its user's alone (0600; directories 0700), whatever the umask it
    was started with: the database, objects and reports hold patient data. With ``data_dir``, an existing
    data dir that others can read is closed to them too."""
    os.umask(os.umask(0o077) | 0o077)
    if data_dir is not None and data_dir.is_dir() and data_dir.stat().st_mode & 0o077:
        try:
            data_dir.chmod(0o700)
            log.warning("data_dir %s was readable by other users: now 0700", data_dir)
        except OSError as exc:
            log.warning("data_dir %s is readable by other users and cannot be closed: %s", data_dir, exc)


def cmd_serve(args: argparse.Namespace) -> int:
    from service.config import load_settings
    from service.jobs.scheduler import FaceSymService

    settings = load_settings(args.config)
    service_logging(settings.log_level)
    private_files(settings.data_dir)
    return _run_until_signalled(FaceSymService(settings))


#: Libraries that log routine work at INFO: APScheduler two lines per job run (~4 a second idle, ~63 MB a
#: day), Alembic its migration docstrings, fontTools ~200 lines per PDF, pynetdicom every association's
#: negotiation. Kept at WARNING unless FaceSym's own level is DEBUG; FaceSym logs one line per
#: association, job state change and delivery itself.
CHATTY_LOGGERS = ("apscheduler", "alembic", "fontTools", "matplotlib", "PIL", "pynetdicom")


def service_logging(level: str) -> None:
    """Set the log level of a long-running process: ``level`` for FaceSym (and the root logger), at
    least WARNING for :data:`CHATTY_LOGGERS` (unless ``level`` is DEBUG) and for SQLAlchemy always."""
    numeric = logging.getLevelName(level.upper())
    logging.getLogger().setLevel(numeric)
    for name in CHATTY_LOGGERS:
        quiet = numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING)
        logging.getLogger(name).setLevel(quiet)
    # SQLAlchemy logs statement PARAMETERS (patient names, IDs) at INFO/DEBUG: never below WARNING.
    logging.getLogger("sqlalchemy").setLevel(max(numeric, logging.WARNING))


def cmd_worker(args: argparse.Namespace) -> int:
    from service.config import load_settings
    from service.jobs.scheduler import FaceSymService

    settings = load_settings(args.config)
    if settings.workers < 1:
        raise FaceSymError("facesym worker needs workers >= 1 (FACESYM_WORKERS): it only analyses")
    service_logging(settings.log_level)
    private_files(settings.data_dir)
    return _run_until_signalled(FaceSymService(settings, receive=False))


def _run_until_signalled(service: FaceSymService) -> int:
    """Start ``service``, run until SIGTERM or SIGINT, then stop it cleanly."""
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    service.start()
    stop.wait()
    service.stop()
    return EXIT_OK


def cmd_db(args: argparse.Namespace) -> int:
    from service.audit.commands import missing_sqlite_file
    from service.config import load_settings
    from service.store.db import make_engine
    from service.store.schema import BASELINE, current_revision, head_revision, upgrade

    settings = load_settings(args.config)
    url = settings.effective_database_url
    missing = missing_sqlite_file(url)
    if missing is not None and args.db_command == "current":  # a look creates nothing
        print(f"none (no database at {missing}; newest is {head_revision()})")
        return 1
    if missing is not None and not getattr(args, "create", False):
        raise FaceSymError(f"no database at {missing}: nothing to upgrade (check --config / "
                           "FACESYM_DATA_DIR, or pass --create to make a new one)")
    if url.startswith("sqlite:///"):
        try:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FaceSymError(f"data_dir {settings.data_dir}: {exc.strerror}") from None
    engine = make_engine(url)
    try:
        if args.db_command == "upgrade":
            result = upgrade(engine)
            if result.stamped:
                print(f"database made by create_all: stamped at {BASELINE}, upgraded to {result.after}")
            elif result.before is None:
                print(f"empty database: schema created at revision {result.after}")
            elif result.changed:
                print(f"database upgraded: {result.before} -> {result.after}")
            else:
                print(f"database already at the newest revision {result.after}")
            return EXIT_OK
        current, head = current_revision(engine), head_revision()
        print(f"{current or 'none'}" + (" (head)" if current == head else f" (newest is {head})"))
        return EXIT_OK if current == head else 1
    finally:
        engine.dispose()


def cmd_report(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from service.config import load_settings
    from service.engine import ENGINE_VERSION
    from service.report.study_images import analysis_from_dict, render_pdf_for_study
    from service.store.db import Job, Study, open_database

    settings = load_settings(args.config)
    sessions = open_database(settings.effective_database_url)
    with sessions() as s:
        job = s.scalars(
            select(Job).join(Study).where(Study.study_uid == args.study_uid, Job.result_json != "")
            .order_by(Job.updated_at.desc())
        ).first()
    if job is None:
        raise NotAnalysableError([f"study {args.study_uid} has no analysis in this FaceSym's database"])
    docs = json.loads(job.result_json)
    analyses = [(d["sop_instance_uid"], analysis_from_dict(d), float(d["input"]["fps"])) for d in docs]
    render_pdf_for_study(
        [Path(d["input"]["path"]) for d in docs], analyses,
        engine_version=job.engine_version or ENGINE_VERSION, pdf_path=Path(args.pdf),
        gates=settings.engine_params.gates,  # for results that do not record their thresholds
        model_versions=sorted({g["model_version"] for d in docs if (g := d.get("grade"))}),
    )
    _console().print(f"wrote {args.pdf}")
    return EXIT_OK


def cmd_user(args: argparse.Namespace) -> int:
    import getpass

    from service.config import load_settings
    from service.users import add_user, issue_token, list_users

    settings = load_settings(args.config)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if args.user_command == "add":
        if args.password_file:
            password = Path(args.password_file).read_text().rstrip("\n")
        else:
            password = getpass.getpass(f"password for {args.username}: ")
            if password != getpass.getpass("again: "):
                _console().print("[bold red]error:[/] the passwords differ")
                return 1
        add_user(settings, args.username, password, args.role, update=args.update)
        _console().print(f"user {args.username} ({args.role}) saved")
    elif args.user_command == "token":
        print(issue_token(settings, args.username))
    else:
        for name, role, has_token in list_users(settings):
            print(f"{name}\t{role}\t{'token' if has_token else ''}")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from service.engine.grader.train import train

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True)) as progress:
        bars: dict[str, Any] = {}

        def tick(stage: str, done: int, total: int) -> None:
            if stage not in bars:
                bars[stage] = progress.add_task(stage, total=total)
            progress.update(bars[stage], completed=done, total=total)

        out = train(Path(args.manifest), Path(args.out), name=args.name, version=args.version, seed=args.seed,
                    epochs=args.epochs, folds=args.folds, progress=tick,
                    test_manifest=Path(args.test) if args.test else None)
    _console().print(f"model written to {out} (weights, model card, metrics, SHA256SUMS)")
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    from service.audit.commands import export_command, verify_command
    from service.config import load_settings

    settings = load_settings(args.config)
    if args.audit_command == "verify":
        return verify_command(settings)
    return export_command(settings, args.since, args.format)


def cmd_purge(args: argparse.Namespace) -> int:
    import getpass

    from service.audit import AuditTrail
    from service.audit.anchor import AuditAnchor
    from service.audit.commands import missing_sqlite_file
    from service.config import load_settings
    from service.store.db import open_database
    from service.store.files import FileStore
    from service.store.purge import purge

    settings = load_settings(args.config)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    missing = missing_sqlite_file(settings.effective_database_url)
    if missing is not None:  # nothing was ever stored: do not create a database to find that out
        _console().print(f"no database at {missing}: nothing to purge")
        return EXIT_OK
    sessions = open_database(settings.effective_database_url)
    trail = AuditTrail(sessions, source_id=settings.audit_source_id, anchor=AuditAnchor(settings.data_dir))
    report = purge(sessions, FileStore(settings.files_dir), older_than_days=args.older_than,
                   dry_run=args.dry_run, force=args.force, audit=trail.append, user=f"{user} (facesym purge)",
                   local_ae=settings.ae_title)
    console = _console()
    # One plain line per study (greppable in a timer's journal; a table would fold the 64-character UIDs).
    console.print(f"facesym purge: studies with no activity since {report.cutoff:%Y-%m-%d %H:%M} UTC"
                  + (" (dry run: nothing is removed)" if report.dry_run else ""), soft_wrap=True)
    for d in report.decisions:
        size = f"{d.files} files, {d.bytes / 1e6:.1f} MB; " if d.files else ""
        console.print(f"{d.action.upper():<12} {d.study_uid}  last activity {d.last_activity:%Y-%m-%d}; "
                      f"{size}{d.reason}", soft_wrap=True, markup=False)
    removed = report.with_action("removed", "would remove")
    verb = "would remove" if report.dry_run else "removed"
    summary = (
        f"{verb} {len(removed)} stud{'y' if len(removed) == 1 else 'ies'} "
        f"({sum(d.files for d in removed)} files, {sum(d.bytes for d in removed) / 1e6:.1f} MB); "
        f"kept {len(report.with_action('kept'))} (see why); "
        f"{report.recent} with activity in the last {args.older_than:g} days left alone"
        + (f"; {len(report.with_action('error'))} ERROR(S)" if not report.ok else "")
        + (f"; removed {report.leftovers_removed} leftover(s) of an interrupted purge"
           if report.leftovers_removed else "")
    )
    console.print(summary, soft_wrap=True, markup=False)
    return EXIT_OK if report.ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from service.config import load_settings
    from service.demo import run_demo

    console = _console()
    settings = load_settings(args.config)
    port = settings.demo_receiver_port if args.receiver_port is None else args.receiver_port
    results, impression = run_demo(settings, port)
    table = Table(title="Scores read back from the DICOM SR (sides are the patient's)")
    for col in ("instance", "task", "left", "right", "AI", "gate", "AS", "CS", "weaker", "grade*"):
        table.add_column(col)
    for group in results:
        for t in group["tasks"]:
            table.add_row(group["sop_instance_uid"][-12:], t["task"], f"{t['left']:.3f}", f"{t['right']:.3f}",
                          f"{t['asymmetry_index']:.2f}", f"{t['activation_gate']:.2f}",
                          f"{t['asymmetry_score']:.0f}", f"{t['cosine_score']:.0f}",
                          t["weaker_side"] or "none", _grade_cell(t.get("grade")))
        if not group["quality_ok"]:
            table.add_row(
                group["sop_instance_uid"][-12:], "not analysable", "; ".join(group["reasons"]), *[""] * 7
            )
    console.print(table)
    if impression:
        console.print(f"Impression (from the SR): {impression}", soft_wrap=True, markup=False)
    return EXIT_OK


def _grade_cell(label: object) -> str:
    """A task's House–Brackmann class from the deep grader (the caveat is printed with the finding)."""
    return f"HB {label}" if isinstance(label, str) and label else "–"


def _quiet_pydicom() -> None:
    """pydicom warns, and logs, about every malformed value it reads, quoting the value (patient names
    included), and logs a traceback for every frame it cannot decode. FaceSym reads hostile input by design,
    reports what it could not read in its own words, and logs no patient data: value checks on reading off
    (reading itself is unchanged; writing still validates) and pydicom's own log quiet."""
    from pydicom import config as pydicom_config

    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)


def safe_process_logging(verbose: bool) -> None:
    """Logging, warnings and pydicom's reading as every FaceSym process needs them (no patient data in
    logs): the command's own process, and each process a batch spawns (which inherits none of it)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format=LOG_FORMAT)
    _quiet_pydicom()
    phi_safe_warnings()
    phi_safe_logging()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    safe_process_logging(args.verbose)
    if args.command in PATIENT_DATA_COMMANDS:
        private_files()
    handlers = {
        "analyze": cmd_analyze, "phantom": cmd_phantom, "serve": cmd_serve, "demo": cmd_demo,
        "audit": cmd_audit, "train": cmd_train, "report": cmd_report,
        "purge": cmd_purge,
        "user": cmd_user, "worker": cmd_worker, "db": cmd_db,
    }
    said = _console(stderr=getattr(args, "json", None) == "-")
    try:
        return handlers[args.command](args)
    # Messages quote input (file names, decoder text): printed as text, never as rich markup.
    except UnreadableInputError as exc:
        said.print(f"[bold red]unreadable input:[/] {escape(str(exc))}", soft_wrap=True)
        return EXIT_UNREADABLE
    except NotAnalysableError as exc:
        said.print(f"[bold red]not analysable:[/] {escape(str(exc))}", soft_wrap=True)
        return EXIT_NOT_ANALYSABLE
    except FaceSymError as exc:
        said.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return exc.exit_code
    except TimeoutError as exc:
        said.print(f"[bold red]timed out:[/] {escape(str(exc))}", soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
