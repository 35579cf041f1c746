"""``block_sparse``: attention over a subset of KV blocks per query block (approximate).

Static layout (``topk`` unset): BigBird (Zaheer et al., 2020) — ``local`` blocks around the diagonal,
``global_`` first blocks every query sees, ``random`` seeded blocks. Dynamic layout (``topk``): per
query block the ``topk`` KV blocks with the largest pooled score mean(q)·mean(k), plus the first block
and the diagonal (FlexPrefill, Lai et al. 2025; Quest, Tang et al. 2024). Causal sites stay causal on
the original positions. Layouts are index tables (count + block indices per query block).
"""
from __future__ import annotations

import sympy
import torch
from pydantic import Field, model_validator
from torch.fx import GraphModule

from attnforge.patterns import AttentionSite
from attnforge.patterns.graph import example_size, shape
from attnforge.runtime import sparse

from .base import ParamError, Params, RewritePass, register
from .fuse_attention import match, needs, replace_core

N = sympy.Symbol("N", positive=True, integer=True)


class BlockSparseParams(Params):
    block: int = Field(default=64, gt=0, description="block size (queries and keys)")
    local: int = Field(default=3, ge=0, description="static: blocks around the diagonal (causal: ending at it)")
    global_: int = Field(default=1, ge=0, description="static: first blocks every query sees")
    random: int = Field(default=0, ge=0, description="static: extra seeded random blocks per query block")
    seed: int = Field(default=0, description="static: seed of the random blocks")
    topk: int | None = Field(default=None, ge=1, description="dynamic: KV blocks kept per query block by pooled q·k")

    @model_validator(mode="after")
    def _layout(self):
        if self.topk is None and self.local < 1:
            raise ValueError("a static layout needs local >= 1 (each query block must see its own block)")
        return self


def apply(gm: GraphModule, site: AttentionSite, params: BlockSparseParams) -> list:
    n = example_size(shape(site.q)[-2]) if shape(site.q) else None
    if n is not None and n % params.block:
        raise ParamError("block", f"block {params.block} does not divide the sequence length {n} "
                                  f"of the example inputs at {site.fqn}")
    return replace_core(gm, site, torch.ops.attnforge.block_sparse_attention.default, site.scale, params.block,
                        params.local, params.global_, params.random, params.seed, params.topk or 0, site.causal)


def describe(site: AttentionSite, params: BlockSparseParams) -> dict:
    n = example_size(shape(site.q)[-2]) if shape(site.q) else None
    per_pair = 4 * site.num_heads * site.head_dim
    dense = N * (N + 1) / 2 if site.causal else N ** 2
    b = params.block
    if params.topk:
        kept_blocks = params.topk + 2  # at most, per query block
    else:
        kept_blocks = params.local * (1 if site.causal else 2) - (0 if site.causal else 1) + params.global_ + params.random
    info = {"block": b, "layout": "top-k" if params.topk else "static", "causal": site.causal,
            "flops_before": str(sympy.expand(per_pair * dense)),
            "flops_after_at_most": str(sympy.expand(per_pair * N * kept_blocks * b))}
    if n and not params.topk:
        counts, idx = sparse.static_layout(-(-n // b), params.local, params.global_, params.random, params.seed,
                                           site.causal)
        keep = sparse.dense_block_mask(counts, idx, n, b, site.causal)
        total = n * (n + 1) // 2 if site.causal else n * n
        info.update(example_n=n, kept_fraction=float(keep.sum()) / total,
                    flops_before_at_n=per_pair * total, flops_after_at_n=per_pair * int(keep.sum()))
    elif n:
        info.update(example_n=n, kept_fraction_at_most=min(1.0, kept_blocks * b / n))
    return info


PASS = register(RewritePass("block_sparse", "attention", False, match, needs, apply, describe, BlockSparseParams))
