"""Canonicalisation, one module per rewrite, and the pass manager."""
from . import fuse_attention, fuse_ffn  # noqa: F401  (register the passes)
from .base import REGISTRY, RewritePass  # noqa: F401
from .canonicalize import canonicalize  # noqa: F401
