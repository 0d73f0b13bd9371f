"""The one orchestrator: claim a due job → load the study → analyse → SR → deliveries. State lives in the DB.

Job states: RECEIVED (waiting for the study to be quiet) → QUEUED → RUNNING → REPORTED → DELIVERED, or
FAILED(reason) after ``max_attempts``. A destination that is down delays a delivery, never loses it.
Logs carry job ids and UIDs only.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import select, update
from sqlalchemy.engine import CursorResult
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
from service.store.db import Delivery, DeliveryState, Instance, Job, JobState, Series, Study, utcnow
from service.store.files import FileStore

log = logging.getLogger(__name__)

Analyser = Callable[[list[InstanceInput]], list[InstanceAnalysis]]


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


def recover_interrupted(sessions: sessionmaker[Session]) -> int:
    """At start-up: jobs left RUNNING by a crash go back to QUEUED. Returns how many."""
    with sessions.begin() as s:
        n = cast(
            CursorResult[Any],
            s.execute(
                update(Job).where(Job.state == JobState.RUNNING).values(state=JobState.QUEUED, claimed_by="")
            ),
        ).rowcount
    if n:
        log.warning("recovered %d job(s) left RUNNING by an earlier process", n)
    return int(n or 0)


def promote_stable_studies(
    sessions: sessionmaker[Session], quiet_seconds: float, now: datetime | None = None
) -> list[int]:
    """RECEIVED jobs whose study has been quiet for ``quiet_seconds`` become QUEUED."""
    now = now or utcnow()
    promoted = []
    with sessions.begin() as s:
        rows = s.execute(
            select(Job, Study).join(Study, Job.study_pk == Study.id).where(Job.state == JobState.RECEIVED)
        ).all()
        for job, study in rows:
            if now - _aware(study.last_received_at) >= timedelta(seconds=quiet_seconds):
                job.state, job.next_run_at = JobState.QUEUED, now
                promoted.append(job.id)
    for job_id in promoted:
        log.info("job %d queued (study quiet for %gs)", job_id, quiet_seconds)
    return promoted


def claim_next_job(
    sessions: sessionmaker[Session], worker_id: str, now: datetime | None = None
) -> int | None:
    """Atomically move one due QUEUED job to RUNNING; the conditional UPDATE makes racing workers safe."""
    now = now or utcnow()
    with sessions.begin() as s:
        candidates = s.scalars(
            select(Job.id)
            .where(Job.state == JobState.QUEUED, Job.next_run_at <= now)
            .order_by(Job.next_run_at)
            .limit(5)
        ).all()
        for job_id in candidates:
            got = cast(
                CursorResult[Any],
                s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state == JobState.QUEUED)
                    .values(
                        state=JobState.RUNNING,
                        claimed_by=worker_id,
                        attempts=Job.attempts + 1,
                        updated_at=now,
                    )
                ),
            ).rowcount
            if got == 1:
                return int(job_id)
    return None


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
    ran), QUEUED (retry later) or FAILED. Never raises for bad input; a bug is retried, then FAILED."""
    from service.report.sr import InstanceFinding
    from service.report.sr_io import write_report

    with ctx.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None, f"job {job_id} vanished"
        study = s.get(Study, job.study_pk)
        assert study is not None
        study_uid, started = study.study_uid, utcnow()
        received_before = _aware(study.last_received_at)
        inputs = _inputs(s, ctx.files, study, ctx.settings.task_rules)
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
        sr_path, sr_uid = write_report(
            [r.source.path for r in results],
            findings,
            ctx.files.abspath(f"reports/{study_uid}"),
            ctx.engine_version,
            prior_reports=[ctx.files.abspath(job.sr_path) for _, job in priors if job.sr_path],
        )
        docs = [_result_doc(r) for r in results]
        report_files = _report_objects(ctx, job_id, study_uid, results, comparison)
        fhir_error = _write_bundle(
            ctx, Path(sr_path), sr_uid, results[0].source.path, findings, started, comparison
        )
    except Exception as exc:  # noqa: BLE001 - a bug must not kill the worker; retried, then FAILED
        reason = f"{type(exc).__name__}: {exc}"
        state = _retry_or_fail(ctx, job_id, reason)
        outcome = SERIOUS_FAILURE if state is JobState.FAILED else MINOR_FAILURE
        ctx.audit_record(analysis_event("finished", job_id, study_uid, outcome, reason, local_ae=ae))
        return state

    with ctx.sessions.begin() as s:
        job = s.get(Job, job_id)
        study = s.get(Study, job.study_pk) if job else None
        if job is None or study is None:
            return JobState.FAILED
        new_data = _aware(study.last_received_at) > received_before
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
) -> list[Path]:
    """Key images (DICOM SC) and the PDF report (Encapsulated PDF) beside the SR. Pictures must never block
    the numbers: a failure here is logged and the SR still goes out."""
    from service.report.study_images import build_report_objects

    try:
        return build_report_objects(
            [r.source.path for r in results],
            [(r.source.sop_instance_uid, r.analysis, r.fps) for r in results],
            engine_version=ctx.engine_version,
            out_dir=ctx.files.abspath(f"reports/{study_uid}"),
            model_versions=sorted(
                {t.grade.model_version for r in results for t in r.analysis.tasks if t.grade is not None}
            ),
            comparison=comparison,
        )
    except Exception:  # noqa: BLE001 - see the docstring
        log.exception("job %d: key images / PDF not built", job_id)
        return []


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


def _retry_or_fail(ctx: WorkerContext, job_id: int, reason: str) -> JobState:
    now = utcnow()
    with ctx.sessions.begin() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.claimed_by = ""
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


def deliver_due(ctx: WorkerContext, now: datetime | None = None) -> int:
    """Send due PENDING deliveries; a job whose deliveries all succeeded becomes DELIVERED.

    Returns sent count.
    """
    now = now or utcnow()
    with ctx.sessions() as s:
        due = s.execute(
            select(Delivery.id, Delivery.destination, Job.sr_path, Job.id, Study.study_uid,
                   Job.sr_sop_instance_uid, Job.report_files)
            .join(Job, Delivery.job_pk == Job.id)
            .join(Study, Job.study_pk == Study.id)
            .where(
                Delivery.state == DeliveryState.PENDING,
                Delivery.next_run_at <= now,
                Job.state == JobState.REPORTED,
            )
        ).all()
    sent = 0
    for delivery_id, destination, sr_path, job_id, study_uid, sr_uid, report_files in due:
        error, final, wait = "", False, 0.0
        try:
            extra = [ctx.files.abspath(p) for p in json.loads(report_files or "[]")]
            _send(ctx, destination, ctx.files.abspath(sr_path), extra)
        except (DeliveryError, OSError, ValueError, RuntimeError) as exc:
            error = str(exc) or type(exc).__name__
            # Refused for good (an invalid Bundle, 4xx): FAILED with the reason; anything else waits.
            final = getattr(exc, "retryable", True) is False or isinstance(exc, InvalidParameterError)
            wait = float(getattr(exc, "retry_after", None) or 0.0)
        with ctx.sessions.begin() as s:
            d = s.get(Delivery, delivery_id)
            assert d is not None
            d.attempts += 1
            if not error:
                d.state, d.delivered_at, d.last_error = DeliveryState.DELIVERED, utcnow(), ""
                sent += 1
                log.info("job %d: report delivered to %s", job_id, _redact(destination))
            elif final:
                d.state, d.last_error = DeliveryState.FAILED, error
                log.error("job %d: delivery to %s FAILED: %s", job_id, _redact(destination), error)
            else:
                d.last_error = error
                d.next_run_at = utcnow() + max(backoff(ctx.settings, d.attempts), timedelta(seconds=wait))
                log.warning("job %d: delivery to %s failed (attempt %d, retry at %s): %s",
                            job_id, _redact(destination), d.attempts, d.next_run_at, error)
            job = s.get(Job, job_id)
            if job and job.deliveries and all(x.state == DeliveryState.DELIVERED for x in job.deliveries):
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

        bundle = json.loads(bundle_path(sr_file).read_text())
        kind, _, target = destination.partition(":")
        if kind == "fhir-drop":
            write_bundle(bundle, target)
            return
        st = ctx.settings
        cert = (st.fhir_client_cert, st.fhir_client_key) if st.fhir_client_cert else None
        post_bundle(bundle, base_url=target, token=st.read_fhir_token(), client_cert=cert,
                    ca_file=st.fhir_ca_file or None, timeout=st.fhir_timeout_seconds)
        return
    send_files(Destination.parse(destination), [sr_file], ctx.settings.ae_title, optional=extra)


def _export_event(
    ctx: WorkerContext, destination: str, study_uid: str, sr_uid: str, error: str
) -> AuditEvent:
    """110104 (SR by DICOM) or 110106 Export (FHIR Bundle) for one delivery attempt."""
    kind, _, target = destination.partition(":")
    what = "FHIR" if kind in ("fhir", "fhir-drop") else "SR"
    where = (f"file://{target}" if kind == "fhir-drop" else target) if what == "FHIR" else destination
    return export(study_uid, _redact(where), what, SERIOUS_FAILURE if error else SUCCESS,  # type: ignore[arg-type]
                  report_uid=sr_uid, description=error, local_ae=ctx.settings.ae_title)
