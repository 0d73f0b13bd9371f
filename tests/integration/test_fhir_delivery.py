"""FHIR delivery against a loopback FHIR server: retries after a 503, resends update, auth and TLS.

The receiver is a small in-test FHIR "server" (http.server on 127.0.0.1, a free port, stopped by the test
or by its own watchdog) that processes transaction Bundles the way FHIR R4 says (3.1.0.11.2): conditional
update (PUT Type?identifier=...), conditional create (ifNoneExist), conditional references resolved
against what it holds, urn:uuid references rewritten, all or nothing. The retry loop here is the test's
own; the service's retries and backoff are the worker's.
"""

from __future__ import annotations

import copy
import json
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from service.domain import Analysis, Quality, Side, Task, TaskResult
from service.fhir_client import FhirDeliveryError, FhirValidationError, post_bundle
from service.report.fhir import StudyIdentity, build_bundle, parse_conditional_url
from service.report.sr import InstanceFinding, report_uids

PATIENT_SYSTEM = "urn:oid:1.2.826.0.1.3680043.10.1234"
PATIENT_ID = "PHANTOM-0042"
TOKEN = "s3cr3t-token"
ENGINE = "0.1.0"
VIDEO_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.4.1"
PHOTO_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.4"


# ------------------------------------------------------------------------------- the receiver
class TransactionFailed(Exception):
    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status, self.text = status, text


def _outcome(code: str, text: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    }


@dataclass
class FhirStore:
    """Resources by type and id; ``requests`` records every HTTP request (headers and body)."""

    fail_first: int = 0
    fail_status: int = 503
    resources: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    next_id: int = 1

    def seed(self, resource: dict[str, Any]) -> str:
        rid = str(self.next_id)
        self.next_id += 1
        self.resources.setdefault(resource["resourceType"], {})[rid] = {
            **resource,
            "id": rid,
            "meta": {"versionId": "1"},
        }
        return rid

    def count(self, rtype: str) -> int:
        return len(self.resources.get(rtype, {}))

    def all(self, rtype: str) -> list[dict[str, Any]]:
        return list(self.resources.get(rtype, {}).values())

    @staticmethod
    def _matches(
        store: dict[str, dict[str, dict[str, Any]]], rtype: str, system: str, value: str
    ) -> list[str]:
        return [
            rid
            for rid, res in store.get(rtype, {}).items()
            if any(i.get("system") == system and i.get("value") == value for i in res.get("identifier", []))
        ]

    def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
            raise TransactionFailed(400, "not a transaction Bundle")
        store = copy.deepcopy(self.resources)  # all or nothing
        next_id = self.next_id
        resolved: dict[str, str] = {}
        responses = []
        for entry in bundle.get("entry", []):
            res, req = copy.deepcopy(entry["resource"]), entry["request"]
            rtype = res["resourceType"]
            if req["method"] == "PUT" and "?" in req["url"]:
                _, system, value = parse_conditional_url(req["url"])
                found = self._matches(store, rtype, system, value)
            elif req["method"] == "POST" and req.get("ifNoneExist"):
                _, system, value = parse_conditional_url(f"{rtype}?{req['ifNoneExist']}")
                found = self._matches(store, rtype, system, value)
                if found:  # conditional create: the existing one stands
                    resolved[entry["fullUrl"]] = f"{rtype}/{found[0]}"
                    responses.append({"response": {"status": "200 OK"}})
                    continue
            else:
                raise TransactionFailed(400, f"unsupported request {req['method']} {req['url']}")
            if len(found) > 1:
                raise TransactionFailed(412, f"{req['url']} matches {len(found)} resources")
            if found:
                rid = found[0]
                version = int(store[rtype][rid]["meta"]["versionId"]) + 1
                status = "200 OK"
            else:
                rid, next_id, version, status = str(next_id), next_id + 1, 1, "201 Created"
            res["id"], res["meta"] = rid, {"versionId": str(version)}
            store.setdefault(rtype, {})[rid] = res
            resolved[entry["fullUrl"]] = f"{rtype}/{rid}"
            responses.append(
                {"response": {"status": status, "location": f"{rtype}/{rid}/_history/{version}"}}
            )

        def rewrite(node: Any) -> None:
            if isinstance(node, dict):
                ref = node.get("reference")
                if isinstance(ref, str):
                    if ref.startswith("urn:uuid:"):
                        if ref not in resolved:
                            raise TransactionFailed(400, f"unresolved reference {ref}")
                        node["reference"] = resolved[ref]
                    elif "?" in ref:  # conditional reference: exactly one match or the transaction fails
                        rtype, system, value = parse_conditional_url(ref)
                        found = self._matches(store, rtype, system, value)
                        if len(found) != 1:
                            raise TransactionFailed(
                                422, f"conditional reference {rtype} matches {len(found)}"
                            )
                        node["reference"] = f"{rtype}/{found[0]}"
                for v in node.values():
                    rewrite(v)
            elif isinstance(node, list):
                for v in node:
                    rewrite(v)

        for url in resolved.values():
            rtype, rid = url.split("/")
            rewrite(store[rtype][rid])
        self.resources, self.next_id = store, next_id
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": responses}


def _handler(store: FhirStore, redirect_to: str | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

        def _send(self, status: int, doc: dict[str, Any], extra: dict[str, str] | None = None) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            with store.lock:
                store.requests.append({"method": "GET", "path": self.path, "headers": dict(self.headers)})
            self._send(405, _outcome("not-supported", "GET is not expected"))

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with store.lock:
                store.requests.append(
                    {"method": "POST", "path": self.path, "headers": dict(self.headers), "body": body}
                )
                n = len(store.requests)
                if redirect_to is not None:
                    self._send(307, _outcome("informational", "moved"), {"Location": redirect_to})
                    return
                if self.path.rstrip("/") != "/fhir":
                    self._send(404, _outcome("not-found", f"no endpoint {self.path}"))
                    return
                if not self.headers.get("Content-Type", "").startswith("application/fhir+json"):
                    self._send(415, _outcome("not-supported", "use application/fhir+json"))
                    return
                if n <= store.fail_first:
                    self._send(
                        store.fail_status,
                        _outcome("transient", "database busy, try again"),
                        {"Retry-After": "0"},
                    )
                    return
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self._send(401, _outcome("login", "bearer token required"))
                    return
                try:
                    answer = store.transaction(json.loads(body))
                except TransactionFailed as exc:
                    self._send(exc.status, _outcome("processing", exc.text))
                    return
            self._send(200, answer)

    return Handler


@contextmanager
def fhir_server(
    store: FhirStore, *, tls: ssl.SSLContext | None = None, redirect_to: str | None = None
) -> Iterator[str]:
    """Serve ``store`` on 127.0.0.1 (a free port) until the block ends or 60 s pass; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(store, redirect_to))
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    watchdog = threading.Timer(60.0, server.shutdown)  # stops itself if a test hangs
    thread.start()
    watchdog.start()
    scheme = "https" if tls is not None else "http"
    try:
        yield f"{scheme}://127.0.0.1:{server.server_address[1]}/fhir"
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(5)


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib honours *_proxy variables: loopback must go straight to the receiver."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


SMILE = TaskResult(
    Task.SMILE,
    (0, 89),
    (0, 12),
    (40, 52),
    0.2512,
    0.0612,
    0.7563,
    1.0,
    24.37,
    0.3123,
    31.23,
    Side.RIGHT,
    "pixels",
)
BROW = TaskResult(
    Task.BROW_RAISE,
    (0, 89),
    (0, 12),
    (70, 75),
    0.0211,
    0.0209,
    0.0095,
    0.3667,
    99.65,
    0.93,
    97.43,
    None,
    "landmarks",
)


def _study(n: int) -> tuple[StudyIdentity, list[InstanceFinding]]:
    study_uid = f"1.2.826.0.1.3680043.10.1234.{n}"
    findings = [
        InstanceFinding(
            VIDEO_CLASS,
            f"{study_uid}.1.1",
            90,
            Analysis(Quality(True, (), (), 90, 90), (SMILE, BROW)),
        ),
        InstanceFinding(
            PHOTO_CLASS, f"{study_uid}.1.2", None, Analysis(Quality(False, ("no face",), (), 0, 1), ())
        ),
    ]
    return StudyIdentity(study_uid, PATIENT_ID, "", f"ACC{n}", "20240501", ""), findings


def _bundle(n: int) -> dict[str, Any]:
    study, findings = _study(n)
    return build_bundle(
        study,
        findings,
        sr_sop_instance_uid=report_uids([f.sop_instance_uid for f in findings], ENGINE)[1],
        engine_version=ENGINE,
        patient_identifier_system=PATIENT_SYSTEM,
        issued=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
    )


def _seeded(**kwargs: Any) -> FhirStore:
    """An EHR that knows the patient and the two studies (conditional references resolve)."""
    store = FhirStore(**kwargs)
    store.seed({"resourceType": "Patient", "identifier": [{"system": PATIENT_SYSTEM, "value": PATIENT_ID}]})
    for n in (1, 2):
        uid = _study(n)[0].study_instance_uid
        store.seed(
            {
                "resourceType": "ImagingStudy",
                "status": "available",
                "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
            }
        )
    return store


def _post_with_retries(bundle: dict[str, Any], base_url: str, attempts: int = 4, **kwargs: Any) -> list[int]:
    """The test's small retry loop; returns the statuses of the failed attempts."""
    failures: list[int] = []
    for _ in range(attempts):
        try:
            post_bundle(bundle, base_url=base_url, token=TOKEN, timeout=10, **kwargs)
            return failures
        except FhirDeliveryError as exc:
            assert exc.retryable, exc
            failures.append(exc.status or 0)
    raise AssertionError(f"not delivered after {attempts} attempts: {failures}")


# ---------------------------------------------------------------------------------------- tests
def test_first_post_503_then_exactly_one_result_set() -> None:
    store = _seeded(fail_first=1)
    bundle = _bundle(1)
    with fhir_server(store) as url:
        failures = _post_with_retries(bundle, url)
    assert failures == [503]
    posts = [r for r in store.requests if r["method"] == "POST"]
    assert len(posts) == 2 and json.loads(posts[0]["body"]) == json.loads(posts[1]["body"]) == bundle
    for post in posts:
        assert post["headers"]["Authorization"] == f"Bearer {TOKEN}"
        assert post["headers"]["Content-Type"].startswith("application/fhir+json")
        assert post["headers"]["Accept"] == "application/fhir+json"
    assert store.count("DiagnosticReport") == 1
    assert store.count("Observation") == 3  # smile, brow raise, the not-analysable photo
    assert store.count("Device") == 1

    (report,) = store.all("DiagnosticReport")
    obs_ids = {f"Observation/{o['id']}" for o in store.all("Observation")}
    assert {r["reference"] for r in report["result"]} == obs_ids
    patient_id = store.all("Patient")[0]["id"]
    assert report["subject"]["reference"] == f"Patient/{patient_id}"
    device_id = store.all("Device")[0]["id"]
    for obs in store.all("Observation"):
        assert obs["device"]["reference"] == f"Device/{device_id}"
        assert obs["subject"]["reference"] == f"Patient/{patient_id}"
        assert obs["derivedFrom"][0]["reference"].startswith("ImagingStudy/")
    assert store.count("Patient") == 1  # nothing invented or duplicated


def test_resend_updates_instead_of_duplicating() -> None:
    store = _seeded()
    bundle = _bundle(1)
    with fhir_server(store) as url:
        _post_with_retries(bundle, url)
        before = {t: store.count(t) for t in ("DiagnosticReport", "Observation", "Device")}
        _post_with_retries(bundle, url)
        _post_with_retries(_bundle(1), url)  # rebuilt from scratch: same identities
    assert (
        {t: store.count(t) for t in before}
        == before
        == {"DiagnosticReport": 1, "Observation": 3, "Device": 1}
    )
    assert store.all("DiagnosticReport")[0]["meta"]["versionId"] == "3"
    assert {o["meta"]["versionId"] for o in store.all("Observation")} == {"3"}
    assert store.all("Device")[0]["meta"]["versionId"] == "1"  # conditional create: left alone


def test_one_result_set_per_study() -> None:
    store = _seeded(fail_first=1)
    with fhir_server(store) as url:
        for n in (1, 2, 1, 2):
            _post_with_retries(_bundle(n), url)
    assert store.count("DiagnosticReport") == 2
    assert store.count("Observation") == 6
    assert store.count("Device") == 1  # the same engine version is one Device
    studies = {r["imagingStudy"][0]["identifier"]["value"] for r in store.all("DiagnosticReport")}
    assert studies == {f"urn:oid:{_study(n)[0].study_instance_uid}" for n in (1, 2)}


def test_invalid_bundle_is_never_sent() -> None:
    store = _seeded()
    bad = _bundle(1)
    del bad["entry"][-1]["resource"]["status"]  # DiagnosticReport.status is 1..1
    with fhir_server(store) as url:
        with pytest.raises(FhirValidationError, match="status"):
            post_bundle(bad, base_url=url, token=TOKEN)
        with pytest.raises(FhirValidationError):
            post_bundle({"resourceType": "Bundle"}, base_url=url, token=TOKEN)
    assert store.requests == []
    assert store.count("DiagnosticReport") == 0


def test_refusal_carries_the_operation_outcome_and_is_final() -> None:
    store = FhirStore()  # an EHR that does not know the patient: the conditional reference fails
    with fhir_server(store) as url:
        with pytest.raises(FhirDeliveryError) as info:
            post_bundle(_bundle(1), base_url=url, token=TOKEN)
        assert info.value.status == 422 and not info.value.retryable
        assert "conditional reference" in info.value.outcome and "matches 0" in str(info.value)
        with pytest.raises(FhirDeliveryError) as info:
            post_bundle(_bundle(1), base_url=url, token="wrong")
        assert info.value.status == 401 and "bearer token required" in info.value.outcome
        assert TOKEN not in str(info.value)
    assert store.count("DiagnosticReport") == 0 and store.count("Observation") == 0  # all or nothing


def test_503_is_retryable_with_retry_after() -> None:
    store = _seeded(fail_first=5)
    with fhir_server(store) as url, pytest.raises(FhirDeliveryError) as info:
        post_bundle(_bundle(1), base_url=url, token=TOKEN)
    assert info.value.status == 503 and info.value.retryable and info.value.retry_after == 0
    assert "database busy" in info.value.outcome


def test_unreachable_server_is_retryable() -> None:
    with fhir_server(FhirStore()) as url:
        pass  # closed: nobody listens on that port any more
    with pytest.raises(FhirDeliveryError) as info:
        post_bundle(_bundle(1), base_url=url, token=TOKEN, timeout=5)
    assert info.value.status is None and info.value.retryable


def test_redirect_is_not_followed() -> None:
    target = _seeded()
    with fhir_server(target) as elsewhere:
        store = FhirStore()
        with fhir_server(store, redirect_to=elsewhere) as url, pytest.raises(FhirDeliveryError) as info:
            post_bundle(_bundle(1), base_url=url, token=TOKEN)
    assert info.value.status == 307 and not info.value.retryable
    assert len(store.requests) == 1 and target.requests == []  # the token went nowhere else


def test_bad_base_url() -> None:
    with pytest.raises(FhirDeliveryError, match="base_url"):
        post_bundle(_bundle(1), base_url="ftp://ehr.example/fhir")


# ------------------------------------------------------------------------------------- TLS, mTLS
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-made CA, a server certificate for 127.0.0.1 and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Test CA",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)  # fmt: skip
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)  # fmt: skip
    return d


def _server_tls(pki: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    ctx.load_verify_locations(pki / "ca.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS
    return ctx


def test_mutual_tls(pki: Path) -> None:
    store = _seeded()
    with fhir_server(store, tls=_server_tls(pki)) as url:
        post_bundle(
            _bundle(1),
            base_url=url,
            token=TOKEN,
            ca_file=str(pki / "ca.pem"),
            client_cert=(str(pki / "client.pem"), str(pki / "client.key")),
            timeout=10,
        )
        with pytest.raises(FhirDeliveryError) as no_client_cert:
            post_bundle(_bundle(1), base_url=url, token=TOKEN, ca_file=str(pki / "ca.pem"), timeout=10)
        with pytest.raises(FhirDeliveryError) as untrusted:
            post_bundle(
                _bundle(1),
                base_url=url,
                token=TOKEN,
                client_cert=(str(pki / "client.pem"), str(pki / "client.key")),
                timeout=10,
            )
    assert no_client_cert.value.status is None
    assert untrusted.value.status is None and "CERTIFICATE_VERIFY_FAILED" in str(untrusted.value)
    assert store.count("DiagnosticReport") == 1 and store.count("Observation") == 3
