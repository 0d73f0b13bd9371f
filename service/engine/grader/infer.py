"""Grading a clip with a trained grader model (CPU inference).

A model directory (``models/<name>/<version>/``) holds ``weights.pt`` (a state_dict), ``metadata.json``
(classes, landmark set, input sizes, architecture, version, what it was trained on), ``model_card.md``,
``metrics.json`` and ``SHA256SUMS``. :meth:`Grader.load` refuses a directory whose files do not match
their sha256 in ``SHA256SUMS`` (:class:`ModelIntegrityError`, naming the file). Reading that directory
(:func:`read_model_dir`) is this package's only I/O at inference.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from service.domain import GradeResult
from service.engine.grader import features as F
from service.errors import FaceSymError

SHIPPED_NAME = "facesym-grader"
SHIPPED_VERSION = "0.1.0"
REQUIRED_FILES = ("weights.pt", "metadata.json")


class ModelIntegrityError(FaceSymError):
    """A grader model directory is incomplete, or a file does not match its sha256 in SHA256SUMS."""


def default_model_dir() -> Path:
    """The model shipped in the repository: ``models/facesym-grader/0.1.0``."""
    return Path(__file__).resolve().parents[3] / "models" / SHIPPED_NAME / SHIPPED_VERSION


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_sha256sums(text: str) -> dict[str, str]:
    """``sha256sum`` format: ``<64 hex>  <name>`` per line (a ``*`` before the name is allowed)."""
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise ModelIntegrityError(f"SHA256SUMS line {n} is not '<sha256>  <file>': {line!r}")
        out[parts[1].strip().lstrip("*")] = parts[0].lower()
    return out


def read_model_dir(model_dir: str | Path) -> tuple[dict[str, Any], bytes]:
    """Read and verify a model directory; returns (metadata, weights file bytes).

    Every file listed in SHA256SUMS is hashed; ``weights.pt`` and ``metadata.json`` must be listed.
    The bytes returned are the bytes that were hashed (no second read).

    Raises
    ------
    ModelIntegrityError
        Missing directory or file, a file not listed, or a sha256 mismatch (the message names the file).
    """
    d = Path(model_dir)
    sums_path = d / "SHA256SUMS"
    if not sums_path.is_file():
        raise ModelIntegrityError(f"grader model {d}: no SHA256SUMS; refusing unverified weights")
    sums = parse_sha256sums(sums_path.read_text())
    blobs: dict[str, bytes] = {}
    for name in REQUIRED_FILES:
        if name not in sums:
            raise ModelIntegrityError(f"grader model {d}: {name} is not listed in SHA256SUMS")
    for name, want in sums.items():
        path = d / name
        if "/" in name or "\\" in name or not path.is_file():
            raise ModelIntegrityError(f"grader model {d}: {name} listed in SHA256SUMS is missing")
        data = path.read_bytes()
        got = sha256_hex(data)
        if got != want:
            raise ModelIntegrityError(
                f"grader model file {path} does not match SHA256SUMS (sha256 {got}, expected {want}); "
                "refusing to load it"
            )
        blobs[name] = data
    try:
        metadata: dict[str, Any] = json.loads(blobs["metadata.json"])
    except ValueError as exc:
        raise ModelIntegrityError(f"grader model {d}: metadata.json is not JSON: {exc}") from exc
    return metadata, blobs["weights.pt"]


class Grader:
    """A loaded grader: ``Grader.load(dir).predict(norm_tracks)``."""

    def __init__(self, net: Any, metadata: dict[str, Any]) -> None:
        self._net = net.eval()
        self.metadata = metadata
        self.classes: tuple[str, ...] = tuple(metadata["classes"])
        self.version: str = str(metadata["version"])
        self.trained_on: str = str(metadata["trained_on"])
        inputs = metadata["inputs"]
        if (
            tuple(metadata["landmarks"]["left"]) != F.LEFT_POINTS
            or int(inputs["n_frames"]) != F.N_FRAMES
            or int(inputs["feature_version"]) != F.FEATURE_VERSION
        ):
            raise ModelIntegrityError(
                f"grader model {self.version} was made for other inputs (landmark set / feature version)"
            )

    @classmethod
    def load(cls, model_dir: str | Path | None = None) -> Grader:
        """Load and verify a model directory (default: :func:`default_model_dir`)."""
        import torch

        from service.engine.grader.model import GraderNet, ModelConfig

        metadata, weights = read_model_dir(default_model_dir() if model_dir is None else model_dir)
        net = GraderNet(ModelConfig.from_dict(metadata["model"]))
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        return cls(net, metadata)

    def predict(self, norm_tracks: np.ndarray) -> GradeResult:
        """Grade one clip from its normalised landmarks (T, 478, 2), NaN rows allowed.

        The clip should start at rest and hold one task's movement (as the training sequences do),
        e.g. a pipeline task segment from its rest frames to its end.
        """
        return self.predict_pairs(F.pair_tracks(norm_tracks))

    def predict_pairs(self, pairs: np.ndarray) -> GradeResult:
        """:meth:`predict` from pair tracks (T, 2, P, 2)."""
        import torch

        feats = F.extract(pairs)
        with torch.no_grad():
            logits, attention = self._net(
                torch.from_numpy(feats.symmetry[None]), torch.from_numpy(feats.motion[None])
            )
            probs = torch.softmax(logits.double(), dim=1)[0].numpy()
        k = int(np.argmax(probs))
        return GradeResult(
            label=self.classes[k],
            probabilities={c: float(p) for c, p in zip(self.classes, probs, strict=True)},
            model_version=self.version,
            trained_on=self.trained_on,
            attention=[float(a) for a in attention[0].double().numpy()],
        )
