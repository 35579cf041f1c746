"""The ``snapkv`` cache policy: per KV head, the prompt keys SnapKV keeps (``select.py``) and every key decode
appends.

A call that writes more than ``window`` keys at once (the prompt) attends exactly over them, then stores only
the kept ones; a shorter call (a decode step) appends its keys and attends over everything stored. Slots hold
keys in any order (they are already rotated, so order does not matter to attention), each KV head its own set,
with a per-head flag for the slots a row does not fill. Positions continue from the uncompressed length: the
model's own ``position_ids`` say where a token is, the cache only which keys exist.

State: keys [B, Hkv, C, D], values [B, Hkv, C, Dv], kept [B, Hkv, C] (bool), and (slots used, positions seen).
The capacity C follows the need in chunks of ``GROW`` slots: after the prompt it shrinks to what was kept.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention.cache import _chunks
from ..cache import CachePolicy, Site, attend_keys, attend_plain, prefill_mask, register_policy
from .select import keep_count, select_keys


def allocate(site: Site, batch: int, capacity: int) -> list:
    c = _chunks(capacity)
    new = lambda d: torch.zeros(batch, site.kv_heads, c, d, dtype=site.dtype, device=site.device)  # noqa: E731
    return [new(site.head_dim), new(site.value_dim),
            torch.zeros(batch, site.kv_heads, c, dtype=torch.bool, device=site.device),
            torch.zeros(2, dtype=torch.long, device=site.device)]  # slots used, positions seen


def grow(state: list, needed: int) -> list:
    """The state with room for the step that reaches position ``needed``: its slots in use plus the step's tokens,
    rounded up to chunks; a state far larger than that (after the prompt's selection) is compacted."""
    used, seen = (int(x) for x in state[3])
    size = _chunks(used + max(needed - seen, 0))
    have = state[0].shape[2]
    if size <= have <= 2 * size:
        return state
    if size < have:
        return [t[:, :, :size].clone() for t in state[:3]] + [state[3]]
    return [F.pad(t, [0, 0, 0, size - have] if t.dim() == 4 else [0, size - have]) for t in state[:3]] + [state[3]]


def _params(site: Site):
    p = site.params
    return p["budget"], p["ratio"], p["window"], p["kernel"]


def attend(q, k, v, state, valid, start, site: Site):
    budget, ratio, window, kernel = _params(site)
    used = int(state[3][0])
    t = q.shape[2]
    if t > window:  # the prompt (or a long chunk): exact over the past and itself, then keep SnapKV's choice
        if used == 0:
            out = torch.ops.attnforge.attention(q, k, v, prefill_mask(valid), site.scale, True, 0.0)
        else:
            out = _over_past_and_chunk(q, k, v, state, valid, used, site)
        index, kept = select_keys(q, k, valid, site.scale, budget, ratio, window, kernel)
        n = index.shape[-1]
        _write(state, used, k.gather(2, index[..., None].expand(*index.shape, k.shape[-1])),
               v.gather(2, index[..., None].expand(*index.shape, v.shape[-1])),
               kept & valid[:, None, :].expand(-1, k.shape[1], -1).gather(2, index))
    else:  # decode: append, then attend over every stored key (causal among the step's own)
        n = t
        _write(state, used, k, v, valid[:, None, :].expand(-1, k.shape[1], -1))
        visible = _visible(state[2][:, :, :used + t], used, t, q.shape[1])
        out = attend_keys(q, state[0][:, :, :used + t], state[1][:, :, :used + t], visible, site.scale)
    state[3][0] += n
    state[3][1] = start + t
    return out


def _write(state, at: int, k, v, kept) -> None:
    end = at + k.shape[2]
    if end > state[0].shape[2]:
        raise ValueError(f"the snapkv cache holds {state[0].shape[2]} slots, the step needs {end}: grow it first")
    state[0][:, :, at:end], state[1][:, :, at:end], state[2][:, :, at:end] = k, v, kept


def _visible(kept, used: int, t: int, heads: int):
    """[B, H, T, used + T]: every stored key, and the step's own keys causally."""
    b, hkv, m = kept.shape
    own = torch.ones(t, m, dtype=torch.bool, device=kept.device)
    own[:, used:] = torch.ones(t, t, dtype=torch.bool, device=kept.device).tril()
    return (kept.repeat_interleave(heads // hkv, 1)[:, :, None, :] & own)


def _over_past_and_chunk(q, k, v, state, valid, used, site):
    keys, values = torch.cat([state[0][:, :, :used], k], 2), torch.cat([state[1][:, :, :used], v], 2)
    kept = torch.cat([state[2][:, :, :used], valid[:, None, :].expand(-1, k.shape[1], -1)], 2)
    return attend_keys(q, keys, values, _visible(kept, used, q.shape[2], q.shape[1]), site.scale)


def nbytes(site: Site, batch, context):
    """The kept keys of a prompt of ``context`` tokens (keep_count: the budget, at least the window, at most the
    prompt), values and a flag each, per KV head; each generated token adds one slot."""
    budget, ratio, window, _ = _params(site)
    item = torch.empty(0, dtype=site.dtype).element_size()
    return batch * site.kv_heads * keep_count(context, budget, ratio, window) * (
        (site.head_dim + site.value_dim) * item + 1)


def initial(site: Site, batch: int) -> list:
    new = lambda *s: torch.zeros(batch, site.kv_heads, *s, dtype=site.dtype, device=site.device)  # noqa: E731
    return [new(0, site.head_dim), new(0, site.value_dim),
            torch.zeros(batch, site.kv_heads, 0, dtype=torch.bool, device=site.device)]


def step(q, k, v, past, mask, site: Site):
    """The exported step: the current tokens attend every stored key and themselves causally; then the chunk's
    keys are selected as in ``attend`` (a chunk of at most ``window`` keys keeps them all) and appended."""
    budget, ratio, window, kernel = _params(site)
    b, hkv, t = k.shape[0], k.shape[1], k.shape[2]
    valid = mask.bool()[:, -t:]
    mine = valid[:, None, :].expand(b, hkv, t)
    keys, values = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
    kept = torch.cat([past[2], mine], 2)  # [B, Hkv, P + T]
    p = past[0].shape[2]
    j = torch.arange(keys.shape[2], device=q.device)[None, :]
    causal = j <= (torch.arange(t, device=q.device)[:, None] + p)  # [T, P + T]
    visible = kept.repeat_interleave(q.shape[1] // hkv, 1)[:, :, None, :] & causal
    out = attend_plain(q, keys, values, visible, site.scale)
    index, chosen = select_keys(q, k, valid, site.scale, budget, ratio, window, kernel)
    pick = lambda x: x.gather(2, index[..., None].expand(*index.shape, x.shape[-1]))  # noqa: E731
    return out, [torch.cat([past[0], pick(k)], 2), torch.cat([past[1], pick(v)], 2),
                 torch.cat([past[2], chosen & mine.gather(2, index)], 2)]


def _pack(p):
    return [p["budget"], p["window"], p["kernel"]], [p["ratio"]], [], []


def _unpack(ints, floats, strs, weights):
    return {"budget": ints[0], "window": ints[1], "kernel": ints[2], "ratio": floats[0]}


SNAPKV = register_policy(CachePolicy(
    "snapkv", "per KV head, the prompt keys SnapKV keeps (the budget) and the keys decode appends",
    allocate, attend, nbytes, _pack, _unpack,
    exact_decode=lambda p: False,  # decode reads the kept keys: equal to a dense reference over them (tests)
    params_of=lambda a: {k: a[k] for k in ("budget", "ratio", "window", "kernel")}, grow=grow,
    state_names=("key", "value", "kept"), initial=initial, step=step))
