"""Deliver a FHIR transaction Bundle: POST it to a FHIR server, or write it to a drop folder.

Standard library only (urllib, ssl). Every Bundle is validated with fhir.resources' R4B models first;
an invalid one raises FhirValidationError and is never sent or written. Retries and backoff belong to the
caller (service/jobs/worker.py): :class:`FhirDeliveryError` says whether a retry can help.

Logs name the URL and the HTTP status only: never the token, never the Bundle (it holds the patient ID).
"""

from __future__ import annotations

import json
import logging
import os
import re
import ssl
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from service.errors import FaceSymError
from service.report.fhir import FhirValidationError, bundle_identifier, validate_bundle

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
_MAX_ERROR_BODY = 64 * 1024

__all__ = ["FhirDeliveryError", "FhirValidationError", "post_bundle", "write_bundle"]


class FhirDeliveryError(FaceSymError, RuntimeError):
    """The FHIR server could not be reached or did not accept the Bundle.

    ``status`` is the HTTP status (None when no response came back); ``outcome`` the text of the
    OperationOutcome (or the start of the body) the server answered with; ``retry_after`` the seconds of a
    numeric Retry-After header, if any.
    """

    def __init__(
        self, message: str, *, status: int | None = None, outcome: str = "", retry_after: float | None = None
    ):
        super().__init__(message)
        self.status = status
        self.outcome = outcome
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """True when a later attempt may succeed: no response, 408, 425, 429 or any 5xx."""
        return self.status is None or self.status in (408, 425, 429) or self.status >= 500


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: urllib would turn the POST into a GET and could carry the token elsewhere."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _outcome_text(body: bytes, content_type: str) -> str:
    """The diagnostics of an OperationOutcome, else the start of the body as text."""
    text = body[:_MAX_ERROR_BODY].decode("utf-8", "replace")
    if "json" in content_type or text.lstrip().startswith("{"):
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and doc.get("resourceType") == "OperationOutcome":
            parts = []
            for issue in doc.get("issue", []):
                detail = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or ""
                parts.append(f"{issue.get('severity', '?')} {issue.get('code', '?')}: {detail}".strip())
            return "; ".join(parts) or "OperationOutcome without issues"
    return re.sub(r"\s+", " ", text).strip()[:500]


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: the caller's backoff decides


def _ssl_context(ca_file: str | None, client_cert: tuple[str, str] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_cert:
        cert, key = client_cert
        context.load_cert_chain(certfile=cert, keyfile=key or None)
    return context


def post_bundle(
    bundle: Mapping[str, Any],
    *,
    base_url: str,
    token: str | None = None,
    client_cert: tuple[str, str] | None = None,
    ca_file: str | None = None,
    timeout: float = 30,
) -> None:
    """POST a transaction Bundle to the FHIR server's base URL (FHIR R4 RESTful API, "transaction").

    Parameters
    ----------
    bundle
        A Bundle as built by service.report.fhir.build_bundle (validated again here).
    base_url
        The server's base (``https://ehr.example/fhir``); http or https.
    token
        Bearer token for the ``Authorization`` header (OAuth 2 / SMART backend services token).
    client_cert
        (certificate file, key file) for mutual TLS.
    ca_file
        CA bundle to verify the server's certificate with (default: the system's trust store).
    timeout
        Seconds for connecting and for each read.

    Raises
    ------
    FhirValidationError
        The Bundle is not valid FHIR R4: nothing was sent.
    FhirDeliveryError
        No 2xx answer: with ``status`` (None when unreachable), the OperationOutcome text and
        ``retryable``.
    """
    validate_bundle(bundle)
    parts = urlsplit(str(base_url).strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise FhirDeliveryError(f"base_url must be an http(s) URL, got scheme {parts.scheme!r}")
    where = parts.netloc.rsplit("@", 1)[-1]  # host[:port]: never a user:password in logs and errors
    if parts.scheme == "http" and (token or client_cert):
        log.warning("FHIR: sending credentials over plain http to %s", where)
    url = str(base_url).strip()
    body = json.dumps(bundle, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    headers = {"Content-Type": f"{FHIR_JSON}; charset=utf-8", "Accept": FHIR_JSON}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
    if parts.scheme == "https":
        handlers.append(urllib.request.HTTPSHandler(context=_ssl_context(ca_file, client_cert)))
    opener = urllib.request.build_opener(*handlers)
    ident = bundle_identifier(bundle)
    try:
        with opener.open(request, timeout=timeout) as response:
            status = int(response.status)
            response.read()  # drain the transaction-response Bundle
    except urllib.error.HTTPError as exc:
        with exc:
            error_body = exc.read(_MAX_ERROR_BODY) if exc.fp is not None else b""
        outcome = _outcome_text(error_body, exc.headers.get("Content-Type", "") if exc.headers else "")
        log.warning("FHIR: %s answered %d to bundle %s", where, exc.code, ident)
        raise FhirDeliveryError(
            f"FHIR server {where} answered {exc.code}: {outcome or exc.reason}",
            status=int(exc.code),
            outcome=outcome,
            retry_after=_retry_after(exc.headers.get("Retry-After") if exc.headers else None),
        ) from None
    except (urllib.error.URLError, OSError, ssl.SSLError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        log.warning("FHIR: %s unreachable for bundle %s: %s", where, ident, type(reason).__name__)
        raise FhirDeliveryError(f"FHIR server {where} unreachable: {reason}") from None
    if not 200 <= status < 300:  # 1xx/3xx that urllib handed back
        raise FhirDeliveryError(f"FHIR server {where} answered {status}", status=status)
    log.info("FHIR: bundle %s accepted by %s (%d)", ident, where, status)


def _file_name(bundle: Mapping[str, Any]) -> str:
    ident = bundle_identifier(bundle)
    if not ident:
        raise FhirValidationError("bundle.identifier.value is required to name the file")
    name = re.sub(r"^urn:(oid|uuid):", "", ident)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip("._") or "bundle"
    return f"{name[:200]}.json"


def write_bundle(bundle: Mapping[str, Any], drop_dir: str | Path) -> Path:
    """Write the Bundle (validated) to ``drop_dir/<identifier>.json`` atomically and durably.

    The file appears complete or not at all (temporary file, fsync, rename, directory fsync); a resend of
    the same result replaces the same file. Returns its path.
    """
    validate_bundle(bundle)
    folder = Path(drop_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / _file_name(bundle)
    data = json.dumps(bundle, ensure_ascii=False, allow_nan=False, indent=1).encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        os.fchmod(fd, 0o640)  # the integration engine's group may read; the file holds the patient ID
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    log.info("FHIR: bundle %s written to %s", bundle_identifier(bundle), path)
    return path
