"""``/metrics``: the Prometheus text exposition format (version 0.0.4), written by hand.

Counts only, never a UID or a name: jobs by state, deliveries by state, reports not delivered and the
age of the oldest waiting one, how long due jobs wait for a worker, attempts and retries, the audit
trail's length, and the analysis time as a histogram (deploy/prometheus/alerts.yaml alerts on them).
Analysis seconds come from the audit trail (each analysis has a "begun" and a "finished" record carrying
the job id), read incrementally: each scrape looks only at records newer than the last one seen.
"""

from __future__ import annotations

import base64
import threading
import xml.etree.ElementTree as ET
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.store.db import AuditRecord, Delivery, DeliveryState, Job, JobState

BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class AnalysisTimes:
    """Durations of finished analyses (successful or not), from the audit trail's begun/finished pairs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_seq = 0
        self._begun: dict[str, datetime] = {}
        self.counts = [0] * len(BUCKETS)
        self.total = 0
        self.sum = 0.0

    def update(self, s: Session) -> None:
        with self._lock:
            rows = s.execute(
                select(AuditRecord.seq, AuditRecord.time, AuditRecord.xml)
                .where(AuditRecord.seq > self._last_seq, AuditRecord.event_id == "110103",
                       AuditRecord.xml.contains("FSY-AUD-ANA"))
                .order_by(AuditRecord.seq)
            ).all()
            if rows:
                self._last_seq = int(rows[-1][0])
            for _seq, when, xml in rows:
                kind, job = _analysis_mark(xml)
                if not job:
                    continue
                try:
                    t = datetime.fromisoformat(when)
                except ValueError:
                    continue
                if kind == "FSY-AUD-ANABEG":
                    self._begun[job] = t
                    if len(self._begun) > 10000:  # begun records whose end never came (a crash)
                        self._begun.pop(next(iter(self._begun)))
                elif kind == "FSY-AUD-ANAEND" and job in self._begun:
                    self.observe((t - self._begun.pop(job)).total_seconds())

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.total += 1
        self.sum += seconds
        for i, b in enumerate(BUCKETS):
            if seconds <= b:
                self.counts[i] += 1


def _analysis_mark(xml: str) -> tuple[str, str]:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return "", ""
    kind = ""
    for t in root.iter("EventTypeCode"):
        kind = t.get("csd-code", "")
    for d in root.iter("ParticipantObjectDetail"):
        if d.get("type") == "FaceSymJobID":
            try:
                return kind, base64.b64decode(d.get("value", "")).decode()
            except ValueError:
                return kind, ""
    return kind, ""


def _age(now: datetime, then: datetime | None) -> float:
    """Seconds since ``then`` (SQLite hands back naive UTC datetimes); 0 for None or the future."""
    if then is None:
        return 0.0
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    return max(0.0, (now - then).total_seconds())


def render(s: Session, times: AnalysisTimes) -> str:
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")

    jobs = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    family("facesym_jobs", "gauge", "Analysis jobs by state.")
    for st in JobState:
        lines.append(f'facesym_jobs{{state="{st.value}"}} {int(jobs.get(st, 0))}')

    deliveries = dict(s.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all())
    family("facesym_deliveries", "gauge", "Report deliveries (job x destination) by state.")
    for ds in DeliveryState:
        lines.append(f'facesym_deliveries{{state="{ds.value}"}} {int(deliveries.get(ds, 0))}')

    # For alerts (deploy/prometheus/alerts.yaml): results that wait, and work that nobody picks up.
    now = datetime.now(UTC)
    family("facesym_undelivered_reports", "gauge",
           "Reports (job x engine version) with at least one delivery in this state: results not delivered.")
    for ds in (DeliveryState.PENDING, DeliveryState.FAILED):
        n = s.scalar(select(func.count(func.distinct(Delivery.job_pk))).where(Delivery.state == ds))
        lines.append(f'facesym_undelivered_reports{{state="{ds.value}"}} {int(n or 0)}')
    oldest_report = s.scalar(
        select(func.min(Job.updated_at)).join(Delivery, Delivery.job_pk == Job.id)
        .where(Job.state == JobState.REPORTED, Delivery.state == DeliveryState.PENDING)
    )
    family("facesym_oldest_pending_delivery_seconds", "gauge",
           "Age of the oldest report still waiting for a PENDING delivery (0 when none).")
    lines.append(f"facesym_oldest_pending_delivery_seconds {_age(now, oldest_report):.0f}")
    oldest_due = s.scalar(
        select(func.min(Job.next_run_at)).where(Job.state == JobState.QUEUED, Job.next_run_at <= now)
    )
    family("facesym_oldest_due_job_seconds", "gauge",
           "How long the longest-waiting QUEUED job has been due without a worker taking it (0 when none).")
    lines.append(f"facesym_oldest_due_job_seconds {_age(now, oldest_due):.0f}")

    job_attempts = int(s.scalar(select(func.coalesce(func.sum(Job.attempts), 0))) or 0)
    job_retries = int(s.scalar(select(func.coalesce(func.sum(Job.attempts - 1), 0)).where(Job.attempts > 1))
                      or 0)
    del_attempts = int(s.scalar(select(func.coalesce(func.sum(Delivery.attempts), 0))) or 0)
    del_retries = int(s.scalar(select(func.coalesce(func.sum(Delivery.attempts - 1), 0))
                               .where(Delivery.attempts > 1)) or 0)
    family("facesym_job_attempts", "gauge", "Analysis attempts of the jobs in the database.")
    lines.append(f"facesym_job_attempts {job_attempts}")
    family("facesym_job_retries", "gauge", "Analysis attempts beyond the first (jobs in the database).")
    lines.append(f"facesym_job_retries {job_retries}")
    family("facesym_delivery_attempts", "gauge", "Delivery attempts of the deliveries in the database.")
    lines.append(f"facesym_delivery_attempts {del_attempts}")
    family("facesym_delivery_retries", "gauge", "Delivery attempts beyond the first.")
    lines.append(f"facesym_delivery_retries {del_retries}")

    times.update(s)
    family("facesym_analysis_seconds", "histogram",
           "Wall time of finished analyses (audit 'analysis begun' to 'analysis finished').")
    for b, n in zip(BUCKETS, times.counts, strict=True):
        lines.append(f'facesym_analysis_seconds_bucket{{le="{b:g}"}} {n}')
    lines.append(f'facesym_analysis_seconds_bucket{{le="+Inf"}} {times.total}')
    lines.append(f"facesym_analysis_seconds_sum {times.sum:.6f}")
    lines.append(f"facesym_analysis_seconds_count {times.total}")

    audit = int(s.scalar(select(func.count()).select_from(AuditRecord)) or 0)
    family("facesym_audit_records", "gauge", "Records in the audit trail.")
    lines.append(f"facesym_audit_records {audit}")

    from service import __version__

    family("facesym_build_info", "gauge", "FaceSym version (always 1).")
    lines.append(f'facesym_build_info{{version="{_label(__version__)}"}} 1')
    return "\n".join(lines) + "\n"
