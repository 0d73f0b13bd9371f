"""FaceSym's results as an HL7 FHIR R4 transaction Bundle for the EHR, and its reader.

conformance/fhir-profile.md describes every element, code and unit; in short, per study:

- one DiagnosticReport (status ``final``, our procedure code, the patient, the study date,
  ``imagingStudy`` → the ImagingStudy identified by ``urn:dicom:uid`` | ``urn:oid:<StudyInstanceUID>``,
  a conclusion per task, ``result`` → the Observations), identified by the SR's SOP Instance UID;
- per analysed instance and task one Observation (category ``imaging``, the task as code, ``method``,
  ``device`` → the algorithm Device, ``derivedFrom`` → the ImagingStudy, components for each side's
  magnitude, the scores, the gate, insufficient activation and the weaker side in SNOMED CT, and the
  head motion removed with the residual of its fit, a quality figure, when measured);
- per rest photo with static items one Observation with each item's left and right value;
- per instance that is not analysable one Observation with a ``dataAbsentReason``, an interpretation
  and each reason as a note;
- one Device for the algorithm and its engine version.

Idempotency: every resource carries an identifier derived from the SR's SOP Instance UID (the SR UID
itself derives from the source instances and the engine version, see sr.report_uids), and every entry is
a conditional ``PUT <Type>?identifier=<system>|<value>`` (the Device a conditional create), so a resent
Bundle updates the same resources instead of adding new ones. References inside the Bundle use
deterministic ``urn:uuid:`` fullUrls that the server rewrites on commit.

Demographics are never invented: the Patient is referenced by its identifier only (DICOM PatientID in a
configurable system) and the Bundle holds no name, birth date or sex. Code values are not checked by
fhir.resources' validation, so the tests check them.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, quote, urlsplit

from highdicom.sr import CodedConcept
from pydantic import ValidationError

from service.domain import Side, TaskResult
from service.errors import InvalidParameterError
from service.report import codes
from service.report.comparison import PriorStudy, comparison_text
from service.report.sr import InstanceFinding

# ------------------------------------------------------------------------------------- systems
#: FaceSym's local CodeSystem: the same concepts (and code values) as the SR's "99FACESYM" scheme
#: (conformance/local-codes.md) plus the few FHIR-only codes below. A placeholder under the reserved
#: ".example" domain: replace it with the manufacturer's own URL before clinical use (changing it later
#: changes the meaning of results already stored in an EHR).
CODE_SYSTEM = "https://facesym.example/fhir/CodeSystem/facesym"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DATA_ABSENT_REASON = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
#: DICOM UIDs as identifiers (FHIR R4 ImagingStudy.identifier: system urn:dicom:uid, value urn:oid:UID).
DICOM_UID = "urn:dicom:uid"
#: Our generated identifiers: URIs (urn:oid:2.25.<128-bit hash>), RFC 3986 as the identifier system.
URI_SYSTEM = "urn:ietf:rfc:3986"

_SYSTEMS = {codes.SCHEME: CODE_SYSTEM, "SCT": SNOMED, "UCUM": UCUM}
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
_FUID_NAMESPACE = uuid.UUID("6f1e3f1c-3a5e-5b8e-9d0f-facefacefa11")

DEVICE_NAME = "FaceSym"
MANUFACTURER = "FaceSym"
WARNING_PREFIX = "Warning: "

# FHIR-only local codes (same CodeSystem). A FHIR component has one code and no body site, so the side of
# a per-side value is part of the code here (the SR uses the finding site's laterality instead).
SIDE_SUFFIX = {Side.LEFT: "-L", Side.RIGHT: "-R"}
SOURCE_INSTANCE = ("FSY-SOPINST", "Source SOP Instance UID")

#: UCUM code → the human-readable Quantity.unit.
UNIT_TEXT = {"{D}": "D", "1": "1", "{score}": "score", "deg": "°", "%": "%"}

ReferenceMode = Literal["conditional", "logical"]


class FhirValidationError(InvalidParameterError):
    """A Bundle is not valid FHIR R4 (fhir.resources R4B models); the message carries pydantic's errors."""


@dataclass(frozen=True)
class StudyIdentity:
    """What the Bundle says about the study and its patient: identifiers only, never demographics.

    ``study_date`` is the DICOM DA value (YYYYMMDD) or "".
    """

    study_instance_uid: str
    patient_id: str
    issuer_of_patient_id: str = ""
    accession_number: str = ""
    study_date: str = ""
    study_description: str = ""


def study_identity_from_dicom(path: str | Path) -> StudyIdentity:
    """Read the study's identifiers from one of its DICOM files (header only, no pixel data).

    IssuerOfPatientID falls back to the ISO Universal Entity ID of the Issuer of Patient ID Qualifiers
    Sequence (PS3.3 C.7.1.1) when empty.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, defer_size=1 << 20)  # large values: on disk
    except (OSError, InvalidDicomError) as exc:
        raise InvalidParameterError(f"path: cannot read a DICOM header from {path}: {exc}") from None
    issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
    if not issuer:
        for item in ds.get("IssuerOfPatientIDQualifiersSequence", None) or []:
            if str(item.get("UniversalEntityIDType", "")).upper() == "ISO" and item.get("UniversalEntityID"):
                issuer = str(item.UniversalEntityID).strip()
                break
    return StudyIdentity(
        study_instance_uid=str(ds.get("StudyInstanceUID", "") or "").strip(),
        patient_id=str(ds.get("PatientID", "") or "").strip(),
        issuer_of_patient_id=issuer,
        accession_number=str(ds.get("AccessionNumber", "") or "").strip(),
        study_date=_study_date(ds),
        study_description=str(ds.get("StudyDescription", "") or "").strip(),
    )


def _study_date(ds: Any) -> str:
    """StudyDate when it is a date (YYYYMMDD), else "": the date is optional in the Bundle, and a malformed
    one in a source must not keep the results from the EHR."""
    text = str(ds.get("StudyDate", "") or "").strip()
    return text if re.fullmatch(r"\d{8}", text) else ""


# ------------------------------------------------------------------------------------- helpers
def _hash_oid(*parts: str) -> str:
    """'urn:oid:2.25.' + the decimal of the first 128 bits of SHA-256 over ``parts`` (as sr._hash_uid)."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return "urn:oid:2.25." + str(int.from_bytes(digest[:16], "big"))


def _full_url(system: str, value: str) -> str:
    return f"urn:uuid:{uuid.uuid5(_FUID_NAMESPACE, system + '|' + value)}"


def _escape(value: str) -> str:
    """FHIR search escaping (\\ , $ |) and then percent-encoding for a URL query value."""
    escaped = re.sub(r"([\\,$|])", r"\\\1", value)
    return quote(escaped, safe=":/.-_~@")


def conditional_url(resource_type: str, system: str, value: str) -> str:
    """``<Type>?identifier=<system>|<value>``, each part escaped (FHIR R4 search, token parameters)."""
    return f"{resource_type}?identifier={_escape(system)}|{_escape(value)}"


def parse_conditional_url(url: str) -> tuple[str, str, str]:
    """Inverse of :func:`conditional_url`: (resource type, system, value)."""
    parts = urlsplit(url)
    token = parse_qs(parts.query).get("identifier", [""])[0]
    pieces = re.split(r"(?<!\\)\|", token, maxsplit=1)
    if len(pieces) != 2:
        raise InvalidParameterError(f"url: not a conditional identifier URL: {url!r}")
    system, value = (re.sub(r"\\([\\,$|])", r"\1", p) for p in pieces)
    return parts.path, system, value


def _coding(concept: CodedConcept) -> dict[str, str]:
    return {
        "system": _SYSTEMS[str(concept.scheme_designator)],
        "code": str(concept.value),
        "display": str(concept.meaning),
    }


def _local(code: str, display: str) -> dict[str, str]:
    return {"system": CODE_SYSTEM, "code": code, "display": display}


def _concept(*codings: dict[str, str], text: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"coding": list(codings)}
    if text:
        out["text"] = text
    return out


def _number(where: str, value: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise InvalidParameterError(f"{where} must be a finite number, got {value!r}")
    return number


def _quantity(value: float, unit: CodedConcept) -> dict[str, Any]:
    code = str(unit.value)
    return {"value": value, "unit": UNIT_TEXT.get(code, code), "system": UCUM, "code": code}


def _component(coding: dict[str, str], **value: Any) -> dict[str, Any]:
    return {"code": _concept(coding), **value}


def _check_uid(where: str, uid: str) -> str:
    uid = str(uid).strip()
    if not uid or len(uid) > 64 or not _UID.match(uid):
        raise InvalidParameterError(f"{where} must be a DICOM UID (digits and dots, at most 64), got {uid!r}")
    return uid


def _fhir_date(where: str, da: str) -> str | None:
    da = str(da or "").strip()
    if not da:
        return None
    m = re.fullmatch(r"(\d{4})(\d{2})(\d{2})", da)
    if not m or not (1 <= int(m.group(2)) <= 12 and 1 <= int(m.group(3)) <= 31):
        raise InvalidParameterError(f"{where} must be a DICOM date YYYYMMDD, got {da!r}")
    return f"{m.group(1)}-{m.group(2)}-{m.group(3)}"


def resolve_patient_system(configured: str, issuer_of_patient_id: str) -> str:
    """The identifier system of the patient's ID.

    ``configured`` (the setting) wins; else an IssuerOfPatientID that is already a URI is used as is and
    one that is an OID becomes ``urn:oid:<OID>``. Anything else cannot be mapped safely: refused.
    """
    system = str(configured or "").strip()
    issuer = str(issuer_of_patient_id or "").strip()
    if not system:
        if re.match(r"^(urn:|https?://)", issuer):
            system = issuer
        elif _UID.match(issuer):
            system = f"urn:oid:{issuer}"
        else:
            raise InvalidParameterError(
                "patient_identifier_system is empty and IssuerOfPatientID "
                f"({'empty' if not issuer else 'not a URI or OID'}) cannot stand for it: configure the system"
            )
    if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$", system):
        raise InvalidParameterError(f"patient_identifier_system must be an absolute URI, got {system!r}")
    return system


def _reference(resource_type: str, system: str, value: str, mode: ReferenceMode) -> dict[str, Any]:
    ref: dict[str, Any] = {"type": resource_type, "identifier": {"system": system, "value": value}}
    if mode == "conditional":
        ref["reference"] = conditional_url(resource_type, system, value)
    return ref


def _entry(resource: dict[str, Any], method: str = "PUT") -> dict[str, Any]:
    ident = resource["identifier"][0]
    rtype = resource["resourceType"]
    url = conditional_url(rtype, ident["system"], ident["value"])
    if method == "PUT":
        request = {"method": "PUT", "url": url}
    else:  # conditional create: POST only if no resource has that identifier yet
        request = {"method": "POST", "url": rtype, "ifNoneExist": url.split("?", 1)[1]}
    return {"fullUrl": _full_url(ident["system"], ident["value"]), "resource": resource, "request": request}


# ---------------------------------------------------------------------------------- resources
@dataclass(frozen=True)
class _Context:
    subject: dict[str, Any]
    imaging_study: dict[str, Any]
    device_ref: dict[str, str]
    effective: str
    issued: str
    sr_uid: str


def _observation_base(ctx: _Context, key: tuple[str, ...], code: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "identifier": [
            {"system": URI_SYSTEM, "value": _hash_oid("facesym-fhir-observation", ctx.sr_uid, *key)}
        ],
        "status": "final",
        "category": [_concept({"system": OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"})],
        "code": code,
        "subject": ctx.subject,
        "effectiveDateTime": ctx.effective,
        "issued": ctx.issued,
        "bodySite": _concept(_coding(codes.FACE)),
        "device": ctx.device_ref,
        "derivedFrom": [ctx.imaging_study],
    }


def _source_component(finding: InstanceFinding) -> dict[str, Any]:
    return _component(_local(*SOURCE_INSTANCE), valueString=finding.sop_instance_uid)


def _notes(texts: Sequence[str], warnings: Sequence[str]) -> list[dict[str, str]]:
    notes = [{"text": str(t)} for t in texts if str(t)]
    return notes + [{"text": WARNING_PREFIX + str(w)} for w in warnings if str(w)]


def _side_code(concept: CodedConcept, side: Side) -> dict[str, str]:
    return _local(f"{concept.value}{SIDE_SUFFIX[side]}", f"{concept.meaning}, {side.value}")


def _task_observation(
    ctx: _Context, finding: InstanceFinding, task: TaskResult, where: str
) -> dict[str, Any]:
    if task.method not in codes.METHOD:
        raise InvalidParameterError(
            f"{where}.method must be one of {sorted(codes.METHOD)}, got {task.method!r}"
        )
    finding_code = codes.FINDING[task.task]
    unit = codes.magnitude_unit(task.task)
    obs = _observation_base(
        ctx,
        (finding.sop_instance_uid, "task", task.task.value),
        _concept(
            _coding(finding_code), text=f"FaceSym {str(finding_code.meaning).lower()} symmetry analysis"
        ),
    )
    obs["method"] = _concept(_coding(codes.METHOD[task.method]))
    components = [_source_component(finding)]
    for side, value in ((Side.LEFT, task.left), (Side.RIGHT, task.right)):
        components.append(
            _component(
                _side_code(codes.MAGNITUDE, side),
                valueQuantity=_quantity(_number(f"{where}.{side.value}", value), unit),
            )
        )
    for concept, attr, qunit in (
        (codes.ASYMMETRY_INDEX, "asymmetry_index", codes.UNIT_ONE),
        (codes.ASYMMETRY_SCORE, "asymmetry_score", codes.UNIT_SCORE),
        (codes.COSINE_INDEX, "cosine_index", codes.UNIT_ONE),
        (codes.COSINE_SCORE, "cosine_score", codes.UNIT_SCORE),
        (codes.ACTIVATION_GATE, "activation_gate", codes.UNIT_ONE),
    ):
        number = _number(f"{where}.{attr}", getattr(task, attr))
        components.append(_component(_coding(concept), valueQuantity=_quantity(number, qunit)))
    for k, region in enumerate(task.flow):
        if region.region not in codes.FLOW_SS:
            raise InvalidParameterError(f"{where}.flow[{k}].region must be one of {sorted(codes.FLOW_SS)}")
        number = _number(f"{where}.flow[{k}].symmetry_score", region.symmetry_score)
        components.append(
            _component(_coding(codes.FLOW_SS[region.region]), valueQuantity=_quantity(number, codes.UNIT_ONE))
        )
    head = task.head_motion
    if head is not None:  # quality figure: the residual of the rigid fit and the head motion it removed
        for concept, attr, qunit in codes.HEAD_MOTION_MEASUREMENTS:
            number = _number(f"{where}.head_motion.{attr}", getattr(head, attr))
            components.append(_component(_coding(concept), valueQuantity=_quantity(number, qunit)))
        components.append(_component(_coding(codes.HEAD_MOTION_CORRECTED), valueBoolean=bool(head.corrected)))
    components.append(
        _component(_coding(codes.INSUFFICIENT_ACTIVATION), valueBoolean=bool(task.insufficient_activation))
    )
    weaker = codes.LATERALITY[task.weaker_side] if task.weaker_side else codes.NO_WEAKER_SIDE
    components.append(_component(_coding(codes.WEAKER_SIDE), valueCodeableConcept=_concept(_coding(weaker))))
    extra_notes: tuple[str, ...] = ()
    if task.grade is not None:
        if task.grade.label not in codes.GRADE_CLASS:
            raise InvalidParameterError(f"{where}.grade.label must be one of {list(codes.GRADE_CLASS)}")
        grade_code = _concept(_coding(codes.GRADE_CLASS[task.grade.label]))
        components.append(_component(_coding(codes.GRADE), valueCodeableConcept=grade_code))
        from service.report.summary import grade_statement

        extra_notes = (grade_statement(task.grade),)
    obs["component"] = components
    notes = _notes(task.notes + extra_notes, finding.analysis.quality.warnings)
    if notes:
        obs["note"] = notes
    return obs


def _static_observation(ctx: _Context, finding: InstanceFinding, where: str) -> dict[str, Any]:
    obs = _observation_base(
        ctx,
        (finding.sop_instance_uid, "static"),
        _concept(_coding(codes.FINDING_STATIC), text="FaceSym facial symmetry at rest"),
    )
    components = [_source_component(finding)]
    for k, item in enumerate(finding.analysis.static):
        if item.name not in codes.STATIC_ITEM:
            raise InvalidParameterError(
                f"{where}.static[{k}].name must be one of {sorted(codes.STATIC_ITEM)}, got {item.name!r}"
            )
        for side, value in ((Side.LEFT, item.left), (Side.RIGHT, item.right)):
            number = _number(f"{where}.static[{k}].{side.value}", value)
            components.append(
                _component(
                    _side_code(codes.STATIC_ITEM[item.name], side),
                    valueQuantity=_quantity(number, codes.UNIT_D),
                )
            )
    obs["component"] = components
    notes = _notes((), finding.analysis.quality.warnings)
    if notes:
        obs["note"] = notes
    return obs


def _not_analysable_observation(ctx: _Context, finding: InstanceFinding) -> dict[str, Any]:
    quality = finding.analysis.quality
    obs = _observation_base(
        ctx,
        (finding.sop_instance_uid, "not-analysable"),
        _concept(_coding(codes.ANALYSIS_QUALITY), text="FaceSym analysis quality"),
    )
    obs["dataAbsentReason"] = _concept(
        {"system": DATA_ABSENT_REASON, "code": "not-performed", "display": "Not Performed"},
        text="Not analysable",
    )
    obs["interpretation"] = [_concept(_coding(codes.NOT_ANALYSABLE))]
    obs["component"] = [_source_component(finding)]
    notes = _notes(quality.reasons or ("not analysable",), quality.warnings)
    obs["note"] = notes
    return obs


def _device(engine_version: str) -> dict[str, Any]:
    return {
        "resourceType": "Device",
        "identifier": [
            {"system": URI_SYSTEM, "value": _hash_oid("facesym-fhir-device", DEVICE_NAME, engine_version)}
        ],
        "status": "active",
        "manufacturer": MANUFACTURER,
        "deviceName": [
            {"name": DEVICE_NAME, "type": "manufacturer-name"},
            {"name": DEVICE_NAME, "type": "model-name"},
        ],
        "modelNumber": DEVICE_NAME,
        "type": {"text": "Facial palsy motion analysis software"},
        "version": [{"type": {"text": "engine"}, "value": engine_version}],
    }


def _comparison_text(findings: Sequence[InstanceFinding], priors: Sequence[PriorStudy]) -> str:
    return comparison_text((f.analysis for f in findings), priors)


def _conclusion(findings: Sequence[InstanceFinding]) -> str:
    parts: list[str] = []
    for finding in findings:
        for task in finding.analysis.tasks:
            name = str(codes.FINDING[task.task].meaning).lower()
            side = (
                f"weaker side: patient's {task.weaker_side.value}" if task.weaker_side else "no weaker side"
            )
            extra = ", insufficient activation" if task.insufficient_activation else ""
            if task.head_motion is not None and not task.head_motion.corrected:
                extra += f", head motion not corrected (residual {task.head_motion.residual_d:.3f} D)"
            parts.append(f"{name}: asymmetry score {task.asymmetry_score:.1f}/100 ({side}{extra})")
    bad = sum(1 for f in findings if not f.analysis.quality.ok)
    text = "; ".join(parts) if parts else "no task could be scored"
    text = text[0].upper() + text[1:] + "."
    if bad:
        text += f" {bad} instance{'s' if bad != 1 else ''} not analysable."
    return text + " Asymmetry score: 100 = symmetric movement."


def build_bundle(
    study: StudyIdentity,
    findings: Sequence[InstanceFinding],
    *,
    sr_sop_instance_uid: str,
    engine_version: str,
    patient_identifier_system: str,
    issued: datetime,
    reference_mode: ReferenceMode = "conditional",
    comparison: Sequence[PriorStudy] = (),
) -> dict[str, Any]:
    """The study's results as a FHIR R4 transaction Bundle (plain JSON-ready dict, validated).

    Parameters
    ----------
    study
        Identifiers of the study and patient (:func:`study_identity_from_dicom` or the database).
    findings
        What the engine said about each instance (the same list the SR is built from).
    sr_sop_instance_uid
        SOP Instance UID of the study's SR: the DiagnosticReport's identifier and the seed of every other
        identifier, so a resend of the same result updates the same resources.
    engine_version
        The algorithm version (the Device's version).
    patient_identifier_system
        Identifier system of DICOM PatientID; "" derives it from IssuerOfPatientID when that is a URI or an
        OID (:func:`resolve_patient_system`).
    issued
        When the result was made (timezone-aware): DiagnosticReport/Observation ``issued``, Bundle timestamp.
    reference_mode
        "conditional": Patient and ImagingStudy references are conditional references
        (``Patient?identifier=...``) that the server resolves (the transaction fails when no or several
        resources match) plus the identifier; "logical": the identifier only (no resolution).

    Raises
    ------
    InvalidParameterError
        A bad input, with the argument named (``study.patient_id``, ``findings[0].analysis.tasks[1].left``).
    """
    if not isinstance(study, StudyIdentity):
        raise InvalidParameterError(f"study must be a StudyIdentity, got {type(study).__name__}")
    study_uid = _check_uid("study.study_instance_uid", study.study_instance_uid)
    sr_uid = _check_uid("sr_sop_instance_uid", sr_sop_instance_uid)
    patient_id = str(study.patient_id or "").strip()
    if not patient_id:
        raise InvalidParameterError("study.patient_id must not be empty (the EHR needs the patient)")
    if not str(engine_version or "").strip():
        raise InvalidParameterError("engine_version must not be empty")
    if not isinstance(issued, datetime) or issued.tzinfo is None or issued.utcoffset() is None:
        raise InvalidParameterError(f"issued must be a timezone-aware datetime, got {issued!r}")
    if reference_mode not in ("conditional", "logical"):
        raise InvalidParameterError(f"reference_mode must be conditional or logical, got {reference_mode!r}")
    if not findings:
        raise InvalidParameterError("findings must not be empty")
    system = resolve_patient_system(patient_identifier_system, study.issuer_of_patient_id)
    study_date = _fhir_date("study.study_date", study.study_date)
    issued_text = issued.isoformat(timespec="milliseconds")

    device = _device(str(engine_version).strip())
    device_entry = _entry(device, method="POST")
    ctx = _Context(
        subject=_reference("Patient", system, patient_id, reference_mode),
        imaging_study=_reference("ImagingStudy", DICOM_UID, f"urn:oid:{study_uid}", reference_mode),
        device_ref={"reference": device_entry["fullUrl"], "type": "Device"},
        effective=study_date or issued_text,
        issued=issued_text,
        sr_uid=sr_uid,
    )
    observations: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for k, finding in enumerate(findings):
        where = f"findings[{k}]"
        if not isinstance(finding, InstanceFinding):
            raise InvalidParameterError(f"{where} must be an InstanceFinding, got {type(finding).__name__}")
        _check_uid(f"{where}.sop_instance_uid", finding.sop_instance_uid)
        analysis = finding.analysis
        if not analysis.quality.ok:
            observations.append(_not_analysable_observation(ctx, finding))
            continue
        for j, task in enumerate(analysis.tasks):
            key = (finding.sop_instance_uid, task.task.value)
            if key in seen:
                raise InvalidParameterError(
                    f"{where}.analysis.tasks[{j}]: task {task.task.value} twice for one instance"
                )
            seen.add(key)
            observations.append(_task_observation(ctx, finding, task, f"{where}.analysis.tasks[{j}]"))
        if analysis.static:
            observations.append(_static_observation(ctx, finding, f"{where}.analysis"))
    obs_entries = [_entry(o) for o in observations]

    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{sr_uid}"}],
        "status": "final",
        "code": _concept(_coding(codes.PROCEDURE), text="FaceSym facial nerve function (symmetry) analysis"),
        "subject": ctx.subject,
        "effectiveDateTime": ctx.effective,
        "issued": issued_text,
        "result": [{"reference": e["fullUrl"], "type": "Observation"} for e in obs_entries],
        "imagingStudy": [ctx.imaging_study],
        "conclusion": _conclusion(findings) + _comparison_text(findings, comparison),
    }
    accession = str(study.accession_number or "").strip()
    if accession:  # the order, by its accession number (logical reference: never needs resolving)
        report["basedOn"] = [
            {
                "type": "ServiceRequest",
                "identifier": {
                    "type": _concept({"system": IDENTIFIER_TYPE, "code": "ACSN", "display": "Accession ID"}),
                    "value": accession,
                },
            }
        ]
    report_entry = _entry(report)

    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "identifier": {"system": URI_SYSTEM, "value": _hash_oid("facesym-fhir-bundle", sr_uid)},
        "type": "transaction",
        "timestamp": issued_text,
        "entry": [device_entry, *obs_entries, report_entry],
    }
    validate_bundle(bundle)
    return bundle


# --------------------------------------------------------------------------------- validation
def validate_bundle(bundle: Mapping[str, Any]) -> None:
    """Validate ``bundle`` with fhir.resources' R4B models (structure, types, cardinality, formats).

    Code values are not checked by fhir.resources. Raises FhirValidationError.
    """
    from fhir.resources.R4B.bundle import Bundle

    if not isinstance(bundle, Mapping) or bundle.get("resourceType") != "Bundle":
        raise FhirValidationError("bundle must be a JSON object with resourceType 'Bundle'")
    try:
        json.dumps(bundle, allow_nan=False)
        Bundle.model_validate(dict(bundle))
    except (TypeError, ValueError) as exc:
        detail = exc.errors(include_url=False) if isinstance(exc, ValidationError) else str(exc)
        raise FhirValidationError(f"bundle is not valid FHIR R4: {detail}") from None


def bundle_identifier(bundle: Mapping[str, Any]) -> str:
    """The Bundle's identifier value (``urn:oid:...``), or "" when it has none."""
    ident = bundle.get("identifier") or {}
    return str(ident.get("value", "")) if isinstance(ident, Mapping) else ""


# ------------------------------------------------------------------------------------- reader
def _code_of(concept: Mapping[str, Any] | None) -> tuple[str, str] | None:
    for coding in (concept or {}).get("coding", []):
        return str(coding.get("system", "")), str(coding.get("code", ""))
    return None


def _key(concept: CodedConcept) -> tuple[str, str]:
    return _SYSTEMS[str(concept.scheme_designator)], str(concept.value)


def _quantity_value(component: Mapping[str, Any]) -> float | None:
    q = component.get("valueQuantity")
    return float(q["value"]) if q and q.get("value") is not None else None


def _split_notes(obs: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    notes, warnings = [], []
    for note in obs.get("note", []):
        text = str(note.get("text", ""))
        if text.startswith(WARNING_PREFIX):
            warnings.append(text[len(WARNING_PREFIX) :])
        else:
            notes.append(text)
    return notes, warnings


def read_bundle(bundle: Mapping[str, Any] | Any) -> list[dict[str, Any]]:
    """Read back what :func:`build_bundle` wrote (round-trip tests, integrators' checks).

    ``bundle`` is the JSON dict (or an R4B ``Bundle`` model). Returns one dict per Observation, in Bundle
    order, with ``kind``:

    - "task": ``sop_instance_uid, task, unit, left, right, asymmetry_index, asymmetry_score, cosine_index,
      cosine_score, activation_gate, insufficient_activation, weaker_side ("left" | "right" | None),
      head_motion ({roll_deg, yaw_deg, pitch_deg, scale_pct, shift_d, residual_d, corrected} | None),
      method, notes, warnings, identifier``;
    - "static": ``sop_instance_uid, static [{name, left, right}], warnings, identifier``;
    - "not_analysable": ``sop_instance_uid, reasons, warnings, identifier``.
    """
    if hasattr(bundle, "model_dump"):
        bundle = bundle.model_dump(mode="json")
    tasks = {_key(c): t for t, c in codes.FINDING.items()}
    methods = {_key(c): m for m, c in codes.METHOD.items()}
    sides = {_key(c): s.value for s, c in codes.LATERALITY.items()}
    scalar = {
        _key(codes.ASYMMETRY_INDEX): "asymmetry_index",
        _key(codes.ASYMMETRY_SCORE): "asymmetry_score",
        _key(codes.COSINE_INDEX): "cosine_index",
        _key(codes.COSINE_SCORE): "cosine_score",
        _key(codes.ACTIVATION_GATE): "activation_gate",
    }
    flow_ss = {_key(c): region for region, c in codes.FLOW_SS.items()}
    head_motion = {_key(c): attr for c, attr, _ in codes.HEAD_MOTION_MEASUREMENTS}
    per_side: dict[tuple[str, str], tuple[str, str]] = {}
    for side, suffix in SIDE_SUFFIX.items():
        per_side[(CODE_SYSTEM, f"{codes.MAGNITUDE.value}{suffix}")] = ("magnitude", side.value)
        for name, concept in codes.STATIC_ITEM.items():
            per_side[(CODE_SYSTEM, f"{concept.value}{suffix}")] = (name, side.value)
    source = (CODE_SYSTEM, SOURCE_INSTANCE[0])

    out: list[dict[str, Any]] = []
    for entry in bundle.get("entry", []):
        obs = entry.get("resource", {})
        if obs.get("resourceType") != "Observation":
            continue
        code = _code_of(obs.get("code"))
        notes, warnings = _split_notes(obs)
        item: dict[str, Any] = {
            "sop_instance_uid": None,
            "identifier": (obs.get("identifier") or [{}])[0].get("value"),
        }
        values: dict[str, Any] = {}
        static: dict[str, dict[str, Any]] = {}
        for comp in obs.get("component", []):
            ckey = _code_of(comp.get("code"))
            if ckey == source:
                item["sop_instance_uid"] = comp.get("valueString")
            elif ckey in scalar:
                values[scalar[ckey]] = _quantity_value(comp)
            elif ckey in per_side:
                name, side_name = per_side[ckey]
                if name == "magnitude":
                    values[side_name] = _quantity_value(comp)
                    values["unit"] = comp["valueQuantity"].get("code")
                else:
                    static.setdefault(name, {"name": name, "left": None, "right": None})[side_name] = (
                        _quantity_value(comp)
                    )
            elif ckey in flow_ss:
                values.setdefault("flow", {})[flow_ss[ckey]] = _quantity_value(comp)
            elif ckey in head_motion:
                values.setdefault("head_motion", {})[head_motion[ckey]] = _quantity_value(comp)
            elif ckey == _key(codes.HEAD_MOTION_CORRECTED):
                values.setdefault("head_motion", {})["corrected"] = bool(comp.get("valueBoolean"))
            elif ckey == _key(codes.GRADE):
                grade_key = _code_of(comp.get("valueCodeableConcept")) or ("", "")
                values["grade"] = {_key(c): label for label, c in codes.GRADE_CLASS.items()}.get(grade_key)
            elif ckey == _key(codes.INSUFFICIENT_ACTIVATION):
                values["insufficient_activation"] = bool(comp.get("valueBoolean"))
            elif ckey == _key(codes.WEAKER_SIDE):
                values["weaker_side"] = sides.get(_code_of(comp.get("valueCodeableConcept")) or ("", ""))
        if code in tasks:
            item.update(
                kind="task",
                task=tasks[code].value,
                unit=values.get("unit"),
                left=values.get("left"),
                right=values.get("right"),
                asymmetry_index=values.get("asymmetry_index"),
                asymmetry_score=values.get("asymmetry_score"),
                cosine_index=values.get("cosine_index"),
                cosine_score=values.get("cosine_score"),
                activation_gate=values.get("activation_gate"),
                insufficient_activation=values.get("insufficient_activation"),
                weaker_side=values.get("weaker_side"),
                flow_symmetry_scores=values.get("flow", {}),
                grade=values.get("grade"),
                head_motion=values.get("head_motion"),
                method=methods.get(_code_of(obs.get("method")) or ("", "")),
                notes=notes,
                warnings=warnings,
            )
        elif code == _key(codes.FINDING_STATIC):
            item.update(kind="static", static=list(static.values()), warnings=warnings)
        elif code == _key(codes.ANALYSIS_QUALITY):
            item.update(kind="not_analysable", reasons=notes, warnings=warnings)
        else:
            continue
        out.append(item)
    return out


__all__ = [
    "CODE_SYSTEM",
    "FhirValidationError",
    "StudyIdentity",
    "build_bundle",
    "bundle_identifier",
    "conditional_url",
    "parse_conditional_url",
    "read_bundle",
    "resolve_patient_system",
    "study_identity_from_dicom",
    "validate_bundle",
]
