"""The two ways ``streaming_heads`` chooses its retrieval heads on example inputs (the math and the papers:
passes/streaming_heads.py): ``retrieval_scores`` (the ``score`` method: attention mass outside the streaming band)
and ``streaming_distortion`` + ``train_gates`` (the ``optimize`` method: DuoAttention's gates, per site)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from attnforge.codegen import masks
from attnforge.codegen.masks import FLOOR as MASK_FLOOR

STEPS, LR, BETAS, L1 = 300, 0.1, (0.9, 0.9), 1e-3  # the optimize method's Adam steps, lr, betas; λ
ROWS = 512  # query rows scored at a time (memory: one KV head's [B, G, ROWS, M] scores)




def visible(mask: Optional[Tensor], rows: tuple[int, int], m: int, causal: bool, device=None) -> Tensor:
    """Boolean [B|1, H|1, r1 − r0, M]: the keys the queries r0 … r1 − 1 see under the model's ``mask`` (additive:
    above ``MASK_FLOOR``; boolean: kept; broadcastable to [B, H, N, M]) and, when ``causal``, j ≤ i."""
    r0, r1 = rows
    keep = torch.ones(1, 1, r1 - r0, m, dtype=torch.bool, device=device)
    if mask is not None:
        part = mask if mask.shape[-2] == 1 else mask[..., r0:r1, :]
        keep = part if part.dtype == torch.bool else part > MASK_FLOOR
        while keep.dim() < 4:
            keep = keep.unsqueeze(0)
    if causal:
        keep = keep & masks.dense(masks.causal(), r1 - r0, m, offset=r0, device=device)
    return keep


def _four_d(mask: Optional[Tensor]) -> Optional[Tensor]:
    while mask is not None and mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask


def _group(x: Optional[Tensor], g: int, group: int) -> Optional[Tensor]:
    """The query heads g·G … g·G + G − 1 of a [B|1, H|1, ...] tensor (all of it when it has one head)."""
    if x is None or x.shape[1] == 1:
        return x
    return x[:, g * group:(g + 1) * group]


def _work_dtype(x: Tensor):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _blocks(q: Tensor, k: Tensor, mask: Optional[Tensor], scale: float, window: int, sinks: int, causal: bool):
    """Per block of ``ROWS`` query rows and KV head g: (g, the softmax probabilities of full attention of g's query
    heads [B, G, R, M], those under the streaming rule, the visible keys outside the band, the real rows
    [B|1, G|1, R]); memory bounded by one block of one KV head's scores."""
    h, n = q.shape[1], q.shape[2]
    kv, m = k.shape[1], k.shape[2]
    group = h // kv
    for r0 in range(0, n, ROWS):
        r1 = min(n, r0 + ROWS)
        keep = visible(mask, (r0, r1), m, causal, q.device)
        band = masks.dense(masks.sliding_window(window, sinks, causal), r1 - r0, m, offset=r0, device=q.device)
        if n == m:  # a real query sees its own position (padding rows do not)
            i = torch.arange(r1 - r0, device=q.device)
            real = keep[..., i, i + r0]
        else:
            real = keep.any(-1)
        for g in range(kv):
            keep_g, mask_g = _group(keep, g, group), _group(mask, g, group)
            if mask_g is not None and mask_g.shape[-2] != 1:
                mask_g = mask_g[..., r0:r1, :]
            s = (q[:, g * group:(g + 1) * group, r0:r1] @ k[:, g:g + 1].transpose(-1, -2)) * scale
            if mask_g is not None and mask_g.dtype != torch.bool:
                s = s + mask_g.to(s.dtype)
            full = torch.softmax(s.masked_fill(~keep_g, -math.inf), -1).nan_to_num(0.0)
            stream = torch.softmax(s.masked_fill(~(keep_g & band), -math.inf), -1).nan_to_num(0.0)
            yield g, full, stream, keep_g & ~band, _group(real, g, group)


def retrieval_scores(q: Tensor, k: Tensor, mask: Optional[Tensor], scale: float, window: int, sinks: int,
                     causal: bool) -> Tensor:
    """The ``score`` method: per KV head, the mean attention mass its query heads put on visible keys outside the
    sinks + window band (module docstring), over the real rows that see such a key; 0 where no row does.
    q [B, H, N, D], k [B, Hkv, M, D]; ``mask`` the model's (additive or boolean), broadcastable to [B, H, N, M]."""
    dt = _work_dtype(q)
    total, count = torch.zeros(k.shape[1], dtype=dt), torch.zeros(k.shape[1], dtype=dt)
    for g, full, _, far, real in _blocks(q.to(dt), k.to(dt), _four_d(mask), scale, window, sinks, causal):
        mass = (full * far).sum(-1)  # [B, G, R]
        rows = (real & far.any(-1)).expand_as(mass)
        total[g] += mass[rows].sum()
        count[g] += rows.sum()
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def streaming_distortion(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, window: int,
                         sinks: int, causal: bool) -> Tensor:
    """D_g per KV head: mean over its query heads and the real rows of ‖o_stream − o_full‖², divided by the mean
    ‖o_full‖² over all heads and real rows (the relative squared error a streaming head makes on the example)."""
    dt = _work_dtype(q)
    v = v.to(dt)
    err, count = torch.zeros(k.shape[1], dtype=dt), torch.zeros(k.shape[1], dtype=dt)
    norm = torch.zeros((), dtype=dt)
    for g, full, stream, _, real in _blocks(q.to(dt), k.to(dt), _four_d(mask), scale, window, sinks, causal):
        o_full, o_stream = full @ v[:, g:g + 1], stream @ v[:, g:g + 1]
        rows = real.expand(o_full.shape[:-1])
        err[g] += ((o_stream - o_full) ** 2).sum(-1)[rows].sum()
        norm += (o_full ** 2).sum(-1)[rows].sum()
        count[g] += rows.sum()
    per_row = torch.where(count > 0, err / count.clamp(min=1), torch.zeros_like(err))
    mean_square = norm / count.sum() if bool(count.sum() > 0) and bool(norm > 0) else torch.ones((), dtype=dt)
    return per_row / mean_square


def train_gates(distortion: Tensor, steps: int = STEPS, lr: float = LR, l1: float = L1) -> tuple[Tensor, Tensor, float]:
    """The ``optimize`` method's gates α = σ(θ), θ from 0, Adam on Σ_g (1 − α_g)²·D_g + λ·Σ_g α_g;
    (α, θ, final loss). Adam's second-moment decay is 0.9 (not 0.999): the gradient shrinks by orders of magnitude
    as α nears 1, and a long memory of the first steps would stall θ short of its optimum log(2·D/λ − 1)."""
    d = distortion.detach().double()
    theta = torch.zeros_like(d, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr, betas=BETAS)
    with torch.enable_grad():
        for _ in range(steps):
            alpha = torch.sigmoid(theta)
            loss = ((1 - alpha) ** 2 * d).sum() + l1 * alpha.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        alpha = torch.sigmoid(theta)
        return alpha.detach(), theta.detach().clone(), float(((1 - alpha) ** 2 * d).sum() + l1 * alpha.sum())


def top(values: Tensor, count: int, tie: Optional[Tensor] = None) -> list[int]:
    """Indices of the ``count`` largest ``values`` (ties: the larger ``tie``, then the lower index), sorted."""
    keys = [(-float(x), -(float(tie[i]) if tie is not None else 0.0), i) for i, x in enumerate(values)]
    return sorted(i for _, _, i in sorted(keys)[:count])
