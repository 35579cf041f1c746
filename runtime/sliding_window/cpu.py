"""The PyTorch kernel of ``attnforge::sliding_window_attention``: banded flash attention, work ∝ kept keys.

Queries are cut into blocks of ``bq`` rows; block i reads the keys [i·bq − w + 1, i·bq + bq) through an
overlapping strided view of K and V (no copy), so one batched flash-attention call covers the band with
(bq + w − 1)/w of the minimum work, and one mask template (the window predicate, codegen/masks.py) serves every
block. The blocks at the sequence ends run as small dense slabs; sinks outside the window are merged in by
log-sum-exp. ``block`` (bq) is a tunable (codegen/autotune.py). Under autograd with sinks (the recomputed
backward) it runs the dense rule instead: flash's log-sum-exp, which the sink merge reads, carries no gradient.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from attnforge.codegen import masks
from attnforge.codegen.autotune import Tunable, bucket, lookup, make_key, source_hash

from ..common import NEG, broadcast_mask, flash, merge

BLOCKS = (16, 32, 64, 128, 256)  # query rows per block: the search space of the tunable
DEFAULT = {"block": 64}


def sliding_window_cpu(q, k, v, mask, scale, window, sinks, causal, block=None):
    """Banded flash attention (module docstring); ``block`` None: the tuned block for this shape (or 64)."""
    if sinks > 0 and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        # flash's log-sum-exp has no gradient, so the sink merge would differentiate wrongly: train on the rule
        from .reference import sliding_window_attention

        return sliding_window_attention(q, k, v, mask, scale, window, sinks, causal)
    if block is None:
        block = lookup(lambda: window_key(q, window), DEFAULT)["block"]
    b, h, n, d = q.shape
    kv_heads = k.shape[1]
    groups = h // kv_heads
    add_mask = broadcast_mask(mask, q.dtype, n)
    bq = max(1, min(block, n))
    left, right = window - 1, (0 if causal else window - 1)
    span = bq + left + right  # keys a query block can see through the window
    first = min(-(-left // bq), n // bq)  # blocks whose window would start before key 0
    last = max(first, (n - right) // bq)  # blocks whose rows and window end inside the sequence
    out = q.new_empty(b, h, n, v.shape[-1])
    lse = q.new_empty(b, h, n)
    rows = torch.arange(bq, device=q.device)
    cols = torch.arange(span, device=q.device)
    band = masks.window(window, causal)
    template = torch.zeros(bq, span, dtype=q.dtype, device=q.device).masked_fill_(
        ~masks.evaluate(band, rows[:, None], cols[None] - left), NEG)
    for bi in range(b):
        for g in range(groups):
            heads = slice(g, h, groups)  # query heads that read K/V head kv are kv·G + g
            if last > first:  # interior: block i reads keys [i·bq − left, i·bq + bq + right)
                nblk = last - first
                qi = q[bi, heads, first * bq:last * bq].unflatten(1, (nblk, bq))
                kw, vw = (_windows(x[bi], first * bq - left, nblk, bq, span) for x in (k, v))
                m = template[None, None]
                if add_mask is not None:
                    qpos = (torch.arange(first, last, device=q.device)[:, None] * bq + rows)[..., None]
                    kpos = qpos - rows[:, None] + cols - left
                    m = m + _pick_heads(add_mask[bi], heads, h)[:, qpos.expand_as(kpos), kpos]
                o, l_ = flash(qi, kw, vw, attn_mask=m, scale=scale)
                if sinks > 0 and add_mask is not None:  # rows with no visible key: lse is -inf, not flash's 0
                    l_ = l_.masked_fill((m == NEG).all(-1).expand_as(l_), NEG)
                out[bi, heads, first * bq:last * bq] = o.flatten(1, 2)
                lse[bi, heads, first * bq:last * bq] = l_.flatten(1, 2)
            for r0, r1 in ((0, first * bq), (last * bq, n)):  # the ends: small dense slabs
                if r1 > r0:
                    _slab(q, k, v, add_mask, scale, band, window, causal, bi, heads, h, r0, r1, out, lse)
    if sinks > 0:
        out = _with_sinks(q, k, v, add_mask, scale, window, sinks, causal, out, lse)
    return out


def _windows(x: Tensor, start: int, nblk: int, bq: int, span: int) -> Tensor:
    """Overlapping windows of x [Hkv, N, D]: [Hkv, nblk, span, D], window i = rows start + i·bq ... (a view)."""
    st = x.stride()
    return x.as_strided((x.shape[0], nblk, span, x.shape[2]), (st[0], bq * st[1], st[1], st[2]),
                        x.storage_offset() + start * st[1])


def _pick_heads(m: Tensor, heads: slice, h: int) -> Tensor:
    """The model mask rows of the query heads in ``heads`` ([H|1, N, N] -> [Hkv|1, N, N])."""
    return m[heads] if m.shape[0] == h and h > 1 else m


def _slab(q, k, v, add_mask, scale, band, window, causal, bi, heads, h, r0, r1, out, lse):
    """Dense masked attention for query rows [r0, r1) over the keys their window can reach."""
    n = q.shape[2]
    k0, k1 = max(0, r0 - window + 1), min(n, r1 + (0 if causal else window - 1))
    i = torch.arange(r0, r1, device=q.device)[:, None]
    j = torch.arange(k0, k1, device=q.device)[None]
    m = torch.zeros(r1 - r0, k1 - k0, dtype=q.dtype, device=q.device).masked_fill_(
        ~masks.evaluate(band, i, j), NEG)[None]
    if add_mask is not None:
        m = m + _pick_heads(add_mask[bi], heads, h)[:, r0:r1, k0:k1]
    o, l_ = flash(q[bi, heads, r0:r1][None], k[bi, :, k0:k1][None], v[bi, :, k0:k1][None], attn_mask=m[None],
                  scale=scale)
    out[bi, heads, r0:r1] = o[0]
    # a row with no visible key: flash reports lse 0; it is -inf (matters only when sinks are merged in)
    lse[bi, heads, r0:r1] = l_[0].masked_fill((m == NEG).all(-1).expand_as(l_[0]), NEG)


def _with_sinks(q, k, v, add_mask, scale, window, sinks, causal, out, lse):
    """Add the sink keys j < sinks that lie outside the window, merging by log-sum-exp."""
    n = q.shape[2]
    s = min(sinks, k.shape[2])
    rep = q.shape[1] // k.shape[1]
    ks = k[:, :, :s].repeat_interleave(rep, 1)
    vs = v[:, :, :s].repeat_interleave(rep, 1)
    scores = (q @ ks.transpose(-2, -1)) * scale  # [B, H, N, s]
    i = torch.arange(n, device=q.device)[:, None]
    j = torch.arange(s, device=q.device)[None]
    ok = masks.evaluate(masks.sliding_window(window, sinks, causal) & ~masks.window(window, causal), i, j)
    scores = scores.masked_fill(~ok, NEG)
    if add_mask is not None:
        scores = scores + add_mask[..., :s]
    lse_s = torch.logsumexp(scores, -1)
    o_s = torch.softmax(scores, -1).nan_to_num(0.0) @ vs
    merged, _ = merge(out, lse, o_s, lse_s)
    return merged


@functools.cache
def _source() -> str:
    return source_hash(sliding_window_cpu, _windows, _slab, _with_sinks)


def window_key(q: Tensor, window: int):
    """Cache key of the CPU kernel: the block that wins depends on N, D and the window."""
    return make_key("sliding_window_cpu", _source(), q.dtype, f"n={bucket(q.shape[2])},d={q.shape[-1]},"
                    f"w={bucket(window)}", q.device)


def tunable(q, k, v, mask, scale, window, sinks, causal, device) -> Tunable:
    return Tunable(window_key(q, window), DEFAULT, [{"block": b} for b in BLOCKS],
                   lambda c: sliding_window_cpu(q, k, v, mask, scale, window, sinks, causal, c["block"]), device)
