"""Where the SR's measurements lie on the key images: TID 1410 planar ROI groups with SCOORDs.

A viewer that draws TID 1500 reports (OHIF v3's ``cornerstone-dicom-sr``) draws one spatial coordinate per
measurement group whose tracking UID it has not seen, on the image the SCOORD's "selected from" reference
names. So per analysed task and side of the patient, the SR gets three PS3.16 TID 1410 "Planar ROI
Measurements and Qualitative Evaluations" groups on that task's key image (the Secondary Capture of
:mod:`service.report.secondary`):

- ``rest``: POLYLINE through the task's landmark group at rest, mapped into the peak frame (no
  measurement: the outline the movement started from);
- ``peak``: POLYLINE through the same landmarks at peak, with the side's movement magnitude (TID 300,
  Finding Site Face with Laterality, as in the TID 1501 group);
- ``vector``: POLYLINE of two points, the group's mean rest → peak arrow as the key image draws it (×gain
  as its caption says), with the task's asymmetry index.

Coordinates are the key image's pixel coordinates (column, row; PS3.3 C.18.6.1.2, the top-left pixel's
outer corner at 0, 0), so they are exact where the figure drew them. Each group's tracking UID derives from
the source instance, the task, the side and the kind, like the TID 1501 groups' (PS3.16 TID 4108).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    ComprehensiveSR,
    CoordinatesForMeasurement,
    FindingSite,
    GraphicTypeValues,
    ImageRegion,
    Measurement,
    MeasurementReport,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    RelationshipTypeValues,
    SourceImageForRegion,
    TrackingIdentifier,
)

from service.domain import Side, Task, TaskResult
from service.errors import InvalidParameterError
from service.report import codes

#: The kinds of region per side, in the order they are written (figures.MARK_KINDS).
KINDS = ("rest", "peak", "vector")


@dataclass(frozen=True)
class KeyImageRegions:
    """Where one task's landmark groups lie on its key image.

    Attributes
    ----------
    source_sop_instance_uid
        The analysed instance the task belongs to.
    task
        The task the key image shows.
    image
        The key image's Secondary Capture (its header is enough): the SCOORDs are selected from it, and it
        joins the SR's evidence and image library.
    marks
        Per (side, kind) in :data:`KINDS`: (N, 2) image coordinates (column, row) in that image, N ≥ 2.
    """

    source_sop_instance_uid: str
    task: Task
    image: pydicom.Dataset
    marks: Mapping[tuple[Side, str], np.ndarray]


def _in_image(points: np.ndarray, image: pydicom.Dataset, where: str) -> np.ndarray:
    """(N ≥ 2, 2) finite (column, row) coordinates, clipped to ``image``'s pixel matrix."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 2 or not np.isfinite(pts).all():
        raise InvalidParameterError(f"{where} must be (N >= 2, 2) finite coordinates, got shape {pts.shape}")
    rows, cols = int(image.Rows), int(image.Columns)
    return np.column_stack([np.clip(pts[:, 0], 0.0, cols), np.clip(pts[:, 1], 0.0, rows)])


def _polyline(points: np.ndarray, image: pydicom.Dataset, where: str) -> ImageRegion:
    return ImageRegion(
        graphic_type=GraphicTypeValues.POLYLINE,
        graphic_data=_in_image(points, image, where),
        source_image=SourceImageForRegion.from_source_image(image),
    )


def peak_coordinates(regions: KeyImageRegions, side: Side, where: str) -> CoordinatesForMeasurement:
    """INFERRED FROM SCOORD (TID 300) for a per-side value of the TID 1501 group: the side's landmark
    group at peak on the key image. A viewer that draws a group from its values' coordinates (OHIF's
    non-geometric groups) draws these; without any, OHIF 3.13's SR loader stops with a TypeError."""
    key = (side, "peak")
    if key not in regions.marks:
        raise InvalidParameterError(f"{where}.marks has no {side.value} peak")
    return CoordinatesForMeasurement(
        graphic_type=GraphicTypeValues.POLYLINE,
        graphic_data=_in_image(regions.marks[key], regions.image, f"{where}.marks[{side.value}/peak]"),
        source_image=SourceImageForRegion.from_source_image(regions.image),
    )


def _side_site(side: Side) -> FindingSite:
    return FindingSite(codes.FACE, laterality=codes.LATERALITY[side])


def planar_groups(
    regions: KeyImageRegions,
    task: TaskResult,
    algorithm: AlgorithmIdentification,
    tracking: Callable[[str, str, str], TrackingIdentifier],
    number: Callable[[str, float], float],
    where: str,
) -> list[PlanarROIMeasurementsAndQualitativeEvaluations]:
    """The TID 1410 groups of one task (module docstring). ``tracking(uid, role, label)`` and
    ``number(where, value)`` are the SR's tracking identifier and rounding (service.report.sr)."""
    if regions.task is not task.task:
        raise InvalidParameterError(f"{where}.task is {regions.task.value}, the result is {task.task.value}")
    title = task.task.value.replace("_", " ")
    groups = []
    for side, value in ((Side.LEFT, task.left), (Side.RIGHT, task.right)):
        for kind in KINDS:
            key = (side, kind)
            if key not in regions.marks:
                raise InvalidParameterError(f"{where}.marks has no {side.value} {kind}")
            measurements: list[Measurement] = []
            if kind == "peak":
                m = Measurement(
                    name=codes.MAGNITUDE, value=number(f"{where}.{side.value}", value),
                    unit=codes.magnitude_unit(task.task), finding_sites=[_side_site(side)],
                    algorithm_id=algorithm,
                )
                m[0].ContentSequence.append(CodeContentItem(
                    name=codes.LATERALITY_CONCEPT, value=codes.LATERALITY[side],
                    relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD,
                ))
                measurements.append(m)
            elif kind == "vector":
                measurements.append(Measurement(
                    name=codes.ASYMMETRY_INDEX, unit=codes.UNIT_ONE, algorithm_id=algorithm,
                    value=number(f"{where}.asymmetry_index", task.asymmetry_index),
                ))
            role = f"{task.task.value}/{side.value}/{kind}"
            groups.append(PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking(
                    regions.source_sop_instance_uid, role, f"FaceSym {title} {side.value} {kind}"
                ),
                referenced_region=_polyline(regions.marks[key], regions.image, f"{where}.marks[{role}]"),
                finding_type=codes.FINDING[task.task],
                finding_sites=[_side_site(side)],
                algorithm_id=algorithm,
                measurements=measurements,
            ))
    return groups


def read_regions(ds: pydicom.Dataset) -> list[dict[str, Any]]:
    """The planar groups :func:`planar_groups` wrote, in order: one dict per group::

        {"label": tracking identifier text, "tracking_uid": str, "graphic_type": "POLYLINE",
         "points": (N, 2) float array, "image_uid": SOP Instance UID the region is selected from,
         "side": "left" | "right" | None, "values": {concept meaning: float}}
    """
    sr = ComprehensiveSR.from_dataset(ds)
    content = sr.content
    if not isinstance(content, MeasurementReport):
        raise InvalidParameterError("ds is not a TID 1500 Measurement Report")
    out = []
    for group in content.get_planar_roi_measurement_groups():
        region = group.roi
        if region is None:
            continue
        side = None
        for site in group.finding_sites:
            for s, code in codes.LATERALITY.items():
                if site.laterality == code:
                    side = s.value
        ref = region.ContentSequence[0].ReferencedSOPSequence[0]
        out.append({
            "label": group.tracking_identifier,
            "tracking_uid": group.tracking_uid,
            "graphic_type": region.graphic_type.value,
            "points": np.asarray(region.value, dtype=np.float64).reshape(-1, 2),
            "image_uid": str(ref.ReferencedSOPInstanceUID),
            "side": side,
            "values": {str(m.name.meaning): float(m.value) for m in group.get_measurements()},
        })
    return out


def region_images(regions: Sequence[KeyImageRegions]) -> list[pydicom.Dataset]:
    """The key images the regions are selected from, once each, in order."""
    seen: dict[str, pydicom.Dataset] = {}
    for r in regions:
        seen.setdefault(str(r.image.SOPInstanceUID), r.image)
    return list(seen.values())
