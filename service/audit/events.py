"""DICOM PS3.15 A.5 audit messages: typed constructors and the XML of the DICOM audit message schema.

Every constructor returns a frozen :class:`AuditEvent`; :meth:`AuditEvent.to_xml` renders one
``<AuditMessage>`` (EventIdentification, ActiveParticipant+, AuditSourceIdentification,
ParticipantObjectIdentification*) on a single line, ready for the database and for syslog.

PHI: the only patient datum an event can carry is the Patient ID (with its issuer), the minimum the
standard's Patient participant object requires. Constructors that accept a patient take a string, a
mapping or a pydicom data set and keep only ``PatientID`` / ``IssuerOfPatientID``; names and birth
dates are never read. conformance/audit-events.md lists every event FaceSym emits.
"""

from __future__ import annotations

import base64
import getpass
import ipaddress
import os
import socket
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

# --- Outcome (EventOutcomeIndicator) -------------------------------------------------------------------

SUCCESS = 0
MINOR_FAILURE = 4
SERIOUS_FAILURE = 8
MAJOR_FAILURE = 12
OUTCOMES = (SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE)

ACTIONS = ("C", "R", "U", "D", "E")


@dataclass(frozen=True)
class Code:
    """A coded value of the audit schema: ``csd-code``, ``codeSystemName``, ``originalText``."""

    code: str
    system: str
    text: str

    def element(self, parent: ET.Element, tag: str) -> ET.Element:
        return ET.SubElement(
            parent, tag, {"csd-code": self.code, "codeSystemName": self.system, "originalText": self.text}
        )


DCM = "DCM"
RFC3881 = "RFC-3881"
#: FaceSym's private coding scheme (PS3.16 8.2), as in the SR (conformance/local-codes.md).
LOCAL = "99FACESYM"

# Event IDs (PS3.15 A.5.3, CID 400)
APPLICATION_ACTIVITY = Code("110100", DCM, "Application Activity")
INSTANCES_ACCESSED = Code("110103", DCM, "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = Code("110104", DCM, "DICOM Instances Transferred")
STUDY_DELETED = Code("110105", DCM, "DICOM Study Deleted")
EXPORT = Code("110106", DCM, "Export")
IMPORT = Code("110107", DCM, "Import")
QUERY = Code("110112", DCM, "Query")
SECURITY_ALERT = Code("110113", DCM, "Security Alert")
USER_AUTHENTICATION = Code("110114", DCM, "User Authentication")

# Event type codes (CID 401 and friends)
APPLICATION_START = Code("110120", DCM, "Application Start")
APPLICATION_STOP = Code("110121", DCM, "Application Stop")
LOGIN = Code("110122", DCM, "Login")
LOGOUT = Code("110123", DCM, "Logout")
NODE_AUTHENTICATION = Code("110126", DCM, "Node Authentication")
NETWORK_CONFIGURATION = Code("110128", DCM, "Network Configuration")
SECURITY_CONFIGURATION = Code("110129", DCM, "Security Configuration")
SOFTWARE_CONFIGURATION = Code("110131", DCM, "Software Configuration")
USE_OF_RESTRICTED_FUNCTION = Code("110132", DCM, "Use of Restricted Function")
AUDIT_RECORDING_STOPPED = Code("110133", DCM, "Audit Recording Stopped")
AUDIT_RECORDING_STARTED = Code("110134", DCM, "Audit Recording Started")
ANALYSIS_BEGUN = Code("FSY-AUD-ANABEG", LOCAL, "Analysis begun")
ANALYSIS_FINISHED = Code("FSY-AUD-ANAEND", LOCAL, "Analysis finished")

# Active participant roles (CID 402)
ROLE_APPLICATION = Code("110150", DCM, "Application")
ROLE_APPLICATION_LAUNCHER = Code("110151", DCM, "Application Launcher")
ROLE_DESTINATION = Code("110152", DCM, "Destination Role ID")
ROLE_SOURCE = Code("110153", DCM, "Source Role ID")

# Participant object ID types (CID 404 and RFC 3881)
STUDY_INSTANCE_UID = Code("110180", DCM, "Study Instance UID")
SOP_CLASS_UID = Code("110181", DCM, "SOP Class UID")
NODE_ID = Code("110182", DCM, "Node ID")
PATIENT_NUMBER = Code("2", RFC3881, "Patient Number")
URI = Code("12", RFC3881, "URI")
SETTING = Code("FSY-AUD-SETTING", LOCAL, "Configuration setting")

# AuditSourceTypeCode 4: Application Server Process (PS3.15 A.5.1)
AUDIT_SOURCE_APPLICATION_SERVER = Code("4", DCM, "Application Server Process")

# ParticipantObjectTypeCode / ParticipantObjectTypeCodeRole (RFC 3881)
TYPE_PERSON, TYPE_SYSTEM_OBJECT = "1", "2"
ROLE_PATIENT, ROLE_REPORT, ROLE_SECURITY_RESOURCE = "1", "3", "13"

SR_SOP_CLASS_COMPREHENSIVE = "1.2.840.10008.5.1.4.1.1.88.33"


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant."""

    user_id: str
    is_requestor: bool
    roles: tuple[Code, ...] = ()
    network_access_point: str = ""
    alternative_user_id: str = ""
    user_name: str = ""


@dataclass(frozen=True)
class SOPClassCount:
    uid: str
    count: int
    instances: tuple[str, ...] = ()


@dataclass(frozen=True)
class ParticipantObject:
    """A ParticipantObjectIdentification (study, patient, SOP class queried, node, setting, ...)."""

    object_id: str
    id_type: Code
    type_code: str = TYPE_SYSTEM_OBJECT
    role: str = ""
    description: str = ""
    sop_classes: tuple[SOPClassCount, ...] = ()
    details: tuple[tuple[str, bytes], ...] = ()  # ParticipantObjectDetail type/value
    query: bytes = b""  # ParticipantObjectQuery (base64 in the XML)


@dataclass(frozen=True)
class AuditEvent:
    """One audit event. ``fields`` holds the rest of the message (see :func:`make_event`)."""

    event_id: str
    action: str
    outcome: int
    time: datetime
    fields: Mapping[str, Any] = field(default_factory=dict)

    @property
    def event_code(self) -> Code:
        code: Code = self.fields["event"]
        return code

    @property
    def participants(self) -> tuple[Participant, ...]:
        return tuple(self.fields.get("participants", ()))

    @property
    def objects(self) -> tuple[ParticipantObject, ...]:
        return tuple(self.fields.get("objects", ()))

    @property
    def type_codes(self) -> tuple[Code, ...]:
        return tuple(self.fields.get("type_codes", ()))

    def study_uids(self) -> list[str]:
        return [o.object_id for o in self.objects if o.id_type == STUDY_INSTANCE_UID]

    def has_patient(self) -> bool:
        return any(o.role == ROLE_PATIENT and o.type_code == TYPE_PERSON for o in self.objects)

    def with_patient(self, patient_id: str) -> AuditEvent:
        """The same event with a Patient participant object (if it has none and ``patient_id`` is set)."""
        if not patient_id or self.has_patient():
            return self
        return replace(self, fields={**self.fields, "objects": (*self.objects, _patient_object(patient_id))})

    def with_source(self, source_id: str, site_id: str = "") -> AuditEvent:
        """The same event with AuditSourceID / AuditEnterpriseSiteID filled where they are empty."""
        fields = dict(self.fields)
        if not fields.get("source_id") and source_id:
            fields["source_id"] = source_id
        if not fields.get("site_id") and site_id:
            fields["site_id"] = site_id
        return replace(self, fields=fields)

    def to_xml(self) -> str:
        """The ``<AuditMessage>`` (PS3.15 A.5.1 schema) as one line of XML, without an XML declaration."""
        root = ET.Element("AuditMessage")
        ident = ET.SubElement(
            root,
            "EventIdentification",
            {
                "EventActionCode": self.action,
                "EventDateTime": iso_time(self.time),
                "EventOutcomeIndicator": str(self.outcome),
            },
        )
        self.event_code.element(ident, "EventID")
        for code in self.type_codes:
            code.element(ident, "EventTypeCode")
        description = _clean(str(self.fields.get("description", "")))
        if description:
            ET.SubElement(ident, "EventOutcomeDescription").text = description
        for p in self.participants:
            attrib = {"UserID": _clean(p.user_id) or "unknown"}
            if p.alternative_user_id:
                attrib["AlternativeUserID"] = _clean(p.alternative_user_id)
            if p.user_name:
                attrib["UserName"] = _clean(p.user_name)
            attrib["UserIsRequestor"] = "true" if p.is_requestor else "false"
            if p.network_access_point:
                attrib["NetworkAccessPointID"] = _clean(p.network_access_point)
                attrib["NetworkAccessPointTypeCode"] = _nap_type(p.network_access_point)
            el = ET.SubElement(root, "ActiveParticipant", attrib)
            for role in p.roles:
                role.element(el, "RoleIDCode")
        src_attrib = {}
        if self.fields.get("site_id"):
            src_attrib["AuditEnterpriseSiteID"] = _clean(str(self.fields["site_id"]))
        src_attrib["AuditSourceID"] = _clean(str(self.fields.get("source_id") or default_source_id()))
        src = ET.SubElement(root, "AuditSourceIdentification", src_attrib)
        AUDIT_SOURCE_APPLICATION_SERVER.element(src, "AuditSourceTypeCode")
        for o in self.objects:
            attrib = {"ParticipantObjectID": _clean(o.object_id), "ParticipantObjectTypeCode": o.type_code}
            if o.role:
                attrib["ParticipantObjectTypeCodeRole"] = o.role
            el = ET.SubElement(root, "ParticipantObjectIdentification", attrib)
            o.id_type.element(el, "ParticipantObjectIDTypeCode")
            if o.query:
                ET.SubElement(el, "ParticipantObjectQuery").text = base64.b64encode(o.query).decode("ascii")
            for kind, value in o.details:
                ET.SubElement(
                    el, "ParticipantObjectDetail",
                    {"type": _clean(kind), "value": base64.b64encode(value).decode("ascii")},
                )
            if o.description:
                ET.SubElement(el, "ParticipantObjectDescription").text = _clean(o.description)
            for sc in o.sop_classes:
                sop = ET.SubElement(
                    el, "SOPClass", {"UID": _clean(sc.uid), "NumberOfInstances": str(sc.count)}
                )
                for uid in sc.instances:
                    ET.SubElement(sop, "Instance", {"UID": _clean(uid)})
        return ET.tostring(root, encoding="unicode")


# --- helpers ---------------------------------------------------------------------------------------------


def iso_time(t: datetime) -> str:
    """Canonical UTC time with microseconds, e.g. ``2024-05-01T10:00:00.123456+00:00`` (xsd:dateTime,
    RFC 5424 TIMESTAMP). Naive datetimes are taken as UTC."""
    t = t if t.tzinfo else t.replace(tzinfo=UTC)
    return t.astimezone(UTC).isoformat(timespec="microseconds")


def utcnow() -> datetime:
    return datetime.now(UTC)


def default_source_id() -> str:
    return f"facesym@{socket.gethostname()}"


def _clean(text: str) -> str:
    """Drop characters XML 1.0 cannot carry (control characters) so the message always parses."""
    return "".join(ch for ch in text if ch in "\t\n\r" or (ch >= " " and ch not in "\ufffe\uffff"))


def _nap_type(nap: str) -> str:
    """NetworkAccessPointTypeCode: 2 for an IP address, 1 for a machine name, 5 for a URI."""
    try:
        ipaddress.ip_address(nap)
        return "2"
    except ValueError:
        return "5" if "://" in nap else "1"


def patient_id_of(patient: Any) -> str:
    """The Patient ID (``ID^^^ISSUER`` when an issuer is known) from a string, mapping or data set.

    Only ``PatientID`` and ``IssuerOfPatientID`` (or ``patient_id`` / ``issuer``) are read; every other
    datum (name, birth date, sex, ...) is ignored on purpose.
    """
    if patient is None:
        return ""
    if isinstance(patient, str):
        return patient.strip()
    if isinstance(patient, Mapping):
        pid = patient.get("PatientID", patient.get("patient_id", ""))
        issuer = patient.get("IssuerOfPatientID", patient.get("issuer", ""))
    else:
        pid = getattr(patient, "PatientID", getattr(patient, "patient_id", ""))
        issuer = getattr(patient, "IssuerOfPatientID", getattr(patient, "issuer", ""))
    pid, issuer = str(pid or "").strip(), str(issuer or "").strip()
    if not pid:
        return ""
    return f"{pid}^^^{issuer}" if issuer else pid


def _patient_object(patient_id: str) -> ParticipantObject:
    return ParticipantObject(patient_id, PATIENT_NUMBER, TYPE_PERSON, ROLE_PATIENT)


def _sop_counts(sop_classes: Mapping[str, int] | None) -> tuple[SOPClassCount, ...]:
    return tuple(SOPClassCount(uid, int(n)) for uid, n in sorted((sop_classes or {}).items()) if uid)


def _study_object(
    study_uid: str, sop_classes: Mapping[str, int] | None = None, description: str = "",
    details: tuple[tuple[str, bytes], ...] = (), instances: Mapping[str, Sequence[str]] | None = None,
) -> ParticipantObject:
    counts = _sop_counts(sop_classes)
    if instances:
        counts = tuple(replace(c, instances=tuple(instances.get(c.uid, ()))) for c in counts)
    return ParticipantObject(
        study_uid, STUDY_INSTANCE_UID, TYPE_SYSTEM_OBJECT, ROLE_REPORT, description, counts, details
    )


def _public_url(url: str) -> str:
    """A URL without credentials, query or fragment (they may hold secrets)."""
    if "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    authority, slash, path = rest.partition("/")
    authority = authority.rsplit("@", 1)[-1]
    path = path.split("?", 1)[0].split("#", 1)[0]
    return f"{scheme}://{authority}{slash}{path}"


def _check(action: str, outcome: int) -> None:
    if action not in ACTIONS:
        raise ValueError(f"EventActionCode must be one of {ACTIONS}, got {action!r}")
    if outcome not in OUTCOMES:
        raise ValueError(f"EventOutcomeIndicator must be one of {OUTCOMES}, got {outcome!r}")


def local_participant(
    local_ae: str, *, is_requestor: bool, roles: tuple[Code, ...] = (), host: str | None = None
) -> Participant:
    """FaceSym itself: UserID = its AE title, AlternativeUserID = the process id, NAP = its host."""
    return Participant(
        user_id=local_ae or "FACESYM",
        is_requestor=is_requestor,
        roles=roles,
        network_access_point=host if host is not None else socket.gethostname(),
        alternative_user_id=str(os.getpid()),
    )


def make_event(
    event: Code,
    action: str,
    outcome: int,
    participants: Sequence[Participant],
    objects: Sequence[ParticipantObject] = (),
    *,
    type_codes: Sequence[Code] = (),
    description: str = "",
    time: datetime | None = None,
    source_id: str = "",
    site_id: str = "",
) -> AuditEvent:
    """The general constructor behind the typed ones below."""
    _check(action, outcome)
    if not participants:
        raise ValueError("an audit message needs at least one ActiveParticipant")
    return AuditEvent(
        event_id=event.code,
        action=action,
        outcome=outcome,
        time=time or utcnow(),
        fields={
            "event": event,
            "type_codes": tuple(type_codes),
            "participants": tuple(participants),
            "objects": tuple(objects),
            "description": description,
            "source_id": source_id,
            "site_id": site_id,
        },
    )


# --- typed constructors ----------------------------------------------------------------------------------


def application_activity(
    which: Literal["start", "stop"],
    *,
    local_ae: str = "FACESYM",
    launcher: str | None = None,
    outcome: int = SUCCESS,
    description: str = "",
    time: datetime | None = None,
) -> AuditEvent:
    """110100 Application Activity (E), type 110120 Application Start / 110121 Application Stop.

    Participants: the application (110150, AlternativeUserID = pid) and its launcher (110151, the OS user).
    """
    if which not in ("start", "stop"):
        raise ValueError(f"which must be start or stop, got {which!r}")
    app = local_participant(local_ae, is_requestor=False, roles=(ROLE_APPLICATION,))
    app = replace(app, alternative_user_id=f"AETITLES={local_ae};PID={os.getpid()}")
    try:
        user = launcher if launcher is not None else getpass.getuser()
    except (KeyError, OSError):
        user = f"uid:{os.getuid()}"
    who = Participant(user or "unknown", True, (ROLE_APPLICATION_LAUNCHER,))
    return make_event(
        APPLICATION_ACTIVITY, "E", outcome, [app, who],
        type_codes=[APPLICATION_START if which == "start" else APPLICATION_STOP],
        description=description, time=time,
    )


def instances_transferred(
    study_uid: str,
    sop_classes: Mapping[str, int],
    calling_ae: str,
    calling_ip: str,
    outcome: int = SUCCESS,
    *,
    local_ae: str = "FACESYM",
    direction: Literal["received", "sent"] = "received",
    patient: Any = None,
    action: str = "C",
    description: str = "",
    instances: Mapping[str, Sequence[str]] | None = None,
    time: datetime | None = None,
) -> AuditEvent:
    """110104 DICOM Instances Transferred, one per study and association.

    ``received``: the calling AE is the Source (110153, requestor), FaceSym the Destination (110152).
    ``sent``: FaceSym is the Source (requestor) and ``calling_ae``/``calling_ip`` name the peer that
    received the objects (Destination). Objects: the study (110180) with SOP classes and counts, the
    patient (ID only).
    """
    if direction == "received":
        peer = Participant(calling_ae, True, (ROLE_SOURCE,), calling_ip)
        me = local_participant(local_ae, is_requestor=False, roles=(ROLE_DESTINATION,))
        parts = [peer, me]
    else:
        me = local_participant(local_ae, is_requestor=True, roles=(ROLE_SOURCE,))
        peer = Participant(calling_ae, False, (ROLE_DESTINATION,), calling_ip)
        parts = [me, peer]
    objects = [_study_object(study_uid, sop_classes, instances=instances)] if study_uid else []
    pid = patient_id_of(patient)
    if pid:
        objects.append(_patient_object(pid))
    return make_event(
        INSTANCES_TRANSFERRED, action, outcome, parts, objects, description=description, time=time
    )


def instances_imported(
    study_uid: str,
    sop_classes: Mapping[str, int],
    calling_ae: str,
    calling_ip: str,
    outcome: int = SUCCESS,
    *,
    local_ae: str = "FACESYM",
    patient: Any = None,
    description: str = "",
    time: datetime | None = None,
) -> AuditEvent:
    """110107 Import (C): objects taken into FaceSym's control from a source outside DICOM networking
    (e.g. a file import); the source is ``calling_ae``/``calling_ip`` (110153), FaceSym the importer
    (110152, requestor)."""
    me = local_participant(local_ae, is_requestor=True, roles=(ROLE_DESTINATION,))
    src = Participant(calling_ae, False, (ROLE_SOURCE,), calling_ip)
    objects = [_study_object(study_uid, sop_classes)] if study_uid else []
    pid = patient_id_of(patient)
    if pid:
        objects.append(_patient_object(pid))
    return make_event(IMPORT, "C", outcome, [me, src], objects, description=description, time=time)


def export(
    study_uid: str,
    destination: str,
    what: Literal["SR", "FHIR"],
    outcome: int = SUCCESS,
    *,
    local_ae: str = "FACESYM",
    destination_host: str = "",
    report_uid: str = "",
    sop_class_uid: str = SR_SOP_CLASS_COMPREHENSIVE,
    patient: Any = None,
    description: str = "",
    time: datetime | None = None,
) -> AuditEvent:
    """A report leaving FaceSym.

    ``SR`` (C-STORE to a DICOM peer, same security domain): 110104 Instances Transferred, FaceSym the
    Source; ``destination`` is ``AETITLE@host:port`` (or an AE title with ``destination_host``).
    ``FHIR`` (a Bundle to an EHR, data leaving the DICOM domain): 110106 Export (R), the destination is
    the FHIR base URL. ``report_uid`` is the SR SOP Instance UID (SR) or the Bundle/DiagnosticReport URI
    (FHIR).
    """
    if what not in ("SR", "FHIR"):
        raise ValueError(f"what must be SR or FHIR, got {what!r}")
    if what == "SR":
        ae, host = destination, destination_host
        if "@" in destination:
            ae, _, rest = destination.partition("@")
            host = host or rest.rsplit(":", 1)[0]
        instances = {sop_class_uid: [report_uid]} if report_uid else None
        return instances_transferred(
            study_uid, {sop_class_uid: 1}, ae, host, outcome, local_ae=local_ae, direction="sent",
            patient=patient, description=description, instances=instances, time=time,
        )
    destination = _public_url(destination)
    host = destination_host
    if not host and "://" in destination:
        host = destination.split("://", 1)[1].split("/", 1)[0]
        if host.startswith("["):
            host = host[1:].split("]", 1)[0]
        elif host.count(":") == 1:
            host = host.rsplit(":", 1)[0]
    me = local_participant(local_ae, is_requestor=True, roles=(ROLE_SOURCE,))
    dest = Participant(destination, False, (ROLE_DESTINATION,), host)
    objects: list[ParticipantObject] = []
    if study_uid:
        objects.append(_study_object(study_uid, None, description="FHIR DiagnosticReport"))
    if report_uid:
        objects.append(ParticipantObject(report_uid, URI, TYPE_SYSTEM_OBJECT, ROLE_REPORT))
    pid = patient_id_of(patient)
    if pid:
        objects.append(_patient_object(pid))
    return make_event(EXPORT, "R", outcome, [me, dest], objects, description=description, time=time)


def analysis_event(
    which: Literal["begun", "finished"],
    job_id: int | str,
    study_uid: str,
    outcome: int = SUCCESS,
    reason: str = "",
    *,
    local_ae: str = "FACESYM",
    sop_classes: Mapping[str, int] | None = None,
    sr_uid: str = "",
    patient: Any = None,
    time: datetime | None = None,
) -> AuditEvent:
    """110103 DICOM Instances Accessed by the analysis: ``begun`` (R, type FSY-AUD-ANABEG), ``finished``
    (C when an SR was created, else R; type FSY-AUD-ANAEND). ``reason`` (no PHI) goes to
    EventOutcomeDescription; the job id is a ParticipantObjectDetail ``FaceSymJobID`` of the study."""
    if which not in ("begun", "finished"):
        raise ValueError(f"which must be begun or finished, got {which!r}")
    action = "C" if which == "finished" and sr_uid and outcome == SUCCESS else "R"
    me = local_participant(local_ae, is_requestor=True, roles=(ROLE_APPLICATION,))
    details: tuple[tuple[str, bytes], ...] = (("FaceSymJobID", str(job_id).encode()),)
    if sr_uid:
        details += (("FaceSymSRInstanceUID", sr_uid.encode()),)
    objects = [_study_object(study_uid, sop_classes, details=details)] if study_uid else []
    pid = patient_id_of(patient)
    if pid:
        objects.append(_patient_object(pid))
    return make_event(
        INSTANCES_ACCESSED, action, outcome, [me], objects,
        type_codes=[ANALYSIS_BEGUN if which == "begun" else ANALYSIS_FINISHED],
        description=reason, time=time,
    )


SecurityAlertKind = Literal[
    "association_rejected", "tls_failure", "node_authentication", "restricted_function",
    "audit_started", "audit_stopped",
]
_ALERT_TYPES: dict[str, Code] = {
    "association_rejected": NODE_AUTHENTICATION,
    "tls_failure": NODE_AUTHENTICATION,
    "node_authentication": NODE_AUTHENTICATION,
    "restricted_function": USE_OF_RESTRICTED_FUNCTION,
    "audit_started": AUDIT_RECORDING_STARTED,
    "audit_stopped": AUDIT_RECORDING_STOPPED,
}


def security_alert(
    what: SecurityAlertKind,
    who: str,
    ip: str,
    *,
    local_ae: str = "FACESYM",
    description: str = "",
    outcome: int = MINOR_FAILURE,
    time: datetime | None = None,
) -> AuditEvent:
    """110113 Security Alert (E). ``who`` (an AE title or user) at ``ip`` is the performing participant
    and the alert subject (Node ID 110182); FaceSym is the reporting process."""
    if what not in _ALERT_TYPES:
        raise ValueError(f"unknown security alert {what!r}; one of {sorted(_ALERT_TYPES)}")
    me = local_participant(local_ae, is_requestor=False, roles=(ROLE_APPLICATION,))
    parts = [me]
    objects = []
    if who or ip:
        parts.append(Participant(who or "unknown", True, (), ip))
        node = f"{who}@{ip}" if who and ip else (who or ip)
        objects.append(
            ParticipantObject(
                node, NODE_ID, TYPE_SYSTEM_OBJECT, ROLE_SECURITY_RESOURCE, what.replace("_", " ")
            )
        )
    return make_event(
        SECURITY_ALERT, "E", outcome, parts, objects, type_codes=[_ALERT_TYPES[what]],
        description=description or what.replace("_", " "), time=time,
    )


def config_change(
    changed: Sequence[str],
    *,
    who: str = "",
    ip: str = "",
    kind: Literal["software", "network", "security"] = "software",
    local_ae: str = "FACESYM",
    digests: Mapping[str, str] | None = None,
    description: str = "",
    time: datetime | None = None,
) -> AuditEvent:
    """110113 Security Alert (E, success) of type 110131 Software / 110128 Network / 110129 Security
    Configuration: one participant object per changed setting, named only (values may be secrets);
    ``digests`` (setting → short hash of its value) rides along as ParticipantObjectDetail."""
    codes = {"software": SOFTWARE_CONFIGURATION, "network": NETWORK_CONFIGURATION,
             "security": SECURITY_CONFIGURATION}
    me = local_participant(local_ae, is_requestor=not who, roles=(ROLE_APPLICATION,))
    parts = [me] + ([Participant(who, True, (), ip)] if who else [])
    objects = [
        ParticipantObject(
            name, SETTING, TYPE_SYSTEM_OBJECT, ROLE_SECURITY_RESOURCE,
            details=(("SettingDigest", (digests or {}).get(name, "").encode()),) if digests else (),
        )
        for name in changed
    ]
    return make_event(
        SECURITY_ALERT, "E", SUCCESS, parts, objects, type_codes=[codes[kind]],
        description=description or "configuration changed", time=time,
    )


def query(
    user: str,
    ip: str,
    sop_class_uid: str,
    query_bytes: bytes | str,
    outcome: int = SUCCESS,
    *,
    local_ae: str = "FACESYM",
    transfer_syntax: str = "",
    time: datetime | None = None,
) -> AuditEvent:
    """110112 Query (E): the requestor (110153) asked FaceSym (110152); the object is the SOP class queried
    (110181) with the query itself (ParticipantObjectQuery, base64, as PS3.15 A.5.3.10 requires)."""
    me = local_participant(local_ae, is_requestor=False, roles=(ROLE_DESTINATION,))
    who = Participant(user or "unknown", True, (ROLE_SOURCE,), ip)
    raw = query_bytes.encode() if isinstance(query_bytes, str) else query_bytes
    details = (("TransferSyntax", transfer_syntax.encode()),) if transfer_syntax else ()
    obj = ParticipantObject(sop_class_uid, SOP_CLASS_UID, TYPE_SYSTEM_OBJECT, ROLE_REPORT, details=details,
                            query=raw)
    return make_event(QUERY, "E", outcome, [who, me], [obj], time=time)


def access(
    user: str,
    ip: str,
    study_uid: str,
    *,
    action: str = "R",
    outcome: int = SUCCESS,
    sop_classes: Mapping[str, int] | None = None,
    patient: Any = None,
    local_ae: str = "FACESYM",
    time: datetime | None = None,
) -> AuditEvent:
    """110103 DICOM Instances Accessed by a person (a console view: R; a deletion: D)."""
    who = Participant(user or "unknown", True, (), ip)
    me = local_participant(local_ae, is_requestor=False, roles=(ROLE_APPLICATION,))
    objects = [_study_object(study_uid, sop_classes)]
    pid = patient_id_of(patient)
    if pid:
        objects.append(_patient_object(pid))
    return make_event(INSTANCES_ACCESSED, action, outcome, [who, me], objects, time=time)


def user_authentication(
    which: Literal["login", "logout"],
    user: str,
    ip: str,
    outcome: int = SUCCESS,
    *,
    local_ae: str = "FACESYM",
    description: str = "",
    time: datetime | None = None,
) -> AuditEvent:
    """110114 User Authentication (E), type 110122 Login / 110123 Logout; a failed login has outcome 4."""
    if which not in ("login", "logout"):
        raise ValueError(f"which must be login or logout, got {which!r}")
    who = Participant(user or "unknown", True, (), ip)
    me = local_participant(local_ae, is_requestor=False, roles=(ROLE_APPLICATION,))
    return make_event(
        USER_AUTHENTICATION, "E", outcome, [who, me], type_codes=[LOGIN if which == "login" else LOGOUT],
        description=description, time=time,
    )


def study_deleted(
    study_uid: str,
    sop_classes: Mapping[str, int] | None,
    *,
    user: str,
    ip: str = "",
    outcome: int = SUCCESS,
    patient: Any = None,
    local_ae: str = "FACESYM",
    description: str = "",
    time: datetime | None = None,
) -> AuditEvent:
    """110105 DICOM Study Deleted (D), PS3.15 A.5.3.5: ``user`` (the person or process that removed the
    study, e.g. the OS user running ``facesym purge``) is the requestor; FaceSym the application that held
    it. Objects: the study (110180) with the SOP classes and counts removed, and the patient (ID only).
    ``description`` (no PHI) says why, e.g. the retention rule or ``--force``."""
    who = Participant(user or "unknown", True, (), ip)
    me = local_participant(local_ae, is_requestor=False, roles=(ROLE_APPLICATION,))
    objects = [_study_object(study_uid, sop_classes)]
    pid = patient_id_of(patient)
    if pid:
        objects.append(_patient_object(pid))
    return make_event(STUDY_DELETED, "D", outcome, [who, me], objects, description=description, time=time)
