"""``snapkv``: the KV cache keeps, per KV head, the prompt keys SnapKV selects (approximate at decode).

SnapKV (Li et al., 2024): the last ``window`` queries of the prompt vote for the earlier keys they attend to
(pooled with width ``kernel``, averaged over a GQA group); each KV head keeps ``budget`` keys, the window
included. The prompt's forward pass stays exact, so the rewritten model's prefill outputs equal the original's;
decode reads the kept keys only (runtime/snapkv/). The report measures on the example what decode would see: the
window's outputs over the kept keys against exact attention.
"""
from __future__ import annotations

import sympy
import torch

from attnforge.passes.check import error_stats
from attnforge.patterns import AttentionSite
from attnforge.patterns.graph import example_size, shape
from attnforge.runtime.cache import attend_keys
from attnforge.runtime.snapkv import VARIANT, SnapKVParams, keep_count, select_keys

from .base import REPLAY, ParamError, RewritePass, SkipSite, register
from .fuse_attention import match, needs

N = sympy.Symbol("N", positive=True, integer=True)


def _check_window(site: AttentionSite, window: int, name: str = "window") -> int:
    """The example's length; a ``ParamError`` when the observation window is longer than the user's prompt (not
    on a replay of the recipe for another call form, e.g. generation's short capture: there a prompt shorter than
    the window keeps everything)."""
    n = example_size(shape(site.q)[-2]) if shape(site.q) else None
    if n is not None and window > n and not REPLAY.get():
        raise ParamError(name, f"window={window} is longer than the example prompt ({n} tokens) at "
                               f"{site.fqn or '<root>'}: the observation window must fit in the prompt")
    return n


def apply(edit, site: AttentionSite, params: SnapKVParams):
    if not site.causal:
        raise SkipSite("snapkv compresses a decoder's KV cache: this attention is bidirectional")
    _check_window(site, params.window)
    budget, ratio = params.op_budget()
    out = edit.replace_core(VARIANT.op, site.scale, True, budget, ratio, params.window, params.kernel)
    edit.info.update(_window_error(edit, site, params))
    return out


def _window_error(edit, site: AttentionSite, params: SnapKVParams) -> dict:
    """What decode over the compressed cache costs on the example: the observation window's queries attending
    only the kept keys, against exact attention (the first rows of decode read exactly this)."""
    q, k, v = (edit.values.get(x) for x in (site.q, site.k, site.v))
    if not all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in (q, k, v)):
        return {}
    b, t = q.shape[0], q.shape[2]
    valid = torch.ones(b, t, dtype=torch.bool, device=q.device)
    budget, ratio = params.op_budget()
    index, kept = select_keys(q, k, valid, site.scale, budget, ratio, params.window, params.kernel)
    w = min(params.window, t)
    rows = torch.arange(t - w, t, device=q.device)
    visible = (index[:, :, None, :] <= rows[None, None, :, None]) & kept[:, :, None, :]  # causal, kept
    visible = visible.repeat_interleave(q.shape[1] // k.shape[1], 1)
    pick = lambda x: x.gather(2, index[..., None].expand(*index.shape, x.shape[-1]))  # noqa: E731
    got = attend_keys(q[:, :, t - w:], pick(k), pick(v), visible, site.scale)
    every = (torch.arange(t, device=q.device)[None, :] <= rows[:, None])[None]
    want = attend_keys(q[:, :, t - w:], k, v, every.expand(b, -1, -1), site.scale)
    stats = error_stats(got, want)
    return {"window_error_rel": stats["rel"], "window_error_max_abs": stats["max_abs"]}


def describe(site: AttentionSite, params: SnapKVParams) -> dict:
    n = example_size(shape(site.q)[-2]) if shape(site.q) else None
    budget, ratio = params.op_budget()
    info = {"budget": params.budget, "window": params.window, "kernel": params.kernel, "causal": site.causal,
            "heads": site.num_heads, "kv_heads": site.num_kv_heads,
            "kept_keys": str(keep_count(N, budget, ratio, params.window))}
    if n:
        kept = int(keep_count(n, budget, ratio, params.window))
        info.update(example_n=n, kept_at_n=kept, kept_fraction=kept / n)
    return info


PASS = register(RewritePass("snapkv", "attention", False, match, apply, needs, describe, SnapKVParams))
