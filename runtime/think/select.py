"""ThinK's channel selection (Xu et al., 2024, "ThinK: Thinner Key Cache by Query-Driven Pruning"), as
``../shared/REFERENCES.md`` states it after kvpress.

For a prompt of T keys, per KV head g and key channel c (q and k after RoPE):

    score[g, c] = mean over the last w = min(window, T) real queries and the group's query heads of q[h, i, c]²
                  × mean over the prompt's real keys of k[g, j, c]²

and each KV head keeps its D − ⌊D · ratio⌋ best channels (the two halves of a rotary pair are scored apart).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def kept_channels(d: int, ratio: float) -> int:
    """Channels a key keeps: D − ⌊D · ratio⌋."""
    return d - math.floor(d * ratio)


def channel_scores(q: Tensor, k: Tensor, valid: Tensor, window: int) -> Tensor:
    """score [B, Hkv, D] of each key channel of a prompt q [B, H, T, D], k [B, Hkv, T, D], ``valid`` [B, T]."""
    t = q.shape[2]
    dtype = torch.promote_types(q.dtype, torch.float32)
    real = valid.to(dtype)
    last = torch.arange(t, device=q.device) >= t - torch.sym_min(window, t)  # the window's positions [T]
    # the window's real queries: the last ``window`` real tokens (a left-padded row's are its last ones too)
    wq = real * last[None].to(dtype)
    qq = (q.to(dtype) ** 2 * wq[:, None, :, None]).sum(2) / wq.sum(-1).clamp(min=1)[:, None, None]  # [B, H, D]
    b, h, d = qq.shape
    qq = qq.reshape(b, k.shape[1], h // k.shape[1], d).mean(2)
    kk = (k.to(dtype) ** 2 * real[:, None, :, None]).sum(2) / real.sum(-1).clamp(min=1)[:, None, None]
    return qq * kk


def select_channels(q: Tensor, k: Tensor, valid: Tensor, ratio: float, window: int) -> Tensor:
    """The kept channels [B, Hkv, D'] of each KV head, in increasing order."""
    keep = kept_channels(q.shape[-1], ratio)
    return channel_scores(q, k, valid, window).topk(keep, -1).indices.sort(-1).values
