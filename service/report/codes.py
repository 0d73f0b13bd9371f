"""Coded concepts of the FaceSym SR (conformance/local-codes.md lists every local code).

Standard codes come from DICOM (DCM), SNOMED CT (SCT) and UCUM; FaceSym's own concepts use the
private coding scheme :data:`SCHEME` ("99" prefix: PS3.16 Section 8.2, private coding schemes), which
each SR declares in its Coding Scheme Identification Sequence (PS3.3 C.12.1, Table C.12-1).

Code values are at most 16 characters (SH) and code meanings at most 64 (LO), PS3.3 8.1 and 8.3.
Changing a value here changes the meaning of every report already stored in a PACS: add codes,
never reuse or rename one (update conformance/local-codes.md alongside).
"""

from __future__ import annotations

from highdicom.sr import CodedConcept

from service.domain import Side, Task

#: Coding Scheme Designator of FaceSym's local concepts (PS3.16 8.2: "99" marks a private scheme).
SCHEME = "99FACESYM"
SCHEME_NAME = "FaceSym local codes"
SCHEME_ORGANIZATION = "FaceSym"


def _local(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning)


# --------------------------------------------------------------------------- procedure and findings
#: TID 1500 row 4 "Procedure reported" and the Performed Procedure Code Sequence (PS3.3 C.17.2).
#: No SNOMED CT or DICOM concept fits a video-based facial-palsy grading, hence a local code.
PROCEDURE = _local("FSY-PROC", "Facial palsy motion analysis")

#: TID 1501 row 6 "Finding", one per task.
FINDING = {
    Task.SMILE: _local("FSY-SMILE", "Smile"),
    Task.EYE_CLOSURE: _local("FSY-EYECLOSE", "Eye closure"),
    Task.BROW_RAISE: _local("FSY-BROWRAISE", "Brow raise"),
}
#: Finding of the group that carries the static items of a rest photo.
FINDING_STATIC = _local("FSY-STATIC", "Facial symmetry at rest")

# ------------------------------------------------------------------------------- measurement names
#: Per-side movement magnitude of a task (TID 300); the side is the finding site's laterality.
MAGNITUDE = _local("FSY-MAG", "Movement magnitude")
ASYMMETRY_INDEX = _local("FSY-AI", "Asymmetry index")
ACTIVATION_GATE = _local("FSY-GATE", "Activation gate")
ASYMMETRY_SCORE = _local("FSY-AS", "Asymmetry score")
COSINE_INDEX = _local("FSY-CI", "Cosine index")
COSINE_SCORE = _local("FSY-CS", "Cosine score")

#: Regional optical-flow symmetry (Taufique et al. 2019): per region, the motion VS of each side
#: (laterality of a Face finding site, unit UNIT_FLOW) and the Symmetry Score SS (unit 1).
FLOW_VS = {
    "forehead": _local("FSY-VS-FH", "Forehead optical-flow motion"),
    "eye": _local("FSY-VS-EYE", "Periocular optical-flow motion"),
    "cheek": _local("FSY-VS-CHEEK", "Cheek and mouth optical-flow motion"),
}
FLOW_SS = {
    "forehead": _local("FSY-SS-FH", "Forehead optical-flow symmetry score"),
    "eye": _local("FSY-SS-EYE", "Periocular optical-flow symmetry score"),
    "cheek": _local("FSY-SS-CHEEK", "Cheek and mouth optical-flow symmetry score"),
}

#: The deep grader's grade (House–Brackmann I–VI by default) and which model gave it (TEXT).
GRADE = _local("FSY-GRADE", "Facial nerve function grade (deep grader)")
GRADE_CLASS = {label: _local(f"FSY-HB-{label}", f"House-Brackmann grade {label}") for label in
               ("I", "II", "III", "IV", "V", "VI")}
GRADE_MODEL = _local("FSY-GRADEMODEL", "Grader model")

#: Static items of a rest photo (service.engine.pipeline.static_items), per side, in D.
STATIC_ITEM = {
    "brow_height": _local("FSY-BROWHT", "Brow height at rest"),
    "palpebral_fissure_height": _local("FSY-FISSUREHT", "Palpebral fissure height at rest"),
    "commissure_height": _local("FSY-COMMISSHT", "Commissure height at rest"),
}

#: Head motion of a task (domain.HeadMotion), a per-task quality figure: the residual of the rigid fit
#: (unit {D}) and the largest rigid motion removed from rest, roll / yaw / pitch (deg), apparent size
#: change (%) and translation ({D}); HEAD_MOTION_CORRECTED says whether the fit could remove it.
HEAD_MOTION_RESIDUAL = _local("FSY-HM-RESID", "Residual head motion after correction")
HEAD_ROLL = _local("FSY-HM-ROLL", "Largest head roll removed")
HEAD_YAW = _local("FSY-HM-YAW", "Largest head yaw removed")
HEAD_PITCH = _local("FSY-HM-PITCH", "Largest head pitch removed")
HEAD_SCALE = _local("FSY-HM-SCALE", "Largest head scale change removed")
HEAD_SHIFT = _local("FSY-HM-SHIFT", "Largest head shift removed")

# ------------------------------------------------------------------------- qualitative evaluations
WEAKER_SIDE = _local("FSY-WEAKER", "Weaker side")
NO_WEAKER_SIDE = _local("FSY-NOWEAKER", "No weaker side")
INSUFFICIENT_ACTIVATION = _local("FSY-INSUFFACT", "Insufficient activation")
#: Value SCT Yes, or SCT No when the residual exceeded the limit (the task's result is flagged).
HEAD_MOTION_CORRECTED = _local("FSY-HM-CORR", "Head motion corrected")
ANALYSIS_QUALITY = _local("FSY-QUALITY", "Analysis quality")
ANALYSABLE = _local("FSY-ANALYSABLE", "Analysable")
NOT_ANALYSABLE = _local("FSY-NOTANALYS", "Not analysable")

#: TEXT qualitative evaluations (TID 1501 row 12 allows coded questions with text answers).
REASON_NOT_ANALYSABLE = _local("FSY-REASON", "Reason not analysable")
ANALYSIS_WARNING = _local("FSY-WARNING", "Analysis warning")
ANALYSIS_NOTE = _local("FSY-NOTE", "Analysis note")

#: TID 1501 row 7 "Measurement Method": how the per-side magnitudes were measured (TaskResult.method).
METHOD = {
    "pixels": _local("FSY-M-PIXELS", "Pixel motion under face landmarks"),
    "landmarks": _local("FSY-M-LANDMARKS", "Face landmark positions"),
}

# ------------------------------------------------------------------------------- standard concepts
#: SNOMED CT laterality values (PS3.16 CID 244 "Laterality"); the PATIENT's sides.
LATERALITY = {
    Side.LEFT: CodedConcept(value="7771000", scheme_designator="SCT", meaning="Left"),
    Side.RIGHT: CodedConcept(value="24028007", scheme_designator="SCT", meaning="Right"),
}
#: Finding site of every per-side measurement (SNOMED CT "Face", as in the VL objects we read).
FACE = CodedConcept(value="89545001", scheme_designator="SCT", meaning="Face")
#: TID 1500 row 12 and the text it holds: the study's one-sentence finding.
QUALITATIVE_EVALUATIONS = CodedConcept(
    value="C0034375", scheme_designator="UMLS", meaning="Qualitative Evaluations"
)
IMPRESSION = CodedConcept(value="121073", scheme_designator="DCM", meaning="Impression")
LATERALITY_CONCEPT = CodedConcept(value="272741003", scheme_designator="SCT", meaning="Laterality")
YES = CodedConcept(value="373066001", scheme_designator="SCT", meaning="Yes")
NO = CodedConcept(value="373067005", scheme_designator="SCT", meaning="No")

# ------------------------------------------------------------------------------------ UCUM units
#: Inter-eye distances D (DESIGN.md, "Sides and coordinates"): a UCUM annotation, dimensionless.
UNIT_D = CodedConcept(value="{D}", scheme_designator="UCUM", meaning="inter-eye distance")
#: Dimensionless ratios and fractions (asymmetry index, gate, cosine index, eye-closure fraction).
UNIT_ONE = CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")
#: The 0-100 scores (asymmetry score, cosine score): a UCUM annotation, dimensionless.
UNIT_SCORE = CodedConcept(value="{score}", scheme_designator="UCUM", meaning="score")
#: Optical-flow motion VS: hundredths of the inter-eye distance per frame (at 30 frames/s).
UNIT_FLOW = CodedConcept(
    value="{D/100}/{fr}", scheme_designator="UCUM", meaning="inter-eye distance/100 per frame"
)
#: Head rotation (roll, yaw, pitch) and the head's apparent size change.
UNIT_DEGREE = CodedConcept(value="deg", scheme_designator="UCUM", meaning="degree")
UNIT_PERCENT = CodedConcept(value="%", scheme_designator="UCUM", meaning="percent")


#: The numbers of a task's HeadMotion: (concept, HeadMotion attribute, unit), in SR and FHIR order.
HEAD_MOTION_MEASUREMENTS: tuple[tuple[CodedConcept, str, CodedConcept], ...] = (
    (HEAD_MOTION_RESIDUAL, "residual_d", UNIT_D),
    (HEAD_ROLL, "roll_deg", UNIT_DEGREE),
    (HEAD_YAW, "yaw_deg", UNIT_DEGREE),
    (HEAD_PITCH, "pitch_deg", UNIT_DEGREE),
    (HEAD_SCALE, "scale_pct", UNIT_PERCENT),
    (HEAD_SHIFT, "shift_d", UNIT_D),
)


def magnitude_unit(task: Task) -> CodedConcept:
    """UCUM unit of a task's per-side magnitude: D for smile and brow raise, "1" for eye closure."""
    return UNIT_ONE if task is Task.EYE_CLOSURE else UNIT_D


#: Every local code, for the Coding Scheme Identification check and conformance/local-codes.md.
ALL_LOCAL: tuple[CodedConcept, ...] = (
    PROCEDURE,
    *FINDING.values(),
    FINDING_STATIC,
    MAGNITUDE,
    ASYMMETRY_INDEX,
    ACTIVATION_GATE,
    ASYMMETRY_SCORE,
    COSINE_INDEX,
    COSINE_SCORE,
    *FLOW_VS.values(),
    *FLOW_SS.values(),
    GRADE,
    *GRADE_CLASS.values(),
    GRADE_MODEL,
    *STATIC_ITEM.values(),
    HEAD_MOTION_RESIDUAL,
    HEAD_ROLL,
    HEAD_YAW,
    HEAD_PITCH,
    HEAD_SCALE,
    HEAD_SHIFT,
    WEAKER_SIDE,
    NO_WEAKER_SIDE,
    INSUFFICIENT_ACTIVATION,
    HEAD_MOTION_CORRECTED,
    ANALYSIS_QUALITY,
    ANALYSABLE,
    NOT_ANALYSABLE,
    REASON_NOT_ANALYSABLE,
    ANALYSIS_WARNING,
    ANALYSIS_NOTE,
    *METHOD.values(),
)
