"""Regional optical-flow symmetry on phantoms, with crops and landmarks made the way the pipeline makes them
(FaceMesh in video mode + CropStore): motion on one side only scores lower than symmetric motion, a real
clip with one half frozen scores lower than the clip itself, and head motion alone leaves SS >= 0.9."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from service import phantom
from service.domain import Side, Task
from service.engine import flow as fl
from service.engine.landmarks import FaceMeshDetector
from service.engine.pixels import CropStore
from service.media.decode import open_media
from service.media.encode import write_mp4

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DEMO_FACE = ROOT / "service/phantom/data/demo_face.jpg"


def crops_and_landmarks(path: Path) -> tuple[list[np.ndarray | None], np.ndarray]:
    """What the pipeline's landmark pass keeps: the CropStore crops and every frame's landmarks in crop px."""
    store = CropStore()
    points = []
    with FaceMeshDetector(static=False) as det:
        for frame in open_media(path).frames():
            pts, faces = det.detect(frame.rgb)
            one = pts if faces == 1 else None
            store.add(frame.rgb, one)
            points.append(one if one is not None else np.full((478, 3), np.nan, np.float32))
    return store.crops, store.to_crop(np.stack(points))


def symmetry(path: Path) -> dict[str, fl.RegionSymmetry]:
    crops, lm = crops_and_landmarks(path)
    return {r.region: r for r in fl.regional_symmetry(crops, lm, 0, len(crops) - 1)}


@pytest.fixture(scope="module")
def face() -> phantom.SourceFace:
    return phantom.load_face(DEMO_FACE)


@pytest.fixture(scope="module")
def smiles(face: phantom.SourceFace, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = {}
    tmp = tmp_path_factory.mktemp("flow_smiles")
    for name, (left, right) in {"symmetric": (0.25, 0.25), "left_only": (0.25, 0.0)}.items():
        clip = tmp / f"smile_{name}.mp4"
        spec = phantom.PhantomSpec(motions=(phantom.TaskMotion(Task.SMILE, left, right),))
        phantom.write_phantom(face, spec, clip)
        out[name] = symmetry(clip)
    return out


def test_one_sided_smile_scores_lower_than_a_symmetric_one(smiles: dict[str, dict]) -> None:
    sym, one = smiles["symmetric"]["cheek"], smiles["left_only"]["cheek"]
    assert one.symmetry_score < sym.symmetry_score - 0.2, (one, sym)
    assert sym.symmetry_score >= 0.8, sym
    # The moving side is the patient's left, and the still right side barely registers.
    assert one.left > 5 * one.right, one
    # A smile is not a brow raise: the forehead stays symmetric in both.
    for res in smiles.values():
        assert res["forehead"].symmetry_score >= 0.95


def test_frozen_half_scores_lower_than_the_real_clip(faces_dir: Path, tmp_path: Path) -> None:
    original = faces_dir / "single_face.mp4"
    frozen = tmp_path / "frozen_left.mp4"
    truth = phantom.freeze_half(original, Side.LEFT, frozen)
    assert truth["frozen_side"] == "left"
    real, half = symmetry(original)["cheek"], symmetry(frozen)["cheek"]
    assert half.symmetry_score < real.symmetry_score - 0.2, (half, real)
    assert real.symmetry_score >= 0.8, real
    # The frozen side is the still one.
    assert half.left < 0.2 * half.right, half


def test_head_motion_alone_leaves_every_region_symmetric(face: phantom.SourceFace, tmp_path: Path) -> None:
    """A still photo translated, rotated and scaled over the frames: the head moves, the face does not."""
    h, w = face.rgb.shape[:2]
    centre = (w / 2.0, h / 2.0)
    frames = []
    n = 60
    for t in range(n):
        a = np.sin(2 * np.pi * t / n)
        m = np.asarray(cv2.getRotationMatrix2D(centre, 6.0 * a, 1.0 + 0.03 * a), np.float64)
        m[:, 2] += (15.0 * a, 8.0 * np.sin(4 * np.pi * t / n))
        moved = cv2.warpAffine(face.rgb, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        frames.append(moved)
    clip = write_mp4(frames, tmp_path / "rigid.mp4", 30.0)
    res = symmetry(clip)
    for r in res.values():
        assert r.symmetry_score >= 0.9, r
