"""The SHIPPED grader on phantoms made with FaceMesh, and a tiny end-to-end training run."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest

from service import phantom
from service.domain import Task

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")

from service.engine.grader import synth  # noqa: E402
from service.engine.grader.data import pairs_from_points, read_track_cache, save_pairs, track_clip  # noqa: E402
from service.engine.grader.infer import Grader, GradeResult, default_model_dir  # noqa: E402
from service.engine.grader.train import train  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def grader() -> Grader:
    return Grader.load(default_model_dir())


@pytest.fixture(scope="module")
def face() -> phantom.SourceFace:
    return phantom.load_face(REPO / "service/phantom/data/demo_face.jpg")


def _grade(grader: Grader, face: phantom.SourceFace, motion: phantom.TaskMotion, tmp: Path) -> GradeResult:
    clip = tmp / f"{motion.task.value}_{motion.left}_{motion.right}.mp4"
    phantom.write_phantom(face, phantom.PhantomSpec(motions=(motion,)), clip)
    points, _ = track_clip(clip)
    return grader.predict_pairs(pairs_from_points(points))


def test_shipped_model_metadata(grader: Grader) -> None:
    assert grader.trained_on == "synthetic"
    assert grader.classes == synth.HB_CLASSES
    card = (default_model_dir() / "model_card.md").read_text()
    assert "NOT diagnose" in card and "Held-out test set" in card


@pytest.mark.parametrize(
    ("task", "strong", "weak"), [(Task.SMILE, 0.25, 0.02), (Task.BROW_RAISE, 0.12, 0.01)]
)
def test_one_sided_weakness_is_graded_worse_than_symmetric(
    grader: Grader, face: phantom.SourceFace, tmp_path: Path, task: Task, strong: float, weak: float
) -> None:
    sym = _grade(grader, face, phantom.TaskMotion(task, strong, strong), tmp_path)
    weak_l = _grade(grader, face, phantom.TaskMotion(task, strong, weak), tmp_path)
    assert abs(sum(sym.attention) - 1) < 1e-6
    assert weak_l.expected_index > sym.expected_index + 1.0, (sym, weak_l)
    assert weak_l.index > sym.index, (sym.label, weak_l.label)


def test_inference_time(grader: Grader) -> None:
    pairs = read_track_cache()[0][1]
    grader.predict_pairs(pairs)
    t0 = time.perf_counter()
    for _ in range(20):
        grader.predict_pairs(pairs)
    ms = (time.perf_counter() - t0) / 20 * 1000
    print(f"grader inference: {ms:.1f} ms per clip")
    assert ms < 200


def test_tiny_training_run_writes_every_artefact(tmp_path: Path) -> None:
    tracks = [t for t in read_track_cache() if t[0]["split"] == "train"][:12]
    rng = np.random.default_rng(0)
    manifest = tmp_path / "train.csv"
    lines = ["path,task,grade,patient_id"]
    for i, (meta, pairs) in enumerate(tracks):
        grade = synth.HB_CLASSES[i % 6]
        seq = synth.make_palsy(pairs, int(meta["rest"]), grade=grade, task=str(meta["task"]), rng=rng)  # type: ignore[call-overload]
        save_pairs(tmp_path / f"{i}.npz", seq, synthetic=True)
        lines.append(f"{i}.npz,{meta['task']},{grade},p{i % 3}")
    manifest.write_text("\n".join(lines) + "\n")
    out = train(manifest, tmp_path / "models", version="9.9.9", epochs=1, folds=2)
    assert out == tmp_path / "models" / "facesym-grader" / "9.9.9"
    sums = {}
    for line in (out / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ")
        sums[name] = digest
    assert set(sums) == {"weights.pt", "metadata.json", "metrics.json", "model_card.md"}
    for name, digest in sums.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    assert Grader.load(out).version == "9.9.9"
