"""Fuzz `facesym analyze` with hostile and broken DICOM objects: it only ever exits 0, 2 or 3, with a message,
never with a traceback, and stays within memory.

Cases come from real seeds (tests/fuzz/fuzz_corpus.py) mutated by Hypothesis with a fixed seed
(FACESYM_FUZZ_SEED, printed in the figures), so a CI failure reproduces locally. Most cases run through the
CLI entry point in-process (speed); a few run as real `facesym analyze` subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from fuzz_corpus import Case, build_seeds, cases, materialize, reset_peak_rss, rss_mb
from hypothesis import HealthCheck, Phase, given, note, seed, settings

# pydicom warns about every malformed value it reads (the point of these inputs): keep the log readable.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]
ROOT = Path(__file__).resolve().parents[2]
FUZZ_SEED = int(os.environ.get("FACESYM_FUZZ_SEED", "20261121"))
N_CASES = int(os.environ.get("FACESYM_FUZZ_ANALYZE_CASES", "360"))
#: Growth of the test process's peak RSS while analysing the fuzz cases, over its RSS before them: MediaPipe,
#: torch and the grader loaded once (~500 MB), then one case at a time. Hostile cases must not add to it.
RSS_GROWTH_BOUND_MB = 900
EXIT_MESSAGES = {0: None, 2: "unreadable input:", 3: "not analysable:"}
SEED_NAMES = ["video", "video", "one_frame", "noise", "video_8k", "photo", "photo_implicit", "jpeg",
              "jpeg_8k"]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory, faces_dir: Path) -> dict:
    return build_seeds(tmp_path_factory.getbasetemp() / "fuzz-seeds", faces_dir)


def _check_outcome(code: int, text: str, doc_path: Path) -> str:
    """The contract of `facesym analyze`: 0/2/3, each with its message; returns a problem or ""."""
    if code not in EXIT_MESSAGES:
        return f"exit code {code}"
    if "Traceback" in text:
        return "traceback printed"
    if len(text) > 20000:  # a message quoting the input (a lying length makes that megabytes)
        return f"a message of {len(text)} characters"
    if code and EXIT_MESSAGES[code] not in text:
        return f"exit {code} without the message {EXIT_MESSAGES[code]!r}"
    if "processing failed" in text:  # the CLI's last-resort net caught an unexpected exception: a bug
        return "unexpected exception (processing failed)"
    if code in (0, 3):
        doc = json.loads(doc_path.read_text())
        if doc["quality"]["ok"] != (code == 0):
            return f"exit {code} but quality.ok is {doc['quality']['ok']}"
        if code == 3 and not doc["quality"]["reasons"]:
            return "not analysable without a reason"
    return ""


def test_analyze_survives_fuzzed_dicom(seeds: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       figures) -> None:  # type: ignore[no-untyped-def]
    from service.cli import main

    counts: Counter[int] = Counter()
    problems: list[str] = []
    unchanged: dict[str, int] = {}
    out_json = tmp_path / "out.json"
    start = reset_peak_rss()

    @settings(max_examples=N_CASES, database=None, deadline=None, phases=(Phase.explicit, Phase.generate),
              suppress_health_check=list(HealthCheck))
    @seed(FUZZ_SEED)
    @given(case=cases(SEED_NAMES, network=False))
    def one(case: Case) -> None:
        note(case.label())
        path = materialize(case, seeds, tmp_path / "case.dcm")
        if os.environ.get("FACESYM_FUZZ_TRACE"):  # the case about to run, for a crash that kills the process
            with open(os.environ["FACESYM_FUZZ_TRACE"], "a") as fh:
                fh.write(case.label() + "\n")
        out_json.unlink(missing_ok=True)
        capsys.readouterr()
        code = main(["analyze", str(path), "--json", str(out_json)])
        captured = capsys.readouterr()
        problem = _check_outcome(code, captured.out + captured.err, out_json)
        counts[code] += 1
        if os.environ.get("FACESYM_FUZZ_TRACE"):
            with open(os.environ["FACESYM_FUZZ_TRACE"], "a") as fh:
                fh.write(f"   -> exit {code}, peak RSS {rss_mb():.0f} MB\n")
        if not case.ops:
            unchanged[case.seed] = code
        if problem:
            problems.append(f"{case.label()}: {problem}\n{captured.out[-600:]}")
        assert not problem, f"{problem}\n{captured.out[-1500:]}"

    one()
    total = sum(counts.values())
    peak = rss_mb()
    growth = peak - start
    print(f"fuzz seed {FUZZ_SEED}: {total} cases through facesym analyze, exit codes {dict(counts)}, "
          f"peak RSS {peak:.0f} MB ({growth:+.0f} MB)")
    figures.record("fuzz (analyze)", "hypothesis seed", FUZZ_SEED)
    figures.record("fuzz (analyze)", "fuzz cases (analyze)", total)
    figures.record("fuzz (analyze)", "exit 0 / 2 / 3", f"{counts[0]} / {counts[2]} / {counts[3]}")
    figures.record("fuzz (analyze)", "crashes (tracebacks, other exit codes)", len(problems))
    figures.record("fuzz (analyze)", "peak RSS MB (pytest process; growth during the fuzz)",
                   f"{peak:.0f} ({growth:+.0f})")
    assert not problems
    assert total >= 0.9 * N_CASES, f"Hypothesis ran only {total} of {N_CASES} cases"
    # Every kind of outcome happened, and the seeds as they are give what a normal run gives.
    assert counts[0] and counts[2] and counts[3], dict(counts)
    expected = {"analysed": 0, "not_analysable": 3, "refused": 2}
    for name, code in unchanged.items():
        assert code == expected[seeds[name].expect], f"seed {name} unchanged: exit {code}"
    assert growth < RSS_GROWTH_BOUND_MB, f"peak RSS {peak:.0f} MB, {growth:.0f} MB over {start:.0f} MB"


def test_analyze_subprocess_exit_codes_and_messages(seeds: dict, tmp_path: Path) -> None:
    """Real `facesym analyze` processes (run side by side): exit code, message, no traceback."""
    runs = {
        "analysed": (Case("video", []), 0),
        "truncated": (Case("video", [("truncate", 0.5)]), 2),
        "no face": (Case("noise", []), 3),
        "8K frames": (Case("video_8k", []), 2),
        "absurd NumberOfFrames": (Case("video", [("frames", b"2147483647")]), 2),
    }
    procs = {}
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACESYM_")}
    for name, (case, _) in runs.items():
        path = materialize(case, seeds, tmp_path / f"{name.replace(' ', '_')}.dcm")
        procs[name] = subprocess.Popen([sys.executable, "-m", "service.cli", "analyze", str(path), "--json",
                                        str(path.with_suffix(".json"))], cwd=ROOT, env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        expected = runs[name][1]
        assert proc.returncode == expected, f"{name}: exit {proc.returncode}\n{out}\n{err[-2000:]}"
        problem = _check_outcome(proc.returncode, out + err,
                                 tmp_path / f"{name.replace(' ', '_')}.json")
        assert not problem, f"{name}: {problem}\n{out}\n{err[-2000:]}"
        if name == "8K frames":
            assert "max_frame_pixels" in out, out
        if name == "absurd NumberOfFrames":
            assert "max_frames" in out, out


def test_decode_limits_are_settings(seeds: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """FACESYM_MAX_* reach `facesym analyze` (and the service, through Settings.decode_limits)."""
    from service.cli import main
    from service.config import load_settings
    from service.errors import InvalidParameterError

    video = materialize(Case("video"), seeds, tmp_path / "video.dcm")
    for env, value, limit in (("FACESYM_MAX_FRAMES", "10", "max_frames=10"),
                              ("FACESYM_MAX_FRAME_PIXELS", "10000", "max_frame_pixels=10000"),
                              ("FACESYM_MAX_FILE_MB", "0", None)):
        monkeypatch.setenv(env, value)
        if limit is None:
            with pytest.raises(InvalidParameterError, match="max_file_mb"):
                load_settings()
        else:
            assert main(["analyze", str(video)]) == 2
            assert limit in capsys.readouterr().out.replace("\n", "")
        monkeypatch.delenv(env)
    limits = load_settings(env={"FACESYM_MAX_IMAGE_PIXELS": "1234"}).decode_limits
    assert limits.max_image_pixels == 1234 and limits.max_frames == 5400
