"""Linear (kernelised) attention ops: six feature maps, chunked causal kernels, a softmax-window hybrid, decode.

With a feature map φ, attention weights φ(q_t)·φ(k_s) replace exp(s·q_t·k_s) and the output is normalised:

    causal:        o_t = φ(q_t) Σ_{s≤t} φ(k_s)ᵀ v_s / (φ(q_t) · Σ_{s≤t} φ(k_s) + eps)
    bidirectional: o_t = φ(q_t) (φ(K)ᵀ V) / (φ(q_t) · Σ_s φ(k_s) + eps)

(Katharopoulos et al. 2020, "Transformers are RNNs"). A key the model's padding mask hides gets φ(k) = 0.

Causal CPU kernel, chunked (as flash-linear-attention): the sequence is cut into chunks of C tokens, and with
V₁ = [V, 1] (the ones column carries the normaliser through the same matmuls)

    O₁[c] = φ(Q_c) · S_{<c} + tril(φ(Q_c) φ(K_c)ᵀ) · V₁[c],   S_{<c} = Σ_{c'<c} φ(K_c')ᵀ V₁[c']

where every chunk's state φ(K_c)ᵀV₁[c] is one batched matmul and S_{<c} one cumulative sum over chunks:
O(N·C·F + N·F·D) work, no loop over tokens or chunks. Inputs whose features pass SEGMENT_BYTES run in segments
of whole chunks carrying S (a short Python loop), which bounds memory and keeps buffers reusable.

``window > 0`` is the LoLCATs hybrid (Zhang et al. 2024, "LoLCATs: On Low-Rank Linearizing of Large Language
Models"; BASED, Arora et al. 2024, pairs Taylor linear attention with exact local softmax): keys inside the
window (causal 0 ≤ t − s < w, bidirectional |t − s| < w) get exact softmax weights, the rest linear ones,
under one normaliser with a per-head window weight γ = exp(mix):

    o_t = (γ Σ_win e^{s_ts − m_t} v_s + Σ_rest φ(q_t)·φ(k_s) v_s)
          / (γ Σ_win e^{s_ts − m_t} + Σ_rest φ(q_t)·φ(k_s) + eps)

with s_ts = scale·q_t·k_s and m_t the maximum over the window (LoLCATs writes γ = σ(α), α learned; the map's
scale of φ(q)·φ(k) varies, so γ here is unbounded, see ``window_weight``). taylor and performer estimate
exp(s_ts) itself, so for them the rest is put on the window's scale, Σ_rest e^{−m_t} φ(q_t)·φ(k_s), and γ = 1:
exact weights near the query, kernel estimates of the same weights further away (BASED's pairing). Its kernel
uses chunks of C ≥ w tokens: the window of chunk c lies in chunks c − 1 … c (+ c + 1), gathered as one view
per chunk, and the rest comes from prefix (and suffix) sums of chunk states lagged by two chunks.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from attnforge.codegen.autotune import Tunable, bucket, lookup, make_key, register_tuner, source_hash

from .dispatch import wants_triton

FEATURE_MAPS = ("elu", "relu", "cosine", "taylor", "performer", "hedgehog")
EXP_KERNELS = ("taylor", "performer")  # maps whose φ(q)·φ(k) estimates exp(scale·q·k) itself
CHUNK = 64  # chunk length of the CPU kernels (a tunable: results do not depend on it)
SEGMENT_BYTES = 8 << 20  # longer inputs run in segments of chunks: buffers stay reusable, not fresh mmaps


# --------------------------------------------------------------------------- feature maps


def feature_dim(feature_map: str, head_dim: int, w: Optional[Tensor] = None) -> int:
    """F, the length of φ(x) for a head of ``head_dim``."""
    return {"elu": head_dim, "relu": head_dim, "cosine": head_dim + 1,
            "taylor": 1 + head_dim + head_dim * (head_dim + 1) // 2,
            "performer": w.shape[-1] if w is not None else 0,
            "hedgehog": 2 * w.shape[-1] if w is not None else 0}[feature_map]


def phi(x: Tensor, name: str, scale: float, w: Optional[Tensor] = None) -> Tensor:
    """φ(x) for x [..., H, N, D]; the maps are documented in docs/rewrites/linear.md.

    elu        elu(x) + 1                                            (Katharopoulos et al. 2020)
    relu       relu(x)                                               (Qin et al. 2022, cosFormer's base map)
    cosine     [x/‖x‖, 1]: φ(q)·φ(k) = 1 + cos(q, k) ≥ 0              (Cottention, Mongaras et al. 2024)
    taylor     [1, x', x'_i x'_j (i<j), x'_i²/√2], x' = √scale·x:       (BASED, Arora et al. 2024)
               φ(q)·φ(k) = 1 + u + u²/2, u = scale·q·k
    performer  exp(x'W − ‖x'‖²/2)/√m, x' = √scale·x, W [D, m] with    (FAVOR+, Choromanski et al. 2021)
               orthogonal random columns: E[φ(q)·φ(k)] = exp(scale·q·k)
    hedgehog   [softmax(xW_h), softmax(−xW_h)], W_h [D, F] per head     (Hedgehog, Zhang et al. 2024)
    """
    if name == "elu":
        return F.elu(x).add_(1)  # elu's backward reads its input, not this output
    if name == "relu":
        return F.relu(x)
    if name == "cosine":
        return torch.cat([F.normalize(x, dim=-1), x.new_ones(*x.shape[:-1], 1)], -1)
    if name == "taylor":
        xs = x * math.sqrt(scale)
        i, j = torch.triu_indices(x.shape[-1], x.shape[-1], device=x.device)
        coef = torch.where(i == j, 2 ** -0.5, 1.0).to(x.dtype)
        return torch.cat([x.new_ones(*x.shape[:-1], 1), xs, xs[..., i] * xs[..., j] * coef], -1)
    if name == "performer":
        xs = x * math.sqrt(scale)
        return torch.exp(xs @ w - (xs * xs).sum(-1, keepdim=True) / 2) * w.shape[-1] ** -0.5
    if name == "hedgehog":
        y = x @ w
        return torch.cat([torch.softmax(y, -1), torch.softmax(-y, -1)], -1)
    raise ValueError(f"unknown feature map {name!r}; one of {FEATURE_MAPS}")


def orthogonal_features(head_dim: int, features: int, seed: int) -> Tensor:
    """FAVOR+ projection W [D, m]: blocks of D orthogonal directions with χ(D)-distributed norms (seeded), so
    each column is marginally N(0, I) and the columns within a block are orthogonal (lower variance)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(-(-features // head_dim)):
        g = torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64)
        qmat, r = torch.linalg.qr(g)
        qmat = qmat * torch.sign(torch.diagonal(r))  # a uniformly random rotation
        norms = torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64).norm(dim=0)
        blocks.append(qmat * norms)
    return torch.cat(blocks, 1)[:, :features].float()


def flops(n, heads: int, head_dim: int, features: int, causal: bool, window: int = 0, chunk: int = CHUNK):
    """Matmul FLOPs of the kernels at length ``n`` (an int or a sympy symbol): chunk states φ(K)ᵀV₁ and their
    read-out φ(Q)S, plus the intra-chunk tril(φQ φKᵀ)V₁ (causal) or the window views (hybrid)."""
    h, d, f = heads, head_dim, features
    total = 4 * h * n * f * (d + 1)
    if window:
        span = (2 if causal else 3) * hybrid_chunk(chunk, window, n)  # keys one query's window view holds
        total += 2 * h * n * span * (d + f + d + 1)  # scores, φ products in the view, weights·V₁
    elif causal:
        total += 2 * h * n * chunk * (f + d + 1)
    return total


def hedgehog_init(heads: int, head_dim: int) -> Tensor:
    """Hedgehog's map weights, one identity matrix per head: [H, D, D]."""
    return torch.eye(head_dim).expand(heads, head_dim, head_dim).clone()


# --------------------------------------------------------------------------- helpers


def _keep(key_mask: Optional[Tensor], b: int, h: int, n: int, dtype) -> Optional[Tensor]:
    """The boolean key mask [.., N] (≤ 3 dims) as 0/1 of ``dtype``, broadcast to [B, H, N]."""
    if key_mask is None:
        return None
    m = key_mask
    while m.dim() < 3:
        m = m.unsqueeze(0)
    return m.to(dtype).expand(b, h, n)


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
    keep = _keep(key_mask, *fk.shape[:3], fk.dtype)
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


# --------------------------------------------------------------------------- causal and bidirectional kernels


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
    keep = _keep(key_mask, b, h, n, q.dtype)
    valid = torch.ones(b, h, n, 1, dtype=q.dtype, device=q.device) if keep is None else keep[..., None]
    nc = -(-n // c)
    fq_c, q_c = (_pad_chunks(x, c).unflatten(2, (nc, c)) for x in (fq, q))
    k_w, fk_w, v_w, valid_w = (_windows(_pad_chunks(x, c, 1, after), nc, span) for x in (kk, fk, v1, valid))
    r = torch.arange(c, device=q.device)[:, None]
    t = torch.arange(span * c, device=q.device)[None]
    dist = c + r - t  # query position minus key position inside a window view
    band = ((dist >= 0) & (dist < window)) if causal else (dist.abs() < window)
    outside = (dist >= window) if causal else (dist.abs() >= window)
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


def linear_attention_cpu(q, k, v, key_mask, scale, feature_map, causal, window, eps, wq, wk, mix, chunk=CHUNK):
    """The CPU kernel of ``attnforge::linear_attention`` (pure PyTorch, differentiable, any device)."""
    if q.dim() == 3:  # [B·H, N, D] spellings
        out = linear_attention_cpu(q[None], k[None], v[None], key_mask, scale, feature_map, causal, window, eps,
                                   wq, wk, mix, chunk)
        return out[0]
    if window > 0:
        return _hybrid(q, k, v, key_mask, scale, feature_map, causal, window, eps, wq, wk, mix, chunk)
    return _linear_only(q, k, v, key_mask, scale, feature_map, causal, eps, wq, wk, chunk)


# --------------------------------------------------------------------------- the op


@torch.library.custom_op("attnforge::linear_attention", mutates_args=())
def linear_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], scale: float, feature_map: str,
                     causal: bool, window: int, eps: float, wq: Optional[Tensor], wk: Optional[Tensor],
                     mix: Optional[Tensor]) -> Tensor:
    """Normalised linear attention with feature map ``feature_map`` (module docstring for the math).

    q [B, H, N, D], k/v [B, Hkv, N, D] (query head h reads K/V head h // (H/Hkv)); ``key_mask`` boolean keep
    [.., N] broadcastable to [B, H, N] (hidden keys get φ(k) = 0); ``scale`` the softmax scale (taylor,
    performer and the window use it); ``wq``/``wk`` the map's weights (performer: W [D, m] for both;
    hedgehog: [H, D, F] and [Hkv, D, F]); ``window > 0``: the LoLCATs hybrid with log window weights
    ``mix`` [H] (γ = exp(mix)).
    """
    if wants_triton(q):
        return linear_attention_triton_op(q, k, v, key_mask, scale, feature_map, causal, window, eps, wq, wk, mix)
    chunk = lookup(lambda: chunk_key(q, feature_map, causal, window, wq), {"chunk": CHUNK})["chunk"]
    return linear_attention_cpu(q, k, v, key_mask, scale, feature_map, causal, window, eps, wq, wk, mix, chunk)


@linear_attention.register_fake
def _(q, k, v, key_mask, scale, feature_map, causal, window, eps, wq, wk, mix):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _setup(ctx, inputs, output):
    q, k, v, key_mask, scale, feature_map, causal, window, eps, wq, wk, mix = inputs
    ctx.save_for_backward(q, k, v, key_mask, wq, wk, mix)
    ctx.args = (scale, feature_map, causal, window, eps)


def _backward(ctx, grad):
    """Gradients (hedgehog maps, window weights, q/k/v) by differentiating the PyTorch kernel on the saved
    inputs: the forward is recomputed with autograd on, as flash attention's backward does."""
    saved = ctx.saved_tensors
    needs = [ctx.needs_input_grad[i] for i in (0, 1, 2, 3, 9, 10, 11)]
    wants = [w and t is not None and t.is_floating_point() for t, w in zip(saved, needs)]
    with torch.enable_grad():
        q, k, v, key_mask, wq, wk, mix = (t.detach().requires_grad_(w) if t is not None else None
                                          for t, w in zip(saved, wants))
        scale, name, causal, window, eps = ctx.args
        out = linear_attention_cpu(q, k, v, key_mask, scale, name, causal, window, eps, wq, wk, mix)
        leaves = [t for t, w in zip((q, k, v, key_mask, wq, wk, mix), wants) if w]
        grads = iter(torch.autograd.grad(out, leaves, grad, allow_unused=True))
    g = [next(grads) if w else None for w in wants]
    return g[0], g[1], g[2], g[3], None, None, None, None, None, g[4], g[5], g[6]


linear_attention.register_autograd(_backward, setup_context=_setup)


def linear_attention_triton_op(q, k, v, key_mask, scale, feature_map, causal, window, eps, wq, wk, mix):
    """Triton for window 0: elu/relu/cosine fused into the kernel, performer/hedgehog features computed here and
    passed in. The PyTorch kernel, on the GPU, runs the hybrid and taylor (features wider than the kernel's
    registers hold, codegen/linear_attention.py)."""
    from attnforge.codegen.linear_attention import linear_attention_triton, supports

    if window > 0 or q.dim() != 4 or not supports(feature_map, feature_dim(feature_map, q.shape[-1], wq)):
        return linear_attention_cpu(q, k, v, key_mask, scale, feature_map, causal, window, eps, wq, wk, mix)
    if feature_map in ("elu", "relu", "cosine"):
        return linear_attention_triton(q, k, v, key_mask, feature_map, causal, eps)
    fq, fk = phi(q, feature_map, scale, wq), phi(k, feature_map, scale, wk)
    return linear_attention_triton(fq, fk, v, key_mask, "none", causal, eps)


# --------------------------------------------------------------------------- autotuning (codegen/autotune.py)

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


@register_tuner("linear_attention")
def _linear_tunables(args, device, backend):
    q, k, v, key_mask, scale, feature_map, causal, window, eps, wq, wk, mix = args
    if backend == "triton":
        return []  # the Triton kernel's chunk is its register tile: fixed by the feature width
    return [Tunable(chunk_key(q, feature_map, causal, window, wq), {"chunk": CHUNK}, [{"chunk": c} for c in CHUNKS],
                    lambda c: linear_attention_cpu(q, k, v, key_mask, scale, feature_map, causal, window, eps, wq, wk,
                                                   mix, c["chunk"]), device)]


# --------------------------------------------------------------------------- decode: a fixed-size recurrent state


def decode_state(batch: int, heads: int, head_dim: int, feature_map: str, w: Optional[Tensor] = None,
                 dtype=torch.float32, device=None) -> tuple[Tensor, Tensor]:
    """The empty recurrent state (S [B, H, F, D] = 0, z [B, H, F] = 0) of a causal linear attention layer."""
    f = feature_dim(feature_map, head_dim, w)
    return (torch.zeros(batch, heads, f, head_dim, dtype=dtype, device=device),
            torch.zeros(batch, heads, f, dtype=dtype, device=device))


@torch.library.custom_op("attnforge::linear_attention_decode", mutates_args=())
def linear_attention_decode(state: Tensor, z: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float,
                            feature_map: str, eps: float, wq: Optional[Tensor],
                            wk: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """One generation step of causal linear attention (the recurrent form):

        S' = S + φ(k_t)ᵀ v_t,   z' = z + φ(k_t),   o_t = φ(q_t) S' / (φ(q_t)·z' + eps)

    q [B, H, D], k/v [B, Hkv, D], S [B, H, F, D], z [B, H, F]; memory per step is constant (F·D per head).
    Returns (o_t [B, H, D], S', z'). Window-0 layers only: the hybrid would also keep its last w keys.
    """
    groups = q.shape[1] // k.shape[1]
    fq = phi(q[:, :, None], feature_map, scale, wq)[:, :, 0]  # [B, H, F]
    fk = phi(k[:, :, None], feature_map, scale, wk)[:, :, 0]
    if groups > 1:
        fk, v = fk.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    state = state + fk[..., :, None] * v[..., None, :]
    z = z + fk
    num = (fq[..., None, :] @ state)[..., 0, :]
    return num / ((fq * z).sum(-1, keepdim=True) + eps), state, z


@linear_attention_decode.register_fake
def _(state, z, q, k, v, scale, feature_map, eps, wq, wk):
    return q.new_empty((*q.shape[:-1], v.shape[-1])), torch.empty_like(state), torch.empty_like(z)


# --------------------------------------------------------------------------- the softmax layer it replaces


def _quadratic_parts(q, k, key_mask, scale, name, causal, window, wq, wk):
    """(φ(Q)φ(K)ᵀ, e^{s − m}, window pairs, other visible pairs) as dense [B, H, N, N] tensors."""
    groups = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(groups, 1)
    a = phi(q, name, scale, wq) @ phi(k, name, scale, wk).repeat_interleave(groups, 1).transpose(-1, -2)
    i = torch.arange(q.shape[2], device=q.device)[:, None] + (k.shape[2] - q.shape[2])
    dist = i - torch.arange(k.shape[2], device=q.device)[None]
    visible = (dist >= 0) if causal else torch.ones_like(dist, dtype=torch.bool)
    if key_mask is not None:
        visible = visible & _keep(key_mask, *kk.shape[:3], torch.float32)[:, :, None, :].bool()
    band = visible & (((dist >= 0) & (dist < window)) if causal else (dist.abs() < window))
    s = ((q @ kk.transpose(-1, -2)) * scale).masked_fill(~band, float("-inf"))
    m = s.amax(-1, keepdim=True)
    e = torch.exp(s - m.masked_fill(m == float("-inf"), 0.0))
    return a, e, band, visible & ~band


@torch.no_grad()
def window_weight(q, k, key_mask, scale, name, causal, window, wq=None, wk=None, rows=256) -> Tensor:
    """Initial log window weights [H] of the hybrid, from example q/k: per head, γ makes the window's total
    softmax weight γ·Σ_win e^{s − m} equal the weight the linear map gives the same pairs, Σ_win φ(q)·φ(k), so
    the window redistributes the linear kernel's mass by exact softmax instead of changing its share. Computed
    on the last ``rows`` queries (the quadratic form)."""
    if name in EXP_KERNELS:
        return q.new_zeros(q.shape[1])
    q = q[..., -rows:, :]
    a, e, band, _ = _quadratic_parts(q, k, key_mask, scale, name, causal, window, wq, wk)
    dims = [d for d in range(a.dim()) if d != 1]
    lin, soft = (a * band).sum(dims), (e * band).sum(dims)
    ok = (lin > 0) & (soft > 0)
    return torch.where(ok, lin.clamp_min(1e-30).log() - soft.clamp_min(1e-30).log(), torch.zeros_like(lin))



def softmax_attention(q, k, v, key_mask, scale, causal):
    """softmax(scale·q kᵀ) v over the keys ``key_mask`` keeps (and j ≤ i when causal): the layer a linear site
    replaced, rebuilt from the op's own arguments (calibration targets). Rows with no visible key give 0."""
    groups = q.shape[-3] // k.shape[-3]
    if groups > 1:
        k, v = k.repeat_interleave(groups, -3), v.repeat_interleave(groups, -3)
    n, m = q.shape[-2], k.shape[-2]
    keep = torch.ones(n, m, dtype=torch.bool, device=q.device)
    if causal:
        keep = keep.tril()
    if key_mask is not None:
        km = key_mask
        while km.dim() < q.dim() - 1:
            km = km.unsqueeze(0)
        keep = keep & km.unsqueeze(-2)
    s = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0) @ v


# --------------------------------------------------------------------------- ONNX: the quadratic masked form


def _register_onnx():
    from .onnx import _const, _repeat_kv, onnx_translation

    def phi_onnx(op, x, name, scale, w):
        if name == "elu":
            return op.Add(op.Elu(x, alpha=1.0), _const(op, 1.0, x))
        if name == "relu":
            return op.Relu(x)
        if name == "cosine":
            norm = op.Max(op.Sqrt(op.ReduceSum(op.Mul(x, x), op.Constant(value_ints=[-1]), keepdims=1)),
                          _const(op, 1e-12, x))
            return op.Div(x, norm)  # the constant feature is added to the kernel below
        if name == "performer":
            xs = op.Mul(x, _const(op, math.sqrt(scale), x))
            half_norm = op.Div(op.ReduceSum(op.Mul(xs, xs), op.Constant(value_ints=[-1]), keepdims=1),
                               _const(op, 2.0, x))
            return op.Mul(op.Exp(op.Sub(op.MatMul(xs, w), half_norm)), _const(op, w.shape[-1] ** -0.5, x))
        y = op.MatMul(x, w)  # hedgehog
        return op.Concat(op.Softmax(y, axis=-1), op.Softmax(op.Neg(y), axis=-1), axis=-1)

    @onnx_translation(torch.ops.attnforge.linear_attention.default)
    def linear_attention_onnx(op, q, k, v, key_mask, scale, feature_map, causal, window, eps, wq, wk, mix):
        """Kernel matrix A = φ(Q)φ(K)ᵀ (taylor: 1 + u + u²/2 from Q Kᵀ), masked by causality, the key mask and
        (hybrid) the window, whose softmax weights are added; then (A V) / (rowsum A + eps). Quadratic in N."""
        if len(q.shape) != 4:
            raise ValueError("linear_attention exports [B, H, N, D] inputs")
        groups = q.shape[-3] // k.shape[-3]
        perm = [0, 1, 3, 2]
        if feature_map == "taylor":
            u = op.Mul(op.MatMul(q, op.Transpose(_repeat_kv(op, k, groups), perm=perm)), _const(op, scale, q))
            a = op.Add(op.Add(_const(op, 1.0, q), u), op.Mul(op.Mul(u, u), _const(op, 0.5, q)))
        else:
            fq, fk = phi_onnx(op, q, feature_map, scale, wq), phi_onnx(op, k, feature_map, scale, wk)
            a = op.MatMul(fq, op.Transpose(_repeat_kv(op, fk, groups), perm=perm))
            if feature_map == "cosine":
                a = op.Add(a, _const(op, 1.0, q))
        zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
        n = op.Squeeze(op.Shape(q, start=-2, end=-1), [0])
        dist = op.Sub(op.Unsqueeze(op.Range(zero, n, one), [1]), op.Unsqueeze(op.Range(zero, n, one), [0]))
        visible = op.GreaterOrEqual(dist, zero) if causal else op.Equal(dist, dist)
        if key_mask is not None:
            visible = op.And(visible, op.Unsqueeze(key_mask, [-2]))
        zeros = op.CastLike(op.Constant(value_float=0.0), q)
        if window == 0:
            weight = op.Where(visible, a, zeros)
        else:
            w = op.Constant(value_int=window)
            band = op.Less(dist, w) if causal else op.Less(op.Abs(dist), w)
            in_band, far = op.And(visible, band), op.And(visible, op.Not(band))
            s = op.Mul(op.MatMul(q, op.Transpose(_repeat_kv(op, k, groups), perm=perm)), _const(op, scale, q))
            s = op.Where(in_band, s, _const(op, -math.inf, q))
            m = op.ReduceMax(s, op.Constant(value_ints=[-1]), keepdims=1)
            m = op.Where(op.IsInf(m), zeros, m)
            e = op.Where(in_band, op.Exp(op.Sub(s, m)), zeros)
            gamma = op.Reshape(op.Exp(op.CastLike(mix, q)), op.Constant(value_ints=[-1, 1, 1]))
            rest = op.Where(far, a, zeros)
            if feature_map in EXP_KERNELS:
                rest = op.Mul(rest, op.Exp(op.Neg(m)))
            weight = op.Add(op.Mul(gamma, e), rest)
        num = op.MatMul(weight, _repeat_kv(op, v, groups))
        den = op.Add(op.ReduceSum(weight, op.Constant(value_ints=[-1]), keepdims=1), _const(op, eps, q))
        return op.Div(num, den)


_register_onnx()
