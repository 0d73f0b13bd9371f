"""The figures and the PDF report as DICOM objects of the analysed study.

- :func:`build_sc_images`: each figure as a Secondary Capture Image (PS3.3 A.8.1, highdicom ``SCImage``),
  RGB, in one series "FaceSym key images" of the source study;
- :func:`build_encapsulated_pdf`: the PDF report as Encapsulated PDF (PS3.3 A.45.1), its own series.

Patient and study attributes are copied from the first source header, so the objects land in the
analysed study. Series and SOP Instance UIDs derive from the source SOP Instance UIDs, the engine version,
a role tag and the object's index (the same scheme as :func:`service.report.sr.report_uids`), so a resend
of the same study never makes a second copy in the PACS.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence

import highdicom as hd
import numpy as np
import pydicom
from highdicom.sc import SCImage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from service import __version__
from service.errors import InvalidParameterError
from service.report.sr import _complete_type2, _hash_uid

KEY_IMAGES_DESCRIPTION = "FaceSym key images"
PDF_SERIES_DESCRIPTION = "FaceSym report (PDF)"
PDF_DOCUMENT_TITLE = "FaceSym facial symmetry report"
ENCAPSULATED_PDF_STORAGE = UID("1.2.840.10008.5.1.4.1.1.104.1")
MANUFACTURER = "FaceSym"
MODEL_NAME = "FaceSym"
#: LOINC 18748-4 "Diagnostic imaging study" (a report of an imaging study), the usual PDF report title.
_PDF_CONCEPT = ("18748-4", "LN", "Diagnostic imaging study")

#: Patient and study attributes copied from the source header when present (PS3.3 C.7.1.1, C.7.2.1),
#: beyond the Type 2 ones highdicom copies itself.
_EXTRA_PATIENT_STUDY = (
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "PatientAge",
    "StudyDescription",
)
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def object_uids(
    source_sop_instance_uids: Iterable[str], engine_version: str, role: str, count: int, content: str = ""
) -> tuple[str, list[str]]:
    """Deterministic (Series Instance UID, [SOP Instance UID × count]) of one derived series.

    ``role`` names the series ("sc" for the key images, "pdf" for the report); each UID is '2.25.' and a
    128-bit SHA-256 hash of the sorted unique source UIDs, the engine version, the role and the index;
    the SOP Instance UIDs also of ``content`` (:func:`service.report.sr.content_digest`), so a corrected
    re-send gets new objects in the same series.
    """
    uids = sorted({str(u).strip() for u in source_sop_instance_uids})
    if not uids or not all(uids):
        raise InvalidParameterError("source_sop_uids must name at least one non-empty UID")
    if not engine_version:
        raise InvalidParameterError("engine_version must not be empty")
    joined = "\n".join(uids)
    tag = f"facesym-{role}"
    return (
        _hash_uid(tag, joined, engine_version, "series"),
        [_hash_uid(tag, joined, engine_version, "sop", str(k), *([content] if content else []))
         for k in range(count)],
    )


def _now() -> tuple[str, str]:
    now = datetime.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def _copy_patient_study(src: Dataset, dst: Dataset) -> None:
    for keyword in _EXTRA_PATIENT_STUDY:
        try:
            if keyword in src and src[keyword].value not in (None, ""):
                dst[keyword] = src[keyword]
        except Exception:  # a value pydicom cannot convert (hostile input): the copy does without it
            continue


def _contributing_equipment(engine_version: str) -> list[hd.ContributingEquipment]:
    return [
        hd.ContributingEquipment(
            manufacturer=MANUFACTURER,
            purpose_of_reference=dcm_codes.DCM.ProcessingEquipment,
            manufacturer_model_name=MODEL_NAME,
            software_versions=engine_version,
            contribution_description="Facial palsy motion analysis figures",
        )
    ]


def _references(
    evidence: Dataset, source_sop_uids: Sequence[str], source_classes: dict[str, str] | None
) -> DicomSequence:
    """Referenced SOP Class/Instance UID items of the sources whose class is known (sorted by UID)."""
    classes = dict(source_classes or {})
    classes.setdefault(str(evidence.SOPInstanceUID), str(evidence.SOPClassUID))
    items = []
    for uid in sorted(set(source_sop_uids)):
        if uid in classes:
            item = Dataset()
            item.ReferencedSOPClassUID = classes[uid]
            item.ReferencedSOPInstanceUID = uid
            items.append(item)
    return DicomSequence(items)


def build_sc_images(
    figures: Sequence[np.ndarray],
    evidence: pydicom.Dataset,
    *,
    engine_version: str,
    source_sop_uids: Sequence[str],
    series_number: int = 9002,
    source_classes: dict[str, str] | None = None,
    content: str = "",
) -> list[Dataset]:
    """Each figure as a Secondary Capture Image (PS3.3 A.8.1) in the source study.

    Parameters
    ----------
    figures
        (H, W, 3) uint8 RGB arrays (:mod:`service.report.figures`).
    evidence
        A source instance's header (``stop_before_pixels=True`` is enough): Patient and General Study
        attributes are copied from it.
    engine_version, source_sop_uids
        Inputs of the deterministic UIDs (all the study's source SOP Instance UIDs, as for the SR).
    series_number
        Series Number of "FaceSym key images".
    source_classes
        SOP Class UID per source SOP Instance UID, to list the sources in the Source Image Sequence
        (sources whose class is not known are not listed).

    Returns
    -------
    list[pydicom.Dataset]
        Explicit VR Little Endian, File Meta set; Burned In Annotation YES (the figures hold text),
        Conversion Type WSD (workstation), Image Type DERIVED\\SECONDARY.
    """
    if not figures:
        return []
    series_uid, sop_uids = object_uids(source_sop_uids, engine_version, "sc", len(figures), content)
    ref = _complete_type2(evidence)
    out: list[Dataset] = []
    for k, (fig, sop_uid) in enumerate(zip(figures, sop_uids, strict=True)):
        arr = np.ascontiguousarray(fig)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise InvalidParameterError(f"figures[{k}] must be (H, W, 3) uint8, got {arr.shape} {arr.dtype}")
        sc = SCImage.from_ref_dataset(
            ref_dataset=ref,
            pixel_array=arr,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=sop_uid,
            instance_number=k + 1,
            manufacturer=MANUFACTURER,
            patient_orientation=("L", "F"),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=KEY_IMAGES_DESCRIPTION,
            manufacturer_model_name=MODEL_NAME,
            software_versions=__version__,
            specific_character_set="ISO_IR 192",
            contributing_equipment=_contributing_equipment(engine_version),
        )
        # Figures are composites (a face, a plot, captions): no patient orientation is claimed.
        sc.add_new("PatientOrientation", "CS", None)
        # Type 2C (dciodvfy requires it): the face is not a paired structure, so empty.
        sc.add_new("Laterality", "CS", None)
        sc.ConversionType = "WSD"
        sc.BurnedInAnnotation = "YES"
        sc.RecognizableVisualFeatures = "YES"
        sc.ImageType = ["DERIVED", "SECONDARY"]
        sc.LossyImageCompression = "00"
        sc.DerivationDescription = "FaceSym analysis figure rendered from the source images"
        refs = _references(evidence, source_sop_uids, source_classes)
        if refs:
            sc.SourceImageSequence = refs
        _copy_patient_study(ref, sc)  # ref: malformed Type 2 values of the source already emptied
        out.append(sc)
    return out


def build_encapsulated_pdf(
    pdf_bytes: bytes,
    evidence: pydicom.Dataset,
    *,
    engine_version: str,
    source_sop_uids: Sequence[str],
    series_number: int = 9003,
    source_classes: dict[str, str] | None = None,
    document_title: str = PDF_DOCUMENT_TITLE,
    content: str = "",
) -> Dataset:
    """The PDF report as an Encapsulated PDF object (PS3.3 A.45.1) in the source study.

    Modules: Patient, General Study, Encapsulated Document Series (Modality DOC), General Equipment,
    SC Equipment (Conversion Type WSD), Encapsulated Document (MIME type application/pdf, Document
    Title, Concept Name LOINC 18748-4, Burned In Annotation YES, Source Instance Sequence), SOP Common.

    Returns
    -------
    pydicom.Dataset
        Explicit VR Little Endian with File Meta, ready for ``write_dicom``.
    """
    if not pdf_bytes.startswith(b"%PDF"):
        raise InvalidParameterError("pdf_bytes is not a PDF (no %PDF header)")
    series_uid, (sop_uid,) = object_uids(source_sop_uids, engine_version, "pdf", 1, content)
    ref = _complete_type2(evidence)
    date, time = _now()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENCAPSULATED_PDF_STORAGE
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    # SOP Common (C.12.1)
    ds.SOPClassUID, ds.SOPInstanceUID = ENCAPSULATED_PDF_STORAGE, UID(sop_uid)
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    # Patient (C.7.1.1) and General Study (C.7.2.1)
    for keyword in _TYPE2_PATIENT_STUDY:
        ds[keyword] = ref[keyword]
    _copy_patient_study(ref, ds)  # ref: malformed Type 2 values of the source already emptied
    # Encapsulated Document Series (C.24.1)
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = UID(series_uid)
    ds.SeriesNumber = series_number
    ds.SeriesDescription = PDF_SERIES_DESCRIPTION
    # General Equipment (C.7.5.1) and SC Equipment (C.8.6.1)
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL_NAME
    ds.SoftwareVersions = [__version__, engine_version]
    ds.ConversionType = "WSD"
    # Encapsulated Document (C.24.2)
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = date, time
    ds.AcquisitionDateTime = date + time
    ds.BurnedInAnnotation = "YES"
    ds.RecognizableVisualFeatures = "YES"
    ds.DocumentTitle = document_title[:64]
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = _PDF_CONCEPT
    ds.ConceptNameCodeSequence = DicomSequence([concept])
    ds.SourceInstanceSequence = _references(evidence, source_sop_uids, source_classes)
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(pdf_bytes)
    # OB values have even length (PS3.5 7.1.1); Encapsulated Document Length gives the true size.
    ds.EncapsulatedDocument = pdf_bytes + (b"\x00" if len(pdf_bytes) % 2 else b"")
    # IHE AI Results: FaceSym named as Contributing Equipment (C.12.1.1.5).
    ds.ContributingEquipmentSequence = DicomSequence(_contributing_equipment(engine_version))
    return ds
