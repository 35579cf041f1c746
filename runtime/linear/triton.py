"""Triton kernel for normalised linear attention, chunked, with the feature map fused (elu, relu, cosine).

One program handles one (batch, head). It walks the sequence in chunks of ``BLOCK`` tokens with the running
state S = Σ φ(k_s)ᵀ v_s [F, D] and z = Σ φ(k_s) [F] in registers (flash-linear-attention's fused-chunk form):

    causal:  O_c = (φ(Q_c) S + tril(φ(Q_c) φ(K_c)ᵀ) V_c) / (φ(Q_c) z + rowsum(tril(...)) + eps),
             then S += φ(K_c)ᵀ V_c and z += Σ φ(K_c)
    bidirectional: a first pass accumulates S and z over all chunks, a second writes φ(Q_c) S / (φ(Q_c) z + eps)

Feature maps (runtime/linear/features.py has the math): elu(x) + 1, relu(x), cosine [x/‖x‖, 1] (its constant feature
kept as Σ v and a key count beside S and z), or ``none``: q and k are features computed by the caller (the
performer and hedgehog maps, ≤ ``MAX_FEATURES`` wide). Hidden keys (padding, or the ``keep`` mask) get
φ(k) = 0. Head and feature dims are padded to powers of two, at least 16, with zero features.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FUSED = {"none": 0, "elu": 1, "relu": 2, "cosine": 3}
MAX_FEATURES = 128  # the state S [F, D] must fit one program's registers


@triton.jit
def _phi(x, valid, FEATURE: tl.constexpr):
    """The feature map on a [BLOCK, F] tile; ``valid`` [F] marks the real (unpadded) dims."""
    if FEATURE == 1:
        x = tl.where(x > 0, x + 1.0, tl.exp(x))
    elif FEATURE == 2:
        x = tl.maximum(x, 0.0)
    elif FEATURE == 3:
        x = x / tl.maximum(tl.sqrt(tl.sum(x * x, 1)), 1e-12)[:, None]
    return tl.where(valid[None, :], x, 0.0)


@triton.jit
def _keys(K, V, KEEP, bh, kv, offs, offs_f, offs_v, n_ctx, d_f, d_v, skh, skn, svh, svn, skeep,
          FEATURE: tl.constexpr, HAS_KEEP: tl.constexpr):
    """φ(K) (hidden keys zeroed), V and the 0/1 keep vector of one chunk."""
    inside = offs < n_ctx
    k = tl.load(K + kv * skh + offs[:, None] * skn + offs_f[None, :],
                mask=inside[:, None] & (offs_f[None, :] < d_f), other=0.0).to(tl.float32)
    v = tl.load(V + kv * svh + offs[:, None] * svn + offs_v[None, :],
                mask=inside[:, None] & (offs_v[None, :] < d_v), other=0.0).to(tl.float32)
    keep = inside.to(tl.float32)
    if HAS_KEEP:
        keep = keep * tl.load(KEEP + bh * skeep + offs, mask=inside, other=0.0).to(tl.float32)
    fk = _phi(k, offs_f < d_f, FEATURE) * keep[:, None]
    return fk, v, keep


@triton.jit
def _linear_fwd(Q, K, V, KEEP, O, n_ctx, groups, d_f, d_v, eps,
                sqh, sqn, skh, skn, svh, svn, skeep, soh, son,
                F: tl.constexpr, DV: tl.constexpr, BLOCK: tl.constexpr, FEATURE: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr):
    bh = tl.program_id(0)  # batch·H + head
    kv = bh // groups  # = batch·Hkv + head // G
    offs_c = tl.arange(0, BLOCK)
    offs_f = tl.arange(0, F)
    offs_v = tl.arange(0, DV)
    s = tl.zeros([F, DV], tl.float32)
    z = tl.zeros([F], tl.float32)
    sv = tl.zeros([DV], tl.float32)  # cosine's constant feature: Σ keep·v and Σ keep
    count = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
    if not CAUSAL:
        for start in range(0, n_ctx, BLOCK):
            fk, v, keep = _keys(K, V, KEEP, bh, kv, start + offs_c, offs_f, offs_v, n_ctx, d_f, d_v, skh, skn, svh,
                                svn, skeep, FEATURE, HAS_KEEP)
            s += tl.dot(tl.trans(fk), v, input_precision="ieee")
            z += tl.sum(fk, 0)
            sv += tl.sum(v * keep[:, None], 0)
            count += tl.sum(keep, 0)
    for start in range(0, n_ctx, BLOCK):
        offs = start + offs_c
        q = tl.load(Q + bh * sqh + offs[:, None] * sqn + offs_f[None, :],
                    mask=(offs[:, None] < n_ctx) & (offs_f[None, :] < d_f), other=0.0).to(tl.float32)
        fq = _phi(q, offs_f < d_f, FEATURE)
        num = tl.dot(fq, s, input_precision="ieee")
        den = tl.sum(fq * z[None, :], 1)
        if FEATURE == 3:
            num += sv[None, :]
            den += count
        if CAUSAL:
            fk, v, keep = _keys(K, V, KEEP, bh, kv, offs, offs_f, offs_v, n_ctx, d_f, d_v, skh, skn, svh, svn,
                                skeep, FEATURE, HAS_KEEP)
            a = tl.dot(fq, tl.trans(fk), input_precision="ieee")
            if FEATURE == 3:
                a += keep[None, :]
            a = tl.where(offs_c[:, None] >= offs_c[None, :], a, 0.0)
            num += tl.dot(a, v, input_precision="ieee")
            den += tl.sum(a, 1)
            s += tl.dot(tl.trans(fk), v, input_precision="ieee")
            z += tl.sum(fk, 0)
            sv += tl.sum(v * keep[:, None], 0)
            count += tl.sum(keep, 0)
        out = num / (den + eps)[:, None]
        tl.store(O + bh * soh + offs[:, None] * son + offs_v[None, :], out.to(O.dtype.element_ty),
                 mask=(offs[:, None] < n_ctx) & (offs_v[None, :] < d_v))


def supports(feature_map: str, features: int) -> bool:
    """Whether the kernel runs this map: elu/relu/cosine fused, others as precomputed features ≤ MAX_FEATURES."""
    return feature_map in ("elu", "relu", "cosine") or features <= MAX_FEATURES


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def linear_attention_triton(q, k, v, keep, feature_map, causal, eps, block=64):
    """q [B, H, N, Dq], k [B, Hkv, N, Dq], v [B, Hkv, N, D] -> [B, H, N, D]. ``feature_map`` is elu, relu or
    cosine (applied here to q and k) or ``none`` (q and k are already φ(q), φ(k)); ``keep`` an optional keep
    mask [.., N] broadcastable to [B, H, N]."""
    b, h, n, dq = q.shape
    hkv, d = k.shape[1], v.shape[-1]
    qf = q.reshape(b * h, n, dq).contiguous()
    kf = k.reshape(b * hkv, n, dq).contiguous()
    vf = v.reshape(b * hkv, n, d).contiguous()
    out = torch.empty(b * h, n, d, dtype=v.dtype, device=v.device)
    if keep is not None:
        while keep.dim() < 3:
            keep = keep.unsqueeze(0)
        keep = keep.to(torch.float32).expand(b, h, n).reshape(b * h, n).contiguous()
    keep_arg = keep if keep is not None else qf
    _linear_fwd[(b * h,)](qf, kf, vf, keep_arg, out, n, h // hkv, dq, d, float(eps),
                          qf.stride(0), qf.stride(1), kf.stride(0), kf.stride(1), vf.stride(0), vf.stride(1),
                          keep_arg.stride(0), out.stride(0), out.stride(1),
                          F=_pow2(dq), DV=_pow2(d), BLOCK=block, FEATURE=FUSED[feature_map], CAUSAL=causal,
                          HAS_KEEP=keep is not None)
    return out.view(b, h, n, d)
