"""Decode limits: how large an input FaceSym agrees to decode, checked BEFORE anything is allocated from a
size the input states (DICOM Rows/Columns/NumberOfFrames, a codec's frame size, an image header).

Hostile or broken input must not take the service's memory: frames are streamed (one decoded frame, a few
prefetched, plus the engine's small per-frame crops), so memory grows with the frame size and the frame
count, and both are bounded here. The service takes the values from its settings (``max_frame_pixels``,
``max_frames``, ``max_file_mb``); ``facesym analyze`` from the same FACESYM_* environment variables.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.errors import LimitExceededError

#: Video frames: DCI 4K (4096 x 2160) also covers UHD 3840 x 2160 and portrait 4K phone clips; 8K
#: (7680 x 4320) is refused.
DEFAULT_MAX_FRAME_PIXELS = 4096 * 2160
#: Still images (photos, single-frame DICOM): a 24-MP camera photo (6000 x 4000) passes, an 8K one (33 MP)
#: does not: pydicom's JPEG decoding (YBR to RGB in floating point) peaks at ~30 bytes a pixel (~700 MB).
#: Stills above max_frame_pixels are analysed downscaled to it (the engine's memory grows with the picture).
DEFAULT_MAX_IMAGE_PIXELS = 24_000_000
#: No side may be longer, whatever the pixel count: OpenCV's remap (inside MediaPipe) aborts the whole process
#: on a side of 32767 pixels or more (a 32768 x 1 "photo" killed it), and no camera makes such pictures.
MAX_SIDE = 16384
#: 3 minutes at 30 frames/s (90 s at 60): an exam of three movements takes well under a minute, and the
#: engine keeps ~75 kB per frame (landmarks + small grey face crops), so this bounds it to ~400 MB.
DEFAULT_MAX_FRAMES = 5400
#: 2 GiB: a 3-minute 4K H.264 clip at 50 Mbit/s is ~1.1 GB; larger objects are refused, never decoded.
DEFAULT_MAX_FILE_MB = 2048


@dataclass(frozen=True)
class DecodeLimits:
    """The largest input decoded; every check raises :class:`~service.errors.LimitExceededError`
    (an :class:`~service.errors.UnreadableInputError`: ``facesym analyze`` exits 2, the SCP answers
    0xC000 with the reason, the worker reports the instance as not analysable)."""

    max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS
    max_frames: int = DEFAULT_MAX_FRAMES
    max_file_mb: int = DEFAULT_MAX_FILE_MB
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def check_frame(self, width: int, height: int, what: str, *, still: bool = False) -> None:
        """Refuse a video frame of ``width`` x ``height`` above ``max_frame_pixels`` (a still image,
        ``still``: above ``max_image_pixels``), a side above :data:`MAX_SIDE` or a non-positive size."""
        if width <= 0 or height <= 0:
            raise LimitExceededError(f"{what}: frame size {width}x{height} is not positive", "frame_size")
        if max(width, height) > MAX_SIDE:
            raise LimitExceededError(f"{what}: frame {width}x{height} has a side over {MAX_SIDE}", "max_side")
        name, limit = ("max_image_pixels", self.max_image_pixels) if still else \
            ("max_frame_pixels", self.max_frame_pixels)
        if width * height > limit:
            raise LimitExceededError(f"{what}: frame {width}x{height} exceeds {name}={limit}", name)

    def check_frames(self, n: int, what: str, *, stated: bool = False) -> None:
        """Refuse ``n`` frames above ``max_frames``; ``stated``: the count is what the input declares."""
        if n > self.max_frames:
            verb = "declares" if stated else "has more than"
            count = n if stated else self.max_frames
            raise LimitExceededError(
                f"{what}: {verb} {count} frames, above max_frames={self.max_frames}", "max_frames"
            )

    def check_file(self, size_bytes: int, what: str) -> None:
        """Refuse a file larger than ``max_file_mb``."""
        if size_bytes > self.max_file_mb * 1024 * 1024:
            raise LimitExceededError(
                f"{what}: {size_bytes / 1048576:.0f} MB exceeds max_file_mb={self.max_file_mb}", "max_file_mb"
            )
