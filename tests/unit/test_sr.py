"""report/sr.py: build the TID 1500 SR from domain objects → write → read back → compare."""

from __future__ import annotations

import copy
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import report_fixtures as shared
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from service.domain import Analysis, GradeResult, Quality, RegionSymmetry, StaticItem, TaskResult
from service.errors import InvalidParameterError
from service.media.dicom_io import build_video_photographic, build_vl_photograph
from service.report import codes
from service.report.sr import (
    InstanceFinding,
    build_report,
    read_impression,
    read_report,
    report_uids,
    sr_number,
)

PATIENT = "DOE^JANE"
N_FRAMES, ENGINE = shared.N_FRAMES, shared.ENGINE

SMILE = replace(
    shared.SMILE,
    grade=GradeResult("IV", {"I": 0.05, "II": 0.05, "III": 0.1, "IV": 0.6, "V": 0.1, "VI": 0.1}, "0.1.0",
                      "synthetic", [1 / 96] * 96),
    flow=(
        RegionSymmetry("forehead", 0.0368, 0.0241, 0.9518),
        RegionSymmetry("eye", 0.0409, 0.0534, 0.9526),
        RegionSymmetry("cheek", 0.2549, 0.0649, 0.278),
    ),
)
BROW = shared.BROW
#: A photo pair (rest frame 0, expression frame 1).
EYES = replace(shared.EYES, frames=(0, 1), rest_frames=(0, 0), peak_frames=(1, 1))


def _header(ds: Dataset) -> Dataset:
    """What the worker hands the report: the stored file's header, read without pixels."""
    out = copy.deepcopy(ds)
    del out.PixelData
    return out


@pytest.fixture(scope="module")
def study() -> dict[str, Dataset]:
    study_uid = generate_uid()
    video = build_video_photographic(
        b"\x00" * 64,
        width=64,
        height=48,
        n_frames=N_FRAMES,
        fps=30.0,
        study_uid=study_uid,
        patient_name=PATIENT,
    )
    photo = build_vl_photograph(np.zeros((8, 8, 3), np.uint8), study_uid=study_uid, patient_name=PATIENT)
    return {"video": _header(video), "photo": _header(photo)}


def _findings(study: dict[str, Dataset]) -> list[InstanceFinding]:
    video, photo = study["video"], study["photo"]
    ok = Quality(True, (), ("face lost in 3 frames",), 87, N_FRAMES)
    bad = Quality(False, ("no face",), (), 0, 1)
    return [
        InstanceFinding(video.SOPClassUID, video.SOPInstanceUID, N_FRAMES, Analysis(ok, (SMILE, BROW))),
        InstanceFinding(photo.SOPClassUID, photo.SOPInstanceUID, None, Analysis(bad, ())),
    ]


@pytest.fixture(scope="module")
def written(study: dict[str, Dataset], tmp_path_factory: pytest.TempPathFactory) -> Path:
    sr = build_report(list(study.values()), _findings(study), engine_version=ENGINE)
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path


def _assert_task(got: dict, want: TaskResult, peak: list[int] | None) -> None:
    assert got["task"] == want.task.value
    for key in (
        "left",
        "right",
        "asymmetry_index",
        "activation_gate",
        "asymmetry_score",
        "cosine_index",
        "cosine_score",
    ):
        # The SR carries 3 significant digits (sr_number); the reader returns what it carries.
        assert got[key] == pytest.approx(sr_number(getattr(want, key)), abs=1e-12), key
    assert got["weaker_side"] == (want.weaker_side.value if want.weaker_side else None)
    assert got["insufficient_activation"] is want.insufficient_activation
    assert got["peak_frames"] == peak
    assert got["method"] == want.method
    assert got["notes"] == list(want.notes)
    head = want.head_motion
    if head is None:  # an old result: no head-motion items, and the reader says so
        assert got["head_motion"] is None
    else:
        assert got["head_motion"] == {
            "roll_deg": pytest.approx(sr_number(head.roll_deg), abs=1e-12),
            "yaw_deg": pytest.approx(sr_number(head.yaw_deg), abs=1e-12),
            "pitch_deg": pytest.approx(sr_number(head.pitch_deg), abs=1e-12),
            "scale_pct": pytest.approx(sr_number(head.scale_pct), abs=1e-12),
            "shift_d": pytest.approx(sr_number(head.shift_d), abs=1e-12),
            "residual_d": pytest.approx(sr_number(head.residual_d), abs=1e-12), "corrected": head.corrected,
        }


def test_round_trip_equals_the_input(written: Path, study: dict[str, Dataset]) -> None:
    got = read_report(pydicom.dcmread(written))
    assert [g["sop_instance_uid"] for g in got] == [
        study["video"].SOPInstanceUID,
        study["photo"].SOPInstanceUID,
    ]
    video, photo = got
    assert video["quality_ok"] is True and video["reasons"] == []
    assert video["warnings"] == ["face lost in 3 frames"]
    assert [t["task"] for t in video["tasks"]] == ["smile", "brow_raise"]
    _assert_task(video["tasks"][0], SMILE, list(SMILE.peak_frames))
    _assert_task(video["tasks"][1], BROW, list(BROW.peak_frames))
    assert video["tasks"][0]["flow"] == {
        r.region: {"left": pytest.approx(sr_number(r.left)), "right": pytest.approx(sr_number(r.right)),
                   "symmetry_score": pytest.approx(sr_number(r.symmetry_score))}
        for r in SMILE.flow
    }
    assert video["tasks"][1]["flow"] == {}
    assert video["tasks"][0]["grade"] == "IV" and video["tasks"][1]["grade"] is None
    assert "trained on synthetic data" in video["tasks"][0]["grade_model"]
    assert photo == {
        "sop_instance_uid": study["photo"].SOPInstanceUID,
        "quality_ok": False,
        "reasons": ["no face"],
        "warnings": [],
        "tasks": [],
        "static": [],
    }


def _measurements(ds: Dataset) -> Dataset:
    """The root's "Imaging Measurements" container (DCM 126010), which holds the measurement groups."""
    (found,) = [c for c in ds.ContentSequence if c.ConceptNameCodeSequence[0].CodeValue == "126010"]
    return found


def test_impression_leads_the_report(written: Path) -> None:
    """TID 1500 row 12: a "Qualitative Evaluations" container with the one-sentence Impression."""
    ds = pydicom.dcmread(written)
    (qual,) = [c for c in ds.ContentSequence if c.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    (text,) = qual.ContentSequence
    assert text.ConceptNameCodeSequence[0].CodeValue == "121073" and text.ValueType == "TEXT"
    assert text.TextValue.startswith("Patient's ") and "smile AI" in text.TextValue
    assert ds.ContinuityOfContent == "SEPARATE" and qual.ContinuityOfContent == "SEPARATE"
    assert read_impression(ds) == text.TextValue  # the reader finds it (facesym demo prints it)
    del ds.ContentSequence[ds.ContentSequence.index(qual)]
    assert read_impression(ds) is None


def test_head_motion_items_units_and_verdict(written: Path) -> None:
    """Per task group: the head-motion NUMs with their UCUM units, and "Head motion corrected" Yes / No
    (BROW's could not be corrected); a task without head motion (EYES, an old result) has none of them."""
    ds = pydicom.dcmread(written)
    smile, brow = _measurements(ds).ContentSequence[:2]

    def items(group: Dataset) -> dict[str, Dataset]:
        return {i.ConceptNameCodeSequence[0].CodeValue: i for i in group.ContentSequence
                if "ConceptNameCodeSequence" in i}

    for group, corrected in ((smile, "373066001"), (brow, "373067005")):
        found = items(group)
        for concept, _, unit in codes.HEAD_MOTION_MEASUREMENTS:
            item = found[concept.value]
            assert item.ValueType == "NUM" and item.RelationshipType == "CONTAINS"
            units = item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
            assert (units.CodeValue, units.CodingSchemeDesignator) == (unit.value, "UCUM"), concept.value
        verdict = found[codes.HEAD_MOTION_CORRECTED.value]
        assert verdict.ValueType == "CODE" and verdict.ConceptCodeSequence[0].CodeValue == corrected
    assert {u.value for _, _, u in codes.HEAD_MOTION_MEASUREMENTS} == {"{D}", "deg", "%"}
    video = build_video_photographic(b"\x00" * 64, width=64, height=48, n_frames=N_FRAMES, fps=30.0)
    old = InstanceFinding(video.SOPClassUID, video.SOPInstanceUID, N_FRAMES,
                          Analysis(Quality(True, (), (), 9, 9), (replace(EYES, head_motion=None),)))
    sr = build_report([_header(video)], [old], engine_version=ENGINE)
    (group,) = _measurements(sr).ContentSequence
    assert not [code for code in items(group) if code.startswith("FSY-HM-")]


def test_sr_header(written: Path, study: dict[str, Dataset]) -> None:
    ds = pydicom.dcmread(written)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert ds.Modality == "SR"
    assert ds.StudyInstanceUID == study["video"].StudyInstanceUID
    assert ds.PatientName == PATIENT
    series, _ = report_uids([study["photo"].SOPInstanceUID, study["video"].SOPInstanceUID], ENGINE)
    assert ds.SeriesInstanceUID == series  # the SOP Instance UID also derives from the content (below)
    assert ds.SeriesNumber == 9001 and ds.SeriesDescription == "FaceSym facial symmetry report"
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    # The source instances are the evidence of the current requested procedure (PS3.3 C.17.2.3).
    evidence = {
        sop.ReferencedSOPInstanceUID
        for study_item in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study_item.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert evidence == {study["video"].SOPInstanceUID, study["photo"].SOPInstanceUID}
    # The local coding scheme is declared; the IHE AIR contributing equipment names FaceSym.
    assert [i.CodingSchemeDesignator for i in ds.CodingSchemeIdentificationSequence] == [codes.SCHEME]
    ours = [
        e
        for e in ds.ContributingEquipmentSequence
        if e.PurposeOfReferenceCodeSequence[0].CodeValue == "109102" and e.ManufacturerModelName == "FaceSym"
    ]
    assert len(ours) == 1 and ours[0].Manufacturer == "FaceSym" and ours[0].SoftwareVersions == ENGINE
    assert ds.PerformedProcedureCodeSequence[0].CodeValue == codes.PROCEDURE.value


def test_peak_frames_are_referenced_one_based(written: Path) -> None:
    ds = pydicom.dcmread(written)
    groups = _measurements(ds).ContentSequence  # "Imaging Measurements" → "Measurement Group"s
    images = [i for g in groups for i in g.ContentSequence if i.ValueType == "IMAGE"]
    frames = [
        list(map(int, i.ReferencedSOPSequence[0].get("ReferencedFrameNumber", []) or [])) for i in images
    ]
    assert frames[0] == list(range(41, 54))
    assert frames[1] == list(range(71, 77))
    assert frames[2] == []  # the single-frame photo


def test_report_uids_are_deterministic_and_order_independent() -> None:
    a, b, c = generate_uid(), generate_uid(), generate_uid()
    first = report_uids([a, b, c], ENGINE)
    assert report_uids([c, a, b], ENGINE) == first
    assert report_uids([b, c, a, a], ENGINE) == first
    assert first[0] != first[1]
    assert report_uids([a, b, c], "0.2.0") != first
    assert set(report_uids([a, b], ENGINE)).isdisjoint(first)
    for uid in first:
        assert uid.startswith("2.25.") and len(uid) <= 64
        assert pydicom.uid.UID(uid).is_valid
    with pytest.raises(InvalidParameterError, match="source_sop_instance_uids"):
        report_uids([], ENGINE)


def test_resend_builds_the_same_uids(study: dict[str, Dataset]) -> None:
    one = build_report(list(study.values()), _findings(study), engine_version=ENGINE)
    two = build_report(list(reversed(study.values())), _findings(study), engine_version=ENGINE)
    assert (one.SeriesInstanceUID, one.SOPInstanceUID) == (two.SeriesInstanceUID, two.SOPInstanceUID)


def test_static_items_and_photo_pair_round_trip(tmp_path: Path) -> None:
    study_uid = generate_uid()
    photo = _header(build_vl_photograph(np.zeros((8, 8, 3), np.uint8), study_uid=study_uid))
    static = (StaticItem("brow_height", 0.61, 0.55), StaticItem("commissure_height", -0.92, -0.88))
    analysis = Analysis(Quality(True, (), (), 2, 2), (EYES,), static)
    sr = build_report(
        [photo],
        [InstanceFinding(photo.SOPClassUID, photo.SOPInstanceUID, None, analysis)],
        engine_version=ENGINE,
    )
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    (got,) = read_report(pydicom.dcmread(tmp_path / "sr.dcm"))
    (task,) = got["tasks"]
    _assert_task(task, EYES, None)
    assert got["static"] == [
        {"name": "brow_height", "left": pytest.approx(0.61), "right": pytest.approx(0.55)},
        {"name": "commissure_height", "left": pytest.approx(-0.92), "right": pytest.approx(-0.88)},
    ]


def test_eye_closure_magnitudes_are_dimensionless(study: dict[str, Dataset]) -> None:
    video = study["video"]
    eyes = TaskResult(**{**EYES.__dict__, "peak_frames": (10, 11)})
    sr = build_report(
        [video],
        [
            InstanceFinding(
                video.SOPClassUID,
                video.SOPInstanceUID,
                N_FRAMES,
                Analysis(Quality(True, (), (), 9, 9), (eyes, SMILE)),
            )
        ],
        engine_version=ENGINE,
    )
    groups = _measurements(sr).ContentSequence
    units = [
        {
            i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue
            for i in g.ContentSequence
            if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "FSY-MAG"
        }
        for g in groups
    ]
    assert units == [{"1"}, {"{D}"}]


def test_missing_type2_attributes_and_non_ascii_reasons(study: dict[str, Dataset], tmp_path: Path) -> None:
    video = copy.deepcopy(study["video"])
    for keyword in ("AccessionNumber", "StudyID", "PatientBirthDate", "ReferringPhysicianName"):
        delattr(video, keyword)
    del video.SpecificCharacterSet  # default repertoire, yet the reasons below are not ASCII
    finding = InstanceFinding(
        video.SOPClassUID,
        video.SOPInstanceUID,
        N_FRAMES,
        Analysis(Quality(False, ("head yaw beyond ±25° in frames 3–9",), (), 0, 0), ()),
    )
    sr = build_report([video], [finding], engine_version=ENGINE)
    for keyword in ("AccessionNumber", "StudyID", "PatientBirthDate", "ReferringPhysicianName"):
        assert keyword in sr and not sr[keyword].value, keyword  # Type 2: present, empty
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert read_report(pydicom.dcmread(path))[0]["reasons"] == ["head yaw beyond ±25° in frames 3–9"]


def test_invalid_inputs_name_the_argument(study: dict[str, Dataset]) -> None:
    findings = _findings(study)
    with pytest.raises(InvalidParameterError, match="evidence"):
        build_report([], findings, engine_version=ENGINE)
    with pytest.raises(InvalidParameterError, match="findings"):
        build_report(list(study.values()), [], engine_version=ENGINE)
    with pytest.raises(InvalidParameterError, match=r"findings\[1\]"):
        build_report([study["video"]], findings, engine_version=ENGINE)
    other = copy.deepcopy(study["photo"])
    other.StudyInstanceUID = generate_uid()
    with pytest.raises(InvalidParameterError, match="one study"):
        build_report([study["video"], other], findings[:1], engine_version=ENGINE)
    nan = TaskResult(**{**SMILE.__dict__, "cosine_index": float("nan")})
    bad = InstanceFinding(
        findings[0].sop_class_uid,
        findings[0].sop_instance_uid,
        N_FRAMES,
        Analysis(findings[0].analysis.quality, (nan,)),
    )
    with pytest.raises(InvalidParameterError, match=r"findings\[0\]\.tasks\[0\]\.cosine_index"):
        build_report(list(study.values()), [bad], engine_version=ENGINE)


def test_no_patient_name_in_logs(
    study: dict[str, Dataset], caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    sr = build_report(
        list(study.values()), _findings(study), engine_version=ENGINE, institution_name="Clinic"
    )
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    read_report(pydicom.dcmread(tmp_path / "sr.dcm"))
    assert any(sr.SOPInstanceUID in r.getMessage() for r in caplog.records)
    for record in caplog.records:
        message = record.getMessage()
        assert "DOE" not in message and "JANE" not in message, message


def test_local_codes_fit_the_value_representations() -> None:
    values = [c.value for c in codes.ALL_LOCAL]
    assert len(values) == len(set(values))
    for code in codes.ALL_LOCAL:
        assert code.scheme_designator == codes.SCHEME
        assert len(code.value) <= 16 and len(code.meaning) <= 64


def test_local_codes_are_documented() -> None:
    doc = (Path(__file__).resolve().parents[2] / "conformance" / "local-codes.md").read_text()
    for code in codes.ALL_LOCAL:
        assert f"`{code.value}`" in doc and code.meaning in doc, code.value


def test_peak_frames_beyond_the_object_are_clipped(study: dict[str, Dataset]) -> None:
    video = study["video"]
    late = TaskResult(**{**SMILE.__dict__, "peak_frames": (N_FRAMES - 2, N_FRAMES + 3)})
    quality = Quality(True, (), (), N_FRAMES, N_FRAMES)
    finding = InstanceFinding(video.SOPClassUID, video.SOPInstanceUID, N_FRAMES, Analysis(quality, (late,)))
    (got,) = read_report(build_report([video], [finding], engine_version=ENGINE))
    assert got["tasks"][0]["peak_frames"] == [N_FRAMES - 2, N_FRAMES - 1]


def test_changed_content_gets_a_new_sr_uid_that_names_its_predecessor(study: dict[str, Dataset]) -> None:
    """Issue 14, finding 4: the same content gives the same SR UID (a resend never duplicates); a corrected
    PatientName or StudyDescription gives a new SOP Instance UID in the same series, and the new SR lists
    the one it replaces in the Predecessor Documents Sequence (PS3.3 C.17.2)."""
    evidence, findings = list(study.values()), _findings(study)
    first = build_report(evidence, findings, engine_version=ENGINE)
    assert build_report(evidence, findings, engine_version=ENGINE).SOPInstanceUID == first.SOPInstanceUID
    for keyword, value in (("PatientName", "DOE^JANET"), ("StudyDescription", "Facial palsy (corrected)")):
        fixed = [copy.deepcopy(ds) for ds in evidence]
        for ds in fixed:
            setattr(ds, keyword, value)
        again = build_report(fixed, findings, engine_version=ENGINE, replaces=first)
        assert again.SOPInstanceUID != first.SOPInstanceUID, keyword
        assert again.SeriesInstanceUID == first.SeriesInstanceUID
        (pred,) = again.PredecessorDocumentsSequence
        ref = pred.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == first.SOPInstanceUID
    # Other results are other content too; an unchanged report names no predecessor (it IS the same).
    other = [replace(findings[0], analysis=Analysis(findings[0].analysis.quality, (SMILE,))), findings[1]]
    assert build_report(evidence, other, engine_version=ENGINE).SOPInstanceUID != first.SOPInstanceUID
    same = build_report(evidence, findings, engine_version=ENGINE, replaces=first)
    assert "PredecessorDocumentsSequence" not in same


def test_content_digest_reads_a_malformed_header_by_its_bytes() -> None:
    """A hostile source (an unknown VR in PatientID, as the C-STORE fuzzer sends) neither stops the report
    nor hides a change: its raw bytes go into the digest."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    from service.report.sr import content_digest

    def header(value: bytes) -> Dataset:
        ds = Dataset()
        ds.SOPInstanceUID = "1.2.3"
        ds._dict[Tag(0x00100020)] = RawDataElement(Tag(0x00100020), "XX", len(value), value, 0, True, True)
        return ds

    assert content_digest([header(b"ABCD")]) == content_digest([header(b"ABCD")])
    assert content_digest([header(b"ABCD")]) != content_digest([header(b"ABCE")])
