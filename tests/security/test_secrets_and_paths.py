"""`facesym serve` (a real subprocess, every secret configured) receives hostile objects over DICOM TLS:

* UIDs with ``../`` and ``/`` are refused with a failure status and nothing lands outside the store;
* ``../`` and ``/`` in the patient's name and ID, descriptions, protocol and comments are stored as they
  are, but no file anywhere is named after them (store, SR, key images, PDF, FHIR Bundle in the drop folder);
* the secrets (FHIR bearer token, web session key, DICOM/web/syslog TLS keys) reach where they are used
  (the FHIR server sees the token) but never the log (at DEBUG) nor the audit trail's configuration record,
  nor any byte of the database; patient names and IDs never reach the log.

One service run (module fixture) feeds all the checks; it takes ~20 s, most of it start-up and one analysis.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import free_port, stop_process
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from security_pki import Pki, shared_pki

from service.audit import AuditTrail
from service.config import Settings
from service.media.dicom_io import VL_PHOTOGRAPHIC, build_vl_photograph
from service.store.db import open_database
from service.tls import client_context

# pydicom on the sending side warns about the hostile UIDs it is made to send: that is the point.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")
ROOT = Path(__file__).resolve().parents[2]
MARK = "PWNED"  # in every hostile value: no file or folder may ever be named with it
PHI_NAME, PHI_ID = "Qzxname", "Qzxid"  # patient data: never in a log
COMPREHENSIVE_SR, ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.104.1"
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what every file and folder name FaceSym makes must look like
HOSTILE_UIDS = {  # attribute keyword → a value that would walk out of the store if it named a path
    "sop_uid": [f"1.2.3/../../../{MARK}", f"../../../../tmp/{MARK}1", f"/tmp/{MARK}2"],
    "series_uid": [f"1.2/../../{MARK}3", f"/tmp/{MARK}4", f"1.2.3\\..\\{MARK}5"],
    "study_uid": [f"../../{MARK}6", f"/var/tmp/{MARK}7", f"1.2.3/./{MARK}8"],
}


@dataclass
class Ehr:
    """A loopback FHIR endpoint that accepts every transaction and keeps the Authorization headers."""

    auth: list[str] = field(default_factory=list)

    def serve(self) -> tuple[ThreadingHTTPServer, str]:
        ehr = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                ehr.auth.append(self.headers.get("Authorization", ""))
                body = json.dumps({"resourceType": "Bundle", "type": "transaction-response", "entry": []})
                self.send_response(200)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *_args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, f"http://127.0.0.1:{server.server_address[1]}/fhir"


@dataclass
class Run:
    root: Path
    data_dir: Path
    drop_dir: Path
    secrets: dict[str, str]
    refused: dict[str, int]  # hostile UID → C-STORE status
    hostile_sop_uid: str
    ehr: Ehr
    sr_received: int
    log: str = ""
    audit_xml: str = ""
    audit_jsonl: str = ""
    database: bytes = b""


def _pem_body(path: Path) -> list[str]:
    """Lines of a PEM key's base64 body: any of them in a log would leak the key."""
    return [line for line in path.read_text().splitlines() if line and not line.startswith("-----")][:3]


def _wait(predicate: Any, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; log tail:\n{log.read_text()[-3000:]}")


def _store(port: int, tls: Any, ds: Any) -> int:
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(VL_PHOTOGRAPHIC, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="FACESYM", tls_args=(tls, "127.0.0.1"))
    assert assoc.is_established, "FaceSym refused a trusted TLS client"
    try:
        rsp = assoc.send_c_store(ds)
        return int(rsp.Status) if "Status" in rsp else -1
    finally:
        assoc.release()


def _photo(face: bool = False, **kw: Any) -> Any:
    """A VL Photographic object: the demo face (≤ 480 px) or, for objects that must be refused, 8x8 grey."""
    rgb = np.full((8, 8, 3), 128, np.uint8)
    if face:
        import cv2

        bgr = cv2.imread(str(ROOT / "service/phantom/data/demo_face.jpg"))
        scale = 480 / max(bgr.shape[:2])
        if scale < 1:
            bgr = cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    return build_vl_photograph(rgb, **kw)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    from service.demo import Receiver

    pki: Pki = shared_pki(tmp_path_factory)
    root = tmp_path_factory.mktemp("served")
    data_dir, drop_dir, cwd = root / "var", root / "drop", root / "cwd"
    cwd.mkdir()
    web_secret = secrets.token_hex(32)
    (root / "web.key").write_text(web_secret + "\n")
    os.chmod(root / "web.key", 0o600)
    token = "fsy-test-token-" + secrets.token_urlsafe(24)
    ehr = Ehr()
    fhir, fhir_url = ehr.serve()
    receiver = Receiver(0)
    dicom_tls, web_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACESYM_") and "proxy" not in k.lower()}
    env.update({
        "FACESYM_DATA_DIR": str(data_dir), "FACESYM_DICOM_PORT": "0",
        "FACESYM_DICOM_TLS_PORT": str(dicom_tls),
        "FACESYM_DICOM_TLS_CERT": str(pki.server.cert), "FACESYM_DICOM_TLS_KEY": str(pki.server.key),
        "FACESYM_DICOM_TLS_CA_FILE": str(pki.ca),
        "FACESYM_WEB_PORT": str(web_port), "FACESYM_WEB_TLS_CERT": str(pki.server.cert),
        "FACESYM_WEB_TLS_KEY": str(pki.server.key), "FACESYM_WEB_SECRET_KEY_FILE": str(root / "web.key"),
        "FACESYM_FHIR_BASE_URL": fhir_url, "FACESYM_FHIR_TOKEN": token,
        "FACESYM_FHIR_DROP_DIR": str(drop_dir),
        "FACESYM_FHIR_PATIENT_IDENTIFIER_SYSTEM": "urn:oid:1.2.826.0.1.3680043.10.999",
        "FACESYM_AUDIT_SYSLOG_HOST": "127.0.0.1", "FACESYM_AUDIT_SYSLOG_PORT": str(free_port()),
        "FACESYM_AUDIT_SYSLOG_CA_FILE": str(pki.ca), "FACESYM_AUDIT_SYSLOG_CLIENT_CERT": str(pki.client.cert),
        "FACESYM_AUDIT_SYSLOG_CLIENT_KEY": str(pki.client.key),
        "FACESYM_DESTINATIONS": f"FACESYM_DEMO@127.0.0.1:{receiver.port}",
        "FACESYM_QUIET_SECONDS": "1", "FACESYM_POLL_SECONDS": "0.2", "FACESYM_RETRY_BASE_SECONDS": "0.5",
        "FACESYM_MIN_FREE_DISK_MB": "1", "FACESYM_LOG_LEVEL": "DEBUG", "FACESYM_WORKERS": "1",
        "PYTHONPATH": str(ROOT),
    })
    log = root / "serve.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], cwd=cwd, env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    tls = client_context(str(pki.client.cert), str(pki.client.key), str(pki.ca))
    refused: dict[str, int] = {}
    study_uid = generate_uid()
    try:
        _wait(lambda: "storage SCP" in log.read_text() or proc.poll() is not None, 90, "the SCP", log)
        assert proc.poll() is None, log.read_text()[-3000:]
        for keyword, values in HOSTILE_UIDS.items():
            for value in values:
                refused[value] = _store(dicom_tls, tls, _photo(**{keyword: value}))
        hostile = _photo(
            True, patient_name=f"../../{MARK}^{PHI_NAME}/etc", patient_id=f"../{MARK}/{PHI_ID}",
            study_uid=study_uid,
            series_description=f"rest ../../{MARK}/series", study_description=f"/tmp/{MARK}/study",
            protocol_name=f"..\\..\\{MARK}", image_comments=f"../{MARK}.dcm",
        )
        hostile.AccessionNumber = f"../{MARK}"
        hostile.InstitutionName = f"/{MARK}/institution"
        assert _store(dicom_tls, tls, hostile) == 0x0000
        _wait(lambda: receiver.wait_for(study_uid, 0.1) is not None and ehr.auth
              and any(drop_dir.glob("*.json")), 150, "SR, FHIR POST and Bundle file", log)
        sr_received = len(receiver.reports)
    finally:
        stop_process(proc)
        receiver.stop()
        fhir.shutdown()
    out = Run(root, data_dir, drop_dir, {
        "FHIR token": token, "web session key": web_secret,
        **{f"DICOM/web TLS key line {i}": line for i, line in enumerate(_pem_body(pki.server.key))},
        **{f"syslog TLS key line {i}": line for i, line in enumerate(_pem_body(pki.client.key))},
    }, refused, str(hostile.SOPInstanceUID), ehr, sr_received)
    out.log = log.read_text(errors="replace")
    export = [sys.executable, "-m", "service.cli", "audit", "export", "--format"]
    out.audit_xml = subprocess.run([*export, "xml"], cwd=cwd, env=env, capture_output=True, text=True,
                                   timeout=60, check=True).stdout
    out.audit_jsonl = subprocess.run([*export, "jsonl"], cwd=cwd, env=env, capture_output=True, text=True,
                                     timeout=60, check=True).stdout
    out.database = b"".join(p.read_bytes() for p in data_dir.glob("facesym.db*"))
    yield out


def _all_paths(top: Path) -> list[Path]:
    return list(top.rglob("*"))


def test_unsafe_uids_are_refused_and_nothing_leaves_the_store(run: Run, figures) -> None:
    assert len(run.refused) == sum(len(v) for v in HOSTILE_UIDS.values())
    for value, status in run.refused.items():
        assert status == 0xC000, f"{value!r}: status 0x{status:04X}, expected 0xC000 (cannot understand)"
    named = [p for top in (run.root, Path("/tmp"), Path("/var/tmp"), ROOT) for p in
             (top.rglob(f"*{MARK}*") if top == run.root else top.glob(f"*{MARK}*"))]
    assert named == [], named
    stored = [p for p in (run.data_dir / "files").rglob("*.dcm") if ".incoming" not in p.parts]
    assert all(MARK not in str(p) for p in stored)
    figures.record("security", "C-STORE with ../ or / in UIDs: refused (0xC000)",
                   f"{sum(s == 0xC000 for s in run.refused.values())}/{len(run.refused)}")


def test_hostile_text_is_stored_but_names_no_file(run: Run, figures) -> None:
    import pydicom

    assert run.sr_received >= 1 and len(list(run.drop_dir.glob("*.json"))) == 1
    (stored,) = [p for p in (run.data_dir / "files").rglob(f"{run.hostile_sop_uid}.dcm")]
    ds = pydicom.dcmread(stored, stop_before_pixels=True)
    assert MARK in str(ds.PatientName) and MARK in str(ds.SeriesDescription)  # kept as sent
    made = _all_paths(run.data_dir) + _all_paths(run.drop_dir) + _all_paths(run.root / "cwd")
    reports = [p for p in made if "reports" in p.parts and p.suffix == ".dcm"]
    classes = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in reports}
    assert {COMPREHENSIVE_SR, ENCAPSULATED_PDF} <= classes, classes  # the SR and the PDF report were made
    bad = [str(p) for p in made if not SAFE_NAME.match(p.name) or MARK in str(p)]
    assert bad == [], bad
    figures.record("security", "files FaceSym made for a hostile study (all safely named)", len(made))


def test_secrets_are_used_but_never_logged_or_audited(run: Run, figures) -> None:
    assert run.ehr.auth and all(a == f"Bearer {run.secrets['FHIR token']}" for a in run.ehr.auth)
    assert "DEBUG" in run.log and "storage SCP" in run.log  # the log really is the verbose one
    details: list[str] = []
    for d in ET.fromstring(run.audit_xml).iter("ParticipantObjectDetail"):
        details.append(base64.b64decode(d.get("value", "")).decode("utf-8", "replace"))
    assert "fhir_token" in run.audit_xml and "dicom_tls_key" in run.audit_xml  # the settings are recorded
    places = {"log": run.log, "audit XML": run.audit_xml, "audit details": "\n".join(details),
              "audit JSON": run.audit_jsonl, "database": run.database.decode("latin-1")}
    leaks = [(what, where) for what, secret in run.secrets.items() for where, text in places.items()
             if secret in text]
    assert leaks == [], leaks
    figures.record("security", "secrets checked in log/audit/database (leaks)",
                   f"{len(run.secrets)} x {len(places)} (0)")


def test_no_patient_data_in_the_log(run: Run) -> None:
    assert run.hostile_sop_uid in run.log  # the log does talk about the instance ...
    assert PHI_NAME not in run.log and PHI_ID not in run.log  # ... never about the patient


def test_database_password_is_never_printed(tmp_path: Path) -> None:
    """PostgreSQL down at start: the error names the server, never the password; the audit trail's
    configuration record keeps only a salted slow hash of the URL."""
    password = "pg-" + secrets.token_urlsafe(16)
    url = f"postgresql+psycopg://facesym:{password}@127.0.0.1:{free_port()}/facesym"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACESYM_")}
    env.update({"FACESYM_DATABASE_URL": url, "FACESYM_DATA_DIR": str(tmp_path), "FACESYM_WEB_PORT": "0",
                "FACESYM_DICOM_PORT": str(free_port()), "FACESYM_LOG_LEVEL": "DEBUG",
                "PYTHONPATH": str(ROOT)})
    done = subprocess.run([sys.executable, "-m", "service.cli", "-v", "serve"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "127.0.0.1" in done.stdout + done.stderr  # it says where it could not connect ...
    assert password not in done.stdout + done.stderr  # ... and nothing more
    view = replace(Settings(), database_url=url).audit_view()
    assert view["database_url"].startswith("scrypt:") and password not in json.dumps(view, default=str)
    sessions = open_database(f"sqlite:///{tmp_path / 'audit.db'}")
    record = AuditTrail(sessions).note_settings(view)
    assert record is not None and password not in record.xml and "database_url" in record.xml
    with pytest.raises(ValueError, match="user:password") as refused:  # credentials in a URL: refused
        replace(Settings(), fhir_base_url=f"https://ehr:{password}@ehr.example/fhir").validate()
    assert password not in str(refused.value)
