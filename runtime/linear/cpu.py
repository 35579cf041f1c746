"""The PyTorch kernels of ``attnforge::linear_attention``: chunked causal, bidirectional, and the softmax-window
hybrid. O(N·C·F + N·F·D) work, no loop over tokens or chunks (see the package docstring for the math).

Causal, chunked (as flash-linear-attention): the sequence is cut into chunks of C tokens, and with
V₁ = [V, 1] (the ones column carries the normaliser through the same matmuls)

    O₁[c] = φ(Q_c) · S_{<c} + tril(φ(Q_c) φ(K_c)ᵀ) · V₁[c],   S_{<c} = Σ_{c'<c} φ(K_c')ᵀ V₁[c']

where every chunk's state φ(K_c)ᵀV₁[c] is one batched matmul and S_{<c} one cumulative sum over chunks.
Inputs whose features pass SEGMENT_BYTES run in segments of whole chunks carrying S (a short Python loop), which
bounds memory and keeps buffers reusable. The hybrid uses chunks of C ≥ w tokens: the window of chunk c lies in
chunks c − 1 … c (+ c + 1), gathered as one view per chunk, and the rest comes from prefix (and suffix) sums of
chunk states lagged by two chunks. The chunk length is a tunable (codegen/autotune.py); results do not depend on it.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from attnforge.codegen import masks
from attnforge.codegen.autotune import Tunable, bucket, lookup, make_key, source_hash

from .features import EXP_KERNELS, feature_dim, key_keep, phi

CHUNK = 64  # default chunk length
SEGMENT_BYTES = 8 << 20  # longer inputs run in segments of chunks: buffers stay reusable, not fresh mmaps


def _ones_column(v: Tensor) -> Tensor:
    """V₁ = [V, 1]: the last column of every product with it is the normaliser."""
    v1 = v.new_empty(*v.shape[:-1], v.shape[-1] + 1)
    v1[..., :-1] = v
    v1[..., -1] = 1
    return v1


def _key_side(k, v, key_mask, scale, name, wk, heads):
    """φ(K) [B, H, N, F] (repeated over GQA groups, hidden keys zeroed) and V₁ [B, H, N, D+1]."""
    fk, v1 = phi(k, name, scale, wk), _ones_column(v)
    groups = heads // k.shape[1]
    if groups > 1:
        fk, v1 = fk.repeat_interleave(groups, 1), v1.repeat_interleave(groups, 1)
    keep = key_keep(key_mask, *fk.shape[:3], fk.dtype)
    return (fk if keep is None else fk * keep[..., None]), v1


def _ratio(o1: Tensor, eps: float) -> Tensor:
    """[numerator, normaliser] -> numerator / (normaliser + eps)."""
    return o1[..., :-1] / (o1[..., -1:] + eps)


def _pad_chunks(x: Tensor, chunk: int, before: int = 0, after: int = 0) -> Tensor:
    """Zero-pad the token dim (-2) to a multiple of ``chunk``, plus ``before``/``after`` whole chunks."""
    n = x.shape[-2]
    tail = -n % chunk
    if tail or before or after:
        x = F.pad(x, (0, 0, before * chunk, (after * chunk) + tail))
    return x


def causal_chunked(fq: Tensor, fk: Tensor, v1: Tensor, chunk: int, state: Optional[Tensor] = None):
    """O₁ = tril(φQ φKᵀ) V₁ in chunks; ``state`` [B, H, F, D+1] is Σ φ(k)ᵀv₁ of earlier tokens. Returns
    (O₁ [B, H, N, D+1], state after the last token).

    All (batch, head, chunk) triples are one flat batch of C-row blocks. Chunk i reads the inclusive prefix of
    chunk i − 1, the flat block just before it; the last prefix of each head is zeroed first, so a head's
    first chunk reads nothing (and ``state``, when given, is added for every query afterwards)."""
    b, h, n, f = fq.shape
    d1 = v1.shape[-1]
    c = min(chunk, n)
    fqc, fkc, vc = (_pad_chunks(x, c).reshape(-1, c, x.shape[-1]) for x in (fq, fk, v1))  # [B·H·nc, C, ·]
    out = torch.bmm(torch.bmm(fqc, fkc.transpose(1, 2)).tril_(), vc)  # inside each chunk
    prefix = torch.bmm(fkc.transpose(1, 2), vc).view(b * h, -1, f, d1).cumsum_(1)  # Σ over chunks ≤ i
    last = prefix[:, -1].clone()
    prefix[:, -1] = 0
    flat = prefix.view(-1, f, d1)
    out[1:].baddbmm_(fqc[1:], flat[:-1])  # chunk i += φ(Q_i) · prefix(i − 1)
    out = out.view(b, h, -1, d1)[:, :, :n]
    last = last.view(b, h, f, d1)
    if state is not None:
        out, last = out + fq @ state, last + state
    return out, last


def _segment_len(b: int, h: int, f: int, n: int, chunk: int) -> int:
    """Tokens per segment so one feature tensor stays near SEGMENT_BYTES (whole chunks, at least one)."""
    per_token = b * h * f * 4
    return max(chunk, SEGMENT_BYTES // per_token // chunk * chunk) if per_token * n > SEGMENT_BYTES else n


def _linear_only(q, k, v, key_mask, scale, name, causal, eps, wq, wk, chunk):
    """Causal (chunked) or bidirectional (φQ (φKᵀ V₁)) linear attention, in segments when the input is long."""
    b, h, n, _ = q.shape
    f = feature_dim(name, q.shape[-1], wq)
    seg = _segment_len(b, h, f, n, chunk)
    pieces = [slice(s, min(s + seg, n)) for s in range(0, n, seg)]
    mask_at = (lambda s: None) if key_mask is None else (lambda s: key_mask[..., s])
    if causal:
        outs, state = [], None
        for s in pieces:
            fk, v1 = _key_side(k[:, :, s], v[:, :, s], mask_at(s), scale, name, wk, h)
            o1, state = causal_chunked(phi(q[:, :, s], name, scale, wq), fk, v1, chunk, state)
            outs.append(_ratio(o1, eps))
        return torch.cat(outs, 2) if len(outs) > 1 else outs[0]
    kv = 0
    for s in pieces:  # φ(K)ᵀ V₁ over the whole sequence, then every query reads it
        fk, v1 = _key_side(k[:, :, s], v[:, :, s], mask_at(s), scale, name, wk, h)
        kv = kv + fk.transpose(-1, -2) @ v1
    outs = [_ratio(phi(q[:, :, s], name, scale, wq) @ kv, eps) for s in pieces]
    return torch.cat(outs, 2) if len(outs) > 1 else outs[0]


def hybrid_chunk(chunk: int, window: int, n):
    """The hybrid's chunk length: at least the window, so the window of chunk i lies in chunks i − 1 … i
    (+ i + 1 bidirectional), and about half the causal chunk, so one view of 2 or 3 chunks holds ~``chunk`` keys."""
    c = max(chunk // 2, window)
    return c if not isinstance(n, int) else min(c, n)


def _windows(x: Tensor, chunks: int, span: int) -> Tensor:
    """x [B, H, (chunks + span − 1)·C, E] -> [B, H, chunks, span·C, E]: view i holds chunks i … i + span − 1."""
    xc = x.unflatten(2, (chunks + span - 1, -1))
    return torch.cat([xc[:, :, i:i + chunks] for i in range(span)], -2)


def _hybrid(q, k, v, key_mask, scale, name, causal, window, eps, wq, wk, mix, chunk):
    """The LoLCATs hybrid: exact softmax inside the window, linear attention outside, one normaliser."""
    b, h, n, _ = q.shape
    groups = h // k.shape[1]
    fq, (fk, v1) = phi(q, name, scale, wq), _key_side(k, v, key_mask, scale, name, wk, h)
    mix = q.new_zeros(h) if mix is None else mix
    c = hybrid_chunk(chunk, window, n)
    after = 0 if causal else 1
    span = 2 + after
    kk = k.repeat_interleave(groups, 1) if groups > 1 else k
    keep = key_keep(key_mask, b, h, n, q.dtype)
    valid = torch.ones(b, h, n, 1, dtype=q.dtype, device=q.device) if keep is None else keep[..., None]
    nc = -(-n // c)
    fq_c, q_c = (_pad_chunks(x, c).unflatten(2, (nc, c)) for x in (fq, q))
    k_w, fk_w, v_w, valid_w = (_windows(_pad_chunks(x, c, 1, after), nc, span) for x in (kk, fk, v1, valid))
    r = torch.arange(c, device=q.device)[:, None]
    t = torch.arange(span * c, device=q.device)[None]
    qpos = c + r  # positions inside a window view: the query's chunk starts at c, the view at 0
    rule, near = masks.causal() if causal else masks.KEEP_ALL, masks.window(window, causal)
    band = masks.evaluate(near, qpos, t)
    outside = masks.evaluate(masks.and_masks(rule, ~near), qpos, t)
    s = (q_c @ k_w.transpose(-1, -2)) * scale  # [B, H, nc, C, span·C]
    visible = band & (valid_w.transpose(-1, -2) > 0)
    s = s.masked_fill(~visible, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = m.masked_fill(m == float("-inf"), 0.0)
    rho = torch.exp(-m) if name in EXP_KERNELS else 1.0  # exp-kernel maps: the rest on the window's e^{s − m} scale
    weight = torch.exp(mix).to(q.dtype)[None, :, None, None, None] * torch.exp(s - m)
    weight = weight + (fq_c @ fk_w.transpose(-1, -2)) * outside * rho
    o1 = weight @ v_w  # [B, H, nc, C, D+1]
    states = (_pad_chunks(fk, c).unflatten(2, (nc, c)).transpose(-1, -2) @ _pad_chunks(v1, c).unflatten(2, (nc, c)))
    far = _shifted_prefix(states, 2)  # chunks ≤ i − 2
    if not causal:
        far = far + _shifted_prefix(states.flip(2), 2).flip(2)  # chunks ≥ i + 2
    o1 = o1 + (fq_c @ far) * rho
    return _ratio(o1.flatten(2, 3)[:, :, :n], eps)


def _shifted_prefix(states: Tensor, lag: int) -> Tensor:
    """out[i] = Σ_{j ≤ i − lag} states[j] along dim 2."""
    total = states.cumsum(2)
    zeros = states.new_zeros(*states.shape[:2], min(lag, states.shape[2]), *states.shape[3:])
    return torch.cat([zeros, total[:, :, :states.shape[2] - lag]], 2)


def linear_attention_cpu(q, k, v, key_mask, scale, feature_map, causal, window, eps, wq, wk, mix, chunk=None):
    """The PyTorch kernel of ``attnforge::linear_attention`` (differentiable, any device); ``chunk`` None: the
    tuned chunk for this shape (or CHUNK)."""
    if chunk is None:
        chunk = lookup(lambda: chunk_key(q, feature_map, causal, window, wq), {"chunk": CHUNK})["chunk"]
    if q.dim() == 3:  # [B·H, N, D] spellings
        out = linear_attention_cpu(q[None], k[None], v[None], key_mask, scale, feature_map, causal, window, eps,
                                   wq, wk, mix, chunk)
        return out[0]
    if window > 0:
        return _hybrid(q, k, v, key_mask, scale, feature_map, causal, window, eps, wq, wk, mix, chunk)
    return _linear_only(q, k, v, key_mask, scale, feature_map, causal, eps, wq, wk, chunk)


CHUNKS = (16, 32, 64, 128, 256)


@functools.cache
def _chunk_source() -> str:
    return source_hash(linear_attention_cpu, _linear_only, _hybrid, causal_chunked)


def chunk_key(q: Tensor, feature_map: str, causal: bool, window: int, w: Optional[Tensor]):
    """Cache key of the CPU kernels' chunk length: it depends on N, D, the feature width and the variant."""
    f = feature_dim(feature_map, q.shape[-1], w)
    variant = f"{feature_map}{'_causal' if causal else ''}{f'_w{window}' if window else ''}"
    return make_key(f"linear_cpu_{variant}", _chunk_source(), q.dtype, f"n={bucket(q.shape[-2])},d={q.shape[-1]},f={f}",
                    q.device)


def tunable(args, device) -> Tunable:
    q, k, v, key_mask, scale, feature_map, causal, window, eps, wq, wk, mix = args
    return Tunable(chunk_key(q, feature_map, causal, window, wq), {"chunk": CHUNK}, [{"chunk": c} for c in CHUNKS],
                    lambda c: linear_attention_cpu(q, k, v, key_mask, scale, feature_map, causal, window, eps, wq, wk,
                                                   mix, c["chunk"]), device)
