"""C-STORE SCU: send report objects to a destination AE (delivery)."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from service.config import Destination

log = logging.getLogger(__name__)


class DeliveryError(Exception):
    """The destination could not be reached or refused the object; the message says which."""


def send_files(
    destination: Destination,
    paths: Sequence[Path],
    calling_ae: str,
    timeout: float = 30.0,
    optional: Sequence[Path] = (),
    tls: ssl.SSLContext | None = None,
) -> None:
    """C-STORE every file in ``paths`` (then ``optional``) to ``destination`` in one association.

    A ``+tls`` destination needs ``tls``, a client context (:func:`service.tls.client_context`): the peer's
    certificate must chain to its CAs and name ``destination.host``.

    Raises DeliveryError unless every object got a success (0x0000) or warning (0xB000–0xBFFF) status.
    ``optional`` objects (key images, PDF) whose SOP class the peer refused at negotiation are skipped with
    a warning: a destination that takes only SR still gets the numbers.
    """
    if destination.tls and tls is None:
        raise DeliveryError(f"{destination}: a TLS destination needs a TLS context")
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    datasets = [dcmread(p) for p in paths]
    extras = [dcmread(p) for p in optional]
    # Propose each object's own transfer syntax plus the two every PACS accepts. Not pynetdicom's default
    # list: a peer that picks Deflated would get a file that some viewers and validators cannot read.
    for uid in sorted({str(ds.SOPClassUID) for ds in datasets + extras}):
        own = {str(ds.file_meta.TransferSyntaxUID) for ds in datasets + extras if ds.SOPClassUID == uid}
        ae.add_requested_context(uid, sorted(own | {ExplicitVRLittleEndian, ImplicitVRLittleEndian}))
    tls_args = (tls, destination.host) if destination.tls and tls is not None else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        raise DeliveryError(
            f"association with {destination} was not established (refused, aborted, unreachable"
            + (" or TLS handshake failed)" if tls_args else ")")
        )
    accepted = {c.abstract_syntax for c in assoc.accepted_contexts}
    for ds in extras:
        if ds.SOPClassUID not in accepted:
            log.warning("%s does not accept %s: %s not sent", destination, ds.SOPClassUID, ds.SOPInstanceUID)
    datasets += [ds for ds in extras if ds.SOPClassUID in accepted]
    sends_only(assoc)
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None:
                raise DeliveryError(f"{destination}: no C-STORE response for {ds.SOPInstanceUID}")
            if code != 0x0000 and not 0xB000 <= code <= 0xBFFF:
                raise DeliveryError(
                    f"{destination}: C-STORE of {ds.SOPInstanceUID} failed with status 0x{code:04X}"
                )
            log.info("delivered %s to %s (status 0x%04X)", ds.SOPInstanceUID, destination, code)
    finally:
        assoc.release()


def sends_only(assoc: Any) -> None:
    """Fit an established requestor association that only sends requests (C-STORE, C-ECHO) to pynetdicom 3.0.

    - The association's reactor thread polls the DIMSE queue without blocking, for requests from the peer;
      while ``send_*()`` pauses it, a stale pause flag lets it take the very response ``send_c_store`` is
      about to wait for ("Received unexpected C-STORE service message"): the send then waits for the DIMSE
      timeout, the delivery fails and its retry sends the study's objects again. Seen under CPU load
      (analysis threads in the same process; tests/reliability), cf. pydicom/pynetdicom#435. A peer never
      sends requests on an association that only sends, so the reactor's non-blocking polls are made to find
      nothing and every response goes to the blocking wait of the ``send_*()`` that asked for it.
    - TCP_NODELAY: pynetdicom leaves Nagle on, so each data set PDU waits ~40 ms for the ACK of the command
      PDU that the peer delays.

    Relies on pynetdicom's ``Association.dimse.get_msg(block)`` and ``dul.socket.socket`` (pinned 3.0.4):
    re-check on an upgrade (tests/unit/test_scu.py fails if they change).
    """
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):  # not a TCP socket (or closed already): only a little slower
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    dimse = assoc.dimse
    blocking_get = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        return blocking_get(block=True) if block else (None, None)

    dimse.get_msg = get_msg
