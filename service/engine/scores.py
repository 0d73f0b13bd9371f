"""Asymmetry and cosine scores (DESIGN.md, "Scores"). Pure functions on numbers and numpy arrays.

Magnitudes are per PATIENT side, in the task's own unit (inter-eye distances D, or a fraction of the
eye area for eye closure), and never negative (movement against the task's direction is no activation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.domain import Side
from service.errors import InvalidParameterError

#: g · AI below this names no weaker side: the difference is within what healthy faces show.
WEAKER_SIDE_MIN_ASYMMETRY = 0.1


@dataclass(frozen=True)
class GateThresholds:
    """Activation gate thresholds in the task's unit: ``a0`` noise floor, ``a1`` full activation."""

    a0: float
    a1: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.a0) and np.isfinite(self.a1)) or self.a0 < 0 or self.a1 <= self.a0:
            raise InvalidParameterError(f"gate thresholds need 0 <= a0 < a1, got a0={self.a0}, a1={self.a1}")


@dataclass(frozen=True)
class TaskScores:
    """Every score of one task; see the module docstring for units and sides."""

    left: float
    right: float
    asymmetry_index: float
    activation_gate: float
    asymmetry_score: float
    cosine_index: float
    cosine_score: float
    cos_theta: float
    magnitude_ratio: float
    weaker_side: Side | None

    @property
    def insufficient_activation(self) -> bool:
        """True when the stronger side moved less than full activation (g < 1): a finding, not a pass."""
        return self.activation_gate < 1.0


def _check_magnitude(name: str, value: float) -> float:
    if not np.isfinite(value) or value < 0:
        raise InvalidParameterError(f"{name} must be a finite magnitude >= 0, got {value!r}")
    return float(value)


def asymmetry_index(left: float, right: float) -> float:
    """AI = |L − R| / max(L, R): 0 symmetric, 1 one side still; 0 when neither side moved."""
    left, right = _check_magnitude("left", left), _check_magnitude("right", right)
    top = max(left, right)
    return 0.0 if top == 0 else abs(left - right) / top


def activation_gate(left: float, right: float, thresholds: GateThresholds) -> float:
    """g = clip((max(L, R) − a0) / (a1 − a0), 0, 1)."""
    top = max(_check_magnitude("left", left), _check_magnitude("right", right))
    return float(np.clip((top - thresholds.a0) / (thresholds.a1 - thresholds.a0), 0.0, 1.0))


def asymmetry_score(ai: float, gate: float) -> float:
    """AS = 100 · (1 − g · AI)."""
    return 100.0 * (1.0 - gate * ai)


def cosine_index(v_left: np.ndarray, v_right: np.ndarray) -> tuple[float, float, float]:
    """Cosine Index of paired displacement vectors.

    Parameters
    ----------
    v_left
        (N, 2) rest → peak displacements of the task's landmarks on the patient's left, in the
        normalised frame (x toward the patient's left, y up).
    v_right
        (N, 2) displacements of the mirror partners of those landmarks on the patient's right, same frame,
        NOT yet mirrored: this function mirrors them (x → −x) so that symmetric motion gives cos θ = 1.

    Returns
    -------
    (CI, cos θ, ρ)
        CI = ρ · (1 + cos θ) / 2 with ρ = min(|vL|, |vR|) / max(|vL|, |vR|) over the stacked vectors.
        Both sides still: CI = 1 (nothing to compare; the activation gate reports it).
    """
    v_left = np.asarray(v_left, dtype=float)
    v_right = np.asarray(v_right, dtype=float)
    if v_left.shape != v_right.shape or v_left.ndim != 2 or v_left.shape[1] != 2:
        raise InvalidParameterError(
            f"v_left and v_right must both be (N, 2), got {v_left.shape} and {v_right.shape}"
        )
    if not (np.isfinite(v_left).all() and np.isfinite(v_right).all()):
        raise InvalidParameterError("v_left and v_right must be finite")
    mirrored = v_right * np.array([-1.0, 1.0])
    a, b = v_left.ravel(), mirrored.ravel()
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if max(na, nb) == 0:
        return 1.0, 1.0, 1.0
    if min(na, nb) == 0:
        return 0.0, 0.0, 0.0
    cos = float(np.clip(a @ b / (na * nb), -1.0, 1.0))
    rho = min(na, nb) / max(na, nb)
    return rho * (1.0 + cos) / 2.0, cos, rho


def cosine_score(ci: float, gate: float) -> float:
    """CS = 100 · (1 − g · (1 − CI))."""
    return 100.0 * (1.0 - gate * (1.0 - ci))


def weaker_side(left: float, right: float, ai: float, gate: float) -> Side | None:
    """The side with the smaller magnitude when g · AI ≥ 0.1, else None."""
    if gate * ai < WEAKER_SIDE_MIN_ASYMMETRY or left == right:
        return None
    return Side.LEFT if left < right else Side.RIGHT


def score_task(
    left: float, right: float, v_left: np.ndarray, v_right: np.ndarray, thresholds: GateThresholds
) -> TaskScores:
    """All scores of one task from the per-side magnitudes and the paired displacement vectors."""
    ai = asymmetry_index(left, right)
    g = activation_gate(left, right, thresholds)
    ci, cos, rho = cosine_index(v_left, v_right)
    return TaskScores(
        left=float(left),
        right=float(right),
        asymmetry_index=ai,
        activation_gate=g,
        asymmetry_score=asymmetry_score(ai, g),
        cosine_index=ci,
        cosine_score=cosine_score(ci, g),
        cos_theta=cos,
        magnitude_ratio=rho,
        weaker_side=weaker_side(left, right, ai, g),
    )
