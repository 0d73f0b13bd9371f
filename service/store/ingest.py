"""Take one received DICOM file into the store: file on disk, rows in the database, the study's job touched.

:func:`ingest` is what the storage SCP calls before it acknowledges a C-STORE, so when it returns
"stored" or "new_version" the file is renamed into place and fsynced and the rows are committed.
Identity and outcomes:

- a new SOP Instance UID is stored as version 1 ("stored");
- the same SOP Instance UID with the same data set bytes as a version already kept is a "duplicate":
  nothing is written, the study's job is not touched;
- the same SOP Instance UID with other bytes is kept as the next version ("new_version") when the
  duplicate policy is "version", else "rejected".

"Same bytes" compares the SHA-256 of the encoded data set, i.e. the file minus its PS3.10 preamble and
File Meta Information: the meta group is written by whoever wrote the file (a sender's toolkit, our SCP),
so hashing it would make one object look different depending on how it travelled.
:func:`dataset_sha256` recomputes it from a stored file.

Only UIDs reach the logs, never patient names, IDs or birth dates.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.errors import InvalidParameterError, LimitExceededError
from service.media.limits import DecodeLimits
from service.store.db import Instance, Job, JobState, Patient, Series, Study
from service.store.files import FileStore, UnsafeUidError, check_uid, fsync_file, instance_relpath

log = logging.getLogger(__name__)

Outcome = Literal["stored", "duplicate", "new_version", "rejected"]
#: Why an object was rejected; the SCP maps each to a DIMSE status (service.dicom.status).
Rejection = Literal[
    "", "unreadable", "missing_uid", "bad_uid", "mismatch", "inconsistent", "conflict", "limit"
]

DUPLICATE_POLICIES = ("version", "reject")
REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
# Job states that a new object sends back to RECEIVED (the quiet period starts again). RUNNING is left
# alone: the worker sees Study.last_received_at move and starts over itself.
_RESTART = (JobState.QUEUED, JobState.REPORTED, JobState.DELIVERED, JobState.FAILED)
_CHUNK = 1 << 20
# Header values above this stay on disk when the header is read (a huge private element is never loaded);
# text/number attributes longer than _MAX_VALUE_BYTES are treated as absent (malformed: none is that long).
_DEFER_SIZE = 1 << 20
_VIDEO_SOP_CLASSES = frozenset(f"1.2.840.10008.5.1.4.1.1.77.1.{n}.1" for n in (1, 2, 4))  # PS3.4 B.5
_MAX_VALUE_BYTES = 1 << 16
#: Most objects placed and committed in one transaction (group commit, see :class:`_GroupCommit`).
MAX_BATCH = 64


@dataclass(frozen=True)
class IngestResult:
    """What :func:`ingest` did with one object.

    Attributes
    ----------
    outcome
        "stored" (new SOP instance), "duplicate" (same bytes as a kept version; nothing written),
        "new_version" (same SOP Instance UID, other bytes, kept as ``version``) or "rejected".
    sop_instance_uid, study_uid
        As read from the object ("" when unreadable or missing).
    version
        The version stored, or the version a duplicate matched; 0 when rejected.
    reason
        Why it was rejected (no PHI), else "".
    rejection
        The kind of rejection (see :data:`Rejection`), else "".
    path
        The store-relative path of the stored (or matched) version, else "".
    """

    outcome: Outcome
    sop_instance_uid: str
    study_uid: str
    version: int
    reason: str = ""
    rejection: Rejection = ""
    path: str = ""


class _Rejected(Exception):
    def __init__(self, rejection: Rejection, reason: str):
        super().__init__(reason)
        self.rejection: Rejection = rejection
        self.reason = reason


def dataset_offset(fh: BinaryIO) -> int:
    """Byte offset where the data set starts: after the preamble and File Meta group, 0 for a bare data set.

    The File Meta Information (PS3.10 7.1) is always explicit VR little endian; its elements are walked
    rather than trusting (0002,0000) Group Length, which some writers get wrong.
    """
    fh.seek(0)
    head = fh.read(132)
    if len(head) < 132 or head[128:132] != b"DICM":
        return 0
    pos = 132
    while True:
        fh.seek(pos)
        raw = fh.read(8)
        if len(raw) < 8 or struct.unpack("<H", raw[:2])[0] != 0x0002:
            return pos
        vr = raw[4:6]
        if vr in (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"):
            ext = fh.read(4)
            if len(ext) < 4:
                return pos
            pos += 12 + struct.unpack("<I", ext)[0]
        else:
            pos += 8 + struct.unpack("<H", raw[6:8])[0]


def dataset_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a DICOM file's data set bytes (everything after the File Meta Information)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(dataset_offset(fh))
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _text(ds: Dataset, keyword: str, max_len: int) -> str:
    """An attribute as text for a column of ``max_len`` characters ("" when absent or undecodable)."""
    try:
        if _oversized(ds, keyword):
            return ""
        value = ds.get(keyword)
        if value is None:
            return ""
        if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
            value = "\\".join(str(v) for v in value)
        return str(value).strip()[:max_len]
    except Exception:  # a malformed value must not stop storage; the file keeps the original
        return ""


def _frames(ds: Dataset) -> int | None:
    """NumberOfFrames when it is a sane positive count, else None (0, -1 or 2**40 are no frame counts)."""
    n = _int(ds, "NumberOfFrames")
    return n if n is not None and 0 < n < 2**31 else None


def _oversized(ds: Dataset, keyword: str) -> bool:
    """True when the element's stated length is beyond any sane value (checked without loading it)."""
    elem = ds.get_item(keyword, keep_deferred=True)
    return elem is not None and int(getattr(elem, "length", 0) or 0) > _MAX_VALUE_BYTES


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        if _oversized(ds, keyword):
            return None
        value = ds.get(keyword)
        return None if value is None or value == "" else int(value)
    except Exception:
        return None


_PatientKey = tuple[str, str, str]


def patient_key(patient_id: str, issuer: str, name: str) -> _PatientKey:
    """Who a patient is: a non-empty PatientID with its Issuer of Patient ID (one row however the name
    is spelt, so a corrected name updates the row); without a PatientID, the name as well."""
    return (patient_id, issuer, "" if patient_id else name)


@dataclass(frozen=True)
class _Header:
    """What the rows need from one object, read once from its header (in the association's own thread, so
    the one writer of a group commit touches no pydicom element)."""

    sop_class: str
    sop_uid: str
    study_uid: str
    series_uid: str
    ds: Dataset
    transfer_syntax: str
    patient_key: _PatientKey = ("", "", "")  # :func:`patient_key`
    patient: dict[str, Any] = field(default_factory=dict)  # the Patient columns besides the key
    study: dict[str, Any] = field(default_factory=dict)
    series: dict[str, Any] = field(default_factory=dict)
    instance: dict[str, Any] = field(default_factory=dict)
    own: bool = False  # FaceSym's own output (is_facesym_output)


def _read_header(path: Path) -> _Header:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, defer_size=_DEFER_SIZE)
    except Exception as exc:
        raise _Rejected("unreadable", f"not a readable DICOM object ({type(exc).__name__})") from None
    uids: dict[str, str] = {}
    missing = []
    for keyword in REQUIRED_UIDS:
        value = _text(ds, keyword, 200).strip("\x00 ")
        if not value:
            missing.append(keyword)
        uids[keyword] = value
    if missing:
        raise _Rejected("missing_uid", f"missing {', '.join(missing)}")
    try:
        for keyword, value in uids.items():
            check_uid(value, keyword)
    except UnsafeUidError as exc:
        raise _Rejected("bad_uid", str(exc)) from None
    meta = getattr(ds, "file_meta", None)
    ts = _text(meta, "TransferSyntaxUID", 64) if meta is not None else ""
    if not ts:
        implicit, _little = getattr(ds, "original_encoding", (True, True))
        ts = "1.2.840.10008.1.2" if implicit is not False else "1.2.840.10008.1.2.1"
    return _Header(
        uids["SOPClassUID"],
        uids["SOPInstanceUID"],
        uids["StudyInstanceUID"],
        uids["SeriesInstanceUID"],
        ds,
        ts,
        patient_key=patient_key(
            _text(ds, "PatientID", 64), _text(ds, "IssuerOfPatientID", 64), _text(ds, "PatientName", 324)
        ),
        patient={"name": _text(ds, "PatientName", 324), "birth_date": _text(ds, "PatientBirthDate", 8),
                 "sex": _text(ds, "PatientSex", 16)},
        study={
            "accession_number": _text(ds, "AccessionNumber", 16),
            "study_id": _text(ds, "StudyID", 16),
            "study_date": _text(ds, "StudyDate", 8),
            "study_time": _text(ds, "StudyTime", 32),
            "study_description": _text(ds, "StudyDescription", 64),
            "referring_physician": _text(ds, "ReferringPhysicianName", 324),
        },
        series={
            "modality": _text(ds, "Modality", 16),
            "series_number": _int(ds, "SeriesNumber"),
            "series_description": _text(ds, "SeriesDescription", 64),
            "protocol_name": _text(ds, "ProtocolName", 64),
            "performed_procedure_step_description": _text(ds, "PerformedProcedureStepDescription", 64),
        },
        instance={
            "instance_number": _int(ds, "InstanceNumber"),
            "number_of_frames": _frames(ds),
            "image_comments": _text(ds, "ImageComments", 10240),
        },
        own=is_facesym_output(ds),
    )


def ingest(
    sessions: sessionmaker,
    files: FileStore,
    tmp_path: Path,
    calling_ae: str,
    duplicate_policy: str,
    engine_version: str,
    *,
    expected_sop_class: str | None = None,
    expected_sop_instance: str | None = None,
    limits: DecodeLimits | None = None,
) -> IngestResult:
    """Store one received DICOM file durably and record it; see the module docstring for the outcomes.

    Parameters
    ----------
    sessions
        The database session factory (``open_database``).
    files
        The file store.
    tmp_path
        The received file (PS3.10, or a bare data set). A file under ``files.incoming_dir()`` is
        consumed: moved into place, or deleted. A file elsewhere is linked/copied into the incoming
        folder first and left where it was.
    calling_ae
        The sender's AE title (kept on the instance row).
    duplicate_policy
        "version" (keep other bytes under the same SOP Instance UID as a new version) or "reject".
    engine_version
        The analysis version whose job for the study is created or sent back to RECEIVED.
    expected_sop_class, expected_sop_instance
        The Affected SOP Class / Instance UID of the C-STORE request; a data set that says otherwise
        is rejected ("mismatch", PS3.4 B.2.3 "Data Set does not match SOP Class").
    limits
        Decode limits checked on what the object states (file size, Rows x Columns, NumberOfFrames):
        an object above them is rejected ("limit") instead of failing later in the worker.

    Returns
    -------
    IngestResult
        Data problems are returned as outcome "rejected" (nothing kept). Infrastructure problems
        (disk, database) raise: OSError, sqlalchemy.exc.SQLAlchemyError. A commit that fails takes
        the placed file away again, so no file is left that the database does not know.
    """
    if duplicate_policy not in DUPLICATE_POLICIES:
        raise InvalidParameterError(
            f"duplicate_policy must be one of {DUPLICATE_POLICIES}, got {duplicate_policy!r}"
        )
    tmp = Path(tmp_path).resolve()
    if tmp.parent != files.incoming_dir():
        tmp = files.adopt(tmp)
    try:
        return _ingest(
            sessions,
            files,
            tmp,
            calling_ae,
            duplicate_policy,
            engine_version,
            expected_sop_class,
            expected_sop_instance,
            limits,
        )
    finally:
        tmp.unlink(missing_ok=True)  # placed files are gone from here already


def _ingest(
    sessions: sessionmaker,
    files: FileStore,
    tmp: Path,
    calling_ae: str,
    policy: str,
    engine_version: str,
    expected_sop_class: str | None,
    expected_sop_instance: str | None,
    limits: DecodeLimits | None = None,
) -> IngestResult:
    try:
        if limits is not None:
            _check_limits(limits, tmp, None)
        head = _read_header(tmp)
        if limits is not None:
            _check_limits(limits, tmp, head.ds, head.sop_class)
        if expected_sop_class and head.sop_class != expected_sop_class:
            raise _Rejected(
                "mismatch", f"data set SOP Class {head.sop_class} is not the request's {expected_sop_class}"
            )
        if expected_sop_instance and head.sop_uid != expected_sop_instance:
            raise _Rejected(
                "mismatch",
                f"data set SOP Instance {head.sop_uid} is not the request's {expected_sop_instance}",
            )
    except _Rejected as rej:
        log.warning("rejected an object from %s: %s", calling_ae, rej.reason)
        return IngestResult("rejected", "", "", 0, rej.reason, rej.rejection)
    digest = dataset_sha256(tmp)
    size = tmp.stat().st_size
    fsync_file(tmp)  # here, in the association's own thread: many fsyncs run at once, none under the lock
    item = _Pending(tmp, head, digest, size, calling_ae, policy, engine_version)
    return _committer(files).submit(item, lambda batch: _commit_batch(sessions, files, batch))


@dataclass(eq=False)
class _Pending:
    """One object waiting for its transaction: read, hashed and fsynced by its association's thread."""

    tmp: Path
    head: _Header
    digest: str
    size: int
    calling_ae: str
    policy: str
    engine_version: str
    done: bool = False
    result: IngestResult | None = None
    error: BaseException | None = None


class _GroupCommit:
    """Group commit of the objects that arrive together, one writer at a time per file store.

    Each association's thread reads, hashes and fsyncs its own file in parallel, then queues it here.
    The first thread to find no writer becomes the writer: it takes up to :data:`MAX_BATCH` queued objects,
    stores them in ONE database transaction with one fsync per directory (:meth:`FileStore.place_many`)
    and one commit, answers them, and repeats until its own object is answered; then the next waiting
    thread takes over. So each object still gets its answer only after its file is fsynced and renamed
    into place and its rows are committed, while a burst of small objects costs a few fsyncs per batch
    instead of a few per object. A batch that fails in any way (a rejection, a race with another process,
    a failed commit) is undone and its objects are stored one by one, each with the single-object path's
    outcome and retry. One writer per store also means two associations never place the same path.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._writing = False

    def submit(self, item: _Pending, commit: Any) -> IngestResult:
        writer = False
        with self._cond:
            self._queue.append(item)
            while not item.done and self._writing:
                self._cond.wait()
            if not item.done:
                self._writing = writer = True
        if writer:
            try:
                while not item.done:
                    with self._cond:
                        batch = self._queue[:MAX_BATCH]
                        del self._queue[:MAX_BATCH]
                    try:
                        commit(batch)  # sets every item's result or error
                    except BaseException as exc:  # pragma: no cover - commit catches what it can
                        for pending in batch:
                            if pending.result is None and pending.error is None:
                                pending.error = exc
                    with self._cond:
                        for pending in batch:
                            pending.done = True
                        self._cond.notify_all()
            finally:
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()  # a thread whose object is still queued takes over
        if item.error is not None:
            raise item.error
        assert item.result is not None
        return item.result


_COMMITTERS: dict[Path, _GroupCommit] = {}
_COMMITTERS_LOCK = threading.Lock()


def _committer(files: FileStore) -> _GroupCommit:
    with _COMMITTERS_LOCK:
        return _COMMITTERS.setdefault(files.root, _GroupCommit())


def _commit_batch(sessions: sessionmaker, files: FileStore, batch: list[_Pending]) -> None:
    """Store ``batch`` in one transaction, or else one by one; sets each item's result or error."""
    if len(batch) > 1:
        try:
            results = _batch_transaction(sessions, files, batch)
        except Exception as exc:  # undone; every object gets the single-object treatment below
            log.info("storing %d objects one by one after %s", len(batch), type(exc).__name__)
        else:
            for item, result in zip(batch, results, strict=True):
                item.result = result
                _log_outcome(item, result)
            return
    for item in batch:
        try:
            item.result = _store_alone(sessions, files, item)
        except BaseException as exc:  # raised again in the item's own thread
            item.error = exc


def _store_alone(sessions: sessionmaker, files: FileStore, item: _Pending) -> IngestResult:
    head = item.head
    for attempt in (1, 2):
        try:
            (result,) = _batch_transaction(sessions, files, [item])
        except _Rejected as rej:
            result = IngestResult("rejected", head.sop_uid, head.study_uid, 0, rej.reason, rej.rejection)
        except (IntegrityError, OperationalError) as exc:
            # Another process inserted the same patient/study/series/job (or SQLite was busy).
            if attempt == 2:
                raise
            log.info("retrying SOP Instance %s after %s", head.sop_uid, type(exc).__name__)
            continue
        _log_outcome(item, result)
        return result
    raise AssertionError("unreachable")  # pragma: no cover


def _log_outcome(item: _Pending, result: IngestResult) -> None:
    head = item.head
    if result.outcome == "rejected":
        log.warning(
            "rejected SOP Instance %s (study %s) from %s: %s",
            head.sop_uid,
            head.study_uid,
            item.calling_ae,
            result.reason,
        )
    elif result.outcome == "duplicate":
        log.info(
            "duplicate SOP Instance %s (version %d, study %s) from %s: identical, not stored again",
            head.sop_uid,
            result.version,
            head.study_uid,
            item.calling_ae,
        )
    else:
        log.info(
            "stored SOP Instance %s version %d (study %s, series %s) from %s",
            head.sop_uid,
            result.version,
            head.study_uid,
            head.series_uid,
            item.calling_ae,
        )


def _check_limits(limits: DecodeLimits, path: Path, ds: Dataset | None, sop_class: str = "") -> None:
    """Refuse what the object's size or header already says is beyond the decode limits (a video's frames
    against max_frame_pixels, a single image against max_image_pixels)."""
    try:
        if ds is None:
            limits.check_file(path.stat().st_size, "object")
            return
        rows, columns, frames = _int(ds, "Rows"), _int(ds, "Columns"), _int(ds, "NumberOfFrames")
        if rows is not None and columns is not None:
            still = (frames or 1) <= 1 and sop_class not in _VIDEO_SOP_CLASSES
            limits.check_frame(columns, rows, "object", still=still)
        if frames is not None:
            limits.check_frames(frames, "object", stated=True)
    except LimitExceededError as exc:
        raise _Rejected("limit", str(exc)) from None


def _batch_transaction(sessions: sessionmaker, files: FileStore, batch: list[_Pending]) -> list[IngestResult]:
    """All of ``batch`` (one object or more) in one transaction: the rows it needs read up front, rows
    staged in order (a later object sees the earlier ones, so the same SOP Instance twice is a duplicate
    or the next version), files renamed with one fsync per folder (each file itself was fsynced before),
    one commit. Anything that fails undoes the whole batch (files taken back) and raises (a rejection
    as _Rejected)."""
    now = datetime.now(UTC)
    results: list[IngestResult] = []
    placed: list[tuple[Path, Path]] = []
    with sessions() as session:
        _begin_write(session)
        lookup = _Lookup(session)
        lookup.prefetch([item.head for item in batch], {item.engine_version for item in batch})
        moves: list[tuple[Path, str]] = []
        for item in batch:
            result = _stage(
                lookup, item.head, item.digest, item.size, item.calling_ae, item.policy, item.engine_version,
                now,
            )
            results.append(result)
            if result.outcome != "duplicate":
                moves.append((item.tmp, result.path))
        session.flush()  # constraint violations surface here, before any file moves
        try:
            try:
                targets = files.place_many(moves, synced=True)
            except BaseException:
                # Take back what was renamed before the failure: each target still exists where it went.
                for tmp, rel in moves:
                    target = files.abspath(rel)
                    if target.exists() and not tmp.exists():
                        placed.append((target, tmp))
                raise
            placed = [(target, tmp) for target, (tmp, _) in zip(targets, moves, strict=True)]
            session.commit()
        except BaseException:
            for target, tmp in reversed(placed):
                _unplace(target, tmp)
            raise
    return results


def _stage(
    lookup: _Lookup,
    head: _Header,
    digest: str,
    size: int,
    calling_ae: str,
    policy: str,
    engine_version: str,
    now: datetime,
) -> IngestResult:
    """Add one object's rows to the session (not flushed) and return its outcome, whose ``path`` is where
    its file goes; "duplicate" adds nothing. Raises _Rejected; the caller rolls back."""
    kept = lookup.instances(head.sop_uid)
    for inst in kept:
        if inst.sha256 == digest:
            return IngestResult("duplicate", head.sop_uid, head.study_uid, inst.version, path=inst.path)
    if kept and policy == "reject":
        raise _Rejected("conflict", f"SOP Instance {head.sop_uid} already stored with other content")
    version = kept[-1].version + 1 if kept else 1
    rel = instance_relpath(head.study_uid, head.series_uid, head.sop_uid, version)

    # FaceSym's own reports (key images, PDF) coming back from a PACS that routes whole studies are
    # kept, but they are not new data: they neither restart the quiet period nor reopen the job.
    own = head.own
    patient = _upsert_patient(lookup, head)
    study = _upsert_study(lookup, head, patient, now, touch=not own)
    series = _upsert_series(lookup, head, study)
    instance = Instance(
        sop_instance_uid=head.sop_uid,
        version=version,
        series=series,
        sop_class_uid=head.sop_class,
        transfer_syntax_uid=head.transfer_syntax,
        **head.instance,
        path=rel,
        sha256=digest,
        size=size,
        calling_ae=(calling_ae or "").strip()[:16],
        received_at=now,
        facesym_output=own,
    )
    lookup.session.add(instance)
    kept.append(instance)  # a later object of the same transaction sees this version
    if not own:
        _touch_job(lookup, study, engine_version, now)
    outcome: Outcome = "new_version" if version > 1 else "stored"
    return IngestResult(outcome, head.sop_uid, head.study_uid, version, path=rel)


class _Lookup:
    """The rows one ingest transaction reads, each read at most once: for a batch, one IN query per table
    up front (:meth:`prefetch`), else on first use. Rows the transaction creates are added, so a later
    object of the same batch finds them without a query (nothing is flushed until the batch is staged)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._instances: dict[str, list[Instance]] = {}
        self._patients: dict[_PatientKey, Patient | None] = {}
        self._studies: dict[str, Study | None] = {}
        self._series: dict[str, Series | None] = {}
        self._jobs: dict[tuple[str, str], Job | None] = {}

    def prefetch(self, heads: list[_Header], engine_versions: set[str]) -> None:
        s = self.session
        sops = sorted({h.sop_uid for h in heads})
        for inst in s.scalars(
            select(Instance).where(Instance.sop_instance_uid.in_(sops)).order_by(Instance.version)
        ):
            self._instances.setdefault(inst.sop_instance_uid, []).append(inst)
        for uid in sops:
            self._instances.setdefault(uid, [])
        keys = {h.patient_key for h in heads}
        # By PatientID alone (one cheap IN query), the exact key matched here.
        ids = sorted({key[0] for key in keys})
        for patient in s.scalars(select(Patient).where(Patient.patient_id.in_(ids)).order_by(Patient.id)):
            key = patient_key(patient.patient_id, patient.issuer, patient.name)
            if key in keys:
                self._patients.setdefault(key, patient)
        for key in keys:
            self._patients.setdefault(key, None)
        studies = sorted({h.study_uid for h in heads})
        for study in s.scalars(select(Study).where(Study.study_uid.in_(studies))):
            self._studies[study.study_uid] = study
        for uid in studies:
            self._studies.setdefault(uid, None)
        series_uids = sorted({h.series_uid for h in heads})
        for series in s.scalars(select(Series).where(Series.series_uid.in_(series_uids))):
            self._series[series.series_uid] = series
        for uid in series_uids:
            self._series.setdefault(uid, None)
        known = {st.id: st.study_uid for st in self._studies.values() if st is not None}
        if known:
            query = select(Job).where(
                Job.study_pk.in_(sorted(known)), Job.engine_version.in_(sorted(engine_versions))
            )
            for job in s.scalars(query):
                self._jobs[(known[job.study_pk], job.engine_version)] = job
        for uid in studies:
            for version in engine_versions:
                self._jobs.setdefault((uid, version), None)

    def instances(self, sop_uid: str) -> list[Instance]:
        """The kept versions of ``sop_uid``, oldest first (the transaction appends its new one)."""
        if sop_uid not in self._instances:
            self._instances[sop_uid] = list(
                self.session.scalars(
                    select(Instance).where(Instance.sop_instance_uid == sop_uid).order_by(Instance.version)
                )
            )
        return self._instances[sop_uid]

    def patient(self, key: _PatientKey) -> Patient | None:
        if key not in self._patients:
            a, b, c = key
            query = select(Patient).where(Patient.patient_id == a, Patient.issuer == b)
            if not a:  # no PatientID: the name tells patients apart
                query = query.where(Patient.name == c)
            self._patients[key] = self.session.scalar(query.order_by(Patient.id))
        return self._patients[key]

    def study(self, uid: str) -> Study | None:
        if uid not in self._studies:
            self._studies[uid] = self.session.scalar(select(Study).where(Study.study_uid == uid))
        return self._studies[uid]

    def series(self, uid: str) -> Series | None:
        if uid not in self._series:
            self._series[uid] = self.session.scalar(select(Series).where(Series.series_uid == uid))
        return self._series[uid]

    def job(self, study: Study, engine_version: str) -> Job | None:
        key = (study.study_uid, engine_version)
        if key not in self._jobs:
            self._jobs[key] = None if study.id is None else self.session.scalar(
                select(Job).where(Job.study_pk == study.id, Job.engine_version == engine_version)
            )
        return self._jobs[key]

    def added(self, row: Patient | Study | Series | Job) -> None:
        """A row the transaction created (after :meth:`Session.add`)."""
        if isinstance(row, Patient):
            self._patients[patient_key(row.patient_id, row.issuer, row.name)] = row
        elif isinstance(row, Study):
            self._studies[row.study_uid] = row
        elif isinstance(row, Series):
            self._series[row.series_uid] = row
        else:
            self._jobs[(row.study.study_uid, row.engine_version)] = row


def _begin_write(session: Session) -> None:
    """Start a write transaction now: SQLite takes its one writer lock before we read, so the
    version we compute cannot be taken by another association before we commit."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(text("BEGIN IMMEDIATE"))


def _unplace(target: Path, tmp: Path) -> None:
    """Undo :meth:`FileStore.place` after a failed commit: the file goes back to the incoming folder
    (ingest's caller deletes it), so the store holds no file the database does not reference."""
    try:
        os.replace(target, tmp)
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        log.exception("could not take back %s after a failed commit", target.name)


def _upsert_patient(lookup: _Lookup, head: _Header) -> Patient:
    patient = lookup.patient(head.patient_key)
    if patient is None:
        patient_id, issuer, _ = head.patient_key
        patient = Patient(patient_id=patient_id, issuer=issuer, **head.patient)
        lookup.session.add(patient)
        lookup.added(patient)
    else:
        # The newest data corrects the patient's attributes (a re-sent study with a fixed name).
        patient.name = head.patient["name"] or patient.name
        patient.birth_date = head.patient["birth_date"] or patient.birth_date
        patient.sex = head.patient["sex"] or patient.sex
    return patient


def is_facesym_output(ds: Dataset) -> bool:
    """An object FaceSym's report made (SR, key images, PDF): Manufacturer and Manufacturer's Model Name are
    both "FaceSym". Phantom videos (model "FaceSym phantom") stand in for a camera and are analysed."""
    return _text(ds, "Manufacturer", 64) == "FaceSym" and _text(ds, "ManufacturerModelName", 64) == "FaceSym"


def _upsert_study(
    lookup: _Lookup, head: _Header, patient: Patient, now: datetime, touch: bool = True
) -> Study:
    study_uid, fields = head.study_uid, head.study
    study = lookup.study(study_uid)
    if study is None:
        study = Study(study_uid=study_uid, patient=patient, last_received_at=now, **fields)
        lookup.session.add(study)
        lookup.added(study)
        return study
    # Objects, not keys: rows of this transaction have no id yet (the patient is in the session's
    # identity map, so this reads nothing unless the study's patient really is another one).
    if study.patient is not patient:
        # Corrected demographics are resent under the same Study Instance UID: the latest wins.
        log.info("study %s: patient identification changed; linking the latest", study_uid)
        study.patient = patient
    for name, value in fields.items():
        if value and not getattr(study, name):
            setattr(study, name, value)
    if touch:
        study.last_received_at = now
    return study


def _upsert_series(lookup: _Lookup, head: _Header, study: Study) -> Series:
    series_uid = head.series_uid
    series = lookup.series(series_uid)
    if series is None:
        series = Series(series_uid=series_uid, study=study, **head.series)
        lookup.session.add(series)
        lookup.added(series)
        return series
    if series.study is not study:
        raise _Rejected(
            "inconsistent", f"series {series_uid} already belongs to another study than {study.study_uid}"
        )
    return series


def _touch_job(lookup: _Lookup, study: Study, engine_version: str, now: datetime) -> None:
    job = lookup.job(study, engine_version)
    if job is None:
        job = Job(study=study, engine_version=engine_version, state=JobState.RECEIVED, next_run_at=now)
        lookup.session.add(job)
        lookup.added(job)
        return
    if job.state == JobState.QUEUED:
        job.state = JobState.RECEIVED  # the quiet period starts again
    elif job.state in _RESTART:
        log.info(
            "job %d (study %s) back to RECEIVED from %s: new data", job.id, study.study_uid, job.state.value
        )
        job.state = JobState.RECEIVED
        job.attempts = 0
        job.reason = ""
        job.claimed_by = ""
        job.next_run_at = now
