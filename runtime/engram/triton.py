"""Triton kernel for Engram's lookup: N-gram hash and table gather fused.

One program handles BLOCK_T positions of one sequence for one hash head. It loads the ids x_{t−k}
(k < n, the pad id before the start), mixes them as (x_t·m_0) XOR (x_{t−1}·m_1) XOR … in int64, reduces
modulo the head's prime, adds the head's offset, gathers those rows of the table and writes them into
the head's slice of e_t. The ids are read straight from the input, no row indices reach memory.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _engram_embed_fwd(IDS, TABLE, OUT, MULT, ORDER, PRIMES, OFFSETS, n_ctx, pad_id, sib, sit, stt, sob, sot,
                      MAX_N: tl.constexpr, DIM: tl.constexpr, DIM_P: tl.constexpr, BLOCK_T: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    b = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2)
    mt = offs_t < n_ctx
    n = tl.load(ORDER + head)
    mix = tl.zeros([BLOCK_T], tl.int64)
    for k in tl.static_range(MAX_N):
        pos = offs_t - k
        x = tl.load(IDS + b * sib + pos * sit, mask=mt & (pos >= 0), other=0).to(tl.int64)
        x = tl.where(pos >= 0, x, pad_id)
        term = x * tl.load(MULT + k)
        if k == 0:
            mix = term
        else:
            mix = tl.where(k < n, mix ^ term, mix)
    rows = mix % tl.load(PRIMES + head) + tl.load(OFFSETS + head)
    offs_d = tl.arange(0, DIM_P)
    m2 = mt[:, None] & (offs_d < DIM)[None, :]
    e = tl.load(TABLE + rows[:, None] * stt + offs_d[None, :], mask=m2, other=0.0)
    tl.store(OUT + b * sob + offs_t.to(tl.int64)[:, None] * sot + head * DIM + offs_d[None, :], e, mask=m2)


def engram_embed_triton(ids, table, multipliers, ngram, heads, primes, pad_id, block_t: int = 64):
    """[B, N] ids -> [B, N, len(ngram)·heads·dim] rows of ``table`` (see ``runtime/engram/hashing.py`` for the hash)."""
    from .hashing import offsets as _offsets

    ids2 = ids.reshape(-1, ids.shape[-1])
    bsz, n_ctx = ids2.shape
    dim, n_heads = table.shape[1], len(ngram) * heads
    dev = ids.device

    def tensor(values):
        return torch.tensor(values, dtype=torch.int64, device=dev)

    order = tensor([n for n in ngram for _ in range(heads)])
    out = torch.empty(bsz, n_ctx, n_heads * dim, dtype=table.dtype, device=dev)
    tc = table.contiguous()
    grid = (triton.cdiv(n_ctx, block_t), bsz, n_heads)
    _engram_embed_fwd[grid](ids2, tc, out, tensor(multipliers), order, tensor(primes), tensor(_offsets(primes)),
                            n_ctx, pad_id, ids2.stride(0), ids2.stride(1), tc.stride(0), out.stride(0), out.stride(1),
                            MAX_N=max(ngram), DIM=dim, DIM_P=triton.next_power_of_2(dim), BLOCK_T=block_t)
    return out.view(*ids.shape, n_heads * dim)
