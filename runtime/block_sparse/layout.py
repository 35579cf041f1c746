"""Block-sparse layouts as index tables: (counts, indices) of the KV blocks each query block reads.

Static (``topk == 0``): BigBird (Zaheer et al., 2020) — ``local`` blocks around the diagonal, ``global_`` first
blocks every query sees, ``random`` seeded blocks. Dynamic (``topk > 0``): per query block the ``topk`` KV blocks
with the largest pooled score mean(q)·mean(k), plus the first block and the diagonal (FlexPrefill, Lai et al.
2025; Quest, Tang et al. 2024). ``dense_block_mask`` is the one definition of what a table means, used by the
reference and the ONNX graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnforge.codegen import masks

from ..common import NEG


def static_layout(n_blocks: int, local: int, global_: int, random: int, seed: int, causal: bool):
    """BigBird-style block tables: (counts [nqb], indices [nqb, max]) of KV blocks per query block.

    Query block i sees the ``local`` blocks ending at i (causal) or centred on i (both sides),
    the first ``global_`` blocks, and ``random`` further blocks drawn with ``seed`` (BigBird, Zaheer
    et al. 2020). Bidirectional global query blocks see every block. Causal tables keep j ≤ i only.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n_blocks):
        lo, hi = (i - local + 1, i) if causal else (i - local + 1, i + local - 1)
        keep = set(range(max(lo, 0), min(hi, n_blocks - 1) + 1)) | set(range(min(global_, n_blocks)))
        if not causal and i < global_:
            keep = set(range(n_blocks))
        pool = [j for j in range(n_blocks if not causal else i + 1) if j not in keep]
        if random > 0 and pool:
            pick = torch.randperm(len(pool), generator=gen)[:random]
            keep |= {pool[p] for p in pick.tolist()}
        if causal:
            keep = {j for j in keep if j <= i}
        rows.append(sorted(keep))
    width = max(len(r) for r in rows)
    idx = torch.zeros(n_blocks, width, dtype=torch.int32)
    counts = torch.tensor([len(r) for r in rows], dtype=torch.int32)
    for i, r in enumerate(rows):
        idx[i, :len(r)] = torch.tensor(r, dtype=torch.int32)
        idx[i, len(r):] = r[-1]  # padding slots repeat a valid block; counts say they are unused
    return counts, idx


def topk_layout(q: Tensor, k: Tensor, block: int, topk: int, scale: float, causal: bool):
    """Dynamic tables from mean-pooled blocks (FlexPrefill / Quest): [B, H, nqb], [B, H, nqb, topk + 2].

    score(i, j) = mean(q in block i) · mean(k in block j); query block i keeps its ``topk`` best
    blocks plus block 0 (sink) and its own block (diagonal); causal tables consider j ≤ i only.
    """
    b, h, n, d = q.shape
    nb = -(-n // block)
    pad = nb * block - n
    qm = F.pad(q, (0, 0, 0, pad)).view(b, h, nb, block, d).sum(3) / _block_sizes(n, nb, block, q)
    kk = k.repeat_interleave(h // k.shape[1], 1)
    km = F.pad(kk, (0, 0, 0, pad)).view(b, h, nb, block, d).sum(3) / _block_sizes(n, nb, block, q)
    scores = (qm @ km.transpose(-2, -1)) * scale  # [B, H, nb, nb]
    i = torch.arange(nb, device=q.device)
    if causal:
        scores = scores.masked_fill(i[None, :] > i[:, None], NEG)
    forced = (i[None, :] == i[:, None]) | (i[None, :] == 0)
    scores = scores.masked_fill(forced, float("inf"))  # sink and diagonal always win
    kk_n = min(topk + 2, nb)
    top = scores.topk(kk_n, dim=-1)
    keep = top.values > NEG
    counts = keep.sum(-1).to(torch.int32)
    idx = torch.where(keep, top.indices, top.indices[..., :1]).to(torch.int32)
    return counts, idx


def _block_sizes(n, nb, block, like):
    sizes = torch.full((nb, 1), float(block), dtype=like.dtype, device=like.device)
    sizes[-1] = n - (nb - 1) * block
    return sizes


def block_tables(q, k, block, local, global_, random, seed, topk, scale, causal):
    """(counts, indices) broadcastable to [B, H, nqb] / [B, H, nqb, max] for the op's parameters."""
    if topk > 0:
        return topk_layout(q, k, block, topk, scale, causal)
    nb = -(-q.shape[2] // block)
    counts, idx = static_layout(nb, local, global_, random, seed, causal)
    return counts.to(q.device)[None, None], idx.to(q.device)[None, None].long()


def dense_block_mask(counts: Tensor, idx: Tensor, n: int, block: int, causal: bool) -> Tensor:
    """The boolean [.., N, N] mask an index table stands for (for references and ONNX), keep = True."""
    nb = idx.shape[-2]
    slot = torch.arange(idx.shape[-1], device=idx.device)
    valid = (slot < counts[..., None]).expand(idx.shape).to(torch.int8)
    keep = torch.zeros(*idx.shape[:-2], nb, nb, dtype=torch.int8, device=idx.device)
    keep = keep.scatter_reduce(-1, idx.long(), valid, reduce="amax").bool()  # padding slots repeat a block
    dense = keep.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :n, :n]
    if causal:
        dense = dense & masks.dense(masks.causal(), n, device=idx.device)
    return dense


