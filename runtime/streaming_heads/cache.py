"""The ``streaming`` cache policy: retrieval KV heads keep every key (the ``full`` layout, grown in chunks), streaming
KV heads keep the sinks and a ring of the last ``window`` keys (the sliding window's ``ring`` layout).

The state is the two layouts side by side, each holding its own heads only (so the memory is really saved):

    [0] keys    [B, Hr, C, D]     retrieval heads, C positions (whole chunks of ``GROW``, runtime/attention/cache.py)
    [1] values  [B, Hr, C, Dv]
    [2] valid   [B, C]            a real (not padding) position
    [3] keys    [B, Hs, S, D]     streaming heads, S = sinks + window slots (runtime/sliding_window/cache.py)
    [4] values  [B, Hs, S, Dv]
    [5] position [B, S]           the absolute position a slot holds, −1 empty
    [6] valid   [B, S]

A head set that is empty holds nothing (its tensors have size 0). Prefill runs the op itself over the prompt
and then writes both layouts; decode splits the heads and lets each layout attend its own (a retrieval head sees
every real key, a streaming head the slots the window rule keeps), then stitches the outputs in head order, so
decode equals the rewritten model's own prefill. Bytes: N·(Hr·(D + Dv)·itemsize + 1) + (sinks + window)·(Hs·(D +
Dv)·itemsize + 8 + 1) per sequence, the first term absent without retrieval heads, the second without streaming
ones.
"""
from __future__ import annotations

import torch

from ..attention import cache as full_cache
from ..cache import CachePolicy, Site, prefill_mask, register_policy
from ..sliding_window import cache as ring_cache
from .heads import head_sets, stitch, take

FULL, RING = full_cache.FULL, ring_cache.RING


def parts(site: Site):
    """(head sets, the retrieval heads' site, the streaming heads' site) of a streaming-heads site."""
    p = site.params
    sets = head_sets(p["retrieval"], site.heads, site.kv_heads)
    full = Site(len(sets.retrieval_q), len(sets.retrieval_kv), site.head_dim, site.value_dim, site.scale, site.dtype,
                site.device, {})
    ring = Site(len(sets.streaming_q), len(sets.streaming_kv), site.head_dim, site.value_dim, site.scale, site.dtype,
                site.device, {"window": p["window"], "sinks": p["sinks"]})
    return sets, full, ring


def _nothing(site: Site, batch: int, positions: list) -> list:
    """The tensors of an empty head set: keys, values and the per-position tensors, all of size 0."""
    new = lambda d: torch.zeros(batch, 0, 0, d, dtype=site.dtype, device=site.device)  # noqa: E731
    return [new(site.head_dim), new(site.value_dim)] + [torch.zeros(batch, 0, dtype=t, device=site.device)
                                                        for t in positions]


def allocate(site: Site, batch: int, capacity: int) -> list:
    _, full, ring = parts(site)
    return ((FULL.allocate(full, batch, capacity) if full.kv_heads else _nothing(full, batch, [torch.bool]))
            + (RING.allocate(ring, batch, capacity) if ring.kv_heads else _nothing(ring, batch,
                                                                                   [torch.long, torch.bool])))


def grow(state: list, needed: int) -> list:
    """Room for ``needed`` positions in the retrieval heads' part (whole chunks, as ``full``); the ring is fixed."""
    if state[0].shape[1] == 0:
        return state
    return FULL.grow(state[:3], needed) + state[3:]


def attend(q, k, v, state, valid, start, site: Site):
    sets, full, ring = parts(site)
    window, sinks = site.params["window"], site.params["sinks"]
    kr, vr, ks, vs = (take(x, h) for x, h in ((k, sets.retrieval_kv), (v, sets.retrieval_kv),
                                               (k, sets.streaming_kv), (v, sets.streaming_kv)))
    if start == 0:  # prefill: the rewrite's own kernel over the prompt, then keep what decode needs
        out = torch.ops.attnforge.streaming_heads_attention(q, k, v, prefill_mask(valid), site.scale,
                                                             [bool(f) for f in site.params["retrieval"]], window,
                                                             sinks, True)
        if full.kv_heads:
            full_cache.write(state[:3], kr, vr, valid, 0)
        if ring.kv_heads:
            ring_cache.write(state[3:], ks, vs, valid, 0, window, sinks)
        return out
    o_full = FULL.attend(take(q, sets.retrieval_q), kr, vr, state[:3], valid, start, full) if full.kv_heads else None
    o_ring = RING.attend(take(q, sets.streaming_q), ks, vs, state[3:], valid, start, ring) if ring.kv_heads else None
    return stitch(o_full, o_ring, sets)


def nbytes(site: Site, batch, context):
    """The retrieval heads' full cache at ``context`` positions plus the streaming heads' constant ring."""
    _, full, ring = parts(site)
    return ((FULL.bytes(full, batch, context) if full.kv_heads else 0)
            + (RING.bytes(ring, batch, context) if ring.kv_heads else 0))


def initial(site: Site, batch: int) -> list:
    """Before the prompt: the retrieval heads' keys and values with a past of length 0 (optimum's convention, grown
    by each call), the ring's fixed slots (empty: position −1, not valid)."""
    _, full, ring = parts(site)
    return FULL.initial(full, batch) + (RING.initial(ring, batch) if ring.kv_heads else
                                        _nothing(ring, batch, [torch.long, torch.bool]))


def step(q, k, v, past, mask, site: Site):
    """The exported step: the retrieval heads as ``full``'s step (present = past ++ current), the streaming heads as
    the ring's; an empty head set passes size-0 tensors through."""
    sets, full, ring = parts(site)
    kr, vr, ks, vs = (take(x, h) for x, h in ((k, sets.retrieval_kv), (v, sets.retrieval_kv),
                                               (k, sets.streaming_kv), (v, sets.streaming_kv)))
    if full.kv_heads:
        o_full, present = FULL.step(take(q, sets.retrieval_q), kr, vr, past[:2], mask, full)
    else:
        o_full, present = None, [past[0][:, :0, :0], past[1][:, :0, :0]]
    if ring.kv_heads:
        o_ring, ring_present = RING.step(take(q, sets.streaming_q), ks, vs, past[2:], mask, ring)
    else:
        o_ring, ring_present = None, [past[2][:, :0, :0], past[3][:, :0, :0], past[4][:, :0], past[5][:, :0]]
    return stitch(o_full, o_ring, sets), present + ring_present


STREAMING = register_policy(CachePolicy(
    "streaming", "retrieval KV heads keep every key, streaming KV heads the sinks + a ring of the last `window` "
                 "keys (DuoAttention)", allocate, attend, nbytes,
    pack=lambda p: ([p["window"], p["sinks"], *(int(bool(f)) for f in p["retrieval"])], [], [], []),
    unpack=lambda ints, floats, strs, weights: {"window": ints[0], "sinks": ints[1],
                                                "retrieval": tuple(bool(f) for f in ints[2:])},
    params_of=lambda a: {"window": a["window"], "sinks": a["sinks"],
                         "retrieval": tuple(bool(f) for f in a["retrieval"])},
    grow=grow, state_names=("key", "value", "ring_key", "ring_value", "ring_position", "ring_valid"),
    initial=initial, step=step))
