"""report/fhir.py: the FHIR R4 transaction Bundle for the EHR → JSON → R4B parse → read back → compare.

fhir.resources validates structure, types and cardinality but not code values: the codes are checked here.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import report_fixtures as shared
from fhir.resources.R4B.bundle import Bundle
from pydicom.uid import generate_uid

from service.domain import Analysis, Quality, RegionSymmetry, Side, StaticItem, Task
from service.errors import InvalidParameterError
from service.fhir_client import write_bundle
from service.media.dicom_io import build_video_photographic, build_vl_photograph, write_dicom
from service.report import fhir
from service.report.fhir import (
    CODE_SYSTEM,
    FhirValidationError,
    StudyIdentity,
    build_bundle,
    conditional_url,
    parse_conditional_url,
    read_bundle,
    study_identity_from_dicom,
    validate_bundle,
)
from service.report.sr import InstanceFinding, report_uids

PATIENT_NAME = "DOE^JANE"
PATIENT_ID = "PHANTOM-0042"
BIRTH_DATE = "19700314"
ISSUER_OID = "1.2.826.0.1.3680043.10.1234"
ACCESSION = "ACC20240501"
ENGINE = shared.ENGINE
ISSUED = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
N_FRAMES = shared.N_FRAMES

SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
LATERALITY = {"left": ("7771000", "Left"), "right": ("24028007", "Right")}

SMILE = replace(
    shared.SMILE,
    flow=(RegionSymmetry("forehead", 0.03, 0.02, 0.96), RegionSymmetry("cheek", 0.25, 0.06, 0.28)),
)
#: Weak on the LEFT here, with a partial gate (the Observation must say so).
EYES = replace(shared.EYES, right=0.93, asymmetry_index=0.5591398, activation_gate=0.3666667,
               asymmetry_score=79.49821, cosine_score=72.5, weaker_side=Side.LEFT)
BROW = shared.BROW


@pytest.fixture(scope="module")
def study_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A phantom-like study on disk: a video (two tasks) and a photo (not analysable), with PHI."""
    folder = tmp_path_factory.mktemp("study")
    study_uid = generate_uid()
    video = build_video_photographic(
        b"\x00" * 64,
        width=64,
        height=48,
        n_frames=N_FRAMES,
        fps=30.0,
        study_uid=study_uid,
        patient_name=PATIENT_NAME,
        patient_id=PATIENT_ID,
        study_description="Facial nerve follow-up",
    )
    photo = build_vl_photograph(
        np.zeros((8, 8, 3), np.uint8), study_uid=study_uid, patient_name=PATIENT_NAME, patient_id=PATIENT_ID
    )
    out = {}
    for name, ds in (("video", video), ("photo", photo)):
        ds.PatientBirthDate = BIRTH_DATE
        ds.PatientSex = "F"
        ds.IssuerOfPatientID = ISSUER_OID
        ds.AccessionNumber = ACCESSION
        ds.StudyDate = "20240501"
        path = folder / f"{name}.dcm"
        write_dicom(ds, path)
        out[name] = path
    return out


def _findings(study_files: dict[str, Path]) -> list[InstanceFinding]:
    import pydicom

    video = pydicom.dcmread(study_files["video"], stop_before_pixels=True)
    photo = pydicom.dcmread(study_files["photo"], stop_before_pixels=True)
    ok = Quality(True, (), ("face lost in 3 frames",), 87, N_FRAMES)
    bad = Quality(False, ("no face found", "image too dark"), (), 0, 1)
    return [
        InstanceFinding(
            str(video.SOPClassUID), str(video.SOPInstanceUID), N_FRAMES, Analysis(ok, (SMILE, EYES))
        ),
        InstanceFinding(str(photo.SOPClassUID), str(photo.SOPInstanceUID), None, Analysis(bad, ())),
    ]


def _sr_uid(findings: list[InstanceFinding]) -> str:
    return report_uids([f.sop_instance_uid for f in findings], ENGINE)[1]


@pytest.fixture(scope="module")
def built(study_files: dict[str, Path]) -> tuple[dict[str, Any], StudyIdentity, list[InstanceFinding]]:
    study = study_identity_from_dicom(study_files["video"])
    findings = _findings(study_files)
    bundle = build_bundle(
        study,
        findings,
        sr_sop_instance_uid=_sr_uid(findings),
        engine_version=ENGINE,
        patient_identifier_system="",  # derived from IssuerOfPatientID (an OID)
        issued=ISSUED,
    )
    return bundle, study, findings


def _resources(bundle: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def _walk(node: Any, key: str) -> list[Any]:
    """Every value stored under ``key`` anywhere in a JSON tree."""
    found: list[Any] = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                found.append(v)
            found += _walk(v, key)
    elif isinstance(node, list):
        for v in node:
            found += _walk(v, key)
    return found


# ------------------------------------------------------------------------------------- identity
def test_study_identity_reads_identifiers_only(study_files: dict[str, Path]) -> None:
    study = study_identity_from_dicom(study_files["video"])
    assert study.patient_id == PATIENT_ID
    assert study.issuer_of_patient_id == ISSUER_OID
    assert study.accession_number == ACCESSION
    assert study.study_date == "20240501"
    assert study.study_description == "Facial nerve follow-up"
    assert re.fullmatch(r"[0-9.]+", study.study_instance_uid)
    assert not any(PATIENT_NAME in str(v) or BIRTH_DATE in str(v) for v in vars(study).values())


def test_study_identity_refuses_a_non_dicom_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.dcm"
    bad.write_bytes(b"not dicom")
    with pytest.raises(InvalidParameterError, match="path"):
        study_identity_from_dicom(bad)


# -------------------------------------------------------------------------- validity, round trip
def test_bundle_validates_with_r4b_and_round_trips(built: tuple) -> None:
    bundle, study, findings = built
    validate_bundle(bundle)
    text = json.dumps(bundle, allow_nan=False)
    parsed = Bundle.model_validate(json.loads(text))
    assert parsed.type == "transaction"
    entries = parsed.entry or []
    assert [e.resource.get_resource_type() for e in entries if e.resource is not None] == [
        "Device",
        "Observation",
        "Observation",
        "Observation",
        "DiagnosticReport",
    ]
    got = read_bundle(parsed.model_dump(mode="json"))
    assert read_bundle(parsed) == got == read_bundle(bundle)

    tasks = [g for g in got if g["kind"] == "task"]
    assert [g["task"] for g in tasks] == ["smile", "eye_closure"]
    for g, want in zip(tasks, (SMILE, EYES), strict=True):
        assert g["sop_instance_uid"] == findings[0].sop_instance_uid
        for key in (
            "left",
            "right",
            "asymmetry_index",
            "activation_gate",
            "asymmetry_score",
            "cosine_index",
            "cosine_score",
        ):
            assert g[key] == getattr(want, key), key  # exact: JSON keeps every float digit
        assert g["weaker_side"] == (want.weaker_side.value if want.weaker_side else None)
        assert g["insufficient_activation"] is want.insufficient_activation
        assert g["method"] == want.method
        assert g["notes"] == list(want.notes)
        assert g["warnings"] == ["face lost in 3 frames"]
        assert g["unit"] == ("1" if want.task is Task.EYE_CLOSURE else "{D}")
        assert g["flow_symmetry_scores"] == {r.region: r.symmetry_score for r in want.flow}
        head = want.head_motion
        assert g["head_motion"] == (None if head is None else {
            "roll_deg": head.roll_deg, "yaw_deg": head.yaw_deg, "pitch_deg": head.pitch_deg,
            "scale_pct": head.scale_pct, "shift_d": head.shift_d, "residual_d": head.residual_d,
            "corrected": head.corrected,
        })
    assert tasks[0]["head_motion"] is not None and tasks[1]["head_motion"] is None  # EYES: an old result

    (bad,) = [g for g in got if g["kind"] == "not_analysable"]
    assert bad["sop_instance_uid"] == findings[1].sop_instance_uid
    assert bad["reasons"] == ["no face found", "image too dark"]


def test_diagnostic_report(built: tuple) -> None:
    bundle, study, findings = built
    (report,) = _resources(bundle, "DiagnosticReport")
    assert report["status"] == "final"
    assert report["code"]["coding"] == [
        {"system": CODE_SYSTEM, "code": "FSY-PROC", "display": "Facial palsy motion analysis"}
    ]
    assert report["identifier"] == [{"system": "urn:dicom:uid", "value": f"urn:oid:{_sr_uid(findings)}"}]
    assert report["effectiveDateTime"] == "2024-05-01"
    assert report["issued"].startswith("2024-05-01T12:30:00")
    (img,) = report["imagingStudy"]
    assert img["identifier"] == {"system": "urn:dicom:uid", "value": f"urn:oid:{study.study_instance_uid}"}
    assert img["reference"] == f"ImagingStudy?identifier=urn:dicom:uid|urn:oid:{study.study_instance_uid}"
    # result → every Observation of the Bundle, through their fullUrls
    obs_urls = [e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"]
    assert [r["reference"] for r in report["result"]] == obs_urls
    assert report["basedOn"][0]["identifier"]["value"] == ACCESSION
    assert report["basedOn"][0]["identifier"]["type"]["coding"][0]["code"] == "ACSN"
    conclusion = report["conclusion"]
    assert "smile: asymmetry score 24.4/100 (weaker side: patient's right)" in conclusion.lower()
    assert "eye closure: asymmetry score 79.5/100 (weaker side: patient's left, insufficient activation)" in (
        conclusion.lower()
    )
    assert "1 instance not analysable" in conclusion


def test_subject_is_an_identifier_only_patient_reference(built: tuple) -> None:
    bundle, _, _ = built
    subjects = _walk(bundle, "subject")
    assert subjects and all(s == subjects[0] for s in subjects)
    assert subjects[0] == {
        "type": "Patient",
        "identifier": {"system": f"urn:oid:{ISSUER_OID}", "value": PATIENT_ID},
        "reference": f"Patient?identifier=urn:oid:{ISSUER_OID}|{PATIENT_ID}",
    }
    assert not _resources(bundle, "Patient")  # never a Patient resource: nothing is invented


def test_no_demographics_anywhere(built: tuple) -> None:
    bundle, _, _ = built
    text = json.dumps(bundle)
    for phi in ("DOE", "JANE", BIRTH_DATE, "1970-03-14"):
        assert phi not in text
    # The birth year as a number of its own (random UIDs and long decimals may contain the digits).
    assert not re.search(r"(?<![\d.])1970(?!\d)", text)
    keys = set(re.findall(r'"([A-Za-z]+)":', text))
    assert not keys & {"birthDate", "gender", "telecom", "address", "deceasedBoolean", "maritalStatus"}
    # "name" appears only as the Device's deviceName.name
    assert _walk(bundle, "name") == ["FaceSym", "FaceSym"]


def test_task_observation_codes_and_units(built: tuple) -> None:
    bundle, _, findings = built
    observations = _resources(bundle, "Observation")
    smile, eyes, bad = observations
    device_url = bundle["entry"][0]["fullUrl"]
    for obs in (smile, eyes, bad):
        assert obs["status"] == "final"
        assert obs["category"][0]["coding"][0] == {
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": "imaging",
            "display": "Imaging",
        }
        assert obs["device"]["reference"] == device_url
        assert obs["derivedFrom"][0]["identifier"]["system"] == "urn:dicom:uid"
        assert obs["bodySite"]["coding"][0] == {"system": SNOMED, "code": "89545001", "display": "Face"}
    assert smile["code"]["coding"][0]["code"] == "FSY-SMILE"
    assert eyes["code"]["coding"][0]["code"] == "FSY-EYECLOSE"
    assert smile["method"]["coding"][0]["code"] == "FSY-M-PIXELS"
    assert eyes["method"]["coding"][0]["code"] == "FSY-M-LANDMARKS"

    def comp(obs: dict[str, Any], code: str) -> dict[str, Any]:
        (found,) = [c for c in obs["component"] if c["code"]["coding"][0]["code"] == code]
        assert found["code"]["coding"][0]["system"] == CODE_SYSTEM
        return found

    # UCUM: magnitudes in {D} (smile) or 1 (eye-closure fraction), indices in 1, scores in {score}
    for obs, mag_unit in ((smile, "{D}"), (eyes, "1")):
        for code, unit in (
            ("FSY-MAG-L", mag_unit),
            ("FSY-MAG-R", mag_unit),
            ("FSY-AI", "1"),
            ("FSY-GATE", "1"),
            ("FSY-CI", "1"),
            ("FSY-AS", "{score}"),
            ("FSY-CS", "{score}"),
        ):
            q = comp(obs, code)["valueQuantity"]
            assert (q["system"], q["code"]) == (UCUM, unit), code
            assert math.isfinite(q["value"])
    for q in _walk(bundle, "valueQuantity"):
        assert q["system"] == UCUM and q["code"] in {"{D}", "1", "{score}", "deg", "%"}
    # head motion (a quality figure): the residual in {D}, the rotation removed in deg, scale in %, shift in
    # {D}; whether it was corrected as a boolean. EYES has none (an old result): no such component.
    hm = SMILE.head_motion
    assert hm is not None
    for code, unit, value, text in (
        ("FSY-HM-RESID", "{D}", hm.residual_d, "D"),
        ("FSY-HM-ROLL", "deg", hm.roll_deg, "°"),
        ("FSY-HM-YAW", "deg", hm.yaw_deg, "°"),
        ("FSY-HM-PITCH", "deg", hm.pitch_deg, "°"),
        ("FSY-HM-SCALE", "%", hm.scale_pct, "%"),
        ("FSY-HM-SHIFT", "{D}", hm.shift_d, "D"),
    ):
        q = comp(smile, code)["valueQuantity"]
        assert q == {"value": value, "unit": text, "system": UCUM, "code": unit}, code
        assert not [c for c in eyes["component"] if c["code"]["coding"][0]["code"] == code]
    assert comp(smile, "FSY-HM-CORR")["valueBoolean"] is True
    assert comp(smile, "FSY-MAG-L")["valueQuantity"]["value"] == SMILE.left
    assert comp(smile, "FSY-MAG-R")["valueQuantity"]["value"] == SMILE.right
    assert comp(smile, "FSY-INSUFFACT")["valueBoolean"] is False
    assert comp(eyes, "FSY-INSUFFACT")["valueBoolean"] is True
    assert comp(smile, "FSY-SOPINST")["valueString"] == findings[0].sop_instance_uid

    # weaker side: SNOMED CT laterality, the patient's side
    for obs, side in ((smile, "right"), (eyes, "left")):
        coding = comp(obs, "FSY-WEAKER")["valueCodeableConcept"]["coding"]
        assert coding == [{"system": SNOMED, "code": LATERALITY[side][0], "display": LATERALITY[side][1]}]
    assert [n["text"] for n in smile["note"]] == [
        "peak clipped at clip end",
        "Warning: face lost in 3 frames",
    ]


def test_not_analysable_observation(built: tuple) -> None:
    bundle, _, findings = built
    bad = _resources(bundle, "Observation")[2]
    assert "valueQuantity" not in bad and "valueCodeableConcept" not in bad
    assert bad["code"]["coding"][0]["code"] == "FSY-QUALITY"
    assert bad["dataAbsentReason"]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
        "code": "not-performed",
        "display": "Not Performed",
    }
    assert bad["interpretation"][0]["coding"][0]["code"] == "FSY-NOTANALYS"
    assert [n["text"] for n in bad["note"]] == ["no face found", "image too dark"]
    assert bad["component"][0]["valueString"] == findings[1].sop_instance_uid


def test_no_weaker_side_and_static_items(study_files: dict[str, Path]) -> None:
    findings = _findings(study_files)
    rest = StaticItem("commissure_height", 0.51, 0.47)
    findings[0] = replace(findings[0], analysis=Analysis(findings[0].analysis.quality, (BROW,), (rest,)))
    bundle = build_bundle(
        study_identity_from_dicom(study_files["photo"]),
        findings,
        sr_sop_instance_uid=_sr_uid(findings),
        engine_version=ENGINE,
        patient_identifier_system="urn:oid:1.2.3",
        issued=ISSUED,
    )
    brow = _resources(bundle, "Observation")[0]
    (weaker,) = [c for c in brow["component"] if c["code"]["coding"][0]["code"] == "FSY-WEAKER"]
    assert weaker["valueCodeableConcept"]["coding"] == [
        {"system": CODE_SYSTEM, "code": "FSY-NOWEAKER", "display": "No weaker side"}
    ]
    got = read_bundle(json.loads(json.dumps(bundle)))
    assert got[0]["weaker_side"] is None
    (static,) = [g for g in got if g["kind"] == "static"]
    assert static["static"] == [{"name": "commissure_height", "left": 0.51, "right": 0.47}]
    conclusion = _resources(bundle, "DiagnosticReport")[0]["conclusion"]
    assert "no weaker side" in conclusion
    # BROW's head motion could not be removed: the Observation and the conclusion say so.
    (corrected,) = [c for c in brow["component"] if c["code"]["coding"][0]["code"] == "FSY-HM-CORR"]
    assert corrected["valueBoolean"] is False and got[0]["head_motion"]["corrected"] is False
    assert "head motion not corrected (residual 0.088 D)" in conclusion


def test_device(built: tuple) -> None:
    bundle, _, _ = built
    entry = bundle["entry"][0]
    device = entry["resource"]
    assert device["deviceName"][0] == {"name": "FaceSym", "type": "manufacturer-name"}
    assert device["version"] == [{"type": {"text": "engine"}, "value": ENGINE}]
    ident = device["identifier"][0]
    assert entry["request"] == {
        "method": "POST",
        "url": "Device",
        "ifNoneExist": f"identifier={ident['system']}|{ident['value']}",
    }


# ---------------------------------------------------------------------------------- idempotency
def _ids(bundle: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [
        (e["fullUrl"], json.dumps(e["resource"]["identifier"]), json.dumps(e["request"]))
        for e in bundle["entry"]
    ]


def test_identifiers_are_deterministic_and_conditional(built: tuple, study_files: dict[str, Path]) -> None:
    bundle, study, findings = built
    again = build_bundle(
        study,
        _findings(study_files),
        sr_sop_instance_uid=_sr_uid(findings),
        engine_version=ENGINE,
        patient_identifier_system="",
        issued=ISSUED + timedelta(hours=5),  # a resend later: same identities
    )
    assert _ids(again) == _ids(bundle)
    assert again["identifier"] == bundle["identifier"]
    assert again["timestamp"] != bundle["timestamp"]

    full_urls = [e["fullUrl"] for e in bundle["entry"]]
    assert len(set(full_urls)) == len(full_urls) and all(u.startswith("urn:uuid:") for u in full_urls)
    values = [e["resource"]["identifier"][0]["value"] for e in bundle["entry"]]
    assert len(set(values)) == len(values)
    for entry in bundle["entry"]:
        res, req = entry["resource"], entry["request"]
        if res["resourceType"] == "Device":
            continue
        assert req["method"] == "PUT"
        rtype, system, value = parse_conditional_url(req["url"])
        assert rtype == res["resourceType"]
        assert {"system": system, "value": value} == res["identifier"][0]
    # every reference to a bundle entry resolves
    for ref in _walk(bundle, "reference"):
        if ref.startswith("urn:uuid:"):
            assert ref in full_urls

    other = build_bundle(
        study,
        findings,
        sr_sop_instance_uid=generate_uid(),
        engine_version=ENGINE,
        patient_identifier_system="",
        issued=ISSUED,
    )
    kept = {e["resource"]["identifier"][0]["value"] for e in other["entry"]} & set(values)
    assert len(kept) == 1  # only the Device (same engine version) is shared by another SR


def test_logical_references(built: tuple) -> None:
    bundle, study, findings = built
    logical = build_bundle(
        study,
        findings,
        sr_sop_instance_uid=_sr_uid(findings),
        engine_version=ENGINE,
        patient_identifier_system="",
        issued=ISSUED,
        reference_mode="logical",
    )
    refs = _walk(logical, "reference")
    assert refs and all(r.startswith("urn:uuid:") for r in refs)
    assert _walk(logical, "subject")[0]["identifier"]["value"] == PATIENT_ID


def test_conditional_url_escapes_and_parses_back() -> None:
    for value in ("PAT 1", "a|b", "x,y$z\\w", "ü&?#=+", "urn:oid:1.2.3"):
        url = conditional_url("Patient", "urn:oid:1.2.3", value)
        assert " " not in url and "#" not in url and "&" not in url.split("?", 1)[1]
        assert parse_conditional_url(url) == ("Patient", "urn:oid:1.2.3", value)


# --------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"study": {"patient_id": ""}}, "study.patient_id"),
        ({"study": {"study_instance_uid": "1.2.abc"}}, "study.study_instance_uid"),
        ({"study": {"study_date": "2024-05-01"}}, "study.study_date"),
        ({"sr_sop_instance_uid": ""}, "sr_sop_instance_uid"),
        ({"engine_version": ""}, "engine_version"),
        ({"issued": datetime(2024, 5, 1, 12, 30)}, "issued"),
        (
            {"study": {"issuer_of_patient_id": "HOSPITAL A"}, "patient_identifier_system": ""},
            "patient_identifier",
        ),
        ({"patient_identifier_system": "not a uri"}, "patient_identifier_system"),
        ({"findings": []}, "findings"),
        ({"task": {"left": float("nan")}}, r"findings\[0\]\.analysis\.tasks\[0\]\.left"),
        ({"task": {"cosine_score": float("inf")}}, r"findings\[0\]\.analysis\.tasks\[0\]\.cosine_score"),
        ({"task": {"method": "magic"}}, r"findings\[0\]\.analysis\.tasks\[0\]\.method"),
        ({"reference_mode": "literal"}, "reference_mode"),
    ],
)
def test_bad_input_names_the_field(built: tuple, change: dict[str, Any], field: str) -> None:
    _, study, findings = built
    kwargs: dict[str, Any] = {
        "sr_sop_instance_uid": _sr_uid(findings),
        "engine_version": ENGINE,
        "patient_identifier_system": "urn:oid:1.2.3",
        "issued": ISSUED,
    }
    if "study" in change:
        study = replace(study, **change.pop("study"))
    if "task" in change:
        task = replace(SMILE, **change.pop("task"))
        findings = [replace(findings[0], analysis=Analysis(findings[0].analysis.quality, (task,)))]
    if "findings" in change:
        findings = change.pop("findings")
    kwargs.update(change)
    with pytest.raises(InvalidParameterError, match=field):
        build_bundle(study, findings, **kwargs)


def test_patient_system_from_issuer() -> None:
    assert fhir.resolve_patient_system("", "1.2.3") == "urn:oid:1.2.3"
    assert fhir.resolve_patient_system("", "https://hospital.example/mrn") == "https://hospital.example/mrn"
    assert fhir.resolve_patient_system("urn:oid:9.9", "1.2.3") == "urn:oid:9.9"


def test_issued_keeps_its_timezone(built: tuple) -> None:
    _, study, findings = built
    cet = timezone(timedelta(hours=2))
    bundle = build_bundle(
        study,
        findings,
        sr_sop_instance_uid=_sr_uid(findings),
        engine_version=ENGINE,
        patient_identifier_system="",
        issued=datetime(2024, 5, 1, 14, 30, tzinfo=cet),
    )
    assert bundle["timestamp"] == "2024-05-01T14:30:00.000+02:00"


def test_invalid_bundle_is_refused(built: tuple, tmp_path: Path) -> None:
    bundle = json.loads(json.dumps(built[0]))
    del bundle["entry"][1]["resource"]["status"]
    with pytest.raises(FhirValidationError, match="status"):
        validate_bundle(bundle)
    with pytest.raises(FhirValidationError):
        write_bundle(bundle, tmp_path / "drop")
    assert not (tmp_path / "drop").exists() or not list((tmp_path / "drop").iterdir())
    with pytest.raises(FhirValidationError):
        validate_bundle({"resourceType": "Observation"})


def test_write_bundle_is_atomic_and_named_by_identifier(built: tuple, tmp_path: Path) -> None:
    bundle = built[0]
    drop = tmp_path / "drop"
    path = write_bundle(bundle, drop)
    assert path.parent == drop and path.suffix == ".json"
    assert path.stem == bundle["identifier"]["value"].removeprefix("urn:oid:")
    assert json.loads(path.read_text()) == bundle
    assert write_bundle(bundle, drop) == path  # a resend replaces the same file
    assert sorted(p.name for p in drop.iterdir()) == [path.name]  # no temporary file left


# ---------------------------------------------------------------------------------- conformance
CONFORMANCE = Path(__file__).resolve().parents[2] / "conformance"


def test_capability_statement_validates_and_matches_the_bundle(built: tuple) -> None:
    from fhir.resources.R4B.capabilitystatement import CapabilityStatement

    from service import __version__

    doc = json.loads((CONFORMANCE / "fhir-capability-statement.json").read_text())
    CapabilityStatement.model_validate(doc)
    assert doc["kind"] == "capability" and doc["fhirVersion"] == "4.0.1"
    assert doc["software"] == {"name": "FaceSym", "version": __version__}
    (rest,) = doc["rest"]
    assert rest["mode"] == "client"
    assert [i["code"] for i in rest["interaction"]] == ["transaction"]
    declared = {r["type"]: r for r in rest["resource"]}
    bundle = built[0]
    for entry in bundle["entry"]:
        res = declared[entry["resource"]["resourceType"]]
        if entry["request"]["method"] == "PUT":
            assert [i["code"] for i in res["interaction"]] == ["update"] and res["conditionalUpdate"] is True
        else:
            assert entry["request"]["method"] == "POST" and entry["request"]["ifNoneExist"]
            assert [i["code"] for i in res["interaction"]] == ["create"] and res["conditionalCreate"] is True
    # every referenced type is declared (Patient, ImagingStudy: resolved by identifier, never written)
    refs = [r for key in ("subject", "derivedFrom", "imagingStudy", "basedOn", "result", "device")
            for r in _walk(bundle, key)]  # fmt: skip
    refs = [x for r in refs for x in (r if isinstance(r, list) else [r])]
    assert refs and all(r["type"] in declared for r in refs)
    sent = {e["resource"]["resourceType"] for e in bundle["entry"]}
    assert {t for t, r in declared.items() if r.get("interaction")} == sent


def test_profile_lists_every_code_we_send(built: tuple, study_files: dict[str, Path]) -> None:
    text = (CONFORMANCE / "fhir-profile.md").read_text()
    findings = _findings(study_files)
    rest = StaticItem("brow_height", 0.1, 0.2)
    extra = replace(findings[0], analysis=Analysis(findings[0].analysis.quality, (BROW,), (rest,)))
    bundles = [built[0], build_bundle(built[1], [extra], sr_sop_instance_uid="1.2.3", engine_version=ENGINE,
                                      patient_identifier_system="urn:oid:1.2", issued=ISSUED)]  # fmt: skip
    codings = [c for b in bundles for c in _walk(b, "coding") for c in c]
    assert codings
    for coding in codings:
        assert f"`{coding['system']}`" in text or coding["system"] in text, coding
        assert coding["code"] in text, coding
    patient_systems = {
        s["identifier"]["system"] for b in bundles for s in _walk(b, "subject")
    }  # configurable
    for system in {
        i["system"] for b in bundles for i in _walk(b, "identifier") if "system" in i
    } - patient_systems:
        assert f"`{system}`" in text, system
    for q in _walk(bundles, "valueQuantity"):
        assert f"`{q['code']}`" in text
    assert CODE_SYSTEM in text


def test_conclusion_compares_with_earlier_studies(study_files: dict[str, Path]) -> None:
    from service.report.comparison import PriorStudy

    findings = _findings(study_files)
    bundle = build_bundle(
        study_identity_from_dicom(study_files["video"]), findings, sr_sop_instance_uid=_sr_uid(findings),
        engine_version=ENGINE, patient_identifier_system="", issued=ISSUED,
        comparison=[PriorStudy("20240108", "pre-op", {"smile": 14.0, "whistle": 50.0})],
    )
    (report,) = _resources(bundle, "DiagnosticReport")
    assert "Compared with 2024-01-08 pre-op: smile AS 14 → 24 (+10)." in report["conclusion"]
