"""``chunked_attention``: each attention core -> attention inside fixed chunks (approximate; docs/extending.md).

Llama 4's chunked local attention: a query sees only the keys of its own chunk of ``chunk`` tokens (and, causal,
not its future). The op and its kernels: runtime/chunked_attention.py.
"""
from __future__ import annotations

from attnforge.patterns import AttentionSite
from attnforge.runtime.chunked_attention import VARIANT, ChunkedParams

from .base import RewritePass, register
from .fuse_attention import match, needs


def apply(edit, site: AttentionSite, params: ChunkedParams):
    return edit.replace_core(VARIANT.op, site.scale, params.chunk, site.causal)


def describe(site: AttentionSite, params: ChunkedParams) -> dict:
    return {"chunk": params.chunk, "causal": site.causal, "heads": site.num_heads, "kv_heads": site.num_kv_heads}


PASS = register(RewritePass("chunked_attention", "attention", False, match, apply, needs, describe, ChunkedParams))
