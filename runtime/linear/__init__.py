"""``attnforge::linear_attention``: softmax attention -> normalised linear attention with a feature map φ.

With φ, attention weights φ(q_t)·φ(k_s) replace exp(s·q_t·k_s) and the output is normalised:

    causal:        o_t = φ(q_t) Σ_{s≤t} φ(k_s)ᵀ v_s / (φ(q_t) · Σ_{s≤t} φ(k_s) + eps)
    bidirectional: o_t = φ(q_t) (φ(K)ᵀ V) / (φ(q_t) · Σ_s φ(k_s) + eps)

(Katharopoulos et al. 2020, "Transformers are RNNs"). A key the model's padding mask hides gets φ(k) = 0.
``window > 0`` is the LoLCATs hybrid (Zhang et al. 2024; BASED, Arora et al. 2024, pairs Taylor linear attention
with exact local softmax): keys inside the window get exact softmax weights, the rest linear ones, under one
normaliser with a per-head window weight γ = exp(mix):

    o_t = (γ Σ_win e^{s_ts − m_t} v_s + Σ_rest φ(q_t)·φ(k_s) v_s) / (γ Σ_win e^{s_ts − m_t} + Σ_rest φ(q_t)·φ(k_s) + eps)

with m_t the maximum score over the window. taylor and performer estimate exp(s_ts) itself, so for them the rest
is put on the window's scale, Σ_rest e^{−m_t} φ(q_t)·φ(k_s), and γ = 1.

Files: ``features.py`` (the maps), ``reference.py`` (the quadratic form), ``cpu.py`` (chunked kernels),
``triton.py`` (the fused chunked kernel, window 0), ``onnx.py``, ``cache.py`` (the recurrent state of generation).
"""
from __future__ import annotations

from typing import Literal, Optional

import sympy
import torch
from pydantic import Field, field_validator

from attnforge.errors import AttnforgeError

from ..common import attention_cost, qkv_inputs, same_as_q
from ..params import Float, Int, Seed, Tokens
from ..registry import Cost, Params, Variant, param, register
from . import cpu
from .cache import RECURRENT
from .cpu import CHUNK, hybrid_chunk, linear_attention_cpu
from .features import (EXP_KERNELS, FEATURE_MAPS, feature_dim, hedgehog_init, orthogonal_features,  # noqa: F401
                       phi, window_weight)
from .onnx import linear_attention_onnx
from .reference import linear_attention as reference
from .reference import softmax_attention  # noqa: F401

PERFORMER_FEATURES = 256  # ≈ D·ln D random features for D = 64 (the Performer paper's choice)
PERFORMER_MAX_FEATURES = 2 ** 16  # φ(q), φ(k) hold N × features floats per head: 65536 is already 256 KiB a token


class LinearParams(Params):
    feature_map: Literal["elu", "relu", "cosine", "taylor", "performer", "hedgehog"] = Field(
        description="φ: elu, relu, cosine, taylor (BASED), performer (FAVOR+), hedgehog (learnable)")
    window: Tokens = Field(default=0, ge=0, description="> 0: exact softmax over the last `window` keys, linear "
                                                     "attention over the rest (LoLCATs/BASED hybrid)")
    features: Optional[Int] = Field(default=None, ge=1, le=PERFORMER_MAX_FEATURES, description=f"performer: random "
                                    f"features (default {PERFORMER_FEATURES}, at most {PERFORMER_MAX_FEATURES})")
    seed: Seed = Field(default=0, description="performer: seed of the random features")
    eps: Float = Field(default=1e-6, gt=0, description="added to the normaliser φ(q)·Σφ(k)")

    @field_validator("features")
    @classmethod
    def _performer_only(cls, v, info):
        if v is not None and info.data.get("feature_map") != "performer":
            raise ValueError("features sets the performer's random feature count; it applies to "
                             "feature_map: performer only")
        return v


def flops(n, heads: int, head_dim: int, features: int, causal: bool, window: int = 0, chunk: int = CHUNK):
    """Matmul FLOPs of the kernels at length ``n`` (an int or a sympy symbol): chunk states φ(K)ᵀV₁ and their
    read-out φ(Q)S, plus the intra-chunk tril(φQ φKᵀ)V₁ (causal) or the window views (hybrid)."""
    h, d, f = heads, head_dim, features
    total = 4 * h * n * f * (d + 1)
    if window:
        span = (2 if causal else 3) * hybrid_chunk(chunk, window, n)  # keys one query's window view holds
        total += 2 * h * n * span * (d + f + d + 1)  # scores, φ products in the view, weights·V₁
    elif causal:
        total += 2 * h * n * chunk * (f + d + 1)
    return total


def supports(q, k, v, key_mask, scale, feature_map, causal, window, eps, wq, wk, mix) -> bool:
    """The Triton kernel: window 0, [B, H, N, D], and features that fit its registers (codegen: triton.py)."""
    from .triton import supports as fits

    return window == 0 and q.dim() == 4 and fits(feature_map, feature_dim(feature_map, q.shape[-1], wq))


def launch_triton(q, k, v, key_mask, scale, feature_map, causal, window, eps, wq, wk, mix):
    """elu/relu/cosine fused into the kernel; performer/hedgehog features computed here and passed in."""
    from .triton import linear_attention_triton

    if feature_map in ("elu", "relu", "cosine"):
        return linear_attention_triton(q, k, v, key_mask, feature_map, causal, eps)
    fq, fk = phi(q, feature_map, scale, wq), phi(k, feature_map, scale, wk)
    return linear_attention_triton(fq, fk, v, key_mask, "none", causal, eps)


def tunables(args, device, backend) -> list:
    """The PyTorch kernels' chunk length (the Triton kernel's chunk is its register tile, fixed by the features)."""
    return [] if backend == "triton" else [cpu.tunable(args, device)]


def cost(q, k, v, key_mask, scale, feature_map, causal, window, eps, wq, wk, mix):
    h = q.shape[-3] if q.dim() >= 4 else 1
    b = sympy.Mul(*q.shape[:-3]) if q.dim() >= 4 else q.shape[0]
    d = q.shape[-1]
    f = {"performer": wq.shape[-1] if wq is not None else PERFORMER_FEATURES,
         "hedgehog": 2 * wq.shape[-1] if wq is not None else 2 * d}.get(feature_map) or feature_dim(feature_map, d)
    return Cost(b * flops(q.shape[-2], h, d, f, causal, window), attention_cost(q, k, v, key_mask, 0).bytes)


def synthetic(shape, params, dtype, device):
    q, k, v, scale = qkv_inputs("linear_attention", shape, params, dtype, device)
    fmap = param(params, "feature_map", "elu")
    if fmap in ("performer", "hedgehog"):
        raise AttnforgeError(f"--params feature_map={fmap}: needs learned weights; tune it with --model")
    window = param(params, "window", 0)
    return (q, k, v, None, scale, fmap, param(params, "causal", True), window, 1e-6, None, None,
            torch.zeros(q.shape[1], dtype=dtype, device=device) if window else None)


VARIANT = register(Variant(
    name="linear_attention", rewrite="linear", params=LinearParams,
    schema="(Tensor q, Tensor k, Tensor v, Tensor? key_mask, float scale, str feature_map, bool causal, int window, "
           "float eps, Tensor? wq, Tensor? wk, Tensor? mix) -> Tensor",
    reference=reference, cpu=linear_attention_cpu, fake=same_as_q, triton=launch_triton, supports=supports, cost=cost,
    synthetic=synthetic, tunables=tunables, onnx=linear_attention_onnx, cache=RECURRENT))
