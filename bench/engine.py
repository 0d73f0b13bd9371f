"""Engine benchmark: frames/s for decode alone, decode + FaceMesh, and the full analysis, plus peak RSS.

Makes a 10-s 1280×720 phantom clip (three tasks) from the bundled demo face, then times each stage on it.
Prints a table; asserts nothing (timings belong in benchmarks, not tests). Run: `make bench`.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service import phantom  # noqa: E402
from service.domain import Task  # noqa: E402
from service.engine.landmarks import FaceMeshDetector  # noqa: E402
from service.engine.pipeline import EngineParams, analyze_frames  # noqa: E402
from service.media.decode import open_media  # noqa: E402
from service.media.prefetch import prefetch  # noqa: E402


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="facesym-bench-") as tmp:
        clip = Path(tmp) / "bench720.mp4"
        face = phantom.load_face(ROOT / "service/phantom/data/demo_face.jpg", target_eye_distance=150.0,
                                 frame_size=(1280, 720))
        spec = phantom.PhantomSpec(
            motions=(
                phantom.TaskMotion(Task.SMILE, 0.25, 0.1),
                phantom.TaskMotion(Task.EYE_CLOSURE, 0.45, 0.45),
                phantom.TaskMotion(Task.BROW_RAISE, 0.15, 0.15),
            ),
            rest_s=1.0, hold_s=1.6,
        )
        t = time.perf_counter()
        phantom.write_phantom(face, spec, clip)
        make_s = time.perf_counter() - t
        info = open_media(clip).info
        rows = [("make phantom (render + H.264)", info.frames or 0, make_s)]

        t = time.perf_counter()
        n = sum(1 for _ in open_media(clip).frames())
        rows.append(("decode", n, time.perf_counter() - t))

        t = time.perf_counter()
        with FaceMeshDetector(static=False) as det:
            for frame in prefetch(open_media(clip).frames()):
                det.detect(frame.rgb)
        rows.append(("decode + FaceMesh (2 threads)", n, time.perf_counter() - t))

        # A service loads torch and the grader once per process: measured apart, not per clip.
        t = time.perf_counter()
        from service.engine.pipeline import _grader

        _grader(None).predict(np.zeros((96, 478, 2)))
        startup_s = time.perf_counter() - t

        t = time.perf_counter()
        analysis = analyze_frames(prefetch(open_media(clip).frames()), info.fps)
        rows.append(("full analysis (auto, flow, grader)", n, time.perf_counter() - t))

        t = time.perf_counter()
        analyze_frames(prefetch(open_media(clip).frames()), info.fps,
                       params=EngineParams(grader=False, regional_flow=False))
        rows.append(("  without flow and grader", n, time.perf_counter() - t))

    print(f"clip: {info.width}x{info.height}, {n} frames, {info.fps:g} fps ({n / info.fps:.1f} s)")
    print(f"{'stage':34} {'frames':>6} {'seconds':>8} {'frames/s':>9}")
    for name, frames, secs in rows:
        print(f"{name:34} {frames:6d} {secs:8.2f} {frames / secs:9.1f}")
    full, mesh = rows[-2][2], rows[-3][2]
    print(f"full / (decode + FaceMesh) time: {full / mesh:.2f}x;  peak RSS: {rss_mb():.0f} MB;  "
          f"one-time torch + grader start-up: {startup_s:.2f} s")
    print("tasks found:", ", ".join(f"{r.task.value} AI={r.asymmetry_index:.2f}" for r in analysis.tasks))


if __name__ == "__main__":
    main()
