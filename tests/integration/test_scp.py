"""The storage SCP over real associations: pynetdicom as the SCU, and DCMTK's storescu/echoscu (peers)."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from conftest import require_peer
from pydicom.uid import MPEG4HP41, UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from service.config import Settings
from service.dicom import scp as scp_module
from service.dicom import status
from service.engine import ENGINE_VERSION
from service.media.dicom_io import (
    VIDEO_PHOTOGRAPHIC,
    build_video_photographic,
    build_vl_photograph,
)
from service.store.db import Instance, Job, JobState, Patient, Series, Study, open_database
from service.store.files import FileStore
from service.store.ingest import dataset_sha256

REPO = Path(__file__).resolve().parents[2]
VL_PHOTO = "1.2.840.10008.5.1.4.1.1.77.1.4"
CTImageStorage = "1.2.840.10008.5.1.4.1.1.2"
Verification = "1.2.840.10008.1.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Scp:
    settings: Settings
    sessions: sessionmaker
    files: FileStore
    port: int

    def count(self, model) -> int:
        with self.sessions() as s:
            return s.scalar(select(func.count()).select_from(model))

    def instances(self) -> list[Instance]:
        with self.sessions() as s:
            return list(s.scalars(select(Instance).order_by(Instance.id)))

    def stored_files(self) -> list[Path]:
        return [p for p in self.files.root.rglob("*.dcm") if ".incoming" not in p.parts]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Scp]]:
    """Start an SCP on a free loopback port with ``Settings`` overrides; every one is shut down after."""
    servers: list[ThreadedAssociationServer] = []
    engines: list[Any] = []

    def _start(**overrides) -> Scp:
        data = tmp_path / f"var{len(servers)}"
        data.mkdir()
        values: dict[str, Any] = dict(
            data_dir=data, dicom_port=_free_port(), quiet_seconds=1, min_free_disk_mb=1
        )
        values.update(overrides)
        settings = dataclasses.replace(Settings(), **values).validate()
        sessions = open_database(settings.effective_database_url)
        files = FileStore(settings.files_dir)
        server = scp_module.start_scp(settings, sessions, files, ENGINE_VERSION)
        servers.append(server)
        engines.append(sessions.kw["bind"])
        return Scp(settings, sessions, files, settings.dicom_port)

    yield _start
    for server in servers:
        scp_module.stop(server)
    for engine in engines:
        engine.dispose()


@pytest.fixture
def scp(start) -> Scp:
    return start()


@pytest.fixture(scope="module")
def phantom_video(tmp_path_factory) -> Path:
    """A real phantom smile clip as a Video Photographic object (H.264, TS 1.2.840.10008.1.2.4.102)."""
    from service import phantom
    from service.domain import Task

    path = tmp_path_factory.mktemp("phantom") / "smile.dcm"
    face = phantom.load_face(REPO / "service/phantom/data/demo_face.jpg")
    spec = phantom.PhantomSpec(motions=(phantom.TaskMotion(Task.SMILE, 0.25, 0.1),))
    phantom.write_phantom(face, spec, path, fmt="dicom")
    return path


def _associate(port: int, contexts: list[tuple[str, list[str]]], calling: str = "TESTSCU"):
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    return ae.associate("127.0.0.1", port, ae_title="FACESYM")


def _store(port: int, dataset_or_path, sop_class: str, ts: str, calling: str = "TESTSCU") -> int:
    assoc = _associate(port, [(sop_class, [ts])], calling)
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(dataset_or_path)
        assert "Status" in rsp, "no response from the SCP"
        return int(rsp.Status)
    finally:
        assoc.release()


def _store_video(port: int, path: Path, calling: str = "TESTSCU") -> int:
    return _store(port, path, VIDEO_PHOTOGRAPHIC, MPEG4HP41, calling)


def _photo_ds(**kw) -> pydicom.Dataset:
    rgb = np.random.default_rng(0).integers(0, 255, (8, 10, 3), dtype=np.uint8)
    return build_vl_photograph(rgb, **kw)


# ---------------------------------------------------------------------------------------------- tests
def test_c_echo(scp):
    assoc = _associate(scp.port, [(Verification, [ExplicitVRLittleEndian])])
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_c_store_video_is_durable_with_rows_and_a_received_job(scp, phantom_video, caplog):
    caplog.set_level(logging.INFO)
    assert _store_video(scp.port, phantom_video) == status.SUCCESS
    src = pydicom.dcmread(phantom_video, stop_before_pixels=True)
    (inst,) = scp.instances()
    stored = scp.files.abspath(inst.path)
    assert inst.path == f"{src.StudyInstanceUID}/{src.SeriesInstanceUID}/{src.SOPInstanceUID}.dcm"
    # The data set arrives byte for byte; the File Meta group is the receiver's (PS3.10 7.1).
    assert dataset_sha256(stored) == dataset_sha256(phantom_video) == inst.sha256
    back = pydicom.dcmread(stored)
    assert back.file_meta.TransferSyntaxUID == MPEG4HP41
    assert back.PixelData == pydicom.dcmread(phantom_video).PixelData
    assert (inst.sop_class_uid, inst.transfer_syntax_uid, inst.calling_ae) == (
        VIDEO_PHOTOGRAPHIC,
        MPEG4HP41,
        "TESTSCU",
    )
    assert inst.number_of_frames == int(src.NumberOfFrames)
    assert scp.count(Patient) == scp.count(Study) == scp.count(Series) == 1
    with scp.sessions() as s:
        job = s.scalars(select(Job)).one()
        assert (job.state, job.engine_version) == (JobState.RECEIVED, ENGINE_VERSION)
        assert s.scalars(select(Series)).one().series_description.startswith("FaceSym phantom")
    assert list(scp.files.incoming_dir().iterdir()) == []
    assert "TESTSCU" in caplog.text and src.SOPInstanceUID in caplog.text
    assert str(src.PatientName) not in caplog.text


def test_identical_resend_is_success_and_stored_once(scp, phantom_video):
    assert _store_video(scp.port, phantom_video) == status.SUCCESS
    assert _store_video(scp.port, phantom_video) == status.SUCCESS
    assert scp.count(Instance) == 1 and len(scp.stored_files()) == 1


@pytest.mark.parametrize("policy", ["version", "reject"])
def test_same_uid_other_bytes_per_policy(start, phantom_video, policy):
    scp = start(duplicate_policy=policy)
    assert _store_video(scp.port, phantom_video) == status.SUCCESS
    changed = pydicom.dcmread(phantom_video)
    changed.ImageComments = "re-exported"
    code = _store(scp.port, changed, VIDEO_PHOTOGRAPHIC, MPEG4HP41)
    if policy == "version":
        assert code == status.SUCCESS
        assert [i.version for i in scp.instances()] == [1, 2]
        assert scp.instances()[1].path.endswith(".v2.dcm")
        assert len(scp.stored_files()) == 2
    else:
        assert code == status.DUPLICATE_SOP_INSTANCE
        assert [i.version for i in scp.instances()] == [1]
        assert len(scp.stored_files()) == 1


def test_unsupported_sop_class_is_refused_at_negotiation(scp):
    ct = _associate(scp.port, [(CTImageStorage, [ExplicitVRLittleEndian])])
    assert not ct.is_established  # no acceptable presentation context: pynetdicom aborts
    mixed = _associate(
        scp.port, [(CTImageStorage, [ExplicitVRLittleEndian]), (Verification, [ExplicitVRLittleEndian])]
    )
    assert mixed.is_established
    assert [cx.abstract_syntax for cx in mixed.rejected_contexts] == [CTImageStorage]
    assert [cx.abstract_syntax for cx in mixed.accepted_contexts] == [Verification]
    ds = _photo_ds()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(CTImageStorage)
    with pytest.raises(ValueError, match="presentation context"):
        mixed.send_c_store(ds)
    mixed.release()
    assert scp.count(Instance) == 0


def test_mpeg_contexts_are_offered():
    ae = scp_module.build_ae(Settings())
    offered = {str(cx.abstract_syntax): {str(t) for t in cx.transfer_syntax} for cx in ae.supported_contexts}
    for uid in scp_module.STORAGE_SOP_CLASSES:
        assert {f"1.2.840.10008.1.2.4.{n}" for n in range(102, 109)} <= offered[uid]
        assert {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50"} <= offered[uid]
    assert "1.2.840.10008.5.1.4.1.1.2" not in offered


def test_calling_ae_not_allowed_is_rejected(start, phantom_video):
    scp = start(allowed_calling_aes=("PACS",))
    denied = _associate(scp.port, [(VIDEO_PHOTOGRAPHIC, [MPEG4HP41])], calling="INTRUDER")
    assert denied.is_rejected and not denied.is_established
    assert _store_video(scp.port, phantom_video, calling="PACS") == status.SUCCESS
    assert scp.count(Instance) == 1


def test_disk_reserve_refuses_with_out_of_resources(start, phantom_video, caplog):
    caplog.set_level(logging.WARNING)
    scp = start(min_free_disk_mb=10**12)
    assert _store_video(scp.port, phantom_video) == status.OUT_OF_RESOURCES
    assert scp.count(Instance) == 0 and scp.stored_files() == []
    assert list(scp.files.incoming_dir().iterdir()) == []
    assert "disk reserve reached" in caplog.text


def test_corrupt_pixel_data_is_still_stored(scp):
    ds = build_video_photographic(os.urandom(4001) + b"\x00", width=64, height=48, n_frames=10, fps=10)
    assert _store(scp.port, ds, VIDEO_PHOTOGRAPHIC, MPEG4HP41) == status.SUCCESS
    assert scp.count(Instance) == 1 and scp.count(Job) == 1


def test_missing_study_uid_fails_and_nothing_is_stored(scp):
    ds = _photo_ds()
    del ds.StudyInstanceUID
    code = _store(scp.port, ds, VL_PHOTO, ExplicitVRLittleEndian)
    assert code & 0xF000 == 0xC000 and code == status.CANNOT_UNDERSTAND
    assert scp.count(Instance) == 0 and scp.count(Study) == 0 and scp.stored_files() == []
    assert list(scp.files.incoming_dir().iterdir()) == []


def test_dataset_that_contradicts_the_request_does_not_match(scp, tmp_path, monkeypatch):
    from pynetdicom import _config

    # Sent from a file, pynetdicom takes the request's Affected SOP Class from the File Meta group and
    # streams the data set as it is: make the two disagree.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ds = _photo_ds()
    ds.SOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
    ds.file_meta.MediaStorageSOPClassUID = UID(VL_PHOTO)
    path = tmp_path / "mismatch.dcm"
    ds.preamble = b"\0" * 128
    ds.save_as(path, enforce_file_format=False)  # True would "fix" the File Meta from the data set
    assert pydicom.dcmread(path).file_meta.MediaStorageSOPClassUID == VL_PHOTO
    assert _store(scp.port, path, VL_PHOTO, ExplicitVRLittleEndian) == status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert scp.count(Instance) == 0 and scp.stored_files() == []


def test_storage_failure_is_out_of_resources_and_leaves_nothing(scp, monkeypatch):
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.orm import Session

    def boom(self):
        raise OperationalError("COMMIT", {}, Exception("disk I/O error"))

    monkeypatch.setattr(Session, "commit", boom)
    code = _store(scp.port, _photo_ds(), VL_PHOTO, ExplicitVRLittleEndian)
    monkeypatch.undo()
    assert code == status.OUT_OF_RESOURCES
    assert scp.stored_files() == [] and list(scp.files.incoming_dir().iterdir()) == []


def test_store_works_without_chunked_receiving(scp, phantom_video, monkeypatch):
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", False)  # data set arrives in memory
    assert _store_video(scp.port, phantom_video) == status.SUCCESS
    (inst,) = scp.instances()
    assert dataset_sha256(scp.files.abspath(inst.path)) == dataset_sha256(phantom_video)


def test_photo_and_secondary_capture_are_stored(scp):
    study = generate_uid()
    assert _store(scp.port, _photo_ds(study_uid=study), VL_PHOTO, ExplicitVRLittleEndian) == status.SUCCESS
    sc = _photo_ds(study_uid=study)
    sc.SOPClassUID = sc.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
    assert _store(scp.port, sc, "1.2.840.10008.5.1.4.1.1.7", ExplicitVRLittleEndian) == status.SUCCESS
    assert scp.count(Instance) == 2 and scp.count(Study) == 1 and scp.count(Job) == 1


# ------------------------------------------------------------------------------------- DCMTK peers
def _dcmtk_env() -> dict[str, str]:
    return dict(os.environ, TCP_NODELAY="1")


@pytest.mark.peers
def test_echoscu(scp):
    echoscu = require_peer("echoscu")
    run = subprocess.run(
        [echoscu, "-aet", "ECHOSCU", "-aec", "FACESYM", "127.0.0.1", str(scp.port)],
        capture_output=True,
        text=True,
        timeout=30,
        env=_dcmtk_env(),
    )
    assert run.returncode == 0, run.stderr


@pytest.mark.peers
def test_storescu_sends_the_phantom_video(scp, phantom_video):
    storescu = require_peer("storescu")
    # -R: propose only the SOP classes of the files given; -xn: propose MPEG-4 AVC/H.264 HP@L4.1 (.102).
    run = subprocess.run(
        [
            storescu,
            "-R",
            "-xn",
            "-aet",
            "STORESCU",
            "-aec",
            "FACESYM",
            "127.0.0.1",
            str(scp.port),
            str(phantom_video),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=_dcmtk_env(),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    (inst,) = scp.instances()
    assert inst.calling_ae == "STORESCU" and inst.transfer_syntax_uid == MPEG4HP41
    assert dataset_sha256(scp.files.abspath(inst.path)) == dataset_sha256(phantom_video)
    # Same bytes again: still one instance; storescu still exits 0 (Success).
    again = subprocess.run(
        [storescu, "-R", "-xn", "-aec", "FACESYM", "127.0.0.1", str(scp.port), str(phantom_video)],
        capture_output=True,
        text=True,
        timeout=60,
        env=_dcmtk_env(),
    )
    assert again.returncode == 0 and scp.count(Instance) == 1


@pytest.mark.peers
def test_storescu_without_mpeg_proposal_cannot_send_video(scp, phantom_video):
    storescu = require_peer("storescu")
    run = subprocess.run(
        [storescu, "-R", "-aec", "FACESYM", "127.0.0.1", str(scp.port), str(phantom_video)],
        capture_output=True,
        text=True,
        timeout=60,
        env=_dcmtk_env(),
    )
    assert run.returncode != 0
    assert scp.count(Instance) == 0


@pytest.mark.peers
def test_storescu_ct_is_refused_at_negotiation(scp, tmp_path):
    storescu = require_peer("storescu")
    ds = _photo_ds()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(CTImageStorage)
    ct = tmp_path / "ct.dcm"
    ds.save_as(ct, enforce_file_format=True)
    run = subprocess.run(
        [storescu, "-R", "-aec", "FACESYM", "127.0.0.1", str(scp.port), str(ct)],
        capture_output=True,
        text=True,
        timeout=60,
        env=_dcmtk_env(),
    )
    assert run.returncode != 0
    assert (
        "presentation context" in (run.stdout + run.stderr).lower()
        or "abort" in (run.stdout + run.stderr).lower()
    )
    assert scp.count(Instance) == 0


def test_silent_connections_do_not_lock_out_an_allowed_modality(start, phantom_video, monkeypatch):
    """Issue 14: raw TCP connects that never send an A-ASSOCIATE-RQ used to fill every association slot for
    30 s each (pynetdicom's ARTIM wait counts as an association). Now they wait outside pynetdicom, at most
    PRE_ASSOCIATION_TIMEOUT, in a capped pool: twice max_associations of them, kept open, do not stop an
    allowed AE's C-ECHO and C-STORE, and they are closed by the server after the timeout. (All come from
    127.0.0.1 here, as the modality does, so they stay under the per-peer cap of 8.)"""
    import time

    monkeypatch.setattr(scp_module, "PRE_ASSOCIATION_TIMEOUT", 2.0)
    scp = start(max_associations=3, allowed_calling_aes=("PACS",))
    silent = [socket.create_connection(("127.0.0.1", scp.port), timeout=10) for _ in range(6)]
    try:
        time.sleep(0.5)  # every silent connection is accepted and waiting
        assoc = _associate(scp.port, [(Verification, [ExplicitVRLittleEndian])], calling="PACS")
        assert assoc.is_established, "an allowed modality was refused while silent sockets were open"
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        assert _store_video(scp.port, phantom_video, calling="PACS") == status.SUCCESS
        # The server closes them (no A-ASSOCIATE-RQ within the timeout): a read sees EOF, not a timeout.
        for sock in silent:
            sock.settimeout(10)
            assert sock.recv(1) == b""
    finally:
        for sock in silent:
            sock.close()
    assert scp.count(Instance) == 1


def test_a_flood_from_one_peer_is_capped(start, monkeypatch):
    """Beyond MAX_SILENT_PER_PEER silent connections from one address, new ones are closed at once."""
    monkeypatch.setattr(scp_module, "MAX_SILENT_PER_PEER", 2)
    scp = start()
    held = [socket.create_connection(("127.0.0.1", scp.port), timeout=10) for _ in range(2)]
    try:
        import time

        time.sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", scp.port), timeout=3)
        try:
            assert extra.recv(1) == b""  # closed by the server well before the 5-s wait would end
        finally:
            extra.close()
    finally:
        for sock in held:
            sock.close()


def test_dcmtk_modality_is_served_during_a_silent_socket_flood(start, phantom_video, monkeypatch):
    """Issue 14, finding 1, with DCMTK as the modality: while twice max_associations raw sockets sit
    silent, echoscu and storescu (the video) from an allowed AE succeed."""
    echoscu, storescu = require_peer("echoscu"), require_peer("storescu")
    monkeypatch.setattr(scp_module, "PRE_ASSOCIATION_TIMEOUT", 3.0)
    scp = start(max_associations=3, allowed_calling_aes=("PACS",))
    silent = [socket.create_connection(("127.0.0.1", scp.port), timeout=10) for _ in range(6)]
    env = dict(os.environ, TCP_NODELAY="1")
    try:
        echo = subprocess.run([echoscu, "-aet", "PACS", "-aec", "FACESYM", "127.0.0.1", str(scp.port)],
                              capture_output=True, text=True, timeout=60, env=env)
        assert echo.returncode == 0, echo.stderr
        command = [storescu, "-R", "-xn", "-aet", "PACS", "-aec", "FACESYM", "127.0.0.1", str(scp.port)]
        store = subprocess.run([*command, str(phantom_video)], capture_output=True, text=True, timeout=120,
                               env=env)
        assert store.returncode == 0, store.stderr
    finally:
        for sock in silent:
            sock.close()
    assert scp.count(Instance) == 1


def test_every_association_place_is_usable_and_one_address_cannot_take_them_all(start):
    """Issue 14, finding 1: with max_associations = 4, one address holds at most 2 (per_peer_limit) and
    its next connection is closed; two more from another address are accepted (4 in all, every place
    usable); the 5th association, from a third address, is rejected by the global limit."""
    scp = start(max_associations=4)
    assert scp_module.per_peer_limit(4) == 2 and scp_module.per_peer_limit(10) == 8

    def hold(source: str) -> Any:
        ae = AE(ae_title="TESTSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(Verification, [ExplicitVRLittleEndian])
        return ae.associate("127.0.0.1", scp.port, ae_title="FACESYM", bind_address=(source, 0))

    held = [hold("127.0.0.1") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        third = hold("127.0.0.1")
        assert not third.is_established  # closed before negotiation: this address has its share
        held += [hold("127.0.0.2") for _ in range(2)]
        assert all(a.is_established for a in held), "a place of max_associations was not usable"
        assert all(a.send_c_echo().Status == 0x0000 for a in held)
        fifth = hold("127.0.0.3")
        assert fifth.is_rejected  # pynetdicom's A-ASSOCIATE-RJ: the global limit
    finally:
        for a in held:
            if a.is_established:
                a.release()
