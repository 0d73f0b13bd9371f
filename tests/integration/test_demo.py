"""`facesym demo` (README's first look at FaceSym): a phantom exam over DICOM to an embedded FaceSym, the SR
back, its scores printed. 127.0.0.1 and free ports only; the embedded service stops by itself."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_demo_prints_the_scores_read_back_from_the_sr(tmp_path: Path) -> None:
    env = dict(os.environ, FACESYM_DICOM_HOST="127.0.0.1", FACESYM_DICOM_PORT=str(free_port()),
               FACESYM_DEMO_RECEIVER_PORT=str(free_port()),
               FACESYM_DATA_DIR=str(tmp_path / "unused"), COLUMNS="120", TMPDIR=str(tmp_path))
    run = subprocess.run([sys.executable, "-m", "service.cli", "demo"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "started one for the demo" in out and "Scores read back from the DICOM SR" in out
    row = re.compile(r"│ (smile|eye_closure|brow_raise)\s*│.*│ (\w+)\s*│")
    rows = {m.group(1): m.group(2) for m in row.finditer(out)}
    # The exam's patient is weak on the left in smile and brow raise, symmetric in eye closure.
    assert rows == {"smile": "left", "eye_closure": "none", "brow_raise": "left"}, out
    # The grade column and the SR's own impression sentence, read back from the SR (TID 1500 row 12).
    assert "grade*" in out and "│ HB " in out, out
    (impression,) = [line for line in out.splitlines() if line.startswith("Impression (from the SR): ")]
    assert "Patient's left weaker: smile AI" in impression and "trained on synthetic data" in impression, out
    # Nobody listening at first, and ticks skipped by design, are not errors or warnings in the output.
    assert " ERROR " not in out and "skipped: maximum number of running instances" not in out, out


def test_make_run_then_demo_prints_the_scores(tmp_path: Path) -> None:
    """The README's walk-through as written: `make run` in one terminal, `facesym demo` in another. The
    running FaceSym (not an embedded one) analyses the exam and sends the SR to the demo's receiver,
    because `make run` adds that destination. Ports are free ones, passed as the settings they are."""
    import signal
    import time

    env = dict(os.environ, FACESYM_DICOM_HOST="127.0.0.1", FACESYM_DICOM_PORT=str(free_port()),
               FACESYM_DEMO_RECEIVER_PORT=str(free_port()), FACESYM_WEB_PORT="0",
               FACESYM_DATA_DIR=str(tmp_path / "var"), FACESYM_QUIET_SECONDS="2", COLUMNS="120",
               TMPDIR=str(tmp_path))
    env.pop("FACESYM_DESTINATIONS", None)
    log = tmp_path / "make-run.log"
    with log.open("ab") as out_file:
        server = subprocess.Popen(["make", "run"], cwd=ROOT, env=env, stdout=out_file, stderr=out_file,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "listening as FACESYM" not in log.read_text(errors="replace"):
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        run = subprocess.run([sys.executable, "-m", "service.cli", "demo"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=400)
        out = run.stdout + run.stderr
        assert run.returncode == 0, out + log.read_text()
        assert "Using the running FaceSym" in out and "Scores read back from the DICOM SR" in out, out
        assert re.search(r"│ smile\s*│.*│ left\s*│", out), out
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)


def test_a_demo_whose_sr_never_comes_says_how_to_fix_it(tmp_path: Path) -> None:
    """A running FaceSym that does not send reports to the demo: the demo says why and what to do."""
    from service.config import Settings
    from service.demo import run_demo
    from service.errors import FaceSymError
    from service.jobs.scheduler import FaceSymService

    settings = Settings(data_dir=tmp_path / "var", dicom_port=free_port(), web_port=0, quiet_seconds=60)
    service = FaceSymService(settings)
    service.start()
    try:
        with pytest.raises(FaceSymError) as err:
            run_demo(settings, free_port(), timeout=5)
    finally:
        service.stop()
    text = str(err.value)
    assert "no SR for study" in text and "make run" in text
    assert "FACESYM_DESTINATIONS=FACESYM_DEMO@127.0.0.1:" in text
