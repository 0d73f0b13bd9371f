"""Half-face freeze phantoms (the seed paper's method): a real clip with one side of the face held still.

Every frame's ``side`` half of the face is replaced by the first frame's pixels, so that half cannot
move and the analysis must report it as the weaker side. Sides are the PATIENT's: freezing the left
half replaces pixels on the image's right of the facial midline (DESIGN.md, "Sides and coordinates").

With an ``amplitude`` between 0 and 1 the half is not frozen but keeps that fraction of its motion (a
partial palsy on real video): each frame's half is resampled part of the way back toward the first frame
along the dense optical flow first frame → this frame. That is first order and only as good as the flow:
where the mouth opens and teeth appear the flow is unreliable, so the imposed amplitude is approximate
(on ``single_face.mp4`` a half at 0.5 reads ~0.35 of its unscaled motion, at 0.2 ~0.1–0.2). In the
image's frame that also scales the head's own motion on that half, which no palsy does, and an engine
that removes the head's motion then reads both sides off; ``in_head_frame`` keeps the head's motion whole
and scales only the expression's (:func:`freeze_frames_in_head_frame`).
"""

from __future__ import annotations

import json
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from service.domain import Side
from service.engine.normalize import FACE_OVAL
from service.errors import InvalidParameterError, NotAnalysableError, UnreadableInputError
from service.phantom import motion as mfields


def freeze_mask(
    shape: tuple[int, int],
    landmarks: np.ndarray,
    side: Side | str,
    *,
    dilate: float = 1.15,
    feather_px: float = 4.0,
) -> np.ndarray:
    """Blend weight of the frozen region: 1 inside, 0 outside, a ramp of ``feather_px`` at its edges.

    The region is the face-oval polygon scaled by ``dilate`` about its centroid, cut by the midline
    ``x = a + b y`` fitted through landmarks 10, 168, 6, 1, 152, keeping the PATIENT's ``side`` (left =
    image right). The ramp lies inside the region, so pixels where the weight is 1 are exactly the
    reference frame's.

    Parameters
    ----------
    shape
        (height, width) of the frames.
    landmarks
        (478, 2 or 3) pixels, detected on the reference frame.

    Returns
    -------
    np.ndarray
        (H, W) float32 in [0, 1].
    """
    side = mfields._check_side(side)
    h, w = shape
    xy = np.asarray(landmarks, dtype=np.float64)[:, :2]
    oval = xy[list(FACE_OVAL)]
    c = oval.mean(axis=0)
    poly = np.round(c + dilate * (oval - c)).astype(np.int32)
    region = np.zeros((h, w), np.uint8)
    cv2.fillPoly(region, [poly], (1,))
    a, b = mfields.midline(landmarks)
    yy, xx = np.mgrid[0:h, 0:w]
    off = xx - (a + b * yy)
    half = off > 0 if side is Side.LEFT else off < 0
    region &= half.astype(np.uint8)
    if feather_px <= 0:
        return region.astype(np.float32)
    # Distance to the nearest pixel outside the region: a ramp that reaches 1 feather_px inside.
    dist = cv2.distanceTransform(region, cv2.DIST_L2, 5)
    return np.clip(dist / float(feather_px), 0.0, 1.0).astype(np.float32)


def freeze_frames(
    frames: Iterator[np.ndarray], reference: np.ndarray, mask: np.ndarray
) -> Iterator[np.ndarray]:
    """Blend each (H, W, 3) uint8 frame with ``reference`` by ``mask`` (H, W): mask 1 = reference pixel."""
    m = mask[..., None]
    ref = reference.astype(np.float32)
    full = mask >= 1.0
    for f in frames:
        out = np.rint(ref * m + f.astype(np.float32) * (1.0 - m)).astype(np.uint8)
        out[full] = reference[full]  # exact copies inside the core, whatever the float rounding
        yield out


def scale_frames(
    frames: Iterator[np.ndarray], reference: np.ndarray, mask: np.ndarray, amplitude: float
) -> Iterator[np.ndarray]:
    """Keep ``amplitude`` (0..1) of the motion since ``reference`` where ``mask`` (H, W) is 1, blending to the
    unchanged frame where it is 0: out(y) = frame(y + (1 − amplitude) · F(y)), F the DIS optical flow from
    ``reference`` to the frame (so reference(y) ≈ frame(y + F(y)))."""
    dis = cv2.DISOpticalFlow.create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    ref_gray = cv2.cvtColor(reference, cv2.COLOR_RGB2GRAY)
    h, w = ref_gray.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    m = mask[..., None]
    back = np.float32(1.0 - amplitude)
    for f in frames:
        # The cv2 stubs reject flow=None, which OpenCV accepts (it allocates the output).
        flow = np.asarray(dis.calc(ref_gray, cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), None))  # type: ignore[call-overload]
        moved = cv2.remap(f, xx + back * flow[..., 0], yy + back * flow[..., 1], cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)
        yield np.rint(moved.astype(np.float32) * m + f.astype(np.float32) * (1.0 - m)).astype(np.uint8)


#: Upper-face landmarks outlining where the head's motion is read for a freeze in the head's frame:
#: forehead, temples, brows' upper edge, nasal bridge — still during a smile.
_UPPER_FACE = (10, 109, 338, 67, 297, 103, 332, 54, 284, 21, 251, 70, 300, 105, 334, 168, 6, 197)


def _upper_face_corners(gray: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Shi–Tomasi corners (K, 2) inside the hull of :data:`_UPPER_FACE` (the skin the head carries)."""
    hull = cv2.convexHull(np.round(landmarks[list(_UPPER_FACE), :2]).astype(np.int32))
    mask = np.zeros(gray.shape, np.uint8)
    cv2.fillConvexPoly(mask, hull, (255,))
    pts = cv2.goodFeaturesToTrack(gray, maxCorners=300, qualityLevel=0.005, minDistance=4, mask=mask)
    return np.zeros((0, 2), np.float32) if pts is None else pts.reshape(-1, 2).astype(np.float32)


def head_similarities(
    frames: Iterator[np.ndarray], reference: np.ndarray, ref_landmarks: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each (H, W, 3) frame with the head's 2-D similarity (2×3) from ``reference`` to it.

    The head's motion since ``reference`` is read from the pixels of the upper face (forehead, temples,
    brows, nasal bridge: still during a smile): Shi–Tomasi corners found there in ``reference``
    (``ref_landmarks`` (478, 3) px outline the region) are tracked frame to frame by Lucas–Kanade with a
    forward–backward check, and a RANSAC 2-D similarity reference → frame is fitted. Not FaceMesh's
    landmarks: their fit follows the expression (measured on ``single_face.mp4``: −4 % "scale" at the
    smile's peak). Not the engine's estimator either (corners near the stable landmarks, mesh rotation),
    so the truth does not borrow it. Frames where the fit fails reuse the last motion.
    """
    ref_gray = cv2.cvtColor(reference, cv2.COLOR_RGB2GRAY)
    src = _upper_face_corners(ref_gray, ref_landmarks)
    cur, prev = src.copy(), ref_gray
    alive = np.ones(len(src), bool)
    sim = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    lk = {"winSize": (21, 21), "maxLevel": 3}
    for f in frames:
        gray = cv2.cvtColor(f, cv2.COLOR_RGB2GRAY)
        if alive.sum() >= 6:
            p0 = cur[alive].reshape(-1, 1, 2)
            p1, st1, _ = cv2.calcOpticalFlowPyrLK(prev, gray, p0, None, **lk)  # type: ignore[call-overload]
            p2, st2, _ = cv2.calcOpticalFlowPyrLK(gray, prev, p1, None, **lk)  # type: ignore[call-overload]
            fb = np.linalg.norm((p2 - p0).reshape(-1, 2), axis=1)
            ok = (st1.ravel() == 1) & (st2.ravel() == 1) & (fb < 1.0)
            idx = np.flatnonzero(alive)
            cur[idx[ok]] = p1.reshape(-1, 2)[ok]
            alive[idx[~ok]] = False
            if alive.sum() >= 6:
                fit, _ = cv2.estimateAffinePartial2D(
                    src[alive], cur[alive], method=cv2.RANSAC, ransacReprojThreshold=1.0
                )
                if fit is not None:
                    sim = fit
        prev = gray
        yield f, sim


def freeze_frames_in_head_frame(
    frames: Iterator[np.ndarray],
    reference: np.ndarray,
    mask: np.ndarray,
    ref_landmarks: np.ndarray,
    amplitude: float = 0.0,
) -> Iterator[np.ndarray]:
    """Like :func:`freeze_frames`, but the frozen half moves RIGIDLY WITH THE HEAD, as a palsied half does.

    The head's similarity per frame (:func:`head_similarities`) carries the reference pixels and the mask
    along before blending. With ``amplitude`` in (0, 1) the half keeps that fraction of its motion
    RELATIVE TO THE HEAD (a partial palsy: the head's own motion is kept whole): out(y) =
    frame(y + (1 − amplitude) · G(y)), G the DIS flow from the head-carried reference to the frame, i.e.
    the expression's motion alone (first order, as :func:`scale_frames`).
    """
    h, w = mask.shape
    for f, sim in head_similarities(frames, reference, ref_landmarks):
        ref = cv2.warpAffine(
            reference, sim, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        m = cv2.warpAffine(mask, sim, (w, h), flags=cv2.INTER_LINEAR)
        if amplitude == 0.0:
            yield next(freeze_frames(iter([f]), ref, m))
        else:  # the reference moves with the head, so each frame is scaled against its own
            yield next(scale_frames(iter([f]), ref, m, amplitude))


def decode_clip(path: Path) -> tuple[Generator[np.ndarray, None, None], float, int, int]:
    """(RGB frames cropped to even sizes, as a generator, fps, width, height) of any clip PyAV decodes."""
    import av

    try:
        container = av.open(str(path))
        stream = container.streams.video[0]
    except (av.error.FFmpegError, IndexError) as exc:
        raise UnreadableInputError(f"cannot decode {path} as a video: {exc}") from exc
    fps = float(stream.average_rate or stream.guessed_rate or 30.0)
    # yuv420p output needs even sizes: drop a last odd row/column.
    w, h = stream.codec_context.width // 2 * 2, stream.codec_context.height // 2 * 2

    def gen() -> Generator[np.ndarray, None, None]:
        try:
            for frame in container.decode(video=0):
                yield np.ascontiguousarray(frame.to_ndarray(format="rgb24")[:h, :w])
        finally:
            container.close()

    return gen(), fps, w, h


def freeze_half(
    clip_path: str | Path,
    side: Side | str,
    out_path: str | Path,
    *,
    fmt: str = "mp4",
    dilate: float = 1.15,
    feather_px: float = 4.0,
    amplitude: float = 0.0,
    in_head_frame: bool = False,
    head_motion: Any = None,
) -> dict[str, Any]:
    """Write a copy of a real clip whose ``side`` half of the face is frozen at the first frame (or, with
    ``amplitude`` > 0, keeps only that fraction of its motion; see the module docstring).

    Parameters
    ----------
    clip_path
        Any video PyAV decodes.
    side
        The PATIENT's side to freeze (it becomes the expected weaker side).
    out_path
        Output clip; the truth JSON goes to ``out_path.with_suffix(".json")``.
    fmt
        "mp4" (H.264) or "dicom" (Video Photographic Image wrapping the MP4).
    amplitude
        Fraction of the half's motion kept, in [0, 1): 0 freezes it (exact first-frame pixels).
    in_head_frame
        Freeze the half in the HEAD's frame (it follows the clip's own head motion rigidly,
        :func:`freeze_frames_in_head_frame`) instead of the image's; with ``amplitude`` it keeps that
        fraction of its motion relative to the head (the head's own motion whole).
    head_motion
        A :class:`service.phantom.head.HeadMotionSpec` laid over the result (the frozen half moves with
        the head, as a palsied half does), or None.

    Returns
    -------
    dict
        ``{"kind": "freeze_half", "frozen_side", "amplitude", "expected_weaker_side", "source", "fps",
        "n_frames", "width", "height", "format", "file"}``.
    """
    side = mfields._check_side(side)
    if fmt not in ("mp4", "dicom"):
        raise InvalidParameterError(f"fmt must be 'mp4' or 'dicom', got {fmt!r}")
    if not 0.0 <= amplitude < 1.0:
        raise InvalidParameterError(f"amplitude must be in [0, 1) (0: frozen), got {amplitude}")
    clip_path, out_path = Path(clip_path), Path(out_path)
    frames, fps, w, h = decode_clip(clip_path)
    try:
        first = next(frames)
    except StopIteration:
        raise UnreadableInputError(f"{clip_path} has no video frames") from None
    from service.engine.landmarks import detect_image

    lm = detect_image(first)
    if lm is None:
        frames.close()
        raise NotAnalysableError(["no face"])
    mask = freeze_mask((h, w), lm, side, dilate=dilate, feather_px=feather_px)
    count = [0]

    def all_frames() -> Iterator[np.ndarray]:
        yield first
        yield from frames

    def counted() -> Iterator[np.ndarray]:
        if in_head_frame:
            blended = freeze_frames_in_head_frame(all_frames(), first, mask, lm, amplitude)
        elif amplitude == 0.0:
            blended = freeze_frames(all_frames(), first, mask)
        else:
            blended = scale_frames(all_frames(), first, mask, amplitude)
        if head_motion is not None and not head_motion.still:
            from service.phantom.head import apply_head_motion_to_clip

            blended = apply_head_motion_to_clip(blended, head_motion, fps, mfields.eye_distance(lm))
        for f in blended:
            count[0] += 1
            yield f

    from service.media.encode import encode_mp4

    data = encode_mp4(counted(), fps)
    if fmt == "mp4":
        tmp = out_path.with_name(out_path.name + ".part")
        tmp.write_bytes(data)
        tmp.replace(out_path)
    else:
        from service.media.dicom_io import build_video_photographic, write_dicom

        ds = build_video_photographic(
            data,
            width=w,
            height=h,
            n_frames=count[0],
            fps=fps,
            series_description=f"FaceSym phantom: {side.value} half frozen" if amplitude == 0.0
            else f"FaceSym phantom: {side.value} half at {amplitude:g} of its motion",
        )
        write_dicom(ds, out_path)
    truth = {
        "kind": "freeze_half",
        "frozen_side": side.value,
        "amplitude": amplitude,
        "in_head_frame": in_head_frame,
        "head_motion": None if head_motion is None else head_motion.to_json(),
        "expected_weaker_side": side.value,
        "expected_asymmetry_index": 1.0 if amplitude == 0.0 else None,
        "source": str(clip_path),
        "fps": fps,
        "n_frames": count[0],
        "width": w,
        "height": h,
        "format": fmt,
        "file": out_path.name,
    }
    tmp_json = out_path.with_suffix(".json.part")
    tmp_json.write_text(json.dumps(truth, indent=2) + "\n")
    tmp_json.replace(out_path.with_suffix(".json"))
    return truth
