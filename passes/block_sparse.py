"""``block_sparse``: attention over a subset of KV blocks per query block (approximate).

Static layout (``topk`` unset): BigBird (Zaheer et al., 2020) — ``local`` blocks around the diagonal,
``global_`` first blocks every query sees, ``random`` seeded blocks. Dynamic layout (``topk``): per
query block the ``topk`` KV blocks with the largest pooled score mean(q)·mean(k), plus the first block
and the diagonal (FlexPrefill, Lai et al. 2025; Quest, Tang et al. 2024). Causal sites stay causal on
the original positions. Layouts and kernels: runtime/block_sparse/.
"""
from __future__ import annotations

import sympy

from attnforge.patterns import AttentionSite
from attnforge.patterns.graph import example_size, shape
from attnforge.runtime.block_sparse import VARIANT, BlockSparseParams, dense_block_mask, kept_blocks, static_layout

from .base import ParamError, RewritePass, register
from .fuse_attention import dense_flops, match, needs

N = sympy.Symbol("N", positive=True, integer=True)


def apply(edit, site: AttentionSite, params: BlockSparseParams):
    n = example_size(shape(site.q)[-2]) if shape(site.q) else None
    if n is not None and n % params.block:
        raise ParamError("block", f"block {params.block} does not divide the sequence length {n} "
                                  f"of the example inputs at {site.fqn}")
    return edit.replace_core(VARIANT.op, site.scale, params.block, params.local, params.global_, params.random,
                             params.seed, params.topk or 0, site.causal)


def describe(site: AttentionSite, params: BlockSparseParams) -> dict:
    n = example_size(shape(site.q)[-2]) if shape(site.q) else None
    per_pair = 4 * site.num_heads * site.head_dim  # q·k and p·v multiply-adds of one visible pair, as FLOPs
    b = params.block
    blocks = kept_blocks(b, params.local, params.global_, params.random, params.topk or 0, site.causal)
    info = {"block": b, "layout": "top-k" if params.topk else "static", "causal": site.causal,
            "flops_before": str(sympy.expand(dense_flops(site, N))),
            "flops_after_at_most": str(sympy.expand(per_pair * N * blocks * b))}
    if n and not params.topk:  # the layout is data: count its pairs at the example length
        counts, idx = static_layout(-(-n // b), params.local, params.global_, params.random, params.seed,
                                    site.causal)
        keep = dense_block_mask(counts, idx, n, b, site.causal)
        total = n * (n + 1) // 2 if site.causal else n * n
        info.update(example_n=n, kept_fraction=float(keep.sum()) / total,
                    flops_before_at_n=int(dense_flops(site, n)), flops_after_at_n=per_pair * int(keep.sum()))
    elif n:
        info.update(example_n=n, kept_fraction_at_most=min(1.0, blocks * b / n))
    return info


PASS = register(RewritePass("block_sparse", "attention", False, match, apply, needs, describe, BlockSparseParams))
