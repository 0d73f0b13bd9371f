"""``facesym demo``: a phantom exam goes to FaceSym over DICOM and the SR comes back to a local receiver.

Three phantom clips (smile, eye closure, brow raise) of one study, each a DICOM Video Photographic
object, are sent by C-STORE; a small storage SCP stands in for the PACS and receives the SR.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydicom.uid import ComprehensiveSRStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from service.config import Destination, Settings
from service.domain import Task
from service.errors import FaceSymError

DEMO_AE = "FACESYM_DEMO"
MOTIONS = {Task.SMILE: (0.08, 0.25), Task.EYE_CLOSURE: (0.45, 0.45), Task.BROW_RAISE: (0.03, 0.15)}
DESCRIPTIONS = {Task.SMILE: "Smile", Task.EYE_CLOSURE: "Eye closure", Task.BROW_RAISE: "Brow raise"}


def make_exam(out_dir: Path) -> tuple[str, list[Path]]:
    """Three phantom clips of one study (the patient's left is weak in smile and brow raise)."""
    from service import phantom
    from service.media.dicom_io import build_video_photographic, write_dicom
    from service.media.encode import encode_mp4

    face = phantom.load_face(Path(__file__).resolve().parent / "phantom" / "data" / "demo_face.jpg")
    study_uid = generate_uid()
    paths = []
    for n, (task, (left, right)) in enumerate(MOTIONS.items(), 1):
        clip = phantom.render(face, phantom.PhantomSpec(motions=(phantom.TaskMotion(task, left, right),)))
        mp4 = encode_mp4(clip.frames(), clip.fps)
        ds = build_video_photographic(
            mp4, width=clip.width, height=clip.height, n_frames=clip.n_frames, fps=clip.fps,
            study_uid=study_uid, series_description=DESCRIPTIONS[task], series_number=n,
            study_description="FaceSym demo exam",
        )
        path = out_dir / f"{task.value}.dcm"
        write_dicom(ds, path)
        paths.append(path)
    return study_uid, paths


class Receiver:
    """A minimal storage SCP on 127.0.0.1 that keeps the SRs it receives (the demo's stand-in PACS)."""

    def __init__(self, port: int, ae_title: str = DEMO_AE) -> None:
        self.received: list[Any] = []
        self._cond = threading.Condition()
        ae = AE(ae_title=ae_title)
        ae.add_supported_context(ComprehensiveSRStorage)
        ae.add_supported_context("1.2.840.10008.5.1.4.1.1.7")  # key images (Secondary Capture)
        ae.add_supported_context("1.2.840.10008.5.1.4.1.1.104.1")  # PDF report (Encapsulated PDF)
        ae.add_supported_context(Verification)

        def on_store(event: Any) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            with self._cond:
                self.received.append(ds)
                self._cond.notify_all()
            return 0x0000

        server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )
        if server is None:
            raise RuntimeError(f"the demo SR receiver failed to start on 127.0.0.1:{port}")
        self.server = server
        self.port = self.server.server_address[1]

    @property
    def reports(self) -> list[Any]:
        """The SRs received (key images and PDFs are in ``received`` too)."""
        return [ds for ds in self.received if ds.SOPClassUID == ComprehensiveSRStorage]

    def wait_for(self, study_uid: str, timeout: float) -> Any | None:
        """The SR of ``study_uid`` once it has arrived, else None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ds in self.reports:
                    if ds.StudyInstanceUID == study_uid:
                        return ds
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def stop(self) -> None:
        self.server.shutdown()


def send(paths: list[Path], host: str, port: int, called_ae: str, calling_ae: str = DEMO_AE) -> None:
    from pydicom import dcmread

    from service.dicom.scu import DeliveryError, sends_only

    ae = AE(ae_title=calling_ae)
    datasets = [dcmread(p) for p in paths]
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise DeliveryError(f"FaceSym at {called_ae}@{host}:{port} did not accept the association")
    sends_only(assoc)  # see there: else a response can be lost under load
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if getattr(status, "Status", None) != 0x0000:
                raise DeliveryError(f"C-STORE of {ds.SOPInstanceUID} failed: {status}")
    finally:
        assoc.release()


def facesym_answers(host: str, port: int, ae_title: str) -> bool:
    ae = AE(ae_title=DEMO_AE)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 3
    # Nobody listening is an expected answer here, not the ERROR pynetdicom logs for it.
    quiet = logging.getLogger("pynetdicom")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        assoc = ae.associate(host, port, ae_title=ae_title)
    finally:
        quiet.setLevel(level)
    if not assoc.is_established:
        return False
    assoc.release()
    return True


def run_demo(
    settings: Settings, receiver_port: int = 0, timeout: float = 300.0
) -> tuple[list[dict[str, Any]], str | None]:
    """Send a phantom exam to FaceSym (an embedded one if none answers at the configured address) and
    return what the SR that arrives at the demo receiver says: the per-instance results
    (:func:`service.report.sr.read_report`) and the study's impression sentence."""
    from service.report.sr import read_impression, read_report

    receiver = Receiver(receiver_port)
    service = None
    try:
        if not facesym_answers(settings.dicom_host, settings.dicom_port, settings.ae_title):
            from service.jobs.scheduler import FaceSymService

            tmp = Path(tempfile.mkdtemp(prefix="facesym-demo-"))
            embedded = replace(
                settings, data_dir=tmp, database_url="", quiet_seconds=2.0, poll_seconds=0.5, web_port=0,
                destinations=(Destination(DEMO_AE, "127.0.0.1", receiver.port),),
            )
            service = FaceSymService(embedded)
            service.start()
            print(f"No FaceSym answered at {settings.ae_title}@{settings.dicom_host}:{settings.dicom_port}; "
                  f"started one for the demo (data in {tmp}).")
        else:
            print(f"Using the running FaceSym at {settings.ae_title}@{settings.dicom_host}:"
                  f"{settings.dicom_port}; it must send reports to {DEMO_AE}@127.0.0.1:{receiver.port} "
                  "(`make run` does).")
        with tempfile.TemporaryDirectory(prefix="facesym-exam-") as tmpdir:
            print("Making a phantom exam (smile, eye closure, brow raise; the left side is weak) …")
            study_uid, paths = make_exam(Path(tmpdir))
            send(paths, settings.dicom_host, settings.dicom_port, settings.ae_title)
            print(f"Sent {len(paths)} DICOM videos of study {study_uid}; waiting for the SR (FaceSym "
                  "analyses a study once it has been quiet for its quiet_seconds) …")
            sr = receiver.wait_for(study_uid, timeout)
        if sr is None:
            how = "" if service is not None else (
                f" The running FaceSym did not send it to {DEMO_AE}@127.0.0.1:{receiver.port}: start it with "
                f"`make run` (which adds that destination) or with FACESYM_DESTINATIONS="
                f"{DEMO_AE}@127.0.0.1:{receiver.port}, or stop it and let the demo start its own."
            )
            raise FaceSymError(f"no SR for study {study_uid} within {timeout:.0f} s.{how}")
        return read_report(sr), read_impression(sr)
    finally:
        if service is not None:
            service.stop()
        receiver.stop()
