"""C-STORE SCU: send report objects to a destination AE (delivery)."""

from __future__ import annotations

import logging
import ssl
import time
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
    try:
        for ds in datasets:
            reactor_resumed(assoc)
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


def reactor_resumed(assoc: Any, limit: float = 1.0) -> None:
    """Wait until the association's reactor thread runs again after the previous send_*().

    pynetdicom 3.0 pauses the reactor for each send_*() and resumes it afterwards; until the resumed thread
    has cleared its ``_is_paused`` flag, the next send_*() takes the stale flag for a pause and the reactor
    can take that request's response off the queue ("Received unexpected C-STORE service message"): the
    C-STORE then waits for the DIMSE timeout, the delivery fails and its retry sends the study's objects
    again. Seen under CPU load (analysis threads in the same process); found by tests/reliability.
    """
    deadline = time.monotonic() + limit
    while getattr(assoc, "_is_paused", False) and assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.0005)
