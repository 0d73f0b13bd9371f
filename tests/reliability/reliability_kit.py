"""Helpers for the reliability tests: a small phantom corpus, a `facesym serve` subprocess, DCMTK storescu
with per-file outcomes, DCMTK storescp as the destination, and read-only looks at the SQLite database.

Nothing here asserts; the tests do.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from conftest import stop_process
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[2]
FACE = ROOT / "service/phantom/data/demo_face.jpg"
#: DCMTK needs TCP_NODELAY (else a 44 ms stall per PDU exchange).
DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")


# ----------------------------------------------------------------------------------------- corpus
@dataclass(frozen=True)
class Template:
    """One template object of a study: its file, and whether it is a video (storescu needs -xn for it)."""

    path: Path
    video: bool


def make_templates(out: Path) -> list[Template]:
    """A small phantom study from a real face photo: one short smile video (left weak, 320x240, ~1.2 s),
    a rest photo, a smile photo, and more rest photos ("Neutral") to make up the numbers cheaply.

    Kept small so that analysing (and re-analysing after a kill) is a second or two per study.
    """
    from service import phantom
    from service.domain import Task
    from service.media.dicom_io import build_video_photographic, build_vl_photograph, write_dicom
    from service.media.encode import encode_mp4

    out.mkdir(parents=True, exist_ok=True)
    face = phantom.load_face(FACE, target_eye_distance=45, frame_size=(320, 240))
    motion = phantom.TaskMotion(Task.SMILE, 0.05, 0.2)
    clip = phantom.render(face, phantom.PhantomSpec(motions=(motion,), rest_s=0.3, ramp_s=0.2, hold_s=0.3,
                                                    tail_s=0.2))
    study = generate_uid()
    templates = []
    ds = build_video_photographic(encode_mp4(clip.frames(), clip.fps), width=clip.width, height=clip.height,
                                  n_frames=clip.n_frames, fps=clip.fps, series_description="Smile",
                                  study_uid=study, series_number=1)
    templates.append(Template(write_dicom(ds, out / "video.dcm"), True))
    rest, expression, _ = phantom.render_photo_pair(face, motion)
    photo_series = generate_uid()
    ds = build_vl_photograph(rest, series_description="Rest", study_uid=study, series_uid=photo_series,
                             series_number=2, instance_number=1)
    templates.append(Template(write_dicom(ds, out / "rest.dcm"), False))
    ds = build_vl_photograph(expression, series_description="Smile photo", study_uid=study,
                             series_number=3, instance_number=1)
    templates.append(Template(write_dicom(ds, out / "smile.dcm"), False))
    neutral = generate_uid()
    for k in range(7):
        ds = build_vl_photograph(rest, series_description="Neutral", study_uid=study, series_uid=neutral,
                                 series_number=4, instance_number=k + 1)
        templates.append(Template(write_dicom(ds, out / f"neutral{k}.dcm"), False))
    return templates


@dataclass
class StudyFiles:
    study_uid: str
    files: list[Template]
    sop_uids: dict[Path, str] = field(default_factory=dict)


def clone_study(templates: list[Template], out: Path, n: int) -> StudyFiles:
    """A copy of the template study with new Study/Series/SOP Instance UIDs and its own (phantom) patient,
    so that no study is compared with another (each is the only study of its patient)."""
    out.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid()
    series: dict[str, str] = {}
    result = StudyFiles(study_uid, [])
    for k, t in enumerate(templates):
        ds = pydicom.dcmread(t.path)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series.setdefault(str(ds.SeriesInstanceUID), generate_uid())
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID = f"RELIABILITY-{n:04d}"
        ds.PatientName = f"PHANTOM^STUDY{n:04d}"
        path = out / f"s{n:03d}_{k:02d}_{t.path.name}"
        ds.save_as(path, enforce_file_format=True)
        result.files.append(Template(path, t.video))
        result.sop_uids[path] = str(ds.SOPInstanceUID)
    return result


# ---------------------------------------------------------------------------------- facesym serve
class Serve:
    """`facesym serve` as a subprocess (SQLite under ``data_dir``, 127.0.0.1, web off), logging to
    ``log``; start/kill/stop it any number of times over the same data."""

    def __init__(self, data_dir: Path, port: int, log: Path, **env: str) -> None:
        self.data_dir, self.port, self.log = data_dir, port, log
        self.env = dict(os.environ, FACESYM_DATA_DIR=str(data_dir), FACESYM_DICOM_HOST="127.0.0.1",
                        FACESYM_DICOM_PORT=str(port), FACESYM_WEB_PORT="0", FACESYM_POLL_SECONDS="0.2",
                        FACESYM_MIN_FREE_DISK_MB="1")
        self.env.update(env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, wrap: list[str] | None = None, timeout: float = 90.0) -> None:
        """Start and wait until it answers C-ECHO (``wrap``: a command prefix such as unshare)."""
        with open(self.log, "ab") as fh:
            fh.write(f"\n===== start {self.starts + 1} =====\n".encode())
        with open(self.log, "ab") as err:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([*(wrap or []), sys.executable, "-m", "service.cli", "serve"],
                                         env=self.env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"facesym serve exited with {self.proc.returncode}:\n{self.tail()}")
            if answers(self.port):
                return
            time.sleep(0.2)
        raise RuntimeError(f"facesym serve did not answer C-ECHO in {timeout:.0f} s:\n{self.tail()}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(20)

    def stop(self) -> None:
        stop_process(self.proc)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        return query(self.data_dir / "facesym.db", sql, *args)


def query(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Read-only query of the service's SQLite database ([] while it does not exist yet)."""
    if not db.exists():
        return []
    for _ in range(50):
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as con:
                return con.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:  # locked, or a table not created yet
            if "no such table" in str(exc):
                return []
            time.sleep(0.1)
    raise RuntimeError(f"database {db} stayed locked")


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, tick: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(tick)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


# ------------------------------------------------------------------------------------------- storescu
_SENDING = re.compile(r"Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response \((.+)\)")


def storescu_args(storescu: str, port: int, video: bool) -> list[str]:
    # -R: propose only the contexts the files need; -xn: MPEG-4 AVC for the video (photos stay as they are).
    return [storescu, "-v", "-nh", "-R", *(["-xn"] if video else []), "-aec", "FACESYM", "-aet", "MODALITY",
            "127.0.0.1", str(port)]


def parse_storescu(output: str) -> dict[str, str]:
    """Per file the status storescu reported: "Success" (or a warning text), an error text, or "" when no
    response came back (association dropped). Files never attempted are absent."""
    result: dict[str, str] = {}
    current: str | None = None
    for line in output.splitlines():
        m = _SENDING.search(line)
        if m:
            current = m.group(1).strip()
            result[current] = ""
            continue
        m = _RESPONSE.search(line)
        if m and current is not None:
            result[current] = m.group(1).strip()
            current = None
    return result


def run_storescu(storescu: str, port: int, files: Iterable[Template], timeout: float = 120.0
                 ) -> tuple[dict[Path, str], subprocess.CompletedProcess[str]]:
    """Send ``files`` in one association per kind (videos, photos); returns each file's status text."""
    files = list(files)
    status: dict[Path, str] = {}
    last: subprocess.CompletedProcess[str] | None = None
    for video in (True, False):
        batch = [t.path for t in files if t.video == video]
        if not batch:
            continue
        last = subprocess.run([*storescu_args(storescu, port, video), *map(str, batch)], env=DCMTK_ENV,
                              capture_output=True, text=True, timeout=timeout)
        got = parse_storescu(last.stdout + last.stderr)
        for p in batch:
            status[p] = got.get(str(p), "")
    assert last is not None
    return status, last


def is_success(text: str) -> bool:
    return text == "Success" or text.startswith("Warning")


# -------------------------------------------------------------------------------------------- storescp
class StoreSCP:
    """DCMTK storescp as the PACS destination: every object received goes to its own file (unique names),
    so an object that arrives twice shows up twice."""

    def __init__(self, storescp: str, out: Path, port: int, ae_title: str = "DCMTKDEST") -> None:
        self.storescp, self.out, self.port, self.ae_title = storescp, out, port, ae_title
        out.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.storescp, "-aet", self.ae_title, "-od", str(self.out), "+xa", "+uf", str(self.port)],
            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: answers(self.port, self.ae_title), 20, "storescp to answer C-ECHO")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def received(self) -> list[tuple[str, str, str]]:
        """(SOP Class UID, SOP Instance UID, Study Instance UID) of every file received so far."""
        out = []
        for p in sorted(self.out.iterdir()):
            if not p.is_file():
                continue
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - a file being written right now; counted next time
                continue
            out.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)))
        return out


def answers(port: int, ae_title: str = "FACESYM") -> bool:
    """C-ECHO succeeds; a closed port is checked first so that polling a down peer logs nothing."""
    import socket

    from service.demo import facesym_answers

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return facesym_answers("127.0.0.1", port, ae_title)


_TEMPLATES: list[Template] = []


def templates_once(tmp_path_factory: Any) -> list[Template]:
    """The template study, made once per test session (a few seconds of rendering)."""
    if not _TEMPLATES:
        _TEMPLATES.extend(make_templates(tmp_path_factory.mktemp("reliability-templates")))
    return list(_TEMPLATES)
