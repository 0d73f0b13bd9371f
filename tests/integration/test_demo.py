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
    # Nobody listening at first, and ticks skipped by design, are not errors or warnings in the output.
    assert " ERROR " not in out and "skipped: maximum number of running instances" not in out, out
