"""The DICOM loop end to end: a study arrives by C-STORE → stored → analysed once quiet → SR delivered.

Destinations are a pynetdicom receiver on 127.0.0.1 (service.demo.Receiver) or DCMTK's storescp (which
listens on every address, so only inside a private network namespace, as .ci/run runs the tests).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import free_port, phantom_smile_dicom, require_peer, require_private_netns, wait_until

from service.config import Destination, Settings
from service.demo import Receiver, send
from service.domain import Task
from service.report.sr import read_report

pytestmark = [pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def exam(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """One phantom DICOM video (smile, left weak) in its own study."""
    return phantom_smile_dicom(tmp_path_factory.mktemp("exam"))


def _settings(tmp: Path, dest: Destination) -> Settings:
    return replace(Settings(), web_port=0, data_dir=tmp / "var", dicom_port=free_port(), quiet_seconds=1.0,
                   poll_seconds=0.2, destinations=(dest,), retry_base_seconds=0.5, retry_max_seconds=2.0)


def test_study_in_sr_out_same_numbers_as_cli(exam: tuple[str, Path], tmp_path: Path) -> None:
    from service.cli import analyze_path
    from service.jobs.scheduler import FaceSymService

    study_uid, path = exam
    receiver = Receiver(0)
    service = FaceSymService(_settings(tmp_path, Destination("FACESYM_DEMO", "127.0.0.1", receiver.port)))
    service.start()
    try:
        send([path], "127.0.0.1", service.settings.dicom_port, "FACESYM")
        sr = receiver.wait_for(study_uid, 180)
        assert sr is not None, "no SR arrived"
        (group,) = read_report(sr)
        assert group["quality_ok"]
        cli = analyze_path(str(path), None, Task.SMILE, False, False)["tasks"][0]
        (task,) = group["tasks"]
        assert task["task"] == "smile" and task["weaker_side"] == "left"
        for key in ("asymmetry_index", "asymmetry_score", "cosine_score", "activation_gate"):
            # The SR carries 3 significant digits (a score of 21.87 reads 21.9).
            assert task[key] == pytest.approx(cli[key], abs=0.06), key
        # The PDF report renders offline from the stored result (facesym report).
        from service.cli import main

        pdf = tmp_path / "report.pdf"
        os.environ["FACESYM_DATA_DIR"] = str(service.settings.data_dir)
        try:
            assert main(["report", study_uid, "--pdf", str(pdf)]) == 0
        finally:
            del os.environ["FACESYM_DATA_DIR"]
        assert pdf.read_bytes().startswith(b"%PDF")
        # The same study again: identical bytes are a duplicate, no new job, no second SR.
        send([path], "127.0.0.1", service.settings.dicom_port, "FACESYM")
        time.sleep(3)
        assert len({ds.SOPInstanceUID for ds in receiver.reports}) == 1
    finally:
        service.stop()
        receiver.stop()


def test_corrupt_video_gets_a_not_analysable_sr(tmp_path: Path) -> None:
    from service.jobs.scheduler import FaceSymService
    from service.media.dicom_io import build_video_photographic, write_dicom

    ds = build_video_photographic(b"\x00\x00\x00\x18ftypisom" + os.urandom(4000), width=640, height=480,
                                  n_frames=30, fps=30.0, series_description="Smile")
    path = tmp_path / "corrupt.dcm"
    write_dicom(ds, path)
    receiver = Receiver(0)
    service = FaceSymService(_settings(tmp_path, Destination("FACESYM_DEMO", "127.0.0.1", receiver.port)))
    service.start()
    try:
        send([path], "127.0.0.1", service.settings.dicom_port, "FACESYM")
        sr = receiver.wait_for(str(ds.StudyInstanceUID), 60)
        assert sr is not None
        (group,) = read_report(sr)
        assert not group["quality_ok"]
        assert any("unreadable" in r for r in group["reasons"]), group["reasons"]
    finally:
        service.stop()
        receiver.stop()


def test_destination_down_delays_but_never_loses(exam: tuple[str, Path], tmp_path: Path) -> None:
    from service.jobs.scheduler import FaceSymService

    study_uid, path = exam
    port = free_port()
    service = FaceSymService(_settings(tmp_path, Destination("FACESYM_DEMO", "127.0.0.1", port)))
    service.start()
    try:
        send([path], "127.0.0.1", service.settings.dicom_port, "FACESYM")
        db = service.settings.data_dir / "facesym.db"

        def failed_attempts() -> int:
            with sqlite3.connect(db) as con:
                row = con.execute("select max(attempts) from delivery where state='PENDING'").fetchone()
            return int(row[0] or 0)

        wait_until(lambda: failed_attempts() >= 2, 180, "two failed delivery attempts")
        receiver = Receiver(port)  # the destination comes back
        try:
            assert receiver.wait_for(study_uid, 60) is not None
        finally:
            receiver.stop()
    finally:
        service.stop()


def _serve(tmp: Path, port: int, dest: str, quiet: float = 1.0) -> subprocess.Popen[bytes]:
    env = dict(os.environ, FACESYM_DATA_DIR=str(tmp / "var"), FACESYM_DICOM_PORT=str(port),
               FACESYM_DESTINATIONS=dest, FACESYM_QUIET_SECONDS=str(quiet),
               FACESYM_WEB_PORT="0", FACESYM_POLL_SECONDS="0.2")
    return subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "serve.log", "ab"))


def _job_state(tmp: Path) -> str | None:
    db = tmp / "var" / "facesym.db"
    if not db.exists():
        return None
    try:
        with sqlite3.connect(db) as con:
            row = con.execute("select state from job").fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


@pytest.mark.parametrize("kill_in", ["RECEIVED", "RUNNING"])
def test_sigkill_then_restart_delivers_exactly_one_sr(
    exam: tuple[str, Path], tmp_path: Path, kill_in: str
) -> None:
    """SIGKILL while the job waits in the queue (RECEIVED: its study not yet quiet) or while it runs;
    the restarted service still delivers exactly one SR."""
    study_uid, path = exam
    receiver = Receiver(0)
    port = free_port()
    dest = f"FACESYM_DEMO@127.0.0.1:{receiver.port}"
    proc = _serve(tmp_path, port, dest, quiet=4.0 if kill_in == "RECEIVED" else 1.0)
    try:
        from service.demo import facesym_answers

        wait_until(lambda: facesym_answers("127.0.0.1", port, "FACESYM"), 60,
                   "facesym serve to answer C-ECHO")
        send([path], "127.0.0.1", port, "FACESYM")
        wait_until(lambda: _job_state(tmp_path) == kill_in, 60, f"job {kill_in}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert _job_state(tmp_path) == kill_in  # killed mid-way, nothing delivered yet
        assert receiver.received == []
        proc = _serve(tmp_path, port, dest)
        assert receiver.wait_for(study_uid, 180) is not None, (tmp_path / "serve.log").read_text()[-2000:]
        wait_until(lambda: _job_state(tmp_path) == "DELIVERED", 30, "job DELIVERED")
        time.sleep(2)
        assert len({ds.SOPInstanceUID for ds in receiver.reports}) == 1
    finally:
        proc.terminate()
        proc.wait(20)
        receiver.stop()


@pytest.mark.peers
def test_dcmtk_storescu_to_facesym_to_storescp(exam: tuple[str, Path], tmp_path: Path) -> None:
    storescu, storescp = require_peer("storescu"), require_peer("storescp")
    dciodvfy, dsr2xml = require_peer("dciodvfy"), require_peer("dsr2xml")
    require_private_netns("DCMTK storescp")
    from service.jobs.scheduler import FaceSymService

    study_uid, path = exam
    recv_dir = tmp_path / "received"
    recv_dir.mkdir()
    scp_port = free_port()
    env = dict(os.environ, TCP_NODELAY="1")
    scp = subprocess.Popen([storescp, "-aet", "DCMTKDEST", "-od", str(recv_dir), "+xa", str(scp_port)],
                           env=env)
    service = FaceSymService(_settings(tmp_path, Destination("DCMTKDEST", "127.0.0.1", scp_port)))
    service.start()
    try:
        command = [
            storescu, "-R", "-xn", "-aec", "FACESYM", "127.0.0.1", str(service.settings.dicom_port), str(path)
        ]
        run = subprocess.run(command, env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        # storescp writes as it receives: the file is whole once FaceSym got the C-STORE response.
        wait_until(lambda: _job_state(tmp_path) == "DELIVERED", 180, "the SR delivered to storescp")
        # storescp names files by modality: SR…, SC… (key images), PDF… (the report).
        (sr_file,) = [p for p in recv_dir.iterdir() if p.is_file() and p.name.startswith("SR")]
        assert len([p for p in recv_dir.iterdir() if p.name.startswith("SC")]) == 3
        check = subprocess.run([dciodvfy, str(sr_file)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        xml = subprocess.run([dsr2xml, str(sr_file)], capture_output=True, text=True)
        assert xml.returncode == 0 and "<report" in xml.stdout, xml.stderr
        import pydicom

        from service.cli import analyze_path

        (group,) = read_report(pydicom.dcmread(sr_file))
        (task,) = group["tasks"]
        cli = analyze_path(str(path), None, Task.SMILE, False, False)["tasks"][0]
        assert task["weaker_side"] == cli["weaker_side"] == "left"
        # The JSON rounds indices to 4 decimals and scores to 2; the SR carries 3 significant digits.
        for key in ("asymmetry_index", "activation_gate", "cosine_index"):
            assert task[key] == pytest.approx(cli[key], abs=6e-4), key
        for key in ("asymmetry_score", "cosine_score"):
            assert task[key] == pytest.approx(cli[key], abs=0.06), key
        assert task["left"] == pytest.approx(cli["left"]["magnitude"], abs=1e-3)
        assert task["right"] == pytest.approx(cli["right"]["magnitude"], abs=1e-3)
    finally:
        service.stop()
        scp.terminate()
        scp.wait(10)
