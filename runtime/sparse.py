"""Sparse attention ops: sliding window with sinks, and block-sparse (static BigBird or dynamic top-k).

CPU kernels do work proportional to the kept keys. Sliding window: queries are cut into blocks of
``bq`` rows; block i reads the keys [i·bq − w + 1, i·bq + bq) through an overlapping strided view of
K and V (no copy), so one batched flash-attention call covers the band with (bq + w − 1)/w of the
minimum work, and one mask template serves every block. Block-sparse: K/V blocks named by per-query-
block index tables (FlexAttention's BlockMask idea: count + indices, never an N×N mask) are gathered
and attended with the same batched call.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from attnforge.codegen.autotune import Tunable, bucket, lookup, make_key, register_tuner, source_hash

from .dispatch import wants_triton

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
NEG = float("-inf")


# --------------------------------------------------------------------------- helpers


def _additive(mask: Optional[Tensor], dtype, n: int) -> Optional[Tensor]:
    """The model's mask as an additive float mask broadcast to [B|1, H|1, N, N] (a boolean keep-mask
    becomes 0 / −inf)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, NEG)
    mask = mask.to(dtype)
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask.expand(*mask.shape[:2], n, n)


def _merge(o1, lse1, o2, lse2):
    """Combine two softmax-attention partials over disjoint key sets (log-sum-exp merge)."""
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse).nan_to_num(0.0).unsqueeze(-1)
    w2 = torch.exp(lse2 - lse).nan_to_num(0.0).unsqueeze(-1)
    return o1 * w1 + o2 * w2, lse


def _group_views(q: Tensor, kv_heads: int):
    """q [B, H, N, D] -> list of G views [B, Hkv, N, D] (query heads sharing one K/V head)."""
    b, h, n, d = q.shape
    g = h // kv_heads
    if g == 1:
        return [q]
    qg = q.view(b, kv_heads, g, n, d)
    return [qg[:, :, j] for j in range(g)]


def _ungroup(outs: list[Tensor]) -> Tensor:
    if len(outs) == 1:
        return outs[0]
    return torch.stack(outs, dim=2).flatten(1, 2)


# --------------------------------------------------------------------------- sliding window


def window_visible(i: Tensor, j: Tensor, window: int, sinks: int, causal: bool) -> Tensor:
    """The sliding-window rule on query/key positions (DESIGN.md): the reference every kernel matches.

    causal: 0 ≤ i − j < window, or j < sinks (and j ≤ i: sinks never show a query its future);
    bidirectional: |i − j| < window, or j < sinks.
    """
    d = i - j
    sink = (j >= 0) & (j < sinks)
    if causal:
        return ((d >= 0) & (d < window)) | (sink & (d >= 0))
    return (d.abs() < window) | sink


def sliding_window_cpu(q, k, v, mask, scale, window, sinks, causal, block=64):
    """Banded flash attention. Interior query blocks of ``block`` rows read overlapping strided K/V windows
    (no copy) with one shared mask template; the few blocks at the sequence ends run as small dense slabs."""
    b, h, n, d = q.shape
    kv_heads = k.shape[1]
    groups = h // kv_heads
    add_mask = _additive(mask, q.dtype, n)
    bq = max(1, min(block, n))
    left, right = window - 1, (0 if causal else window - 1)
    span = bq + left + right  # keys a query block can see through the window
    first = min(-(-left // bq), n // bq)  # blocks whose window would start before key 0
    last = max(first, (n - right) // bq)  # blocks whose rows and window end inside the sequence
    out = q.new_empty(b, h, n, v.shape[-1])
    lse = q.new_empty(b, h, n)
    rows = torch.arange(bq, device=q.device)
    cols = torch.arange(span, device=q.device)
    template = torch.zeros(bq, span, dtype=q.dtype, device=q.device).masked_fill_(
        ~window_visible(rows[:, None], cols[None] - left, window, 0, causal), NEG)
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
                o, l_ = _flash(qi, kw, vw, attn_mask=m, scale=scale)
                if sinks > 0 and add_mask is not None:  # rows with no visible key: lse is -inf, not flash's 0
                    l_ = l_.masked_fill((m == NEG).all(-1).expand_as(l_), NEG)
                out[bi, heads, first * bq:last * bq] = o.flatten(1, 2)
                lse[bi, heads, first * bq:last * bq] = l_.flatten(1, 2)
            for r0, r1 in ((0, first * bq), (last * bq, n)):  # the ends: small dense slabs
                if r1 > r0:
                    _slab(q, k, v, add_mask, scale, window, causal, bi, heads, h, r0, r1, out, lse)
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


def _slab(q, k, v, add_mask, scale, window, causal, bi, heads, h, r0, r1, out, lse):
    """Dense masked attention for query rows [r0, r1) over the keys their window can reach."""
    n = q.shape[2]
    k0, k1 = max(0, r0 - window + 1), min(n, r1 + (0 if causal else window - 1))
    i = torch.arange(r0, r1, device=q.device)[:, None]
    j = torch.arange(k0, k1, device=q.device)[None]
    m = torch.zeros(r1 - r0, k1 - k0, dtype=q.dtype, device=q.device).masked_fill_(
        ~window_visible(i, j, window, 0, causal), NEG)[None]
    if add_mask is not None:
        m = m + _pick_heads(add_mask[bi], heads, h)[:, r0:r1, k0:k1]
    o, l_ = _flash(q[bi, heads, r0:r1][None], k[bi, :, k0:k1][None], v[bi, :, k0:k1][None], attn_mask=m[None],
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
    inside_window = window_visible(i, j, window, 0, causal)
    ok = window_visible(i, j, window, sinks, causal) & ~inside_window
    scores = scores.masked_fill(~ok, NEG)
    if add_mask is not None:
        scores = scores + add_mask[..., :s]
    lse_s = torch.logsumexp(scores, -1)
    o_s = torch.softmax(scores, -1).nan_to_num(0.0) @ vs
    merged, _ = _merge(out, lse, o_s, lse_s)
    return merged


@torch.library.custom_op("attnforge::sliding_window_attention", mutates_args=())
def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, window: int,
                             sinks: int, causal: bool) -> Tensor:
    """Softmax attention restricted to a sliding window plus attention sinks.

    Local attention as in Longformer/Mistral (key j visible from query i iff 0 ≤ i − j < window,
    or |i − j| < window for bidirectional sites) plus StreamingLLM's sinks (the first ``sinks``
    keys stay visible), ANDed with the model's own ``mask`` (additive or boolean keep-mask).
    q [B, H, N, D], k/v [B, Hkv, N, D] with H a multiple of Hkv.
    """
    if wants_triton(q) and v.shape[-1] == q.shape[-1] and window > 0:
        from attnforge.codegen.attention import attention_triton

        return attention_triton(q, k, v, mask, scale, causal, window=window, sinks=sinks)
    block = lookup(lambda: window_key(q, window), {"block": 64})["block"]
    return sliding_window_cpu(q, k, v, mask, scale, window, sinks, causal, block)


@sliding_window_attention.register_fake
def _(q, k, v, mask, scale, window, sinks, causal):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


# --------------------------------------------------------------------------- block sparse


def static_layout(n_blocks: int, local: int, global_: int, random: int, seed: int, causal: bool):
    """BigBird-style block tables: (counts [nqb], indices [nqb, max]) of KV blocks per query block.

    Query block i sees the ``local`` blocks ending at i (causal) or centred on i (both sides),
    the first ``global_`` blocks, and ``random`` further blocks drawn with ``seed`` (BigBird, Zaheer
    et al. 2020). Bidirectional global query blocks see every block. Causal tables keep j ≤ i only.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n_blocks):
        lo, hi = (i - local + 1, i) if causal else (i - local + 1, i + local - 1)
        keep = set(range(max(lo, 0), min(hi, n_blocks - 1) + 1)) | set(range(min(global_, n_blocks)))
        if not causal and i < global_:
            keep = set(range(n_blocks))
        pool = [j for j in range(n_blocks if not causal else i + 1) if j not in keep]
        if random > 0 and pool:
            pick = torch.randperm(len(pool), generator=gen)[:random]
            keep |= {pool[p] for p in pick.tolist()}
        if causal:
            keep = {j for j in keep if j <= i}
        rows.append(sorted(keep))
    width = max(len(r) for r in rows)
    idx = torch.zeros(n_blocks, width, dtype=torch.int32)
    counts = torch.tensor([len(r) for r in rows], dtype=torch.int32)
    for i, r in enumerate(rows):
        idx[i, :len(r)] = torch.tensor(r, dtype=torch.int32)
        idx[i, len(r):] = r[-1]  # padding slots repeat a valid block; counts say they are unused
    return counts, idx


def topk_layout(q: Tensor, k: Tensor, block: int, topk: int, scale: float, causal: bool):
    """Dynamic tables from mean-pooled blocks (FlexPrefill / Quest): [B, H, nqb], [B, H, nqb, topk + 2].

    score(i, j) = mean(q in block i) · mean(k in block j); query block i keeps its ``topk`` best
    blocks plus block 0 (sink) and its own block (diagonal); causal tables consider j ≤ i only.
    """
    b, h, n, d = q.shape
    nb = -(-n // block)
    pad = nb * block - n
    qm = F.pad(q, (0, 0, 0, pad)).view(b, h, nb, block, d).sum(3) / _block_sizes(n, nb, block, q)
    kk = k.repeat_interleave(h // k.shape[1], 1)
    km = F.pad(kk, (0, 0, 0, pad)).view(b, h, nb, block, d).sum(3) / _block_sizes(n, nb, block, q)
    scores = (qm @ km.transpose(-2, -1)) * scale  # [B, H, nb, nb]
    i = torch.arange(nb, device=q.device)
    if causal:
        scores = scores.masked_fill(i[None, :] > i[:, None], NEG)
    forced = (i[None, :] == i[:, None]) | (i[None, :] == 0)
    scores = scores.masked_fill(forced, float("inf"))  # sink and diagonal always win
    kk_n = min(topk + 2, nb)
    top = scores.topk(kk_n, dim=-1)
    keep = top.values > NEG
    counts = keep.sum(-1).to(torch.int32)
    idx = torch.where(keep, top.indices, top.indices[..., :1]).to(torch.int32)
    return counts, idx


def _block_sizes(n, nb, block, like):
    sizes = torch.full((nb, 1), float(block), dtype=like.dtype, device=like.device)
    sizes[-1] = n - (nb - 1) * block
    return sizes


def block_tables(q, k, block, local, global_, random, seed, topk, scale, causal):
    """(counts, indices) broadcastable to [B, H, nqb] / [B, H, nqb, max] for the op's parameters."""
    if topk > 0:
        return topk_layout(q, k, block, topk, scale, causal)
    nb = -(-q.shape[2] // block)
    counts, idx = static_layout(nb, local, global_, random, seed, causal)
    return counts.to(q.device)[None, None], idx.to(q.device)[None, None].long()


def block_sparse_cpu(q, k, v, mask, scale, block, local, global_, random, seed, topk, causal):
    b, h, n, d = q.shape
    kv_heads = k.shape[1]
    counts, idx = block_tables(q, k, block, local, global_, random, seed, topk, scale, causal)
    idx = idx.long()
    nb = -(-n // block)
    width = idx.shape[-1]
    pad = nb * block - n
    kb = F.pad(k, (0, 0, 0, pad)).view(b, kv_heads, nb, block, d)
    vb = F.pad(v, (0, 0, 0, pad)).view(b, kv_heads, nb, block, d)
    add_mask = _additive(mask, q.dtype, n)
    qpos = torch.arange(nb * block, device=q.device).view(nb, block)  # [nb, block]
    outs = []
    for j, qj in enumerate(_group_views(q, kv_heads)):
        heads = torch.arange(kv_heads, device=q.device) * (h // kv_heads) + j  # query heads of this group slot
        ix = idx.expand(b, h, nb, width)[:, heads]  # [B, Hkv, nb, width]
        ks = _gather_blocks(kb, ix)  # [B, Hkv, nb, width·block, D]
        vs = _gather_blocks(vb, ix)
        kpos = (ix[..., None] * block + torch.arange(block, device=q.device)).flatten(-2)  # [B,Hkv,nb,W·block]
        slot = torch.arange(width, device=q.device).repeat_interleave(block)
        ok = (slot < counts.expand(b, h, nb)[:, heads][..., None]) & (kpos < n)
        ok = ok[..., None, :] & (qpos[None, None, :, :, None] < n)
        if causal:
            ok = ok & (kpos[..., None, :] <= qpos[None, None, :, :, None])
        m = torch.zeros(ok.shape, dtype=q.dtype, device=q.device).masked_fill_(~ok, NEG)
        if add_mask is not None:
            am = add_mask[:, heads] if add_mask.shape[1] == h else add_mask
            qi = qpos.clamp(max=n - 1)[None, None, :, :, None]
            kj = kpos.clamp(max=n - 1)[..., None, :]
            bi = torch.arange(am.shape[0], device=q.device)[:, None, None, None, None]
            hi = torch.arange(am.shape[1], device=q.device)[None, :, None, None, None]
            m = m + am[bi, hi, qi, kj]
        qb = F.pad(qj, (0, 0, 0, pad)).reshape(b * kv_heads, nb, block, d)
        o, _ = _flash(qb, ks.flatten(0, 1), vs.flatten(0, 1), attn_mask=m.flatten(0, 1), scale=scale)
        outs.append(o.reshape(b, kv_heads, nb * block, d)[:, :, :n])
    return _ungroup(outs)


def _gather_blocks(xb: Tensor, ix: Tensor) -> Tensor:
    """xb [B, Hkv, nb, block, D], ix [B, Hkv, nqb, W] -> [B, Hkv, nqb, W·block, D]."""
    b, hk, nb, block, d = xb.shape
    flat = ix.flatten(2)  # [B, Hkv, nqb·W]
    g = torch.gather(xb.flatten(3), 2, flat[..., None].expand(-1, -1, -1, block * d))
    return g.view(b, hk, ix.shape[2], ix.shape[3] * block, d)


@torch.library.custom_op("attnforge::block_sparse_attention", mutates_args=())
def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, block: int,
                           local: int, global_: int, random: int, seed: int, topk: int, causal: bool) -> Tensor:
    """Softmax attention over the KV blocks named by per-query-block index tables.

    Static tables (``topk == 0``) follow BigBird (local + global + seeded random blocks);
    dynamic tables (``topk > 0``) keep each query block's top-k KV blocks by pooled q·k plus the
    first block and the diagonal. Causal sites stay causal on the original positions; the model's
    own ``mask`` is ANDed in. Work is proportional to the kept blocks.
    """
    if wants_triton(q) and v.shape[-1] == q.shape[-1] and block >= 16 and block & (block - 1) == 0:
        from attnforge.codegen.attention import block_sparse_triton

        counts, idx = block_tables(q, k, block, local, global_, random, seed, topk, scale, causal)
        return block_sparse_triton(q, k, v, mask, scale, counts, idx, block, causal)
    return block_sparse_cpu(q, k, v, mask, scale, block, local, global_, random, seed, topk, causal)


@block_sparse_attention.register_fake
def _(q, k, v, mask, scale, block, local, global_, random, seed, topk, causal):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def dense_block_mask(counts: Tensor, idx: Tensor, n: int, block: int, causal: bool) -> Tensor:
    """The boolean [.., N, N] mask an index table stands for (for references and ONNX), keep = True."""
    nb = idx.shape[-2]
    slot = torch.arange(idx.shape[-1], device=idx.device)
    valid = (slot < counts[..., None]).expand(idx.shape).to(torch.int8)
    keep = torch.zeros(*idx.shape[:-2], nb, nb, dtype=torch.int8, device=idx.device)
    keep = keep.scatter_reduce(-1, idx.long(), valid, reduce="amax").bool()  # padding slots repeat a block
    dense = keep.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :n, :n]
    if causal:
        dense = dense & torch.ones(n, n, dtype=torch.bool, device=idx.device).tril()
    return dense


# --------------------------------------------------------------------------- autotuning (codegen/autotune.py)

WINDOW_BLOCKS = (16, 32, 64, 128, 256)  # query rows per block of the CPU sliding-window kernel


@functools.cache
def _window_source() -> str:
    return source_hash(sliding_window_cpu, _windows, _slab, _with_sinks)


def window_key(q: Tensor, window: int):
    """Cache key of the CPU sliding-window kernel: the block that wins depends on N, D and the window."""
    return make_key("sliding_window_cpu", _window_source(), q.dtype,
                    f"n={bucket(q.shape[2])},d={q.shape[-1]},w={bucket(window)}", q.device)


@register_tuner("sliding_window_attention")
def _window_tunables(args, device, backend):
    q, k, v, mask, scale, window, sinks, causal = args
    if backend == "triton":
        from attnforge.codegen.attention import attention_triton, spec_for, tunable

        spec = spec_for(q, k, scale, mask, mask="window", causal=causal, window=window, sinks=sinks)
        return [tunable(spec, q, k, v, mask, lambda c: attention_triton(q, k, v, mask, scale, causal, window=window,
                                                                        sinks=sinks, config=c))]
    return [Tunable(window_key(q, window), {"block": 64}, [{"block": b} for b in WINDOW_BLOCKS],
                    lambda c: sliding_window_cpu(q, k, v, mask, scale, window, sinks, causal, c["block"]), device)]


@register_tuner("block_sparse_attention")
def _block_sparse_tunables(args, device, backend):
    q, k, v, mask, scale, block, local, global_, random, seed, topk, causal = args
    if backend != "triton" or block < 16 or block & (block - 1):
        return []  # the CPU kernel has no free parameter: the block is the layout's
    from attnforge.codegen.attention import block_sparse_triton, spec_for, tunable

    counts, idx = block_tables(q, k, block, local, global_, random, seed, topk, scale, causal)
    spec = spec_for(q, k, scale, mask, mask="block_sparse", causal=causal, block=block)
    return [tunable(spec, q, k, v, mask,
                    lambda c: block_sparse_triton(q, k, v, mask, scale, counts, idx, block, causal, config=c))]


# --------------------------------------------------------------------------- ONNX: masks into the standard composition


def _onnx_positions(op, q, k):
    """i[:, None] − j[None, :] as an ONNX tensor, from the query and key lengths of q and k."""
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    n = op.Squeeze(op.Shape(q, start=-2, end=-1), [0])
    m = op.Squeeze(op.Shape(k, start=-2, end=-1), [0])
    i = op.Unsqueeze(op.Range(zero, n, one), [1])
    j = op.Unsqueeze(op.Range(zero, m, one), [0])
    return op.Sub(i, j), j


def _onnx_masked_attention(op, q, k, v, mask, scale, keep):
    """The attention composition with a boolean ``keep`` ANDed into the model's own mask."""
    from .onnx import _attention_composed

    rank = len(q.shape)
    if mask is not None:
        is_bool = mask.dtype is not None and mask.dtype.name == "BOOL"
        keep = op.And(keep, mask) if is_bool else keep
        extra = None if is_bool else mask
    else:
        extra = None
    zero = op.CastLike(op.Constant(value_float=0.0), q)
    hidden = op.CastLike(op.Constant(value_float=float("-inf")), q)
    additive = op.Where(keep, zero, hidden)
    if extra is not None:
        additive = op.Add(additive, op.CastLike(extra, q))
    return _attention_composed(op, q, k, v, additive, scale, False, rank, q.shape[-3] // k.shape[-3])


def _onnx_window_keep(op, q, k, window, sinks, causal):
    d, j = _onnx_positions(op, q, k)
    w = op.Constant(value_int=window)
    sink = op.Less(j, op.Constant(value_int=sinks))
    if causal:
        ahead = op.GreaterOrEqual(d, op.Constant(value_int=0))
        return op.And(ahead, op.Or(op.Less(d, w), sink))
    return op.Or(op.Less(op.Abs(d), w), sink)


def _register_onnx():
    from .onnx import onnx_translation

    @onnx_translation(torch.ops.attnforge.sliding_window_attention.default)
    def sliding_window_onnx(op, q, k, v, mask, scale, window, sinks, causal):
        """Boolean window(+sinks) mask from positions (Range, Sub, Less), into MatMul/Where/Softmax."""
        return _onnx_masked_attention(op, q, k, v, mask, scale, _onnx_window_keep(op, q, k, window, sinks, causal))

    @onnx_translation(torch.ops.attnforge.block_sparse_attention.default)
    def block_sparse_onnx(op, q, k, v, mask, scale, block, local, global_, random, seed, topk, causal):
        """Static layouts: the index table as a constant boolean mask (shapes are static at export).
        Top-k layouts: pooled scores, TopK and ScatterElements rebuild the table inside the graph."""
        n = q.shape[-2]
        if not isinstance(n, int) or n % block:
            raise ValueError("block_sparse exports with a static sequence length that the block divides")
        nb = n // block
        tril = torch.ones(n, n, dtype=torch.bool).tril()
        if topk == 0:
            counts, idx = static_layout(nb, local, global_, random, seed, causal)
            keep = dense_block_mask(counts, idx, n, block, causal).numpy()
            import onnx.numpy_helper as nh

            return _onnx_masked_attention(op, q, k, v, mask, scale, op.Constant(value=nh.from_array(keep)))
        import onnx.numpy_helper as nh

        from .onnx import _repeat_kv

        groups = q.shape[-3] // k.shape[-3]
        kk = _repeat_kv(op, k, groups)
        pooled_shape = op.Constant(value_ints=[0, 0, nb, block, q.shape[-1]])
        qm = op.ReduceMean(op.Reshape(q, pooled_shape), op.Constant(value_ints=[3]), keepdims=0)
        km = op.ReduceMean(op.Reshape(kk, pooled_shape), op.Constant(value_ints=[3]), keepdims=0)
        scores = op.Mul(op.MatMul(qm, op.Transpose(km, perm=[0, 1, 3, 2])), op.CastLike(
            op.Constant(value_float=scale), q))
        i = torch.arange(nb)
        if causal:
            scores = op.Where(op.Constant(value=nh.from_array((i[None] <= i[:, None]).numpy())), scores,
                              op.CastLike(op.Constant(value_float=float("-inf")), q))
        forced = ((i[None] == i[:, None]) | (i[None] == 0)).numpy()
        scores = op.Where(op.Constant(value=nh.from_array(forced)), op.CastLike(op.Constant(value_float=float("inf")), q),
                          scores)
        values, indices = op.TopK(scores, op.Constant(value_ints=[min(topk + 2, nb)]), axis=-1)
        kept = op.Cast(op.Greater(values, op.CastLike(op.Constant(value_float=float("-inf")), q)), to=1)
        blocks = op.ScatterElements(op.ConstantOfShape(op.Shape(scores)), indices, kept, axis=-1, reduction="max")
        dense = op.Reshape(op.Expand(op.Reshape(blocks, op.Constant(value_ints=[0, 0, nb, 1, nb, 1])),
                                     op.Constant(value_ints=[1, 1, 1, block, 1, block])),
                           op.Constant(value_ints=[0, 0, n, n]))
        keep = op.Cast(dense, to=9)
        if causal:
            keep = op.And(keep, op.Constant(value=nh.from_array(tril.numpy())))
        return _onnx_masked_attention(op, q, k, v, mask, scale, keep)


_register_onnx()
