"""Clean streams for scripts (issue 15): with ``--json -`` stdout carries only JSON — a not-analysable
clip is JSON with ``quality.ok = false`` — and every message goes to stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", "analyze", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_json_to_stdout_stays_parseable_when_the_clip_is_not_analysable(faces_dir: Path) -> None:
    run = _analyze(str(faces_dir / "no_face.mp4"), "--json", "-")
    assert run.returncode == 3, run.stderr
    doc = json.loads(run.stdout)  # the whole of stdout is the document
    assert doc["quality"]["ok"] is False and doc["quality"]["reasons"] == ["no face"] and doc["tasks"] == []
    assert "not analysable: no face" in run.stderr and "not analysable" not in run.stdout


def test_an_unreadable_file_with_json_to_stdout_prints_nothing_there(tmp_path: Path) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00garbage" * 64)
    run = _analyze(str(junk), "--json", "-")
    assert run.returncode == 2 and run.stdout == "", (run.stdout, run.stderr)
    assert "unreadable input:" in run.stderr


def _serve_with_taken(setting: str, tmp_path: Path) -> tuple[int, subprocess.CompletedProcess[str]]:
    import os
    import socket

    from conftest import free_port

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    ports = {"FACESYM_DICOM_PORT": str(free_port()), "FACESYM_WEB_PORT": str(free_port())}
    ports[f"FACESYM_{setting.upper()}"] = str(port)
    env = dict(os.environ, FACESYM_DATA_DIR=str(tmp_path / "var"), **ports)
    try:
        run = subprocess.run([sys.executable, "-m", "service.cli", "serve"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    finally:
        taken.close()
    return port, run


def test_serve_on_a_port_in_use_says_which_port_and_setting(tmp_path: Path) -> None:
    """Issue 15: "a port in use is a raw traceback that does not say which port"."""
    for setting in ("dicom_port", "web_port"):
        port, run = _serve_with_taken(setting, tmp_path / setting)
        said = " ".join((run.stdout + run.stderr).split())
        assert run.returncode == 1, said
        assert f"port {port} ({setting}) on 127.0.0.1 cannot be opened: Address already in use" in said, said
        assert f"choose another {setting}" in said and "Traceback" not in said, said
