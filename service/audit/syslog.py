"""Forward the audit trail to an audit record repository: RFC 5424 syslog over TLS (RFC 5425).

Each record becomes one message ``<85>1 TIME HOST facesym PID DICOM+RFC3881 [SD] BOM<AuditMessage…>``
(facility 10 authpriv, severity 5 notice; MSG = the XML in UTF-8 with its BOM), framed by octet counting
(``LEN SP MSG``, RFC 5425 4.3). The structured data element ``[facesym-audit@32473 seq="N" hwm="H"
hash="…"]`` (RFC 5424 6.3; 32473 is RFC 5612's documentation enterprise number until FaceSym has its
own) carries the record's number and chain hash and the high-water mark: the highest record number the
audit anchor (``service/audit/anchor.py``) had seen. A repository thus holds, outside FaceSym's host,
evidence of how long the trail was: a trail later cut below a forwarded ``hwm`` was truncated.

:class:`SyslogForwarder` is a background thread: it sends records with ``forwarded == False`` in ``seq``
order and marks them forwarded once the connection is still open ``confirm_seconds`` after writing them
(syslog has no acknowledgement; a repository that drops the connection before then gets the records
again). A repository that is down costs reconnect attempts with exponential backoff and nothing else:
:meth:`AuditTrail.append` never waits for it, and what was written meanwhile goes out, in order, once the
repository is back (at least once). Logs name the repository and error classes only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import ssl
import threading
import time
from typing import Any

from service.audit.trail import AuditTrail, PendingRecord

log = logging.getLogger(__name__)

BOM = b"\xef\xbb\xbf"
FACILITY_AUTHPRIV = 10
SEVERITY_NOTICE = 5
NILVALUE = "-"


def _field(value: str, limit: int) -> str:
    """A header field: printable US-ASCII without spaces, at most ``limit`` characters, else ``-``."""
    cleaned = "".join(ch for ch in value if 33 <= ord(ch) <= 126)[:limit]
    return cleaned or NILVALUE


def format_message(
    rec: PendingRecord,
    *,
    hostname: str,
    app_name: str = "facesym",
    procid: str = "",
    msgid: str = "DICOM+RFC3881",
    bom: bool = True,
) -> bytes:
    """One RFC 5424 message for an audit record (no framing)."""
    pri = FACILITY_AUTHPRIV * 8 + SEVERITY_NOTICE
    header = (
        f"<{pri}>1 {_field(rec.time, 64)} {_field(hostname, 255)} {_field(app_name, 48)} "
        f"{_field(procid, 128)} {_field(msgid, 32)} {structured_data(rec)} "
    )
    return header.encode("ascii") + (BOM if bom else b"") + rec.xml.encode("utf-8")


#: SD-ID of FaceSym's element (RFC 5424 6.3.2: name@private-enterprise-number).
SD_ID = "facesym-audit@32473"


def structured_data(rec: PendingRecord) -> str:
    """``[facesym-audit@32473 seq="N" hwm="H" hash="…"]`` (values are digits and hex: nothing to escape)."""
    digest = "".join(ch for ch in rec.hash if ch in "0123456789abcdef")[:128]
    return f'[{SD_ID} seq="{int(rec.seq)}" hwm="{max(int(rec.high_water), int(rec.seq))}" hash="{digest}"]'


def frame(message: bytes) -> bytes:
    """RFC 5425 octet-counting framing: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode("ascii") + b" " + message


def tls_context(
    cafile: str | None = None, certfile: str | None = None, keyfile: str | None = None,
    *, check_hostname: bool = True,
) -> ssl.SSLContext:
    """Client context: the repository's certificate must chain to ``cafile`` (system CAs when None);
    ``certfile``/``keyfile`` add a client certificate (mutual TLS, as RFC 5425 recommends)."""
    ctx = ssl.create_default_context(cafile=cafile or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if certfile:
        ctx.load_cert_chain(certfile, keyfile or None)
    if not check_hostname:
        ctx.check_hostname = False
    return ctx


class SyslogForwarder:
    """Background sender of the trail's unforwarded records to ``host:port`` over TLS."""

    def __init__(
        self,
        trail: AuditTrail,
        host: str,
        port: int = 6514,
        cafile: str | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        *,
        server_hostname: str | None = None,
        check_hostname: bool = True,
        hostname: str | None = None,
        app_name: str = "facesym",
        msgid: str = "DICOM+RFC3881",
        batch_size: int = 100,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        poll_seconds: float = 5.0,
        confirm_seconds: float = 0.5,
        timeout: float = 10.0,
    ) -> None:
        self.trail = trail
        self.host, self.port = host, int(port)
        self.server_hostname = server_hostname or host
        self.context = tls_context(cafile, certfile, keyfile, check_hostname=check_hostname)
        self.hostname = hostname or socket.gethostname()
        self.app_name, self.msgid = app_name, msgid
        self.batch_size = batch_size
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.poll_seconds, self.confirm_seconds, self.timeout = poll_seconds, confirm_seconds, timeout
        self.sent = 0  # messages written (including resends)
        self.forwarded = 0  # records marked forwarded
        self.connects = 0
        self.last_error = ""
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._drain_until = 0.0
        self._thread: threading.Thread | None = None
        self._sock: ssl.SSLSocket | None = None
        self._down_logged = False

    # --- control -------------------------------------------------------------------------------------------

    def start(self) -> SyslogForwarder:
        if self._thread is None:
            self.trail.subscribe(self._on_append)
            self._thread = threading.Thread(target=self._run, name="facesym-audit-syslog", daemon=True)
            self._thread.start()
            log.info("audit: forwarding to syslog repository %s:%d (TLS)", self.host, self.port)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread, first trying for up to ``timeout`` s to send what is pending (only while the
        repository is reachable). Unsent records stay unforwarded for the next start."""
        self._drain_until = time.monotonic() + max(0.0, timeout)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout + self.timeout + 1.0)
            self._thread = None
        self.trail.unsubscribe(self._on_append)

    def wake(self) -> None:
        self._wake.set()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every record is forwarded (True) or ``timeout`` passes (False). For tests/shutdown."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.trail.pending(limit=1):
                return True
            self._wake.set()
            time.sleep(0.05)
        return not self.trail.pending(limit=1)

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def _on_append(self, _seq: int) -> None:
        self._wake.set()

    # --- the thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = self.backoff_initial
        unconfirmed: list[int] = []
        last_write = 0.0
        while True:
            stopping = self._stop.is_set()
            if stopping and time.monotonic() >= self._drain_until:
                break
            try:
                if self._sock is None:
                    self._sock = self._connect()
                sock = self._sock
                if not _alive(sock, self.timeout):
                    raise ConnectionResetError("connection closed by the repository")
                if unconfirmed and (time.monotonic() - last_write >= self.confirm_seconds or stopping):
                    self.trail.mark_forwarded(unconfirmed)
                    self.forwarded += len(unconfirmed)
                    unconfirmed = []
                after = unconfirmed[-1] if unconfirmed else 0
                batch = self.trail.pending(self.batch_size, after_seq=after)
                if batch:
                    payload = b"".join(frame(self._message(r)) for r in batch)
                    sock.sendall(payload)
                    self.sent += len(batch)
                    unconfirmed.extend(r.seq for r in batch)
                    last_write = time.monotonic()
                    backoff = self.backoff_initial
                    continue
                if stopping and not unconfirmed:
                    break
                backoff = self.backoff_initial
                wait = self.confirm_seconds if unconfirmed else self.poll_seconds
                if stopping:
                    wait = min(wait, max(0.0, self._drain_until - time.monotonic()))
                self._wake.wait(wait)
                self._wake.clear()
            except (OSError, ssl.SSLError, ValueError) as exc:
                self._close()
                unconfirmed = []  # not known to have arrived: sent again after reconnecting
                self.last_error = type(exc).__name__
                if not self._down_logged:
                    log.warning("audit: syslog repository %s:%d unavailable (%s); records are kept and sent "
                                "when it is back", self.host, self.port, self.last_error)
                    self._down_logged = True
                if self._stop.is_set():
                    break
                self._stop.wait(backoff)
                backoff = min(self.backoff_max, backoff * 2)
            except Exception:  # noqa: BLE001 - e.g. the database is busy: try again later, never die
                log.exception("audit: forwarding failed")
                self._close()
                unconfirmed = []
                if self._stop.wait(backoff):
                    break
                backoff = min(self.backoff_max, backoff * 2)
        self._close(graceful=True)

    def _connect(self) -> ssl.SSLSocket:
        raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            sock = self.context.wrap_socket(raw, server_hostname=self.server_hostname)
        except BaseException:
            raw.close()
            raise
        sock.settimeout(self.timeout)
        self.connects += 1
        if self._down_logged or self.connects == 1:
            log.info("audit: connected to syslog repository %s:%d (%s)", self.host, self.port, sock.version())
        self._down_logged = False
        return sock

    def _close(self, graceful: bool = False) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if graceful:  # send TLS close_notify without waiting for the peer's
            with contextlib.suppress(OSError, ValueError):
                sock.settimeout(0.0)
                sock.unwrap()
        with contextlib.suppress(OSError):
            sock.close()

    def _message(self, rec: PendingRecord) -> bytes:
        return format_message(
            rec, hostname=self.hostname, app_name=self.app_name, procid=str(os.getpid()), msgid=self.msgid
        )


def _alive(sock: ssl.SSLSocket, io_timeout: float) -> bool:
    """False when the repository closed the connection (a syslog receiver never sends application data,
    so readable means EOF, a reset or TLS housekeeping such as TLS 1.3 session tickets)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    if not readable and not sock.pending():
        return True
    sock.settimeout(0.0)
    try:
        return bool(sock.recv(4096))
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
        return True  # only TLS records without data (e.g. NewSessionTicket)
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(io_timeout)


def forwarder_from_settings(trail: AuditTrail, settings: Any) -> SyslogForwarder | None:
    """A started forwarder when ``settings.audit_syslog_host`` is set, else None."""
    host = str(getattr(settings, "audit_syslog_host", "") or "")
    if not host:
        return None
    return SyslogForwarder(
        trail,
        host,
        int(getattr(settings, "audit_syslog_port", 6514) or 6514),
        cafile=str(getattr(settings, "audit_syslog_ca_file", "") or "") or None,
        certfile=str(getattr(settings, "audit_syslog_client_cert", "") or "") or None,
        keyfile=str(getattr(settings, "audit_syslog_client_key", "") or "") or None,
    ).start()
