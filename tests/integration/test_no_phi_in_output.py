"""No patient data on any output stream of a running ``facesym serve`` (issue 14, finding 2).

A study whose patient has a single-component name (highdicom warns about such names, quoting them, three
times per study), an unusual ID and a birth date goes through ``facesym serve`` (subprocess, INFO and DEBUG
logging) to a receiver; its stdout and stderr must hold none of the three, while the SR did come back.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, phantom_smile_dicom

from service.demo import Receiver, send

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
NAME, PATIENT_ID, BIRTH = "Zyxwvutsrqpon", "PIDQ8X7Z3", "19451231"


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_serve_writes_no_patient_data_to_stdout_or_stderr(tmp_path: Path, level: str) -> None:
    study_uid, path = phantom_smile_dicom(tmp_path, {"PatientBirthDate": BIRTH}, patient_name=NAME,
                                          patient_id=PATIENT_ID)
    receiver = Receiver(0)
    port = free_port()
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    env = dict(os.environ, FACESYM_DATA_DIR=str(tmp_path / "var"), FACESYM_DICOM_PORT=str(port),
               FACESYM_WEB_PORT="0", FACESYM_LOG_LEVEL=level, FACESYM_POLL_SECONDS="0.2",
               FACESYM_QUIET_SECONDS="1", FACESYM_DESTINATIONS=f"FACESYM_DEMO@127.0.0.1:{receiver.port}")
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, cwd=ROOT,
                                stdout=o, stderr=e)
    try:
        deadline = time.monotonic() + 60
        while "listening as FACESYM" not in err.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text(errors="replace")
            time.sleep(0.2)
        send([path], "127.0.0.1", port, "FACESYM")
        sr = receiver.wait_for(study_uid, 240)
        assert sr is not None, err.read_text(errors="replace")[-3000:]
        assert str(sr.PatientName) == NAME  # the SR itself carries the patient, as it must
        time.sleep(1.0)
    finally:
        proc.terminate()
        proc.wait(30)
        receiver.stop()
    streams = out.read_bytes() + err.read_bytes()
    text = streams.decode("utf-8", "replace")
    assert "reported as SR" in text or level != "INFO", text[-2000:]  # the run was logged
    for secret in (NAME, NAME.lower(), NAME.upper(), PATIENT_ID, BIRTH, "1945-12-31"):
        assert secret not in text, [line for line in text.splitlines() if secret in line][:3]
