"""``fuse_attention``: each attention core -> one ``attnforge::attention`` call (exact).

The eager chain softmax(s·q kᵀ + M) v is folded into the op's (scale, mask); repeated K/V heads
(``repeat_kv``) are dropped so the op reads the Hkv heads directly (grouped-query attention).
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from attnforge.patterns import AttentionSite, match_attention
from attnforge.runtime import Shaped
from attnforge.runtime.attention import VARIANT

from .base import RewritePass, register


def match(gm: GraphModule):
    return match_attention(gm.graph)


def needs(site: AttentionSite) -> list:
    """q, k, v, the output and the mask pieces: what every attention rewrite reads."""
    return [site.q, site.k, site.v, site.out] + [p[0] for p in site.mask_parts]


def apply(edit, site: AttentionSite, params, q=None, k=None, v=None):
    return edit.replace_core(VARIANT.op, site.scale, site.sdpa_causal, site.dropout_p, site.softcap, q=q, k=k, v=v)


def site_flops(site: AttentionSite, variant, n, *op_args):
    """FLOPs of ``variant``'s op on this site for one sequence of length ``n`` (an int or a sympy symbol), from the
    variant's own cost formula; ``op_args`` are the op's arguments after (q, k, v, mask, scale)."""
    q = Shaped((1, site.num_heads, n, site.head_dim), torch.float32)
    k = Shaped((1, site.num_kv_heads, n, site.head_dim), torch.float32)
    return variant.cost(q, k, k, None, site.scale, *op_args).flops


def dense_flops(site: AttentionSite, n):
    """FLOPs of the exact attention core this site had (causal cores skip the future)."""
    return site_flops(site, VARIANT, n, site.causal, 0.0)


def describe(site: AttentionSite, params=None) -> dict:
    return {"heads": site.num_heads, "kv_heads": site.num_kv_heads, "head_dim": site.head_dim,
            "scale": site.scale, "causal": site.causal, "masked": bool(site.mask_parts),
            "projections": dict(site.proj), "rope": site.rope is not None}


PASS = register(RewritePass("fuse_attention", "attention", True, match, apply, needs, describe))
