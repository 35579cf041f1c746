"""The ``ring`` cache policy of the sliding window: the ``sinks`` first keys and a ring buffer of the last
``window`` keys, ``sinks + window`` slots whatever the context length. Each slot remembers the absolute position
it holds, so decode sees exactly what the prefill rewrite sees (key j visible from query i iff 0 ≤ i − j < window,
or j < sinks): a query at position p reads every slot whose position passes ``masks.sliding_window``."""
from __future__ import annotations

import torch

from attnforge.codegen import masks

from ..cache import CachePolicy, Site, attend_keys, attend_plain, prefill_mask, register_policy


def allocate(site: Site, batch: int, capacity: int) -> list:
    slots = site.params["sinks"] + site.params["window"]
    new = lambda d: torch.zeros(batch, site.kv_heads, slots, d, dtype=site.dtype, device=site.device)  # noqa: E731
    return [new(site.head_dim), new(site.value_dim),
            torch.full((batch, slots), -1, dtype=torch.long, device=site.device),  # position held, -1: empty
            torch.zeros(batch, slots, dtype=torch.bool, device=site.device)]  # a real (not padding) key


def slot_of(p: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """The slot of absolute position p: its own for a sink, the ring (sinks + (p − sinks) mod window) otherwise."""
    return torch.where(p < sinks, p, sinks + (p - sinks) % window)


def write(state: list, k, v, valid, start: int, window: int, sinks: int) -> None:
    """Store the current keys; of several that share a slot, the latest stays (what decode will need)."""
    t = k.shape[2]
    pos = torch.arange(start, start + t, device=k.device)
    keep = (pos < sinks) | (pos > start + t - 1 - window)  # older ones would be overwritten within this write
    pos = pos[keep]
    slots = slot_of(pos, window, sinks)
    state[0][:, :, slots] = k[:, :, keep]
    state[1][:, :, slots] = v[:, :, keep]
    state[2][:, slots] = pos
    state[3][:, slots] = valid[:, keep]


def attend(q, k, v, state, valid, start, site: Site):
    window, sinks = site.params["window"], site.params["sinks"]
    rule = masks.sliding_window(window, sinks, True)
    if start == 0:  # prefill: the rewrite's own kernel over the prompt, then keep what decode needs
        out = torch.ops.attnforge.sliding_window_attention(q, k, v, prefill_mask(valid), site.scale, window, sinks,
                                                            True)
        write(state, k, v, valid, start, window, sinks)
        return out
    outs = []
    for t in range(q.shape[2]):  # decode: one query at a time (T is 1 when generating)
        p = start + t
        slot = p if p < sinks else sinks + (p - sinks) % window  # slot_of, in integers
        state[0][:, :, slot], state[1][:, :, slot] = k[:, :, t], v[:, :, t]
        state[2][:, slot], state[3][:, slot] = p, valid[:, t]
        held = state[2]
        visible = (held >= 0) & state[3] & masks.evaluate(rule, p, held)
        outs.append(attend_keys(q[:, :, t:t + 1], state[0], state[1], visible[:, None, :], site.scale))
    return torch.cat(outs, 2)


def nbytes(site: Site, batch, context):
    """sinks + window slots of keys and values, a position and a flag each: constant in the context length."""
    item = torch.empty(0, dtype=site.dtype).element_size()
    slots = site.params["sinks"] + site.params["window"]
    return batch * slots * (site.kv_heads * (site.head_dim + site.value_dim) * item + 8 + 1)


def initial(site: Site, batch: int) -> list:
    return allocate(site, batch, 0)


def step(q, k, v, past, mask, site: Site):
    """The exported step: the current queries attend the held slots and the current keys by the window rule on
    absolute positions (P = mask length − T onwards); each slot then holds the latest key that maps to it."""
    window, sinks = site.params["window"], site.params["sinks"]
    t = q.shape[2]
    valid = mask.bool()[:, -t:]
    pos = torch.arange(t, device=q.device) + (mask.shape[1] - t)  # [T]
    held = torch.cat([past[2], pos[None].expand(q.shape[0], t)], 1)  # [B, S + T]
    real = torch.cat([past[3] & (past[2] >= 0), valid], 1)
    visible = real[:, None, :] & masks.evaluate(masks.sliding_window(window, sinks, True), pos[None, :, None],
                                                held[:, None, :])
    out = attend_plain(q, torch.cat([past[0], k], 2), torch.cat([past[1], v], 2), visible, site.scale)
    slots = sinks + window
    hits = slot_of(pos, window, sinks)[:, None] == torch.arange(slots, device=q.device)[None]  # [T, S]
    last = torch.where(hits, torch.arange(t, device=q.device)[:, None], -1).amax(0)  # [S]: latest writer, or -1
    has, src = last >= 0, last.clamp(min=0)
    present = [torch.where(has[None, None, :, None], k[:, :, src], past[0]),
               torch.where(has[None, None, :, None], v[:, :, src], past[1]),
               torch.where(has[None], pos[src][None], past[2]),
               (has[None] & valid[:, src]) | (~has[None] & past[3])]  # (onnxruntime has no Where over bools)
    return out, present


RING = register_policy(CachePolicy(
    "ring", "sinks + a ring of the last `window` keys: constant in the context length", allocate, attend, nbytes,
    pack=lambda p: ([p["window"], p["sinks"]], [], [], []),
    unpack=lambda ints, floats, strs, weights: {"window": ints[0], "sinks": ints[1]},
    params_of=lambda a: {"window": a["window"], "sinks": a["sinks"]},
    state_names=("key", "value", "position", "valid"), initial=initial, step=step))
