"""The ``full`` cache policy: every key and value of the context (exact attention; a GQA site caches its KV heads
only). Preallocated and grown in chunks of ``GROW`` positions; ``valid`` marks the real (not padding) positions."""
from __future__ import annotations

import torch

from attnforge.codegen import masks
from attnforge.errors import AttnforgeError

from ..cache import CachePolicy, Site, attend_keys, attend_plain, prefill_mask, register_policy

GROW = 256  # positions added when the cache is full


def _chunks(positions: int) -> int:
    """``positions`` rounded up to whole chunks of ``GROW`` (at least one)."""
    return max(GROW, -(-positions // GROW) * GROW)


def allocate(site: Site, batch: int, capacity: int) -> list:
    capacity = _chunks(capacity)
    new = lambda d: torch.zeros(batch, site.kv_heads, capacity, d, dtype=site.dtype, device=site.device)  # noqa: E731
    return [new(site.head_dim), new(site.value_dim), torch.zeros(batch, capacity, dtype=torch.bool,
                                                                 device=site.device)]


def grow(state: list, needed: int) -> list:
    """The state with room for ``needed`` positions: as it is, or grown by whole chunks of ``GROW`` (outside the op,
    which writes its state in place and cannot resize it)."""
    if needed <= state[0].shape[2]:
        return state
    size = _chunks(needed)
    return [torch.nn.functional.pad(t, [0, 0, 0, size - t.shape[2]] if t.dim() == 4 else [0, size - t.shape[1]])
            for t in state]


def write(state: list, k, v, valid, start: int) -> int:
    """Put the current keys at positions start … start + T − 1; the end."""
    end = start + k.shape[2]
    if end > state[0].shape[2]:
        raise AttnforgeError(f"the KV cache holds {state[0].shape[2]} positions, the step needs {end}: grow it first "
                         "(POLICIES['full'].grow)")
    state[0][:, :, start:end] = k
    state[1][:, :, start:end] = v
    state[2][:, start:end] = valid
    return end


def attend(q, k, v, state, valid, start, site: Site):
    """Query t (at position start + t) sees the real keys j ≤ start + t (causal, top-left as the prefill)."""
    end = write(state, k, v, valid, start)
    softcap = site.params.get("softcap", 0.0)
    if start == 0:  # prefill: the variant's own kernel over the prompt (Triton on GPU)
        return torch.ops.attnforge.attention(q, k, v, prefill_mask(valid), site.scale, True, 0.0, softcap)
    visible = state[2][:, None, :end]  # one query at the end sees every key: causality is the prefix itself
    if q.shape[2] > 1:
        visible = masks.dense(masks.causal(), q.shape[2], end, offset=start, device=q.device)[None] & visible
    return attend_keys(q, state[0][:, :, :end], state[1][:, :, :end], visible, site.scale, softcap)


def nbytes(site: Site, batch, context):
    """Keys, values (KV heads only) and one flag per position."""
    item = torch.empty(0, dtype=site.dtype).element_size()
    return batch * context * (site.kv_heads * (site.head_dim + site.value_dim) * item + 1)


def initial(site: Site, batch: int) -> list:
    """No past: keys and values of length 0 (optimum's convention for the first call)."""
    new = lambda d: torch.zeros(batch, site.kv_heads, 0, d, dtype=site.dtype, device=site.device)  # noqa: E731
    return [new(site.head_dim), new(site.value_dim)]


def step(q, k, v, past, mask, site: Site):
    """The exported step (optimum's layout): present = past ++ current; ``mask`` [B, P + T] marks the real
    positions of past and current tokens; query t (position P + t) sees the real j ≤ P + t."""
    keys, values = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
    total, t = keys.shape[2], q.shape[2]
    i = torch.arange(t, device=q.device)[:, None] + (total - t)
    visible = (torch.arange(total, device=q.device)[None] <= i)[None] & mask.bool()[:, None, :]
    return attend_plain(q, keys, values, visible, site.scale, site.params.get("softcap", 0.0)), [keys, values]


FULL = register_policy(CachePolicy(
    "full", "every key and value, KV heads only; grows with the context", allocate, attend, nbytes,
    pack=lambda params: ([], [params.get("softcap", 0.0)], [], []),
    unpack=lambda ints, floats, strs, weights: {"softcap": floats[0] if floats else 0.0},
    params_of=lambda a: {"softcap": float(a.get("softcap") or 0.0)}, grow=grow,
    state_names=("key", "value"), initial=initial, step=step))
