"""Triton kernel for block-sparse flash attention, driven by KV block index tables.

One program handles one query block of one (batch, head). It walks the KV blocks listed for its query
block (``counts[b, h, i]`` entries of ``indices[b, h, i, :]``), masks each tile element-wise (sequence end,
causality, sliding window and sinks, the model's additive mask), and keeps the online-softmax running
max ``m``, sum ``l`` and accumulator (FlashAttention, Dao et al. 2022). Sliding-window tables list
only the blocks that touch the band, so the work is O(N·window). GQA: head h reads K/V head h // G.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _block_sparse_fwd(Q, K, V, M, O, COUNTS, INDICES, scale, n_ctx, groups,
                      sqh, sqn, skh, skn, svh, svn, smh, smm, smn, soh, son, sch, sih, siq,
                      D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr,
                      SINKS: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    qb = tl.program_id(0)  # query block
    bh = tl.program_id(1)  # batch·H + head, folded on the host
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_n0 = tl.arange(0, BLOCK_N)
    q = tl.load(Q + bh * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=offs_m[:, None] < n_ctx, other=0.0)
    kv = bh // groups  # = batch·Hkv + head // G, since H = Hkv·G
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    count = tl.load(COUNTS + bh * sch + qb)
    for s in range(0, count):
        kb = tl.load(INDICES + bh * sih + qb * siq + s)
        offs_n = kb * BLOCK_N + offs_n0
        k = tl.load(K + kv * skh + offs_n[:, None] * skn + offs_d[None, :], mask=offs_n[:, None] < n_ctx, other=0.0)
        v = tl.load(V + kv * svh + offs_n[:, None] * svn + offs_d[None, :], mask=offs_n[:, None] < n_ctx, other=0.0)
        qk = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        keep = offs_n[None, :] < n_ctx
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        if WINDOW > 0:
            dist = offs_m[:, None] - offs_n[None, :]
            if CAUSAL:
                inside = dist < WINDOW
            else:
                inside = (dist < WINDOW) & (dist > -WINDOW)
            keep = keep & (inside | (offs_n[None, :] < SINKS))
        qk = tl.where(keep, qk, float("-inf"))
        if HAS_MASK:
            mm = tl.load(M + bh * smh + offs_m[:, None] * smm + offs_n[None, :] * smn,
                         mask=(offs_m[:, None] < n_ctx) & (offs_n[None, :] < n_ctx), other=0.0)
            qk = qk + mm.to(tl.float32)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(qk - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(O + bh * soh + offs_m[:, None] * son + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=offs_m[:, None] < n_ctx)


def block_sparse_triton(q, k, v, mask, scale, counts, indices, block, window=0, sinks=0, causal=True):
    """Run the kernel. q [B, H, N, D], k/v [B, Hkv, N, D]; counts [.., nqb] and indices [.., nqb, W] broadcast
    to [B, H]; ``mask`` additive (or boolean keep), broadcastable to [B, H, N, N]."""
    b, h, n, d = q.shape
    groups = h // k.shape[1]
    nqb = -(-n // block)
    # fold (batch, head) into one program axis: per-(b, h) tensors are made contiguous in that order
    qf = q.reshape(b * h, n, d).contiguous()
    kf = k.reshape(b * k.shape[1], n, d).contiguous()
    vf = v.reshape(b * k.shape[1], n, d).contiguous()
    out = torch.empty_like(qf)
    cnt = counts.expand(b, h, nqb).reshape(b * h, nqb).to(torch.int32).contiguous()
    idx = indices.expand(b, h, nqb, indices.shape[-1]).reshape(b * h, nqb, -1).to(torch.int32).contiguous()
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        mf = mask.expand(b, h, n, n).reshape(b * h, n, n)
        sm = mf.stride()
    else:
        mf, sm = qf, (0, 0, 0)
    grid = (nqb, b * h)
    _block_sparse_fwd[grid](qf, kf, vf, mf, out, cnt, idx, float(scale), n, groups,
                            qf.stride(0), qf.stride(1), kf.stride(0), kf.stride(1), vf.stride(0), vf.stride(1),
                            sm[0], sm[1], sm[2], out.stride(0), out.stride(1), cnt.stride(0), idx.stride(0),
                            idx.stride(1),
                            D=d, BLOCK_M=block, BLOCK_N=block, WINDOW=window, SINKS=sinks, CAUSAL=causal,
                            HAS_MASK=mask is not None)
    return out.view(b, h, n, d)


def window_tables(n: int, block: int, window: int, sinks: int, causal: bool, device=None):
    """Index tables of the KV blocks a sliding window (plus sinks) touches, per query block."""
    nqb = -(-n // block)
    rows = []
    for i in range(nqb):
        lo = max(0, i * block - window + 1)
        hi = min(n - 1, (i + 1) * block - 1 + (0 if causal else window - 1))
        blocks = set(range(lo // block, hi // block + 1)) | set(range(min(-(-sinks // block), nqb)))
        if causal:
            blocks = {j for j in blocks if j <= i}
        rows.append(sorted(blocks))
    width = max(len(r) for r in rows)
    idx = torch.zeros(nqb, width, dtype=torch.int32)
    for i, r in enumerate(rows):
        idx[i, :len(r)] = torch.tensor(r, dtype=torch.int32)
    counts = torch.tensor([len(r) for r in rows], dtype=torch.int32)
    return counts.to(device), idx.to(device)


def sliding_window_triton(q, k, v, mask, scale, window, sinks, causal, block=64):
    counts, idx = window_tables(q.shape[2], block, window, sinks, causal, q.device)
    return block_sparse_triton(q, k, v, mask, scale, counts, idx, block, window, sinks, causal)
