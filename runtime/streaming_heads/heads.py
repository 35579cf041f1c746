"""Which query and KV heads are retrieval heads, and the gathers that split a call into its two head sets.

``retrieval`` is one flag per KV head; query head h reads KV head h // G (G = H / Hkv, grouped-query attention),
so the query heads of a retrieval KV head are retrieval heads too. Both sets keep the heads in increasing order,
so the i-th query head of a set still reads that set's KV head i // G: each part is an ordinary GQA call.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class HeadSets:
    retrieval_kv: tuple[int, ...]
    streaming_kv: tuple[int, ...]
    retrieval_q: tuple[int, ...]
    streaming_q: tuple[int, ...]

    @property
    def inverse(self) -> tuple[int, ...]:
        """Where query head h is in ``retrieval_q + streaming_q`` (the gather that stitches the two parts)."""
        order = self.retrieval_q + self.streaming_q
        out = [0] * len(order)
        for i, h in enumerate(order):
            out[h] = i
        return tuple(out)


@functools.lru_cache(maxsize=256)
def _sets(flags: tuple[bool, ...], heads: int) -> HeadSets:
    kv = len(flags)
    if kv == 0 or heads % kv:
        raise ValueError(f"{kv} retrieval flags for {heads} query heads: give one flag per KV head (a divisor of "
                         "the query heads)")
    g = heads // kv
    r = tuple(i for i, f in enumerate(flags) if f)
    s = tuple(i for i, f in enumerate(flags) if not f)
    return HeadSets(r, s, tuple(h for h in range(heads) if flags[h // g]),
                    tuple(h for h in range(heads) if not flags[h // g]))


def head_sets(retrieval, heads: int, kv_heads: Optional[int] = None) -> HeadSets:
    """The two head sets of ``retrieval`` (flags per KV head) for ``heads`` query heads; ``kv_heads``, when given,
    must be the number of flags."""
    flags = tuple(bool(f) for f in retrieval)
    if kv_heads is not None and len(flags) != kv_heads:
        raise ValueError(f"{len(flags)} retrieval flags for {kv_heads} KV heads: give one flag per KV head")
    return _sets(flags, heads)


def take(x: Tensor, heads: tuple[int, ...], dim: int = 1) -> Tensor:
    """``x`` restricted to ``heads`` along ``dim`` (a view for a contiguous range, else a gather)."""
    if not heads:
        return x.narrow(dim, 0, 0)
    if list(heads) == list(range(heads[0], heads[0] + len(heads))):
        return x.narrow(dim, heads[0], len(heads))
    return x.index_select(dim, torch.tensor(heads, device=x.device))


def take_mask(mask: Optional[Tensor], heads: tuple[int, ...], total: int) -> Optional[Tensor]:
    """The model mask (broadcastable to [B, H, N, M]) of the query heads ``heads`` of ``total``."""
    if mask is None or mask.dim() < 3 or mask.shape[-3] != total or total == 1:
        return mask
    return take(mask, heads, mask.dim() - 3)


def split(q, k, v, mask, sets: HeadSets):
    """((q, k, v, mask) of the retrieval heads, (q, k, v, mask) of the streaming heads)."""
    h = q.shape[1]
    full = (take(q, sets.retrieval_q), take(k, sets.retrieval_kv), take(v, sets.retrieval_kv),
            take_mask(mask, sets.retrieval_q, h))
    band = (take(q, sets.streaming_q), take(k, sets.streaming_kv), take(v, sets.streaming_kv),
            take_mask(mask, sets.streaming_q, h))
    return full, band


def stitch(full: Optional[Tensor], band: Optional[Tensor], sets: HeadSets) -> Tensor:
    """The outputs of the two parts ([B, Hr·G, ...] and [B, Hs·G, ...]) back in query-head order."""
    if band is None or not sets.streaming_q:
        return full
    if full is None or not sets.retrieval_q:
        return band
    both = torch.cat([full, band], 1)
    return both.index_select(1, torch.tensor(sets.inverse, device=both.device))
