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


TRACEBACK_PROBE = """
import logging, sys, threading
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
from service.cli import phi_safe_logging
from service.errors import FaceSymError
phi_safe_logging()
name = sys.argv[1]
try:
    try:
        raise ValueError(f"Value '{name}' is not a valid PN")  # a library quoting the value
    except ValueError as exc:
        raise KeyError(name) from exc
except KeyError:
    logging.getLogger("service.jobs.worker").exception("job 7: key images not built")
try:
    raise FaceSymError("job 7: no face in 30 of 30 frames")
except FaceSymError:
    logging.getLogger("service.jobs.worker").exception("job 7 failed")
t = threading.Thread(target=lambda: (_ for _ in ()).throw(RuntimeError(name)))
t.start(); t.join()
raise RuntimeError("uncaught " + name)
"""


@pytest.mark.parametrize("name", ["Hopper", "O'Brien-Ñúñez 李"])
def test_tracebacks_keep_frames_and_types_but_not_library_text(name: str) -> None:
    """Issue 14, finding 2: tracebacks are output streams too. A chained library exception, one in a
    thread and an uncaught one are logged with frames and types but without their text; FaceSym's own
    error keeps its message."""
    run = subprocess.run([sys.executable, "-c", TRACEBACK_PROBE, name], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 1  # the uncaught exception still ends the process
    assert name not in run.stderr, run.stderr
    assert "builtins.ValueError: (message withheld" in run.stderr
    assert "builtins.KeyError: (message withheld" in run.stderr
    assert "The above exception led to the following one:" in run.stderr
    assert "service.errors.FaceSymError: job 7: no face in 30 of 30 frames" in run.stderr
    assert run.stderr.count("uncaught exception") == 2  # the thread's and the main thread's
    assert 'File "<string>", line' in run.stderr  # the frames are kept
