"""Face recognition training: the recipe, resolved once, the model and its layout, the trainer.

- :mod:`~sphereface_plus.face.config`: :class:`FaceConfig`, the schema of ``configs/face/*.yaml``;
- :mod:`~sphereface_plus.face.resolve`: :func:`resolve` ``(config, data) -> Resolved``, the values in force,
  computed once before anything is built;
- :mod:`~sphereface_plus.face.layout`: the classifier's layout over the processes (replicated or row-sharded);
- :mod:`~sphereface_plus.face.model`: backbone + head + the SphereFace+ MHE term as one module;
- :mod:`~sphereface_plus.face.trainer`: :class:`FaceTrainer`, a task of the engine's one loop.

The command is ``sphereface-plus train`` (:mod:`sphereface_plus.commands.train`). Importing this package
loads nothing heavy.
"""
from __future__ import annotations

from sphereface_plus.lazy_exports import lazy_exports

_EXPORTS = {
    "FaceConfig": "sphereface_plus.face.config",
    "load_config": "sphereface_plus.face.config",
    "resolve": "sphereface_plus.face.resolve",
    "Resolved": "sphereface_plus.face.resolve",
    "FaceTrainer": "sphereface_plus.face.trainer",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
