"""Library warnings never carry patient data to the logs (issue 14: highdicom quoted a single-component
PatientName on the service's stderr, three times per study)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1].parent

PROBE = """
import logging, sys, warnings
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
from service.cli import phi_safe_warnings
phi_safe_warnings()
from highdicom.valuerep import check_person_name
check_person_name(sys.argv[1])                                  # a library's warning quoting the value
warnings.warn_explicit("own " + sys.argv[1], UserWarning, filename=sys.argv[2], lineno=7)  # FaceSym's own
"""


@pytest.mark.parametrize("name", ["Hopper", "Grace Brewster Murray Hopper", "O'Brien-Ñúñez 李", "<b>x</b>"])
def test_a_library_warning_is_logged_without_its_text(name: str) -> None:
    own = str(ROOT / "service" / "report" / "sr.py")
    run = subprocess.run([sys.executable, "-c", PROBE, name, own], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    library = [x for x in lines if "text withheld" in x]
    # (highdicom warns with stacklevel=2: the location is its caller's, here the probe; in the service a
    # highdicom module.)
    assert library and library[0].startswith("WARNING py.warnings: UserWarning from ")
    # The name appears only in FaceSym's own warning (whose text FaceSym controls), never in the library's.
    assert [x for x in lines if name in x] == [f"WARNING py.warnings: UserWarning at sr.py:7: own {name}"]
