"""Encode RGB frames as an H.264 MP4 with PyAV (libx264). OpenCV cannot write H.264 here."""

from __future__ import annotations

import io
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from service.errors import InvalidParameterError


def encode_mp4(frames: Iterable[np.ndarray], fps: float, *, crf: int = 18, level: str = "4.1") -> bytes:
    """Encode (H, W, 3) uint8 RGB frames into an MP4 (H.264 High profile, yuv420p) held in memory.

    Parameters
    ----------
    frames
        RGB frames of one size; width and height must be even (yuv420p halves the chroma planes).
    fps
        Frame rate in frames per second (> 0).
    crf
        x264 constant rate factor: 0 lossless .. 51 worst; 18 is visually lossless.
    level
        H.264 level; 4.1 keeps 1080p30 within MPEG-4 AVC/H.264 High Profile / Level 4.1
        (transfer syntax 1.2.840.10008.1.2.4.102).

    Returns
    -------
    bytes
        The MP4 file. Raises InvalidParameterError for empty input, odd or changing sizes.
    """
    if not fps > 0:
        raise InvalidParameterError(f"fps must be > 0, got {fps!r}")
    buf = io.BytesIO()
    container = av.open(buf, mode="w", format="mp4")
    stream = None
    size: tuple[int, int] | None = None
    rate = Fraction(fps).limit_denominator(1001)
    for n, rgb in enumerate(frames):
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise InvalidParameterError(f"frames must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
        h, w = rgb.shape[:2]
        if stream is None:
            if h % 2 or w % 2:
                raise InvalidParameterError(
                    f"frames must have even width and height for yuv420p, got {w}x{h}"
                )
            size = (w, h)
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": str(crf), "profile": "high", "level": level, "preset": "veryfast"}
        elif (w, h) != size:
            assert size is not None
            raise InvalidParameterError(f"frame {n} is {w}x{h}, expected {size[0]}x{size[1]}")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        for packet in stream.encode(frame):
            container.mux(packet)
    if stream is None:
        container.close()
        raise InvalidParameterError("frames is empty: nothing to encode")
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return buf.getvalue()


def write_mp4(frames: Iterable[np.ndarray], path: str | Path, fps: float, *, crf: int = 18) -> Path:
    """Encode ``frames`` (see :func:`encode_mp4`) and write the MP4 to ``path`` atomically."""
    path = Path(path)
    data = encode_mp4(frames, fps, crf=crf)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path
