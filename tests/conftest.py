"""Shared fixtures and helpers for every test layer.

Keep this generic: fixtures for one layer live beside that layer's tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
FACES_DIR = REPO.parent / "shared" / "data" / "faces"


def require_peer(tool: str) -> str:
    """Return the path of the external ``tool``.

    Skips the test when it is missing, or fails it when FACESYM_REQUIRE_PEERS=1 (CI installs the peers).
    """
    found = shutil.which(tool)
    if found is None:
        if os.environ.get("FACESYM_REQUIRE_PEERS") == "1":
            pytest.fail(f"{tool} not installed but FACESYM_REQUIRE_PEERS=1")
        pytest.skip(f"{tool} not installed")
    return found


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    """The real test faces (see its SOURCES.md); skips when the shared data folder is absent."""
    if not FACES_DIR.is_dir():
        if os.environ.get("FACESYM_REQUIRE_PEERS") == "1":
            pytest.fail(f"test faces not found at {FACES_DIR} but FACESYM_REQUIRE_PEERS=1")
        pytest.skip(f"test faces not found at {FACES_DIR}")
    return FACES_DIR


@pytest.fixture(scope="session")
def test_clips_dir() -> Path:
    """The extra real clips of scripts/fetch_test_clips.py (var/test-clips); skips when absent, fails
    under FACESYM_REQUIRE_PEERS=1 (.ci/run fetches them)."""
    clips = REPO / "var" / "test-clips"
    if not (clips / "WolfgangLanger_Pexels.mp4").is_file():
        if os.environ.get("FACESYM_REQUIRE_PEERS") == "1":
            pytest.fail(f"test clips not found in {clips} but FACESYM_REQUIRE_PEERS=1")
        pytest.skip(f"test clips not found in {clips}: run scripts/fetch_test_clips.py")
    return clips


def in_private_netns() -> bool:
    """True when this process sees only the loopback interface (a private network namespace, as
    `.ci/run` sets up with `unshare -n`)."""
    # /proc/self/net/dev follows the reading process's namespace (/sys/class/net may be the host's).
    try:
        lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    except OSError:
        return False
    return [line.split(":")[0].strip() for line in lines] == ["lo"]


def require_private_netns(why: str) -> None:
    """Peers that listen on every address (storescp, Orthanc) may only run inside a private namespace."""
    if not in_private_netns():
        if os.environ.get("FACESYM_REQUIRE_PEERS") == "1":
            pytest.fail(f"{why}: needs a private network namespace (run under `unshare -n`, as .ci/run does)")
        pytest.skip(f"{why} listens on every address: runs only inside a private network namespace (.ci/run)")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[Any] | None, grace: float = 30.0) -> None:
    """Stop a test's child process: SIGTERM, wait ``grace`` seconds for a clean exit, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# --- Figures printed at the end of the run ---
# Reliability, fuzz and scale-out tests record what they did (instances sent, kills, lost, duplicates, fuzz
# cases, crashes...) so the CI log ends with the evidence, not just "passed". Figures live in memory of the
# pytest process; tests that run work in subprocesses record the totals they observed.

_FIGURES: list[tuple[str, str, str]] = []


class FigureRecorder:
    """Record a named figure for the end-of-run table: ``figures.record("crash", "kills", 12)``."""

    def record(self, group: str, name: str, value: object) -> None:
        _FIGURES.append((group, name, str(value)))


@pytest.fixture(scope="session")
def figures() -> FigureRecorder:
    return FigureRecorder()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("FaceSym reliability figures")
    width = max(len(f"{g} / {n}") for g, n, _ in _FIGURES)
    for group, name, value in _FIGURES:
        terminalreporter.write_line(f"{group + ' / ' + name:<{width}}  {value}")


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    """``predicate()``'s first truthy value, polled every ``interval`` s; fails the test after ``timeout``."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def phantom_smile_dicom(
    folder: Path, attributes: dict[str, Any] | None = None, **header: Any
) -> tuple[str, Path]:
    """The demo face's smile with the patient's left weak (L 0.05, R 0.25 D) as a DICOM Video Photographic
    object (H.264) in its own study, written to ``folder/smile.dcm``: (Study Instance UID, path).
    ``header``: more keyword arguments of ``build_video_photographic`` (series_description "Smile"
    unless given), e.g. patient_name, patient_id, study_description; ``attributes``: DICOM keywords set
    on the dataset before it is written (e.g. PatientBirthDate)."""
    from service import phantom
    from service.domain import Task
    from service.media.dicom_io import build_video_photographic, write_dicom
    from service.media.encode import encode_mp4

    face = phantom.load_face(REPO / "service/phantom/data/demo_face.jpg")
    clip = phantom.render(face, phantom.PhantomSpec(motions=(phantom.TaskMotion(Task.SMILE, 0.05, 0.25),)))
    ds = build_video_photographic(
        encode_mp4(clip.frames(), clip.fps), width=clip.width, height=clip.height, n_frames=clip.n_frames,
        fps=clip.fps, **{"series_description": "Smile", **header},
    )
    for keyword, value in (attributes or {}).items():
        setattr(ds, keyword, value)
    return str(ds.StudyInstanceUID), write_dicom(ds, folder / "smile.dcm")
