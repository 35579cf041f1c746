"""``think``: the KV cache keeps, per KV head, only the key channels ThinK selects (approximate at decode).

ThinK (Xu et al., 2024): channel c of KV head g scores mean(q_c²) over the prompt's last ``window`` queries (the
group's query heads) times mean(k_c²) over the prompt's keys; the lowest ⌊D · ratio⌋ are pruned from every cached
key, and decode gathers its query's channels to match. The prompt's forward pass stays exact (runtime/think/).
The report measures on the example what decode would see: the window's outputs with pruned keys against exact.
"""
from __future__ import annotations

import torch

from attnforge.passes.check import error_stats
from attnforge.patterns import AttentionSite
from attnforge.runtime.cache import attend_keys
from attnforge.runtime.think import VARIANT, ThinKParams, kept_channels, select_channels
from attnforge.runtime.think.cache import gather_channels

from .base import RewritePass, SkipSite, register
from .fuse_attention import match, needs
from .snapkv import _check_window


def apply(edit, site: AttentionSite, params: ThinKParams):
    if not site.causal:
        raise SkipSite("think compresses a decoder's KV cache: this attention is bidirectional")
    _check_window(site, params.window)
    out = edit.replace_core(VARIANT.op, site.scale, True, float(params.ratio), params.window)
    edit.info.update(_window_error(edit, site, params))
    return out


def _window_error(edit, site: AttentionSite, params: ThinKParams) -> dict:
    q, k, v = (edit.values.get(x) for x in (site.q, site.k, site.v))
    if not all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in (q, k, v)):
        return {}
    b, t = q.shape[0], q.shape[2]
    valid = torch.ones(b, t, dtype=torch.bool, device=q.device)
    channels = select_channels(q, k, valid, params.ratio, params.window)
    w = min(params.window, t)
    rows = torch.arange(t - w, t, device=q.device)
    visible = (torch.arange(t, device=q.device)[None, :] <= rows[:, None])[None].expand(b, -1, -1)
    qw = q[:, :, t - w:]
    got = attend_keys(gather_channels(qw, channels, q.shape[1]), gather_channels(k, channels, k.shape[1]), v,
                      visible, site.scale)
    stats = error_stats(got, attend_keys(qw, k, v, visible, site.scale))
    return {"window_error_rel": stats["rel"], "window_error_max_abs": stats["max_abs"]}


def describe(site: AttentionSite, params: ThinKParams) -> dict:
    d = site.head_dim
    kept = kept_channels(d, params.ratio)
    return {"ratio": params.ratio, "window": params.window, "causal": site.causal, "head_dim": d,
            "kept_channels": kept, "key_bytes_fraction": kept / d, "heads": site.num_heads,
            "kv_heads": site.num_kv_heads}


PASS = register(RewritePass("think", "attention", False, match, apply, needs, describe, ThinKParams))
