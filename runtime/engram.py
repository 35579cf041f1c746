"""Engram's hashed N-gram lookup (``attnforge::engram_embed``) and the module holding an insertion's weights.

Cheng et al., 2026 (DeepSeek-AI), "Conditional Memory via Scalable Lookup: A New Axis of Sparsity for
Large Language Models". For token ids x_t and each N-gram order n, the last n ids are mixed with odd
int64 multipliers m_k drawn per layer,

    mix_n(t) = (x_t·m_0) XOR (x_{t−1}·m_1) XOR … XOR (x_{t−n+1}·m_{n−1}),   x_{t−k} = pad for t − k < 0,

and hash head j of order n reads table row mix_n(t) mod p_{n,j} + offset_{n,j}, the p_{n,j} being distinct
primes ≥ the table size and the offsets their running sum (one table, one segment per head). The rows of
all heads, concatenated, are e_t ∈ R^{H·dim}. The multipliers are below (2^63 − 1)/vocab, so no product
overflows and every kernel (PyTorch, Triton, ONNX) computes the same integers as a plain Python reference.

Addressing depends on the ids only, so the rows can be fetched before the layer runs: the rewrite places
the lookup at the start of the graph, and with ``offload="cpu"`` the table stays in host memory
(``EngramMemory`` keeps it there through ``model.to(device)``) and only the gathered rows are copied over.
"""
from __future__ import annotations

import math
from typing import List

import numpy as np
import sympy
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dispatch import wants_triton
from .onnx import _ints, onnx_translation

LAYER_SEED_STRIDE = 10007  # the Engram demo's per-layer seed step (seed + 10007·layer)


def engram_multipliers(vocab: int, max_n: int, seed: int, layer: int) -> list[int]:
    """Odd multipliers m_0..m_{max_n−1} for ``layer``, each < (2^63 − 1) // vocab so x·m cannot overflow."""
    half_bound = max(1, (2 ** 63 - 1) // vocab // 2)
    rng = np.random.default_rng(seed + LAYER_SEED_STRIDE * layer)
    return [int(r) * 2 + 1 for r in rng.integers(0, half_bound, size=max_n, dtype=np.int64)]


def engram_primes(table_size: int, count: int, skip: int = 0) -> list[int]:
    """The primes ≥ ``table_size`` numbered skip .. skip + count − 1 (so layers that skip different ranges
    never share a modulus)."""
    out, p = [], table_size - 1
    for i in range(skip + count):
        p = int(sympy.nextprime(p))
        if i >= skip:
            out.append(p)
    return out


def _offsets(primes: List[int]) -> list[int]:
    return [0] + np.cumsum(primes[:-1], dtype=np.int64).tolist()


def engram_rows(ids: Tensor, multipliers: List[int], ngram: List[int], heads: int, primes: List[int],
                pad_id: int) -> Tensor:
    """Table rows [..., N, H] (H = len(ngram)·heads, per-head offsets added) of the hashed N-grams of ``ids``."""
    x = ids.long()
    n_ctx = x.shape[-1]
    shifted = [x] + [F.pad(x, (k, 0), value=pad_id)[..., :n_ctx] for k in range(1, max(ngram))]
    offsets = _offsets(primes)
    out = []
    for i, n in enumerate(ngram):
        mix = shifted[0] * multipliers[0]
        for k in range(1, n):
            mix = mix ^ (shifted[k] * multipliers[k])
        heads_of_n = slice(i * heads, (i + 1) * heads)
        p = torch.tensor(primes[heads_of_n], device=x.device)
        out.append(mix[..., None] % p + torch.tensor(offsets[heads_of_n], device=x.device))
    return torch.cat(out, -1)


def engram_embed_cpu(ids, table, multipliers, ngram, heads, primes, pad_id):
    """Hash on the ids' device, gather on the table's, result on the ids' device: [..., N, H·dim]."""
    rows = engram_rows(ids, multipliers, ngram, heads, primes, pad_id).to(table.device)
    e = F.embedding(rows, table).flatten(-2)
    return e.to(ids.device, non_blocking=True)


@torch.library.custom_op("attnforge::engram_embed", mutates_args=())
def engram_embed(ids: Tensor, table: Tensor, multipliers: List[int], ngram: List[int], heads: int,
                 primes: List[int], pad_id: int) -> Tensor:
    """Engram's multi-head hashed N-gram embedding e_t (see the module docstring): ids [B, N] -> [B, N, H·dim].

    ``ngram``: the N-gram orders; ``heads``: hash heads per order; ``primes``: one modulus per head (order-major);
    ``table``: [Σ primes, dim], head h's segment starting at Σ_{h'<h} primes[h'].
    CUDA ids with the table in host memory (offloaded): rows gathered on the host, only they are copied over.
    """
    if ids.is_cuda and table.device.type == "cpu":
        return _offloaded(ids, table, multipliers, ngram, heads, primes, pad_id)
    if wants_triton(ids) and table.device == ids.device:
        from attnforge.codegen.engram import engram_embed_triton

        return engram_embed_triton(ids, table, multipliers, ngram, heads, primes, pad_id)
    return engram_embed_cpu(ids, table, multipliers, ngram, heads, primes, pad_id)


@engram_embed.register_fake
def _(ids, table, multipliers, ngram, heads, primes, pad_id):
    return table.new_empty((*ids.shape, len(ngram) * heads * table.shape[1]), device=ids.device)


def _setup(ctx, inputs, output):
    ids, table, multipliers, ngram, heads, primes, pad_id = inputs
    ctx.save_for_backward(ids)
    ctx.hash = (multipliers, ngram, heads, primes, pad_id)
    ctx.table = (table.shape, table.dtype, table.device)


def _backward(ctx, grad):
    """Only the table is trainable: dT[row] += g (a scatter-add of each head's slice of the gradient)."""
    (ids,) = ctx.saved_tensors
    shape, dtype, device = ctx.table
    rows = engram_rows(ids, *ctx.hash).to(device)
    g = grad.reshape(-1, shape[1]).to(device=device, dtype=dtype)
    return None, torch.zeros(shape, dtype=dtype, device=device).index_add_(0, rows.flatten(), g), \
        None, None, None, None, None


engram_embed.register_autograd(_backward, setup_context=_setup)


def _offloaded(ids, table, multipliers, ngram, heads, primes, pad_id):
    """Gather in pinned host memory, copy only the picked rows to the GPU."""
    rows = engram_rows(ids.cpu(), multipliers, ngram, heads, primes, pad_id)
    staged = torch.empty((*rows.shape, table.shape[1]), dtype=table.dtype, pin_memory=True)
    torch.index_select(table, 0, rows.flatten(), out=staged.view(-1, table.shape[1]))
    return staged.flatten(-2).to(ids.device, non_blocking=True)


@onnx_translation(torch.ops.attnforge.engram_embed.default)
def engram_embed_onnx(op, ids, table, multipliers, ngram, heads, primes, pad_id):
    """int64 Pad/Slice (shifts), Mul, BitwiseXor, Mod and Add (rows), then one Gather from the table."""
    x = op.Cast(ids, to=7)  # 7: INT64
    n_ctx = op.Shape(x, start=-1)
    pad = op.Constant(value_int=pad_id)
    shifted = [x] + [op.Slice(op.Pad(x, op.Concat(_ints(op, *[0] * (len(ids.shape) - 1), k),
                                                  _ints(op, *[0] * len(ids.shape)), axis=0), pad),
                              _ints(op, 0), n_ctx, _ints(op, -1)) for k in range(1, max(ngram))]
    offsets, rows = _offsets(primes), []
    for i, n in enumerate(ngram):
        mix = op.Mul(shifted[0], op.Constant(value_int=multipliers[0]))
        for k in range(1, n):
            mix = op.BitwiseXor(mix, op.Mul(shifted[k], op.Constant(value_int=multipliers[k])))
        heads_of_n = slice(i * heads, (i + 1) * heads)
        rows.append(op.Add(op.Mod(op.Unsqueeze(mix, _ints(op, -1)), _ints(op, *primes[heads_of_n])),
                           _ints(op, *offsets[heads_of_n])))
    picked = op.Gather(table, op.Concat(*rows, axis=-1), axis=0)  # [..., N, H, dim]
    width = len(ngram) * heads * table.shape[1]
    return op.Reshape(picked, op.Concat(op.Shape(x), _ints(op, width), axis=0))


class EngramMemory(nn.Module):
    """The weights of one Engram insertion (all trainable, every name containing ``engram`` once registered):

    ``table`` [Σ primes, dim] (N(0, 1), as nn.Embedding), ``key`` W_K [d, H·dim] (nn.Linear's init),
    ``value`` W_V [d, H·dim] (zero: the inserted model equals the original until trained), ``key_norm`` and
    ``hidden_norm`` (RMSNorm gains, one). The hash constants are plain attributes.
    ``offload="cpu"``: ``model.to(...)`` changes the table's dtype but leaves it in host memory.
    """

    def __init__(self, d_model: int, dim: int, ngram: list[int], heads: int, primes: list[int],
                 multipliers: list[int], pad_id: int, seed: int, offload: str = "none"):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        width = len(ngram) * heads * dim
        self.table = nn.Parameter(torch.randn(sum(primes), dim, generator=gen))
        bound = 1 / math.sqrt(width)
        self.key = nn.Parameter(torch.rand(d_model, width, generator=gen) * 2 * bound - bound)
        self.value = nn.Parameter(torch.zeros(d_model, width))
        self.key_norm = nn.Parameter(torch.ones(d_model))
        self.hidden_norm = nn.Parameter(torch.ones(d_model))
        self.ngram, self.heads, self.primes, self.multipliers, self.pad_id = ngram, heads, primes, multipliers, pad_id
        self.offload = offload

    def _apply(self, fn, recurse=True):
        if self.offload != "cpu":
            return super()._apply(fn, recurse)
        table = self._parameters["table"]
        self._parameters["table"] = None  # nn.Module._apply skips None entries
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["table"] = table
        dtype = fn(torch.empty(0, dtype=table.dtype)).dtype  # what the conversion does to a dtype, without moving
        if dtype != table.dtype:
            table.data = table.data.to(dtype)
        return self

    def extra_repr(self) -> str:
        return (f"ngram={self.ngram}, heads={self.heads}, dim={self.table.shape[1]}, rows={self.table.shape[0]}, "
                f"offload={self.offload!r}")
