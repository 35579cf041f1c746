"""Linear attention's feature maps φ and what the rewrite computes from example inputs (window weights).

    elu        elu(x) + 1                                            (Katharopoulos et al. 2020)
    relu       relu(x)                                               (Qin et al. 2022, cosFormer's base map)
    cosine     [x/‖x‖, 1]: φ(q)·φ(k) = 1 + cos(q, k) ≥ 0              (Cottention, Mongaras et al. 2024)
    taylor     [1, x', x'_i x'_j (i<j), x'_i²/√2], x' = √scale·x:       (BASED, Arora et al. 2024)
    performer  exp(x'W − ‖x'‖²/2)/√m, W with orthogonal random columns (FAVOR+, Choromanski et al. 2021)
    hedgehog   [softmax(xW_h), softmax(−xW_h)], W_h [D, F] per head     (Hedgehog, Zhang et al. 2024)
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from attnforge.codegen import masks

FEATURE_MAPS = ("elu", "relu", "cosine", "taylor", "performer", "hedgehog")
EXP_KERNELS = ("taylor", "performer")  # maps whose φ(q)·φ(k) estimates exp(scale·q·k) itself


def feature_dim(feature_map: str, head_dim: int, w: Optional[Tensor] = None) -> int:
    """F, the length of φ(x) for a head of ``head_dim``."""
    return {"elu": head_dim, "relu": head_dim, "cosine": head_dim + 1,
            "taylor": 1 + head_dim + head_dim * (head_dim + 1) // 2,
            "performer": w.shape[-1] if w is not None else 0,
            "hedgehog": 2 * w.shape[-1] if w is not None else 0}[feature_map]


def phi(x: Tensor, name: str, scale: float, w: Optional[Tensor] = None) -> Tensor:
    """φ(x) for x [..., H, N, D]; the maps are documented in docs/rewrites/linear.md.

    elu        elu(x) + 1                                            (Katharopoulos et al. 2020)
    relu       relu(x)                                               (Qin et al. 2022, cosFormer's base map)
    cosine     [x/‖x‖, 1]: φ(q)·φ(k) = 1 + cos(q, k) ≥ 0              (Cottention, Mongaras et al. 2024)
    taylor     [1, x', x'_i x'_j (i<j), x'_i²/√2], x' = √scale·x:       (BASED, Arora et al. 2024)
               φ(q)·φ(k) = 1 + u + u²/2, u = scale·q·k
    performer  exp(x'W − ‖x'‖²/2)/√m, x' = √scale·x, W [D, m] with    (FAVOR+, Choromanski et al. 2021)
               orthogonal random columns: E[φ(q)·φ(k)] = exp(scale·q·k)
    hedgehog   [softmax(xW_h), softmax(−xW_h)], W_h [D, F] per head     (Hedgehog, Zhang et al. 2024)
    """
    if name == "elu":
        return F.elu(x).add_(1)  # elu's backward reads its input, not this output
    if name == "relu":
        return F.relu(x)
    if name == "cosine":
        return torch.cat([F.normalize(x, dim=-1), x.new_ones(*x.shape[:-1], 1)], -1)
    if name == "taylor":
        xs = x * math.sqrt(scale)
        i, j = torch.triu_indices(x.shape[-1], x.shape[-1], device=x.device)
        coef = torch.where(i == j, 2 ** -0.5, 1.0).to(x.dtype)
        return torch.cat([x.new_ones(*x.shape[:-1], 1), xs, xs[..., i] * xs[..., j] * coef], -1)
    if name == "performer":
        xs = x * math.sqrt(scale)
        return torch.exp(xs @ w - (xs * xs).sum(-1, keepdim=True) / 2) * w.shape[-1] ** -0.5
    if name == "hedgehog":
        y = x @ w
        return torch.cat([torch.softmax(y, -1), torch.softmax(-y, -1)], -1)
    raise ValueError(f"unknown feature map {name!r}; one of {FEATURE_MAPS}")


def orthogonal_features(head_dim: int, features: int, seed: int) -> Tensor:
    """FAVOR+ projection W [D, m]: blocks of D orthogonal directions with χ(D)-distributed norms (seeded), so
    each column is marginally N(0, I) and the columns within a block are orthogonal (lower variance)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(-(-features // head_dim)):
        g = torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64)
        qmat, r = torch.linalg.qr(g)
        qmat = qmat * torch.sign(torch.diagonal(r))  # a uniformly random rotation
        norms = torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64).norm(dim=0)
        blocks.append(qmat * norms)
    return torch.cat(blocks, 1)[:, :features].float()


def hedgehog_init(heads: int, head_dim: int) -> Tensor:
    """Hedgehog's map weights, one identity matrix per head: [H, D, D]."""
    return torch.eye(head_dim).expand(heads, head_dim, head_dim).clone()


def key_keep(key_mask: Optional[Tensor], b: int, h: int, n: int, dtype) -> Optional[Tensor]:
    """The boolean key mask [.., N] (≤ 3 dims) as 0/1 of ``dtype``, broadcast to [B, H, N]."""
    if key_mask is None:
        return None
    m = key_mask
    while m.dim() < 3:
        m = m.unsqueeze(0)
    return m.to(dtype).expand(b, h, n)


def quadratic_parts(q, k, key_mask, scale, name, causal, window, wq, wk):
    """(φ(Q)φ(K)ᵀ, e^{s − m}, window pairs, other visible pairs) as dense [B, H, N, N] tensors."""
    groups = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(groups, 1)
    a = phi(q, name, scale, wq) @ phi(k, name, scale, wk).repeat_interleave(groups, 1).transpose(-1, -2)
    n, m = q.shape[2], k.shape[2]
    visible = masks.dense(masks.causal() if causal else masks.KEEP_ALL, n, m, offset=m - n, device=q.device)
    if key_mask is not None:
        visible = visible & key_keep(key_mask, *kk.shape[:3], torch.float32)[:, :, None, :].bool()
    band = visible & masks.dense(masks.window(window, causal), n, m, offset=m - n, device=q.device)
    s = ((q @ kk.transpose(-1, -2)) * scale).masked_fill(~band, float("-inf"))
    m = s.amax(-1, keepdim=True)
    e = torch.exp(s - m.masked_fill(m == float("-inf"), 0.0))
    return a, e, band, visible & ~band


@torch.no_grad()
def window_weight(q, k, key_mask, scale, name, causal, window, wq=None, wk=None, rows=256) -> Tensor:
    """Initial log window weights [H] of the hybrid, from example q/k: per head, γ makes the window's total
    softmax weight γ·Σ_win e^{s − m} equal the weight the linear map gives the same pairs, Σ_win φ(q)·φ(k), so
    the window redistributes the linear kernel's mass by exact softmax instead of changing its share. Computed
    on the last ``rows`` queries (the quadratic form)."""
    if name in EXP_KERNELS:
        return q.new_zeros(q.shape[1])
    q = q[..., -rows:, :]
    a, e, band, _ = quadratic_parts(q, k, key_mask, scale, name, causal, window, wq, wk)
    dims = [d for d in range(a.dim()) if d != 1]
    lin, soft = (a * band).sum(dims), (e * band).sum(dims)
    ok = (lin > 0) & (soft > 0)
    return torch.where(ok, lin.clamp_min(1e-30).log() - soft.clamp_min(1e-30).log(), torch.zeros_like(lin))
