"""Canonicalisation, one module per rewrite, and the pass manager. Importing this package registers every rewrite
module found in it (no list names them)."""
import importlib as _importlib
import pkgutil as _pkgutil

from .base import REGISTRY, RewritePass  # noqa: F401
from .canonicalize import canonicalize  # noqa: F401

for _m in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _importlib.import_module(f"{__name__}.{_m.name}")
