"""The one orchestrator: claim a due job → load the study → analyse → SR → deliveries. State lives in the DB.

Job states: RECEIVED (waiting for the study to be quiet) → QUEUED → RUNNING → REPORTED → DELIVERED, or
FAILED(reason) after ``max_attempts``. A destination that is down delays a delivery, never loses it.
Logs carry job ids and UIDs only.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import ColumnElement, and_, or_, select, text, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.audit import (
    MINOR_FAILURE,
    SERIOUS_FAILURE,
    SUCCESS,
    AuditEvent,
    AuditTrail,
    analysis_event,
    export,
)
from service.config import Destination, Settings
from service.dicom.scu import DeliveryError, send_files
from service.errors import InvalidParameterError
from service.jobs.analysis import InstanceAnalysis, InstanceInput, analyse_study
from service.jobs.rules import assign_task
from service.report.comparison import PriorStudy
from service.report.jsonout import analysis_dict

if TYPE_CHECKING:  # the report builders import matplotlib: loaded when a job runs
    from service.report.study_images import WrittenObjects
from service.store.db import (
    RECEIVER_STARTED_AT,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Series,
    ServiceState,
    Study,
    utcnow,
)
from service.store.files import FileStore

log = logging.getLogger(__name__)

Analyser = Callable[[list[InstanceInput]], list[InstanceAnalysis]]
DEFAULT_LEASE_SECONDS = 120.0


class MissingReportError(DeliveryError):
    """The report file to send is not in the store (deleted or never built): retrying cannot help, so the
    delivery FAILS with this reason and an operator re-runs the analysis."""

    retryable = False


@dataclass
class WorkerContext:
    settings: Settings
    sessions: sessionmaker[Session]
    files: FileStore
    engine_version: str
    worker_id: str
    analyser: Analyser = analyse_study
    audit: AuditTrail | None = None

    def audit_record(self, event: AuditEvent) -> None:
        if self.audit is not None:
            self.audit.record(event)


def backoff(settings: Settings, attempts: int) -> timedelta:
    """Exponential backoff: base · 2^(attempts − 1), capped at retry_max_seconds."""
    return timedelta(
        seconds=min(settings.retry_max_seconds, settings.retry_base_seconds * 2 ** max(0, attempts - 1))
    )


def _aware(t: datetime) -> datetime:
    # SQLite returns naive datetimes even for timezone-aware columns; everything we store is UTC.
    return t if t.tzinfo else t.replace(tzinfo=utcnow().tzinfo)


def database_dialect(sessions: sessionmaker[Session]) -> str:
    """"sqlite" or "postgresql" (the SQLAlchemy dialect name of the session factory's engine)."""
    with sessions() as s:
        return s.get_bind().dialect.name


def _write_lock(s: Session) -> None:
    """SQLite: take the database's one writer lock now (BEGIN IMMEDIATE), so that what this transaction
    reads cannot change before it writes. First statement of the transaction; a no-op elsewhere."""
    if s.get_bind().dialect.name == "sqlite":
        s.execute(text("BEGIN IMMEDIATE"))


def _locked_job(s: Session, job_id: int) -> Job | None:
    """The job row, locked for this transaction (PostgreSQL: SELECT ... FOR UPDATE; SQLite: the writer
    lock): a worker finishing a job and another taking over its expired lease cannot both win."""
    _write_lock(s)
    return s.scalar(select(Job).where(Job.id == job_id).with_for_update())


def recover_interrupted(sessions: sessionmaker[Session]) -> int:
    """At start-up: jobs left RUNNING by a crash go back to QUEUED, and deliveries it was sending are
    released at once (not after their lease). Returns how many jobs.

    Only right when this process is the database's only worker (SQLite, one machine): with shared
    PostgreSQL, another worker's RUNNING job is alive, and expired leases do this job (claim_next_job).
    """
    with sessions.begin() as s:
        n = cast(
            CursorResult[Any],
            s.execute(
                update(Job)
                .where(Job.state == JobState.RUNNING)
                .values(state=JobState.QUEUED, claimed_by="", lease_expires_at=None)
            ),
        ).rowcount
        s.execute(
            update(Delivery).where(Delivery.claimed_by != "").values(claimed_by="", lease_expires_at=None)
        )
    if n:
        log.warning("recovered %d job(s) left RUNNING by an earlier process", n)
    return int(n or 0)


def promote_stable_studies(
    sessions: sessionmaker[Session], quiet_seconds: float, now: datetime | None = None
) -> list[int]:
    """RECEIVED jobs whose study has been quiet for ``quiet_seconds`` become QUEUED.

    Not within ``quiet_seconds`` of the receiver's last start (:func:`mark_receiver_started`), whichever
    process promotes: senders could not reach us while it was down, so a study still arriving then gets a
    whole quiet period from the restart, or a modality's resend would find it analysed half-received.

    Safe with several processes: the due jobs are read again and promoted under a lock (SQLite's writer
    lock; on PostgreSQL ``FOR UPDATE OF job, study SKIP LOCKED``, so a study that an association is writing
    right now waits for the next tick, and the promoting UPDATE only moves jobs still RECEIVED).
    """
    now = now or utcnow()
    cutoff = now - timedelta(seconds=quiet_seconds)
    due = (
        select(Job.id)
        .join(Study, Job.study_pk == Study.id)
        .where(Job.state == JobState.RECEIVED, Study.last_received_at <= cutoff)
        .order_by(Job.id)
    )
    with sessions() as s:  # cheap look first: most ticks find nothing and take no lock
        if s.scalar(due.limit(1)) is None:
            return []
        started = s.get(ServiceState, RECEIVER_STARTED_AT)
        if started is not None and _aware(started.at) > cutoff:
            return []
    with sessions.begin() as s:
        _write_lock(s)  # (SQLite renders no FOR UPDATE: its writer lock does that job)
        ids = list(s.scalars(due.with_for_update(of=[Job.__table__, Study.__table__], skip_locked=True)))
        if ids:
            s.execute(
                update(Job)
                .where(Job.id.in_(ids), Job.state == JobState.RECEIVED)
                .values(state=JobState.QUEUED, next_run_at=now)
            )
    for job_id in ids:
        log.info("job %d queued (study quiet for %gs)", job_id, quiet_seconds)
    return ids


def mark_receiver_started(sessions: sessionmaker[Session], now: datetime | None = None) -> None:
    """Note that the receiver (the DICOM SCP) starts now; see :func:`promote_stable_studies`."""
    now = now or utcnow()
    for attempt in (1, 2):  # two receivers starting at once on PostgreSQL: the second insert loses, updates
        try:
            with sessions.begin() as s:
                _write_lock(s)
                row = s.get(ServiceState, RECEIVER_STARTED_AT, with_for_update=True)
                if row is None:
                    s.add(ServiceState(name=RECEIVER_STARTED_AT, at=now))
                else:
                    row.at = now
            return
        except IntegrityError:
            if attempt == 2:
                raise


def _claimable_job(now: datetime) -> ColumnElement[bool]:
    """Due QUEUED jobs, and RUNNING jobs whose lease has expired (their worker died or hung)."""
    return or_(
        and_(Job.state == JobState.QUEUED, Job.next_run_at <= now),
        and_(
            Job.state == JobState.RUNNING,
            or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now),
        ),
    )


def claim_next_job(
    sessions: sessionmaker[Session],
    worker_id: str,
    now: datetime | None = None,
    *,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    max_attempts: int | None = None,
) -> int | None:
    """Atomically move one due QUEUED job (or a RUNNING one whose lease expired) to RUNNING, claimed by
    ``worker_id`` with a lease of ``lease_seconds``; None when nothing is due.

    PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED`` (racing workers pass over each other's rows);
    SQLite: the writer lock (BEGIN IMMEDIATE) and a conditional UPDATE on the same condition. A taken-over
    job whose ``attempts`` already reached ``max_attempts`` (its workers keep dying on it) becomes FAILED.
    """
    now = now or utcnow()
    lease_until = now + timedelta(seconds=lease_seconds)
    query = (
        select(Job.id, Job.state, Job.attempts).where(_claimable_job(now)).order_by(Job.next_run_at).limit(5)
    )
    with sessions() as s:  # cheap look first: an idle tick takes no lock
        if s.execute(query.limit(1)).first() is None:
            return None
    with sessions.begin() as s:
        _write_lock(s)
        candidates = s.execute(query.with_for_update(of=Job.__table__, skip_locked=True)).all()
        for job_id, state, attempts in candidates:
            claim = update(Job).where(Job.id == job_id, Job.attempts == attempts, _claimable_job(now))
            if state is JobState.RUNNING and max_attempts is not None and attempts >= max_attempts:
                reason = f"its worker was lost {attempts} time(s) while analysing (killed, crashed or hung)"
                s.execute(claim.values(state=JobState.FAILED, reason=reason, claimed_by="",
                                       lease_expires_at=None, updated_at=now))
                log.error("job %d FAILED: %s", job_id, reason)
                continue
            got = cast(
                CursorResult[Any],
                s.execute(
                    claim.values(
                        state=JobState.RUNNING,
                        claimed_by=worker_id,
                        attempts=Job.attempts + 1,
                        lease_expires_at=lease_until,
                        updated_at=now,
                    )
                ),
            ).rowcount
            if got == 1:
                if state is JobState.RUNNING:
                    log.warning("job %d: its worker's lease expired; taken over by %s", job_id, worker_id)
                return int(job_id)
    return None


class Heartbeat:
    """Renews a claim's lease (``lease_expires_at`` = now + ``lease_seconds``) every third of the lease
    while the ``with`` block runs, as long as the row still matches ``claim`` (column = value). When it does
    not (another worker took the row over), ``lost`` becomes True and renewing stops."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        model: type[Job] | type[Delivery],
        row_id: int,
        claim: dict[str, Any],
        lease_seconds: float,
    ) -> None:
        self.sessions, self.model, self.row_id, self.claim = sessions, model, row_id, claim
        self.lease_seconds = lease_seconds
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{model.__tablename__}-{row_id}",
                                        daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        model = self.model
        conditions = [getattr(model, k) == v for k, v in self.claim.items()]
        while not self._stop.wait(max(0.2, self.lease_seconds / 3)):
            try:
                with self.sessions.begin() as s:
                    n = cast(
                        CursorResult[Any],
                        s.execute(
                            update(model)
                            .where(model.id == self.row_id, *conditions)
                            .values(lease_expires_at=utcnow() + timedelta(seconds=self.lease_seconds))
                        ),
                    ).rowcount
            except Exception as exc:  # noqa: BLE001 - the database may be back before the lease ends
                log.warning("%s %d: lease not renewed (%s)", model.__tablename__, self.row_id,
                            type(exc).__name__)
                continue
            if n != 1:
                self.lost = True
                log.warning("%s %d: lease lost (taken over by another worker)", model.__tablename__,
                            self.row_id)
                return


def _inputs(
    s: Session, files: FileStore, study: Study, rules: tuple[tuple[str, str], ...]
) -> list[InstanceInput]:
    rows = s.execute(
        select(Instance, Series)
        .join(Series, Instance.series_pk == Series.id)
        .where(Series.study_pk == study.id)
    ).all()
    latest: dict[str, tuple[Instance, Series]] = {}
    for inst, series in rows:
        if inst.facesym_output:
            continue  # our own key images / PDF come back from the PACS: never analysed
        if inst.sop_instance_uid not in latest or inst.version > latest[inst.sop_instance_uid][0].version:
            latest[inst.sop_instance_uid] = (inst, series)
    items = sorted(
        latest.values(), key=lambda r: (r[1].series_number or 0, r[0].instance_number or 0, r[0].id)
    )
    return [
        InstanceInput(
            sop_instance_uid=inst.sop_instance_uid,
            sop_class_uid=inst.sop_class_uid,
            path=files.abspath(inst.path),
            task_hint=assign_task(
                (series.series_description, series.protocol_name, inst.image_comments,
                 series.performed_procedure_step_description),
                rules,
            ),
            number_of_frames=inst.number_of_frames,
            order=k,
        )
        for k, (inst, series) in enumerate(items)
    ]


def process_job(ctx: WorkerContext, job_id: int) -> JobState:
    """Run one claimed job to REPORTED (with PENDING deliveries), back to RECEIVED (new data arrived while it
    ran), QUEUED (retry later) or FAILED. Never raises for bad input; a bug is retried, then FAILED.

    A heartbeat renews the job's lease while it runs. If the lease was lost all the same (this worker hung
    past it and another took the job over), the outcome is dropped and the job's current state returned."""
    with ctx.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None, f"job {job_id} vanished"
        study = s.get(Study, job.study_pk)
        assert study is not None
        study_uid, started = study.study_uid, utcnow()
        received_before = _aware(study.last_received_at)
        inputs = _inputs(s, ctx.files, study, ctx.settings.task_rules)
        # This claim: if the lease expires and another worker takes the job over, these change.
        claim = {"state": JobState.RUNNING, "claimed_by": job.claimed_by, "attempts": job.attempts}
    with Heartbeat(ctx.sessions, Job, job_id, claim, ctx.settings.lease_seconds):
        return _process_claimed(ctx, job_id, claim, study_uid, started, received_before, inputs)


def _holds(row: Job | Delivery, claim: dict[str, Any]) -> bool:
    """Whether ``row`` is still under this claim (nobody took it over after its lease expired)."""
    return all(getattr(row, k) == v for k, v in claim.items())


def _process_claimed(
    ctx: WorkerContext,
    job_id: int,
    claim: dict[str, Any],
    study_uid: str,
    started: datetime,
    received_before: datetime,
    inputs: list[InstanceInput],
) -> JobState:
    from service.report.sr import InstanceFinding
    from service.report.sr_io import write_report

    log.info("job %d: analysing study %s (%d instances)", job_id, study_uid, len(inputs))
    ae = ctx.settings.ae_title
    ctx.audit_record(analysis_event("begun", job_id, study_uid, local_ae=ae,
                                    sop_classes=Counter(i.sop_class_uid for i in inputs)))
    try:
        if not inputs:
            raise RuntimeError("study has no instances")
        results = ctx.analyser(inputs)
        findings = [
            InstanceFinding(
                r.source.sop_class_uid, r.source.sop_instance_uid, r.source.number_of_frames, r.analysis
            )
            for r in results
        ]
        priors = _prior_jobs(ctx, study_uid)
        comparison = _prior_studies(priors)
        with ctx.sessions() as s:  # the study's earlier report, superseded if the new one differs
            earlier = s.get(Job, job_id)
            replaces = ctx.files.abspath(earlier.sr_path) if earlier is not None and earlier.sr_path else None
        # The key images first: the SR draws the measurements on them (SCOORDs that reference them).
        written = _report_objects(ctx, job_id, study_uid, results, comparison)
        report_files = written.paths
        sr_path, sr_uid = write_report(
            [r.source.path for r in results],
            findings,
            ctx.files.abspath(f"reports/{study_uid}"),
            ctx.engine_version,
            prior_reports=[ctx.files.abspath(job.sr_path) for _, job in priors if job.sr_path],
            key_images=written.regions,
            comparison=comparison,
            replaces=replaces,
        )
        docs = [_result_doc(r) for r in results]
        fhir_error = _write_bundle(
            ctx, Path(sr_path), sr_uid, results[0].source.path, findings, started, comparison
        )
    except Exception as exc:  # noqa: BLE001 - a bug must not kill the worker; retried, then FAILED
        reason = f"{type(exc).__name__}: {exc}"
        state = _retry_or_fail(ctx, job_id, reason, claim)
        outcome = SERIOUS_FAILURE if state is JobState.FAILED else MINOR_FAILURE
        ctx.audit_record(analysis_event("finished", job_id, study_uid, outcome, reason, local_ae=ae))
        return state

    with ctx.sessions.begin() as s:
        job = _locked_job(s, job_id)
        study = s.get(Study, job.study_pk) if job else None
        if job is None or study is None:
            return JobState.FAILED
        if not _holds(job, claim):
            log.warning("job %d: lease lost to %s; this result is dropped", job_id, job.claimed_by or "none")
            return job.state
        new_data = _aware(study.last_received_at) > received_before
        job.lease_expires_at = None
        if new_data:
            job.state, job.claimed_by = JobState.RECEIVED, ""
        else:
            job.state, job.reason, job.claimed_by = JobState.REPORTED, "", ""
            job.sr_path = str(Path(sr_path).relative_to(ctx.files.root))
            job.sr_sop_instance_uid = sr_uid
            job.report_files = json.dumps([str(p.relative_to(ctx.files.root)) for p in report_files])
            job.result_json = json.dumps(docs)
            rows = {d.destination: d for d in job.deliveries}
            for target in [str(d) for d in ctx.settings.destinations] + list(ctx.settings.fhir_targets):
                # A Bundle that could not be built is a FAILED delivery with the reason, never sent.
                failed = target.startswith("fhir") and fhir_error
                d = rows.get(target) or Delivery(job_pk=job.id, destination=target)
                d.state = DeliveryState.FAILED if failed else DeliveryState.PENDING
                d.attempts, d.next_run_at = 0, started
                d.claimed_by, d.lease_expires_at = "", None
                d.last_error = fhir_error if failed else ""
                s.add(d)
    if new_data:
        log.info("job %d: new instances arrived while running; waiting for the study to be quiet again",
                 job_id)
        ctx.audit_record(
            analysis_event("finished", job_id, study_uid, MINOR_FAILURE, "new instances arrived", local_ae=ae)
        )
        return JobState.RECEIVED
    log.info("job %d: reported as SR %s", job_id, sr_uid)
    ctx.audit_record(analysis_event("finished", job_id, study_uid, sr_uid=sr_uid, local_ae=ae))
    return JobState.REPORTED


def _report_objects(
    ctx: WorkerContext,
    job_id: int,
    study_uid: str,
    results: list[InstanceAnalysis],
    comparison: list[PriorStudy],
) -> WrittenObjects:
    """Key images (DICOM SC) and the PDF report (Encapsulated PDF) beside the SR. Pictures must never block
    the numbers: a failure here is logged and the SR still goes out (without drawn regions)."""
    from service.report.study_images import WrittenObjects, build_report_objects

    try:
        return build_report_objects(
            [r.source.path for r in results],
            [(r.source.sop_instance_uid, r.analysis, r.fps) for r in results],
            engine_version=ctx.engine_version,
            out_dir=ctx.files.abspath(f"reports/{study_uid}"),
            gates=ctx.settings.engine_params.gates,  # the thresholds this analysis was scored with
            model_versions=sorted(
                {t.grade.model_version for r in results for t in r.analysis.tasks if t.grade is not None}
            ),
            comparison=comparison,
        )
    except Exception:  # noqa: BLE001 - see the docstring
        log.exception("job %d: key images / PDF not built", job_id)
        return WrittenObjects([])


def _prior_jobs(ctx: WorkerContext, study_uid: str) -> list[tuple[Study, Job]]:
    """The same patient's other analysed studies (same Patient row: PatientID + issuer + name) and their
    reported jobs, oldest study first."""
    with ctx.sessions() as s:
        study = s.scalar(select(Study).where(Study.study_uid == study_uid))
        if study is None:
            return []
        rows = s.execute(
            select(Study, Job).join(Job, Job.study_pk == Study.id).where(
                Study.patient_pk == study.patient_pk, Study.id != study.id, Job.result_json != "",
                Job.state.in_([JobState.REPORTED, JobState.DELIVERED]),
            ).order_by(Study.study_date)
        ).all()
        return [(other, job) for other, job in rows]


def _prior_studies(priors: list[tuple[Study, Job]]) -> list[PriorStudy]:
    """Each earlier study's task Asymmetry Scores, for the report's before/after comparison."""
    out = []
    for other, job in priors:
        scores: dict[str, float] = {}
        for doc in json.loads(job.result_json):
            for task in doc.get("tasks", []):
                scores.setdefault(task["task"], float(task["asymmetry_score"]))
        if scores:
            out.append(PriorStudy(other.study_date, other.study_description, scores))
    return out


def bundle_path(sr_path: Path) -> Path:
    """Where the FHIR Bundle of a report lives: beside its SR."""
    return sr_path.with_suffix(".fhir.json")


def _write_bundle(
    ctx: WorkerContext,
    sr_path: Path,
    sr_uid: str,
    source: Path,
    findings: list[Any],
    issued: datetime,
    comparison: list[PriorStudy],
) -> str:
    """Build, validate and store the study's FHIR Bundle beside the SR. Returns "" or why it could not be
    built (for instance no patient identifier system): the SR still goes out, the FHIR delivery FAILS."""
    if not ctx.settings.fhir_targets:
        return ""
    from service.report.fhir import build_bundle, study_identity_from_dicom

    try:
        bundle = build_bundle(
            study_identity_from_dicom(source), findings, sr_sop_instance_uid=sr_uid,
            engine_version=ctx.engine_version, issued=issued,
            patient_identifier_system=ctx.settings.fhir_patient_identifier_system,
            reference_mode=ctx.settings.fhir_reference_mode,  # type: ignore[arg-type]
            comparison=comparison,
        )
    except InvalidParameterError as exc:
        log.error("FHIR Bundle for SR %s not built: %s", sr_uid, exc)
        return f"FHIR Bundle not built: {exc}"
    path = bundle_path(sr_path)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(bundle, ensure_ascii=False))
    tmp.replace(path)
    return ""


def _result_doc(r: InstanceAnalysis) -> dict[str, object]:
    from service.domain import MediaInfo

    info = MediaInfo(str(r.source.path), "video", 0, 0, r.fps, r.frames, "dicom")
    doc = analysis_dict(r.analysis, info, r.frames)
    doc["sop_instance_uid"] = r.source.sop_instance_uid
    doc["task_hint"] = r.source.task_hint
    return doc


def _retry_or_fail(ctx: WorkerContext, job_id: int, reason: str, claim: dict[str, Any]) -> JobState:
    now = utcnow()
    with ctx.sessions.begin() as s:
        job = _locked_job(s, job_id)
        assert job is not None
        if not _holds(job, claim):
            log.warning("job %d: lease lost to %s; this failure is dropped", job_id, job.claimed_by or "none")
            return job.state
        job.claimed_by, job.lease_expires_at = "", None
        if job.attempts >= ctx.settings.max_attempts:
            job.state, job.reason = JobState.FAILED, reason
            log.error("job %d FAILED after %d attempts: %s", job_id, job.attempts, reason)
            return JobState.FAILED
        job.state, job.reason = JobState.QUEUED, reason
        job.next_run_at = now + backoff(ctx.settings, job.attempts)
        log.warning(
            "job %d attempt %d failed (%s); retry at %s", job_id, job.attempts, reason, job.next_run_at
        )
        return JobState.QUEUED


def _claim_delivery(
    ctx: WorkerContext, now: datetime, skip: set[int]
) -> tuple[int, int, str, str, int, str, str, str] | None:
    """Claim one due PENDING delivery of a REPORTED job (not in ``skip``), as claim_next_job claims jobs:
    PostgreSQL ``FOR UPDATE SKIP LOCKED``, SQLite its writer lock; a claim whose lease expired (its
    worker died while sending) may be taken over. Returns (id, attempts, destination, sr_path, job id,
    study UID, SR UID, report files) with ``attempts`` already counting this attempt, or None."""
    lease_until = now + timedelta(seconds=ctx.settings.lease_seconds)
    claimable = and_(
        Delivery.state == DeliveryState.PENDING,
        Delivery.next_run_at <= now,
        or_(Delivery.lease_expires_at.is_(None), Delivery.lease_expires_at < now),
    )
    query = (
        select(Delivery.id, Delivery.attempts)
        .join(Job, Delivery.job_pk == Job.id)
        .where(claimable, Job.state == JobState.REPORTED, Delivery.id.not_in(skip))
        .order_by(Delivery.next_run_at)
        .limit(5)
    )
    with ctx.sessions() as s:  # cheap look first: an idle tick takes no lock
        if s.execute(query.limit(1)).first() is None:
            return None
    with ctx.sessions.begin() as s:
        _write_lock(s)
        candidates = s.execute(query.with_for_update(of=Delivery.__table__, skip_locked=True)).all()
        for delivery_id, attempts in candidates:
            got = cast(
                CursorResult[Any],
                s.execute(
                    update(Delivery)
                    .where(Delivery.id == delivery_id, Delivery.attempts == attempts, claimable)
                    .values(claimed_by=ctx.worker_id, lease_expires_at=lease_until, attempts=attempts + 1)
                ),
            ).rowcount
            if got != 1:
                continue
            row = s.execute(
                select(Delivery.destination, Job.sr_path, Job.id, Study.study_uid, Job.sr_sop_instance_uid,
                       Job.report_files)
                .join(Job, Delivery.job_pk == Job.id)
                .join(Study, Job.study_pk == Study.id)
                .where(Delivery.id == delivery_id)
            ).one()
            return (int(delivery_id), int(attempts) + 1, *row)
    return None


def deliver_due(ctx: WorkerContext, now: datetime | None = None) -> int:
    """Send due PENDING deliveries, one claimed at a time (so several workers share them and none is sent
    by two at once); a job whose deliveries all succeeded becomes DELIVERED.

    Returns sent count.
    """
    now = now or utcnow()
    sent = 0
    tried: set[int] = set()
    while (claimed := _claim_delivery(ctx, now, tried)) is not None:
        delivery_id, attempt, destination, sr_path, job_id, study_uid, sr_uid, report_files = claimed
        tried.add(delivery_id)
        claim = {"state": DeliveryState.PENDING, "claimed_by": ctx.worker_id, "attempts": attempt}
        error, final, wait = "", False, 0.0
        with Heartbeat(ctx.sessions, Delivery, delivery_id, claim, ctx.settings.lease_seconds):
            try:
                extra = [ctx.files.abspath(p) for p in json.loads(report_files or "[]")]
                _send(ctx, destination, ctx.files.abspath(sr_path), extra)
            except (DeliveryError, OSError, ValueError, RuntimeError) as exc:
                error = str(exc) or type(exc).__name__
                # Refused for good (an invalid Bundle, 4xx): FAILED with the reason; anything else waits.
                final = getattr(exc, "retryable", True) is False or isinstance(exc, InvalidParameterError)
                wait = float(getattr(exc, "retry_after", None) or 0.0)
        with ctx.sessions.begin() as s:
            job = _locked_job(s, job_id)  # serialises the "all delivered?" check between workers
            d = s.get(Delivery, delivery_id)
            if d is None or not _holds(d, claim):
                # Hung past its lease: another worker owns the delivery now and records its own outcome.
                log.warning("job %d: delivery %d: lease lost; outcome dropped", job_id, delivery_id)
            elif not error:
                d.claimed_by, d.lease_expires_at = "", None
                d.state, d.delivered_at, d.last_error = DeliveryState.DELIVERED, utcnow(), ""
                sent += 1
                log.info("job %d: report delivered to %s", job_id, _redact(destination))
            elif final:
                d.claimed_by, d.lease_expires_at = "", None
                d.state, d.last_error = DeliveryState.FAILED, error
                log.error("job %d: delivery to %s FAILED: %s", job_id, _redact(destination), error)
            else:
                d.claimed_by, d.lease_expires_at = "", None
                d.last_error = error
                d.next_run_at = utcnow() + max(backoff(ctx.settings, d.attempts), timedelta(seconds=wait))
                log.warning("job %d: delivery to %s failed (attempt %d, retry at %s): %s",
                            job_id, _redact(destination), d.attempts, d.next_run_at, error)
            if job and job.state is JobState.REPORTED and job.deliveries and all(
                x.state == DeliveryState.DELIVERED for x in job.deliveries
            ):
                job.state = JobState.DELIVERED
        ctx.audit_record(_export_event(ctx, destination, study_uid, sr_uid, error))
    return sent


def _redact(destination: str) -> str:
    """A destination for the log: a FHIR URL without any user:password part."""
    return re.sub(r"//[^/@]*@", "//***@", destination)


def _send(ctx: WorkerContext, destination: str, sr_file: Path, extra: list[Path]) -> None:
    """One delivery attempt: DICOM C-STORE of the SR with the key images and PDF (``extra``), or the FHIR
    Bundle beside the SR (POST or drop folder)."""
    if destination.startswith(("fhir:", "fhir-drop:")):
        from service.fhir_client import post_bundle, write_bundle

        bundle_file = bundle_path(sr_file)
        if not bundle_file.is_file():
            raise MissingReportError(f"FHIR Bundle {bundle_file.name} is missing from the store: re-run the "
                                     "analysis to rebuild it")
        bundle = json.loads(bundle_file.read_text())
        kind, _, target = destination.partition(":")
        if kind == "fhir-drop":
            write_bundle(bundle, target)
            return
        st = ctx.settings
        cert = (st.fhir_client_cert, st.fhir_client_key) if st.fhir_client_cert else None
        post_bundle(bundle, base_url=target, token=st.read_fhir_token(), client_cert=cert,
                    ca_file=st.fhir_ca_file or None, timeout=st.fhir_timeout_seconds)
        return
    if not sr_file.is_file():
        raise MissingReportError(f"SR {sr_file.name} is missing from the store: re-run the analysis to "
                                 "rebuild it")
    dest = Destination.parse(destination)
    tls = None
    if dest.tls:
        from service.tls import client_context

        st = ctx.settings
        tls = client_context(st.dicom_tls_cert, st.dicom_tls_key, st.dicom_tls_ca_file, what="dicom_tls")
    send_files(dest, [sr_file], ctx.settings.ae_title, optional=extra, tls=tls)


def _export_event(
    ctx: WorkerContext, destination: str, study_uid: str, sr_uid: str, error: str
) -> AuditEvent:
    """110104 (SR by DICOM) or 110106 Export (FHIR Bundle) for one delivery attempt."""
    kind, _, target = destination.partition(":")
    what = "FHIR" if kind in ("fhir", "fhir-drop") else "SR"
    where = (f"file://{target}" if kind == "fhir-drop" else target) if what == "FHIR" else destination
    return export(study_uid, _redact(where), what, SERIOUS_FAILURE if error else SUCCESS,  # type: ignore[arg-type]
                  report_uid=sr_uid, description=error, local_ae=ctx.settings.ae_title)
