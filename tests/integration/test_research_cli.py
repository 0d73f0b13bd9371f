"""The researcher's CLI (issue 15): batch over a folder with summary.csv and resume, the per-frame CSV,
the annotated video, figures, the wrong-task warning, progress without a TTY, help, --config, --fhir
checked first, and a scores table that fits 80 columns. Real phantoms through the real command."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _facesym(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    # stderr is a pipe here, not a terminal: progress must still come, as plain lines.
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two phantom clips in a folder (one in a sub-folder), each with its truth JSON beside it."""
    from service import phantom
    from service.domain import Task

    folder = tmp_path_factory.mktemp("clips")
    (folder / "visit2").mkdir()
    face = phantom.load_face(ROOT / "service/phantom/data/demo_face.jpg")
    smile = folder / "smile_left_weak.mp4"
    brow = folder / "visit2" / "brow.mp4"
    for path, motion in ((smile, phantom.TaskMotion(Task.SMILE, 0.05, 0.2)),
                         (brow, phantom.TaskMotion(Task.BROW_RAISE, 0.06, 0.06))):
        phantom.write_phantom(face, phantom.PhantomSpec(motions=(motion,)), path)
    return {"folder": folder, "smile": smile, "brow": brow}


def _summary(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_batch_over_a_folder_then_resume_then_two_jobs(phantoms: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "results"
    first = _facesym("analyze", str(phantoms["folder"]), "--out", str(out), "--frames-csv")
    assert first.returncode == 0, first.stderr
    names = {"smile_left_weak.mp4", "visit2__brow.mp4"}
    assert {p.name for p in out.glob("*.json")} == {f"{n}.json" for n in names}  # truth JSONs not inputs
    rows = _summary(out / "summary.csv")
    assert {r["input"] for r in rows} == names
    for r in rows:
        doc = json.loads((out / r["result_json"]).read_text())
        task = next(t for t in doc["tasks"] if t["task"] == r["task"])
        assert float(r["asymmetry_index"]) == task["asymmetry_index"]  # the JSON's number, digit for digit
        assert float(r["left"]) == task["left"]["magnitude"] and r["method"] == task["method"]
        assert r["qc_ok"] == "true" and r["flow_ss_cheek"] != ""
    smile = next(r for r in rows if r["input"] == "smile_left_weak.mp4")
    assert smile["task"] == "smile" and smile["weaker_side"] == "left"
    assert float(smile["asymmetry_index"]) > 0.5
    for n in names:
        assert (out / f"{n}.frames.csv").stat().st_size > 0
    # Progress on a pipe: plain lines with the file, frames and the later stages named.
    assert "[1/2] smile_left_weak.mp4: landmarks 0/" in first.stderr
    assert "measuring smile" in first.stderr and "regional flow" in first.stderr

    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}
    again = _facesym("analyze", str(phantoms["folder"]), "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("already analysed with this engine version: skipped") == 2
    assert "landmarks" not in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")} == stamps
    assert _summary(out / "summary.csv") == rows

    # A changed file is analysed again; the other is not.
    os.utime(phantoms["brow"], ns=(time.time_ns(), time.time_ns()))
    changed = _facesym("analyze", str(phantoms["folder"]), "--out", str(out))
    assert changed.returncode == 0 and changed.stderr.count("version: skipped") == 1, changed.stderr
    assert "visit2__brow.mp4: measuring brow_raise" in changed.stderr

    parallel = _facesym("analyze", str(phantoms["smile"]), str(phantoms["brow"]), "--out",
                        str(tmp_path / "parallel"), "--jobs", "2")
    assert parallel.returncode == 0, parallel.stderr
    got = {(r["input"], r["task"]): r["asymmetry_index"] for r in _summary(tmp_path / "parallel/summary.csv")}
    assert got == {(r["input"], r["task"]): r["asymmetry_index"] for r in rows}


def test_a_batch_names_what_it_could_not_score(faces_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "broken.mp4").write_bytes(b"\x00not a video" * 50)
    (folder / "no_face.mp4").write_bytes((faces_dir / "no_face.mp4").read_bytes())
    run = _facesym("analyze", str(folder), "--out", str(tmp_path / "out"))
    assert run.returncode == 3, run.stderr
    rows = {r["input"]: r for r in _summary(tmp_path / "out/summary.csv")}
    assert rows["no_face.mp4"]["qc_ok"] == "false" and rows["no_face.mp4"]["qc_reasons"] == "no face"
    assert rows["broken.mp4"]["qc_reasons"].startswith("unreadable:")
    assert "no scores: broken.mp4" in run.stderr and "no scores: no_face.mp4" in run.stderr


def test_frames_csv_annotated_video_and_figures_of_one_clip(
    phantoms: dict[str, Path], tmp_path: Path
) -> None:
    import av

    clip = phantoms["smile"]
    n_frames = json.loads(clip.with_suffix(".json").read_text())["n_frames"]
    run = _facesym("analyze", str(clip), "--json", str(tmp_path / "r.json"),
                   "--frames-csv", str(tmp_path / "f.csv"), "--annotated", str(tmp_path / "a.mp4"),
                   "--figures", str(tmp_path / "fig"))
    assert run.returncode == 0, run.stderr
    doc = json.loads((tmp_path / "r.json").read_text())
    (task,) = doc["tasks"]
    assert not any("wrong task" in n for n in task["notes"])

    rows = _summary(tmp_path / "f.csv")
    assert len(rows) == n_frames and [int(r["frame"]) for r in rows] == list(range(n_frames))
    wanted = {"yaw_deg", "pitch_deg", "roll_deg", "smile_left", "smile_right", "x_477", "y_0", "z_477"}
    assert wanted <= set(rows[0])
    usable = [r for r in rows if r["usable"] == "true"]
    assert len(usable) == doc["quality"]["valid_frames"]
    assert all(abs(float(r["roll_deg"])) < 5 and r["qc"] == "ok" for r in usable)
    peak = [r for r in rows if r["phase"] == "peak"]
    assert peak and all(r["task"] == "smile" for r in peak)
    # The per-side series the scores come from: its peak median is the result's magnitude.
    assert float(np.median([float(r["measured_right"]) for r in peak])) == pytest.approx(
        task["right"]["magnitude"], abs=2e-3)
    rest = [float(r["smile_right"]) for r in rows if r["phase"] == "rest"]
    assert np.median([float(r["smile_right"]) for r in peak]) > np.median(rest) + 0.05  # in D
    x0 = np.array([float(r["x_0"]) for r in usable])
    assert np.all((x0 > 0) & (x0 < 2000))  # landmarks in pixels

    with av.open(str(tmp_path / "a.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        decoded = sum(1 for _ in container.decode(stream))
    assert decoded == n_frames
    kinds = sorted(p.name for p in (tmp_path / "fig").glob("*.png"))
    assert kinds == ["smile_left_weak_smile_flow.png", "smile_left_weak_smile_key.png",
                     "smile_left_weak_smile_motion.png"]


def test_a_named_task_whose_region_barely_moved_is_flagged(phantoms: dict[str, Path]) -> None:
    run = _facesym("analyze", str(phantoms["smile"]), "--task", "brow_raise", "--json", "-", "--quiet")
    assert run.returncode == 0, run.stderr
    (task,) = json.loads(run.stdout)["tasks"]
    (note,) = [n for n in task["notes"] if n.startswith("wrong task?")]
    assert "brow raise region moved" in note and "smile region moved" in note
    assert run.stderr == ""  # --quiet: no progress; --json -: nothing else printed


def test_help_has_descriptions_and_defaults_and_global_flags_go_anywhere() -> None:
    from service.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["analyze", "a.mp4", "-v"]).verbose is True
    assert parser.parse_args(["-v", "analyze", "a.mp4"]).verbose is True
    assert parser.parse_args(["analyze", "a.mp4"]).verbose is False
    sub = next(a for a in parser._actions if a.dest == "command")
    choices: dict[str, Any] = sub.choices  # type: ignore[assignment]
    for name, command in choices.items():
        text = command.format_help()
        assert command.description, name
        assert " ".join(command.description.split()[:3]) in " ".join(text.split()), name
    analyze = " ".join(choices["analyze"].format_help().split())
    assert "--jobs N batch: inputs analysed in parallel (default: 1)" in analyze
    assert "examples:" in analyze and "--config" in analyze
    assert "(default: 12)" in " ".join(choices["train"].format_help().split())


def test_analyze_takes_a_config_file(phantoms: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "facesym.toml"
    config.write_text("[facesym]\nmax_frames = 10\n")
    run = _facesym("analyze", str(phantoms["smile"]), "--config", str(config), "--quiet")
    assert run.returncode == 2 and "max_frames=10" in run.stdout + run.stderr, run.stdout


def test_fhir_settings_are_checked_before_analysing(phantoms: dict[str, Path], tmp_path: Path) -> None:
    from conftest import phantom_smile_dicom

    run = _facesym("analyze", str(phantoms["smile"]), "--fhir", str(tmp_path / "b.json"))
    assert run.returncode != 0 and "--fhir needs a DICOM object" in run.stdout + run.stderr
    assert "landmarks" not in run.stderr  # refused before decoding a frame
    _, dcm = phantom_smile_dicom(tmp_path, attributes={"IssuerOfPatientID": "local"})
    run = _facesym("analyze", str(dcm), "--fhir", str(tmp_path / "b.json"))
    said = run.stdout + run.stderr
    assert run.returncode != 0 and "--patient-system" in said and "landmarks" not in run.stderr, said
    assert not (tmp_path / "b.json").exists()
    run = _facesym("analyze", str(dcm), "--fhir", str(tmp_path / "b.json"), "--patient-system",
                   "urn:oid:1.2.3.4", "--quiet")
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "b.json").read_text())["resourceType"] == "Bundle"


def test_the_scores_table_fits_80_columns() -> None:
    from rich.console import Console

    from service.cli import result_tables

    task = {"task": "eye_closure", "frames": [1234, 1799], "left": {"magnitude": 0.61234},
            "right": {"magnitude": 0.1}, "asymmetry_index": 0.8367, "activation_gate": 0.7,
            "insufficient_activation": True, "asymmetry_score": 16.33, "cosine_index": 0.12,
            "cosine_score": 88,
            "weaker_side": "right", "method": "landmarks", "grade": {"label": "IV"}}
    buf = io.StringIO()
    console = Console(file=buf, width=80)
    for table in result_tables({"tasks": [task]}, console.width):
        console.print(table)
    text = buf.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    for cell in ("eye_closure", "1234–1799", "0.612", "0.84", "0.70 (low)", "right", "landmarks", "HB IV"):
        assert cell in text, cell
