"""The PyTorch kernel of ``attnforge::attention``: SDPA, one call per position of a GQA group (no K/V repeat);
soft-capped scores (which SDPA cannot take) in blocks of queries, so memory stays O(block · M)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from attnforge.codegen import masks


SOFTCAP_BLOCK = 256  # queries per block of the soft-capped kernel


def attention_cpu(q, k, v, mask, scale, causal, dropout_p, softcap=0.0):
    if softcap:
        return softcapped(q, k, v, mask, scale, causal, dropout_p, softcap)
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


def softcapped(q, k, v, mask, scale, causal, dropout_p, softcap):
    """softmax(c · tanh(scale · q kᵀ / c) + mask) v (Gemma 2's soft-capping) over blocks of queries; GQA reads the
    KV head of each group of query heads without repeating it."""
    squeeze = q.dim() == 3
    if squeeze:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        mask = mask.unsqueeze(0) if mask is not None and mask.dim() == 3 else mask
    *lead, h, n, d = q.shape
    hkv, m = k.shape[-3], k.shape[-2]
    qg = q.reshape(*lead, hkv, h // hkv, n, d)
    kt, vg = k.transpose(-1, -2)[..., None, :, :], v[..., None, :, :]
    if mask is not None:
        mask = masks.additive(mask, q.dtype)
        while mask.dim() < q.dim():
            mask = mask.unsqueeze(0)
        mask = mask.expand(*mask.shape[:-3], h, mask.shape[-2], m) if mask.shape[-3] == 1 else mask
        mask = mask.reshape(*mask.shape[:-3], hkv, h // hkv, *mask.shape[-2:])
    outs = []
    for lo in range(0, n, SOFTCAP_BLOCK):
        hi = min(n, lo + SOFTCAP_BLOCK)
        s = softcap * torch.tanh((qg[..., lo:hi, :] @ kt) * (scale / softcap))
        if mask is not None:
            s = s + (mask[..., lo:hi, :] if mask.shape[-2] == n else mask)
        if causal:
            s = s.masked_fill(~masks.dense(masks.causal(), hi - lo, m, offset=lo, device=q.device), float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)
        if dropout_p:
            p = F.dropout(p, dropout_p)
        outs.append(p @ vg)
    out = torch.cat(outs, -2).reshape(*lead, h, n, v.shape[-1])
    return out.squeeze(0) if squeeze else out
