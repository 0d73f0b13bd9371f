"""What the console and the REST API show, read from the service database: plain dicts, shared by the
HTML pages and the JSON routes. The actions (re-run, re-send) live here too."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import threading
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from service.report.head_motion import head_motion_of, head_motion_text, not_corrected_text
from service.report.summary import finding_of_documents
from service.store.db import (
    AuditRecord,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Patient,
    Study,
    utcnow,
)

JOB_STATES = [s.value for s in JobState]
DELIVERY_STATES = [s.value for s in DeliveryState]
FIGURE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.png$")

EVENT_NAMES = {
    "110100": "Application Activity",
    "110103": "DICOM Instances Accessed",
    "110104": "DICOM Instances Transferred",
    "110106": "Export",
    "110107": "Import",
    "110112": "Query",
    "110113": "Security Alert",
    "110114": "User Authentication",
}


def iso(t: datetime | None) -> str | None:
    if t is None:
        return None
    return t.isoformat(timespec="seconds") if t.tzinfo else t.isoformat(timespec="seconds") + "+00:00"


def redact(destination: str) -> str:
    """A destination without any ``user:password@`` part (FHIR URLs may carry one)."""
    return re.sub(r"//[^/@]*@", "//***@", destination)


def fmt_date(d: str) -> str:
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 and d.isdigit() else d


def fmt_when(date: str, time: str | None) -> str:
    """StudyDate (DA) and StudyTime (TM, ``HHMM[SS[.f]]``) as ``YYYY-MM-DD HH:MM``: several studies of one
    patient on one day must be told apart. The date alone where the time is missing or malformed."""
    day = fmt_date(date)
    t = (time or "").strip()
    if len(t) >= 4 and t[:4].isdigit() and int(t[:2]) < 24 and int(t[2:4]) < 60:
        return f"{day} {t[:2]}:{t[2:4]}" if day else day
    return day


# --- analysis results ------------------------------------------------------------------------------------


def parse_results(result_json: str) -> list[dict[str, Any]]:
    """The per-instance analysis documents of a job (an empty list when there are none or they are bad)."""
    if not result_json:
        return []
    try:
        docs = json.loads(result_json)
    except ValueError:
        return []
    if isinstance(docs, dict):
        docs = [docs]
    return [d for d in docs if isinstance(d, dict)] if isinstance(docs, list) else []


def _num(x: Any) -> float | None:
    try:
        return None if x is None else float(x)
    except (TypeError, ValueError):
        return None


def task_rows(docs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per analysed task over all instances."""
    rows = []
    for doc in docs:
        for t in doc.get("tasks") or []:
            if not isinstance(t, dict):
                continue
            head = head_motion_of(t)  # None for results stored before head-motion compensation
            rows.append({
                "sop_instance_uid": str(doc.get("sop_instance_uid", "")),
                "task": str(t.get("task", "")),
                "left": _num((t.get("left") or {}).get("magnitude")),
                "right": _num((t.get("right") or {}).get("magnitude")),
                "unit": str(t.get("unit", "")),
                "asymmetry_index": _num(t.get("asymmetry_index")),
                "activation_gate": _num(t.get("activation_gate")),
                "asymmetry_score": _num(t.get("asymmetry_score")),
                "cosine_score": _num(t.get("cosine_score")),
                "weaker_side": t.get("weaker_side"),
                "insufficient_activation": bool(t.get("insufficient_activation")),
                "method": str(t.get("method", "")),
                "grade": (t.get("grade") or {}).get("label") if isinstance(t.get("grade"), dict) else None,
                "notes": [str(n) for n in t.get("notes") or []],
                "flow": {
                    str(k): _num((v or {}).get("symmetry_score"))
                    for k, v in ((t.get("flow") or {}).get("regions") or {}).items()
                },
                "head_motion": None if head is None else {
                    **head.to_json(), "text": head_motion_text(head),
                    "warning": None if head.corrected else not_corrected_text(head),
                },
            })
    return rows


def qc_of(docs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """QC verdict over the instances: pass (all analysable), partial, fail (none), or none (no results)."""
    if not docs:
        return {"verdict": "none", "reasons": [], "warnings": [], "instances": []}
    instances: list[dict[str, Any]] = []
    for doc in docs:
        q = doc.get("quality") or {}
        instances.append({
            "sop_instance_uid": str(doc.get("sop_instance_uid", "")),
            "task_hint": doc.get("task_hint"),
            "ok": bool(q.get("ok")),
            "reasons": [str(r) for r in q.get("reasons") or []],
            "warnings": [str(w) for w in q.get("warnings") or []],
            "valid_frames": q.get("valid_frames"),
            "frames": (doc.get("input") or {}).get("frames"),
        })
    ok = [i["ok"] for i in instances]
    verdict = "pass" if all(ok) else ("fail" if not any(ok) else "partial")
    return {
        "verdict": verdict,
        "reasons": sorted({r for i in instances for r in i["reasons"]}),
        "warnings": sorted({w for i in instances for w in i["warnings"]}),
        "instances": instances,
    }


def task_scores(docs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """task → its first analysed scores (AS, CS, weaker side) — what the worklist and comparisons show."""
    out: dict[str, dict[str, Any]] = {}
    for r in task_rows(docs):
        if r["task"] in out and not out[r["task"]]["insufficient_activation"]:
            continue
        out[r["task"]] = {k: r[k] for k in ("asymmetry_score", "cosine_score", "weaker_side",
                                             "insufficient_activation")}
    return out


# --- studies ---------------------------------------------------------------------------------------------


def _latest_jobs(s: Session, study_pks: Iterable[int]) -> dict[int, Job]:
    pks = list(study_pks)
    if not pks:
        return {}
    latest = (
        select(func.max(Job.id)).where(Job.study_pk.in_(pks)).group_by(Job.study_pk).scalar_subquery()
    )
    return {j.study_pk: j for j in s.scalars(select(Job).where(Job.id.in_(latest)))}


def _deliveries(s: Session, job_ids: Iterable[int]) -> dict[int, list[Delivery]]:
    out: dict[int, list[Delivery]] = defaultdict(list)
    ids = list(job_ids)
    if ids:
        for d in s.scalars(select(Delivery).where(Delivery.job_pk.in_(ids)).order_by(Delivery.destination)):
            out[d.job_pk].append(d)
    return out


def _delivery_dict(d: Delivery) -> dict[str, Any]:
    return {
        "destination": redact(d.destination),
        "state": d.state.value,
        "attempts": d.attempts,
        "last_error": d.last_error,
        "next_run_at": iso(d.next_run_at),
        "delivered_at": iso(d.delivered_at),
    }


def _study_summary(
    study: Study, patient: Patient, job: Job | None, deliveries: list[Delivery]
) -> dict[str, Any]:
    docs = parse_results(job.result_json) if job else []
    return {
        "study_uid": study.study_uid,
        "study_date": fmt_date(study.study_date),
        "study_when": fmt_when(study.study_date, study.study_time),
        "study_description": study.study_description,
        "accession_number": study.accession_number,
        "patient_id": patient.patient_id,
        "patient_name": patient.name.replace("^", " ").strip(),
        "received_at": iso(study.last_received_at),
        "state": job.state.value if job else None,
        "reason": job.reason if job else "",
        "attempts": job.attempts if job else 0,
        "engine_version": job.engine_version if job else None,
        "tasks": task_scores(docs),
        "qc": qc_of(docs)["verdict"],
        "deliveries": [_delivery_dict(d) for d in deliveries],
    }


def list_studies(
    s: Session, *, state: str = "", q: str = "", limit: int = 100, offset: int = 0
) -> tuple[list[dict[str, Any]], int]:
    """Studies, newest first, with their latest job; ``state`` filters on that job, ``q`` on the study
    description, Study Instance UID, accession number or Patient ID. Returns (page, total)."""
    latest = select(func.max(Job.id).label("job_id"), Job.study_pk).group_by(Job.study_pk).subquery()
    stmt = (
        select(Study, Patient, Job)
        .join(Patient, Study.patient_pk == Patient.id)
        .outerjoin(latest, latest.c.study_pk == Study.id)
        .outerjoin(Job, Job.id == latest.c.job_id)
    )
    if state:
        stmt = stmt.where(Job.id.is_(None)) if state == "NONE" else stmt.where(Job.state == JobState(state))
    if q:
        like = f"%{q.strip()}%"
        stmt = stmt.where(or_(Study.study_description.ilike(like), Study.study_uid.ilike(like),
                              Study.accession_number.ilike(like), Patient.patient_id.ilike(like)))
    total = int(s.scalar(select(func.count()).select_from(stmt.subquery())) or 0)
    stmt = stmt.order_by(Study.last_received_at.desc(), Study.id.desc()).limit(limit).offset(offset)
    rows = s.execute(stmt).all()
    deliveries = _deliveries(s, [j.id for _, _, j in rows if j is not None])
    return [_study_summary(st, p, j, deliveries.get(j.id, []) if j else []) for st, p, j in rows], total


def figures_dir(files_root: Path, study_uid: str) -> Path:
    return files_root / "reports" / study_uid / "figures"


def figure_caption(name: str) -> str:
    """Caption of a console figure file ``<n>-<task>-<kind>.png``: the task and what the figure shows."""
    from service.report.study_images import FIGURE_CAPTIONS

    stem = name.rsplit(".", 1)[0]
    parts = stem.split("-")
    kind = parts[-1] if parts else ""
    task = parts[1].replace("_", " ") if len(parts) >= 3 else ""
    caption = FIGURE_CAPTIONS.get(kind, stem.replace("_", " "))
    return f"{task.capitalize()} — {caption}" if task else caption


def list_figures(files_root: Path, study_uid: str) -> list[str]:
    d = figures_dir(files_root, study_uid)
    try:
        names = sorted(p.name for p in d.iterdir() if p.is_file() and FIGURE_NAME.match(p.name))
    except OSError:
        return []
    # key images first, then motion plots, then the rest
    return sorted(names, key=lambda n: (0 if "key" in n else 1 if "motion" in n else 2, n))


def _order_key(study: Study) -> tuple[str, str, float, int]:
    t = study.last_received_at
    return (study.study_date or (t.strftime("%Y%m%d") if t else ""), study.study_time or "",
            t.timestamp() if t else 0.0, study.id)


def study_detail(s: Session, study_uid: str, files_root: Path) -> dict[str, Any] | None:
    """Everything the study page shows, or None when the study is unknown."""
    row = s.execute(
        select(Study, Patient)
        .join(Patient, Study.patient_pk == Patient.id)
        .where(Study.study_uid == study_uid)
    ).first()
    if row is None:
        return None
    study, patient = row
    job = _latest_jobs(s, [study.id]).get(study.id)
    deliveries = _deliveries(s, [job.id] if job else []).get(job.id if job else -1, [])
    docs = parse_results(job.result_json) if job else []
    out = _study_summary(study, patient, job, deliveries)
    out.update({
        "patient_issuer": patient.issuer,
        "patient_birth_date": fmt_date(patient.birth_date),
        "patient_sex": patient.sex,
        "study_time": study.study_time,
        "referring_physician": study.referring_physician.replace("^", " ").strip(),
        "job": None if job is None else {
            "id": job.id, "state": job.state.value, "reason": job.reason, "attempts": job.attempts,
            "engine_version": job.engine_version, "sr_sop_instance_uid": job.sr_sop_instance_uid,
            "created_at": iso(job.created_at), "updated_at": iso(job.updated_at),
            "next_run_at": iso(job.next_run_at),
        },
        "scores": task_rows(docs),
        "finding": finding_of_documents(docs, task_rows(docs)),
        "quality": qc_of(docs),
        "figures": list_figures(files_root, study.study_uid),
        "series": [{"series_uid": se.series_uid, "modality": se.modality,
                    "description": se.series_description, "instances": len(se.instances)}
                   for se in study.series],
    })
    # The comparison: this patient's other studies that came before this one, oldest first.
    same_patient = select(Study).where(Study.patient_pk == patient.id, Study.id != study.id)
    others = [st for st in s.scalars(same_patient) if _order_key(st) < _order_key(study)]
    others.sort(key=_order_key)
    jobs = _latest_jobs(s, [st.id for st in others])
    earlier: list[dict[str, Any]] = []
    for st in others:
        j = jobs.get(st.id)
        earlier.append({
            "study_uid": st.study_uid, "study_date": fmt_date(st.study_date),
            "study_when": fmt_when(st.study_date, st.study_time),
            "study_description": st.study_description, "state": j.state.value if j else None,
            "tasks": task_scores(parse_results(j.result_json)) if j else {},
        })
    out["earlier_studies"] = earlier
    tasks: list[str] = []
    for entry in [*earlier, out]:
        tasks += [t for t in entry["tasks"] if t not in tasks]
    out["comparison_tasks"] = tasks
    # Change of each task's scores since the first earlier study that has it (positive: more symmetric).
    change: dict[str, dict[str, Any]] = {}
    for t in tasks:
        now_sc = out["tasks"].get(t)
        first = next((e for e in earlier if t in e["tasks"]), None)
        if now_sc is None or first is None:
            continue
        then = first["tasks"][t]
        change[t] = {"since": first["study_date"], "since_study_uid": first["study_uid"]}
        for k in ("asymmetry_score", "cosine_score"):
            a, b = now_sc.get(k), then.get(k)
            change[t][k] = None if a is None or b is None else round(float(a) - float(b), 2)
    out["comparison_change"] = change
    return out


# --- actions ---------------------------------------------------------------------------------------------


#: Why a re-run or re-send was refused, by code: the console's redirect carries the code only, and the
#: page shows this fixed text (never text taken from the URL, which anyone can craft into a link).
ACTION_ERRORS = {
    "no-study": "no such study",
    "no-job": "the study has no analysis job yet",
    "running": "the analysis is running now",
    "no-report": "the study has no report to send yet",
}


class ActionError(Exception):
    """A re-run or re-send that cannot be done now (HTTP 404 or 409); ``code`` is a key of
    :data:`ACTION_ERRORS`, whose text is the message."""

    def __init__(self, status: int, code: str) -> None:
        super().__init__(ACTION_ERRORS[code])
        self.status = status
        self.code = code


def _job_for(s: Session, study_uid: str) -> Job:
    study = s.scalar(select(Study).where(Study.study_uid == study_uid))
    if study is None:
        raise ActionError(404, "no-study")
    job = _latest_jobs(s, [study.id]).get(study.id)
    if job is None:
        raise ActionError(409, "no-job")
    return job


def rerun(s: Session, study_uid: str) -> int:
    """The study's job back to QUEUED with no attempts (the workers pick it up). Returns the job id."""
    job = _job_for(s, study_uid)
    if job.state is JobState.RUNNING:
        raise ActionError(409, "running")
    job.state, job.attempts, job.reason, job.claimed_by = JobState.QUEUED, 0, "", ""
    job.next_run_at = utcnow()
    return job.id


def resend(s: Session, study_uid: str, targets: Sequence[str]) -> tuple[int, int]:
    """Every delivery of the study's report back to PENDING (and rows for configured destinations that
    have none yet), the job to REPORTED. Returns (job id, number of deliveries)."""
    job = _job_for(s, study_uid)
    if not job.sr_path or job.state not in (JobState.REPORTED, JobState.DELIVERED):
        raise ActionError(409, "no-report")
    now = utcnow()
    rows = {d.destination: d for d in job.deliveries}
    for target in targets:
        if target not in rows:
            rows[target] = Delivery(job_pk=job.id, destination=target)
            s.add(rows[target])
    for d in rows.values():
        d.state, d.attempts, d.last_error, d.next_run_at, d.delivered_at = (
            DeliveryState.PENDING, 0, "", now, None)
    job.state = JobState.REPORTED
    return job.id, len(rows)


# --- audit -----------------------------------------------------------------------------------------------


def _audit_summary(rec: AuditRecord) -> dict[str, Any]:
    users, studies, patients, types, description, action = [], [], [], [], "", ""
    try:
        root = ET.fromstring(rec.xml)
        ident = root.find("EventIdentification")
        if ident is not None:
            action = ident.get("EventActionCode", "")
            types = [t.get("originalText", "") for t in ident.findall("EventTypeCode")]
            description = ident.findtext("EventOutcomeDescription") or ""
        for p in root.findall("ActiveParticipant"):
            if p.get("UserIsRequestor") == "true":
                nap = p.get("NetworkAccessPointID", "")
                users.append(p.get("UserID", "") + (f" ({nap})" if nap else ""))
        for o in root.findall("ParticipantObjectIdentification"):
            code = o.find("ParticipantObjectIDTypeCode")
            kind = code.get("csd-code") if code is not None else ""
            if kind == "110180":
                studies.append(o.get("ParticipantObjectID", ""))
            elif kind == "2":
                patients.append(o.get("ParticipantObjectID", ""))
            elif o.find("ParticipantObjectQuery") is not None:
                import base64

                raw = o.findtext("ParticipantObjectQuery") or ""
                try:
                    q = base64.b64decode(raw).decode("utf-8", "replace")
                except ValueError:
                    q = ""
                description = description or q[:200]
    except ET.ParseError:
        description = "(unreadable record)"
    return {
        "seq": rec.seq, "time": rec.time, "event_id": rec.event_id,
        "event": EVENT_NAMES.get(rec.event_id, rec.event_id), "types": types, "action": action,
        "outcome": rec.outcome, "users": users, "study_uids": studies, "patient_ids": patients,
        "description": description, "forwarded": bool(rec.forwarded),
    }


def _user_matches(summary: dict[str, Any], user: str) -> bool:
    return any(u.split(" (", 1)[0].lower() == user.lower() for u in summary["users"])


def list_audit(
    s: Session, *, study_uid: str = "", user: str = "", event_id: str = "", limit: int = 100,
    before_seq: int | None = None,
) -> list[dict[str, Any]]:
    """Audit records, newest first, filtered by study UID, requesting user and event id."""
    stmt = select(AuditRecord).order_by(AuditRecord.seq.desc())
    if event_id:
        stmt = stmt.where(AuditRecord.event_id == event_id)
    if study_uid:
        stmt = stmt.where(AuditRecord.xml.contains(f'"{study_uid}"'))
    if user:
        stmt = stmt.where(AuditRecord.xml.contains(f'UserID="{user}"'))
    if before_seq is not None:
        stmt = stmt.where(AuditRecord.seq < before_seq)
    out: list[dict[str, Any]] = []
    for rec in s.scalars(stmt.execution_options(yield_per=200)):
        summary = _audit_summary(rec)
        if study_uid and study_uid not in summary["study_uids"]:
            continue
        if user and not _user_matches(summary, user):
            continue
        out.append(summary)
        if len(out) >= limit:
            break
    return out


# --- system ----------------------------------------------------------------------------------------------


class _DirSize:
    """Size of the data directory, recomputed at most once a minute (a walk over a big store is slow)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[float, int, int]] = {}

    def __call__(self, root: Path) -> tuple[int, int]:
        with self._lock:
            hit = self._cache.get(root)
            if hit and time.monotonic() - hit[0] < 60:
                return hit[1], hit[2]
        total = files = 0
        for dirpath, _dirs, names in os.walk(root):
            for n in names:
                try:
                    total += os.lstat(os.path.join(dirpath, n)).st_size
                    files += 1
                except OSError:
                    pass
        with self._lock:
            self._cache[root] = (time.monotonic(), total, files)
        return total, files


dir_size = _DirSize()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class SystemContext:
    data_dir: Path
    destinations: tuple[str, ...]
    engine_version: str
    extra_versions: tuple[tuple[str, str], ...] = ()


def system_info(s: Session, ctx: SystemContext) -> dict[str, Any]:
    counts = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    queue = {st: int(counts.get(JobState(st), 0)) for st in JOB_STATES}
    failed = [
        {"study_uid": uid, "job_id": j.id, "reason": j.reason, "attempts": j.attempts,
         "updated_at": iso(j.updated_at)}
        for j, uid in s.execute(
            select(Job, Study.study_uid).join(Study, Job.study_pk == Study.id)
            .where(Job.state == JobState.FAILED).order_by(Job.updated_at.desc()).limit(100)
        ).all()
    ]
    retrying = [
        {"study_uid": uid, "job_id": j.id, "reason": j.reason, "attempts": j.attempts,
         "next_run_at": iso(j.next_run_at)}
        for j, uid in s.execute(
            select(Job, Study.study_uid).join(Study, Job.study_pk == Study.id)
            .where(Job.state == JobState.QUEUED, Job.reason != "").order_by(Job.next_run_at).limit(100)
        ).all()
    ]
    dest: dict[str, dict[str, Any]] = {}
    for name in ctx.destinations:
        dest[name] = {"destination": redact(name), "configured": True}
    per_state = s.execute(select(Delivery.destination, Delivery.state, func.count())
                          .group_by(Delivery.destination, Delivery.state)).all()
    for name, state, n in per_state:
        entry = dest.setdefault(name, {"destination": redact(name), "configured": False})
        entry.setdefault("states", {})[state.value] = int(n)
    for name, entry in dest.items():
        entry.setdefault("states", {})
        last_ok = s.scalar(select(func.max(Delivery.delivered_at)).where(Delivery.destination == name))
        err = s.scalar(
            select(Delivery.last_error).where(Delivery.destination == name, Delivery.last_error != "")
            .order_by(Delivery.next_run_at.desc()).limit(1)
        )
        next_try = s.scalar(select(func.min(Delivery.next_run_at)).where(
            Delivery.destination == name, Delivery.state == DeliveryState.PENDING))
        entry["last_delivered_at"] = iso(last_ok)
        entry["last_error"] = err or ""
        entry["next_try_at"] = iso(next_try)
        pending = entry["states"].get("PENDING", 0)
        failed_n = entry["states"].get("FAILED", 0)
        entry["health"] = "failing" if failed_n or (pending and entry["last_error"]) else (
            "ok" if entry["last_delivered_at"] else "idle")
    usage = shutil.disk_usage(ctx.data_dir) if ctx.data_dir.exists() else None
    used, nfiles = dir_size(ctx.data_dir) if ctx.data_dir.exists() else (0, 0)
    from service import __version__

    versions = {"facesym": __version__, "engine": ctx.engine_version,
                "python": platform.python_version()}
    for dist in ("mediapipe", "pydicom", "pynetdicom", "sqlalchemy", "fastapi"):
        v = _version(dist)
        if v:
            versions[dist] = v
    versions.update(dict(ctx.extra_versions))
    return {
        "queue": queue,
        "failed_jobs": failed,
        "retrying_jobs": retrying,
        "destinations": list(dest.values()),
        "disk": {
            "data_dir": str(ctx.data_dir.resolve()),
            "data_bytes": used, "data_files": nfiles,
            "fs_total_bytes": usage.total if usage else None,
            "fs_free_bytes": usage.free if usage else None,
        },
        "versions": versions,
    }


def human_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
