"""The grader's only I/O besides its weights: reading training rows as pair tracks.

A row of a training manifest names either a media file (video clip or DICOM video: FaceMesh runs on it
here, through :func:`service.media.decode.open_media`, :class:`~service.engine.landmarks.FaceMeshDetector`
and :func:`~service.engine.normalize.normalize`) or an ``.npz`` of landmark tracks holding one of:

* ``pairs`` (T, 2, P, 2) pair tracks (:func:`features.pair_tracks`) with ``left_points`` (P,) naming
  the landmarks, which must equal the grader's :data:`features.LEFT_POINTS`;
* ``norm`` (T, 478, 2) normalised landmarks (x toward the patient's left, y up, unit D);
* ``points`` (T, 478, 2|3) pixel landmarks (x right, y down), normalised here.

NaN frames (no face) are allowed everywhere. An ``.npz`` may carry ``synthetic`` (bool) to say it is
generated data; the model's metadata says ``trained_on: synthetic`` only when every row does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.engine import normalize as nz
from service.engine.grader import features as F
from service.errors import NotAnalysableError, UnreadableInputError


def track_clip(path: str | Path, *, mirrored: bool = False) -> tuple[np.ndarray, float]:
    """FaceMesh landmarks of every frame of a clip: ((T, 478, 3) float32 px, NaN where not exactly one
    face), fps)."""
    from service.engine.landmarks import N_LANDMARKS, FaceMeshDetector
    from service.media.decode import open_media

    src = open_media(path, mirrored=mirrored)
    if src.info.kind != "video":
        raise NotAnalysableError([f"{path}: the grader needs a video, got a still image"])
    out: list[np.ndarray] = []
    with FaceMeshDetector(static=False) as det:
        for frame in src.frames():
            pts, faces = det.detect(frame.rgb)
            ok = pts is not None and faces == 1
            out.append(pts if ok and pts is not None else np.full((N_LANDMARKS, 3), np.nan, np.float32))
    if not out:
        raise NotAnalysableError([f"{path}: no frames"])
    return np.stack(out), float(src.info.fps)


def pairs_from_points(points: np.ndarray) -> np.ndarray:
    """Pair tracks (T, 2, P, 2) from pixel landmarks (T, 478, 2|3)."""
    norm, _ = nz.normalize(np.asarray(points, dtype=np.float64))
    return F.pair_tracks(norm)


def load_pairs(path: str | Path) -> tuple[np.ndarray, bool]:
    """Pair tracks (T, 2, P, 2) float64 of one manifest row, and whether the row is synthetic."""
    p = Path(path)
    if not p.is_file():
        raise UnreadableInputError(f"training file not found: {p}")
    if p.suffix.lower() != ".npz":
        points, _ = track_clip(p)
        return pairs_from_points(points), False
    try:
        with np.load(p, allow_pickle=False) as z:
            synthetic = bool(z["synthetic"]) if "synthetic" in z.files else False
            if "pairs" in z.files:
                left = tuple(int(i) for i in z["left_points"]) if "left_points" in z.files else None
                if left != F.LEFT_POINTS:
                    raise UnreadableInputError(
                        f"{p}: 'pairs' were made for another landmark set "
                        "(left_points differ from the grader's)"
                    )
                pairs = np.asarray(z["pairs"], dtype=np.float64)
            elif "norm" in z.files:
                pairs = F.pair_tracks(np.asarray(z["norm"], dtype=np.float64))
            elif "points" in z.files:
                pairs = pairs_from_points(z["points"])
            else:
                raise UnreadableInputError(f"{p}: an .npz row needs 'pairs', 'norm' or 'points'")
    except (OSError, ValueError, KeyError) as exc:
        raise UnreadableInputError(f"cannot read {p}: {exc}") from exc
    if pairs.ndim != 4 or pairs.shape[1:] != (2, F.N_PAIRS, 2):
        raise UnreadableInputError(f"{p}: pair tracks have shape {pairs.shape}")
    return pairs, synthetic


def save_pairs(path: str | Path, pairs: np.ndarray, *, synthetic: bool) -> None:
    """Write one row's pair tracks as an ``.npz`` :func:`load_pairs` reads (float32, compressed)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".part.npz")
    np.savez_compressed(
        tmp,
        pairs=np.asarray(pairs, dtype=np.float32),
        left_points=np.asarray(F.LEFT_POINTS, dtype=np.int16),
        synthetic=np.asarray(synthetic),
    )
    tmp.replace(p)


def default_track_cache() -> Path:
    """The committed cache of real landmark tracks the synthetic data is made from."""
    return Path(__file__).resolve().parents[3] / "models" / "grader" / "data" / "tracks.npz"


def read_track_cache(path: str | Path | None = None) -> list[tuple[dict[str, object], np.ndarray]]:
    """The tracks in a cache written by ``scripts/make_grader_data.py --tracks``.

    Returns one (metadata, pair tracks (T, 2, P, 2) float64) per track; metadata keys: face, person,
    task, kind ("phantom" | "real" | "freeze_half"), fraction (the weaker side's rendered motion
    fraction; 1.0 symmetric), weaker (-1 none, 0 left, 1 right), split ("train" | "test"), rest (frames
    at rest at the start), amplitude. Storage: int16 steps of ``quant`` D, first frame absolute, then
    frame-to-frame differences, all tracks concatenated (``offsets``).
    """
    p = Path(path) if path is not None else default_track_cache()
    try:
        with np.load(p, allow_pickle=False) as z:
            if tuple(int(i) for i in z["left_points"]) != F.LEFT_POINTS:
                raise UnreadableInputError(
                    f"{p} was made for another landmark set: re-run make_grader_data.py --tracks"
                )
            q, off, quant = z["q"], z["offsets"], float(z["quant"])
            cols = {k[5:]: z[k] for k in z.files if k.startswith("meta_")}
    except (OSError, KeyError, ValueError) as exc:
        raise UnreadableInputError(f"cannot read track cache {p}: {exc}") from exc
    out = []
    for i in range(len(off) - 1):
        pairs = np.cumsum(q[off[i] : off[i + 1]].astype(np.int64), axis=0) * quant
        out.append(({k: v[i].item() for k, v in cols.items()}, pairs))
    return out
