"""An idle service writes nothing at INFO (issue 13, "Logs a hospital can keep"): APScheduler's two lines
per job run (~4 a second, ~63 MB a day) and Alembic's migration docstrings are kept at WARNING."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port

from service.cli import CHATTY_LOGGERS, service_logging

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
IDLE_SECONDS = 60


def _lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines() if path.exists() else []


def test_an_idle_serve_writes_no_log_lines_for_a_minute(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    env = dict(os.environ, FACESYM_DATA_DIR=str(tmp_path / "var"), FACESYM_DICOM_PORT=str(free_port()),
               FACESYM_WEB_PORT="0", FACESYM_LOG_LEVEL="INFO", FACESYM_POLL_SECONDS="0.2")
    with log.open("ab") as err:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while not any("listening as FACESYM" in line for line in _lines(log)):
            assert proc.poll() is None, "\n".join(_lines(log))
            assert time.monotonic() < deadline, "serve did not start: " + "\n".join(_lines(log))
            time.sleep(0.2)
        time.sleep(2)  # start-up settles (first scheduler runs)
        before = _lines(log)
        time.sleep(IDLE_SECONDS)
        new = _lines(log)[len(before):]
        assert proc.poll() is None
        assert new == [], f"{len(new)} lines while idle, e.g. {new[:3]}"
        assert not any("alembic" in line for line in before), "Alembic's INFO chatter at start-up"
    finally:
        proc.terminate()
        proc.wait(30)


def test_service_logging_keeps_libraries_at_warning_unless_debugging() -> None:
    import logging

    saved = {n: logging.getLogger(n).level for n in ("", "sqlalchemy", *CHATTY_LOGGERS)}
    try:
        service_logging("info")
        assert logging.getLogger().level == logging.INFO
        assert all(logging.getLogger(n).level == logging.WARNING for n in CHATTY_LOGGERS)
        service_logging("DEBUG")
        assert all(logging.getLogger(n).level == logging.DEBUG for n in CHATTY_LOGGERS)
        assert logging.getLogger("sqlalchemy").level == logging.WARNING  # its parameters are patient data
        service_logging("ERROR")
        assert logging.getLogger("apscheduler").level == logging.ERROR
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)
