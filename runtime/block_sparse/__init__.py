"""``attnforge::block_sparse_attention``: softmax attention over a subset of KV blocks per query block.

Layouts (``layout.py``) are index tables; the PyTorch kernel gathers the named blocks (runtime/blockwise.py), the
Triton kernel visits them (codegen/attention.py, mask kind ``block_sparse``), the reference and the ONNX graph
read the dense mask a table stands for (``layout.dense_block_mask``). Causal sites stay causal on the original
positions; the model's own mask is ANDed in.
"""
from __future__ import annotations

import sympy
from pydantic import Field, model_validator

from ..common import attention_cost, causal_pairs, qkv_inputs, same_as_q
from ..params import Int, Seed, Tokens
from ..registry import Params, Variant, param, register
from .cache import BLOCKS
from .cpu import block_sparse_cpu
from .layout import block_tables, dense_block_mask, static_layout, topk_layout  # noqa: F401
from .onnx import block_sparse_onnx
from .reference import block_sparse_attention as reference


class BlockSparseParams(Params):
    block: Tokens = Field(default=64, gt=0, description="block size (queries and keys)")
    local: Int = Field(default=3, ge=0, description="static: blocks around the diagonal (causal: ending at it)")
    global_: Int = Field(default=1, ge=0, description="static: first blocks every query sees")
    random: Int = Field(default=0, ge=0, description="static: extra seeded random blocks per query block")
    seed: Seed = Field(default=0, description="static: seed of the random blocks")
    topk: Int | None = Field(default=None, ge=1, description="dynamic: KV blocks kept per query block by pooled q·k")

    @model_validator(mode="after")
    def _layout(self):
        if self.topk is None and self.local < 1:
            raise ValueError("a static layout needs local >= 1 (each query block must see its own block)")
        return self


def kept_blocks(block: int, local: int, global_: int, random: int, topk: int, causal: bool) -> int:
    """KV blocks a query block reads, at most."""
    if topk:
        return topk + 2
    return local * (1 if causal else 2) - (0 if causal else 1) + global_ + random


def supports(q, k, v, mask, scale, block, local, global_, random, seed, topk, causal) -> bool:
    """The generated kernel visits blocks of BLOCK_M = BLOCK_N = block: a power of two ≥ 16."""
    return q.dim() == 4 and v.shape[-1] == q.shape[-1] and block >= 16 and block & (block - 1) == 0


def launch_triton(q, k, v, mask, scale, block, local, global_, random, seed, topk, causal, config=None):
    from attnforge.codegen.attention import block_sparse_triton

    counts, idx = block_tables(q, k, block, local, global_, random, seed, topk, scale, causal)
    return block_sparse_triton(q, k, v, mask, scale, counts, idx, block, causal, config=config)


def tunables(args, device, backend) -> list:
    """The generated kernel's warps and stages (the PyTorch kernel has no free parameter: the block is the
    layout's)."""
    if backend != "triton":
        return []
    from attnforge.codegen.attention import spec_for, tunable

    q, k, v, mask, scale, block, *_, causal = args
    spec = spec_for(q, k, scale, mask, mask="block_sparse", causal=causal, block=block)
    return [tunable(spec, q, k, v, mask, lambda c: launch_triton(*args, config=c))]


def cost(q, k, v, mask, scale, block, local, global_, random, seed, topk, causal):
    """At most ``kept_blocks`` KV blocks of ``block`` keys per query (the layout is data: an upper bound)."""
    n = q.shape[-2]
    dense = causal_pairs(n, n) if causal else n * n
    pairs = sympy.Min(dense, n * block * kept_blocks(block, local, global_, random, topk, causal))
    return attention_cost(q, k, v, mask, pairs)


def synthetic(shape, params, dtype, device):
    q, k, v, scale = qkv_inputs("block_sparse_attention", shape, params, dtype, device)
    return (q, k, v, None, scale, param(params, "block", 64), param(params, "local", 3), param(params, "global", 1),
            param(params, "random", 0), 0, param(params, "topk", 0), param(params, "causal", True))


VARIANT = register(Variant(
    name="block_sparse_attention", rewrite="block_sparse", params=BlockSparseParams,
    schema="(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, int block, int local, int global_, int random, "
           "int seed, int topk, bool causal) -> Tensor",
    reference=reference, cpu=block_sparse_cpu, fake=same_as_q, triton=launch_triton, supports=supports, cost=cost,
    synthetic=synthetic, tunables=tunables, onnx=block_sparse_onnx, cache=BLOCKS))
