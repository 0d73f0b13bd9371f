"""Phantoms: synthetic clips with KNOWN per-side motion, to prove the engine measures asymmetry correctly.

Two kinds: warp phantoms (:mod:`service.phantom.render`: a real face photo animated by a thin-plate
spline, any task and amplitude per side) and half-face freezes (:mod:`service.phantom.freeze`: a real
clip with one half of the face held at its first frame, the seed paper's method, or held in the head's
frame). A rigid head movement can be laid over either (:mod:`service.phantom.head`); the validation
corpus (:mod:`service.phantom.corpus`) combines them on several faces. Each writes a truth
JSON beside the clip. Sides are always the PATIENT's.
"""

from service.phantom.freeze import (
    freeze_frames,
    freeze_frames_in_head_frame,
    freeze_half,
    freeze_mask,
    scale_frames,
)
from service.phantom.head import HeadMotionSpec, apply_head_motion, apply_head_motion_to_clip, move_head
from service.phantom.motion import (
    MAX_EYE_CLOSURE,
    brow_raise_field,
    eye_closure_field,
    eye_distance,
    lateral_offset,
    midline,
    smile_field,
    task_field,
)
from service.phantom.render import (
    Phantom,
    PhantomSpec,
    SourceFace,
    TaskMotion,
    frames_with_head_motion,
    load_face,
    render,
    render_photo_pair,
    write_phantom,
)
from service.phantom.warp import WarpField, border_anchors, face_ring_anchors, forward_field, tps_warp

__all__ = [
    "MAX_EYE_CLOSURE",
    "HeadMotionSpec",
    "apply_head_motion",
    "apply_head_motion_to_clip",
    "frames_with_head_motion",
    "freeze_frames_in_head_frame",
    "move_head",
    "Phantom",
    "PhantomSpec",
    "SourceFace",
    "TaskMotion",
    "WarpField",
    "border_anchors",
    "brow_raise_field",
    "eye_closure_field",
    "eye_distance",
    "face_ring_anchors",
    "forward_field",
    "freeze_frames",
    "freeze_half",
    "freeze_mask",
    "lateral_offset",
    "load_face",
    "midline",
    "render",
    "render_photo_pair",
    "scale_frames",
    "smile_field",
    "task_field",
    "tps_warp",
    "write_phantom",
]
