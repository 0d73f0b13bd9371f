"""The running service sends the FHIR Bundle too: a loopback EHR that fails the first POST (503) ends up
with exactly one result set per study, and a re-delivery updates instead of duplicating."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import free_port
from sqlalchemy import select, update
from test_dicom_loop import exam  # noqa: F401 - module fixture: one phantom smile video
from test_fhir_delivery import TOKEN, FhirStore, fhir_server

from service.config import Destination, Settings
from service.demo import Receiver, send
from service.store.db import Delivery, DeliveryState, Job, JobState

pytestmark = pytest.mark.slow
PATIENT_SYSTEM = "urn:oid:1.2.826.0.1.3680043.10.999"


def _wait(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def test_sr_and_fhir_delivered_once_despite_a_503(exam: tuple[str, Path], tmp_path: Path,  # noqa: F811
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from service.jobs.scheduler import FaceSymService

    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    study_uid, path = exam
    ehr = FhirStore(fail_first=1)
    ehr.seed({"resourceType": "Patient", "identifier": [{"system": PATIENT_SYSTEM, "value": "PHANTOM"}]})
    ehr.seed({"resourceType": "ImagingStudy", "status": "available",
              "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}]})
    receiver = Receiver(0)
    with fhir_server(ehr) as base_url:
        settings = replace(
            Settings(), web_port=0, data_dir=tmp_path / "var", dicom_port=free_port(), quiet_seconds=1.0,
            poll_seconds=0.2, retry_base_seconds=0.5, retry_max_seconds=1.0, fhir_base_url=base_url,
            fhir_patient_identifier_system=PATIENT_SYSTEM, fhir_token=TOKEN,
            destinations=(Destination("FACESYM_DEMO", "127.0.0.1", receiver.port),),
        )
        service = FaceSymService(settings)
        service.start()
        try:
            send([path], "127.0.0.1", settings.dicom_port, "FACESYM")

            def job_state() -> JobState | None:
                with service.sessions() as s:
                    return s.scalars(select(Job.state)).first()

            _wait(lambda: job_state() is JobState.DELIVERED, 180, "SR and Bundle delivered")
            assert receiver.wait_for(study_uid, 1) is not None
            assert ehr.count("DiagnosticReport") == 1
            observations = ehr.count("Observation")
            assert observations >= 1
            posts = [r for r in ehr.requests if r.get("method") == "POST"]
            assert len(posts) >= 2  # the 503, then the accepted one
            assert all(r["headers"].get("Authorization") == f"Bearer {TOKEN}" for r in posts)
            # Re-deliver the same result: the EHR updates, it does not duplicate.
            with service.sessions.begin() as s:
                s.execute(update(Delivery).where(Delivery.destination.like("fhir:%"))
                          .values(state=DeliveryState.PENDING, attempts=0))
                s.execute(update(Job).values(state=JobState.REPORTED))
            _wait(lambda: job_state() is JobState.DELIVERED, 60, "re-delivery")
            assert ehr.count("DiagnosticReport") == 1 and ehr.count("Observation") == observations
        finally:
            service.stop()
            receiver.stop()
