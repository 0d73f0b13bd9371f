"""Outages around `facesym serve`: the PACS (DCMTK storescp) stopped mid-test with several studies waiting,
the FHIR endpoint down for a while, and the disk reserve (0xA700) on a small filesystem. Results wait and
arrive once; nothing acknowledged is lost.

tests/integration/test_dicom_loop.py has the simplest case (a destination down from the start, one study);
here the destination goes away while the service is busy and comes back on the same port.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import free_port, require_peer, require_private_netns
from reliability_kit import (
    DCMTK_ENV,
    ROOT,
    Serve,
    StoreSCP,
    StudyFiles,
    clone_study,
    is_success,
    run_storescu,
    storescu_args,
    templates_once,
    wait_for,
)

from service.store.ingest import dataset_sha256

pytestmark = [pytest.mark.slow]
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
PATIENT_SYSTEM = "urn:oid:1.2.826.0.1.3680043.10.999"


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> list[StudyFiles]:
    templates = templates_once(tmp_path_factory)
    out = tmp_path_factory.mktemp("outage-studies")
    return [clone_study(templates, out, 100 + n) for n in range(4)]


def _send_all(storescu: str, serve: Serve, study: StudyFiles) -> None:
    status, run = run_storescu(storescu, serve.port, study.files)
    assert all(is_success(text) for text in status.values()), run.stdout[-2000:] + run.stderr[-2000:]


def _jobs(serve: Serve) -> dict[str, str]:
    return dict(serve.query("select s.study_uid, j.state from job j join study s on s.id = j.study_pk"))


def _deliveries(serve: Serve, like: str = "%") -> dict[str, tuple[str, int, str, str]]:
    """Per study: (state, attempts, next_run_at, last_error) of its delivery to destinations LIKE ``like``."""
    rows = serve.query(
        "select s.study_uid, d.state, d.attempts, d.next_run_at, d.last_error from delivery d "
        "join job j on j.id = d.job_pk join study s on s.id = j.study_pk where d.destination like ?", like)
    return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}


def _when(text: str) -> float:
    t = datetime.fromisoformat(text)
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


# ------------------------------------------------------------------------------------- (a) the PACS
@pytest.mark.peers
def test_pacs_down_mid_test_reports_wait_with_backoff_then_arrive_once(
    studies: list[StudyFiles], tmp_path: Path, figures: Any
) -> None:
    storescu, storescp = require_peer("storescu"), require_peer("storescp")
    require_private_netns("DCMTK storescp (the PACS)")
    pacs = StoreSCP(storescp, tmp_path / "pacs", free_port())
    serve = Serve(tmp_path / "var", free_port(), tmp_path / "serve.log",
                  FACESYM_DESTINATIONS=pacs.destination, FACESYM_QUIET_SECONDS="1",
                  FACESYM_RETRY_BASE_SECONDS="0.5", FACESYM_RETRY_MAX_SECONDS="4")
    first, waiting = studies[0], studies[1:]
    try:
        pacs.start()
        serve.start()
        _send_all(storescu, serve, first)
        wait_for(lambda: _jobs(serve).get(first.study_uid) == "DELIVERED", 120, "the first study delivered")
        before = len(pacs.received())
        pacs.stop()  # the PACS goes away while the service is busy
        down_at = time.monotonic()
        for study in waiting:
            _send_all(storescu, serve, study)
        # Every waiting study is analysed and reported; its delivery stays PENDING, retried with backoff.
        seen: dict[str, list[tuple[int, float, float]]] = {s.study_uid: [] for s in waiting}

        def all_retried_three_times() -> bool:
            now = time.time()
            for uid, (_, attempts, next_run_at, _) in _deliveries(serve).items():
                if uid in seen and attempts and (not seen[uid] or seen[uid][-1][0] != attempts):
                    seen[uid].append((attempts, now, _when(next_run_at)))
            return all(len(v) >= 3 for v in seen.values())

        wait_for(all_retried_three_times, 180, "three failed delivery attempts per waiting study", tick=0.05)
        jobs, deliveries = _jobs(serve), _deliveries(serve)
        assert all(jobs[s.study_uid] == "REPORTED" for s in waiting), jobs
        for s in waiting:
            state, attempts, _, error = deliveries[s.study_uid]
            assert state == "PENDING" and attempts >= 3 and error, deliveries[s.study_uid]
        # Backoff: the wait after each failed attempt grows (base 0.5 s, doubling, capped at 4 s).
        for uid, steps in seen.items():
            waits = [round(next_run - at, 1) for _, at, next_run in steps]
            assert waits[0] < waits[-1] <= 4.5, (uid, waits)
        assert len(pacs.received()) == before  # nothing arrived anywhere while it was down
        downtime = time.monotonic() - down_at
        pacs.start()  # back, same address
        wait_for(lambda: list(_jobs(serve).values()) == ["DELIVERED"] * len(studies), 120,
                 "every study delivered once the PACS is back")
        time.sleep(1.0)  # a second delivery would arrive now
    finally:
        serve.stop()
        pacs.stop()
    received = Counter(uid for _, uid, _ in pacs.received())
    by_study = Counter(study for _, _, study in pacs.received())
    srs = Counter(study for cls, _, study in pacs.received() if cls == SR_CLASS)
    assert set(received.values()) == {1}, f"objects received twice: {received.most_common(3)}"
    assert set(srs) == {s.study_uid for s in studies} and set(srs.values()) == {1}, srs
    assert len(set(by_study.values())) == 1, by_study  # same report objects (SR, key images, PDF) per study
    figures.record("outage", "PACS down: studies waiting", len(waiting))
    figures.record("outage", "PACS down: seconds down", f"{downtime:.0f}")
    figures.record("outage", "PACS down: failed attempts per study (min)",
                   min(len(v) for v in seen.values()))
    figures.record("outage", "PACS down: objects delivered / received twice", f"{sum(received.values())} / 0")


# ------------------------------------------------------------------------------------- (b) the EHR
@contextmanager
def _fhir_endpoint(store: Any, port: int) -> Iterator[str]:
    """tests/integration/test_fhir_delivery.py's FHIR server, on a fixed port so it can come back there."""
    fhir = _fhir_module()
    server = ThreadingHTTPServer(("127.0.0.1", port), fhir._handler(store, None))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/fhir"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _fhir_module() -> Any:
    integration = str(ROOT / "tests" / "integration")
    if integration not in sys.path:
        sys.path.append(integration)
    return importlib.import_module("test_fhir_delivery")


def _report_study(body: bytes) -> str:
    """The Study Instance UID a posted Bundle's DiagnosticReport is about."""
    for entry in json.loads(body)["entry"]:
        res = entry["resource"]
        if res["resourceType"] == "DiagnosticReport":
            return str(res["imagingStudy"][0]["identifier"]["value"]).removeprefix("urn:oid:")
    return ""


def test_fhir_endpoint_down_then_back_bundles_delivered_once(
    studies: list[StudyFiles], tmp_path: Path, figures: Any
) -> None:
    storescu = require_peer("storescu")
    from service.demo import Receiver

    fhir = _fhir_module()
    ehr = fhir.FhirStore()
    for s in studies[:3]:  # the EHR knows the patients and the imaging studies (conditional references)
        ds = pydicom.dcmread(s.files[0].path, stop_before_pixels=True)
        patient = [{"system": PATIENT_SYSTEM, "value": ds.PatientID}]
        ehr.seed({"resourceType": "Patient", "identifier": patient})
        ehr.seed({"resourceType": "ImagingStudy", "status": "available",
                  "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{s.study_uid}"}]})
    port = free_port()
    receiver = Receiver(0)
    serve = Serve(tmp_path / "var", free_port(), tmp_path / "serve.log",
                  FACESYM_DESTINATIONS=f"FACESYM_DEMO@127.0.0.1:{receiver.port}",
                  FACESYM_FHIR_BASE_URL=f"http://127.0.0.1:{port}/fhir", FACESYM_FHIR_TOKEN=fhir.TOKEN,
                  FACESYM_FHIR_PATIENT_IDENTIFIER_SYSTEM=PATIENT_SYSTEM, FACESYM_FHIR_TIMEOUT_SECONDS="5",
                  FACESYM_QUIET_SECONDS="1", FACESYM_RETRY_BASE_SECONDS="0.5", FACESYM_RETRY_MAX_SECONDS="2")
    for name in [k for k in serve.env if k.lower().endswith("_proxy")]:
        del serve.env[name]  # urllib honours *_proxy: loopback must go straight to the EHR
    first, waiting = studies[0], studies[1:3]
    try:
        serve.start()
        with _fhir_endpoint(ehr, port):
            _send_all(storescu, serve, first)
            wait_for(lambda: _jobs(serve).get(first.study_uid) == "DELIVERED", 120, "the first delivered")
        down_at = time.monotonic()  # the EHR is down now (connection refused)
        for study in waiting:
            _send_all(storescu, serve, study)

        def retried() -> bool:
            d = _deliveries(serve, "fhir:%")
            return all(s.study_uid in d and d[s.study_uid][1] >= 2 for s in waiting)

        wait_for(retried, 180, "two failed FHIR attempts per waiting study")
        jobs, fhir_d, dicom_d = _jobs(serve), _deliveries(serve, "fhir:%"), _deliveries(serve, "FACESYM%")
        for s in waiting:
            assert jobs[s.study_uid] == "REPORTED", jobs  # not DELIVERED while the Bundle waits
            assert fhir_d[s.study_uid][0] == "PENDING" and fhir_d[s.study_uid][3], fhir_d[s.study_uid]
            assert dicom_d[s.study_uid][0] == "DELIVERED", dicom_d  # the SR did not wait for the EHR
        failed_attempts = sum(fhir_d[s.study_uid][1] for s in waiting)
        downtime = time.monotonic() - down_at
        with _fhir_endpoint(ehr, port):  # back, same address
            wait_for(lambda: list(_jobs(serve).values()) == ["DELIVERED"] * 3, 120,
                     "every Bundle delivered once the EHR is back")
            time.sleep(1.0)  # a second POST would arrive now
    finally:
        serve.stop()
        receiver.stop()
    posts = Counter(_report_study(r["body"]) for r in ehr.requests if r["method"] == "POST")
    assert posts == Counter({s.study_uid: 1 for s in studies[:3]}), posts
    reports = Counter(r["imagingStudy"][0]["identifier"]["value"] for r in ehr.all("DiagnosticReport"))
    assert reports == Counter({f"urn:oid:{s.study_uid}": 1 for s in studies[:3]}), reports
    assert ehr.count("Patient") == 3 and ehr.count("Device") == 1
    assert len({ds.SOPInstanceUID for ds in receiver.reports}) == 3
    figures.record("outage", "FHIR down: studies waiting", len(waiting))
    figures.record("outage", "FHIR down: seconds down", f"{downtime:.0f}")
    figures.record("outage", "FHIR down: failed POST attempts", failed_attempts)
    figures.record("outage", "FHIR down: Bundles accepted / per study", f"{sum(posts.values())} / 1")


# ----------------------------------------------------------------------------------- (c) the disk
def _storescu_debug(storescu: str, port: int, path: Path) -> tuple[int | None, str]:
    """Send one file with storescu -d; its DIMSE status and Error Comment as storescu printed them."""
    args = storescu_args(storescu, port, False)
    run = subprocess.run([args[0], "-d", *args[2:], str(path)], env=DCMTK_ENV, capture_output=True, text=True,
                         timeout=60)
    out = run.stdout + run.stderr
    status, comment = None, ""
    for line in out.splitlines():
        if "DIMSE Status" in line and ": 0x" in line:
            status = int(line.split(": 0x", 1)[1][:4], 16)
        if "ErrorComment" in line and "[" in line:
            comment = line.split("[", 1)[1].split("]", 1)[0]
    return status, comment


def _ns_query(pid: int, db: Path, sql: str) -> list[list[Any]]:
    """Query the SQLite database inside the service's mount namespace (only it sees the small disk)."""
    code = ("import json, sqlite3, sys; con = sqlite3.connect(sys.argv[1]); "
            "print(json.dumps(con.execute(sys.argv[2]).fetchall()))")
    run = subprocess.run(["nsenter", "-t", str(pid), "-m", "--", sys.executable, "-c", code, str(db), sql],
                         capture_output=True, text=True, timeout=60, check=True)
    return list(json.loads(run.stdout))


@pytest.mark.peers
def test_disk_reserve_refuses_with_a700_then_accepts_once_freed(
    studies: list[StudyFiles], tmp_path: Path, figures: Any
) -> None:
    storescu = require_peer("storescu")
    unshare, nsenter = require_peer("unshare"), require_peer("nsenter")
    if os.geteuid() != 0:
        if os.environ.get("FACESYM_REQUIRE_PEERS") == "1":
            pytest.fail("the disk-reserve test mounts a small tmpfs: needs root (CI runs as root)")
        pytest.skip("the disk-reserve test mounts a small tmpfs in its own mount namespace: needs root")
    probe = subprocess.run([unshare, "-m", "--propagation", "private", "true"], capture_output=True,
                           text=True, timeout=30)
    if probe.returncode != 0:  # root without CAP_SYS_ADMIN (some containers)
        if os.environ.get("FACESYM_REQUIRE_PEERS") == "1":
            pytest.fail(f"unshare -m does not work here: {probe.stderr.strip()}")
        pytest.skip(f"unshare -m does not work here: {probe.stderr.strip()}")
    data = tmp_path / "var"
    data.mkdir()
    reserve_mb, disk_mb = 8, 24
    serve = Serve(data, free_port(), tmp_path / "serve.log", FACESYM_MIN_FREE_DISK_MB=str(reserve_mb),
                  FACESYM_QUIET_SECONDS="600")  # receiving only: no analysis needed here
    # facesym serve in its own mount namespace, its data dir a small tmpfs that only it (and nsenter) sees.
    mount = f'mount -t tmpfs -o size={disk_mb}m facesym-reserve "$0" && exec "$@"'
    study = studies[3]
    files = [t.path for t in study.files]
    try:
        serve.start(wrap=[unshare, "-m", "--propagation", "private", "sh", "-c", mount, str(data)])
        assert serve.proc is not None
        pid = serve.proc.pid
        inside = Path(f"/proc/{pid}/root") / str(data).lstrip("/")  # the tmpfs, as the service sees it
        assert os.listdir(data) == [] and (inside / "facesym.db").exists()  # private mount, not ours
        status, run = run_storescu(storescu, serve.port, study.files[:4])
        assert all(is_success(t) for t in status.values()), run.stdout[-2000:]
        filler = data / "filler"
        free_mb = shutil.disk_usage(inside).free // 2**20
        subprocess.run([nsenter, "-t", str(pid), "-m", "--", "dd", "if=/dev/zero", f"of={filler}", "bs=1M",
                        f"count={free_mb - reserve_mb // 2}"], check=True, capture_output=True, timeout=60)
        assert shutil.disk_usage(inside).free < reserve_mb * 2**20
        refused = [_storescu_debug(storescu, serve.port, p) for p in files[4:6]]
        assert refused == [(0xA700, "disk reserve reached")] * 2, refused
        stored = {uid: sha for uid, sha in _ns_query(pid, data / "facesym.db",
                                                     "select sop_instance_uid, sha256 from instance")}
        assert set(stored) == {study.sop_uids[p] for p in files[:4]}  # the refused ones left nothing behind
        assert list((inside / "files" / ".incoming").iterdir()) == []
        subprocess.run([nsenter, "-t", str(pid), "-m", "--", "rm", str(filler)], check=True, timeout=60)
        status, run = run_storescu(storescu, serve.port, study.files[4:])  # the refused ones again, and more
        assert all(is_success(t) for t in status.values()), run.stdout[-2000:]
        rows = _ns_query(pid, data / "facesym.db", "select sop_instance_uid, sha256, path from instance")
        assert len(rows) == len(files)
        for p in files:  # nothing lost, nothing altered: every object on the small disk as it was sent
            uid = study.sop_uids[p]
            (sha, rel), = [(r[1], r[2]) for r in rows if r[0] == uid]
            on_disk = inside / "files" / rel
            assert sha == dataset_sha256(p) == dataset_sha256(on_disk), p.name
            assert str(pydicom.dcmread(on_disk, stop_before_pixels=True).SOPInstanceUID) == uid
        log = serve.tail(200_000)
        assert "disk reserve reached" in log
    finally:
        serve.stop()
    assert os.listdir(data) == []  # the tmpfs went with the namespace; nothing was written to the real disk
    figures.record("outage", "disk reserve: refusals (0xA700 'disk reserve reached')", len(refused))
    figures.record("outage", "disk reserve: accepted after freeing / lost", f"{len(files) - 4} / 0")
