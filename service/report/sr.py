"""The DICOM SR that carries FaceSym's results back to the PACS, and its reader.

One Comprehensive SR (PS3.3 A.35.3) per study, whose content is a TID 1500 "Measurement Report"
(PS3.16 TID 1500) built with highdicom. Its tree is described in conformance/sr-template.md and its
local codes in conformance/local-codes.md. In short:

- per analysed instance and task, one TID 1501 "Measurement and Qualitative Evaluation Group" that
  references the source instance (and, for a multi-frame source, the peak frames), names the task as
  its Finding, holds every number of DESIGN.md "Scores" as a TID 300 Measurement with UCUM units
  (per-side magnitudes carry the patient's side as the Laterality of their Finding Site), the weaker
  side, the activation verdict and the QC verdict as qualitative evaluations, the head motion removed
  and the residual of its fit (a quality figure, when measured), and TID 4019 Algorithm
  Identification on the group and on every measurement;
- per rest photo with static items, one more group with those items;
- per instance that is not analysable, one group that says so, with each reason as TEXT.

The SR's Series and SOP Instance UIDs derive from the source instances and the engine version
(:func:`report_uids`), so a resend of the same study never makes a second SR in the PACS.
pydicom Datasets stay inside service/report (DESIGN.md, "Layout"): callers hand domain objects in.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import highdicom as hd
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    CodedConcept,
    ComprehensiveSR,
    ContainerContentItem,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
    ValueTypeValues,
)
from highdicom.sr.utils import find_content_items
from pydicom.sr.codedict import codes as dcm_codes

from service import __version__
from service.domain import Analysis, Side, StaticItem, Task, TaskResult
from service.errors import InvalidParameterError
from service.report import codes
from service.report.comparison import PriorStudy, comparison_text
from service.report.sr_regions import KeyImageRegions, peak_coordinates, planar_groups, region_images
from service.report.summary import grade_statement, impression

log = logging.getLogger(__name__)

SERIES_DESCRIPTION = "FaceSym facial symmetry report"
ALGORITHM_NAME = "FaceSym"
MODEL_NAME = "FaceSym"

_TEXT_LIMIT = 1024  # our TEXT values stay short; UT allows far more (PS3.5 6.2)


@dataclass(frozen=True)
class InstanceFinding:
    """What the engine said about one received instance.

    Attributes
    ----------
    sop_class_uid, sop_instance_uid
        The source instance (it must be among the ``evidence`` of :func:`build_report`).
    number_of_frames
        The source's Number of Frames (PS3.3 C.7.6.6); None for single-frame photographs.
    analysis
        The engine's result for that instance: quality verdict, task results, static items.
    """

    sop_class_uid: str
    sop_instance_uid: str
    number_of_frames: int | None
    analysis: Analysis


# ------------------------------------------------------------------------------------------ UIDs
def _hash_uid(*parts: str) -> str:
    """'2.25.' + the decimal of the first 128 bits of SHA-256 over ``parts`` (PS3.5 B.2 form)."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


#: The header attributes an SR, key image or PDF copies from its sources: a correction of any of them
#: (a re-sent study with a fixed PatientName) must give the objects new SOP Instance UIDs.
COPIED_HEADER = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
    "StudyDescription", "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName",
)


def content_digest(headers: Sequence[pydicom.Dataset], *parts: object) -> str:
    """SHA-256 (hex) of the :data:`COPIED_HEADER` values of the source ``headers`` (in SOP Instance UID
    order, so the order they come in does not matter) and the ``repr`` of ``parts`` (the engine's frozen
    results): equal for the same content, different when anything the object says changes. An input of
    the SOP Instance UIDs (:func:`report_uids`)."""
    h = hashlib.sha256()
    for header in sorted(headers, key=lambda ds: str(ds.get("SOPInstanceUID", ""))):
        for keyword in COPIED_HEADER:
            try:
                value = header.get(keyword)
            except Exception:  # noqa: BLE001 - a malformed value still identifies the content by its bytes
                raw = header.get_item(keyword)
                value = None if raw is None else bytes(getattr(raw, "value", b"") or b"")
            h.update(f"{keyword}={'' if value is None else value}\x1f".encode("utf-8", "replace"))
    for part in parts:
        h.update(repr(part).encode("utf-8", "replace") + b"\x1e")
    return h.hexdigest()


def report_uids(
    source_sop_instance_uids: Iterable[str], engine_version: str, content: str = ""
) -> tuple[str, str]:
    """Deterministic Series Instance UID and SOP Instance UID of the SR of a study.

    Parameters
    ----------
    source_sop_instance_uids
        SOP Instance UIDs of the source instances the SR reports on (order and repeats do not matter).
    engine_version
        ``service.engine.ENGINE_VERSION``: a new analysis method yields a new SR.
    content
        :func:`content_digest` of what the SR says: an input of the SOP Instance UID only, so a
        corrected re-send gets a new SR in the same series.

    Returns
    -------
    tuple[str, str]
        (series_instance_uid, sop_instance_uid), each '2.25.' followed by the decimal value of a
        128-bit hash (SHA-256, truncated) of the sorted unique source UIDs, the engine version and a
        role tag ('series' or 'sop'; the SOP UID also of ``content``), as PS3.5 B.2 allows for
        UUID-derived UIDs. A resend of the same study with the same content analysed by the same engine
        version gets the same UIDs, so the PACS keeps one SR; changed content gets a new SOP UID.
    """
    uids = sorted({str(u).strip() for u in source_sop_instance_uids})
    if not uids or not all(uids):
        raise InvalidParameterError("source_sop_instance_uids must name at least one non-empty UID")
    if not engine_version:
        raise InvalidParameterError("engine_version must not be empty")
    joined = "\n".join(uids)
    return (
        _hash_uid("facesym-sr", joined, engine_version, "series"),
        _hash_uid("facesym-sr", joined, engine_version, "sop", *([content] if content else [])),
    )


def _tracking(sop_instance_uid: str, role: str, label: str) -> TrackingIdentifier:
    # TID 4108: the same finding of the same instance keeps its tracking UID across engine versions.
    return TrackingIdentifier(uid=_hash_uid("facesym-tracking", sop_instance_uid, role), identifier=label)


# ---------------------------------------------------------------------------------------- build
#: Significant digits of every number in the SR: what the measurement can support (a smile of 0.242 D is
#: 0.24 ± 0.01 D on a good clip) and what a reader can take in; the JSON and FHIR keep full precision.
SIGNIFICANT_DIGITS = 3


def sr_number(value: float) -> float:
    """``value`` as the SR carries it: rounded to :data:`SIGNIFICANT_DIGITS` significant digits."""
    return float(f"{float(value):.{SIGNIFICANT_DIGITS}g}")


def _number(where: str, value: float) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise InvalidParameterError(f"{where} must be a finite number, got {value!r}")
    return sr_number(number)


def _text(name: CodedConcept, value: str) -> TextContentItem:
    # TID 1501 row 12: coded questions with coded OR text answers (PS3.16 TID 1501).
    return TextContentItem(
        name=name, value=str(value)[:_TEXT_LIMIT] or "-", relationship_type=RelationshipTypeValues.CONTAINS
    )


def _side_measurements(
    name: CodedConcept,
    left: float,
    right: float,
    unit: CodedConcept,
    algorithm: AlgorithmIdentification,
    where: str,
    region: KeyImageRegions | None = None,
) -> list[Measurement]:
    """Left and right values of one quantity; the side is the Laterality of a Face finding site (TID 300),
    repeated as a Laterality modifier of the value itself so that a generic viewer (DCMTK's dsr2html)
    labels the value "Left"/"Right" instead of hiding the side in a footnote of a footnote. With the
    task's key-image ``region``, each value is INFERRED FROM its side's landmark group at peak there."""
    out = []
    for side, value in ((Side.LEFT, left), (Side.RIGHT, right)):
        coordinates = None if region is None else [peak_coordinates(region, side, where)]
        m = Measurement(
            name=name,
            value=_number(f"{where}.{side.value}", value),
            unit=unit,
            finding_sites=[FindingSite(codes.FACE, laterality=codes.LATERALITY[side])],
            algorithm_id=algorithm,
            referenced_coordinates=coordinates,
        )
        m[0].ContentSequence.append(CodeContentItem(
            name=codes.LATERALITY_CONCEPT, value=codes.LATERALITY[side],
            relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD,
        ))
        out.append(m)
    return out


def _source(
    finding: InstanceFinding, peak: tuple[int, int] | None, where: str
) -> SourceImageForMeasurementGroup:
    frames: list[int] | None = None
    if peak is not None and finding.number_of_frames is not None:
        first, last = int(peak[0]), int(peak[1])
        if first < 0 or last < first:
            raise InvalidParameterError(f"{where}.peak_frames must be 0 <= first <= last, got {peak!r}")
        # Referenced Frame Number is 1-based (PS3.3 C.17.3.2.4 / 10.3): decoded frame i is frame i + 1.
        frames = [n for n in range(first + 1, last + 2) if n <= finding.number_of_frames]
        if len(frames) != last - first + 1:
            log.warning(
                "peak frames %d-%d of SOP instance %s exceed its %d frames; referencing those that exist",
                first + 1,
                last + 1,
                finding.sop_instance_uid,
                finding.number_of_frames,
            )
        frames = frames or None
    return SourceImageForMeasurementGroup(
        referenced_sop_class_uid=finding.sop_class_uid,
        referenced_sop_instance_uid=finding.sop_instance_uid,
        referenced_frame_numbers=frames,
    )


def _with_texts(
    group: MeasurementsAndQualitativeEvaluations, texts: Sequence[tuple[CodedConcept, str]]
) -> MeasurementsAndQualitativeEvaluations:
    if texts:
        group[0].ContentSequence.extend(_text(name, value) for name, value in texts)
    return group


def _task_group(
    finding: InstanceFinding, task: TaskResult, algorithm: AlgorithmIdentification, where: str,
    key_region: KeyImageRegions | None = None,
) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 group for one task of one instance (PS3.16 TID 1501, TID 300, TID 4019); with the task's
    key-image ``key_region``, its per-side magnitudes are INFERRED FROM their landmark groups there."""
    if task.method not in codes.METHOD:
        raise InvalidParameterError(
            f"{where}.method must be one of {sorted(codes.METHOD)} (add a code), got {task.method!r}"
        )
    measurements = _side_measurements(
        codes.MAGNITUDE, task.left, task.right, codes.magnitude_unit(task.task), algorithm, where, key_region
    )
    for name, value, unit, key in (
        (codes.ASYMMETRY_INDEX, task.asymmetry_index, codes.UNIT_ONE, "asymmetry_index"),
        (codes.ACTIVATION_GATE, task.activation_gate, codes.UNIT_ONE, "activation_gate"),
        (codes.ASYMMETRY_SCORE, task.asymmetry_score, codes.UNIT_SCORE, "asymmetry_score"),
        (codes.COSINE_INDEX, task.cosine_index, codes.UNIT_ONE, "cosine_index"),
        (codes.COSINE_SCORE, task.cosine_score, codes.UNIT_SCORE, "cosine_score"),
    ):
        measurements.append(
            Measurement(name=name, value=_number(f"{where}.{key}", value), unit=unit, algorithm_id=algorithm)
        )
    for k, region in enumerate(task.flow):
        if region.region not in codes.FLOW_SS:
            raise InvalidParameterError(
                f"{where}.flow[{k}].region must be one of {sorted(codes.FLOW_SS)}, got {region.region!r}"
            )
        measurements += _side_measurements(
            codes.FLOW_VS[region.region], region.left, region.right, codes.UNIT_FLOW, algorithm,
            f"{where}.flow[{k}]",
        )
        measurements.append(Measurement(
            name=codes.FLOW_SS[region.region], unit=codes.UNIT_ONE, algorithm_id=algorithm,
            value=_number(f"{where}.flow[{k}].symmetry_score", region.symmetry_score),
        ))
    head = task.head_motion
    if head is not None:  # quality figure: the residual of the rigid fit and the motion it removed
        measurements += [
            Measurement(name=name, value=_number(f"{where}.head_motion.{attr}", getattr(head, attr)),
                        unit=unit, algorithm_id=algorithm)
            for name, attr, unit in codes.HEAD_MOTION_MEASUREMENTS
        ]
    weaker = codes.LATERALITY[task.weaker_side] if task.weaker_side else codes.NO_WEAKER_SIDE
    evaluations = [
        QualitativeEvaluation(codes.WEAKER_SIDE, weaker),
        QualitativeEvaluation(
            codes.INSUFFICIENT_ACTIVATION, codes.YES if task.insufficient_activation else codes.NO
        ),
        QualitativeEvaluation(codes.ANALYSIS_QUALITY, codes.ANALYSABLE),
    ]
    if head is not None:
        evaluations.append(
            QualitativeEvaluation(codes.HEAD_MOTION_CORRECTED, codes.YES if head.corrected else codes.NO)
        )
    if task.grade is not None:
        if task.grade.label not in codes.GRADE_CLASS:
            raise InvalidParameterError(f"{where}.grade.label must be one of {list(codes.GRADE_CLASS)}")
        evaluations.append(QualitativeEvaluation(codes.GRADE, codes.GRADE_CLASS[task.grade.label]))
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(
            finding.sop_instance_uid, task.task.value, f"FaceSym {task.task.value}"
        ),
        finding_type=codes.FINDING[task.task],
        method=codes.METHOD[task.method],
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[_source(finding, task.peak_frames, where)],
    )
    texts = [(codes.ANALYSIS_WARNING, w) for w in finding.analysis.quality.warnings]
    texts += [(codes.ANALYSIS_NOTE, n) for n in task.notes]
    if task.grade is not None:
        texts.append((codes.GRADE_MODEL, grade_statement(task.grade)))
    return _with_texts(group, texts)


def _static_group(
    finding: InstanceFinding, items: Sequence[StaticItem], algorithm: AlgorithmIdentification, where: str
) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 group with the static (rest photo) items, each per side in D."""
    measurements: list[Measurement] = []
    for k, item in enumerate(items):
        if item.name not in codes.STATIC_ITEM:
            raise InvalidParameterError(
                f"{where}.static[{k}].name must be one of {sorted(codes.STATIC_ITEM)}, got {item.name!r}"
            )
        measurements += _side_measurements(
            codes.STATIC_ITEM[item.name],
            item.left,
            item.right,
            codes.UNIT_D,
            algorithm,
            f"{where}.static[{k}]",
        )
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(finding.sop_instance_uid, "static", "FaceSym static"),
        finding_type=codes.FINDING_STATIC,
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[QualitativeEvaluation(codes.ANALYSIS_QUALITY, codes.ANALYSABLE)],
        source_images=[_source(finding, None, where)],
    )
    return _with_texts(group, [(codes.ANALYSIS_WARNING, w) for w in finding.analysis.quality.warnings])


def _quality_group(
    finding: InstanceFinding, algorithm: AlgorithmIdentification
) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 group for an instance without task or static results: the QC verdict and why."""
    quality = finding.analysis.quality
    verdict = codes.ANALYSABLE if quality.ok else codes.NOT_ANALYSABLE
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(finding.sop_instance_uid, "quality", "FaceSym quality"),
        algorithm_id=algorithm,
        qualitative_evaluations=[QualitativeEvaluation(codes.ANALYSIS_QUALITY, verdict)],
        source_images=[_source(finding, None, "")],
    )
    reasons = list(quality.reasons)
    if not quality.ok and not reasons:
        reasons = ["not analysable (no reason given)"]
    texts = [(codes.REASON_NOT_ANALYSABLE, r) for r in reasons]
    texts += [(codes.ANALYSIS_WARNING, w) for w in quality.warnings]
    return _with_texts(group, texts)


def _groups(
    finding: InstanceFinding, algorithm: AlgorithmIdentification, where: str,
    regions: dict[tuple[str, Task], KeyImageRegions],
) -> list[MeasurementsAndQualitativeEvaluations]:
    analysis = finding.analysis
    if not analysis.quality.ok:
        if analysis.tasks or analysis.static:
            raise InvalidParameterError(f"{where}: a not-analysable analysis must carry no results")
        return [_quality_group(finding, algorithm)]
    groups = [
        _task_group(finding, task, algorithm, f"{where}.tasks[{k}]",
                    regions.get((finding.sop_instance_uid, task.task)))
        for k, task in enumerate(analysis.tasks)
    ]
    if analysis.static:
        groups.append(_static_group(finding, analysis.static, algorithm, where))
    return groups or [_quality_group(finding, algorithm)]


def _check_inputs(evidence: Sequence[pydicom.Dataset], findings: Sequence[InstanceFinding]) -> None:
    if not evidence:
        raise InvalidParameterError("evidence must hold the header of at least one source instance")
    if not findings:
        raise InvalidParameterError("findings must hold at least one InstanceFinding")
    studies = {str(ds.get("StudyInstanceUID", "")) for ds in evidence}
    if len(studies) != 1 or "" in studies:
        raise InvalidParameterError(
            f"evidence must come from one study, got {len(studies)} Study Instance UIDs"
        )
    classes = {str(ds.SOPInstanceUID): str(ds.SOPClassUID) for ds in evidence}
    seen: set[str] = set()
    for k, f in enumerate(findings):
        if f.sop_instance_uid not in classes:
            raise InvalidParameterError(
                f"findings[{k}] names SOP instance {f.sop_instance_uid}, not in evidence"
            )
        if classes[f.sop_instance_uid] != f.sop_class_uid:
            raise InvalidParameterError(
                f"findings[{k}].sop_class_uid differs from its evidence's SOP Class UID"
            )
        if f.sop_instance_uid in seen:
            raise InvalidParameterError(f"findings[{k}] repeats SOP instance {f.sop_instance_uid}")
        if f.number_of_frames is not None and f.number_of_frames < 1:
            raise InvalidParameterError(f"findings[{k}].number_of_frames must be >= 1 or None")
        seen.add(f.sop_instance_uid)


_PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def _complete_type2(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A shallow copy of the first evidence header with every Type 2 Patient/Study attribute present.

    highdicom copies these from ``evidence[0]`` and needs them to exist; an image from a PACS may
    omit one (PS3.3 C.7.1.1, C.7.2.1: Type 2 means present, possibly empty). A value that is malformed
    for its VR (a date that is no date, a wrong VR, an absurd length) is emptied as well: one bad attribute
    of a source must not stop the study's report (the source file keeps the original).
    """
    ds = sane_header(ds)
    bad = [k for k in _PATIENT_STUDY_TYPE2 if k in ds and not _valid_value(ds, k)]
    missing = [k for k in _PATIENT_STUDY_TYPE2 if k not in ds]
    if not missing and not bad:
        return ds
    if bad:  # names only: the values may be patient data
        log.warning("SR: malformed %s in source %s emptied", ", ".join(bad), ds.get("SOPInstanceUID", "?"))
    out = pydicom.Dataset()
    out.update(ds)
    for keyword in bad:
        del out[keyword]
    for keyword in missing + bad:
        setattr(out, keyword, None)
    return out


_TEXT_VRS = frozenset(
    ("AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT")
)


def sane_header(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` fit to build FaceSym's objects from (highdicom reads UIDs and names from it): a top-level
    standard element whose VR is not its dictionary VR (a UID sent as PN, a name as SS) is re-read as its
    dictionary VR when its bytes are valid text for it, else left out; values are never loaded from disk
    (a huge deferred element stays deferred). ``ds`` itself is returned when nothing needed fixing."""
    from pydicom import config
    from pydicom.datadict import dictionary_VR
    from pydicom.dataelem import DataElement
    from pydicom.valuerep import validate_value

    fixes: dict[int, DataElement | None] = {}
    for tag in list(ds.keys()):
        if tag.is_private or tag.group == 0x0002:
            continue
        raw = ds.get_item(tag, keep_deferred=True)
        try:
            want = dictionary_VR(tag)
        except KeyError:
            continue
        if raw is None or raw.VR in (None, want) or " or " in want:
            continue
        fixes[int(tag)] = None
        if want not in _TEXT_VRS or int(getattr(raw, "length", 0) or 0) > 1024:
            continue
        value = getattr(raw, "value", None)
        try:
            text = value.decode("ascii").strip(" \x00") if isinstance(value, bytes) else str(value)
            validate_value(want, text, config.RAISE)
            fixes[int(tag)] = DataElement(tag, want, text)
        except Exception:  # not text, or not valid for its VR: left out
            continue
    if not fixes:
        return ds
    log.warning("source %s: %d element(s) with a wrong VR re-read or left out", ds.get("SOPInstanceUID", "?"),
                len(fixes))
    out = pydicom.Dataset()
    out.update(ds)
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    for key, elem in fixes.items():
        del out[key]
        if elem is not None:
            out[key] = elem
    return out


def _valid_value(ds: pydicom.Dataset, keyword: str) -> bool:
    """The element has its dictionary VR, a sane length, and a value that VR accepts (PS3.5 6.2)."""
    from pydicom import config
    from pydicom.datadict import dictionary_VM, dictionary_VR
    from pydicom.valuerep import DA, DT, TM, validate_value

    try:
        raw = ds.get_item(keyword, keep_deferred=True)
        if raw is None or int(getattr(raw, "length", 0) or 0) > 1024:
            return raw is None
        elem = ds[keyword]
        if dictionary_VR(elem.tag) != elem.VR or (dictionary_VM(elem.tag) == "1" and elem.VM > 1):
            return False
        values = elem.value if elem.VM > 1 else [elem.value]
        for value in values:
            if value is None or value == "":
                continue
            validate_value(elem.VR, value, config.RAISE)
            if elem.VR in ("DA", "TM", "DT"):
                {"DA": DA, "TM": TM, "DT": DT}[elem.VR](value)
        return True
    except Exception:  # any failure to read or convert it: malformed
        return False


def build_report(
    evidence: Sequence[pydicom.Dataset],
    findings: Sequence[InstanceFinding],
    *,
    engine_version: str,
    series_number: int = 9001,
    instance_number: int = 1,
    manufacturer: str = "FaceSym",
    institution_name: str | None = None,
    key_images: Sequence[KeyImageRegions] = (),
    comparison: Sequence[PriorStudy] = (),
    replaces: pydicom.Dataset | None = None,
) -> pydicom.Dataset:
    """Build the Comprehensive SR (PS3.3 A.35.3) with a TID 1500 Measurement Report of one study.

    Parameters
    ----------
    evidence
        Headers of the source instances (read with ``stop_before_pixels=True``), all of one study; the
        SR copies Patient and General Study attributes from the first one (PS3.3 C.7.1.1, C.7.2.1) and
        lists all of them in the Current Requested Procedure Evidence Sequence (PS3.3 C.17.2.3).
    findings
        One :class:`InstanceFinding` per analysed instance, each naming an instance of ``evidence``.
    engine_version
        ``service.engine.ENGINE_VERSION``: TID 4019 Algorithm Version, the IHE AIR Contributing
        Equipment's Software Versions, and an input of :func:`report_uids`.
    series_number, instance_number
        Series Number and Instance Number of the SR (PS3.3 C.7.3.1, C.7.6.1).
    manufacturer, institution_name
        General Equipment Manufacturer and Institution Name of the SR (PS3.3 C.7.5.1).
    key_images
        Where each task's landmark groups lie on its key image (Secondary Capture of the same study):
        per task and side, TID 1410 planar ROI groups with POLYLINE SCOORDs selected from that image
        (:mod:`service.report.sr_regions`), so a viewer draws them; the images join the evidence and the
        image library. A task without one has its TID 1501 group only.
    comparison
        The patient's earlier analysed studies: the Impression ends with the change of each task's
        Asymmetry Score since each of them (:func:`service.report.comparison.comparison_text`).
    replaces
        The header of the SR this one supersedes (the study's earlier report, e.g. before a corrected
        re-send): listed in the Predecessor Documents Sequence (PS3.3 C.17.2) when its SOP Instance UID
        differs, so a PACS and a reader see which report is current.

    Returns
    -------
    pydicom.Dataset
        A highdicom ``ComprehensiveSR`` (Explicit VR Little Endian, File Meta set) ready for
        ``save_as(path, enforce_file_format=True)``. Measurement groups follow PS3.16 TID 1501 and
        carry TID 300 measurements and TID 4019 algorithm identification; local codes are declared in
        the Coding Scheme Identification Sequence (PS3.3 C.12.1); the Contributing Equipment Sequence
        (PS3.3 C.12.1.1.5) names FaceSym as Processing Equipment (DCM 109102), as IHE AI Results asks.

    Raises
    ------
    InvalidParameterError
        Empty ``evidence`` or ``findings``, evidence from several studies, a finding whose instance is
        not in ``evidence``, or a value that cannot be encoded (non-finite number, unknown method).
    """
    _check_inputs(evidence, findings)
    algorithm = AlgorithmIdentification(name=ALGORITHM_NAME, version=engine_version)
    groups: list[MeasurementsAndQualitativeEvaluations] = []
    regions = {(r.source_sop_instance_uid, r.task): r for r in key_images}
    for k, finding in enumerate(findings):
        groups += _groups(finding, algorithm, f"findings[{k}]", regions)
    planar, drawn_on = [], []
    for k, finding in enumerate(findings):
        for j, task in enumerate(finding.analysis.tasks if finding.analysis.quality.ok else ()):
            r = regions.get((finding.sop_instance_uid, task.task))
            if r is not None:
                planar += planar_groups(r, task, algorithm, _tracking, _number, f"findings[{k}].tasks[{j}]")
                drawn_on.append(r)
    images = region_images(drawn_on)

    device = DeviceObserverIdentifyingAttributes(
        uid=_hash_uid("facesym-device-observer", MODEL_NAME),
        name=ALGORITHM_NAME,
        manufacturer_name=manufacturer,
        model_name=MODEL_NAME,
    )
    report = MeasurementReport(
        observation_context=ObservationContext(
            observer_device_context=ObserverContext(
                observer_type=dcm_codes.DCM.Device, observer_identifying_attributes=device
            )
        ),
        procedure_reported=codes.PROCEDURE,
        imaging_measurements=[*groups, *planar],
        referenced_images=images or None,
    )
    since = comparison_text((f.analysis for f in findings), comparison)
    _add_impression(report, impression(findings) + since)
    drawn = [(r.source_sop_instance_uid, r.task, str(r.image.SOPInstanceUID)) for r in drawn_on]
    content = content_digest(evidence, [f.analysis for f in findings], since, drawn)
    series_uid, sop_uid = report_uids((str(ds.SOPInstanceUID) for ds in evidence), engine_version, content)
    superseded = replaces is not None and str(replaces.SOPInstanceUID) != sop_uid
    predecessors = [replaces] if superseded and replaces is not None else None
    # IHE RAD TF AI Results: the SR names the AI model as Contributing Equipment (PS3.3 C.12.1.1.5).
    facesym_equipment = hd.ContributingEquipment(
        manufacturer="FaceSym",
        purpose_of_reference=dcm_codes.DCM.ProcessingEquipment,
        manufacturer_model_name=MODEL_NAME,
        software_versions=engine_version,
        contribution_description="Facial palsy motion analysis",
    )
    scheme = CodingSchemeIdentificationItem(
        designator=codes.SCHEME,
        name=codes.SCHEME_NAME,
        responsible_organization=codes.SCHEME_ORGANIZATION,
    )
    evidence = [_complete_type2(evidence[0]), *(sane_header(ds) for ds in evidence[1:]), *images]
    sr = ComprehensiveSR(
        evidence=evidence,
        content=report,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        institution_name=institution_name,
        is_complete=True,
        previous_versions=predecessors,
        performed_procedure_codes=[codes.PROCEDURE],
        contributing_equipment=[facesym_equipment],
        coding_schemes=[scheme],
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=MODEL_NAME,
        # UTF-8 whatever the source used: engine reasons hold "±", "°", "–" (PS3.3 C.12.1.1.2).
        specific_character_set="ISO_IR 192",
        software_versions=__version__,
    )
    _separate_containers(sr)
    log.info(
        "built SR %s (series %s): %d measurement group(s) for %d instance(s), engine %s",
        sop_uid,
        series_uid,
        len(groups),
        len(findings),
        engine_version,
    )
    return sr


def _add_impression(report: MeasurementReport, text: str) -> None:
    """The study's one-sentence finding (:func:`service.report.summary.impression`) as TID 1500's
    "Qualitative Evaluations" container (row 12, UMLS C0034375) holding a TEXT "Impression" (DCM 121073),
    so that any SR viewer shows it first-hand. highdicom's MeasurementReport has no argument for it; the
    items are highdicom's own."""
    container = ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS,
        is_content_continuous=False,
    )
    container.ContentSequence = pydicom.Sequence([TextContentItem(
        name=codes.IMPRESSION, value=text[:_TEXT_LIMIT], relationship_type=RelationshipTypeValues.CONTAINS
    )])
    report[0].ContentSequence.append(container)


def _separate_containers(ds: pydicom.Dataset) -> None:
    """Mark every CONTAINER (the root included) SEPARATE (PS3.3 C.18.8: Continuity of Content).

    highdicom makes them CONTINUOUS, which says the children read as one running text: DCMTK's
    ``dsr2html`` then prints the values without their concept names ("0.0778 {D} ¹ 0.222 …"). These
    items are separate measurements, so SEPARATE is also the right statement; TID 1500 allows either."""
    if getattr(ds, "ValueType", "CONTAINER") == "CONTAINER" and "ContinuityOfContent" in ds:
        ds.ContinuityOfContent = "SEPARATE"
    for item in getattr(ds, "ContentSequence", []):
        _separate_containers(item)


# ----------------------------------------------------------------------------------------- read
def _lookup(table: dict[Any, CodedConcept], concept: CodedConcept | None) -> Any:
    for key, code in table.items():
        if concept is not None and concept == code:
            return key
    return None


def _texts(group: MeasurementsAndQualitativeEvaluations, name: CodedConcept) -> list[str]:
    items = find_content_items(group[0], name=name, value_type=ValueTypeValues.TEXT)
    return [str(item.TextValue) for item in items]


def _per_side(group: MeasurementsAndQualitativeEvaluations, name: CodedConcept) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in group.get_measurements(name=name):
        sites: list[FindingSite] = m.finding_sites
        side = _lookup(codes.LATERALITY, sites[0].laterality if sites else None)
        if side is not None:
            out[side.value] = float(m.value)
    return out


def _one(group: MeasurementsAndQualitativeEvaluations, name: CodedConcept) -> float | None:
    found = group.get_measurements(name=name)
    return float(found[0].value) if found else None


def _evaluation(group: MeasurementsAndQualitativeEvaluations, name: CodedConcept) -> CodedConcept | None:
    found = group.get_qualitative_evaluations(name=name)
    # highdicom annotates QualitativeEvaluation.value as a number; it is the CODE item's CodedConcept.
    return cast(CodedConcept, found[0].value) if found else None


def _read_head_motion(group: MeasurementsAndQualitativeEvaluations) -> dict[str, Any] | None:
    """The group's head motion as ``HeadMotion.to_json`` keys (unrounded), or None when it has none."""
    values = {attr: _one(group, name) for name, attr, _ in codes.HEAD_MOTION_MEASUREMENTS}
    corrected = _evaluation(group, codes.HEAD_MOTION_CORRECTED)
    if corrected is None and all(v is None for v in values.values()):
        return None
    return {**values, "corrected": corrected != codes.NO}


def _read_task(group: MeasurementsAndQualitativeEvaluations, task: Task, frames: list[int]) -> dict[str, Any]:
    sides = _per_side(group, codes.MAGNITUDE)
    weaker = _evaluation(group, codes.WEAKER_SIDE)
    side = _lookup(codes.LATERALITY, weaker)
    return {
        "task": task.value,
        "left": sides.get("left"),
        "right": sides.get("right"),
        "asymmetry_index": _one(group, codes.ASYMMETRY_INDEX),
        "activation_gate": _one(group, codes.ACTIVATION_GATE),
        "asymmetry_score": _one(group, codes.ASYMMETRY_SCORE),
        "cosine_index": _one(group, codes.COSINE_INDEX),
        "cosine_score": _one(group, codes.COSINE_SCORE),
        "weaker_side": side.value if side is not None else None,
        "insufficient_activation": _evaluation(group, codes.INSUFFICIENT_ACTIVATION) == codes.YES,
        "peak_frames": [min(frames) - 1, max(frames) - 1] if frames else None,
        "method": _lookup(codes.METHOD, group.method),
        "notes": _texts(group, codes.ANALYSIS_NOTE),
        "grade": _lookup(codes.GRADE_CLASS, _evaluation(group, codes.GRADE)),
        "grade_model": next(iter(_texts(group, codes.GRADE_MODEL)), None),
        "flow": {
            region: {**_per_side(group, codes.FLOW_VS[region]), "symmetry_score": ss}
            for region in codes.FLOW_SS
            if (ss := _one(group, codes.FLOW_SS[region])) is not None
        },
        "head_motion": _read_head_motion(group),
    }


def read_impression(ds: pydicom.Dataset) -> str | None:
    """The impression sentence that :func:`build_report` writes (TID 1500 "Qualitative Evaluations",
    UMLS C0034375, TEXT "Impression", DCM 121073; PS3.16 TID 1500 row 12), or None where there is none."""

    def named(item: Any, code: Any) -> bool:
        names = getattr(item, "ConceptNameCodeSequence", None) or []
        return len(names) > 0 and (names[0].CodeValue, names[0].CodingSchemeDesignator) == (
            code.value, code.scheme_designator)

    for item in getattr(ds, "ContentSequence", []):
        if getattr(item, "ValueType", "") == "CONTAINER" and named(item, codes.QUALITATIVE_EVALUATIONS):
            for child in getattr(item, "ContentSequence", []):
                if getattr(child, "ValueType", "") == "TEXT" and named(child, codes.IMPRESSION):
                    return str(child.TextValue)
    return None


def read_report(ds: pydicom.Dataset) -> list[dict[str, Any]]:
    """Read back what :func:`build_report` wrote (the reader for round-trip tests and ``facesym demo``).

    Parameters
    ----------
    ds
        A FaceSym Comprehensive SR (PS3.3 A.35.3) with a TID 1500 Measurement Report (PS3.16).

    Returns
    -------
    list[dict]
        One dict per source instance, in the order of its first measurement group (TID 1501)::

            {"sop_instance_uid": str, "quality_ok": bool, "reasons": [str], "warnings": [str],
             "tasks": [{"task", "left", "right", "asymmetry_index", "activation_gate",
                        "asymmetry_score", "cosine_index", "cosine_score",
                        "weaker_side": "left" | "right" | None, "insufficient_activation": bool,
                        "peak_frames": [first, last] (0-based, inclusive) | None,
                        "method": str | None, "notes": [str],
                        "head_motion": {"roll_deg", "yaw_deg", "pitch_deg", "scale_pct", "shift_d",
                                        "residual_d": float, "corrected": bool} | None}],
             "static": [{"name", "left", "right"}]}

        Numbers come from the Floating Point Value when present (exact), else the Numeric Value.
    """
    sr = ComprehensiveSR.from_dataset(ds)
    content = sr.content
    if not isinstance(content, MeasurementReport):
        raise InvalidParameterError("ds is not a TID 1500 Measurement Report")
    instances: dict[str, dict[str, Any]] = {}
    for group in content.get_image_measurement_groups():
        sources = group.source_images
        if not sources:
            continue
        ref = sources[0].ReferencedSOPSequence[0]
        uid = str(ref.ReferencedSOPInstanceUID)
        raw_frames = ref.get("ReferencedFrameNumber")
        if raw_frames is None:
            frames: list[int] = []
        elif isinstance(raw_frames, Sequence) and not isinstance(raw_frames, str):
            frames = [int(n) for n in raw_frames]
        else:
            frames = [int(raw_frames)]
        entry = instances.setdefault(
            uid,
            {
                "sop_instance_uid": uid,
                "quality_ok": True,
                "reasons": [],
                "warnings": [],
                "tasks": [],
                "static": [],
            },
        )
        if _evaluation(group, codes.ANALYSIS_QUALITY) == codes.NOT_ANALYSABLE:
            entry["quality_ok"] = False
        for reason in _texts(group, codes.REASON_NOT_ANALYSABLE):
            if reason not in entry["reasons"]:
                entry["reasons"].append(reason)
        for warning in _texts(group, codes.ANALYSIS_WARNING):
            if warning not in entry["warnings"]:
                entry["warnings"].append(warning)
        finding = group.finding_type
        task = _lookup(codes.FINDING, finding)
        if task is not None:
            entry["tasks"].append(_read_task(group, task, frames))
        elif finding is not None and finding == codes.FINDING_STATIC:
            for name, code in codes.STATIC_ITEM.items():
                sides = _per_side(group, code)
                if sides:
                    entry["static"].append(
                        {"name": name, "left": sides.get("left"), "right": sides.get("right")}
                    )
    return list(instances.values())
