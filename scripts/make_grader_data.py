"""Make the grader's synthetic training data (and, with --model, train the shipped model).

Stage 1, ``--tracks`` (FaceMesh, minutes): real landmark tracks, cached compactly in
``models/grader/data/tracks.npz`` (committed; regenerate with this script, deterministic in its draws):

* warp phantoms (:mod:`service.phantom`) of each task on several faces: the demo face
  (``service/phantom/data/demo_face.jpg``), a neutral frame of ``face_noface.mov`` (same man), the
  scikit-image astronaut and matplotlib's Grace Hopper, each also mirrored (a mirror image is a
  different face to FaceMesh) - "persons" man, astronaut, hopper for patient-grouped splits;
  per face and task, symmetric renders (both sides the same amplitude) and image-space palsy renders
  (the weaker side at a fraction from each grade II-VI's band, labelled by that fraction);
* the real clip ``single_face.mp4`` (healthy smile), as recorded and mirrored, and its half-frozen
  copies (:func:`service.phantom.freeze_half`, left and right: an image-space grade VI smile).

Timings, amplitudes (strong side: smile 0.15-0.30 D, brow raise 0.06-0.14 D, eye closure 0.30-0.50) and
weaker sides are drawn from a seeded generator. Test renders (split "test") are separate renders of the
four unmirrored faces, never used for training.

Stage 2 (default, seconds): tracks in which FaceMesh did not follow the movement (the moving side's
task region moved less than :data:`MIN_SEEN_MOTION_D`) are dropped; palsy sequences are made from the
rest (:func:`service.engine.grader.synth.make_palsy`), one ``.npz`` per row, and ``train.csv`` /
``test.csv`` manifests (path, task, grade, patient_id) in --out.

``--model VERSION`` then trains on train.csv with ``test.csv`` as held-out test set and writes
``models/facesym-grader/VERSION/``.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.engine.grader import features as F  # noqa: E402
from service.engine.grader import synth  # noqa: E402

CACHE = REPO / "models/grader/data/tracks.npz"
FACES = REPO.parent / "shared/data/faces"
QUANT = 1e-4  # D per int16 step in the cache
TASKS = ("smile", "eye_closure", "brow_raise")
AMPLITUDE = {"smile": (0.15, 0.30), "eye_closure": (0.30, 0.50), "brow_raise": (0.06, 0.14)}
PALSY_GRADES = ("II", "III", "IV", "V", "VI")


@dataclass(frozen=True)
class Job:
    """One phantom render: which face, task, amplitudes and timing."""

    face: str
    person: str
    flipped: bool
    task: str
    left: float
    right: float
    fraction: float
    weaker: int  # -1 none, 0 left, 1 right
    split: str
    timing: tuple[float, float, float, float]


def _face_sources() -> dict[str, tuple[str, object]]:
    """name -> (person, loader argument)."""
    import matplotlib.cbook as cbook
    import skimage

    out: dict[str, tuple[str, object]] = {
        "demo_face": ("man", REPO / "service/phantom/data/demo_face.jpg"),
        "astronaut": ("astronaut", Path(skimage.__file__).parent / "data/astronaut.png"),
    }
    hopper = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    out["grace_hopper"] = ("hopper", hopper)
    out["mov_frame0"] = ("man", FACES / "face_noface.mov")
    return out


def _load_face(name: str, flipped: bool) -> Any:
    import cv2

    from service import phantom
    from service.media.decode import open_media

    person, src = _face_sources()[name]
    if name == "mov_frame0":
        rgb = next(iter(open_media(str(src)).frames())).rgb
    else:
        bgr = cv2.imread(str(src), cv2.IMREAD_COLOR)
        rgb = np.ascontiguousarray(bgr[..., ::-1])
    if flipped:
        rgb = np.ascontiguousarray(rgb[:, ::-1])
    return phantom.load_face(rgb)


_FACE_CACHE: dict[tuple[str, bool], object] = {}


def _render(job: Job) -> tuple[Job, np.ndarray, int]:
    """FaceMesh pair tracks of one phantom render, and its number of rest frames."""
    from service import phantom
    from service.domain import Task
    from service.engine.grader.data import pairs_from_points
    from service.engine.landmarks import FaceMeshDetector

    key = (job.face, job.flipped)
    if key not in _FACE_CACHE:
        _FACE_CACHE[key] = _load_face(job.face, job.flipped)
    face = _FACE_CACHE[key]
    rest_s, ramp_s, hold_s, tail_s = job.timing
    spec = phantom.PhantomSpec(
        motions=(phantom.TaskMotion(Task(job.task), job.left, job.right),),
        rest_s=rest_s,
        ramp_s=ramp_s,
        hold_s=hold_s,
        tail_s=tail_s,
    )
    ph = phantom.render(face, spec)  # type: ignore[arg-type]
    pts = []
    with FaceMeshDetector(static=False) as det:
        for rgb in ph.frames():
            p, n = det.detect(rgb)
            pts.append(p if p is not None and n == 1 else np.full((478, 3), np.nan, np.float32))
    rest = ph.truth["tasks"][0]["rest_frames"][1] + 1
    return job, pairs_from_points(np.stack(pts)), int(rest)


def _jobs(seed: int) -> list[Job]:
    rng = np.random.default_rng(seed)
    jobs: list[Job] = []
    for name, (person, _) in _face_sources().items():
        for flipped in (False, True):
            for task in TASKS:
                plan = [("train", "I"), ("train", "I")] + [("train", g) for g in PALSY_GRADES]
                if not flipped:
                    plan += [("test", "I")] + [("test", g) for g in PALSY_GRADES]
                for split, grade in plan:
                    amp = float(rng.uniform(*AMPLITUDE[task]))
                    f = 1.0 if grade == "I" else synth.draw_fraction(grade, rng)
                    weaker = -1 if grade == "I" else int(rng.integers(2))
                    left = amp * f if weaker == 0 else amp
                    right = amp * f if weaker == 1 else amp
                    timing = (
                        float(rng.uniform(0.5, 1.0)),
                        float(rng.uniform(0.25, 0.5)),
                        float(rng.uniform(0.5, 1.2)),
                        float(rng.uniform(0.3, 0.8)),
                    )
                    jobs.append(Job(name, person, flipped, task, left, right, f, weaker, split, timing))
    return jobs


def _real_tracks() -> list[tuple[dict[str, object], np.ndarray]]:
    from service.engine.grader.data import pairs_from_points, track_clip
    from service.phantom import freeze_half

    clip = FACES / "single_face.mp4"
    out = []
    for mirrored in (False, True):
        pts, _ = track_clip(clip, mirrored=mirrored)
        meta = {"face": "single_face.mp4" + (" mirrored" if mirrored else ""), "kind": "real", "weaker": -1,
                "fraction": 1.0}
        out.append((meta, pairs_from_points(pts)))
    with tempfile.TemporaryDirectory() as tmp:
        for side, w in (("left", 0), ("right", 1)):
            path = Path(tmp) / f"frozen_{side}.mp4"
            freeze_half(clip, side, path)
            pts, _ = track_clip(path)
            meta = {"face": f"single_face.mp4 {side} half frozen", "kind": "freeze_half", "weaker": w,
                    "fraction": 0.0}
            out.append((meta, pairs_from_points(pts)))
    return out


def make_tracks(seed: int, workers: int) -> None:
    t0 = time.time()
    jobs = _jobs(seed)
    print(f"{len(jobs)} phantom renders on {workers} workers ...", flush=True)
    rows: list[tuple[dict[str, object], np.ndarray]] = []
    with ProcessPoolExecutor(workers) as pool:
        for k, (job, pairs, rest) in enumerate(pool.map(_render, jobs, chunksize=4), 1):
            meta = {
                "face": job.face + (" mirrored" if job.flipped else ""),
                "person": job.person,
                "task": job.task,
                "kind": "phantom",
                "fraction": job.fraction,
                "weaker": job.weaker,
                "split": job.split,
                "rest": rest,
                "amplitude": max(job.left, job.right),
            }
            rows.append((meta, pairs))
            if k % 20 == 0:
                print(f"  {k}/{len(jobs)} ({time.time() - t0:.0f} s)", flush=True)
    for meta, pairs in _real_tracks():
        meta.update(person="man", task="smile", split="train", rest=8, amplitude=np.nan)
        rows.append((meta, pairs))
    _write_cache(rows)
    size = CACHE.stat().st_size / 1e6
    print(f"wrote {CACHE} ({size:.2f} MB, {len(rows)} tracks) in {time.time() - t0:.0f} s")


def _write_cache(rows: list[tuple[dict[str, object], np.ndarray]]) -> None:
    qs, offsets = [], [0]
    for _, pairs in rows:
        full = F.fill_and_resample(pairs, len(pairs))  # no gaps in the cache
        q = np.round(full / QUANT).astype(np.int32)
        d = np.diff(q, axis=0, prepend=np.zeros_like(q[:1]))  # first frame absolute, then deltas
        qs.append(d.astype(np.int16))
        offsets.append(offsets[-1] + len(q))
    cols = {k: np.asarray([m[k] for m, _ in rows]) for k in rows[0][0]}
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    tmp = CACHE.with_name("tracks.part.npz")
    np.savez_compressed(
        tmp,
        q=np.concatenate(qs),
        offsets=np.asarray(offsets, np.int64),
        left_points=np.asarray(F.LEFT_POINTS, np.int16),
        quant=np.asarray(QUANT),
        **{f"meta_{k}": v for k, v in cols.items()},
    )
    tmp.replace(CACHE)


def read_cache(path: Path = CACHE) -> list[tuple[dict[str, object], np.ndarray]]:
    from service.engine.grader.data import read_track_cache

    return read_track_cache(path)


# ------------------------------------------------------------------------------------------ stage 2
SYM_PLAN = ("I",) * 6 + ("II", "III", "IV", "V", "VI") * 2
PALSY_DRAWS = 6
TEST_SYM_PLAN = ("I",) * 2 + ("II", "III", "IV", "V", "VI") * 2
TEST_PALSY_DRAWS = 2
#: A render is dropped when FaceMesh did not follow the movement: the moving side's task region moved
#: less than this (D; 95th percentile over frames of the region's mean displacement from rest).
MIN_SEEN_MOTION_D = {"smile": 0.04, "eye_closure": 0.01, "brow_raise": 0.02}


def seen_motion(pairs: np.ndarray, task: str, rest: int, side: int | None) -> float:
    """How far FaceMesh saw the moving side's task region move (D); side None = the larger of both."""
    regions = {"smile": ("perioral",), "eye_closure": ("periocular",), "brow_raise": ("brow", "forehead")}
    idx: list[int] = []
    start = 0
    for name, pts in F.REGIONS.items():
        if name in regions[task]:
            idx += list(range(start, start + len(pts)))
        start += len(pts)
    # FaceMesh's first frames (detection before tracking) are skipped
    base = np.median(pairs[3 : max(rest, 4)], axis=0)
    move = np.linalg.norm(pairs[3:] - base, axis=-1)[:, :, idx].mean(axis=-1)  # (T, 2)
    peak = np.percentile(move, 95, axis=0)
    return float(peak.max() if side is None else peak[side])


def make_sequences(out: Path, seed: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    tracks = read_cache()
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows").mkdir(exist_ok=True)
    from service.engine.grader.data import save_pairs

    manifests = {"train": out / "train.csv", "test": out / "test.csv"}
    writers = {}
    files = {}
    for split, path in manifests.items():
        files[split] = path.open("w", newline="")
        writers[split] = csv.writer(files[split])
        writers[split].writerow(["path", "task", "grade", "patient_id"])
    n = 0
    dropped: list[str] = []
    for i, (meta, pairs) in enumerate(tracks):
        split = str(meta["split"])
        task = str(meta["task"])
        rest = int(meta["rest"])  # type: ignore[call-overload]
        base_weaker = int(meta["weaker"])  # type: ignore[call-overload]
        moving = None if base_weaker < 0 else 1 - base_weaker
        if seen_motion(pairs, task, rest, moving) < MIN_SEEN_MOTION_D[task]:
            dropped.append(str(meta["face"]) + " " + task)
            continue
        if base_weaker < 0:  # healthy, symmetric movement: attenuate landmarks
            plan = SYM_PLAN if split == "train" else TEST_SYM_PLAN
            draws: list[tuple[str, float | None, int | None]] = [(g, None, None) for g in plan]
        else:  # image-space palsy: the weakness is in the pixels already
            g = synth.grade_of_fraction(float(meta["fraction"]))  # type: ignore[arg-type]
            k = PALSY_DRAWS if split == "train" else TEST_PALSY_DRAWS
            draws = [(g, 1.0, base_weaker)] * k
        for j, (grade, fraction, weaker) in enumerate(draws):
            seq = synth.make_palsy(
                pairs, rest, grade=grade, task=task, rng=rng, fraction=fraction, weaker=weaker
            )
            name = f"rows/{split}_{i:03d}_{j:02d}.npz"
            save_pairs(out / name, seq, synthetic=True)
            writers[split].writerow([name, task, grade, meta["person"]])
            n += 1
    for fh in files.values():
        fh.close()
    print(f"dropped {len(dropped)} tracks where FaceMesh did not follow the movement: {dropped}")
    print(f"wrote {n} sequences and {', '.join(str(p) for p in manifests.values())}")
    return manifests["train"], manifests["test"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracks", action="store_true", help="re-run FaceMesh and rewrite the track cache")
    ap.add_argument("--out", type=Path, default=REPO / "build/grader-synth", help="sequences + manifests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model", metavar="VERSION", help="then train models/facesym-grader/VERSION")
    ap.add_argument("--epochs", type=int, default=12)
    args = ap.parse_args()
    if args.tracks or not CACHE.exists():
        make_tracks(args.seed, args.workers)
    train_csv, test_csv = make_sequences(args.out, args.seed)
    if args.model:
        from service.engine.grader.train import train

        t0 = time.time()
        last = [-1]

        def progress(stage: str, done: int, total: int) -> None:
            pct = int(100 * done / max(total, 1))
            if pct // 5 != last[0]:
                last[0] = pct // 5
                print(f"  {stage}: {done}/{total} ({time.time() - t0:.0f} s)", flush=True)

        path = train(
            train_csv,
            REPO / "models",
            version=args.model,
            seed=args.seed,
            epochs=args.epochs,
            progress=progress,
            test_manifest=test_csv,
        )
        print(f"trained {path} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
