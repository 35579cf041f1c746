"""The plain definitions: linear attention in its quadratic form, and the softmax layer a linear site replaced."""
from __future__ import annotations

import torch

from attnforge.codegen import masks

from ..common import dense_attention, repeat_heads
from .features import EXP_KERNELS, key_keep, phi


def linear_attention(q, k, v, key_mask, scale, feature_map, causal, window, eps, wq, wk, mix):
    """Normalised linear attention, written as the dense [N, N] weight matrix it stands for:

        window 0:  W = φ(Q)φ(K)ᵀ on the visible pairs,   o = W V / (rowsum W + eps)
        window w:  W = γ·e^{s − m} in the window + φ(q)·φ(k) outside it (× e^{−m} for the maps that estimate
                   exp(s): taylor, performer), γ = exp(mix) per head, m the row's max score in the window.

    Visible: j ≤ i when causal, and the keys ``key_mask`` keeps (hidden keys get φ(k) = 0)."""
    h = q.shape[1]
    fq, fk = phi(q, feature_map, scale, wq), repeat_heads(phi(k, feature_map, scale, wk), h)
    a = fq @ fk.transpose(-1, -2)
    n, m = q.shape[2], k.shape[2]
    visible = masks.dense(masks.causal() if causal else masks.KEEP_ALL, n, m, offset=m - n, device=q.device)
    if key_mask is not None:
        visible = visible & key_keep(key_mask, q.shape[0], h, m, torch.float32)[:, :, None, :].bool()
    band = visible & masks.dense(masks.window(window, causal), n, m, offset=m - n, device=q.device)
    weight = a * (visible & ~band)
    if window:
        s = ((q @ repeat_heads(k, h).transpose(-1, -2)) * scale).masked_fill(~band, float("-inf"))
        top = s.amax(-1, keepdim=True)
        top = top.masked_fill(top == float("-inf"), 0.0)
        if feature_map in EXP_KERNELS:
            weight = weight * torch.exp(-top)
        gamma = torch.exp(q.new_zeros(h) if mix is None else mix).to(q.dtype)[None, :, None, None]
        weight = weight + gamma * torch.exp(s - top)
    vv = repeat_heads(v, h)
    return (weight @ vv) / (weight.sum(-1, keepdim=True) + eps)


def softmax_attention(q, k, v, key_mask, scale, causal):
    """softmax(scale·q kᵀ) v over the keys ``key_mask`` keeps (and j ≤ i when causal): the layer a linear site
    replaced, rebuilt from the op's own arguments (calibration targets). Rows with no visible key give 0."""
    n, m = q.shape[-2], k.shape[-2]
    keep = masks.dense(masks.causal() if causal else masks.KEEP_ALL, n, m, device=q.device)
    if key_mask is not None:
        km = key_mask
        while km.dim() < q.dim() - 1:
            km = km.unsqueeze(0)
        keep = keep & km.unsqueeze(-2)
    return dense_attention(q, k, v, None, scale, keep)
