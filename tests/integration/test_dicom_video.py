"""DICOM video and photo objects: build → write → validate with real peers → read back → compare."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import require_peer
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000, UID, ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from service.errors import UnreadableInputError
from service.media.decode import open_media
from service.media.dicom_io import (
    build_video_photographic,
    build_vl_photograph,
    dicom_summary,
    write_dicom,
)
from service.media.encode import encode_mp4

W, H, N, FPS = 320, 240, 20, 25.0
SECONDARY_CAPTURE = UID("1.2.840.10008.5.1.4.1.1.7")
MULTIFRAME_TRUE_COLOR_SC = UID("1.2.840.10008.5.1.4.1.1.7.4")
HEVC_MAIN = UID("1.2.840.10008.1.2.4.107")


def _gradient_frames() -> list[np.ndarray]:
    """A smooth diagonal gradient moving 4 px per frame (easy for H.264, so the round trip is tight)."""
    y, x = np.mgrid[0:H, 0:W]
    frames = []
    for i in range(N):
        r = (x + 4 * i) % 256
        g = (y * 255 // (H - 1)).astype(np.int64)
        b = ((x + y) // 3 + 8 * i) % 256
        frames.append(np.stack([r, g, b], axis=2).astype(np.uint8))
    return frames


@pytest.fixture(scope="module")
def originals() -> list[np.ndarray]:
    return _gradient_frames()


@pytest.fixture(scope="module")
def video_dcm(tmp_path_factory: pytest.TempPathFactory, originals: list[np.ndarray]) -> Path:
    mp4 = encode_mp4(originals, FPS)
    ds = build_video_photographic(
        mp4,
        width=W,
        height=H,
        n_frames=N,
        fps=FPS,
        series_description="Facial palsy smile",
        protocol_name="FACESYM SMILE",
    )
    return write_dicom(ds, tmp_path_factory.mktemp("dicom") / "video.dcm")


def _dciodvfy(path: Path) -> subprocess.CompletedProcess[str]:
    exe = require_peer("dciodvfy")
    return subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)


def _assert_no_dciodvfy_errors(path: Path) -> None:
    proc = _dciodvfy(path)
    print(proc.stderr)
    assert proc.returncode == 0, proc.stderr
    assert "Error" not in proc.stderr, proc.stderr


@pytest.mark.peers
def test_video_photographic_passes_dciodvfy(video_dcm: Path) -> None:
    _assert_no_dciodvfy_errors(video_dcm)


@pytest.mark.peers
def test_video_photographic_parses_with_dcmdump(video_dcm: Path) -> None:
    exe = require_peer("dcmdump")
    proc = subprocess.run([exe, "-Un", str(video_dcm)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "E:" not in proc.stderr, proc.stderr
    assert "1.2.840.10008.5.1.4.1.1.77.1.4.1" in proc.stdout
    assert "1.2.840.10008.1.2.4.102" in proc.stdout


def test_video_photographic_round_trip(video_dcm: Path, originals: list[np.ndarray]) -> None:
    media = open_media(video_dcm)
    info = media.info
    assert (info.kind, info.width, info.height, info.frames) == ("video", W, H, N)
    assert info.source == "dicom/video/h264"
    assert info.fps == pytest.approx(FPS)
    frames = list(media.frames())
    assert len(frames) == N
    assert np.all(np.diff([f.time_s for f in frames]) > 0)
    for frame, original in zip(frames, originals, strict=True):
        diff = np.abs(frame.rgb.astype(np.int16) - original.astype(np.int16)).mean()
        assert diff < 6, f"frame {frame.index}: mean abs diff {diff:.2f}"


def test_video_object_attributes(video_dcm: Path) -> None:
    ds = pydicom.dcmread(video_dcm)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.102"
    assert len(str(ds.FrameTime)) <= 16 and float(ds.FrameTime) == pytest.approx(40.0)
    assert ds.FrameIncrementPointer == 0x00181063
    assert ds.AnatomicRegionSequence[0].CodeValue == "89545001"
    with open(video_dcm, "rb") as fh:
        assert fh.read(132)[128:] == b"DICM"


def test_dicom_summary_has_uids_and_no_phi(video_dcm: Path) -> None:
    summary = dicom_summary(video_dcm)
    ds = pydicom.dcmread(video_dcm, stop_before_pixels=True)
    assert summary["sop_instance_uid"] == ds.SOPInstanceUID
    assert summary["study_instance_uid"] == ds.StudyInstanceUID
    assert summary["series_instance_uid"] == ds.SeriesInstanceUID
    assert summary["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.77.1.4.1"
    assert summary["transfer_syntax_uid"] == "1.2.840.10008.1.2.4.102"
    assert (summary["modality"], summary["number_of_frames"]) == ("XC", N)
    assert summary["series_description"] == "Facial palsy smile"
    assert summary["protocol_name"] == "FACESYM SMILE"
    assert summary["image_comments"] is None
    assert not {k for k in summary if "patient" in k.lower()}
    assert "PHANTOM" not in repr(summary)


def test_corrupt_fragment_is_unreadable(video_dcm: Path, tmp_path: Path) -> None:
    data = bytearray(video_dcm.read_bytes())
    start = data.index(b"ftyp") - 4  # the MP4 starts 4 bytes before its first box type
    rng = np.random.default_rng(7)
    data[start : len(data) - 8] = rng.integers(0, 256, len(data) - 8 - start, dtype=np.uint8).tobytes()
    bad = tmp_path / "corrupt.dcm"
    bad.write_bytes(bytes(data))
    with pytest.raises(UnreadableInputError, match="corrupt.dcm"):
        list(open_media(bad).frames())


def test_broken_item_tag_is_unreadable(video_dcm: Path, tmp_path: Path) -> None:
    data = bytearray(video_dcm.read_bytes())
    pos = data.index(b"ftyp") - 12  # the fragment's item tag (FFFE,E000) + length precede the MP4
    data[pos : pos + 4] = b"\x01\x02\x03\x04"
    bad = tmp_path / "badtag.dcm"
    bad.write_bytes(bytes(data))
    with pytest.raises(UnreadableInputError, match="corrupt encapsulated pixel data"):
        open_media(bad)


def test_truncated_dicom_video_never_leaks(video_dcm: Path, tmp_path: Path) -> None:
    data = video_dcm.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) * 2 // 3])
    try:
        frames = list(open_media(cut).frames())
    except UnreadableInputError:
        return
    assert 0 < len(frames) <= N


def test_hevc_dicom_video(faces_dir: Path, tmp_path: Path) -> None:
    mov = (faces_dir / "face_noface.mov").read_bytes()
    ds = build_video_photographic(mov, width=960, height=540, n_frames=169, fps=30.0)
    ds.file_meta.TransferSyntaxUID = HEVC_MAIN
    path = write_dicom(ds, tmp_path / "hevc.dcm")
    media = open_media(path, mirrored=True)
    assert media.info.source == "dicom/video/hevc"
    assert sum(1 for _ in media.frames()) == 169


@pytest.mark.parametrize("shape", [(48, 64), (31, 45)], ids=["even", "odd-length"])
def test_vl_photograph_round_trip(tmp_path: Path, shape: tuple[int, int]) -> None:
    rgb = np.random.default_rng(3).integers(0, 256, (*shape, 3), dtype=np.uint8)
    path = write_dicom(build_vl_photograph(rgb, image_comments="rest"), tmp_path / "photo.dcm")
    media = open_media(path)
    assert (media.info.kind, media.info.source, media.info.frames) == ("image", "dicom/image", 1)
    (frame,) = list(media.frames())
    np.testing.assert_array_equal(frame.rgb, rgb)
    assert dicom_summary(path)["image_comments"] == "rest"
    assert not path.with_name("photo.dcm.part").exists()


@pytest.mark.peers
def test_vl_photograph_passes_dciodvfy(tmp_path: Path) -> None:
    rgb = np.zeros((31, 45, 3), np.uint8)
    _assert_no_dciodvfy_errors(write_dicom(build_vl_photograph(rgb), tmp_path / "photo.dcm"))


# ----------------------------------------------------------------- other photo encodings we accept
def _secondary_capture(transfer_syntax: UID, sop_class: UID = SECONDARY_CAPTURE) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OT"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    return ds


def test_jpeg_baseline_ybr_photo_is_rgb(tmp_path: Path) -> None:
    y, x = np.mgrid[0:64, 0:96]
    rgb = np.stack([x * 2, y * 3, np.full_like(x, 128)], axis=2).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95, subsampling=1)  # 4:2:2
    ds = _secondary_capture(JPEGBaseline8Bit)
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PlanarConfiguration = 64, 96, 3, 0
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = encapsulate([buf.getvalue()])
    path = tmp_path / "jpeg.dcm"
    ds.save_as(path, enforce_file_format=True)
    (frame,) = list(open_media(path).frames())
    assert np.abs(frame.rgb.astype(int) - rgb.astype(int)).mean() < 3  # RGB, not YCbCr


def test_monochrome_multiframe_photo(tmp_path: Path) -> None:
    grey = np.arange(3 * 8 * 10, dtype=np.uint8).reshape(3, 8, 10)
    ds = _secondary_capture(ExplicitVRLittleEndian, MULTIFRAME_TRUE_COLOR_SC)
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.NumberOfFrames = 8, 10, 1, 3
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = grey.tobytes()
    path = tmp_path / "mono.dcm"
    ds.save_as(path, enforce_file_format=True)
    media = open_media(path)
    assert (media.info.frames, media.info.kind) == (3, "video")
    frames = list(media.frames())
    assert len(frames) == 3
    for frame, g in zip(frames, grey, strict=True):
        np.testing.assert_array_equal(frame.rgb, np.repeat(g[:, :, None], 3, axis=2))


def test_dicom_without_pixel_data_is_unreadable(tmp_path: Path) -> None:
    ds = _secondary_capture(ExplicitVRLittleEndian)
    path = tmp_path / "nopixels.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(UnreadableInputError, match="no pixel data"):
        open_media(path)


def test_unsupported_transfer_syntax_is_unreadable(tmp_path: Path) -> None:
    ds = _secondary_capture(JPEG2000)
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 8, 8, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60])  # a J2K start, then nonsense
    path = tmp_path / "j2k.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(UnreadableInputError, match="j2k.dcm"):
        list(open_media(path).frames())
