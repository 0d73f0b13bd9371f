"""TaskResult fixtures shared by the report tests (SR, FHIR): a 90-frame clip, values with enough digits
that rounding in a report would show. Each test module derives what it needs with dataclasses.replace.

SMILE and BROW carry a HeadMotion (BROW's could not be corrected); EYES has none, as results stored before
head-motion compensation existed: every report must take both."""

from __future__ import annotations

from service.domain import HeadMotion, Side, Task, TaskResult

N_FRAMES = 90
ENGINE = "0.1.0"

#: A weak right smile, measured on pixels; no grade and no flow (each module adds its own).
SMILE = TaskResult(
    task=Task.SMILE,
    frames=(0, 89),
    rest_frames=(0, 12),
    peak_frames=(40, 52),
    left=0.2512345678,
    right=0.0612345678,
    asymmetry_index=0.7562626,
    activation_gate=1.0,
    asymmetry_score=24.37374,
    cosine_index=0.312345,
    cosine_score=31.2345,
    weaker_side=Side.RIGHT,
    method="pixels",
    notes=("peak clipped at clip end",),
    head_motion=HeadMotion(roll_deg=4.123456, yaw_deg=7.654321, pitch_deg=2.345678, scale_pct=3.219876,
                           shift_d=0.1234567, residual_d=0.0123456),
)
#: A symmetric but weak brow raise (gate < 1: insufficient activation).
BROW = TaskResult(
    task=Task.BROW_RAISE,
    frames=(0, 89),
    rest_frames=(0, 12),
    peak_frames=(70, 75),
    left=0.0211,
    right=0.0209,
    asymmetry_index=0.00947867,
    activation_gate=0.3666667,
    asymmetry_score=99.652449,
    cosine_index=0.93,
    cosine_score=97.433333,
    weaker_side=None,
    method="landmarks",
    head_motion=HeadMotion(roll_deg=1.5, yaw_deg=18.25, pitch_deg=9.75, scale_pct=12.5, shift_d=0.4321,
                           residual_d=0.0876543, corrected=False),
)
#: An eye closure weak on the right, from landmarks; no head motion recorded (an old result).
EYES = TaskResult(
    task=Task.EYE_CLOSURE,
    frames=(0, 89),
    rest_frames=(0, 12),
    peak_frames=(60, 64),
    left=0.41,
    right=0.12,
    asymmetry_index=0.707317,
    activation_gate=1.0,
    asymmetry_score=29.2683,
    cosine_index=0.25,
    cosine_score=25.0,
    weaker_side=Side.RIGHT,
    method="landmarks",
)
