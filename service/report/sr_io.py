"""Files in, SR file out: reads the source headers and writes the report atomically.

pydicom stays in report/.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydicom import Dataset, dcmread

from service.media.dicom_io import DEFER_SIZE, write_dicom
from service.report.comparison import PriorStudy
from service.report.sr import InstanceFinding, build_report
from service.report.sr_regions import KeyImageRegions


def write_report(
    source_paths: Sequence[Path],
    findings: Sequence[InstanceFinding],
    out_dir: Path,
    engine_version: str,
    prior_reports: Sequence[Path] = (),
    key_images: Sequence[KeyImageRegions] = (),
    comparison: Sequence[PriorStudy] = (),
    replaces: Path | None = None,
) -> tuple[Path, str]:
    """Build the study's SR from its source files and write it under ``out_dir``; returns (path, SOP UID).

    The SR's UIDs derive from the sources, the engine version and the content, so the same study gives the
    same file; ``replaces`` is the study's earlier SR file (if any), named as its predecessor when the
    content changed (a missing or unreadable file is skipped).
    """
    # Large values (a huge private element) stay on disk: only a few header attributes are needed.
    evidence = [dcmread(p, stop_before_pixels=True, defer_size=DEFER_SIZE) for p in source_paths]
    previous = None
    if replaces is not None and Path(replaces).is_file():
        try:
            previous = dcmread(replaces, stop_before_pixels=True)
        except (OSError, ValueError):
            previous = None
    ds = build_report(evidence, findings, engine_version=engine_version, key_images=key_images,
                      comparison=comparison, replaces=previous)
    priors = [dcmread(p, stop_before_pixels=True) for p in prior_reports if Path(p).is_file()]
    if priors:
        # The patient's earlier reports (before/after), PS3.3 C.17.2 Pertinent Other Evidence Sequence.
        ds.PertinentOtherEvidenceSequence = [_reference(prior) for prior in priors]
    path = out_dir / f"{ds.SOPInstanceUID}.dcm"
    out_dir.mkdir(parents=True, exist_ok=True)
    write_dicom(ds, path)
    return path, str(ds.SOPInstanceUID)


def _reference(ds: Dataset) -> Dataset:
    """Hierarchical SOP Instance Reference (PS3.3 C.17.2.1) of one object."""
    sop = Dataset()
    sop.ReferencedSOPClassUID = ds.SOPClassUID
    sop.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = ds.SeriesInstanceUID
    series.ReferencedSOPSequence = [sop]
    study = Dataset()
    study.StudyInstanceUID = ds.StudyInstanceUID
    study.ReferencedSeriesSequence = [series]
    return study
