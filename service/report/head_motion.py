"""How every report words a task's head motion (DESIGN.md, "Head motion"): the rigid motion removed
before measuring and the residual of that fit, a per-task quality figure.

Shared by the PDF, the FHIR DiagnosticReport conclusion, the console and ``facesym analyze``, so they all
say the same thing. The SR and the FHIR Observation carry the numbers as coded measurements instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from service.domain import HeadMotion


def head_motion_text(hm: HeadMotion) -> str:
    """"roll 2.1°, yaw 3.4°, pitch 1.0°, scale 1.2 %, shift 0.050 D; residual 0.012 D"."""
    return (
        f"roll {hm.roll_deg:.1f}°, yaw {hm.yaw_deg:.1f}°, pitch {hm.pitch_deg:.1f}°, "
        f"scale {hm.scale_pct:.1f} %, shift {hm.shift_d:.3f} D; residual {hm.residual_d:.3f} D"
    )


def not_corrected_text(hm: HeadMotion) -> str:
    """The warning of a task whose head motion could not be removed (``hm.corrected`` False)."""
    return (
        f"head motion NOT corrected (residual {hm.residual_d:.3f} D above the limit): "
        "the head did not move rigidly enough to be removed; this task's scores may be wrong"
    )


def head_motion_of(doc: Mapping[str, Any]) -> HeadMotion | None:
    """The ``"head_motion"`` object of a task's JSON document (README, "JSON schema"), or None when the
    task has none (results stored before head-motion compensation existed) or it cannot be read."""
    obj = doc.get("head_motion")
    if not isinstance(obj, Mapping):
        return None
    try:
        return HeadMotion.from_json(dict(obj))
    except (KeyError, TypeError, ValueError):
        return None
