"""Decode any input (DICOM video or photo, video container, still image) into streamed RGB frames.

The kind is detected from the bytes, never from the extension: DICOM first (PS3.10 preamble +
"DICM" or a bare dataset), then still images (Pillow, then OpenCV), then anything FFmpeg demuxes
(PyAV). Frames are decoded lazily: a 60-s 1080p clip is never held in memory whole.
Every decoder failure becomes :class:`~service.errors.UnreadableInputError`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO

import av
import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.domain import Frame, MediaInfo, MediaSource
from service.errors import UnreadableInputError
from service.media import dicom_io
from service.media.limits import DecodeLimits

log = logging.getLogger(__name__)

# Container format labels; FFmpeg names the whole ISO-BMFF family "mov,mp4,m4a,3gp,3g2,mj2".
_FORMAT_LABELS = {"matroska": "mkv", "mpegts": "ts", "avi": "avi", "h264": "h264", "hevc": "hevc"}

Opener = Callable[[], "str | BinaryIO"]

# Pillow formats taken as stills. A closed list: Pillow's looser plugins (MPEG, TGA, ...) would
# otherwise claim video files they cannot decode. MPO is the multi-picture JPEG of some cameras.
_STILL_FORMATS = ["PNG", "JPEG", "MPO", "BMP", "TIFF", "WEBP", "GIF", "PPM", "JPEG2000"]


def open_media(
    path: str | Path, *, mirrored: bool = False, limits: DecodeLimits | None = None
) -> MediaSource:
    """Open a video, still image or DICOM object for decoding.

    Parameters
    ----------
    path
        The file to decode. Its kind is detected from its content.
    mirrored
        Flip every frame horizontally (selfie-camera input). A setting, never guessed.
    limits
        Decode limits (default :class:`~service.media.limits.DecodeLimits`): the file size, the frame size
        and the frame count the input states are checked before decoding, the decoded ones while streaming.

    Returns
    -------
    MediaSource
        ``info`` is known at once (the first frame has been decoded to check the input);
        ``frames()`` streams the frames afresh on each call.

    Raises
    ------
    UnreadableInputError
        Missing, empty or undecodable input, or a DICOM object without supported pixel data;
        :class:`~service.errors.LimitExceededError` (a subclass) when it is larger than ``limits``.
    """
    limits = limits or DecodeLimits()
    p = Path(path)
    _check_file(p)
    limits.check_file(p.stat().st_size, str(p))
    if dicom_io.is_dicom(p):
        return _open_dicom(p, mirrored, limits)
    still = _open_still(p, mirrored, limits)
    if still is not None:
        return still
    return _AVSource(p, lambda: str(p), mirrored=mirrored, limits=limits)


def iter_frames(
    path: str | Path, *, mirrored: bool = False, limits: DecodeLimits | None = None
) -> Iterator[Frame]:
    """Stream the frames of ``path``: ``open_media(path, mirrored=mirrored, limits=limits).frames()``."""
    return open_media(path, mirrored=mirrored, limits=limits).frames()


def _check_file(path: Path) -> None:
    if not path.exists():
        raise UnreadableInputError(f"{path}: no such file")
    if not path.is_file():
        raise UnreadableInputError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise UnreadableInputError(f"{path}: file is empty (0 bytes)")


def _fit(rgb: np.ndarray, max_pixels: int) -> np.ndarray:
    """A still image larger than a video frame may be (``max_frame_pixels``) is analysed downscaled to it:
    the scores are in units of the inter-eye distance, and the engine's memory grows with the picture."""
    h, w = rgb.shape[:2]
    if h * w <= max_pixels:
        return rgb
    scale = (max_pixels / (h * w)) ** 0.5
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def _finish(rgb: np.ndarray, mirrored: bool) -> np.ndarray:
    """Contiguous (H, W, 3) uint8, flipped left-right when the input is mirrored."""
    return np.ascontiguousarray(rgb[:, ::-1] if mirrored else rgb)


# ------------------------------------------------------------------------------------------ stills
class _StillSource:
    """One decoded picture (stills are small: decoding at open time keeps the error early)."""

    def __init__(self, path: Path, rgb: np.ndarray, source: str, mirrored: bool, max_pixels: int):
        self._rgb = _finish(_fit(rgb, max_pixels), mirrored)
        h, w = self._rgb.shape[:2]
        self._info = MediaInfo(str(path), "image", w, h, 0.0, 1, source)

    @property
    def info(self) -> MediaInfo:
        return self._info

    def frames(self) -> Iterator[Frame]:
        yield Frame(0, 0.0, self._rgb)


def _open_still(path: Path, mirrored: bool, limits: DecodeLimits) -> _StillSource | None:
    """Decode ``path`` as a still image, or return None when it is not one (then try PyAV)."""
    try:
        Image.init()  # registers every plugin; the closed list may name ones preinit() skips
        with Image.open(path, formats=[f for f in _STILL_FORMATS if f in Image.OPEN]) as img:
            if getattr(img, "n_frames", 1) > 1 and img.format == "GIF":
                return None  # animated: a video for our purposes
            # Image.open has read the header only: nothing is decoded yet.
            limits.check_frame(*img.size, str(path), still=True)
            fmt = "jpeg" if img.format == "MPO" else (img.format or "image").lower()
            w, h = img.size
            if w * h > limits.max_frame_pixels and fmt == "jpeg":
                scale = (limits.max_frame_pixels / (w * h)) ** 0.5  # decode a large JPEG at a reduced scale
                img.draft("RGB", (max(1, int(w * scale)), max(1, int(h * scale))))
            rgb = _pil_to_rgb(ImageOps.exif_transpose(img))
        return _StillSource(path, rgb, fmt, mirrored, limits.max_frame_pixels)
    except UnidentifiedImageError:
        pass
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UnreadableInputError(f"{path}: damaged image ({dicom_io.why(exc)})") from exc
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)  # formats Pillow lacks; applies EXIF orientation
    if bgr is None:
        return None
    limits.check_frame(bgr.shape[1], bgr.shape[0], str(path), still=True)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return _StillSource(path, rgb, "image", mirrored, limits.max_frame_pixels)


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # convert("RGB") would clip 16-bit/float grey at 255: stretch to 8 bits first.
        grey = np.asarray(img, dtype=np.float32)
        lo, hi = float(grey.min()), float(grey.max())
        grey8 = ((grey - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(grey)).astype(np.uint8)
        return np.repeat(grey8[:, :, None], 3, axis=2)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


# ------------------------------------------------------------------------------------------- DICOM
class _DicomImageSource:
    """A DICOM photo or multi-frame image, decoded by pydicom one frame at a time."""

    def __init__(self, image: dicom_io.DicomImage, mirrored: bool, limits: DecodeLimits):
        self._image, self._mirrored = image, mirrored
        self.warnings: list[str] = []  # what the last frames() found (see media_warnings)
        still = image.n_frames == 1
        limits.check_frame(image.columns, image.rows, f"{image.path}: DICOM Rows/Columns", still=still)
        limits.check_frames(image.n_frames, f"{image.path}: DICOM NumberOfFrames", stated=True)
        if image.transfer_syntax_uid in dicom_io.JPEG_TRANSFER_SYNTAXES:
            # The codestream states its own size, which the decoder allocates whatever Rows/Columns say.
            size = dicom_io.jpeg_frame_size(image)
            if size is not None and size != (image.columns, image.rows):
                raise UnreadableInputError(
                    f"{image.path}: JPEG frame is {size[0]}x{size[1]} but Rows/Columns say "
                    f"{image.columns}x{image.rows}"
                )
        first = _first(self._raw_frames(), image.path)
        # A single photo is kept (it is one frame anyway): frames() then needs no second decode.
        self._still = _fit(first, limits.max_frame_pixels) if image.n_frames == 1 else None
        if self._still is not None:
            first = self._still
        h, w = first.shape[:2]
        kind = "video" if image.n_frames > 1 else "image"
        self._info = MediaInfo(image.path, kind, w, h, image.fps or 0.0, image.n_frames, "dicom/image")

    @property
    def info(self) -> MediaInfo:
        return self._info

    def _raw_frames(self) -> Generator[np.ndarray, None, None]:
        try:
            yield from self._image.iter_rgb()
        except UnreadableInputError:
            raise
        except Exception as exc:  # pydicom/numpy/plugin errors: unsupported or corrupt pixel data
            why = dicom_io.why(exc)
            raise UnreadableInputError(f"{self._image.path}: cannot decode DICOM pixel data ({why})") from exc

    def frames(self) -> Iterator[Frame]:
        self.warnings = []
        if self._still is not None:
            yield Frame(0, 0.0, _finish(self._still, self._mirrored))
            return
        fps, n = self._info.fps, 0
        raw = self._raw_frames()
        while True:
            try:
                rgb = next(raw)
            except StopIteration:
                break
            except UnreadableInputError as exc:
                if n == 0:
                    raise
                log.warning("DICOM frame decoding stopped after %d frames: %s", n, exc.__cause__ or exc)
                self.warnings.append(f"decoding stopped after {n} of {self._info.frames} frames "
                                     "(truncated or corrupt pixel data): the analysis uses those")
                break
            yield Frame(n, n / fps if fps > 0 else 0.0, _finish(rgb, self._mirrored))
            n += 1


def media_warnings(source: MediaSource) -> tuple[str, ...]:
    """What decoding ``source`` found that the analysis must report (a truncated clip, a header that lies
    about the frame count); call after its frames were consumed."""
    return tuple(getattr(source, "warnings", ()))


def _first(frames: Generator[np.ndarray, None, None], path: str) -> np.ndarray:
    try:
        return next(frames)
    except StopIteration:
        raise UnreadableInputError(f"{path}: DICOM object has no decodable frames") from None
    finally:
        frames.close()


def _open_dicom(path: Path, mirrored: bool, limits: DecodeLimits) -> MediaSource:
    media = dicom_io.read_dicom_media(path)
    if isinstance(media, dicom_io.DicomVideo):
        limits.check_frame(media.columns, media.rows, f"{path}: DICOM Rows/Columns")
        if media.n_frames:
            limits.check_frames(media.n_frames, f"{path}: DICOM NumberOfFrames", stated=True)
        return _AVSource(path, media.open_bitstream, mirrored=mirrored, dicom=media, limits=limits)
    return _DicomImageSource(media, mirrored, limits)


# ----------------------------------------------------------------------------------- FFmpeg (PyAV)
class _AVSource:
    """A video decoded by FFmpeg through PyAV, from a path or (DICOM) a seekable bitstream."""

    def __init__(
        self,
        path: Path,
        opener: Opener,
        *,
        mirrored: bool,
        dicom: dicom_io.DicomVideo | None = None,
        limits: DecodeLimits | None = None,
    ):
        self._path, self._opener, self._mirrored = path, opener, mirrored
        self._limits = limits or DecodeLimits()
        self.warnings: list[str] = []  # what the last frames() found (see media_warnings)
        # FFmpeg's own per-frame cap (AVCodecContext.max_pixels): probing and decoding refuse larger frames
        # before allocating them, also when the size changes mid-stream.
        self._codec_options = {"max_pixels": str(self._limits.max_frame_pixels)}
        self._info = self._probe(dicom)

    @property
    def info(self) -> MediaInfo:
        return self._info

    def _open(self) -> _OpenContainer:
        """Open the container; any FFmpeg or I/O failure becomes UnreadableInputError."""
        src: str | BinaryIO | None = None
        try:
            src = self._opener()
            container = av.open(src, mode="r", options=dict(self._codec_options))
        except Exception as exc:
            if src is not None and not isinstance(src, str):
                src.close()
            raise UnreadableInputError(f"{self._path}: not a decodable video or image ({_why(exc)})") from exc
        box = _OpenContainer(container, None if isinstance(src, str) else src)
        if not container.streams.video:
            box.close()
            raise UnreadableInputError(f"{self._path}: no video stream in the {container.format.name} file")
        stream = container.streams.video[0]
        if stream.codec_context is None:  # FFmpeg has no decoder for what the container says it holds
            box.close()
            raise UnreadableInputError(f"{self._path}: no decoder for the video stream in the "
                                       f"{container.format.name} file")
        try:
            # The size the container or codec header states, known before any frame is decoded.
            w, h = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
            if w and h:
                self._limits.check_frame(w, h, str(self._path))
            stream.codec_context.options = dict(self._codec_options)
        except BaseException:
            box.close()
            raise
        return box

    def _probe(self, dicom: dicom_io.DicomVideo | None) -> MediaInfo:
        """Read the stream parameters and decode one frame, so unreadable input fails at open time."""
        with self._open() as box:
            container = box.container
            stream = container.streams.video[0]
            codec = stream.codec_context.name
            if stream.frames:
                self._limits.check_frames(int(stream.frames), str(self._path), stated=True)
            try:
                first = next(container.decode(stream))
            except Exception as exc:  # StopIteration (no frames) or a decoder error
                raise UnreadableInputError(
                    f"{self._path}: no decodable video frame in the {codec} stream ({_why(exc)})"
                ) from exc
            fps = _stream_fps(stream)
            frames = stream.frames or None
            label = f"{_format_label(container)}/{codec}"
            if dicom is not None:
                # The Cine and Multi-frame modules are authoritative for a DICOM object.
                fps, frames, label = dicom.fps or fps, dicom.n_frames or frames, f"dicom/video/{codec}"
            w, h = first.width, first.height
            if _quarter_turns(first) % 2:
                w, h = h, w
            return MediaInfo(str(self._path), "video", w, h, fps, frames, label)

    def frames(self) -> Iterator[Frame]:
        self.warnings = []
        fps = self._info.fps
        n = 0
        with self._open() as box:
            stream = box.container.streams.video[0]
            stream.thread_type = "AUTO"  # frame + slice threads: several times faster on 1080p
            start = stream.start_time or 0
            base = stream.time_base
            decoded = box.container.decode(stream)
            while True:
                try:
                    frame = next(decoded)
                    rgb = _upright(frame.to_ndarray(format="rgb24"), frame)
                except StopIteration:
                    break
                except Exception as exc:  # corrupt data mid-stream: keep what decoded so far
                    if n == 0:
                        why = _why(exc)
                        raise UnreadableInputError(f"{self._path}: cannot decode video ({why})") from exc
                    log.warning("video decoding stopped after %d frames: %s", n, _why(exc))
                    self.warnings.append(f"video decoding stopped after {n} frames ({_why(exc)}): "
                                         "truncated or corrupt data; the analysis uses those frames")
                    break
                self._limits.check_frames(n + 1, str(self._path))
                yield Frame(n, _time_s(frame.pts, start, base, n, fps), _finish(rgb, self._mirrored))
                n += 1
        if n == 0:
            raise UnreadableInputError(f"{self._path}: the video stream holds no decodable frames")
        declared = self._info.frames
        if declared and not self.warnings and abs(n - declared) > max(3, 0.05 * declared):
            # A file cut short (the index still counts the lost frames) or a header that lies.
            self.warnings.append(f"the video holds {n} frames but its header declares {declared} "
                                 "(truncated file?): the analysis uses the frames it holds")


class _OpenContainer:
    """A PyAV container and the file object it reads from (PyAV does not close what it was handed)."""

    def __init__(self, container: Any, fileobj: BinaryIO | None):
        self.container, self._fileobj = container, fileobj

    def close(self) -> None:
        try:
            self.container.close()
        finally:
            if self._fileobj is not None:
                self._fileobj.close()

    def __enter__(self) -> _OpenContainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _quarter_turns(frame: Any) -> int:
    """Counter-clockwise quarter turns that make ``frame`` upright (phones store portrait sideways).

    PyAV's ``rotation`` is the counter-clockwise angle of the display matrix, as is ``np.rot90``'s:
    an iPhone portrait clip reports -90 and is turned clockwise, as ffmpeg's autorotate does.
    Angles other than multiples of 90 degrees are ignored.
    """
    try:
        angle = float(frame.rotation or 0)
    except Exception:  # no or malformed display matrix: show the frame as stored
        return 0
    k = round(angle / 90.0)
    return k % 4 if abs(angle - 90.0 * k) <= 1.0 else 0


def _upright(rgb: np.ndarray, frame: Any) -> np.ndarray:
    k = _quarter_turns(frame)
    return np.rot90(rgb, k) if k else rgb


def _stream_fps(stream: Any) -> float:
    """Nominal rate when it agrees with the average (constant frame rate), else the average.

    FFmpeg's average is skewed by edit lists and stated-but-missing frames on CFR clips, while the
    nominal rate overstates variable-rate phone clips (30 fps bursts in a 26 fps average).
    """
    nominal = float(stream.guessed_rate or 0)
    average = float(stream.average_rate or 0)
    if nominal > 0 and (average <= 0 or abs(average - nominal) <= 0.03 * nominal):
        return nominal
    return average


def _time_s(pts: int | None, start: int, base: Fraction | None, index: int, fps: float) -> float:
    if pts is not None and base is not None:
        return float((pts - start) * base)
    return index / fps if fps > 0 else 0.0


def _format_label(container: Any) -> str:
    names = container.format.name.split(",")
    if "mp4" in names or "mov" in names:
        brand = str(container.metadata.get("major_brand", "")).strip()
        return "mov" if brand == "qt" else "mp4"
    return _FORMAT_LABELS.get(names[0], names[0])


def _why(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return "".join(c if c.isprintable() else "?" for c in text.splitlines()[0][:200])
