"""service.media.decode on the real test faces and on broken input."""

from __future__ import annotations

import io
import itertools
import struct
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from service.domain import Frame
from service.errors import UnreadableInputError
from service.media.decode import iter_frames, open_media


def _check_stream(frames: list[Frame], width: int, height: int) -> None:
    assert [f.index for f in frames] == list(range(len(frames)))
    times = np.array([f.time_s for f in frames])
    assert times[0] == pytest.approx(0.0, abs=1e-6)
    assert np.all(np.diff(times) > 0), "time_s must increase strictly"
    for f in frames:
        assert f.rgb.shape == (height, width, 3)
        assert f.rgb.dtype == np.uint8
        assert f.rgb.flags["C_CONTIGUOUS"]


def test_h264_mp4(faces_dir: Path) -> None:
    media = open_media(faces_dir / "single_face.mp4")
    info = media.info
    assert (info.kind, info.width, info.height, info.frames) == ("video", 640, 360, 72)
    assert info.source == "mp4/h264"
    assert info.fps == pytest.approx(30.0)
    frames = list(media.frames())
    assert len(frames) == 72
    _check_stream(frames, 640, 360)
    assert frames[-1].time_s == pytest.approx(71 / 30, abs=1e-3)


def test_hevc_mov(faces_dir: Path) -> None:
    media = open_media(faces_dir / "face_noface.mov")
    assert (media.info.width, media.info.height, media.info.source) == (960, 540, "mov/hevc")
    frames = list(media.frames())
    assert len(frames) == 169
    _check_stream(frames, 960, 540)


def test_jpeg_still(faces_dir: Path) -> None:
    media = open_media(faces_dir / "single_face.jpg")
    info = media.info
    assert (info.kind, info.width, info.height, info.fps, info.frames) == ("image", 572, 562, 0.0, 1)
    frames = list(media.frames())
    assert len(frames) == 1 and frames[0].index == 0 and frames[0].time_s == 0.0
    assert frames[0].rgb.shape == (562, 572, 3)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_png_written_here(tmp_path: Path, mode: str) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    img = Image.fromarray(rgb).convert(mode)
    path = tmp_path / "still.bin"  # no extension: detection is by content
    img.save(path, format="PNG")
    (frame,) = list(iter_frames(path))
    assert open_media(path).info.source == "png"
    assert frame.rgb.shape == (30, 40, 3)
    if mode != "L":
        np.testing.assert_array_equal(frame.rgb, rgb)
    else:
        np.testing.assert_array_equal(frame.rgb[..., 0], np.asarray(img))


def test_jpeg_exif_orientation(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    assert (open_media(path).info.width, open_media(path).info.height) == (20, 40)


def test_mirrored_flips_exactly(faces_dir: Path) -> None:
    plain = list(itertools.islice(iter_frames(faces_dir / "single_face.mp4"), 3))
    flipped = list(itertools.islice(iter_frames(faces_dir / "single_face.mp4", mirrored=True), 3))
    for a, b in zip(plain, flipped, strict=True):
        np.testing.assert_array_equal(b.rgb, a.rgb[:, ::-1])
        assert b.rgb.flags["C_CONTIGUOUS"]
    still = next(iter_frames(faces_dir / "single_face.jpg"))
    still_m = next(iter_frames(faces_dir / "single_face.jpg", mirrored=True))
    np.testing.assert_array_equal(still_m.rgb, still.rgb[:, ::-1])


def test_frames_stream_lazily(faces_dir: Path) -> None:
    media = open_media(faces_dir / "face_noface.mov")
    gen = media.frames()
    assert isinstance(gen, Iterator)
    first3 = list(itertools.islice(gen, 3))
    assert [f.index for f in first3] == [0, 1, 2]
    gen.close()  # type: ignore[attr-defined]  # releases the container early
    assert len(list(itertools.islice(media.frames(), 2))) == 2  # frames() restarts from the start


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00garbage" * 1000, b"not a video at all\n" * 50, bytes(range(256)) * 64],
    ids=["empty", "garbage", "text", "bytes"],
)
def test_unreadable_bytes(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "clip.mp4"
    path.write_bytes(content)
    with pytest.raises(UnreadableInputError, match="clip.mp4"):
        list(open_media(path).frames())


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UnreadableInputError, match="no such file"):
        open_media(tmp_path / "absent.mp4")


def test_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(UnreadableInputError):
        open_media(tmp_path)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_truncated_mp4_never_leaks(faces_dir: Path, tmp_path: Path, fraction: float) -> None:
    data = (faces_dir / "single_face.mp4").read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: int(len(data) * fraction)])
    try:
        frames = list(open_media(path).frames())
    except UnreadableInputError:
        return
    assert 0 < len(frames) <= 72


def test_corrupt_middle_yields_what_decodes(faces_dir: Path, tmp_path: Path) -> None:
    data = bytearray((faces_dir / "single_face.mp4").read_bytes())
    rng = np.random.default_rng(1)
    start = len(data) // 3
    data[start : start + 20000] = rng.integers(0, 256, 20000, dtype=np.uint8).tobytes()
    path = tmp_path / "damaged.mp4"
    path.write_bytes(bytes(data))
    try:
        frames = list(open_media(path).frames())
    except UnreadableInputError:
        return
    assert len(frames) > 0
    assert all(f.rgb.shape == (360, 640, 3) for f in frames)


def _mpegts(n: int) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mpegts") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        for i in range(n):
            rgb = np.full((120, 160, 3), 5 * i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def test_mpegts_full_and_truncated(tmp_path: Path) -> None:
    data = _mpegts(50)
    full, cut = tmp_path / "full.ts", tmp_path / "cut.ts"
    full.write_bytes(data)
    cut.write_bytes(data[: len(data) // 2])  # a TS has no index at the end: the first half decodes
    media = open_media(full)
    assert (media.info.source, media.info.fps, media.info.frames) == ("ts/h264", 25.0, None)
    assert len(list(media.frames())) == 50
    partial = list(open_media(cut).frames())
    assert 0 < len(partial) < 50
    _check_stream(partial, 160, 120)


def test_display_rotation_is_applied(tmp_path: Path) -> None:
    from service.media.encode import encode_mp4

    stored = np.zeros((64, 96, 3), np.uint8)
    stored[:8, :, 0] = 255  # red band along the stored top edge
    mp4 = bytearray(encode_mp4([stored] * 3, 10.0))
    # Give the track the display matrix of an iPhone portrait clip (ffprobe: rotation of -90 degrees).
    tkhd = mp4.index(b"tkhd")
    assert mp4[tkhd + 4] == 0  # version 0 layout: the matrix follows 36 bytes of header fields
    matrix = tkhd + 4 + 4 + 20 + 8 + 8
    mp4[matrix : matrix + 36] = struct.pack(">9i", 0, 0x10000, 0, -0x10000, 0, 0, 64 << 16, 0, 0x40000000)
    path = tmp_path / "portrait.mp4"
    path.write_bytes(bytes(mp4))
    media = open_media(path)
    assert (media.info.width, media.info.height) == (64, 96)
    rgb = next(media.frames()).rgb
    assert rgb.shape == (96, 64, 3)
    # Turned clockwise: the stored top edge is now the right edge.
    assert rgb[:, -4:, 0].mean() > 200 and rgb[:, :40, 0].mean() < 30
