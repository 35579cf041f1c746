"""The ``blocks`` cache policy of block-sparse attention: every key (as ``full``), but a decode step reads only the
key blocks its layout keeps for the query's block. Static layouts: the layout's row of the query block, the same
row the prefill used (causal rows depend on earlier rows only, so a prefix of the layout is the layout of the
prefix): decode equals prefill. Top-k layouts: the ``topk`` earlier blocks whose mean key scores best against the
current query, plus block 0 and the query's own block; the prefill scores blocks with the query block's mean, so
decode there is the same rule applied per query, not the prefill's choice (``exact_decode`` False)."""
from __future__ import annotations

import functools

import torch

from ..attention.cache import allocate, grow, nbytes, write
from ..cache import CachePolicy, Site, attend_keys, prefill_mask, register_policy
from .layout import static_layout


def attend(q, k, v, state, valid, start, site: Site):
    p = site.params
    if start == 0:  # prefill: the rewrite's own kernel over the prompt
        write(state, k, v, valid, start)
        return torch.ops.attnforge.block_sparse_attention(q, k, v, prefill_mask(valid), site.scale, p["block"],
                                                          p["local"], p["global_"], p["random"], p["seed"],
                                                          p["topk"], True)
    outs = []
    for t in range(q.shape[2]):
        pos = start + t
        end = write(state, k[:, :, t:t + 1], v[:, :, t:t + 1], valid[:, t:t + 1], pos)
        visible = _kept(q[:, :, t:t + 1], state, pos, end, site) & state[2][:, None, :end]  # [B, H|1, end]
        outs.append(_attend_heads(q[:, :, t:t + 1], state, end, visible, site))
    return torch.cat(outs, 2)


def _kept(q, state, pos: int, end: int, site: Site):
    """[B, H|1, end]: the keys of the blocks the layout keeps for position ``pos`` (j ≤ pos)."""
    p, b = site.params, site.params["block"]
    qb = pos // b
    blocks = torch.arange(end, device=q.device) // b
    if not p["topk"]:
        counts, idx = _layout(1 << qb.bit_length(), p["local"], p["global_"], p["random"], p["seed"])
        row = idx[qb, :counts[qb]].to(q.device)
        keep = (blocks[:, None] == row[None]).any(-1)[None, None]
    else:
        keys = state[0][:, :, :qb * b].unflatten(2, (qb, b)).mean(3) if qb else state[0][:, :, :0]
        groups = q.shape[1] // state[0].shape[1]
        scores = (q @ keys.repeat_interleave(groups, 1).transpose(-1, -2))[:, :, 0]  # [B, H, qb]
        chosen = scores.topk(min(p["topk"], qb), -1).indices if qb else scores.new_zeros(0, dtype=torch.long)
        keep_blocks = torch.zeros(*q.shape[:2], qb + 1, dtype=torch.bool, device=q.device)
        if qb:
            keep_blocks.scatter_(-1, chosen, True)
        keep_blocks[..., 0] = keep_blocks[..., qb] = True
        keep = keep_blocks.gather(-1, blocks.expand(*q.shape[:2], end))
    return keep & (torch.arange(end, device=q.device) <= pos)


@functools.lru_cache(maxsize=32)
def _layout(n_blocks: int, local: int, global_: int, random: int, seed: int):
    """A causal static layout of ``n_blocks`` rows (a row depends on the rows before it only, so any longer layout
    has the same rows)."""
    return static_layout(n_blocks, local, global_, random, seed, True)


def _attend_heads(q, state, end, visible, site):
    """The step's attention: ``visible`` [B, 1, end] (a static layout, every head alike) or [B, H, end] (top-k:
    each head's own blocks), as one call either way."""
    return attend_keys(q, state[0][:, :, :end], state[1][:, :, :end], visible[:, :, None, :], site.scale)


def _pack(p):
    return [p["block"], p["local"], p["global_"], p["random"], p["seed"], p["topk"]], [], [], []


def _unpack(ints, floats, strs, weights):
    return dict(zip(("block", "local", "global_", "random", "seed", "topk"), ints))


BLOCKS = register_policy(CachePolicy(
    "blocks", "every key; decode reads the blocks the layout keeps", allocate, attend, nbytes, _pack, _unpack,
    exact_decode=lambda params: not params["topk"], grow=grow,
    params_of=lambda a: {k: a[k] for k in ("block", "local", "global_", "random", "seed", "topk")}))
