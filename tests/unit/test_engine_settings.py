"""Engine settings (gates, QC limits, flow, grader model) from the environment reach the engine."""

from __future__ import annotations

import numpy as np
import pytest

from service.config import load_settings
from service.domain import Task
from service.engine.pipeline import EngineParams
from service.engine.scores import score_task
from service.errors import InvalidParameterError


def test_defaults_are_the_engines_defaults() -> None:
    assert load_settings(env={}).engine_params == EngineParams()


def test_environment_values_reach_the_engine() -> None:
    env = {"FACESYM_SMILE_GATE_A0": "0.05", "FACESYM_SMILE_GATE_A1": "0.5", "FACESYM_MAX_YAW_DEG": "10",
           "FACESYM_FLOW_K": "4", "FACESYM_FLOW_LAMBDA": "2", "FACESYM_GRADER_MODEL_DIR": "/opt/models/g1"}
    params = load_settings(env=env).validate().engine_params
    assert (params.gates[Task.SMILE].a0, params.gates[Task.SMILE].a1) == (0.05, 0.5)
    assert params.gates[Task.BROW_RAISE] == EngineParams().gates[Task.BROW_RAISE]
    assert params.quality.max_yaw_deg == 10 and params.quality.max_roll_deg == 20
    assert (params.flow.k, params.flow.lam) == (4, 2)
    assert params.grader_model_dir == "/opt/models/g1"
    # A smile of 0.1 D per side is a full movement by default and only a partial one with a1 = 0.5.
    full = score_task(0.1, 0.05, np.zeros((1, 2)), np.zeros((1, 2)), EngineParams().gates[Task.SMILE])
    partial = score_task(0.1, 0.05, np.zeros((1, 2)), np.zeros((1, 2)), params.gates[Task.SMILE])
    assert full.activation_gate == 1 and partial.activation_gate < 1 and partial.insufficient_activation


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"FACESYM_EYE_CLOSURE_GATE_A0": "0.4"}, "eye_closure_gate_a0/_a1"),  # a0 above the default a1
        ({"FACESYM_BROW_RAISE_GATE_A0": "-0.01"}, "brow_raise_gate_a0/_a1"),
        ({"FACESYM_MAX_PITCH_DEG": "0"}, "max_pitch_deg"),
        ({"FACESYM_FLOW_LAMBDA": "-1"}, "flow_lambda"),
        ({"FACESYM_SMILE_GATE_A1": "wide"}, "smile_gate_a1"),
    ],
)
def test_unusable_values_are_refused_naming_the_setting(env: dict[str, str], named: str) -> None:
    with pytest.raises(InvalidParameterError, match=named):
        load_settings(env=env).validate()


def test_the_example_config_file_loads_and_keeps_the_engine_defaults() -> None:
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "deploy" / "facesym.toml"
    settings = load_settings(example, env={}).validate()
    assert settings.engine_params == EngineParams()
    assert settings.smile_gate_a1 == 0.08 and settings.max_roll_deg == 20


def test_the_crop_scale_reaches_the_crops_and_the_tracking_windows(faces_dir) -> None:  # type: ignore[no-untyped-def]
    """EngineParams.crop_eye_distance_px sizes the face crops (it once did nothing) and the Lucas–Kanade
    windows, which are fixed in D, follow it."""
    from PIL import Image

    from service.domain import Frame
    from service.engine import pipeline as pl

    rgb = np.asarray(Image.open(faces_dir / "single_face.jpg").convert("RGB"))
    sizes = {}
    for px in (64.0, 128.0):
        crops = pl._landmark_pass([Frame(0, 0.0, rgb)], True, None, px)[2]
        assert crops.eye_distance_px == px and crops.crops[0] is not None
        sizes[px] = crops.crops[0].shape
        assert pl.lk_window(pl.WINDOW_D, crops) == {64.0: 21, 128.0: 43}[px]
        assert pl.lk_window(pl.EYE_WINDOW_D, crops) == {64.0: 5, 128.0: 11}[px]
    # The window is 4 × 4.6 D, rounded to whole pixels.
    assert sizes[64.0] == (294, 256) and sizes[128.0] == (589, 512)


@pytest.mark.parametrize("px", [0.0, 16.0, 1000.0])
def test_an_unusable_crop_scale_is_refused_naming_it(px: float) -> None:
    with pytest.raises(InvalidParameterError, match="crop_eye_distance_px"):
        EngineParams(crop_eye_distance_px=px)
