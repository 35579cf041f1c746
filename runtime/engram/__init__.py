"""``attnforge::engram_embed``: Engram's multi-head hashed N-gram embedding, and the module holding an insertion.

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

from typing import Literal

import sympy
import torch
from pydantic import Field, field_validator

from ..params import Float, Int, Integer, Seed
from ..registry import Cost, Params, Shaped, Variant, io_bytes, register
from .cpu import engram_embed_cpu
from .hashing import LAYER_SEED_STRIDE, engram_multipliers, engram_primes, engram_rows, offsets  # noqa: F401
from .memory import EngramMemory  # noqa: F401
from .onnx import engram_embed_onnx


MAX_ORDER = 32  # the kernels read n ids per position for order n (the Triton kernel unrolls that loop)
MAX_HASH_HEADS = 65535  # the Triton kernel runs one program per hash head on the grid's third axis (CUDA: 65535)
MAX_DIM = 16384  # one Triton program holds 64 positions × dim (rounded up to a power of two) values: 2**20 at most
MAX_TABLE_BYTES = 64 * 2 ** 30  # one insertion's table, float32: Σ primes (≈ hash heads × table_size) × dim × 4


class EngramParams(Params):
    ngram: list[Int] = Field(default=[2, 3], min_length=1, description=f"N-gram orders (each 1 to {MAX_ORDER})")
    heads: Int = Field(default=4, ge=1, description=f"hash heads per order (all orders: at most {MAX_HASH_HEADS})")
    dim: Int = Field(default=16, ge=1, le=MAX_DIM, description="embedding width of each head")
    table_size: Integer = Field(default=10007, ge=2, description="rows per head: the heads' moduli are distinct "
                                f"primes ≥ this (the whole table: at most {MAX_TABLE_BYTES // 2 ** 30} GiB)")
    layers: list[Int] | None = Field(default=None, description="layer indices (graph order, negative from the end); "
                                                                "absent: every layer the step's targets select")
    pad_id: Int = Field(default=0, ge=0, description="token id used for positions before the start")
    seed: Seed = Field(default=0, description="seeds the multipliers (seed + 10007·layer) and the initial weights")
    offload: Literal["none", "cpu"] = Field(default="none", description="cpu: tables stay in host memory")
    eps: Float = Field(default=1e-6, gt=0, description="RMSNorm epsilon")

    @field_validator("ngram")
    @classmethod
    def _orders(cls, v):
        if any(n < 1 for n in v) or len(set(v)) != len(v):
            raise ValueError("N-gram orders must be distinct and ≥ 1")
        if max(v) > MAX_ORDER:
            raise ValueError(f"N-gram orders must be at most {MAX_ORDER}")
        return v

    @field_validator("heads")
    @classmethod
    def _hash_heads(cls, v, info):
        orders = len(info.data.get("ngram") or [1])
        if orders * v > MAX_HASH_HEADS:
            raise ValueError(f"{orders} orders × {v} heads is {orders * v} hash heads; the kernels take at most "
                             f"{MAX_HASH_HEADS}")
        return v

    @field_validator("table_size")
    @classmethod
    def _table_bytes(cls, v, info):
        if not {"ngram", "heads", "dim"} <= set(info.data):
            return v  # an earlier field is invalid and reported
        hash_heads, dim = len(info.data["ngram"]) * info.data["heads"], info.data["dim"]
        need = hash_heads * v * dim * 4
        if need > MAX_TABLE_BYTES:
            raise ValueError(f"the table would take about {need / 2 ** 30:,.0f} GiB ({need} bytes: {hash_heads} "
                             f"hash heads × {v} rows × dim {dim} × 4 bytes) per layer; at most "
                             f"{MAX_TABLE_BYTES // 2 ** 30} GiB ({MAX_TABLE_BYTES} bytes)")
        return v


def reference(ids, table, multipliers, ngram, heads, primes, pad_id):
    """The rows by the definition, in Python integers (XOR of id·multiplier products, mod each head's prime, plus
    the head's offset), then gathered: [..., N, H·dim]."""
    flat = ids.reshape(-1, ids.shape[-1]).tolist()
    starts, out = offsets(primes), []
    for seq in flat:
        rows = []
        for t in range(len(seq)):
            row = []
            for i, n in enumerate(ngram):
                mix = 0
                for k in range(n):
                    mix ^= (seq[t - k] if t - k >= 0 else pad_id) * multipliers[k]
                row += [mix % primes[i * heads + j] + starts[i * heads + j] for j in range(heads)]
            rows.append(row)
        out.append(rows)
    idx = torch.tensor(out, dtype=torch.long).view(*ids.shape, -1)
    return table[idx.to(table.device)].flatten(-2).to(ids.device)


def _fake(ids, table, multipliers, ngram, heads, primes, pad_id):
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


def supports(ids, table, *rest) -> bool:
    """The Triton kernel gathers from a table on the ids' device (an offloaded table takes the host path)."""
    return table.device == ids.device


def launch_triton(ids, table, multipliers, ngram, heads, primes, pad_id):
    from .triton import engram_embed_triton

    return engram_embed_triton(ids, table, multipliers, ngram, heads, primes, pad_id)


def cost(ids: Shaped, table: Shaped, multipliers, ngram, heads, primes, pad_id):
    """No multiply-adds (integer hashing and a gather); bytes: the ids, the gathered rows and the output."""
    tokens = sympy.Mul(*ids.shape)
    width = len(ngram) * heads * table.shape[1]
    return Cost(sympy.Integer(0), io_bytes(ids) + 2 * tokens * width * table.itemsize)


VARIANT = register(Variant(
    name="engram_embed", rewrite="engram", params=EngramParams,
    schema="(Tensor ids, Tensor table, int[] multipliers, int[] ngram, int heads, int[] primes, int pad_id) -> Tensor",
    reference=reference, cpu=engram_embed_cpu, fake=_fake, backward=(_backward, _setup), triton=launch_triton,
    supports=supports, cost=cost, onnx=engram_embed_onnx))
