"""Custom ops (``torch.ops.attnforge.*``) and their CPU kernels."""
from . import ops  # noqa: F401  (registers the ops)
from .activations import ACTIVATIONS  # noqa: F401
from .onnx import ONNX_TRANSLATIONS, onnx_translation  # noqa: F401  (ONNX translations of the ops)
from . import engram, memoryformer  # noqa: F401  (lookup-table ops; after .onnx, which they register with)
