"""Models: loading a network from a file, a factory or the Hub, and the project's own networks.

Owns: :func:`load_model` (TorchScript, torch.export, factory plus ``state_dict``, Hub files),
input normalisation inside the model, file hashes, and the small networks used by the demo and
the bench (:class:`SeedCNN`, :class:`SeedCNNWithGAP`, :class:`SmallResNet`).
``pipeline.models:SeedCNN`` is a valid ``model.factory``.

May import: ``pipeline.config``, ``pipeline.storage``. Never Ray, pandas or matplotlib.
"""

from pipeline.models.loading import (
    ModelLoadError,
    Normalized,
    build_factory,
    load_model,
    model_hash,
    resolve_model_file,
)
from pipeline.models.nets import SeedCNN, SeedCNNWithGAP, SmallResNet

__all__ = [
    "ModelLoadError",
    "Normalized",
    "SeedCNN",
    "SeedCNNWithGAP",
    "SmallResNet",
    "build_factory",
    "load_model",
    "model_hash",
    "resolve_model_file",
]
