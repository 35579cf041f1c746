"""``attnforge::linear_attention_decode``: one generation step of causal linear attention (the recurrent form).

No rewrite inserts it yet: the generation issue (#15) wires it as the ``linear`` rewrite's cache policy.
"""
from __future__ import annotations

from typing import Optional

import sympy
import torch
from torch import Tensor

from ..registry import Cost, Shaped, Variant, io_bytes, register
from .features import feature_dim, phi


def decode_state(batch: int, heads: int, head_dim: int, feature_map: str, w: Optional[Tensor] = None,
                 dtype=torch.float32, device=None) -> tuple[Tensor, Tensor]:
    """The empty recurrent state (S [B, H, F, D] = 0, z [B, H, F] = 0) of a causal linear attention layer."""
    f = feature_dim(feature_map, head_dim, w)
    return (torch.zeros(batch, heads, f, head_dim, dtype=dtype, device=device),
            torch.zeros(batch, heads, f, dtype=dtype, device=device))


def decode_step(state, z, q, k, v, scale, feature_map, eps, wq, wk):
    """S' = S + φ(k_t)ᵀ v_t,   z' = z + φ(k_t),   o_t = φ(q_t) S' / (φ(q_t)·z' + eps)

    q [B, H, D], k/v [B, Hkv, D], S [B, H, F, D], z [B, H, F]; memory per step is constant (F·D per head).
    Returns (o_t [B, H, D], S', z'). Window-0 layers only: the hybrid would also keep its last w keys.
    """
    groups = q.shape[1] // k.shape[1]
    fq = phi(q[:, :, None], feature_map, scale, wq)[:, :, 0]  # [B, H, F]
    fk = phi(k[:, :, None], feature_map, scale, wk)[:, :, 0]
    if groups > 1:
        fk, v = fk.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    state = state + fk[..., :, None] * v[..., None, :]
    z = z + fk
    num = (fq[..., None, :] @ state)[..., 0, :]
    return num / ((fq * z).sum(-1, keepdim=True) + eps), state, z


def reference(state, z, q, k, v, scale, feature_map, eps, wq, wk):
    """The step by its definition, per head with einsum (the recurrence written out)."""
    h = q.shape[1]
    fq = phi(q[:, :, None], feature_map, scale, wq)[:, :, 0]
    fk = phi(k[:, :, None], feature_map, scale, wk)[:, :, 0].repeat_interleave(h // k.shape[1], 1)
    vv = v.repeat_interleave(h // k.shape[1], 1)
    s_new = state + torch.einsum("bhf,bhd->bhfd", fk, vv)
    z_new = z + fk
    return torch.einsum("bhf,bhfd->bhd", fq, s_new) / (torch.einsum("bhf,bhf->bh", fq, z_new)[..., None] + eps), \
        s_new, z_new


def _fake(state, z, q, k, v, scale, feature_map, eps, wq, wk):
    return q.new_empty((*q.shape[:-1], v.shape[-1])), torch.empty_like(state), torch.empty_like(z)


def cost(state: Shaped, z, q: Shaped, k, v, scale, feature_map, eps, wq, wk):
    b, h, f, d = state.shape
    return Cost(4 * b * h * f * d, io_bytes(state, z, q, k, v) + state.numel() * state.itemsize
                + sympy.Mul(*q.shape) * q.itemsize)


VARIANT = register(Variant(
    name="linear_attention_decode",
    schema="(Tensor state, Tensor z, Tensor q, Tensor k, Tensor v, float scale, str feature_map, float eps, "
           "Tensor? wq, Tensor? wk) -> (Tensor, Tensor, Tensor)",
    reference=reference, cpu=decode_step, fake=_fake, cost=cost,
    waiting="#15 (generation): the linear rewrite's decode step, once the optimized model has a KV cache"))
