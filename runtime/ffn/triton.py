"""Triton kernels for the ``attnforge::ffn`` op: two matmuls with their epilogues fused.

With X the rows of the input flattened to [M, D_in] and ``act`` one of ``ACTIVATIONS``:

    gated (GLU variants, Shazeer 2020):  H = act(X W_g + b_g) ⊙ (X W_u + b_u)    [M, hidden]
    plain MLP:                           H = act(X W_u + b_u)
    down projection:                     Y = H W_d + b_d                          [M, D_out]

The up/gate stage is one kernel: a program owns a [BLOCK_M, BLOCK_N] tile of H, walks the input dim
once, and uses each X tile it loads for both the gate and the up weight tiles (two fp32
accumulators). Biases, the activation and the product are applied in registers, so neither X W_g nor
X W_u is ever written to memory; H is stored once, in the input dtype. The down projection is the
same kernel with no gate and the identity activation.

Weights are read through their strides, so both layouts run without copies: "out_in" is W [out, in]
(nn.Linear, y = x Wᵀ + b), "in_out" is W [in, out] (GPT-2 Conv1D, y = x W + b). fp32 inputs use
IEEE fp32 dot products unless ``torch.set_float32_matmul_precision`` allows TF32, as torch does.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run it).
"""
from __future__ import annotations

import functools
import sys

import torch
import triton
import triton.language as tl

from attnforge.codegen.autotune import Tunable, bucket, lookup, make_key, source_hash

from .activations import ACTIVATIONS

DEFAULT_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}

# tile shapes for an autotuner to try on GPU: small M for decoding, wide tiles for prefill. The gated
# kernel streams one X and two W tiles per stage, so large tiles keep BLOCK_K small.
SEARCH_SPACE = [
    {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": s}
    for bm, bn, bk, w, s in [
        (16, 64, 64, 4, 3), (16, 128, 64, 4, 3), (32, 64, 32, 4, 2), (32, 64, 64, 4, 3),
        (32, 128, 32, 4, 3), (64, 64, 32, 4, 3), (64, 64, 64, 4, 3), (64, 128, 32, 4, 3),
        (64, 128, 64, 8, 3), (128, 64, 32, 4, 3), (128, 64, 64, 8, 3), (128, 128, 32, 8, 3),
        (128, 128, 32, 8, 4),
    ]
]

_KERNEL_ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "quick_gelu", "sigmoid", "tanh", "relu2", "mish",
                       "leaky_relu", "elu", "softplus", "hardswish")


def supports(activation: str) -> bool:
    """Whether the kernel implements ``activation`` (a name in ``runtime.activations.ACTIVATIONS``)."""
    return activation in ACTIVATIONS and activation in _KERNEL_ACTIVATIONS


@triton.jit
def _tanh(x):
    """tanh(x) = 2σ(2x) − 1 (tl has no tanh, and libdevice's does not run in the interpreter); |x| > 15
    is ±1 in fp32, and clamping there keeps exp from overflowing."""
    x = tl.minimum(tl.maximum(x, -15.0), 15.0)
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _softplus(x):
    """log(1 + eˣ) without overflow; x itself above 20, like torch's threshold."""
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x))))


@triton.jit
def _activation(x, ACT: tl.constexpr):
    """act(x) for fp32 x, the branch picked at compile time."""
    if ACT == "identity":
        y = x
    elif ACT == "relu":
        y = tl.maximum(x, 0.0)
    elif ACT == "gelu":
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == "gelu_tanh":
        y = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif ACT == "silu":
        y = x * tl.sigmoid(x)
    elif ACT == "quick_gelu":
        y = x * tl.sigmoid(1.702 * x)
    elif ACT == "sigmoid":
        y = tl.sigmoid(x)
    elif ACT == "tanh":
        y = _tanh(x)
    elif ACT == "relu2":
        r = tl.maximum(x, 0.0)
        y = r * r
    elif ACT == "mish":
        y = x * _tanh(_softplus(x))
    elif ACT == "leaky_relu":
        y = tl.where(x >= 0.0, x, 0.01 * x)
    elif ACT == "elu":
        y = tl.where(x > 0.0, x, tl.exp(tl.minimum(x, 0.0)) - 1.0)
    elif ACT == "softplus":
        y = _softplus(x)
    elif ACT == "hardswish":
        y = x * tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0) / 6.0
    else:
        tl.static_assert(False, "unknown activation")
    return y


@triton.jit
def _ffn_matmul(X, WU, BU, WG, BG, OUT, M, N, K, sxm, sxk, suk, sun, sgk, sgn, som, son,
                ACT: tl.constexpr, GATED: tl.constexpr, HAS_BU: tl.constexpr, HAS_BG: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT = act(X WG + BG) ⊙ (X WU + BU) if GATED else act(X WU + BU); W read as [K, N] through strides."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k0 = tl.arange(0, BLOCK_K)
    row_ok = offs_m[:, None] < M
    col_ok = offs_n[None, :] < N
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_k0
        x = tl.load(X + offs_m[:, None] * sxm + offs_k[None, :] * sxk, mask=row_ok & (offs_k[None, :] < K),
                    other=0.0)
        w_ok = (offs_k[:, None] < K) & col_ok
        wu = tl.load(WU + offs_k[:, None] * suk + offs_n[None, :] * sun, mask=w_ok, other=0.0)
        acc_u = tl.dot(x, wu, acc_u, input_precision=PRECISION)
        if GATED:  # the same x tile feeds the gate
            wg = tl.load(WG + offs_k[:, None] * sgk + offs_n[None, :] * sgn, mask=w_ok, other=0.0)
            acc_g = tl.dot(x, wg, acc_g, input_precision=PRECISION)
    if HAS_BU:
        acc_u += tl.load(BU + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if GATED:
        if HAS_BG:
            acc_g += tl.load(BG + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        out = _activation(acc_g, ACT) * acc_u
    else:
        out = _activation(acc_u, ACT)
    tl.store(OUT + offs_m[:, None] * som + offs_n[None, :] * son, out.to(OUT.dtype.element_ty),
             mask=row_ok & col_ok)


def _as_kn(w, layout):
    """(K, N, stride along K, stride along N) of W read as the [in, out] matrix of y = x W."""
    if layout == "out_in":
        return w.shape[1], w.shape[0], w.stride(1), w.stride(0)
    return w.shape[0], w.shape[1], w.stride(0), w.stride(1)


def _matmul(x, w, b, w_gate, b_gate, activation, layout, cfg):
    """One launch of ``_ffn_matmul`` on 2-D x [M, K]; returns [M, N] in x's dtype."""
    m = x.shape[0]
    k, n, suk, sun = _as_kn(w, layout)
    if k != x.shape[1]:
        raise ValueError(f"weight {tuple(w.shape)} ({layout}) does not take inputs of width {x.shape[1]}")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    gated = w_gate is not None
    if gated and w_gate.shape != w.shape:
        raise ValueError(f"gate weight {tuple(w_gate.shape)} differs from up weight {tuple(w.shape)}")
    sgk, sgn = _as_kn(w_gate, layout)[2:] if gated else (0, 0)
    fp32_ieee = x.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _ffn_matmul[grid](x, w, b.contiguous() if b is not None else w, w_gate if gated else w,
                      b_gate.contiguous() if b_gate is not None else w, out, m, n, k,
                      x.stride(0), x.stride(1), suk, sun, sgk, sgn, out.stride(0), out.stride(1),
                      ACT=activation, GATED=gated, HAS_BU=b is not None, HAS_BG=gated and b_gate is not None,
                      PRECISION="ieee" if fp32_ieee else "tf32", BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                      BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def ffn_triton(x, w_up, b_up, w_down, b_down, w_gate, b_gate, activation, layout, config=None):
    """``attnforge::ffn`` (the semantics of ``runtime/ffn/reference.py``) as two kernel launches.

    x [..., D_in] -> [..., D_out]; ``config`` overrides keys of ``DEFAULT_CONFIG``.
    """
    if not supports(activation):
        raise ValueError(f"no Triton kernel for activation {activation!r}")
    if layout not in ("out_in", "in_out"):
        raise ValueError(f"unknown weight layout {layout!r}")
    rows = x.reshape(-1, x.shape[-1])
    cfg = {**DEFAULT_CONFIG, **config} if config else lookup(
        lambda: _key(rows, w_up, w_down, w_gate, activation, layout), DEFAULT_CONFIG)
    h = _matmul(rows, w_up, b_up, w_gate, b_gate, activation, layout, cfg)
    y = _matmul(h, w_down, b_down, None, None, "identity", layout, cfg)
    return y.view(*x.shape[:-1], y.shape[-1])


@functools.cache
def _source() -> str:
    return source_hash(sys.modules[__name__])


def _key(rows, w_up, w_down, w_gate, activation, layout):
    d_in, hidden = _as_kn(w_up, layout)[:2]
    d_out = _as_kn(w_down, layout)[1]
    name = f"ffn_{'glu' if w_gate is not None else 'mlp'}_{activation}"
    return make_key(name, _source(), rows.dtype, f"m={bucket(rows.shape[0])},k={d_in},n={hidden},o={d_out}",
                    rows.device)


def tunable(x, w_up, b_up, w_down, b_down, w_gate, b_gate, activation, layout) -> Tunable:
    """This FFN call's kernels for ``autotune.tune`` (one config serves both launches)."""
    rows = x.reshape(-1, x.shape[-1])
    return Tunable(_key(rows, w_up, w_down, w_gate, activation, layout), DEFAULT_CONFIG, SEARCH_SPACE,
                   lambda c: ffn_triton(x, w_up, b_up, w_down, b_down, w_gate, b_gate, activation, layout, c),
                   x.device)
