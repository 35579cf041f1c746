"""Triton kernel for MemoryFormer's memory layer: sign hash, table gather and weighted sum in one pass.

One program computes a [BLOCK_T tokens, BLOCK_O outputs] tile. For each of the K chunks it reads the
chunk's τ inputs of its tokens one column at a time, building the bucket (idx ← 2·idx + [z ≥ 0], most
significant bit first) and the weight (w ← w / (1 + e^{−2|z|})), then gathers the tokens' rows
T[k·2^τ + idx] restricted to its output columns and accumulates w·row in fp32. Nothing but y is written.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _memory_layer_fwd(X, T, B, Y, n_tokens, n_chunks, d_out, sxt, stt, syt,
                      TAU: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, HAS_BIAS: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    mt, mo = offs_t < n_tokens, offs_o < d_out
    acc = tl.zeros([BLOCK_T, BLOCK_O], tl.float32)
    for k in range(0, n_chunks):
        idx = tl.zeros([BLOCK_T], tl.int64)
        w = tl.full([BLOCK_T], 1.0, tl.float32)
        for j in tl.static_range(TAU):
            z = tl.load(X + offs_t.to(tl.int64) * sxt + k * TAU + j, mask=mt, other=0.0).to(tl.float32)
            idx = idx * 2 + (z >= 0).to(tl.int64)
            w = w / (1.0 + tl.exp(-2.0 * tl.abs(z)))
        rows = k * (1 << TAU) + idx
        t = tl.load(T + rows[:, None] * stt + offs_o[None, :], mask=mt[:, None] & mo[None, :], other=0.0)
        acc += w[:, None] * t.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(B + offs_o, mask=mo, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_t.to(tl.int64)[:, None] * syt + offs_o[None, :], acc.to(Y.dtype.element_ty),
             mask=mt[:, None] & mo[None, :])


def memory_layer_triton(x: torch.Tensor, table: torch.Tensor, bias, tau: int, block_t: int = 32,
                        block_o: int = 64) -> torch.Tensor:
    """y = Σ_k w_k · T[k·2^τ + idx_k] + b for x [..., d], table [d/τ · 2^τ, d_out] (any float dtype)."""
    d, d_out = x.shape[-1], table.shape[1]
    xf = x.reshape(-1, d).contiguous()
    tf = table.contiguous()
    y = torch.empty(xf.shape[0], d_out, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(xf.shape[0], block_t), triton.cdiv(d_out, block_o))
    _memory_layer_fwd[grid](xf, tf, bias if bias is not None else tf, y, xf.shape[0], d // tau, d_out,
                            xf.stride(0), tf.stride(0), y.stride(0),
                            TAU=tau, BLOCK_T=block_t, BLOCK_O=block_o, HAS_BIAS=bias is not None)
    return y.view(*x.shape[:-1], d_out)
