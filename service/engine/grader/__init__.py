"""The two-stream deep grader (DESIGN.md, "Deep grader"): landmark tracks in, a palsy grade out.

* :mod:`.features` - landmark set, resampling to 96 frames, the symmetry map and the displacement stream;
* :mod:`.model` - the network (SE-Residual CNN + BiLSTM with attention, fused), PyTorch;
* :mod:`.infer` - :class:`Grader` (load verified weights, ``predict``) and :class:`GradeResult`;
* :mod:`.synth` - synthetic palsy sequences with known grades (the shipped model's training data);
* :mod:`.train` - ``train(manifest, out_dir, ...)``, behind ``facesym train``;
* :mod:`.data` - reading training rows (clips through FaceMesh, or ``.npz`` landmark tracks).

Importing this package does not import torch; :meth:`Grader.load` does.
"""

from service.engine.grader.features import LEFT_POINTS, N_FRAMES, RIGHT_POINTS, features_from_norm
from service.engine.grader.infer import (
    Grader,
    GradeResult,
    ModelIntegrityError,
    default_model_dir,
)
from service.engine.grader.synth import HB_CLASSES

__all__ = [
    "HB_CLASSES",
    "LEFT_POINTS",
    "N_FRAMES",
    "RIGHT_POINTS",
    "GradeResult",
    "Grader",
    "ModelIntegrityError",
    "default_model_dir",
    "features_from_norm",
]
