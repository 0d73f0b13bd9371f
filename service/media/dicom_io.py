"""Read and write the DICOM objects FaceSym takes in: video (MPEG-4 AVC/HEVC) and photographs.

Read side: :func:`read_dicom_media` describes a DICOM file as a :class:`DicomVideo` (an MPEG bitstream
that :mod:`service.media.decode` hands to PyAV, because pydicom has no MPEG decoder) or a
:class:`DicomImage` (frames pydicom decodes itself). :func:`dicom_summary` gives the non-PHI facts the
scheduler matches on. Write side: :func:`build_video_photographic`, :func:`build_vl_photograph` and
:func:`write_dicom` make objects that pass ``dciodvfy`` (phantoms, tests).

pydicom Datasets never leave service/media (DESIGN.md, "Layout"): the read side returns plain values.
"""

from __future__ import annotations

import bisect
import io
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    MPEG4HP41,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from service import __version__
from service.errors import UnreadableInputError

log = logging.getLogger(__name__)

VIDEO_PHOTOGRAPHIC = UID("1.2.840.10008.5.1.4.1.1.77.1.4.1")
VIDEO_ENDOSCOPIC = UID("1.2.840.10008.5.1.4.1.1.77.1.1.1")
VL_PHOTOGRAPHIC = UID("1.2.840.10008.5.1.4.1.1.77.1.4")

#: PS3.5 8.2.5-8.2.12: MPEG2 MP@ML/MP@HL, MPEG-4 AVC/H.264 (.102-.106), HEVC/H.265 (.107/.108).
MPEG_TRANSFER_SYNTAXES = frozenset(
    UID(f"1.2.840.10008.1.2.4.{n}") for n in (100, 101, 102, 103, 104, 105, 106, 107, 108)
)

_ITEM = 0xFFFEE000
_SEQ_DELIM = 0xFFFEE0DD
# (0018,1063) Frame Time: the Cine module attribute that Frame Increment Pointer points at.
_FRAME_TIME_TAG = 0x00181063
_IMPLEMENTATION_VERSION = f"FACESYM_{__version__}"[:16]
#: JPEG transfer syntaxes (PS3.5 8.2.1-8.2.4, 10.x): the codestream's frame header states its own size.
JPEG_TRANSFER_SYNTAXES = frozenset(
    UID(f"1.2.840.10008.1.2.4.{n}") for n in (50, 51, 57, 70, 80, 81, 90, 91, 201, 202, 203)
)
#: Element values larger than this stay on disk when a header is read (pydicom ``defer_size``): a huge
#: private element must not be loaded into memory just to read a few UIDs.
DEFER_SIZE = 1 << 20
#: Frame rates outside (0, MAX_FPS] stated by an object are ignored (the bitstream's rate is used).
MAX_FPS = 1000.0


# --------------------------------------------------------------------------------------- read side
@dataclass(frozen=True)
class DicomVideo:
    """An MPEG-encapsulated DICOM object (PS3.5 A.4, 8.2.5+): where its bitstream lies in the file.

    ``extents`` are (file offset, length) of each Pixel Data fragment after the Basic Offset Table;
    their concatenation is the MP4/TS/elementary stream. ``fps`` comes from the Cine module
    (PS3.3 C.7.6.5) when the object states it, else None (take it from the bitstream).
    """

    path: str
    transfer_syntax_uid: str
    rows: int
    columns: int
    n_frames: int | None
    fps: float | None
    extents: tuple[tuple[int, int], ...]

    def open_bitstream(self) -> BinaryIO:
        """Open the joined fragments as one seekable binary stream (read lazily from the file)."""
        return io.BufferedReader(_ExtentReader(self.path, self.extents), buffer_size=1 << 20)


@dataclass(frozen=True)
class DicomImage:
    """A DICOM image pydicom decodes natively (PS3.3 A.32.4 VL Photographic, A.8 Secondary Capture)."""

    path: str
    transfer_syntax_uid: str
    rows: int
    columns: int
    n_frames: int
    fps: float | None
    photometric: str
    bits_stored: int = 8

    def iter_rgb(self) -> Iterator[np.ndarray]:
        """Yield each frame as (rows, columns, 3) uint8 RGB, one frame in memory at a time."""
        from pydicom.pixels import iter_pixels

        lut_ds = _read_header(Path(self.path)) if self.photometric == "PALETTE COLOR" else None
        # Passing the syntax lets pydicom read bare datasets (no File Meta) as well.
        for arr in iter_pixels(self.path, transfer_syntax_uid=UID(self.transfer_syntax_uid)):
            yield _to_rgb8(arr, self.photometric, self.bits_stored, lut_ds)


class _ExtentReader(io.RawIOBase):
    """A read-only, seekable view of several byte ranges of one file, joined end to end.

    Why: PyAV must seek in an MP4 (the moov atom is often at the end), and a 60-s 1080p bitstream
    should not be copied into memory just to be decoded.
    """

    def __init__(self, path: str, extents: tuple[tuple[int, int], ...]):
        super().__init__()
        self._fh = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._extents = extents
        self._starts = [0]
        for _, length in extents:
            self._starts.append(self._starts[-1] + length)
        self._size = self._starts[-1]
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._pos < self._size:
            i = bisect.bisect_right(self._starts, self._pos) - 1
            file_off, length = self._extents[i]
            inner = self._pos - self._starts[i]
            want = min(len(view) - done, length - inner)
            self._fh.seek(file_off + inner)
            got = self._fh.readinto(view[done : done + want])
            if not got:
                break
            done += got
            self._pos += got
        return done

    def close(self) -> None:
        self._fh.close()
        super().close()


def is_dicom(path: str | Path) -> bool:
    """True when ``path`` holds a DICOM file: PS3.10 preamble + "DICM", or a bare dataset with a SOP Class.

    The bare-dataset check only runs when the first tag's group is 0002 or 0008, so pydicom's forced
    parsing is never tried on videos or images (it can wander through megabytes of garbage).
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    if len(head) < 8 or struct.unpack("<H", head[:2])[0] not in (0x0002, 0x0008):
        return False
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True, defer_size=DEFER_SIZE)
    except Exception:  # pydicom raises many kinds on non-DICOM bytes: all mean "not DICOM"
        return False
    return "SOPClassUID" in ds


def _read_header(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path, force=True, stop_before_pixels=True, defer_size=DEFER_SIZE)
    except Exception as exc:
        raise UnreadableInputError(f"{path}: not a readable DICOM file ({why(exc)})") from exc


def why(exc: BaseException, limit: int = 160) -> str:
    """An exception as a short reason for users, reports and logs: its type and the first line of its
    message, printable characters only, at most ``limit`` of them. pydicom quotes the value it could not
    read in full (a lying length makes that megabytes of pixel data, or a patient's name)."""
    text = (str(exc).strip().splitlines() or [""])[0]
    text = "".join(c if c.isprintable() else "?" for c in text)
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts:
        return UID(str(ts))
    # A bare dataset (no File Meta): use the encoding pydicom detected while reading it.
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit is not False:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian


def frame_rate(ds: Dataset) -> float | None:
    """Frames per second from the Cine module (PS3.3 C.7.6.5), or None when the object states none.

    Frame Time (ms) first, then Cine Rate, then Recommended Display Frame Rate; a rate above
    :data:`MAX_FPS` (or a malformed value) is ignored.
    """
    frame_time = _positive(ds, "FrameTime")
    rates = [1000.0 / frame_time] if frame_time else []
    rates += [r for r in (_positive(ds, k) for k in ("CineRate", "RecommendedDisplayFrameRate")) if r]
    return next((r for r in rates if r <= MAX_FPS), None)


def _positive(ds: Dataset, keyword: str) -> float | None:
    """A positive, finite number from ``ds`` (the first value of a multi-valued one), else None."""
    try:
        value = ds.get(keyword)
        if type(value).__name__ == "MultiValue" or isinstance(value, list | tuple):
            value = value[0] if len(value) else None
        number = float(value)
    except Exception:  # absent, malformed (wrong VR, bad text) or not a number
        return None
    return number if 0 < number < float("inf") else None


def read_dicom_media(path: str | Path) -> DicomVideo | DicomImage:
    """Describe a DICOM file's pixel data without decoding it.

    Parameters
    ----------
    path
        A DICOM PS3.10 file (or a bare dataset) of any image or video storage SOP class.

    Returns
    -------
    DicomVideo | DicomImage
        DicomVideo for an MPEG transfer syntax (PS3.5 8.2.5-8.2.12), DicomImage otherwise.
        Raises UnreadableInputError when there is no pixel data or it cannot be located.
    """
    path = Path(path)
    ds = _read_header(path)
    try:
        uid = "".join(c if c.isprintable() else "?" for c in str(ds.get("SOPInstanceUID", "?"))[:64])
        if "Rows" not in ds or "Columns" not in ds:
            raise UnreadableInputError(
                f"{path}: DICOM object {uid} has no image pixel module (no pixel data)"
            )
        ts = _transfer_syntax(ds)
        n_frames = int(_positive(ds, "NumberOfFrames") or 0)
        rows, columns, fps = int(ds.Rows), int(ds.Columns), frame_rate(ds)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
        bits = int(ds.get("BitsStored") or 8)
    except UnreadableInputError:
        raise
    except Exception as exc:  # a value of the wrong VR or a malformed number in the header
        raise UnreadableInputError(f"{path}: malformed DICOM image header ({why(exc)})") from exc
    if ts in MPEG_TRANSFER_SYNTAXES:
        extents = _locate_fragments(path, uid)
        return DicomVideo(str(path), str(ts), rows, columns, n_frames or None, fps, extents)
    return DicomImage(str(path), str(ts), rows, columns, max(n_frames, 1), fps, photometric, bits)


def jpeg_frame_size(image: DicomImage) -> tuple[int, int] | None:
    """(width, height) the first JPEG / JPEG-LS / JPEG 2000 frame of ``image`` states in its codestream
    header (SOFn, PS3.5 8.2.1; SIZ for JPEG 2000), read without decoding; None when it cannot be found."""
    try:
        first = _locate_fragments(Path(image.path), "?")[0]
    except UnreadableInputError:
        return None
    with open(image.path, "rb") as fh:
        fh.seek(first[0])
        head = fh.read(min(first[1], 1 << 16))
    return _codestream_size(head)


def _codestream_size(data: bytes) -> tuple[int, int] | None:
    if data[:4] == b"\xff\x4f\xff\x51" and len(data) >= 14:  # JPEG 2000 codestream: SOC then SIZ
        xsiz, ysiz, xo, yo = struct.unpack(">IIII", data[8:24]) if len(data) >= 24 else (0, 0, 0, 0)
        return (xsiz - xo, ysiz - yo) if xsiz > xo and ysiz > yo else None
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7):
            if i + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return (width, height)
        if marker == 0xDA or length < 2:  # start of scan before any frame header
            return None
        i += 2 + length
    return None


def _locate_fragments(path: Path, uid: str) -> tuple[tuple[int, int], ...]:
    """Find the encapsulated Pixel Data fragments (PS3.5 A.4) and return their (offset, length).

    The first item is the Basic Offset Table and is skipped; for MPEG all remaining fragments form
    one bitstream (PS3.5 8.2.5). A fragment cut short by the end of the file is kept, shortened, so a
    truncated upload still yields the frames it holds.
    """
    with open(path, "rb") as fh:
        try:
            pydicom.dcmread(fh, force=True, stop_before_pixels=True, defer_size=DEFER_SIZE)
        except Exception as exc:
            raise UnreadableInputError(f"{path}: not a readable DICOM file ({why(exc)})") from exc
        # stop_before_pixels rewinds to the start of (7FE0,0010): MPEG syntaxes are explicit VR LE.
        header = fh.read(12)
        if len(header) < 12 or struct.unpack("<HH", header[:4]) != (0x7FE0, 0x0010):
            raise UnreadableInputError(f"{path}: DICOM object {uid} has no pixel data")
        if struct.unpack("<I", header[8:12])[0] != 0xFFFFFFFF:
            raise UnreadableInputError(f"{path}: DICOM object {uid} declares MPEG but pixel data is native")
        size = os.fstat(fh.fileno()).st_size
        extents = _walk_items(fh, size, path, uid)
    if not extents:
        raise UnreadableInputError(f"{path}: DICOM object {uid} has no pixel data fragments")
    return tuple(extents)


def _walk_items(fh: BinaryIO, size: int, path: Path, uid: str) -> list[tuple[int, int]]:
    extents: list[tuple[int, int]] = []
    first = True
    while True:
        raw = fh.read(8)
        if len(raw) < 8:
            log.warning("pixel data of SOP instance %s ends without a sequence delimiter", uid)
            break
        group, elem, length = struct.unpack("<HHI", raw)
        tag = group << 16 | elem
        if tag == _SEQ_DELIM:
            break
        if tag != _ITEM or length == 0xFFFFFFFF:
            raise UnreadableInputError(f"{path}: corrupt encapsulated pixel data (tag {tag:08X})")
        start = fh.tell()
        if start + length > size:
            log.warning("pixel data of %s is truncated (%d of %d bytes)", uid, size - start, length)
            length = size - start
        if not first and length:
            extents.append((start, length))
        first = False
        fh.seek(start + length)
    return extents


def _to_rgb8(arr: np.ndarray, photometric: str, bits_stored: int, lut_ds: Dataset | None) -> np.ndarray:
    """Bring one decoded frame to (H, W, 3) uint8 RGB (pydicom already turned YBR_FULL* into RGB)."""
    if photometric == "PALETTE COLOR" and lut_ds is not None:
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, lut_ds)
        bits_stored = 8 * arr.dtype.itemsize  # LUT entries fill their words (PS3.3 C.7.6.3.1.6)
    if arr.dtype != np.uint8:
        arr = _scale_to_uint8(arr, bits_stored)
    if arr.ndim == 2:
        if photometric == "MONOCHROME1":  # MONOCHROME1: minimum value is white (PS3.3 C.7.6.3.1.2)
            arr = 255 - arr
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr)


def _scale_to_uint8(arr: np.ndarray, bits_stored: int) -> np.ndarray:
    if arr.dtype.kind == "u" and 8 < bits_stored <= 8 * arr.dtype.itemsize:
        # Unsigned: a fixed scale keeps brightness comparable across the frames of one object.
        return (arr >> (bits_stored - 8)).astype(np.uint8)
    # Signed or float data (rare for photos): a per-frame min-max stretch keeps faces visible.
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return ((arr.astype(np.float32) - lo) * (255.0 / (hi - lo)) + 0.5).astype(np.uint8)


def dicom_summary(path: str | Path) -> dict[str, Any]:
    """Non-PHI identifiers and facts of a DICOM file, for matching and logging.

    Returns
    -------
    dict
        sop_class_uid, sop_instance_uid, study_instance_uid, series_instance_uid,
        transfer_syntax_uid, modality, number_of_frames (int), series_description, protocol_name,
        image_comments (str or None each). No patient name, ID or birth date, ever.
    """
    ds = _read_header(Path(path))

    def text(keyword: str) -> str | None:
        value = ds.get(keyword)
        return None if value is None or value == "" else str(value)

    return {
        "sop_class_uid": text("SOPClassUID"),
        "sop_instance_uid": text("SOPInstanceUID"),
        "study_instance_uid": text("StudyInstanceUID"),
        "series_instance_uid": text("SeriesInstanceUID"),
        "transfer_syntax_uid": str(_transfer_syntax(ds)),
        "modality": text("Modality"),
        "number_of_frames": int(_positive(ds, "NumberOfFrames") or 1),
        "series_description": text("SeriesDescription"),
        "protocol_name": text("ProtocolName"),
        "image_comments": text("ImageComments"),
    }


# -------------------------------------------------------------------------------------- write side
def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _base_dataset(
    sop_class: UID,
    transfer_syntax: UID,
    *,
    patient_name: str,
    patient_id: str,
    study_uid: str | None,
    series_uid: str | None,
    sop_uid: str | None,
    series_description: str,
    study_description: str,
    series_number: int,
    instance_number: int,
    protocol_name: str,
    image_comments: str,
) -> Dataset:
    """Modules shared by the VL IODs (PS3.3 A.32.4 and A.32.7): Patient, General Study, General Series,
    General Equipment, General Image, Acquisition Context, VL Image (minus pixels) and SOP Common."""
    for name, value in (
        ("series_description", series_description),
        ("study_description", study_description),
        ("protocol_name", protocol_name),
    ):
        if len(value) > 64:  # LO: at most 64 characters (PS3.5 6.2)
            raise ValueError(f"{name} is longer than 64 characters (LO): {len(value)}")
    now = datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    sop_uid = UID(sop_uid or generate_uid())

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    # SOP Common (C.12.1)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, UID(sop_uid)
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    # Patient (C.7.1.1): Type 2 attributes are present, possibly empty.
    ds.PatientName, ds.PatientID = patient_name, patient_id
    ds.PatientBirthDate, ds.PatientSex = "", ""
    # General Study (C.7.2.1)
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.StudyDate, ds.StudyTime = date, time
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.AccessionNumber = ""
    if study_description:
        ds.StudyDescription = study_description
    # General Series (C.7.3.1); Modality XC = external-camera photography (VL IODs).
    ds.Modality = "XC"
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDate, ds.SeriesTime = date, time
    # Type 2C, present but empty: the face is not a paired structure, yet dciodvfy requires it.
    ds.Laterality = ""
    if series_description:
        ds.SeriesDescription = series_description
    if protocol_name:
        ds.ProtocolName = protocol_name
    # General Equipment (C.7.5.1)
    ds.Manufacturer = "FaceSym"
    ds.ManufacturerModelName = "FaceSym phantom"
    ds.SoftwareVersions = __version__
    # General Image (C.7.6.1) and VL Image (C.8.12.1)
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ""
    ds.ContentDate, ds.ContentTime = date, time
    ds.AcquisitionDateTime = date + time
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if image_comments:
        ds.ImageComments = image_comments
    # Acquisition Context (C.7.6.14): Type 2, empty is allowed.
    ds.AcquisitionContextSequence = Sequence()
    # VL Image: Anatomic Region Sequence is required for VL photographs; DICOM's meaning is "Face".
    ds.AnatomicRegionSequence = Sequence([_code("89545001", "SCT", "Face")])
    return ds


def _rgb_pixel_module(ds: Dataset, *, rows: int, columns: int, photometric: str) -> None:
    # Image Pixel (C.7.6.3) as constrained by the VL Image module (C.8.12.1) for 8-bit colour.
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = photometric
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelRepresentation = 0


def build_video_photographic(
    mp4: bytes,
    *,
    width: int,
    height: int,
    n_frames: int,
    fps: float,
    patient_name: str = "PHANTOM^FACESYM",
    patient_id: str = "PHANTOM",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    series_description: str = "",
    study_description: str = "",
    series_number: int = 1,
    instance_number: int = 1,
    protocol_name: str = "",
    image_comments: str = "",
) -> Dataset:
    """Wrap an H.264 MP4 in a Video Photographic Image object (PS3.3 A.32.7).

    Parameters
    ----------
    mp4
        The whole MP4 file (H.264 High Profile, level <= 4.1, yuv420p), e.g. from
        :func:`service.media.encode.encode_mp4`; stored as ONE fragment with an empty Basic Offset
        Table under transfer syntax 1.2.840.10008.1.2.4.102 (PS3.5 8.2.7, A.4).
    width, height, n_frames, fps
        The video's size, frame count and frame rate (Multi-frame C.7.6.6, Cine C.7.6.5).
    patient_name, patient_id, study_uid, series_uid, sop_uid
        Identifiers; UIDs are generated when None.
    series_description, study_description, series_number, instance_number, protocol_name, image_comments
        Descriptive text the scheduler matches tasks on.

    Returns
    -------
    pydicom.Dataset
        With file_meta set, ready for :func:`write_dicom`.
    """
    if not (fps > 0 and n_frames > 0 and width > 0 and height > 0):
        raise ValueError(f"need positive size, frame count and fps, got {width}x{height} {n_frames} @ {fps}")
    ds = _base_dataset(
        VIDEO_PHOTOGRAPHIC,
        MPEG4HP41,
        patient_name=patient_name,
        patient_id=patient_id,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        series_description=series_description,
        study_description=study_description,
        series_number=series_number,
        instance_number=instance_number,
        protocol_name=protocol_name,
        image_comments=image_comments,
    )
    # PS3.5 8.2.7: MPEG-4 AVC 4:2:0 is described as YBR_PARTIAL_420.
    _rgb_pixel_module(ds, rows=height, columns=width, photometric="YBR_PARTIAL_420")
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_14496_10"
    ds.LossyImageCompressionRatio = f"{(width * height * 3 * n_frames) / max(len(mp4), 1):.1f}"
    # Multi-frame (C.7.6.6) and Cine (C.7.6.5). Frame Time is a DS: at most 16 characters.
    ds.NumberOfFrames = n_frames
    ds.FrameIncrementPointer = _FRAME_TIME_TAG
    ds.FrameTime = f"{1000.0 / fps:.6g}"
    ds.CineRate = max(1, round(fps))
    ds.RecommendedDisplayFrameRate = max(1, round(fps))
    ds.StartTrim, ds.StopTrim = 1, n_frames
    ds.ActualFrameDuration = max(1, round(1000.0 / fps))
    ds.PreferredPlaybackSequencing = 0  # looping
    ds.PixelData = encapsulate([mp4], has_bot=False)
    ds["PixelData"].VR = "OB"
    return ds


def build_vl_photograph(
    rgb: np.ndarray,
    *,
    patient_name: str = "PHANTOM^FACESYM",
    patient_id: str = "PHANTOM",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    series_description: str = "",
    study_description: str = "",
    series_number: int = 1,
    instance_number: int = 1,
    protocol_name: str = "",
    image_comments: str = "",
) -> Dataset:
    """Store one RGB photograph as a VL Photographic Image (PS3.3 A.32.4), uncompressed, explicit VR LE.

    Parameters
    ----------
    rgb
        (H, W, 3) uint8 image.
    patient_name, patient_id, study_uid, series_uid, sop_uid, series_description, study_description,
    series_number, instance_number, protocol_name, image_comments
        As for :func:`build_video_photographic`.

    Returns
    -------
    pydicom.Dataset
        With file_meta set, ready for :func:`write_dicom`.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    ds = _base_dataset(
        VL_PHOTOGRAPHIC,
        ExplicitVRLittleEndian,
        patient_name=patient_name,
        patient_id=patient_id,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        series_description=series_description,
        study_description=study_description,
        series_number=series_number,
        instance_number=instance_number,
        protocol_name=protocol_name,
        image_comments=image_comments,
    )
    _rgb_pixel_module(ds, rows=rgb.shape[0], columns=rgb.shape[1], photometric="RGB")
    ds.LossyImageCompression = "00"
    data = np.ascontiguousarray(rgb).tobytes()
    # Values have even length (PS3.5 7.1.1): 3*H*W is odd when H and W are both odd.
    ds.PixelData = data + b"\x00" if len(data) % 2 else data
    ds["PixelData"].VR = "OB"
    return ds


def write_dicom(ds: Dataset, path: str | Path) -> Path:
    """Write ``ds`` as a PS3.10 file atomically: ``path.part``, fsync, rename, fsync the directory.

    Returns
    -------
    Path
        ``path``. The File Meta Information is validated (``enforce_file_format=True``).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    try:
        with open(tmp, "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    log.debug("wrote DICOM %s (SOP Instance UID %s)", path.name, ds.get("SOPInstanceUID"))
    return path


def _fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
