"""``attnforge::memory_layer``: MemoryFormer's memory layer, a linear layer as hashed lookup tables.

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

PyTorch kernel (``cpu.py``): the hash is a few vectorised tensor ops and the gather-accumulate is one
``F.embedding_bag(mode="sum", per_sample_weights=w)`` (no [tokens, K, d_out] intermediate); differentiating it on
the recomputed hash gives exactly the scatter-add and the per-row dot products above. Triton (``triton.py``): one
kernel fusing hash, gather and weighted sum. Reference: ``reference.py``. ONNX: ``onnx.py``.
"""
from __future__ import annotations

from typing import Literal

import sympy
from pydantic import Field, field_validator

from ..params import Float, Int
from ..registry import Cost, Params, Shaped, Variant, io_bytes, register
from .cpu import memory_hash, memory_layer_cpu  # noqa: F401
from .onnx import memory_layer_onnx
from .reference import memory_layer as reference

ROLES = ("up", "gate", "down", "q", "k", "v")


class MemoryFormerParams(Params):
    tau: Int = Field(default=8, ge=1, le=16, description="bits per chunk: K = d/tau chunks, 2^tau rows per table")
    projections: list[Literal["up", "gate", "down", "q", "k", "v"]] = Field(
        default=["up", "gate", "down"], min_length=1,
        description="which projections to replace: FFN up/gate/down, attention q/k/v (a fused qkv projection "
                    "needs all three); the step's targets then filter by module FQN")
    calibrate: bool = Field(default=True, description="refine the tables by least squares on the example inputs")
    steps: Int = Field(default=32, ge=0, description="conjugate-gradient iterations of the refinement")
    ridge: Float = Field(default=1e-2, ge=0, description="λ relative to the mean row weight Σw²: pull towards T_0")

    @field_validator("projections")
    @classmethod
    def _unique(cls, v):
        return list(dict.fromkeys(v))


def _fake(x, table, bias, tau):
    return x.new_empty((*x.shape[:-1], table.shape[1]))


def launch_triton(x, table, bias, tau):
    from .triton import memory_layer_triton

    return memory_layer_triton(x, table, bias, tau)


def cost(x: Shaped, table: Shaped, bias, tau):
    """K·d_out multiply-adds per token (K = d/τ rows summed) plus K·τ for the weights; K rows read per token."""
    tokens, d, d_out = sympy.Mul(*x.shape[:-1]), x.shape[-1], table.shape[1]
    k = d / tau
    out = Shaped((*x.shape[:-1], d_out), x.dtype)
    return Cost(2 * tokens * (k * d_out + k * tau), io_bytes(x, bias, out) + tokens * k * d_out * table.itemsize)


VARIANT = register(Variant(
    name="memory_layer", rewrite="memoryformer", params=MemoryFormerParams,
    schema="(Tensor x, Tensor table, Tensor? bias, int tau) -> Tensor",
    reference=reference, cpu=memory_layer_cpu, fake=_fake, triton=launch_triton,
    supports=lambda x, table, bias, tau: True, cost=cost, onnx=memory_layer_onnx))
