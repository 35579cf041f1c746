"""The variant registry (``registry.py``) and one home per variant: a folder ``<variant>/`` (spec, reference, PyTorch
kernel, Triton launcher, ONNX translation), or one module ``<variant>.py`` for a variant that small
(docs/extending.md). Importing this package registers every variant found in it; no list names them."""
import importlib as _importlib
import pkgutil as _pkgutil

from .registry import VARIANTS, Cost, Params, Shaped, Variant, of_op, op_names, register, shaped, variant  # noqa: F401

for _m in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):  # the shared modules import harmlessly
    _importlib.import_module(f"{__name__}.{_m.name}")
