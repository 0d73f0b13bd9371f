"""Scale-out on PostgreSQL: one ``facesym serve`` with workers = 0 (SCP only) and several ``facesym worker``
processes on one database and one file store, against a real PostgreSQL 15 server (Debian's packages,
started here on 127.0.0.1 and a free port; see pg_server.py).

(a) 3 workers, 50 studies sent by DCMTK storescu: each study analysed by exactly one worker, one job and
    one SR per study, every object delivered exactly once to a pynetdicom SCP that counts SOP Instance UIDs.
(b) kill -9 a worker mid-job: once its lease (5 s here) expires another worker takes the job over, and the
    report is delivered once.
(c) ``facesym db upgrade`` on an empty PostgreSQL database and on an old create_all SQLite database (with
    rows, which survive); the migrated schemas equal the models.
(Racing claimers and promoters, leases and takeovers in detail: test_leases.py, on SQLite and PostgreSQL.)

Studies are small photo pairs (rest + smile, a phantom warped from the bundled demo face), made once and
re-UID'd per study, one patient each (so no study compares against another).
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, require_peer
from pg_server import PostgresServer, find_bindir

pytestmark = [pytest.mark.peers, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DEST_AE = "SCALEDEST"


# --- peers and data ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    bindir = find_bindir()
    require_peer(str(bindir / "initdb") if bindir else "initdb")  # skips locally, fails in CI when missing
    if os.geteuid() == 0:
        require_peer("runuser")
    with PostgresServer(bindir) as server:  # type: ignore[arg-type]
        yield server


def make_pair_templates(out_dir: Path) -> tuple[Path, Path]:
    """A rest photo and a smile photo (left side weaker) as VL Photographic objects."""
    from service import phantom
    from service.domain import Task
    from service.media.dicom_io import build_vl_photograph, write_dicom

    face = phantom.load_face(ROOT / "service/phantom/data/demo_face.jpg", target_eye_distance=70,
                             frame_size=(320, 320))
    rest, smile, _ = phantom.render_photo_pair(face, phantom.TaskMotion(Task.SMILE, 0.08, 0.25))
    paths = []
    for name, rgb, number in (("Rest", rest, 1), ("Smile", smile, 2)):
        ds = build_vl_photograph(rgb, series_description=name, series_number=number)
        paths.append(write_dicom(ds, out_dir / f"{name.lower()}.dcm"))
    return paths[0], paths[1]


def make_studies(templates: tuple[Path, Path], n: int, out_dir: Path, tag: str) -> dict[str, list[Path]]:
    """``n`` studies, each the template pair with fresh UIDs and its own (made-up) patient."""
    import pydicom
    from pydicom.uid import generate_uid

    studies: dict[str, list[Path]] = {}
    for k in range(n):
        study_uid = generate_uid()
        paths = []
        for template in templates:
            ds = pydicom.dcmread(template)
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.PatientID = f"{tag}{k:04d}"
            ds.PatientName = f"SCALE^{tag}{k:04d}"
            path = out_dir / f"{tag}{k:04d}-{template.stem}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        studies[study_uid] = paths
    return studies


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_pair_templates(tmp_path_factory.mktemp("templates"))


class CountingReceiver:
    """The destination PACS: a pynetdicom storage SCP on 127.0.0.1 that counts every SOP Instance UID it
    receives (and which study each SR belongs to)."""

    def __init__(self, ae_title: str = DEST_AE) -> None:
        from pydicom.uid import ComprehensiveSRStorage
        from pynetdicom import AE, evt

        self.counts: Counter[str] = Counter()
        self.sr_studies: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._sr = ComprehensiveSRStorage
        ae = AE(ae_title=ae_title)
        for uid in (ComprehensiveSRStorage, "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.104.1"):
            ae.add_supported_context(uid)
        ae.maximum_associations = 20

        def on_store(event: Any) -> int:
            ds = event.dataset
            with self._lock:
                self.counts[str(ds.SOPInstanceUID)] += 1
                if ds.SOPClassUID == self._sr:
                    self.sr_studies[str(ds.StudyInstanceUID)] += 1
            return 0x0000

        server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        assert server is not None
        self.server = server
        self.port = int(server.server_address[1])

    def snapshot(self) -> tuple[Counter[str], Counter[str]]:
        with self._lock:
            return Counter(self.counts), Counter(self.sr_studies)

    def stop(self) -> None:
        self.server.shutdown()


# --- the processes -----------------------------------------------------------------------------------------


@dataclass
class Cluster:
    """``facesym serve`` (workers = 0) and N ``facesym worker`` processes sharing one PostgreSQL database and
    one data folder."""

    tmp: Path
    url: str
    dest_port: int
    env: dict[str, str]
    dicom_port: int = 0
    serve: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @classmethod
    def make(cls, tmp: Path, url: str, dest_port: int, **settings: object) -> Cluster:
        env = dict(os.environ, FACESYM_DATA_DIR=str(tmp / "var"), FACESYM_DATABASE_URL=url,
                   FACESYM_DESTINATIONS=f"{DEST_AE}@127.0.0.1:{dest_port}", FACESYM_WEB_PORT="0",
                   FACESYM_QUIET_SECONDS="1", FACESYM_POLL_SECONDS="0.2", FACESYM_RETRY_BASE_SECONDS="0.5",
                   FACESYM_RETRY_MAX_SECONDS="2", FACESYM_LOG_LEVEL="INFO", FACESYM_WORKERS="1")
        env.update({f"FACESYM_{k.upper()}": str(v) for k, v in settings.items()})
        return cls(tmp, url, dest_port, env)

    def log(self, name: str) -> Path:
        return self.tmp / f"{name}.log"

    def start_serve(self) -> None:
        self.dicom_port = free_port()
        env = dict(self.env, FACESYM_WORKERS="0", FACESYM_DICOM_PORT=str(self.dicom_port))
        with open(self.log("serve"), "ab") as log:
            self.serve = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, cwd=ROOT,
                                          stdout=subprocess.DEVNULL, stderr=log)

    def start_worker(self) -> subprocess.Popen[bytes]:
        name = f"worker{len(self.workers) + 1}"
        with open(self.log(name), "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], env=self.env, cwd=ROOT,
                                    stdout=subprocess.DEVNULL, stderr=log)
        self.workers.append(proc)
        return proc

    def worker_log(self, proc: subprocess.Popen[bytes]) -> str:
        return self.log(f"worker{self.workers.index(proc) + 1}").read_text(errors="replace")

    def wait_ready(self, timeout: float = 90) -> None:
        import socket

        from service.demo import facesym_answers

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.dicom_port)) == 0

        _wait(listening, timeout, "facesym serve to listen", self)
        _wait(lambda: facesym_answers("127.0.0.1", self.dicom_port, "FACESYM"), timeout,
              "facesym serve to answer C-ECHO", self)
        for proc in self.workers:
            _wait(lambda p=proc: "analyses at once" in self.worker_log(p), timeout, "the workers", self)

    def tails(self) -> str:
        out = []
        for path in sorted(self.tmp.glob("*.log")):
            out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-1500:]}")
        return "\n".join(out)

    def stop(self) -> None:
        procs = [p for p in [self.serve, *self.workers] if p is not None]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def _wait(predicate: Any, timeout: float, what: str, cluster: Cluster | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{cluster.tails() if cluster else ''}")


def storescu(files: list[Path], port: int) -> None:
    tool = require_peer("storescu")
    env = dict(os.environ, TCP_NODELAY="1")
    run = subprocess.run([tool, "-R", "-aet", "MODALITY", "-aec", "FACESYM", "127.0.0.1", str(port),
                          *map(str, files)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def job_rows(url: str) -> list[tuple[str, str, int, str]]:
    """(study UID, state, attempts, SR UID) of every job."""
    from sqlalchemy import create_engine, text

    from service.store.db import engine_url

    engine = create_engine(engine_url(url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT study.study_uid, job.state, job.attempts, job.sr_sop_instance_uid FROM job "
                "JOIN study ON study.id = job.study_pk ORDER BY job.id")).all()
    finally:
        engine.dispose()
    return [(str(a), str(b), int(c), str(d)) for a, b, c, d in rows]


def delivery_rows(url: str) -> list[tuple[str, int]]:
    from sqlalchemy import create_engine, text

    from service.store.db import engine_url

    engine = create_engine(engine_url(url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT state, attempts FROM delivery")).all()
    finally:
        engine.dispose()
    return [(str(a), int(b)) for a, b in rows]


def analysed_in(log: str) -> list[str]:
    """Study UIDs a worker started analysing, from its log ("job N: analysing study UID (...)")."""
    return re.findall(r"job \d+: analysing study ([0-9.]+) ", log)


# --- (a) three workers, fifty studies ---------------------------------------------------------------------


def test_three_workers_analyse_and_deliver_fifty_studies_exactly_once(
    pg: PostgresServer, templates: tuple[Path, Path], tmp_path: Path, figures: Any
) -> None:
    require_peer("storescu")
    n_studies, n_workers = 50, 3
    studies = make_studies(templates, n_studies, tmp_path, "A")
    url = pg.create_database("scale_a")
    receiver = CountingReceiver()
    cluster = Cluster.make(tmp_path, url, receiver.port)
    try:
        cluster.start_serve()
        for _ in range(n_workers):
            cluster.start_worker()
        cluster.wait_ready()
        t0 = time.monotonic()
        storescu([p for paths in studies.values() for p in paths], cluster.dicom_port)
        sent_s = time.monotonic() - t0
        _wait(lambda: sum(s == "DELIVERED" for _, s, _, _ in job_rows(url)) == n_studies, 240,
              f"{n_studies} jobs DELIVERED", cluster)
        done_s = time.monotonic() - t0
        time.sleep(1.0)  # anything sent twice would arrive now
        counts, sr_studies = receiver.snapshot()
        logs = [cluster.worker_log(p) for p in cluster.workers]
        serve_log = cluster.log("serve").read_text(errors="replace")
    finally:
        cluster.stop()
        receiver.stop()

    jobs = job_rows(url)
    assert sorted(uid for uid, *_ in jobs) == sorted(studies)  # one job per study (and engine version)
    assert all(state == "DELIVERED" and attempts == 1 for _, state, attempts, _ in jobs), jobs
    assert analysed_in(serve_log) == [] and "workers = 0" in serve_log  # serve only received
    started = Counter(uid for log in logs for uid in analysed_in(log))
    assert started == Counter(list(studies))  # every study analysed, and by exactly one worker, once
    per_worker = [len(analysed_in(log)) for log in logs]
    assert all(n > 0 for n in per_worker), per_worker  # the three shared the queue
    assert sr_studies == Counter(list(studies))  # one SR per study at the destination
    assert {uid: n for uid, n in counts.items() if n > 1} == {}  # no object delivered twice
    assert {sr for *_, sr in jobs} <= set(counts)  # the SRs the jobs made are what arrived
    deliveries = delivery_rows(url)
    assert len(deliveries) == n_studies and all(d == ("DELIVERED", 1) for d in deliveries), deliveries
    for name, value in (("studies", n_studies), ("workers", n_workers), ("per-worker studies", per_worker),
                        ("analysed once", sum(n == 1 for n in started.values())),
                        ("objects delivered", len(counts)),
                        ("duplicates", sum(n - 1 for n in counts.values())),
                        ("seconds to send / to deliver all", f"{sent_s:.1f} / {done_s:.1f}")):
        figures.record("scale-out (a)", name, value)


# --- (b) kill -9 a worker mid-job -------------------------------------------------------------------------


def test_a_killed_workers_job_is_taken_over_after_its_lease_and_delivered_once(
    pg: PostgresServer, templates: tuple[Path, Path], tmp_path: Path, figures: Any
) -> None:
    from sqlalchemy import create_engine, text

    from service.store.db import engine_url

    require_peer("storescu")
    lease = 5
    studies = make_studies(templates, 1, tmp_path, "B")
    (study_uid,) = studies
    url = pg.create_database("scale_b")
    receiver = CountingReceiver()
    cluster = Cluster.make(tmp_path, url, receiver.port, lease_seconds=lease)
    engine = create_engine(engine_url(url))

    def running() -> tuple[str, int] | None:
        with engine.connect() as conn:
            row = conn.execute(text("SELECT claimed_by, attempts FROM job WHERE state = 'RUNNING'")).first()
        return (str(row[0]), int(row[1])) if row else None

    try:
        cluster.start_serve()
        for _ in range(2):
            cluster.start_worker()
        cluster.wait_ready()
        storescu(studies[study_uid], cluster.dicom_port)
        # The first job a fresh worker runs takes seconds (its engine loads then): kill it in there.
        claimed_by, attempts = _wait(running, 60, "a RUNNING job", cluster)
        victim = next(p for p in cluster.workers if claimed_by.endswith(f":{p.pid}"))
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        killed_at = time.monotonic()
        assert running() == (claimed_by, 1)  # killed mid-job: still RUNNING under the dead worker's claim
        assert receiver.snapshot()[0] == Counter()
        survivor = next(p for p in cluster.workers if p is not victim)
        _wait(lambda: "taken over" in cluster.worker_log(survivor), 60, "the job to be taken over", cluster)
        takeover_s = time.monotonic() - killed_at
        _wait(lambda: [s for _, s, _, _ in job_rows(url)] == ["DELIVERED"], 120, "the job DELIVERED", cluster)
        time.sleep(1.0)
        counts, sr_studies = receiver.snapshot()
        survivor_log = cluster.worker_log(survivor)
    finally:
        cluster.stop()
        receiver.stop()
        engine.dispose()

    ((uid, state, attempts, sr_uid),) = job_rows(url)
    assert (uid, state, attempts) == (study_uid, "DELIVERED", 2)  # claims: the dead worker, the survivor
    assert analysed_in(survivor_log) == [study_uid]
    assert sr_studies == Counter({study_uid: 1}) and counts[sr_uid] == 1
    assert all(n == 1 for n in counts.values()), counts
    figures.record("scale-out (b)", "kills", 1)
    figures.record("scale-out (b)", "lease seconds", lease)
    figures.record("scale-out (b)", "kill -> taken over (s)", f"{takeover_s:.1f}")
    figures.record("scale-out (b)", "delivered once", int(counts[sr_uid] == 1))
    figures.record("scale-out (b)", "duplicates", sum(n - 1 for n in counts.values()))


# --- (c) facesym db upgrade -------------------------------------------------------------------------------


def _facesym(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], env=dict(os.environ, **env), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def _schema_diff(url: str) -> list[Any]:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from service.store.db import Base, make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return list(compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                         Base.metadata))
    finally:
        engine.dispose()


def test_db_upgrade_on_empty_postgresql_and_on_an_old_create_all_sqlite_database(
    pg: PostgresServer, tmp_path: Path, figures: Any
) -> None:
    from service.store.schema import head_revision

    head = head_revision()
    # An empty PostgreSQL database: created from nothing.
    url = pg.create_database("upgrade_empty")
    env = {"FACESYM_DATABASE_URL": url, "FACESYM_DATA_DIR": str(tmp_path / "pgdata")}
    assert _facesym("db", "current", env=env).returncode == 1  # not at head yet
    run = _facesym("db", "upgrade", env=env)
    assert run.returncode == 0 and f"schema created at revision {head}" in run.stdout, run.stdout + run.stderr
    run = _facesym("db", "current", env=env)
    assert run.returncode == 0 and run.stdout.strip() == f"{head} (head)", run.stdout + run.stderr
    assert _schema_diff(url) == []
    assert "already at the newest revision" in _facesym("db", "upgrade", env=env).stdout

    # An old SQLite database made by create_all (no alembic_version), with a job and a delivery in it.
    data = tmp_path / "var"
    data.mkdir()
    db = data / "facesym.db"
    with sqlite3.connect(db) as con:
        con.executescript((HERE / "create_all_schema.sql").read_text())
        con.executescript(
            "INSERT INTO patient VALUES (1, 'P1', '', 'OLD^PATIENT', '', '');"
            "INSERT INTO study VALUES (1, '1.2.3.4', 1, '', '', '', '', '', '', "
            "'2026-01-01 00:00:00.000000');"
            # The same patient again under a corrected name (two rows before 0004), and one without an ID.
            "INSERT INTO patient VALUES (2, 'P1', '', 'OLD^PATIENTA', '19700101', 'F');"
            "INSERT INTO study VALUES (2, '1.2.3.5', 2, '', '', '', '', '', '', "
            "'2026-01-02 00:00:00.000000');"
            "INSERT INTO patient VALUES (3, '', '', 'NO^ID', '', '');"
            "INSERT INTO job VALUES (1, 1, 'old', 'REPORTED', '', 1, '2026-01-01 00:00:00.000000', '', "
            "'reports/x.dcm', '1.2.3.4.5', '[]', '[]', '2026-01-01 00:00:00.000000', "
            "'2026-01-01 00:00:00.000000');"
            "INSERT INTO delivery VALUES (1, 1, 'PACS@127.0.0.1:104', 'PENDING', 0, "
            "'2026-01-01 00:00:00.000000', '', NULL);"
        )
    env = {"FACESYM_DATA_DIR": str(data)}
    run = _facesym("db", "upgrade", env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"made by create_all: stamped at 0001_baseline, upgraded to {head}" in run.stdout, run.stdout
    assert _facesym("db", "current", env=env).stdout.strip() == f"{head} (head)"
    assert _schema_diff(f"sqlite:///{db}") == []
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT study_uid, patient_pk FROM study ORDER BY id").fetchall() == [
            ("1.2.3.4", 1), ("1.2.3.5", 1)]  # merged into the oldest row, which takes the newest name
        assert con.execute("SELECT id, patient_id, name, birth_date FROM patient ORDER BY id").fetchall() == [
            (1, "P1", "OLD^PATIENTA", "19700101"), (3, "", "NO^ID", "")]
        assert con.execute("SELECT state, sr_sop_instance_uid, lease_expires_at FROM job").fetchall() == [
            ("REPORTED", "1.2.3.4.5", None)]
        assert con.execute("SELECT destination, claimed_by FROM delivery").fetchall() == [
            ("PACS@127.0.0.1:104", "")]
    # A database migrated by a newer FaceSym is refused, not touched.
    with sqlite3.connect(db) as con:
        con.execute("UPDATE alembic_version SET version_num = '9999_future'")
    run = _facesym("db", "upgrade", env=env)
    said = " ".join(run.stdout.split())
    assert run.returncode == 1 and "9999_future" in said and "does not know" in said, run.stdout + run.stderr
    figures.record("scale-out (c)", "db upgrade: empty PostgreSQL -> head", head)
    figures.record("scale-out (c)", "db upgrade: create_all SQLite -> stamped + head", head)
