"""The script that regenerates conformance/evidence/ runs and its validators pass."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import require_peer

pytestmark = [pytest.mark.slow, pytest.mark.peers]
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "validation_evidence.py"


def test_validation_evidence_regenerates(tmp_path: Path) -> None:
    require_peer("dciodvfy")
    spec = importlib.util.spec_from_file_location("validation_evidence", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(tmp_path) == 0
    assert "(exit 0)" in (tmp_path / "dciodvfy-sr.txt").read_text()
    assert "OK: audit trail intact, 5 record(s)" in (tmp_path / "audit-verify.txt").read_text()
    assert "model_validate: OK" in (tmp_path / "fhir-validation.txt").read_text()
