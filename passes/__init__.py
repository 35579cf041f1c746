"""Canonicalisation, one module per rewrite, and the pass manager."""
from . import block_sparse, fuse_attention, fuse_ffn, gqa, linear, sliding_window  # noqa: F401  (register the passes)
from . import engram, memoryformer  # noqa: F401  (register the lookup-table passes)
from .base import REGISTRY, RewritePass  # noqa: F401
from .canonicalize import canonicalize  # noqa: F401
