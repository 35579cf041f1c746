"""The PyTorch kernel of ``attnforge::attention``: SDPA, one call per position of a GQA group (no K/V repeat)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from attnforge.codegen import masks


def attention_cpu(q, k, v, mask, scale, causal, dropout_p):
    if causal and mask is not None:  # SDPA takes one or the other: fold causality into the mask
        keep = masks.dense(masks.causal(), q.shape[-2], k.shape[-2], device=q.device)
        mask = mask & keep if mask.dtype == torch.bool else mask.masked_fill(~keep, float("-inf"))
        causal = False
    squeeze = q.dim() == 3
    if squeeze:  # [B*H, N, D] spellings (bmm-based attention)
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        if mask is not None and mask.dim() == 3:
            mask = mask.unsqueeze(0)
    heads, kv_heads = q.shape[-3], k.shape[-3]
    if heads == kv_heads:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                             is_causal=causal, scale=scale)
    else:
        out = _grouped(q, k, v, mask, scale, causal, dropout_p, heads // kv_heads)
    return out.squeeze(0) if squeeze else out


def _grouped(q, k, v, mask, scale, causal, dropout_p, groups):
    """GQA without repeating k/v: one SDPA call per position inside a group of query heads."""
    kv_heads = k.shape[-3]
    qg = q.unflatten(-3, (kv_heads, groups))  # [..., Hkv, G, N, D]
    per_head_mask = mask is not None and mask.dim() >= 3 and mask.shape[-3] == q.shape[-3] and q.shape[-3] > 1
    if per_head_mask:
        mask = mask.unflatten(-3, (kv_heads, groups))
    outs = []
    for j in range(groups):
        m = mask[..., j, :, :] if per_head_mask else mask
        outs.append(F.scaled_dot_product_attention(qg[..., j, :, :], k, v, attn_mask=m, dropout_p=dropout_p,
                                                   is_causal=causal, scale=scale))
    return torch.stack(outs, dim=-3).flatten(-4, -3)
