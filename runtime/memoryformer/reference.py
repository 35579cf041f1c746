"""The plain definition of ``attnforge::memory_layer``: chunk by chunk, bits by bits."""
from __future__ import annotations

import torch


def memory_layer(x, table, bias, tau: int):
    """y = Σ_k w_k · T[k·2^τ + idx_k] + b,  idx_k = Σ_j [z_kj ≥ 0]·2^{τ−1−j},  w_k = Π_j σ(2|z_kj|)
    (MemoryFormer, Ding et al. 2024), with the K = d/τ chunks z_k of x."""
    d = x.shape[-1]
    y = torch.zeros(*x.shape[:-1], table.shape[1], dtype=torch.float64, device=x.device)
    for k in range(d // tau):
        z = x[..., k * tau:(k + 1) * tau].double()
        idx = sum((z[..., j] >= 0).long() << (tau - 1 - j) for j in range(tau))
        w = torch.ones_like(z[..., 0])
        for j in range(tau):
            w = w * torch.sigmoid(2 * z[..., j].abs())
        y = y + w[..., None] * table.double()[k * 2 ** tau + idx]
    y = y.to(x.dtype)
    return y if bias is None else y + bias
