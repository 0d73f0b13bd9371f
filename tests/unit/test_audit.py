"""Audit: PS3.15 A.5 message XML, the hash-chained trail (verify, tamper, export, concurrency), commands."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from service.audit import (
    MINOR_FAILURE,
    SERIOUS_FAILURE,
    AuditTrail,
    access,
    analysis_event,
    application_activity,
    config_change,
    export,
    instances_imported,
    instances_transferred,
    query,
    security_alert,
    user_authentication,
)
from service.audit.anchor import AuditAnchor
from service.audit.commands import export_command, parse_since, verify_command
from service.audit.syslog import PendingRecord, format_message, frame
from service.audit.trail import GENESIS, chain_hash
from service.config import Settings
from service.store.db import Instance, Patient, Series, Study, open_database

ROOT = Path(__file__).resolve().parents[2]

STUDY = "1.2.826.0.1.3680043.8.498.1001"
VIDEO = "1.2.840.10008.5.1.4.1.1.77.1.4.1"
PHOTO = "1.2.840.10008.5.1.4.1.1.77.1.4"
T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)


@pytest.fixture()
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    return open_database(f"sqlite:///{tmp_path / 'facesym.db'}")


@pytest.fixture()
def trail(sessions: sessionmaker[Session]) -> AuditTrail:
    return AuditTrail(sessions, source_id="facesym@test")


def _code(el: ET.Element | None) -> tuple[str | None, str | None]:
    assert el is not None
    return el.get("csd-code"), el.get("codeSystemName")


def _parse(xml: str) -> ET.Element:
    root = ET.fromstring(xml)
    assert root.tag == "AuditMessage"
    order = [child.tag for child in root]
    # schema order: EventIdentification, ActiveParticipant+, AuditSourceIdentification, objects*
    assert order[0] == "EventIdentification"
    k = order.index("AuditSourceIdentification")
    assert k >= 2 and set(order[1:k]) == {"ActiveParticipant"}
    assert set(order[k + 1:]) <= {"ParticipantObjectIdentification"}
    ident = root.find("EventIdentification")
    assert ident is not None
    assert ident.get("EventActionCode") in ("C", "R", "U", "D", "E")
    assert ident.get("EventOutcomeIndicator") in ("0", "4", "8", "12")
    datetime.fromisoformat(ident.get("EventDateTime", ""))
    for p in root.iter("ActiveParticipant"):
        assert p.get("UserID") and p.get("UserIsRequestor") in ("true", "false")
    return root


def _roles(root: ET.Element) -> dict[str, ET.Element]:
    out = {}
    for p in root.iter("ActiveParticipant"):
        for r in p.iter("RoleIDCode"):
            out[r.get("csd-code", "")] = p
    return out


# --- messages ----------------------------------------------------------------------------------------------


def test_application_activity_start_stop() -> None:
    cases: tuple[tuple[Literal["start", "stop"], str], ...] = (("start", "110120"), ("stop", "110121"))
    for which, type_code in cases:
        root = _parse(application_activity(which, local_ae="FACESYM", launcher="svc").to_xml())
        ident = root.find("EventIdentification")
        assert ident is not None and ident.get("EventActionCode") == "E"
        assert _code(root.find("EventIdentification/EventID")) == ("110100", "DCM")
        assert _code(root.find("EventIdentification/EventTypeCode")) == (type_code, "DCM")
        roles = _roles(root)
        assert roles["110150"].get("UserID") == "FACESYM"
        assert "AETITLES=FACESYM" in roles["110150"].get("AlternativeUserID", "")
        assert roles["110151"].get("UserID") == "svc" and roles["110151"].get("UserIsRequestor") == "true"
        assert root.find("AuditSourceIdentification") is not None


def test_instances_transferred_received() -> None:
    ev = instances_transferred(STUDY, {VIDEO: 3, PHOTO: 1}, "MODALITY1", "10.1.2.3", local_ae="FACESYM",
                               patient="PID-7")
    assert (ev.event_id, ev.action, ev.outcome) == ("110104", "C", 0)
    root = _parse(ev.to_xml())
    assert _code(root.find("EventIdentification/EventID")) == ("110104", "DCM")
    roles = _roles(root)
    src, dst = roles["110153"], roles["110152"]
    assert (src.get("UserID"), src.get("NetworkAccessPointID"), src.get("UserIsRequestor")) == (
        "MODALITY1", "10.1.2.3", "true")
    assert src.get("NetworkAccessPointTypeCode") == "2"
    assert (dst.get("UserID"), dst.get("UserIsRequestor")) == ("FACESYM", "false")
    objs = root.findall("ParticipantObjectIdentification")
    study = next(o for o in objs if _code(o.find("ParticipantObjectIDTypeCode")) == ("110180", "DCM"))
    assert study.get("ParticipantObjectID") == STUDY
    assert (study.get("ParticipantObjectTypeCode"), study.get("ParticipantObjectTypeCodeRole")) == ("2", "3")
    counts = {s.get("UID"): s.get("NumberOfInstances") for s in study.iter("SOPClass")}
    assert counts == {VIDEO: "3", PHOTO: "1"}
    patient = next(o for o in objs if o.get("ParticipantObjectTypeCodeRole") == "1")
    assert patient.get("ParticipantObjectTypeCode") == "1" and patient.get("ParticipantObjectID") == "PID-7"
    assert _code(patient.find("ParticipantObjectIDTypeCode")) == ("2", "RFC-3881")
    assert list(patient) == [patient.find("ParticipantObjectIDTypeCode")]  # nothing but the ID


def test_import_export_analysis_and_more_have_their_codes() -> None:
    cases = [
        (instances_imported(STUDY, {VIDEO: 1}, "USB", "127.0.0.1"), "110107", "C", []),
        (export(STUDY, "PACS@10.0.0.9:104", "SR", report_uid="1.2.3.4"), "110104", "C", []),
        (export(STUDY, "https://user:secret@ehr.example/fhir?token=abc", "FHIR", report_uid="urn:uuid:1"),
         "110106", "R", []),
        (analysis_event("begun", 12, STUDY, sop_classes={VIDEO: 2}), "110103", "R", ["FSY-AUD-ANABEG"]),
        (analysis_event("finished", 12, STUDY, sr_uid="1.2.3.5"), "110103", "C", ["FSY-AUD-ANAEND"]),
        (analysis_event("finished", 12, STUDY, SERIOUS_FAILURE, "RuntimeError: no face"), "110103", "R",
         ["FSY-AUD-ANAEND"]),
        (security_alert("association_rejected", "EVIL", "10.6.6.6"), "110113", "E", ["110126"]),
        (config_change(["destinations", "ae_title"]), "110113", "E", ["110131"]),
        (query("alice", "10.0.0.2", "1.2.840.10008.5.1.4.1.2.2.1", "StudyDate=2024"), "110112", "E", []),
        (access("alice", "10.0.0.2", STUDY), "110103", "R", []),
        (user_authentication("login", "alice", "10.0.0.2", MINOR_FAILURE), "110114", "E", ["110122"]),
        (user_authentication("logout", "alice", "10.0.0.2"), "110114", "E", ["110123"]),
    ]
    for ev, event_id, action, types in cases:
        root = _parse(ev.to_xml())
        assert _code(root.find("EventIdentification/EventID"))[0] == event_id
        assert root.find("EventIdentification").get("EventActionCode") == action  # type: ignore[union-attr]
        assert [t.get("csd-code") for t in root.iter("EventTypeCode")] == types
    sr = _parse(cases[1][0].to_xml())
    roles = _roles(sr)
    assert roles["110153"].get("UserID") == "FACESYM" and roles["110153"].get("UserIsRequestor") == "true"
    dest = roles["110152"]
    assert (dest.get("UserID"), dest.get("NetworkAccessPointID")) == ("PACS", "10.0.0.9")
    assert [i.get("UID") for i in sr.iter("Instance")] == ["1.2.3.4"]
    fhir_xml = cases[2][0].to_xml()
    assert "secret" not in fhir_xml and "token" not in fhir_xml
    failed = _parse(cases[5][0].to_xml())
    assert failed.find("EventIdentification").get("EventOutcomeIndicator") == "8"  # type: ignore[union-attr]
    assert failed.findtext("EventIdentification/EventOutcomeDescription") == "RuntimeError: no face"
    job = _parse(cases[3][0].to_xml()).find("ParticipantObjectIdentification/ParticipantObjectDetail")
    assert job is not None and job.get("type") == "FaceSymJobID"
    assert base64.b64decode(job.get("value", "")) == b"12"
    q = _parse(cases[8][0].to_xml()).find("ParticipantObjectIdentification")
    assert q is not None and _code(q.find("ParticipantObjectIDTypeCode")) == ("110181", "DCM")
    assert base64.b64decode(q.findtext("ParticipantObjectQuery", "")) == b"StudyDate=2024"


def test_bad_values_are_refused() -> None:
    with pytest.raises(ValueError):
        instances_transferred(STUDY, {VIDEO: 1}, "A", "1.2.3.4", outcome=3)
    with pytest.raises(ValueError):
        export(STUDY, "X", "PDF")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        application_activity("restart")  # type: ignore[arg-type]


def test_no_patient_name_or_birth_date_even_when_passed() -> None:
    @dataclass
    class FakeDataset:
        PatientID: str = "PID-42"
        IssuerOfPatientID: str = "HOSP"
        PatientName: str = "Doe^Jane"
        PatientBirthDate: str = "19710203"

    mapping = {"PatientID": "PID-42", "PatientName": "Doe^Jane", "PatientBirthDate": "19710203",
               "PatientSex": "F", "IssuerOfPatientID": "HOSP"}
    events = [
        instances_transferred(STUDY, {VIDEO: 1}, "A", "1.2.3.4", patient=mapping),
        instances_transferred(STUDY, {VIDEO: 1}, "A", "1.2.3.4", patient=FakeDataset()),
        export(STUDY, "PACS@h:1", "SR", patient=mapping),
        analysis_event("begun", 1, STUDY, patient=FakeDataset()),
        access("bob", "1.1.1.1", STUDY, patient=mapping),
    ]
    for ev in events:
        xml = ev.to_xml()
        assert "Doe" not in xml and "Jane" not in xml and "1971" not in xml and "19710203" not in xml
        root = _parse(xml)
        pats = [o for o in root.iter("ParticipantObjectIdentification")
                if o.get("ParticipantObjectTypeCodeRole") == "1"]
        assert len(pats) == 1 and pats[0].get("ParticipantObjectID") == "PID-42^^^HOSP"
        assert pats[0].find("ParticipantObjectName") is None


def test_control_characters_do_not_break_the_xml() -> None:
    ev = security_alert("tls_failure", "BAD\x00AE\x1b", "127.0.0.1", description="bad <tls> & \x07 handshake")
    root = _parse(ev.to_xml())
    assert root.findtext("EventIdentification/EventOutcomeDescription") == "bad <tls> &  handshake"


# --- the trail ---------------------------------------------------------------------------------------------


def _fill(trail: AuditTrail, n: int, start: datetime = T0) -> None:
    for k in range(n):
        trail.append(instances_transferred(STUDY, {VIDEO: k + 1}, f"AE{k}", "127.0.0.1",
                                           time=start + timedelta(minutes=k)))


def test_empty_trail_verifies(trail: AuditTrail) -> None:
    result = trail.verify()
    assert result.ok and result.count == 0 and result.first_broken_seq is None


def test_chain_links_and_verifies(trail: AuditTrail, sessions: sessionmaker[Session]) -> None:
    _fill(trail, 5)
    result = trail.verify()
    assert result.ok and result.count == 5
    with sessions() as s:
        rows = s.execute(text("SELECT seq, time, event_id, outcome, xml, prev_hash, hash FROM audit_record "
                              "ORDER BY seq")).all()
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0][5] == GENESIS
    for prev, row in zip(rows, rows[1:], strict=False):
        assert row[5] == prev[6]
    for row in rows:
        assert row[6] == chain_hash(row[5], *row[:5])
        assert row[1] == (T0 + timedelta(minutes=row[0] - 1)).isoformat(timespec="microseconds")


TAMPERS = {
    "xml": "UPDATE audit_record SET xml = replace(xml, 'AE2', 'AE9') WHERE seq = 3",
    "xml_one_byte": "UPDATE audit_record SET xml = xml || ' ' WHERE seq = 3",
    "time": "UPDATE audit_record SET time = replace(time, '10:02', '10:12') WHERE seq = 3",
    "event_id": "UPDATE audit_record SET event_id = '110107' WHERE seq = 3",
    "outcome": "UPDATE audit_record SET outcome = 4 WHERE seq = 3",
    "prev_hash": "UPDATE audit_record SET prev_hash = replace(prev_hash, substr(prev_hash, 1, 1), "
                 "CASE substr(prev_hash, 1, 1) WHEN 'a' THEN 'b' ELSE 'a' END) WHERE seq = 3",
    "hash": "UPDATE audit_record SET hash = replace(hash, substr(hash, 1, 1), "
            "CASE substr(hash, 1, 1) WHEN 'a' THEN 'b' ELSE 'a' END) WHERE seq = 3",
    "seq": "UPDATE audit_record SET seq = 300 WHERE seq = 3",
    "deleted": "DELETE FROM audit_record WHERE seq = 3",
}


@pytest.mark.parametrize("what", sorted(TAMPERS))
def test_tampering_any_field_names_the_record(
    what: str, trail: AuditTrail, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    _fill(trail, 5)
    with sessions.begin() as s:
        assert s.execute(text(TAMPERS[what])).rowcount == 1  # type: ignore[attr-defined]
    result = trail.verify()
    assert not result.ok and result.first_broken_seq == 3, result
    assert "3" in result.reason
    # the command says so too
    out = io.StringIO()
    assert verify_command(Settings(data_dir=tmp_path), out) == 1
    assert "record 3" in out.getvalue()


def test_tampering_the_first_record(trail: AuditTrail, sessions: sessionmaker[Session]) -> None:
    _fill(trail, 3)
    with sessions.begin() as s:
        s.execute(text("UPDATE audit_record SET prev_hash = 'f' || substr(prev_hash, 2) WHERE seq = 1"))
    result = trail.verify()
    assert not result.ok and result.first_broken_seq == 1


def test_new_appends_after_forwarding_marks_still_verify(trail: AuditTrail) -> None:
    _fill(trail, 4)
    trail.mark_forwarded([1, 2])  # not hashed: forwarding is bookkeeping, not content
    assert [p.seq for p in trail.pending()] == [3, 4]
    assert [p.seq for p in trail.pending(after_seq=3)] == [4]
    _fill(trail, 1)
    assert trail.verify().ok


def test_export_since_jsonl_and_xml(trail: AuditTrail) -> None:
    _fill(trail, 5)
    lines = list(trail.export(since=T0 + timedelta(minutes=2)))
    docs = [json.loads(line) for line in lines]
    assert [d["seq"] for d in docs] == [3, 4, 5]
    assert all(d["event_id"] == "110104" and d["hash"] and d["xml"].startswith("<AuditMessage") for d in docs)
    # naive "since" is UTC; an offset is honoured
    assert [json.loads(x)["seq"] for x in trail.export(datetime(2024, 5, 1, 10, 4))] == [5]
    since = datetime.fromisoformat("2024-05-01T12:03+02:00")
    assert [json.loads(x)["seq"] for x in trail.export(since)] == [4, 5]
    xml = "\n".join(trail.export(fmt="xml"))
    root = ET.fromstring(xml)
    assert root.tag == "AuditMessages" and len(root.findall("AuditMessage")) == 5
    with pytest.raises(ValueError):
        list(trail.export(fmt="csv"))  # type: ignore[arg-type]


def test_concurrent_appends_keep_a_contiguous_chain(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'facesym.db'}"
    # two trails over two engines: the database serialises them, not only the in-process lock
    trails = [AuditTrail(open_database(url)), AuditTrail(open_database(url))]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(25):
                trails[k % 2].append(security_alert("restricted_function", f"T{k}", "127.0.0.1",
                                                    description=f"{k}-{i}"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    result = trails[0].verify()
    assert result.ok and result.count == 200
    with trails[0].sessions() as s:
        seqs = [r[0] for r in s.execute(text("SELECT seq FROM audit_record ORDER BY seq"))]
    assert seqs == list(range(1, 201))


def test_patient_id_resolved_from_the_study(trail: AuditTrail, sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        p = Patient(patient_id="PID-9", issuer="", name="Doe^John", birth_date="19600101")
        s.add(p)
        s.flush()
        s.add(Study(study_uid=STUDY, patient_pk=p.id))
    rec = trail.append(analysis_event("begun", 1, STUDY, sop_classes={VIDEO: 1}))
    root = _parse(rec.xml)
    pats = [o.get("ParticipantObjectID") for o in root.iter("ParticipantObjectIdentification")
            if o.get("ParticipantObjectTypeCodeRole") == "1"]
    assert pats == ["PID-9"]
    assert "Doe" not in rec.xml and "1960" not in rec.xml
    assert root.find("AuditSourceIdentification").get("AuditSourceID") == "facesym@test"  # type: ignore[union-attr]


def test_transfer_collector_one_event_per_study_per_association(trail: AuditTrail) -> None:
    @dataclass
    class Peer:
        ae_title: str
        address: str

    @dataclass
    class Assoc:
        requestor: Peer
        acceptor: Peer

    assoc = Assoc(Peer("MODALITY ", "10.0.0.7"), Peer("FACESYM", "127.0.0.1"))
    for _ in range(3):
        trail.transfers.stored(assoc, STUDY, VIDEO)
    trail.transfers.stored(assoc, STUDY, PHOTO)
    trail.transfers.stored(assoc, "1.2.3.9", VIDEO)
    trail.transfers.stored(assoc, "1.2.3.9", VIDEO, ok=False)
    recs = trail.transfers.closed(assoc)
    assert [r.event_id for r in recs] == ["110104", "110104"]
    assert [r.outcome for r in recs] == [0, MINOR_FAILURE]
    first = _parse(recs[0].xml)
    counts = {s.get("UID"): s.get("NumberOfInstances") for s in first.iter("SOPClass")}
    assert counts == {VIDEO: "3", PHOTO: "1"}
    assert _roles(first)["110153"].get("UserID") == "MODALITY"
    assert trail.transfers.closed(assoc) == []  # nothing left behind


@dataclass
class _Peer:
    ae_title: str
    address: str


@dataclass
class _Assoc:
    requestor: _Peer
    acceptor: _Peer


def _rows(sessions: sessionmaker[Session], *objects: tuple[str, str, str, datetime, bool]) -> None:
    """Instance rows: (study UID, SOP Instance UID, calling AE, received_at, audited)."""
    with sessions.begin() as s:
        p = Patient(patient_id="PID-7", issuer="", name="Roe^Jane", birth_date="19700101")
        s.add(p)
        s.flush()
        series: dict[str, Series] = {}
        for study_uid, sop_uid, ae, when, audited in objects:
            if study_uid not in series:
                st = Study(study_uid=study_uid, patient_pk=p.id)
                s.add(st)
                s.flush()
                series[study_uid] = Series(series_uid=study_uid + ".1", study_pk=st.id)
                s.add(series[study_uid])
                s.flush()
            s.add(Instance(sop_instance_uid=sop_uid, series_pk=series[study_uid].id, sop_class_uid=VIDEO,
                           transfer_syntax_uid="1.2.840.10008.1.2.4.102", path="x", sha256="0" * 64, size=1,
                           calling_ae=ae, received_at=when, audited=audited))


def _audited(sessions: sessionmaker[Session]) -> dict[str, bool]:
    with sessions() as s:
        return {i.sop_instance_uid: i.audited for i in s.query(Instance)}


def test_closing_an_association_flags_the_objects_it_recorded(
    trail: AuditTrail, sessions: sessionmaker[Session]
) -> None:
    now = datetime.now(UTC)
    _rows(sessions, (STUDY, "1.9.1", "MOD", now, False), (STUDY, "1.9.2", "MOD", now, False),
          (STUDY, "1.9.3", "MOD", now, False))
    assoc = _Assoc(_Peer("MOD", "10.0.0.7"), _Peer("FACESYM", "127.0.0.1"))
    trail.transfers.stored(assoc, STUDY, VIDEO, instance=("1.9.1", 1))
    trail.transfers.stored(assoc, STUDY, VIDEO, instance=("1.9.2", 1))
    assert _audited(sessions) == {"1.9.1": False, "1.9.2": False, "1.9.3": False}  # nothing before close
    assert len(trail.transfers.closed(assoc)) == 1
    assert _audited(sessions) == {"1.9.1": True, "1.9.2": True, "1.9.3": False}


def test_objects_of_associations_cut_short_are_recorded_at_start_once(
    trail: AuditTrail, sessions: sessionmaker[Session]
) -> None:
    start = datetime.now(UTC)
    before = start - timedelta(minutes=5)
    other = "1.2.826.0.1.3680043.8.498.1002"
    _rows(
        sessions,
        (STUDY, "1.9.1", "MOD_A", before, False),
        (STUDY, "1.9.2", "MOD_A", before, False),
        (STUDY, "1.9.3", "MOD_B", before, False),
        (other, "1.9.4", "MOD_A", before, True),  # its association closed: recorded already
        (other, "1.9.5", "MOD_A", start + timedelta(seconds=1), False),  # arrived after this start
    )
    recs = trail.transfers.record_unaudited(before=start, local_ae="FACESYM")
    assert [r.event_id for r in recs] == ["110104", "110104"]  # one per study and calling AE
    sources = {}
    for rec in recs:
        root = _parse(rec.xml)
        counts = {c.get("UID"): c.get("NumberOfInstances") for c in root.iter("SOPClass")}
        sources[_roles(root)["110153"].get("UserID")] = counts
        assert "ended without closing" in rec.xml
        assert "Roe" not in rec.xml and "1970" not in rec.xml
    assert sources == {"MOD_A": {VIDEO: "2"}, "MOD_B": {VIDEO: "1"}}
    assert _audited(sessions) == {"1.9.1": True, "1.9.2": True, "1.9.3": True, "1.9.4": True, "1.9.5": False}
    assert trail.transfers.record_unaudited(before=start) == []  # flagged: never twice
    assert trail.verify().ok


def test_note_settings_records_only_changes(trail: AuditTrail) -> None:
    first = trail.note_settings({"ae_title": "FACESYM", "dicom_port": 11112})
    assert first is not None and first.event_id == "110113"
    assert trail.note_settings({"ae_title": "FACESYM", "dicom_port": 11112}) is None
    changed = trail.note_settings({"ae_title": "FACESYM", "dicom_port": 104})
    assert changed is not None
    ids = [o.get("ParticipantObjectID") for o in _parse(changed.xml).iter("ParticipantObjectIdentification")]
    assert ids == ["dicom_port"]
    assert "104" not in ids and "11112" not in changed.xml


def test_record_never_raises() -> None:
    broken = AuditTrail(sessionmaker())  # no engine bound: every database call fails
    assert broken.record(application_activity("start")) is None


# --- commands ----------------------------------------------------------------------------------------------


def test_commands_on_a_missing_and_an_empty_database(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "nowhere")
    out = io.StringIO()
    # No database is not an intact trail: a wrong data dir or a deleted database must not read "OK".
    assert verify_command(settings, out) == 1 and "no audit database" in out.getvalue()
    assert not (tmp_path / "nowhere").exists()  # verify creates nothing
    out = io.StringIO()
    assert export_command(settings, None, "jsonl", out) == 0 and out.getvalue() == ""
    settings = Settings(data_dir=tmp_path)
    open_database(settings.effective_database_url)
    out = io.StringIO()
    assert verify_command(settings, out) == 0 and "OK" in out.getvalue()


def test_export_command(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    trail = AuditTrail(open_database(settings.effective_database_url))
    _fill(trail, 4)
    out = io.StringIO()
    assert export_command(settings, "2024-05-01T10:02:00Z", "jsonl", out) == 0
    assert [json.loads(x)["seq"] for x in out.getvalue().splitlines()] == [3, 4]
    out = io.StringIO()
    assert export_command(settings, "2024-05-01", "xml", out) == 0
    assert len(ET.fromstring(out.getvalue()).findall("AuditMessage")) == 4
    assert export_command(settings, "yesterday", "jsonl", io.StringIO()) == 2
    assert export_command(settings, None, "csv", io.StringIO()) == 2


def test_export_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`facesym audit export | head -1`: the reader closes the pipe early; no BrokenPipeError traceback."""
    settings = Settings(data_dir=tmp_path)
    _fill(AuditTrail(open_database(settings.effective_database_url)), 400)  # > a 64-kB pipe
    env = dict(os.environ, FACESYM_DATA_DIR=str(tmp_path))
    run = subprocess.run(f"{sys.executable} -m service.cli audit export | head -1", shell=True, cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert len(run.stdout.splitlines()) == 1 and json.loads(run.stdout)["seq"] == 1
    assert "BrokenPipeError" not in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert parse_since("2024-05-01T12:00:00+02:00") == datetime(2024, 5, 1, 10, tzinfo=UTC)


# --- syslog framing ----------------------------------------------------------------------------------------


def test_rfc5424_message_and_rfc5425_frame() -> None:
    ev = application_activity("start")
    rec = PendingRecord(7, "2024-05-01T10:00:00.000000+00:00", ev.event_id, ev.to_xml(), "ab12" * 16, 9)
    msg = format_message(rec, hostname="host one", procid="123")
    header, _, body = msg.partition(b"] ")
    assert header == (b"<85>1 2024-05-01T10:00:00.000000+00:00 hostone facesym 123 DICOM+RFC3881 "
                      b'[facesym-audit@32473 seq="7" hwm="9" hash="' + b"ab12" * 16 + b'"')
    assert body.startswith(b"\xef\xbb\xbf<AuditMessage")
    framed = frame(msg)
    length, _, rest = framed.partition(b" ")
    assert int(length) == len(rest) == len(msg) and rest == msg
    # the length counts octets, not characters
    wide = format_message(replace(rec, xml="<AuditMessage>é</AuditMessage>"), hostname="h")
    assert frame(wide).startswith(f"{len(wide)} ".encode()) and len(wide) > len(wide.decode())


# --- the anchor (issue 14: truncation and rewrites used to verify) -------------------------------------


def _anchored(tmp_path: Path) -> tuple[AuditTrail, AuditAnchor, sessionmaker[Session]]:
    sessions = open_database(f"sqlite:///{tmp_path / 'a.db'}")
    anchor = AuditAnchor(tmp_path)
    return AuditTrail(sessions, anchor=anchor), anchor, sessions


@pytest.mark.parametrize("deleted", [1, 50, 60])
def test_truncation_is_reported_and_its_numbers_are_not_reused(tmp_path: Path, deleted: int) -> None:
    trail, anchor, sessions = _anchored(tmp_path)
    _fill(trail, 60)
    assert trail.verify().ok and anchor.read().seq == 60
    with sessions.begin() as s:
        s.execute(text("DELETE FROM audit_record WHERE seq > :n"), {"n": 60 - deleted})
    result = trail.verify()
    assert not result.ok and "truncated" in result.reason and result.first_broken_seq == 61 - deleted
    _fill(trail, 1)  # the next event does not take the deleted numbers: a gap stays
    result = trail.verify()
    assert not result.ok and "missing" in result.reason, result
    with sessions() as s:
        assert s.scalar(text("SELECT max(seq) FROM audit_record")) == 61


def test_a_rewritten_and_rehashed_chain_is_reported(tmp_path: Path) -> None:
    """Rewrite record 5 and recompute every hash from there: the chain alone verifies, the anchor not."""
    trail, anchor, sessions = _anchored(tmp_path)
    _fill(trail, 8)
    with sessions.begin() as s:
        rows = s.execute(text("SELECT seq, time, event_id, outcome, xml, prev_hash FROM audit_record "
                              "ORDER BY seq")).all()
        prev = s.scalar(text("SELECT hash FROM audit_record WHERE seq = 4"))
        for seq, when, event_id, outcome, xml, _ in rows[4:]:
            xml = xml.replace("AE4", "AEX") if seq == 5 else xml
            digest = chain_hash(prev, seq, when, event_id, outcome, xml)
            s.execute(text("UPDATE audit_record SET xml = :x, prev_hash = :p, hash = :h WHERE seq = :s"),
                      {"x": xml, "p": prev, "h": digest, "s": seq})
            prev = digest
    assert AuditTrail(sessions).verify().ok  # what the unkeyed chain alone says
    result = trail.verify()
    assert not result.ok and "rewritten" in result.reason and result.first_broken_seq == 8


def test_a_forged_anchor_is_reported(tmp_path: Path) -> None:
    trail, anchor, _ = _anchored(tmp_path)
    _fill(trail, 3)
    doc = json.loads(anchor.path.read_text())
    anchor.path.write_text(json.dumps({**doc, "seq": 2}))  # moved back without the key
    result = trail.verify()
    assert not result.ok and "MAC" in result.reason
    assert oct(anchor.key_path.stat().st_mode & 0o777) == "0o600"
