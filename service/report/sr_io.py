"""Files in, SR file out: reads the source headers and writes the report atomically.

pydicom stays in report/.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydicom import dcmread

from service.media.dicom_io import write_dicom
from service.report.sr import InstanceFinding, build_report


def write_report(
    source_paths: Sequence[Path], findings: Sequence[InstanceFinding], out_dir: Path, engine_version: str
) -> tuple[Path, str]:
    """Build the study's SR from its source files and write it under ``out_dir``; returns (path, SOP UID).

    The SR's UIDs derive from the sources and the engine version, so the same study gives the same file.
    """
    evidence = [dcmread(p, stop_before_pixels=True) for p in source_paths]
    ds = build_report(evidence, findings, engine_version=engine_version)
    path = out_dir / f"{ds.SOPInstanceUID}.dcm"
    out_dir.mkdir(parents=True, exist_ok=True)
    write_dicom(ds, path)
    return path, str(ds.SOPInstanceUID)
