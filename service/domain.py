"""Frozen value objects shared by every layer. No I/O, no pydicom.

Sides are always the PATIENT's (DESIGN.md, "Sides and coordinates").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import numpy as np


class Task(str, Enum):
    SMILE = "smile"
    EYE_CLOSURE = "eye_closure"
    BROW_RAISE = "brow_raise"

    @property
    def unit(self) -> str:
        """Unit of the task's movement signal: inter-eye distances or a fraction of the eye area."""
        return "fraction" if self is Task.EYE_CLOSURE else "D"


class Side(str, Enum):
    LEFT = "left"
    RIGHT = "right"


@dataclass(frozen=True)
class Frame:
    """One decoded picture: ``rgb`` is (H, W, 3) uint8, ``time_s`` its presentation time in seconds."""

    index: int
    time_s: float
    rgb: np.ndarray


@dataclass(frozen=True)
class MediaInfo:
    """What is known about a media source before its frames are decoded.

    ``frames`` is the container's frame count when it states one (may be None for streams);
    ``kind`` is "video" or "image"; ``source`` names the format ("mp4/h264", "dicom/video", "png", ...).
    """

    path: str
    kind: str
    width: int
    height: int
    fps: float
    frames: int | None
    source: str


class MediaSource(Protocol):
    """A decodable input: metadata now, frames streamed on demand (never the whole clip in memory)."""

    @property
    def info(self) -> MediaInfo: ...

    def frames(self) -> Iterator[Frame]: ...
