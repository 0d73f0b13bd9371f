"""MediaPipe's native start-up chatter (absl/TFLite lines on fd 2) stays out of the CLI's and the
service's stderr; any other line written meanwhile still reaches stderr, unchanged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_FILTER_SCRIPT = r"""
import os, threading
from service.engine.landmarks import _native_stderr
_native_stderr.acquire()
_native_stderr.acquire()  # a second detector starting in another thread
os.write(2, b"W0000 inference_feedback_manager.cc:114] Feedback manager requires a model\n")
t = threading.Thread(target=lambda: os.write(2, b"a real error from another thread\n"))
t.start(); t.join()
_native_stderr.release()
os.write(2, b"still captured while the second one starts\n")
_native_stderr.release()
os.write(2, b"after\n")
"""


def test_benign_lines_are_dropped_and_others_replayed_in_order() -> None:
    run = subprocess.run([sys.executable, "-c", _FILTER_SCRIPT], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "inference_feedback_manager" not in run.stderr
    assert run.stderr.splitlines() == [
        "a real error from another thread", "still captured while the second one starts", "after",
    ]


def test_cli_analyze_prints_no_mediapipe_startup_lines(faces_dir: Path) -> None:
    exe = ROOT / ".venv" / "bin" / "facesym"
    if not exe.exists():
        pytest.skip("no .venv/bin/facesym (make venv)")
    run = subprocess.run([str(exe), "analyze", str(faces_dir / "single_face.mp4")], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "smile" in run.stdout
    for chatter in ("inference_feedback_manager", "absl::InitializeLog", "XNNPACK delegate"):
        assert chatter not in run.stderr, run.stderr
