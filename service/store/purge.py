"""Retention: remove studies whose last activity is older than a number of days (``facesym purge``).

A study's *last activity* is the latest of: its last received object (``Study.last_received_at`` and every
``Instance.received_at``), its jobs' creation and last update, and its deliveries' completion. A study is
removed whole: its received files (``<study_uid>/``), its report folder (``reports/<study_uid>/``: SR, key
images, PDF, FHIR Bundle, console figures) and every file a row names, and its rows (deliveries, jobs,
instances, series, the study, and the patient when no other study refers to it). The audit trail keeps
its records (append-only) and gains one 110105 "DICOM Study Deleted" per removed study.

Never removed unless ``force``: a study with a job that is not finished (RECEIVED, QUEUED, RUNNING), whose
analysis FAILED (no result went out), or with a delivery that is PENDING or FAILED (a result not yet
delivered). With ``force`` those are removed too and their audit record says so.

Order, so that a crash or a concurrent C-STORE loses nothing: in one write transaction (SQLite
``BEGIN IMMEDIATE``; PostgreSQL ``SELECT ... FOR UPDATE`` of the study row) the study is checked again,
its rows are deleted and its two folders are renamed (atomic, same filesystem) into ``.purging/``; then
the transaction commits. A failed commit renames the folders back. Only after the commit are the
renamed folders deleted; leftovers of a crash there are removed by the next run (:func:`sweep_leftovers`).
An object received for the study while it is being removed either commits first (then the study has new
activity and is kept) or fails (its sender is not told "stored" and sends it again).

Output names Study Instance UIDs only, never patient data.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from service.audit.events import MINOR_FAILURE, SUCCESS, AuditEvent, study_deleted
from service.errors import InvalidParameterError
from service.store.db import Delivery, DeliveryState, Instance, Job, JobState, Patient, Series, Study
from service.store.files import FileStore, check_uid, fsync_dir

log = logging.getLogger(__name__)

PURGING = ".purging"
#: Job states that mean "not finished yet": the study's result has not been made.
UNFINISHED = (JobState.RECEIVED, JobState.QUEUED, JobState.RUNNING)
UNDELIVERED = (DeliveryState.PENDING, DeliveryState.FAILED)

Action = Literal["removed", "would remove", "kept", "error"]


@dataclass(frozen=True)
class StudyDecision:
    """What purge did (or would do) with one study older than the cut-off."""

    study_uid: str
    last_activity: datetime
    action: Action
    reason: str
    files: int = 0
    bytes: int = 0


@dataclass
class PurgeReport:
    """Every study older than the cut-off with what happened to it, and how many were recent."""

    cutoff: datetime
    dry_run: bool
    force: bool
    decisions: list[StudyDecision] = field(default_factory=list)
    recent: int = 0
    leftovers_removed: int = 0

    def with_action(self, *actions: Action) -> list[StudyDecision]:
        return [d for d in self.decisions if d.action in actions]

    @property
    def ok(self) -> bool:
        return not self.with_action("error")


def _aware(t: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes (stored as UTC)."""
    if t is None:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def last_activity(s: Session, study: Study) -> datetime:
    """The latest activity of ``study`` (see the module docstring)."""
    times: list[datetime | None] = [_aware(study.last_received_at)]
    times.append(_aware(s.scalar(
        select(func.max(Instance.received_at)).join(Series, Instance.series_pk == Series.id)
        .where(Series.study_pk == study.id)
    )))
    for created, updated in s.execute(select(Job.created_at, Job.updated_at).where(Job.study_pk == study.id)):
        times += [_aware(created), _aware(updated)]
    times.append(_aware(s.scalar(
        select(func.max(Delivery.delivered_at)).join(Job, Delivery.job_pk == Job.id)
        .where(Job.study_pk == study.id)
    )))
    return max(t for t in times if t is not None)


def blockers(s: Session, study: Study) -> list[str]:
    """Why ``study`` must stay (empty: it may go): unfinished or FAILED jobs, undelivered results."""
    why: list[str] = []
    for job_id, state, engine in s.execute(
        select(Job.id, Job.state, Job.engine_version).where(Job.study_pk == study.id).order_by(Job.id)
    ):
        if state in UNFINISHED:
            what = "running" if state is JobState.RUNNING else "not analysed yet"
            why.append(f"job {job_id} (engine {engine}) is {state.value}: {what}")
        elif state is JobState.FAILED:
            why.append(f"job {job_id} (engine {engine}) FAILED: no result was delivered")
    rows = s.execute(
        select(Delivery.state, func.count()).join(Job, Delivery.job_pk == Job.id)
        .where(Job.study_pk == study.id, Delivery.state.in_(UNDELIVERED)).group_by(Delivery.state)
    ).all()
    for dstate, n in sorted(rows, key=lambda r: r[0].value):
        why.append(f"{n} {dstate.value} deliver{'y' if n == 1 else 'ies'}: result not delivered")
    return why


def _study_files(s: Session, files: FileStore, study: Study) -> tuple[list[Path], list[Path]]:
    """(folders, extra files): the study's two folders, and files rows name outside them."""
    uid = check_uid(study.study_uid, "StudyInstanceUID")
    folders = [files.root / uid, files.root / "reports" / uid]
    named: list[str] = list(s.scalars(
        select(Instance.path).join(Series, Instance.series_pk == Series.id).where(Series.study_pk == study.id)
    ))
    for sr_path, report_files in s.execute(
        select(Job.sr_path, Job.report_files).where(Job.study_pk == study.id)
    ):
        if sr_path:
            named += [sr_path, str(Path(sr_path).with_suffix(".fhir.json"))]
        try:
            named += [str(p) for p in json.loads(report_files or "[]")]
        except ValueError:
            log.warning("study %s: a job's report_files is not JSON; only its folders are removed", uid)
    extra: list[Path] = []
    for rel in named:
        try:
            path = files.abspath(rel)
        except InvalidParameterError:
            log.warning("study %s: a row names a path outside the file store; not touched", uid)
            continue
        if not any(f == path or f in path.parents for f in folders) and path.exists():
            extra.append(path)
    return folders, extra


def _size(paths: Iterable[Path]) -> tuple[int, int]:
    n = size = 0
    for p in paths:
        if p.is_dir():
            for sub in p.rglob("*"):
                if sub.is_file() and not sub.is_symlink():
                    n += 1
                    size += sub.stat().st_size
        elif p.is_file():
            n += 1
            size += p.stat().st_size
    return n, size


def _lock_study(s: Session, study_pk: int) -> Study | None:
    """Start the write transaction and load the study under it (see the module docstring)."""
    if s.get_bind().dialect.name == "sqlite":
        s.execute(text("BEGIN IMMEDIATE"))
        return s.get(Study, study_pk)
    return s.scalar(select(Study).where(Study.id == study_pk).with_for_update())


def _delete_rows(s: Session, study: Study) -> None:
    job_ids = select(Job.id).where(Job.study_pk == study.id).scalar_subquery()
    series_ids = select(Series.id).where(Series.study_pk == study.id).scalar_subquery()
    s.execute(delete(Delivery).where(Delivery.job_pk.in_(job_ids)))
    s.execute(delete(Job).where(Job.study_pk == study.id))
    s.execute(delete(Instance).where(Instance.series_pk.in_(series_ids)))
    s.execute(delete(Series).where(Series.study_pk == study.id))
    patient_pk = study.patient_pk
    s.execute(delete(Study).where(Study.id == study.id))
    others = s.scalar(select(func.count()).select_from(Study).where(Study.patient_pk == patient_pk))
    if not others:
        s.execute(delete(Patient).where(Patient.id == patient_pk))
    s.flush()


def _move_aside(files: FileStore, paths: list[Path]) -> list[tuple[Path, Path]]:
    """Rename each existing path into ``.purging/`` (same filesystem: atomic); returns (from, to) pairs."""
    trash = files.root / PURGING
    trash.mkdir(exist_ok=True)
    moved: list[tuple[Path, Path]] = []
    try:
        for p in paths:
            if not p.exists():
                continue
            dest = trash / f"{p.name}.{secrets.token_hex(4)}"
            os.replace(p, dest)
            moved.append((p, dest))
        for parent in {p.parent for p, _ in moved} | {trash}:
            fsync_dir(parent)
    except OSError:
        _move_back(moved)
        raise
    return moved


def _move_back(moved: list[tuple[Path, Path]]) -> None:
    """Undo :func:`_move_aside`, merging into a folder that was made again meanwhile (nothing replaced)."""
    for original, aside in reversed(moved):
        try:
            if not original.exists():
                original.parent.mkdir(parents=True, exist_ok=True)
                os.replace(aside, original)
                continue
            for sub in sorted(aside.rglob("*")):
                target = original / sub.relative_to(aside)
                if sub.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                elif not target.exists():
                    os.replace(sub, target)
            shutil.rmtree(aside, ignore_errors=True)
        except OSError:
            log.exception("could not move %s back to %s; kept in %s", aside.name, original, aside.parent)


def sweep_leftovers(files: FileStore) -> int:
    """Delete what a crashed purge left in ``.purging/`` (already gone from the database); return how many."""
    trash = files.root / PURGING
    if not trash.is_dir():
        return 0
    n = 0
    for entry in trash.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        n += 1
    return n


def purge(
    sessions: sessionmaker[Session],
    files: FileStore,
    *,
    older_than_days: float,
    dry_run: bool = False,
    force: bool = False,
    audit: Callable[[AuditEvent], object] | None = None,
    user: str = "",
    local_ae: str = "FACESYM",
    now: datetime | None = None,
) -> PurgeReport:
    """Remove (or with ``dry_run`` list) the studies whose last activity is older than ``older_than_days``.

    ``audit`` receives one 110105 event per removed study (e.g. ``AuditTrail.append``); ``user`` is who ran
    it. Returns a :class:`PurgeReport`; a study that could not be removed is an ``error`` decision and keeps
    its files and rows.
    """
    if not older_than_days > 0:
        raise InvalidParameterError(f"--older-than must be a number of days > 0, got {older_than_days}")
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(days=older_than_days)
    report = PurgeReport(cutoff, dry_run, force)
    if not dry_run:
        report.leftovers_removed = sweep_leftovers(files)
    with sessions() as s:
        total = int(s.scalar(select(func.count()).select_from(Study)) or 0)
        candidates = list(
            s.scalars(select(Study.id).where(Study.last_received_at < cutoff).order_by(Study.id))
        )
    report.recent = total - len(candidates)
    for study_pk in candidates:
        decision = _purge_one(sessions, files, study_pk, cutoff, dry_run, force, audit, user, local_ae,
                              older_than_days)
        if decision is None:  # gone meanwhile
            continue
        if decision.action == "kept" and decision.reason.startswith("recent activity"):
            report.recent += 1
            continue
        report.decisions.append(decision)
    return report


def _purge_one(
    sessions: sessionmaker[Session],
    files: FileStore,
    study_pk: int,
    cutoff: datetime,
    dry_run: bool,
    force: bool,
    audit: Callable[[AuditEvent], object] | None,
    user: str,
    local_ae: str,
    days: float,
) -> StudyDecision | None:
    with sessions() as s:
        study = s.get(Study, study_pk) if dry_run else _lock_study(s, study_pk)
        if study is None:
            return None
        uid = study.study_uid
        last = last_activity(s, study)
        if last >= cutoff:
            return StudyDecision(uid, last, "kept", "recent activity")
        why = blockers(s, study)
        try:
            folders, extra = _study_files(s, files, study)
        except InvalidParameterError as exc:  # a study row whose UID cannot name a folder
            return StudyDecision(uid, last, "error", str(exc))
        n_files, n_bytes = _size(folders + extra)
        if why and not force:
            return StudyDecision(uid, last, "kept", "; ".join(why))
        reason = f"last activity {last:%Y-%m-%d} is older than {days:g} days"
        if why:
            reason += " (forced: " + "; ".join(why) + ")"
        if dry_run:
            return StudyDecision(uid, last, "would remove", reason, n_files, n_bytes)
        sop_classes = Counter(s.scalars(
            select(Instance.sop_class_uid).join(Series, Instance.series_pk == Series.id)
            .where(Series.study_pk == study.id)
        ))
        patient = s.get(Patient, study.patient_pk)
        patient_key = {"patient_id": patient.patient_id, "issuer": patient.issuer} if patient else None
        moved: list[tuple[Path, Path]] = []
        try:
            _delete_rows(s, study)
            moved = _move_aside(files, folders + extra)
            s.commit()
        except Exception as exc:  # noqa: BLE001 - reported per study; nothing is lost
            s.rollback()
            _move_back(moved)
            log.error("study %s not removed: %s", uid, type(exc).__name__)
            return StudyDecision(uid, last, "error", f"not removed: {type(exc).__name__}: {exc}")
    outcome, note = SUCCESS, ""
    for _, aside in moved:
        try:
            if aside.is_dir():
                shutil.rmtree(aside)
            else:
                aside.unlink()
        except OSError as exc:
            outcome = MINOR_FAILURE
            note = f"; files left in {PURGING}/ for the next run ({type(exc).__name__})"
    if moved:
        fsync_dir(files.root / PURGING)
    log.info("study %s removed (%d files): %s", uid, n_files, reason)
    if audit is not None:
        try:
            audit(study_deleted(uid, sop_classes, user=user, outcome=outcome, patient=patient_key,
                                local_ae=local_ae, description=f"retention purge: {reason}{note}"))
        except Exception as exc:  # noqa: BLE001 - the study is gone: say loudly that its record is missing
            log.error("study %s removed but its audit record was not written: %s", uid, type(exc).__name__)
            return StudyDecision(uid, last, "error", f"removed, but the audit record was NOT written "
                                 f"({type(exc).__name__}: {exc})", n_files, n_bytes)
    return StudyDecision(uid, last, "removed", reason + note, n_files, n_bytes)
