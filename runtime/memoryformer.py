"""MemoryFormer's memory layer: a linear layer as hashed lookup tables (``attnforge::memory_layer``).

Ding et al., 2024, "MemoryFormer: Minimize Transformer Computation by Removing Fully-Connected Layers"
(NeurIPS 2024). The input z ∈ R^d is cut into K = d/τ chunks z_k of τ dims. Chunk k hashes to the bucket
spelled by its signs, most significant bit first,

    idx_k = Σ_j [z_kj ≥ 0] · 2^{τ−1−j},

and the output sums one table row per chunk, weighted by the paper's bucket confidence:

    y = Σ_k w_k · T[k·2^τ + idx_k] + b,        w_k = Π_j 1 / (1 + e^{−2|z_kj|}),

T ∈ R^{K·2^τ × d_out} being the K tables T_k stacked. Per token: K·d_out multiply-adds (τ times fewer than
the dense d·d_out) plus the hash, and K rows of d_out read from the tables (a dense weight is read once
per batch, the rows are mostly different for every token). The tables hold 2^τ/τ times the dense entries.

Gradients (the sign hash has none): T gets a scatter-add, dT[k·2^τ + idx_k] += w_k·g; the chunk weights
get dw_k = ⟨g, T[row_k]⟩, so z gets dz_kj = dw_k · w_k · 2·sign(z_kj)·(1 − σ(2|z_kj|)) (since
d log σ(x)/dx = 1 − σ(x)); db = Σ g over tokens.

CPU kernel: the hash is a few vectorised tensor ops and the gather-accumulate is one
``F.embedding_bag(mode="sum", per_sample_weights=w)`` (no [tokens, K, d_out] intermediate); its backward
is exactly the scatter-add and the per-row dot products above. CUDA: a Triton kernel fusing hash, gather
and weighted sum (``codegen/memoryformer.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import wants_triton
from .onnx import _ints, onnx_translation


def memory_hash(x: Tensor, tau: int) -> tuple[Tensor, Tensor]:
    """(rows [..., K] int64, w [..., K]) for x [..., d]: each chunk's table row (bucket + k·2^τ) and weight."""
    z = x.unflatten(-1, (x.shape[-1] // tau, tau))
    place = 2 ** torch.arange(tau - 1, -1, -1, device=x.device)  # MSB first
    start = torch.arange(z.shape[-2], device=x.device) * 2 ** tau
    rows = ((z >= 0).long() * place).sum(-1) + start
    w = torch.sigmoid(2 * z.abs()).prod(-1)
    return rows, w


def memory_layer_cpu(x: Tensor, table: Tensor, bias: Optional[Tensor], tau: int) -> Tensor:
    """Σ_k w_k · T[row_k] (+ b) by one weighted ``embedding_bag`` over the K rows of each token."""
    rows, w = memory_hash(x, tau)
    k = rows.shape[-1]
    y = F.embedding_bag(rows.reshape(-1, k), table, per_sample_weights=w.reshape(-1, k).to(table.dtype), mode="sum")
    y = y.view(*x.shape[:-1], table.shape[1]).to(x.dtype)
    return y if bias is None else y + bias


@torch.library.custom_op("attnforge::memory_layer", mutates_args=())
def memory_layer(x: Tensor, table: Tensor, bias: Optional[Tensor], tau: int) -> Tensor:
    """MemoryFormer memory layer: y = Σ_k w_k(z_k) · T[k·2^τ + idx_k] + b (see the module docstring).

    x [..., d] with τ dividing d; table [d/τ · 2^τ, d_out]; bias [d_out] or None.
    Triton (codegen/memoryformer.py): hashing, the weights and the gather-sum in one kernel.
    """
    if wants_triton(x):
        from attnforge.codegen.memoryformer import memory_layer_triton

        return memory_layer_triton(x, table, bias, tau)
    return memory_layer_cpu(x, table, bias, tau)


@memory_layer.register_fake
def _(x, table, bias, tau):
    return x.new_empty((*x.shape[:-1], table.shape[1]))


def _setup(ctx, inputs, output):
    x, table, bias, tau = inputs
    ctx.save_for_backward(x, table)
    ctx.tau, ctx.has_bias = tau, bias is not None


def _backward(ctx, grad):
    """dT by scatter-add of w_k·g, dz through w_k only: embedding_bag's backward on the recomputed hash."""
    x, table = ctx.saved_tensors
    with torch.enable_grad():
        z, t = x.detach().requires_grad_(), table.detach().requires_grad_()
        dx, dt = torch.autograd.grad(memory_layer_cpu(z, t, None, ctx.tau), (z, t), grad)
    db = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return dx, dt, db, None


memory_layer.register_autograd(_backward, setup_context=_setup)


@onnx_translation(torch.ops.attnforge.memory_layer.default)
def memory_layer_onnx(op, x, table, bias, tau):
    """Sign bits (GreaterOrEqual, Cast) weighted by powers of two and summed to rows, Gather of the rows,
    ReduceSum of the rows times ReduceProd(Sigmoid(2|z|)). Needs a static feature dim."""
    d = x.shape[-1]
    if not isinstance(d, int):
        raise ValueError("memory_layer exports with a static feature dim")
    k = d // tau
    z = op.Reshape(x, op.Concat(op.Shape(x, end=-1), _ints(op, k, tau), axis=0))
    bits = op.Cast(op.GreaterOrEqual(z, op.CastLike(op.Constant(value_float=0.0), x)), to=7)  # 7: INT64
    place = _ints(op, *[2 ** (tau - 1 - j) for j in range(tau)])
    last = _ints(op, -1)
    rows = op.Add(op.ReduceSum(op.Mul(bits, place), last, keepdims=0), _ints(op, *[i * 2 ** tau for i in range(k)]))
    w = op.ReduceProd(op.Sigmoid(op.Mul(op.Abs(z), op.CastLike(op.Constant(value_float=2.0), x))), last, keepdims=0)
    picked = op.Gather(table, rows, axis=0)  # [..., K, d_out]
    y = op.ReduceSum(op.Mul(picked, op.Unsqueeze(op.CastLike(w, table), last)), _ints(op, -2), keepdims=0)
    y = op.CastLike(y, x)
    return y if bias is None else op.Add(y, op.CastLike(bias, x))
