"""TLS contexts for the storage SCP (DICOM TLS, PS3.15 B.1 / BCP 195), its deliveries and the web console.

Certificates and keys are only ever read from files (PEM). A key protected by a passphrase is refused with
a clear error instead of OpenSSL's interactive prompt (a service has no terminal): keep the key unencrypted
in a file only the service's user may read. Nothing here logs a key, a path's content or a certificate.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from service.errors import InvalidParameterError

#: BCP 195: TLS 1.2 or later (Python's defaults already refuse SSLv3, TLS 1.0 and 1.1 ciphers).
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


def _load_identity(ctx: ssl.SSLContext, what: str, cert: str, key: str) -> None:
    for name, path in (("certificate", cert), ("key", key)):
        if not Path(path).is_file():
            raise InvalidParameterError(f"{what}: {name} file {path} does not exist or is not a file")

    def refuse_passphrase() -> str:
        raise InvalidParameterError(
            f"{what}: the key file {key} is protected by a passphrase; give an unencrypted key in a file "
            "readable only by the service's user"
        )

    try:
        ctx.load_cert_chain(cert, key, password=refuse_passphrase)
    except ssl.SSLError as exc:
        raise InvalidParameterError(
            f"{what}: cannot use certificate {cert} with key {key} "
            f"({exc.reason or 'not PEM, or the key does not match'})"
        ) from None
    except OSError as exc:  # e.g. not readable by the service's user
        raise InvalidParameterError(f"{what}: cannot read {cert} or {key} ({exc.strerror})") from None


def _load_trust(ctx: ssl.SSLContext, what: str, ca_file: str) -> None:
    if not Path(ca_file).is_file():
        raise InvalidParameterError(f"{what}: CA file {ca_file} does not exist or is not a file")
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except (ssl.SSLError, OSError) as exc:
        why = getattr(exc, "reason", None) or exc.strerror or "no PEM certificates"
        raise InvalidParameterError(f"{what}: cannot read CA file {ca_file} ({why})") from None


def server_context(cert: str, key: str, ca_file: str = "", *, what: str = "TLS") -> ssl.SSLContext:
    """A server context with ``cert``/``key``; with ``ca_file`` clients must present a certificate that
    chains to it (mutual TLS), else the handshake fails.

    Raises InvalidParameterError (naming the file, never its content) for a missing, unreadable,
    encrypted or mismatched certificate/key or CA file.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MINIMUM_VERSION
    _load_identity(ctx, what, cert, key)
    if ca_file:
        _load_trust(ctx, what, ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(cert: str = "", key: str = "", ca_file: str = "", *, what: str = "TLS") -> ssl.SSLContext:
    """A client context that verifies the server (``ca_file``, else the system's trust store) and its host
    name, presenting ``cert``/``key`` when given (mutual TLS)."""
    if ca_file:  # only the configured CAs, not the system's too
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
        _load_trust(ctx, what, ca_file)
    else:
        ctx = ssl.create_default_context()
    ctx.minimum_version = MINIMUM_VERSION
    if cert:
        _load_identity(ctx, what, cert, key or cert)
    return ctx
