"""Models: every ``model`` source of the config as a module, and the project's own networks.

Owns: :func:`load_model` (TorchScript, torch.export, ONNX through onnxruntime, a factory, timm,
torchvision and Hugging Face ``transformers``, each builder with an optional ``state_dict``; Hub
files), ``model.output`` (:class:`SelectOutput`), the input an archive declares
(:func:`input_signature`), input normalisation inside the model, file hashes, and the small
networks used by the demo and the bench (:class:`SeedCNN`, :class:`SeedCNNWithGAP`,
:class:`SmallResNet`).
``pipeline.models:SeedCNN`` is a valid ``model.factory``. timm, torchvision, transformers and
onnxruntime are optional extras, imported only when their source is loaded.

May import: ``pipeline.config``, ``pipeline.storage``. Never Ray, pandas or matplotlib.
"""

from pipeline.models.exported import InputSignature, check_signature, input_signature
from pipeline.models.factory import ModelLoadError, build_factory
from pipeline.models.loading import Normalized, load_model, model_hash, resolve_model_file
from pipeline.models.nets import SeedCNN, SeedCNNWithGAP, SmallResNet
from pipeline.models.outputs import SelectOutput, describe_output

__all__ = [
    "InputSignature",
    "ModelLoadError",
    "Normalized",
    "SeedCNN",
    "SeedCNNWithGAP",
    "SelectOutput",
    "SmallResNet",
    "build_factory",
    "check_signature",
    "describe_output",
    "input_signature",
    "load_model",
    "model_hash",
    "resolve_model_file",
]
