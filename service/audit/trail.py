"""The audit trail: an append-only, hash-chained table of PS3.15 audit messages in the service database.

Record ``n`` stores ``hash_n = sha256(hash_{n-1} + "seq|time|event_id|outcome|xml")`` (the first record
chains to 64 zeros), so editing any byte of a record, deleting one or reordering them breaks the chain at
that record; :meth:`AuditTrail.verify` names the first broken one. (Truncating the newest records, or
rewriting the whole tail, needs an outside anchor: the syslog repository holds forwarded copies.)

Appends are serialised: one lock per process, plus ``BEGIN IMMEDIATE`` on SQLite (several processes)
or a transaction-scoped advisory lock on PostgreSQL; a busy database is retried. Nothing here touches
the network, so an unreachable audit repository never blocks :meth:`AuditTrail.append`.

Logs name event ids and sequence numbers only, never message contents (they carry Patient IDs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time as _time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import func, select, text, tuple_, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.audit.anchor import AnchorError, AuditAnchor
from service.audit.events import (
    MINOR_FAILURE,
    SERIOUS_FAILURE,
    SUCCESS,
    AuditEvent,
    config_change,
    default_source_id,
    instances_transferred,
    iso_time,
)
from service.store.db import AuditRecord, Instance, Patient, Series, Study

log = logging.getLogger(__name__)

GENESIS = "0" * 64
_PG_LOCK_KEY = 0x46535941  # "FSYA": the advisory lock that serialises appends on PostgreSQL
_RETRIES = 12


def canonical_bytes(seq: Any, time: Any, event_id: Any, outcome: Any, xml: Any) -> bytes:
    """The bytes of a record that its hash covers: ``seq|time|event_id|outcome|xml`` in UTF-8."""
    return f"{seq}|{time}|{event_id}|{outcome}|{xml}".encode("utf-8", "surrogatepass")


def chain_hash(prev_hash: Any, seq: Any, time: Any, event_id: Any, outcome: Any, xml: Any) -> str:
    """SHA-256 hex of ``prev_hash`` followed by the record's canonical bytes."""
    h = hashlib.sha256(str(prev_hash).encode("utf-8", "surrogatepass"))
    h.update(canonical_bytes(seq, time, event_id, outcome, xml))
    return h.hexdigest()


@dataclass(frozen=True)
class VerifyResult:
    """``ok`` when the whole chain is intact; else the first broken record's ``seq`` and why."""

    ok: bool
    count: int
    first_broken_seq: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class PendingRecord:
    """A record waiting for the syslog forwarder."""

    seq: int
    time: str
    event_id: str
    xml: str
    #: The record's chain hash, and the highest record number the audit anchor had seen when it was read
    #: for sending (issue 14: every syslog copy carries the high-water mark, so a repository can tell a
    #: trail cut short later).
    hash: str = ""
    high_water: int = 0


class AuditTrail:
    """The audit trail over a session factory (the one ``open_database`` returns).

    ``source_id`` / ``site_id`` fill AuditSourceID / AuditEnterpriseSiteID of events that have none.
    Events that name a study but no patient get the study's Patient ID from the database (the standard's
    Patient participant object), unless ``resolve_patients`` is False.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        source_id: str = "",
        site_id: str = "",
        resolve_patients: bool = True,
        anchor: AuditAnchor | None = None,
    ) -> None:
        self.sessions = sessions
        self.anchor = anchor
        self.source_id = source_id or default_source_id()
        self.site_id = site_id
        self.resolve_patients = resolve_patients
        self._lock = threading.Lock()
        self._listeners: list[Callable[[int], None]] = []
        self.transfers = TransferCollector(self)

    # --- writing ------------------------------------------------------------------------------------------

    def subscribe(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(seq)`` after every append (the syslog forwarder wakes up on it)."""
        self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[int], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def append(self, event: AuditEvent) -> AuditRecord:
        """Add ``event`` as the next record of the chain and return it (committed). Raises on a database
        failure that outlasts the retries; see :meth:`record` for the never-raising variant."""
        event = event.with_source(self.source_id, self.site_id)
        if self.resolve_patients and not event.has_patient():
            event = event.with_patient(self._patient_of(event.study_uids()))
        xml, when = event.to_xml(), iso_time(event.time)
        delay = 0.01
        for attempt in range(1, _RETRIES + 1):
            try:
                with self._lock:
                    rec = self._append_once(when, event.event_id, event.outcome, xml)
                break
            except (IntegrityError, OperationalError) as exc:
                if attempt == _RETRIES:
                    raise
                log.debug("audit append retry %d after %s", attempt, type(exc).__name__)
                _time.sleep(delay)
                delay = min(0.5, delay * 2)
        if self.anchor is not None:
            try:
                self.anchor.advance(rec.seq, rec.hash)
            except OSError as exc:  # the record is stored; verify will say the anchor is behind
                log.error("audit anchor not advanced to record %d: %s", rec.seq, exc.strerror)
        for listener in list(self._listeners):
            try:
                listener(rec.seq)
            except Exception:  # noqa: BLE001 - a listener must not break auditing
                log.exception("audit listener failed")
        return rec

    def record(self, event: AuditEvent) -> AuditRecord | None:
        """:meth:`append` that never raises: a failure is logged (event id and error class only)."""
        try:
            return self.append(event)
        except Exception as exc:  # noqa: BLE001 - auditing must not take the service down
            log.error("could not record audit event %s: %s", event.event_id, type(exc).__name__)
            return None

    def _append_once(self, when: str, event_id: str, outcome: int, xml: str) -> AuditRecord:
        with self.sessions() as s:
            dialect = s.get_bind().dialect.name
            if dialect == "sqlite":
                s.execute(text("BEGIN IMMEDIATE"))
            elif dialect == "postgresql":
                s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
            last = s.execute(
                select(AuditRecord.seq, AuditRecord.hash).order_by(AuditRecord.seq.desc()).limit(1)
            ).first()
            seq = int(last[0]) + 1 if last else 1
            # Never reuse a number the anchor has seen: after a truncation the gap stays visible.
            seq = max(seq, self._anchored_seq() + 1)
            prev = str(last[1]) if last else GENESIS
            rec = AuditRecord(
                seq=seq, time=when, event_id=event_id, outcome=outcome, xml=xml, prev_hash=prev,
                hash=chain_hash(prev, seq, when, event_id, outcome, xml), forwarded=False,
            )
            s.add(rec)
            s.commit()
            _ = rec.seq  # load now: the caller may hold it after the session is gone
            s.expunge(rec)
            return rec

    def _patient_of(self, study_uids: list[str]) -> str:
        if not study_uids:
            return ""
        try:
            with self.sessions() as s:
                row = s.execute(
                    select(Patient.patient_id, Patient.issuer)
                    .join(Study, Study.patient_pk == Patient.id)
                    .where(Study.study_uid == study_uids[0])
                ).first()
        except Exception:  # noqa: BLE001 - an audit record without the patient beats none at all
            log.debug("patient lookup for an audit event failed", exc_info=True)
            return ""
        if row is None or not row[0]:
            return ""
        return f"{row[0]}^^^{row[1]}" if row[1] else str(row[0])

    def note_settings(self, values: Mapping[str, Any], *, local_ae: str = "FACESYM") -> AuditRecord | None:
        """Record a configuration-change event (110113 / 110131) naming the settings whose values differ
        from the last ones noted (all of them the first time); nothing when none changed. Values are
        compared by a short digest and never stored."""
        digests = {k: hashlib.sha256(repr(v).encode()).hexdigest()[:16] for k, v in sorted(values.items())}
        previous = self._last_setting_digests()
        changed = [k for k, d in digests.items() if previous.get(k) != d]
        changed += [k for k in previous if k not in digests]
        if not changed:
            return None
        return self.record(
            config_change(
                changed, digests=digests, local_ae=local_ae,
                description="initial configuration" if not previous else "configuration changed",
            )
        )

    def _last_setting_digests(self) -> dict[str, str]:
        import base64
        import xml.etree.ElementTree as ET

        with self.sessions() as s:
            xml = s.scalar(
                select(AuditRecord.xml)
                .where(AuditRecord.event_id == "110113", AuditRecord.xml.contains("SettingDigest"))
                .order_by(AuditRecord.seq.desc())
                .limit(1)
            )
        if not xml:
            return {}
        out: dict[str, str] = {}
        try:
            for obj in ET.fromstring(xml).iter("ParticipantObjectIdentification"):
                for d in obj.iter("ParticipantObjectDetail"):
                    if d.get("type") == "SettingDigest":
                        value = base64.b64decode(d.get("value", "")).decode()
                        out[obj.get("ParticipantObjectID", "")] = value
        except (ET.ParseError, ValueError):
            return {}
        return out

    # --- reading ------------------------------------------------------------------------------------------

    def count(self) -> int:
        with self.sessions() as s:
            return int(s.scalar(select(func.count()).select_from(AuditRecord)) or 0)

    def _anchored_seq(self) -> int:
        if self.anchor is None:
            return 0
        try:
            mark = self.anchor.read()
        except AnchorError:
            return 0
        return 0 if mark is None else mark.seq

    def verify(self) -> VerifyResult:
        """Walk the chain in ``seq`` order; the first record that is missing, out of place, linked to the
        wrong predecessor or whose contents no longer match its hash is reported. With an anchor, also a
        trail that ends before the anchor's record (truncated), a record whose hash is not the anchor's
        (rewritten) and an anchor that cannot be trusted. An empty trail without an anchor is ok."""
        result = self._verify_chain()
        if not result.ok or self.anchor is None:
            return result
        try:
            mark = self.anchor.read()
        except AnchorError as exc:
            return VerifyResult(False, result.count, None, f"audit anchor: {exc}")
        if mark is None:
            return result
        last = result.count  # an intact chain numbers its records 1..count
        with self.sessions() as s:
            anchored = s.scalar(select(AuditRecord.hash).where(AuditRecord.seq == mark.seq))
        if last < mark.seq:
            return VerifyResult(False, result.count, last + 1,
                                f"trail truncated: the anchor has seen record {mark.seq}, the database ends "
                                f"at {last or 'no record'}")
        if anchored != mark.hash:
            return VerifyResult(False, result.count, mark.seq,
                                f"record {mark.seq}: hash differs from the anchor's (chain rewritten)")
        return result

    def _verify_chain(self) -> VerifyResult:
        prev, expected, count = GENESIS, 1, 0
        with self.sessions() as s:
            rows = s.execute(
                text(
                    "SELECT seq, time, event_id, outcome, xml, prev_hash, hash FROM audit_record "
                    "ORDER BY seq"
                )
            )
            for seq, when, event_id, outcome, xml, prev_hash, stored in rows:
                count += 1
                if seq != expected:
                    if isinstance(seq, int) and seq > expected:
                        return VerifyResult(False, count, expected,
                                            f"record {expected} is missing (the next record is {seq})")
                    return VerifyResult(False, count, _as_int(seq, expected),
                                        f"record {seq!r} is out of place (expected {expected})")
                if prev_hash != prev:
                    what = "the genesis value" if expected == 1 else f"record {expected - 1}'s hash"
                    return VerifyResult(False, count, seq, f"record {seq}: prev_hash does not match {what}")
                if chain_hash(prev_hash, seq, when, event_id, outcome, xml) != stored:
                    return VerifyResult(False, count, seq,
                                        f"record {seq}: contents do not match its hash (record was altered)")
                prev, expected = stored, expected + 1
        return VerifyResult(True, count)

    def export(self, since: datetime | None = None, fmt: Literal["jsonl", "xml"] = "jsonl") -> Iterator[str]:
        """Records (``time >= since`` when given) in ``seq`` order: one JSON object per line, or one XML
        document ``<AuditMessages>`` holding the ``<AuditMessage>`` elements, one per line."""
        if fmt not in ("jsonl", "xml"):
            raise ValueError(f"format must be jsonl or xml, got {fmt!r}")
        stmt = select(AuditRecord).order_by(AuditRecord.seq)
        if since is not None:
            stmt = stmt.where(AuditRecord.time >= iso_time(since))
        if fmt == "xml":
            yield '<?xml version="1.0" encoding="UTF-8"?>'
            yield "<AuditMessages>"
        with self.sessions() as s:
            for rec in s.scalars(stmt.execution_options(yield_per=500)):
                if fmt == "xml":
                    yield rec.xml
                else:
                    yield json.dumps(
                        {
                            "seq": rec.seq,
                            "time": rec.time,
                            "event_id": rec.event_id,
                            "outcome": rec.outcome,
                            "prev_hash": rec.prev_hash,
                            "hash": rec.hash,
                            "forwarded": bool(rec.forwarded),
                            "xml": rec.xml,
                        },
                        ensure_ascii=False,
                    )
        if fmt == "xml":
            yield "</AuditMessages>"

    # --- forwarding bookkeeping --------------------------------------------------------------------------

    def pending(self, limit: int = 100, after_seq: int = 0) -> list[PendingRecord]:
        """Records not yet forwarded, in ``seq`` order (those with ``seq > after_seq``)."""
        with self.sessions() as s:
            rows = s.execute(
                select(AuditRecord.seq, AuditRecord.time, AuditRecord.event_id, AuditRecord.xml,
                       AuditRecord.hash)
                .where(AuditRecord.forwarded.is_(False), AuditRecord.seq > after_seq)
                .order_by(AuditRecord.seq)
                .limit(limit)
            ).all()
        mark = max([self._anchored_seq(), *(int(r[0]) for r in rows)])
        return [PendingRecord(int(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), mark) for r in rows]

    def mark_forwarded(self, seqs: list[int]) -> None:
        if not seqs:
            return
        delay = 0.01
        for attempt in range(1, _RETRIES + 1):
            try:
                with self.sessions.begin() as s:
                    for i in range(0, len(seqs), 500):
                        s.execute(
                            update(AuditRecord)
                            .where(AuditRecord.seq.in_(seqs[i:i + 500]))
                            .values(forwarded=True)
                        )
                return
            except OperationalError:
                if attempt == _RETRIES:
                    raise
                _time.sleep(delay)
                delay = min(0.5, delay * 2)


def _as_int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


@dataclass
class _Transfer:
    calling_ae: str
    calling_ip: str
    called_ae: str
    counts: Counter[str] = field(default_factory=Counter)
    failed: int = 0
    instances: list[tuple[str, int]] = field(default_factory=list)  # (SOP Instance UID, version) stored


class TransferCollector:
    """Gathers the C-STOREs of each association and records one 110104 per study when it closes.

    The SCP calls :meth:`stored` for every C-STORE it answered (``ok`` False for a refusal) and
    :meth:`closed` on ``EVT_CONN_CLOSE``. ``assoc`` is pynetdicom's Association (duck-typed:
    ``requestor.ae_title``, ``requestor.address``, ``acceptor.ae_title``).

    Once a study's record is written, its objects' rows are flagged ``audited``. An association that a
    stop or crash cuts short never closes here: :meth:`record_unaudited` (run by the receiver at start)
    records what it had acknowledged. A crash between a record and its flags records those objects twice:
    at least once, never lost.
    """

    def __init__(self, trail: AuditTrail) -> None:
        self._trail = trail
        self._lock = threading.Lock()
        self._open: dict[int, dict[str, _Transfer]] = defaultdict(dict)

    def stored(
        self,
        assoc: Any,
        study_uid: str,
        sop_class_uid: str,
        ok: bool = True,
        instance: tuple[str, int] | None = None,
    ) -> None:
        """Note one answered C-STORE; ``instance`` = (SOP Instance UID, version) of the row it stored or
        matched (None when nothing was stored)."""
        req, acc = getattr(assoc, "requestor", None), getattr(assoc, "acceptor", None)
        with self._lock:
            studies = self._open[id(assoc)]
            t = studies.get(study_uid)
            if t is None:
                t = studies[study_uid] = _Transfer(
                    str(getattr(req, "ae_title", "") or "").strip(),
                    str(getattr(req, "address", "") or ""),
                    str(getattr(acc, "ae_title", "") or "").strip() or "FACESYM",
                )
            if ok:
                t.counts[sop_class_uid] += 1
                if instance is not None:
                    t.instances.append(instance)
            else:
                t.failed += 1

    def closed(self, assoc: Any) -> list[AuditRecord]:
        """Record the association's transfers (one event per study); returns the records written."""
        with self._lock:
            studies = self._open.pop(id(assoc), {})
        out = []
        for study_uid, t in studies.items():
            stored = sum(t.counts.values())
            if t.failed == 0:
                outcome, note = SUCCESS, ""
            else:
                outcome = SERIOUS_FAILURE if stored == 0 else MINOR_FAILURE
                note = f"{t.failed} object(s) refused, {stored} stored"
            rec = self._trail.record(
                instances_transferred(
                    study_uid, dict(t.counts), t.calling_ae, t.calling_ip, outcome,
                    local_ae=t.called_ae, description=note,
                )
            )
            if rec is not None:
                out.append(rec)
                self._flag(t.instances)
        return out

    def record_unaudited(self, before: datetime, *, local_ae: str = "FACESYM") -> list[AuditRecord]:
        """Record objects received before ``before`` that no 110104 covers yet, one event per study and
        calling AE, and flag them; returns the records written. Run at start, before the SCP listens."""
        try:
            with self._trail.sessions() as s:
                rows = s.execute(
                    select(Study.study_uid, Instance.calling_ae, Instance.sop_class_uid,
                           Instance.sop_instance_uid, Instance.version)
                    .join(Series, Instance.series_pk == Series.id)
                    .join(Study, Series.study_pk == Study.id)
                    .where(Instance.audited.is_(False), Instance.received_at < before)
                    .order_by(Instance.id)
                ).all()
        except Exception as exc:  # noqa: BLE001 - the next start tries again
            log.error("could not look for unaudited objects: %s", type(exc).__name__)
            return []
        groups: dict[tuple[str, str], _Transfer] = {}
        for study_uid, calling_ae, sop_class, sop_uid, version in rows:
            t = groups.setdefault((study_uid, calling_ae), _Transfer(calling_ae, "", local_ae))
            t.counts[sop_class] += 1
            t.instances.append((sop_uid, version))
        out = []
        for (study_uid, _), t in groups.items():
            rec = self._trail.record(
                instances_transferred(
                    study_uid, dict(t.counts), t.calling_ae, t.calling_ip, SUCCESS, local_ae=local_ae,
                    description="recorded at start: acknowledged in an association that ended without "
                    "closing (FaceSym stopped or crashed)",
                )
            )
            if rec is not None:
                out.append(rec)
                self._flag(t.instances)
        if out:
            log.warning("recorded %d object(s) of %d stud(ies) received in associations cut short",
                        len(rows), len(out))
        return out

    def _flag(self, instances: list[tuple[str, int]]) -> None:
        try:
            with self._trail.sessions.begin() as s:
                for i in range(0, len(instances), _FLAG_CHUNK):
                    chunk = instances[i : i + _FLAG_CHUNK]
                    s.execute(
                        update(Instance)
                        .where(tuple_(Instance.sop_instance_uid, Instance.version).in_(chunk))
                        .values(audited=True)
                    )
        except Exception as exc:  # noqa: BLE001 - unflagged objects are recorded again at the next start
            log.error("could not flag %d object(s) as audited: %s", len(instances), type(exc).__name__)


_FLAG_CHUNK = 400
