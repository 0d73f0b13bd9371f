"""The storage SCP: a pynetdicom 3 AE that accepts C-ECHO and C-STORE of face videos and photographs.

Durable acknowledgement: pynetdicom sends the C-STORE response only when the handler returns, and the
handler returns Success only after :func:`service.store.ingest.ingest` has renamed the fsynced file into
place and committed its rows. Objects stream to a temporary file (``STORE_RECV_CHUNKED_DATASET``),
which pynetdicom deletes when the handler returns, so the handler hard-links it into the store's
``.incoming`` folder (a copy when pynetdicom's temp dir is on another filesystem).

No analysis happens here: the scheduler picks the study up after its quiet period.
Logs carry AE titles, addresses and UIDs only, never patient names, IDs or birth dates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from service.audit import AuditTrail, security_alert
from service.config import Settings
from service.dicom import status
from service.store.files import FileStore
from service.store.ingest import IngestResult, ingest

log = logging.getLogger(__name__)

#: Verification SOP Class (C-ECHO), PS3.4 A.4.
VERIFICATION = "1.2.840.10008.1.1"

#: Storage SOP classes accepted (DESIGN.md, "DICOM and FHIR facts"); anything else is refused at
#: association negotiation (no accepted presentation context).
STORAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.77.1.4.1": "Video Photographic Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.1.1": "Video Endoscopic Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.4": "VL Photographic Image Storage",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image Storage",
}

#: Transfer syntaxes offered for every storage class. pynetdicom's defaults hold no MPEG syntax.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.102",  # MPEG-4 AVC/H.264 High Profile / Level 4.1
    "1.2.840.10008.1.2.4.103",  # MPEG-4 AVC/H.264 BD-compatible High Profile / Level 4.1
    "1.2.840.10008.1.2.4.104",  # MPEG-4 AVC/H.264 High Profile / Level 4.2 For 2D Video
    "1.2.840.10008.1.2.4.105",  # MPEG-4 AVC/H.264 High Profile / Level 4.2 For 3D Video
    "1.2.840.10008.1.2.4.106",  # MPEG-4 AVC/H.264 Stereo High Profile / Level 4.2
    "1.2.840.10008.1.2.4.107",  # HEVC/H.265 Main Profile / Level 5.1
    "1.2.840.10008.1.2.4.108",  # HEVC/H.265 Main 10 Profile / Level 5.1
)

#: Largest P-DATA PDU we accept; senders cut large videos into PDUs of this size (pynetdicom's default
#: is 16 KiB, which costs per-PDU overhead on 100-MB videos).
MAX_PDU = 1 << 20

_REJECTION_STATUS = {
    "unreadable": status.CANNOT_UNDERSTAND,
    "missing_uid": status.CANNOT_UNDERSTAND,
    "bad_uid": status.CANNOT_UNDERSTAND,
    "inconsistent": status.CANNOT_UNDERSTAND,
    "mismatch": status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    "conflict": status.DUPLICATE_SOP_INSTANCE,
    # Beyond the decode limits (max_file_mb, max_frame_pixels, max_frames): the comment names the limit.
    "limit": status.CANNOT_UNDERSTAND,
}


@dataclass(frozen=True)
class StoreContext:
    """What the C-STORE handler needs, passed through the event binding (no globals)."""

    settings: Settings
    sessions: sessionmaker
    files: FileStore
    engine_version: str
    audit: AuditTrail | None = None


def build_ae(settings: Settings) -> AE:
    """The AE with FaceSym's presentation contexts, AE title, calling-AE allow-list and limits.

    Also switches pynetdicom (process-wide) to receiving C-STORE data sets into temporary files.
    """
    _config.STORE_RECV_CHUNKED_DATASET = True
    ae = AE(ae_title=settings.ae_title)
    ae.add_supported_context(VERIFICATION)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    if settings.allowed_calling_aes:
        ae.require_calling_aet = list(settings.allowed_calling_aes)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = MAX_PDU
    return ae


def start_scp(
    settings: Settings,
    sessions: sessionmaker,
    files: FileStore,
    engine_version: str,
    audit: AuditTrail | None = None,
) -> ThreadedAssociationServer:
    """Start the SCP in background threads on ``(settings.dicom_host, settings.dicom_port)``.

    Returns the running server; stop it with :func:`stop` (or ``server.shutdown()``).
    """
    files.clean_incoming()
    ae = build_ae(settings)
    ctx = StoreContext(settings, sessions, files, engine_version, audit)
    handlers: list[Any] = [
        (evt.EVT_C_STORE, handle_store, [ctx]),
        (evt.EVT_ACCEPTED, _log_accepted),
        (evt.EVT_REJECTED, _log_rejected, [ctx]),
        (evt.EVT_ABORTED, _log_aborted),
        (evt.EVT_CONN_CLOSE, _audit_closed, [ctx]),
    ]
    server = ae.start_server((settings.dicom_host, settings.dicom_port), block=False, evt_handlers=handlers)
    assert server is not None  # block=False always returns the server
    log.info(
        "storage SCP %s listening on %s:%d (max %d associations, calling AEs: %s)",
        settings.ae_title,
        settings.dicom_host,
        settings.dicom_port,
        settings.max_associations,
        ",".join(settings.allowed_calling_aes) or "any",
    )
    return server


def stop(server: ThreadedAssociationServer) -> None:
    """Stop accepting associations and close the listening socket."""
    server.shutdown()
    log.info("storage SCP stopped")


def _status(code: int, comment: str) -> Dataset:
    rsp = Dataset()
    rsp.Status = code
    rsp.ErrorComment = comment[:64]  # LO
    return rsp


def _peer(event: Event) -> str:
    req = event.assoc.requestor
    return f"{req.ae_title}@{req.address}:{req.port}"


def handle_store(event: Event, ctx: StoreContext) -> int | Dataset:
    """EVT_C_STORE: store the object durably, then answer (PS3.4 B.2.3 status codes).

    Success (also for an identical duplicate) only once the file and its rows are durable;
    Out of Resources below the free-disk reserve or when the disk/database fails (the sender should
    retry); Cannot Understand / Data Set does not match SOP Class / Duplicate SOP Instance for objects
    that will fail again unchanged.
    """
    calling_ae = event.assoc.requestor.ae_title
    req = cast(C_STORE, event.request)
    sop_uid = str(req.AffectedSOPInstanceUID or "")
    free = ctx.files.free_mb()
    if free < ctx.settings.min_free_disk_mb:
        log.warning(
            "disk reserve reached: %.0f MB free, reserve %d MB; refused SOP Instance %s from %s",
            free,
            ctx.settings.min_free_disk_mb,
            sop_uid,
            _peer(event),
        )
        _audit_stored(ctx, event, "", False)
        return _status(status.OUT_OF_RESOURCES, "disk reserve reached")
    try:
        try:
            source: Path | None = event.dataset_path
        except AttributeError:
            source = None
        if source is None:  # chunked receiving switched off by someone: write the data set ourselves
            source = ctx.files.new_incoming()
            source.write_bytes(event.encoded_dataset(include_meta=True))
        result = ingest(
            ctx.sessions,
            ctx.files,
            source,
            calling_ae,
            ctx.settings.duplicate_policy,
            ctx.engine_version,
            expected_sop_class=str(req.AffectedSOPClassUID or "") or None,
            expected_sop_instance=sop_uid or None,
            limits=ctx.settings.decode_limits,
        )
    except (OSError, SQLAlchemyError) as exc:
        log.error("could not store SOP Instance %s from %s: %s", sop_uid, _peer(event), type(exc).__name__)
        log.debug("storage failure", exc_info=True)
        _audit_stored(ctx, event, "", False)
        return _status(status.OUT_OF_RESOURCES, f"storage unavailable ({type(exc).__name__})")
    except Exception:
        log.exception("unexpected failure storing SOP Instance %s from %s", sop_uid, _peer(event))
        _audit_stored(ctx, event, "", False)
        return _status(status.PROCESSING_FAILURE, "processing failure")
    _audit_stored(ctx, event, result.study_uid, result.outcome != "rejected")
    return _answer(result)


def _audit_stored(ctx: StoreContext, event: Event, study_uid: str, ok: bool) -> None:
    """One 110104 per study and association is written when the association closes (PS3.15 A.5.3.2)."""
    if ctx.audit is not None:
        req = cast(C_STORE, event.request)
        ctx.audit.transfers.stored(event.assoc, study_uid, str(req.AffectedSOPClassUID or ""), ok=ok)


def _audit_closed(event: Event, ctx: StoreContext) -> None:
    if ctx.audit is not None:
        ctx.audit.transfers.closed(event.assoc)


def _answer(result: IngestResult) -> int | Dataset:
    if result.outcome != "rejected":
        return status.SUCCESS
    return _status(_REJECTION_STATUS.get(result.rejection, status.CANNOT_UNDERSTAND), result.reason)


def _log_accepted(event: Event) -> None:
    log.info("association accepted from %s (called AE %s)", _peer(event), event.assoc.acceptor.ae_title)


def _log_rejected(event: Event, ctx: StoreContext) -> None:
    # Audit-worthy: a peer not in the calling-AE allow-list, too many associations, no usable context.
    log.warning("association rejected from %s", _peer(event))
    if ctx.audit is not None:
        req = event.assoc.requestor
        ctx.audit.record(security_alert("association_rejected", req.ae_title, req.address,
                                        local_ae=ctx.settings.ae_title))


def _log_aborted(event: Event) -> None:
    log.warning("association aborted with %s", _peer(event))
