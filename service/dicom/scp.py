"""The storage SCP: a pynetdicom 3 AE that accepts C-ECHO and C-STORE of face videos and photographs.

Durable acknowledgement: pynetdicom sends the C-STORE response only when the handler returns, and the
handler returns Success only after :func:`service.store.ingest.ingest` has renamed the fsynced file into
place and committed its rows. Objects stream to a temporary file (``STORE_RECV_CHUNKED_DATASET``),
which pynetdicom deletes when the handler returns, so the handler hard-links it into the store's
``.incoming`` folder (a copy when pynetdicom's temp dir is on another filesystem).

No analysis happens here: the scheduler picks the study up after its quiet period.

DICOM TLS (``dicom_tls_port``): a second listening server beside (or, with ``dicom_port = 0``, instead of)
the plain one, same AE and handlers. The TLS handshake runs in the connection's own thread under a time
limit, so a slow or hostile client never stalls the accept loop; a refused handshake (no, an untrusted or
a self-signed client certificate when ``dicom_tls_ca_file`` is set) is logged and audited as a 110113
Security Alert before any DICOM is spoken.

Logs carry AE titles, addresses and UIDs only, never patient names, IDs or birth dates.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import ssl
import threading
from collections.abc import Callable
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
from pynetdicom.utils import make_target
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from service.audit import AuditTrail, security_alert
from service.config import Settings
from service.dicom import status
from service.errors import InvalidParameterError
from service.store.files import FileStore
from service.store.ingest import IngestResult, ingest
from service.tls import server_context

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

#: How long an association's pynetdicom reactor sleeps when it found nothing to do (pynetdicom: 1 ms). Every
#: open association polls at this rate; at 1 ms, 20 idle associations cost ~75 % of a CPU core, which a
#: 2-core host needs for storing. An arriving PDU or a response to send waits at most this long.
DUL_IDLE_SLEEP = 0.005

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


#: Seconds a client has to complete the TLS handshake.
TLS_HANDSHAKE_TIMEOUT = 30.0
#: Seconds a connection has to start its A-ASSOCIATE-RQ (PS3.8 9.1.5: the acceptor's ARTIM timer) before
#: it is closed. pynetdicom waits 30 s, and counts the wait against ``max_associations``: ten silent
#: sockets, re-opened as they close, used to refuse every modality.
PRE_ASSOCIATION_TIMEOUT = 5.0
#: Connections that have not yet sent a byte, in all and from one IP address: beyond them a new
#: connection is closed at once (it never reaches pynetdicom, so it never takes an association slot).
MAX_SILENT_CONNECTIONS, MAX_SILENT_PER_PEER = 64, 8
#: Association places one IP address may not take: with ``max_associations`` = 10 one peer holds at most
#: 8 at a time, so another modality always finds a place, whatever one sender (or attacker) does.
RESERVED_FOR_OTHER_PEERS = 2


def per_peer_limit(max_associations: int) -> int:
    """Associations one IP address may hold at once: all but :data:`RESERVED_FOR_OTHER_PEERS` (≥ 1)."""
    return max(1, max_associations - RESERVED_FOR_OTHER_PEERS)


class FaceSymServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the TLS handshake moved from the accept loop (where pynetdicom does
    it, blocking every other peer meanwhile) into the connection's thread, with a time limit; a failed
    handshake is reported to ``on_tls_refused(client address, error)``. Shutting the server down also
    shuts down its ``companions`` (the TLS server started beside the plain one)."""

    def __init__(
        self, *args: Any, on_tls_refused: Callable[[Any, OSError], None] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.on_tls_refused = on_tls_refused
        self.companions: list[ThreadedAssociationServer] = []
        self._silent: dict[str, int] = {}  # peer IP -> connections that have sent nothing yet
        self._silent_lock = threading.Lock()

    def _admit_silent(self, peer: str) -> bool:
        with self._silent_lock:
            full = sum(self._silent.values()) >= MAX_SILENT_CONNECTIONS
            if full or self._silent.get(peer, 0) >= MAX_SILENT_PER_PEER:
                return False
            self._silent[peer] = self._silent.get(peer, 0) + 1
            return True

    def _spoke(self, peer: str) -> None:
        with self._silent_lock:
            left = self._silent.get(peer, 1) - 1
            if left > 0:
                self._silent[peer] = left
            else:
                self._silent.pop(peer, None)

    def _first_bytes_arrive(self, request: Any, peer: str) -> bool:
        """Wait at most :data:`PRE_ASSOCIATION_TIMEOUT` for the peer's first bytes (or its close), holding
        one of the silent-connection places meanwhile. False: refused or silent, the connection is closed
        and pynetdicom never sees it."""
        if not self._admit_silent(peer):
            log.warning("connection from %s closed: too many connections that have not associated", peer)
            return False
        try:
            if isinstance(request, ssl.SSLSocket) and request.pending():
                return True
            ready, _, _ = select.select([request], [], [], PRE_ASSOCIATION_TIMEOUT)
            if not ready:
                log.info("connection from %s closed: no A-ASSOCIATE-RQ within %.0f s", peer,
                         PRE_ASSOCIATION_TIMEOUT)
            return bool(ready)
        except (OSError, ValueError):
            return False
        finally:
            self._spoke(peer)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        listener = cast(socket.socket, self.socket)
        client, address = listener.accept()
        if self.ssl_context is None:
            return client, address
        client.settimeout(TLS_HANDSHAKE_TIMEOUT)
        return self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False), address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
                request.settimeout(None)  # as pynetdicom has it for plain connections
            except OSError as exc:  # ssl.SSLError, a timeout or a reset: refused before any DICOM
                if self.on_tls_refused is not None:
                    self.on_tls_refused(client_address, exc)
                self.shutdown_request(request)
                return
        peer = str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)
        if not self._first_bytes_arrive(request, peer):
            self.shutdown_request(request)
            return
        limit = per_peer_limit(int(self.ae.maximum_associations))
        held = sum(1 for a in self.ae.active_associations  # a released one may still be winding down
                   if a.is_acceptor and a.requestor.address == peer and not (a.is_released or a.is_aborted))
        if held >= limit:
            log.warning("connection from %s closed: it holds %d associations already (at most %d an address)",
                        peer, held, limit)
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)

    def shutdown(self) -> None:
        for other in self.companions:
            other.shutdown()
        super().shutdown()


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
    """Start the SCP in background threads on ``(settings.dicom_host, settings.dicom_port)`` and/or, with
    TLS, on ``settings.dicom_tls_port`` (a port of 0 is off).

    Returns the running server (the plain one when both run; the TLS one is its companion and stops with
    it); stop it with :func:`stop` (or ``server.shutdown()``). Raises InvalidParameterError for a port
    that cannot be opened (in use: the message names the port and its setting) and for unusable TLS
    certificate, key or CA files, before anything listens.
    """
    tls = None
    if settings.dicom_tls_port:
        tls = server_context(settings.dicom_tls_cert, settings.dicom_tls_key, settings.dicom_tls_ca_file,
                             what="dicom_tls")
    files.clean_incoming()
    ae = build_ae(settings)
    ctx = StoreContext(settings, sessions, files, engine_version, audit)
    handlers: list[Any] = [
        (evt.EVT_C_STORE, handle_store, [ctx]),
        (evt.EVT_ACCEPTED, _log_accepted),
        (evt.EVT_REJECTED, _log_rejected, [ctx]),
        (evt.EVT_ABORTED, _log_aborted),
        (evt.EVT_CONN_CLOSE, _audit_closed, [ctx]),
        (evt.EVT_CONN_OPEN, _poll_less),
    ]
    servers: list[FaceSymServer] = []
    try:
        for port, context, name in ((settings.dicom_port, None, "dicom_port"),
                                    (settings.dicom_tls_port, tls, "dicom_tls_port")):
            if port:
                try:
                    servers.append(_serve(ae, (settings.dicom_host, port), handlers, context, ctx))
                except OSError as exc:  # in use, no permission (< 1024), an address not on this host
                    raise InvalidParameterError(
                        f"port {port} ({name}) on {settings.dicom_host} cannot be opened: {exc.strerror}"
                        + (" (another program, or another facesym serve, is listening there: stop it or "
                           f"choose another {name})" if exc.errno == errno.EADDRINUSE else "")
                    ) from None
    except BaseException:
        for server in servers:
            server.shutdown()
        raise
    main, servers[0].companions = servers[0], list(servers[1:])
    log.info(
        "storage SCP %s listening on %s (max %d associations, calling AEs: %s)",
        settings.ae_title,
        " and ".join(
            f"{settings.dicom_host}:{port} ({kind})"
            for port, kind in (
                (settings.dicom_port, "plain"),
                (settings.dicom_tls_port,
                 "TLS, client certificate required" if settings.dicom_tls_ca_file else "TLS"),
            )
            if port
        ),
        settings.max_associations,
        ",".join(settings.allowed_calling_aes) or "any",
    )
    return main


def _serve(
    ae: AE, address: tuple[str, int], handlers: list[Any], tls: ssl.SSLContext | None, ctx: StoreContext
) -> FaceSymServer:
    """What ``ae.start_server(block=False)`` does, with our server class."""
    server = cast(FaceSymServer, ae.make_server(
        address, ssl_context=tls, evt_handlers=handlers, server_class=FaceSymServer,
        on_tls_refused=lambda peer, exc: _tls_refused(ctx, address[1], peer, exc),
    ))
    thread = threading.Thread(target=make_target(server.serve_forever), name=f"facesym-scp-{address[1]}",
                              daemon=True)
    thread.start()
    ae._servers.append(server)  # as start_server does: server.shutdown() removes it again
    return server


def _tls_refused(ctx: StoreContext, port: int, peer: Any, exc: OSError) -> None:
    """A TLS handshake on the SCP's TLS port failed: log and audit it (110113, TLS failure)."""
    ip = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = f"client certificate not trusted ({exc.verify_message})"
    elif isinstance(exc, ssl.SSLError):
        why = str(exc.reason or type(exc).__name__)
        why = {"PEER_DID_NOT_RETURN_A_CERTIFICATE": "no client certificate",
               "WRONG_VERSION_NUMBER": "not TLS (plain DICOM or another protocol?)",
               "HTTP_REQUEST": "not TLS (an HTTP request)"}.get(why, why)
    else:
        why = f"{type(exc).__name__} during the handshake"
    log.warning("TLS handshake refused from %s on port %d: %s", ip, port, why)
    if ctx.audit is not None:
        ctx.audit.record(security_alert("tls_failure", "", ip, local_ae=ctx.settings.ae_title,
                                        description=f"DICOM TLS handshake refused: {why}"[:200]))


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
    kept = result.outcome != "rejected"
    row = (result.sop_instance_uid, result.version) if kept else None
    _audit_stored(ctx, event, result.study_uid, kept, row)
    return _answer(result)


def _audit_stored(
    ctx: StoreContext, event: Event, study_uid: str, ok: bool, instance: tuple[str, int] | None = None
) -> None:
    """One 110104 per study and association is written when the association closes (PS3.15 A.5.3.2);
    ``instance`` (SOP Instance UID, version) is the row stored or matched, flagged audited then."""
    if ctx.audit is not None:
        req = cast(C_STORE, event.request)
        ctx.audit.transfers.stored(
            event.assoc, study_uid, str(req.AffectedSOPClassUID or ""), ok=ok, instance=instance
        )


def _audit_closed(event: Event, ctx: StoreContext) -> None:
    if ctx.audit is not None:
        ctx.audit.transfers.closed(event.assoc)


def _answer(result: IngestResult) -> int | Dataset:
    if result.outcome != "rejected":
        return status.SUCCESS
    return _status(_REJECTION_STATUS.get(result.rejection, status.CANNOT_UNDERSTAND), result.reason)


def _poll_less(event: Event) -> None:
    """EVT_CONN_OPEN (before the association's threads start): a longer idle sleep for its DUL reactor."""
    dul = getattr(event.assoc, "dul", None)
    if dul is not None and hasattr(dul, "_run_loop_delay"):
        dul._run_loop_delay = DUL_IDLE_SLEEP


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
