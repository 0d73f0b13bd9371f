"""The delivery SCU against a real pynetdicom storage SCP on 127.0.0.1 (in this process)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from conftest import free_port
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import SecondaryCaptureImageStorage, Verification

from service.config import Destination
from service.dicom.scu import DeliveryError, send_files, sends_only


def _sc(path: Path, n: int) -> Path:
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = ds.SeriesInstanceUID = generate_uid()
    ds.Modality, ds.InstanceNumber = "OT", n
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def scp():  # type: ignore[no-untyped-def]
    got: list[str] = []

    def on_store(event: evt.Event) -> int:
        got.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000 if len(got) != 3 else 0xA700  # the third object: out of resources

    ae = AE(ae_title="PEER")
    ae.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield port, got
    finally:
        server.shutdown()


def test_sends_only_keeps_responses_for_the_sender_and_sets_nodelay(scp) -> None:  # type: ignore[no-untyped-def]
    port, _ = scp
    ae = AE(ae_title="FACESYM")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="PEER")
    assert assoc.is_established
    try:
        sends_only(assoc)
        # The reactor's non-blocking polls find nothing, even with a message queued ...
        assoc.dimse.msg_queue.put((1, "queued response"))
        assert assoc.dimse.get_msg(block=False) == (None, None)
        # ... which stays for the sender's blocking wait.
        assert assoc.dimse.get_msg(block=True) == (1, "queued response")
        sock = assoc.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        for _ in range(20):
            assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_send_files_delivers_in_order_and_names_a_failure(scp, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    port, got = scp
    files = [_sc(tmp_path / f"{n}.dcm", n) for n in range(1, 5)]
    peer = Destination("PEER", "127.0.0.1", port)
    send_files(peer, files[:2], "FACESYM", timeout=10)
    assert len(got) == 2
    with pytest.raises(DeliveryError, match="failed with status 0xA700"):
        send_files(peer, files[2:], "FACESYM", timeout=10)
    assert len(got) == 3  # the association stopped at the refusal
