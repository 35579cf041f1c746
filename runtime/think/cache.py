"""The ``channels`` cache policy of ThinK: every position, but each key with only its KV head's kept channels.

The prompt (the first call, ``start`` 0) chooses the channels (``select.py``) and attends exactly; the cache then
holds keys [B, Hkv, C, D'] with D' = D − ⌊D · ratio⌋. Decode gathers the same channels of its query,
q'[h] = q[h, channels[g(h)]], and attends q'·k'ᵀ at the original scale; keys appended during decode are pruned
to the same channels too (kvpress keeps them whole; storing them pruned keeps the memory formula one per token).
Values are untouched.

State: keys [B, Hkv, C, D'], values [B, Hkv, C, Dv], valid [B, C], channels [B, Hkv, D'] (−1 before the prompt).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from attnforge.codegen import masks

from ..attention.cache import _chunks
from ..cache import CachePolicy, Site, attend_keys, prefill_mask, register_policy, softmax_times
from .select import kept_channels, select_channels


def _kept(site: Site) -> int:
    return kept_channels(site.head_dim, site.params["ratio"])


def allocate(site: Site, batch: int, capacity: int) -> list:
    c, d = _chunks(capacity), _kept(site)
    return [torch.zeros(batch, site.kv_heads, c, d, dtype=site.dtype, device=site.device),
            torch.zeros(batch, site.kv_heads, c, site.value_dim, dtype=site.dtype, device=site.device),
            torch.zeros(batch, c, dtype=torch.bool, device=site.device),
            torch.full((batch, site.kv_heads, d), -1, dtype=torch.long, device=site.device)]


def grow(state: list, needed: int) -> list:
    """Room for ``needed`` positions, in whole chunks (the channel map is kept as it is)."""
    if needed <= state[0].shape[2]:
        return state
    more = _chunks(needed) - state[0].shape[2]
    return [F.pad(state[0], [0, 0, 0, more]), F.pad(state[1], [0, 0, 0, more]), F.pad(state[2], [0, more]),
            state[3]]


def gather_channels(x, channels, heads: int):
    """x [B, heads, T, D] -> [B, heads, T, D']: each head's KV head's channels (``channels`` [B, Hkv, D'])."""
    per_head = channels.repeat_interleave(heads // channels.shape[1], 1)
    return x.gather(-1, per_head[:, :, None, :].expand(*x.shape[:-1], per_head.shape[-1]))


def attend(q, k, v, state, valid, start, site: Site):
    t = q.shape[2]
    if start == 0:  # the prompt: exact attention over it, and it chooses each KV head's channels
        out = torch.ops.attnforge.attention(q, k, v, prefill_mask(valid), site.scale, True, 0.0)
        state[3].copy_(select_channels(q, k, valid, site.params["ratio"], site.params["window"]))
    end = start + t
    if end > state[0].shape[2]:
        raise ValueError(f"the channels cache holds {state[0].shape[2]} positions, the step needs {end}: grow it")
    state[0][:, :, start:end] = gather_channels(k, state[3], k.shape[1])
    state[1][:, :, start:end] = v
    state[2][:, start:end] = valid
    if start == 0:
        return out
    visible = state[2][:, None, :end]
    if t > 1:
        visible = masks.dense(masks.causal(), t, end, offset=start, device=q.device)[None] & visible
    return attend_keys(gather_channels(q, state[3], q.shape[1]), state[0][:, :, :end], state[1][:, :, :end],
                       visible, site.scale)


def nbytes(site: Site, batch, context):
    """Pruned keys (D' channels), values and a flag per position, plus the channel map."""
    item = torch.empty(0, dtype=site.dtype).element_size()
    d = _kept(site)
    return batch * context * (site.kv_heads * (d + site.value_dim) * item + 1) + batch * site.kv_heads * d * 8


def initial(site: Site, batch: int) -> list:
    d = _kept(site)
    return [torch.zeros(batch, site.kv_heads, 0, d, dtype=site.dtype, device=site.device),
            torch.zeros(batch, site.kv_heads, 0, site.value_dim, dtype=site.dtype, device=site.device),
            torch.full((batch, site.kv_heads, d), -1, dtype=torch.long, device=site.device)]


def step(q, k, v, past, mask, site: Site):
    """The exported step, as ``attend``: the first call (channels −1) chooses the channels from its tokens and
    attends exactly; a later call attends with its queries' kept channels over the past and its own pruned keys
    (causally). Every call appends its pruned keys."""
    t = q.shape[2]
    fresh = select_channels(q, k, mask.bool()[:, -t:], site.params["ratio"], site.params["window"])
    first = past[2][..., :1] < 0  # [B, Hkv, 1]: no channels chosen yet
    channels = torch.where(first, fresh, past[2])
    qg, kg = gather_channels(q, channels, q.shape[1]), gather_channels(k, channels, k.shape[1])
    b, h = q.shape[:2]
    hkv = k.shape[1]
    grouped = lambda x: x.reshape(b, hkv, h // hkv, t, x.shape[-1])  # noqa: E731  (GQA: the group's query heads)
    keys_t = lambda x: x.transpose(-1, -2)[:, :, None]  # noqa: E731  [B, Hkv, 1, ·, M]
    whole = grouped(q) @ keys_t(k)  # the prompt reads its own keys whole (exact)
    own = torch.where(first[:, :, :, None, None], whole, grouped(qg) @ keys_t(kg))
    s = torch.cat([grouped(qg) @ keys_t(past[0]), own], -1) * site.scale  # [B, Hkv, G, T, P + T]
    total = s.shape[-1]
    i = torch.arange(t, device=q.device)[:, None] + (total - t)
    visible = (torch.arange(total, device=q.device)[None] <= i)[None] & mask.bool()[:, None, :]
    values = torch.cat([past[1], v], 2)
    out = softmax_times(s, visible[:, None, None], values[:, :, None]).reshape(b, h, t, values.shape[-1])
    return out, [torch.cat([past[0], kg], 2), values, channels]


CHANNELS = register_policy(CachePolicy(
    "channels", "every position, keys with the KV head's kept channels only (ThinK)", allocate, attend, nbytes,
    pack=lambda p: ([p["window"]], [p["ratio"]], [], []),
    unpack=lambda ints, floats, strs, weights: {"window": ints[0], "ratio": floats[0]},
    exact_decode=lambda p: p["ratio"] == 0,  # decode reads the pruned keys: equal to a dense reference over them
    params_of=lambda a: {"ratio": a["ratio"], "window": a["window"]}, grow=grow,
    state_names=("key", "value", "channels"), initial=initial, step=step))
