"""Attention over per-query-block tables of KV blocks: the PyTorch kernel every table-driven variant shares.

A layout is FlexAttention's BlockMask idea, count + indices per query block (never an N×N mask): the KV blocks
each query block reads are gathered and attended with one batched flash-attention call, with the element-wise
rule of a mask predicate (codegen/masks.py) applied inside the gathered blocks. ``block_sparse`` builds its
tables from a BigBird or top-k layout; a predicate mask builds them with ``masks.tile_tables`` (the blocks the
predicate's interval classification says are not empty). Work is proportional to the kept blocks.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from attnforge.codegen import masks

from .common import NEG, broadcast_mask, flash


def attend_tables(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, counts: Tensor,
                  idx: Tensor, block: int, keep: Optional[masks.Expr]) -> Tensor:
    """softmax over the keys of the blocks in (counts [.., nqb], idx [.., nqb, W], broadcast to [B, H]) that
    ``keep`` (a mask predicate, None: all) and the model's ``mask`` allow. q [B, H, N, D], k/v [B, Hkv, N, D]."""
    b, h, n, d = q.shape
    kv_heads = k.shape[1]
    idx = idx.long()
    nb = -(-n // block)
    width = idx.shape[-1]
    pad = nb * block - n
    kb = F.pad(k, (0, 0, 0, pad)).view(b, kv_heads, nb, block, d)
    vb = F.pad(v, (0, 0, 0, pad)).view(b, kv_heads, nb, block, v.shape[-1])
    add_mask = broadcast_mask(mask, q.dtype, n)
    qpos = torch.arange(nb * block, device=q.device).view(nb, block)  # [nb, block]
    outs = []
    for j, qj in enumerate(_group_views(q, kv_heads)):
        heads = torch.arange(kv_heads, device=q.device) * (h // kv_heads) + j  # query heads of this group slot
        ix = idx.expand(b, h, nb, width)[:, heads]  # [B, Hkv, nb, width]
        ks = _gather_blocks(kb, ix)  # [B, Hkv, nb, width·block, D]
        vs = _gather_blocks(vb, ix)
        kpos = (ix[..., None] * block + torch.arange(block, device=q.device)).flatten(-2)  # [B,Hkv,nb,W·block]
        slot = torch.arange(width, device=q.device).repeat_interleave(block)
        ok = (slot < counts.expand(b, h, nb)[:, heads][..., None]) & (kpos < n)
        ok = ok[..., None, :] & (qpos[None, None, :, :, None] < n)
        if keep is not None and keep != masks.KEEP_ALL:
            ok = ok & masks.evaluate(keep, qpos[None, None, :, :, None], kpos[..., None, :])
        m = torch.zeros(ok.shape, dtype=q.dtype, device=q.device).masked_fill_(~ok, NEG)
        if add_mask is not None:
            am = add_mask[:, heads] if add_mask.shape[1] == h else add_mask
            qi = qpos.clamp(max=n - 1)[None, None, :, :, None]
            kj = kpos.clamp(max=n - 1)[..., None, :]
            bi = torch.arange(am.shape[0], device=q.device)[:, None, None, None, None]
            hi = torch.arange(am.shape[1], device=q.device)[None, :, None, None, None]
            m = m + am[bi, hi, qi, kj]
        qb = F.pad(qj, (0, 0, 0, pad)).reshape(b * kv_heads, nb, block, d)
        o, _ = flash(qb, ks.flatten(0, 1), vs.flatten(0, 1), attn_mask=m.flatten(0, 1), scale=scale)
        outs.append(o.reshape(b, kv_heads, nb * block, v.shape[-1])[:, :, :n])
    return _ungroup(outs)


def attend_predicate(q, k, v, mask, scale, keep: masks.Expr, block: int = 64) -> Tensor:
    """Attention under a mask predicate: tables from ``masks.tile_tables``, then ``attend_tables``."""
    block = max(1, min(block, q.shape[2]))
    counts, idx, _ = masks.tile_tables(keep, q.shape[2], k.shape[2], block, block, q.device)
    return attend_tables(q, k, v, mask, scale, counts[None, None], idx[None, None], block, keep)


def _group_views(q: Tensor, kv_heads: int):
    """q [B, H, N, D] -> list of G views [B, Hkv, N, D] (query heads sharing one K/V head)."""
    b, h, n, d = q.shape
    g = h // kv_heads
    if g == 1:
        return [q]
    qg = q.view(b, kv_heads, g, n, d)
    return [qg[:, :, j] for j in range(g)]


def _ungroup(outs: list[Tensor]) -> Tensor:
    if len(outs) == 1:
        return outs[0]
    return torch.stack(outs, dim=2).flatten(1, 2)


def _gather_blocks(xb: Tensor, ix: Tensor) -> Tensor:
    """xb [B, Hkv, nb, block, D], ix [B, Hkv, nqb, W] -> [B, Hkv, nqb, W·block, D]."""
    b, hk, nb, block, d = xb.shape
    flat = ix.flatten(2)  # [B, Hkv, nqb·W]
    g = torch.gather(xb.flatten(3), 2, flat[..., None].expand(-1, -1, -1, block * d))
    return g.view(b, hk, ix.shape[2], ix.shape[3] * block, d)
