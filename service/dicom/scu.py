"""C-STORE SCU: send report objects to a destination AE (delivery)."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from pathlib import Path

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
