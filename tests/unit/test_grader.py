"""The deep grader's mechanics on hand-made tracks (no MediaPipe): feature shapes and sides, the
synthetic generator, patient-grouped folds, deterministic training, integrity checks, attention."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from synthetic_face import symmetric_face

from service.engine import normalize as nz
from service.engine.grader import features as F
from service.engine.grader import synth
from service.engine.grader.data import load_pairs, save_pairs
from service.errors import FaceSymError, NotAnalysableError


def _brow_clip(left: float, right: float, t: int = 60) -> np.ndarray:
    """(t, 478, 2) normalised tracks: rest, then the left/right brow and forehead rise by left/right D."""
    rest = symmetric_face()
    a = np.clip((np.arange(t) - 15) / 15.0, 0.0, 1.0)
    clip = np.repeat(rest[None], t, axis=0)
    up_l = list(F.BROW + F.FOREHEAD)
    up_r = [int(nz.MIRROR[i]) for i in up_l]
    clip[:, up_l, 1] += left * a[:, None]
    clip[:, up_r, 1] += right * a[:, None]
    return clip


def test_feature_shapes_and_landmark_set() -> None:
    f = F.features_from_norm(_brow_clip(0.1, 0.1, t=50))
    assert f.symmetry.shape == (F.N_CHANNELS, F.N_FRAMES, F.N_PAIRS) == (6, 96, 40)
    assert f.motion.shape == (F.N_FRAMES, 4 * F.N_PAIRS)
    assert f.symmetry.dtype == f.motion.dtype == np.float32
    assert set(F.LEFT_POINTS) <= set(nz.LEFT_HALF)
    assert tuple(int(nz.MIRROR[i]) for i in F.LEFT_POINTS) == F.RIGHT_POINTS
    assert np.all(f.motion[0] == 0)  # frame-to-frame displacement starts at zero


def test_symmetric_movement_gives_a_zero_symmetry_map() -> None:
    f = F.features_from_norm(_brow_clip(0.1, 0.1))
    assert np.abs(f.symmetry[:2]).max() < 1e-6
    assert np.abs(f.symmetry[2:4] - f.symmetry[4:6]).max() < 1e-6


def test_sides_are_the_patients() -> None:
    """The patient's LEFT brow rising more gives dy > 0 at the brow pairs; a mirror image flips dx, dy."""
    clip = _brow_clip(0.1, 0.02)
    clip[:, list(F.BROW), 0] += 0.05  # left brow also shifted toward the patient's left: dx > 0
    f = F.features_from_norm(clip)
    brow = slice(0, len(F.BROW))
    assert f.symmetry[1, -1, brow].min() > 0  # dy at the end: left higher
    assert f.symmetry[0, -1, brow].min() > 0
    assert f.symmetry[3, -1, brow].mean() > 4 * f.symmetry[5, -1, brow].mean()  # left motion > right
    pairs = F.pair_tracks(clip)
    g = F.extract(F.swap_sides(pairs))
    np.testing.assert_allclose(g.symmetry[0], -f.symmetry[0], atol=1e-5)
    np.testing.assert_allclose(g.symmetry[1], -f.symmetry[1], atol=1e-5)
    np.testing.assert_allclose(g.symmetry[2:4], f.symmetry[4:6], atol=1e-5)  # the two motions swap


def test_missing_frames_are_filled_and_a_faceless_clip_is_refused() -> None:
    clip = _brow_clip(0.1, 0.05)
    clip[[0, 10, 11, 59]] = np.nan
    f = F.features_from_norm(clip)
    assert np.isfinite(f.symmetry).all() and np.isfinite(f.motion).all()
    clip[1:] = np.nan
    with pytest.raises(NotAnalysableError):
        F.features_from_norm(clip)


def test_grade_bands() -> None:
    assert [synth.grade_of_fraction(f) for f in (1.0, 0.95, 0.8, 0.5, 0.3, 0.1, 0.01, 0.0)] == [
        "I", "I", "II", "III", "IV", "V", "VI", "VI"
    ]
    rng = np.random.default_rng(0)
    for g in synth.HB_CLASSES:
        assert synth.grade_of_fraction(synth.draw_fraction(g, rng)) == g


def test_make_palsy_weakens_the_chosen_side_and_droops_it_at_rest() -> None:
    pairs = F.pair_tracks(_brow_clip(0.12, 0.12))
    still = synth.Jitter(
        amplitude=(1.0, 1.0), shape=(1.0, 1.0), length=(1.0, 1.0), warp=0.0, extra_rest=0, tail_cut=0.0,
        roll_deg=0.0, scale=0.0, shift_d=0.0, noise_d=(0.0, 0.0),
    )
    rng = np.random.default_rng(1)
    out = synth.make_palsy(pairs, 10, grade="VI", task="brow_raise", rng=rng, weaker=1, jitter=still)
    assert out.shape == pairs.shape
    brow = slice(0, len(F.BROW))
    lift_l = out[-1, 0, brow, 1] - out[0, 0, brow, 1]
    lift_r = out[-1, 1, brow, 1] - out[0, 1, brow, 1]
    assert lift_l.mean() > 0.1
    assert lift_r.mean() < 0.05 + synth.LEAK_MAX["brow_raise"] * 0.12  # fraction < 0.05 plus leak
    assert out[0, 1, brow, 1].mean() < out[0, 0, brow, 1].mean() - 0.02  # droop of the weaker (right) brow
    grade_i = synth.make_palsy(pairs, 10, grade="I", task="brow_raise", rng=rng, jitter=still)
    assert np.abs(grade_i[0] - pairs[0]).max() < 1e-9  # no droop for grade I; renormalising is the identity


def _write_tiny_set(tmp: Path, n_per_class: int = 3) -> Path:
    """Synthetic rows from the hand-made face: three "patients" (face seeds)."""
    rng = np.random.default_rng(0)
    manifest = tmp / "m.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "task", "grade", "patient_id"])
        k = 0
        for g in synth.HB_CLASSES:
            for j in range(n_per_class):
                base = F.pair_tracks(_brow_clip(0.12, 0.12, t=40))
                seq = synth.make_palsy(base, 10, grade=g, task="brow_raise", rng=rng)
                save_pairs(tmp / f"r{k}.npz", seq, synthetic=True)
                w.writerow([f"r{k}.npz", "brow_raise", g, f"p{j % 3}"])
                k += 1
    return manifest


def test_rows_round_trip(tmp_path: Path) -> None:
    pairs = F.pair_tracks(_brow_clip(0.1, 0.0))
    save_pairs(tmp_path / "a.npz", pairs, synthetic=True)
    back, synthetic = load_pairs(tmp_path / "a.npz")
    assert synthetic and back.shape == pairs.shape
    np.testing.assert_allclose(back, pairs, atol=1e-6)
    np.savez(tmp_path / "b.npz", norm=_brow_clip(0.1, 0.0))
    back, synthetic = load_pairs(tmp_path / "b.npz")
    assert not synthetic
    np.testing.assert_allclose(back, pairs, atol=1e-12)


def test_group_folds_keep_patients_together_and_are_seeded() -> None:
    from service.engine.grader.train import group_folds

    groups = [f"p{i % 7}" for i in range(50)]
    folds = group_folds(groups, 3, seed=4)
    assert set(folds) == {0, 1, 2}
    for g in set(groups):
        assert len({folds[i] for i in range(50) if groups[i] == g}) == 1
    assert np.array_equal(folds, group_folds(groups, 3, seed=4))
    with pytest.raises(FaceSymError):
        group_folds(["a", "a"], 2, seed=0)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_training_is_deterministic_and_inference_checks_integrity(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from service.engine.grader.infer import Grader, ModelIntegrityError
    from service.engine.grader.train import train

    manifest = _write_tiny_set(tmp_path)
    a = train(manifest, tmp_path / "a", version="0.0.1", seed=3, epochs=1, folds=3)
    b = train(manifest, tmp_path / "b", version="0.0.1", seed=3, epochs=1, folds=3)
    for name in ("weights.pt", "metadata.json", "metrics.json", "model_card.md", "SHA256SUMS"):
        assert (a / name).is_file()
        assert _sha(a / name) == _sha(b / name), name
    c = train(manifest, tmp_path / "c", version="0.0.1", seed=4, epochs=1, folds=3)
    assert _sha(c / "weights.pt") != _sha(a / "weights.pt")

    sums: dict[str, str] = {}
    for line in (a / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ")
        sums[name] = digest
    assert set(sums) == {"weights.pt", "metadata.json", "metrics.json", "model_card.md"}
    assert all(_sha(a / n) == h for n, h in sums.items())
    card = (a / "model_card.md").read_text()
    assert "NOT diagnose" in card and "synthetic" in card

    grader = Grader.load(a)
    assert grader.trained_on == "synthetic" and grader.version == "0.0.1"
    res = grader.predict(_brow_clip(0.12, 0.0))
    assert list(res.probabilities) == list(synth.HB_CLASSES)
    assert abs(sum(res.probabilities.values()) - 1) < 1e-9
    assert len(res.attention) == F.N_FRAMES and abs(sum(res.attention) - 1) < 1e-6
    assert res.label in synth.HB_CLASSES and res.to_json()["trained_on"] == "synthetic"

    weights = a / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="weights.pt"):
        Grader.load(a)
    (a / "SHA256SUMS").unlink()
    with pytest.raises(ModelIntegrityError, match="SHA256SUMS"):
        Grader.load(a)


def test_attention_sums_to_one_and_model_is_small() -> None:
    torch = pytest.importorskip("torch")
    from service.engine.grader.model import GraderNet, ModelConfig

    cfg = ModelConfig(6, F.N_CHANNELS, F.N_PAIRS, F.N_FRAMES, F.MOTION_FEATURES)
    net = GraderNet(cfg).eval()
    torch.manual_seed(0)
    sym = torch.randn(3, F.N_CHANNELS, F.N_FRAMES, F.N_PAIRS)
    logits, att = net(sym, torch.randn(3, F.N_FRAMES, F.MOTION_FEATURES))
    assert logits.shape == (3, 6) and att.shape == (3, 96)
    torch.testing.assert_close(att.sum(dim=1), torch.ones(3))
    assert sum(p.numel() for p in net.parameters()) < 500_000
