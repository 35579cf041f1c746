"""Custom ops (``torch.ops.attnforge.*``) and their CPU kernels."""
from . import ops  # noqa: F401  (registers the ops)
from .activations import ACTIVATIONS  # noqa: F401
