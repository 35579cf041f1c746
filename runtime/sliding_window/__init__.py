"""``attnforge::sliding_window_attention``: softmax attention over a local window plus attention sinks.

The rule is ``codegen.masks.sliding_window(window, sinks, causal)`` (DESIGN.md): rendered into the reference
(``reference.py``), the PyTorch kernel's mask template (``cpu.py``), the generated Triton kernel's element-wise
test (codegen/attention.py, mask kind ``window``) and the ONNX graph (``onnx.py``). Kept pairs per query:
min(i + 1, w) + sinks, so the cost is O(N·w) instead of O(N²).
"""
from __future__ import annotations

import sympy
import torch
from pydantic import Field

from ..common import attention_cost, qkv_inputs, same_as_q
from ..params import Tokens
from ..registry import Params, Variant, param, register
from . import cpu
from .cache import RING
from .onnx import sliding_window_onnx
from .reference import sliding_window_attention as reference


class SlidingWindowParams(Params):
    window: Tokens = Field(gt=0, description="keys visible behind (and, bidirectional, ahead of) each query")
    sinks: Tokens = Field(default=0, ge=0, description="first tokens every query sees (StreamingLLM)")


def pairs(n, window: int, sinks: int, causal: bool):
    """Visible (query, key) pairs at length ``n`` (N == M). For an int, exact; for a sympy symbol, the formula valid
    for n ≥ window + sinks and sinks ≤ window (tests check both against the predicate's dense count)."""
    w, s = window, sinks
    if isinstance(n, (int, sympy.Integer)):
        n = int(n)
        i = torch.arange(n)
        if causal:
            band = torch.clamp(i + 1, max=w)
            extra = torch.clamp(i - w + 1, min=0).clamp(max=s)  # sinks j ≤ i − w, behind the band
        else:
            band = torch.clamp(i + w - 1, max=n - 1) - torch.clamp(i - w + 1, min=0) + 1
            extra = torch.clamp(i - w + 1, min=0).clamp(max=s) + torch.clamp(min(s, n) - (i + w), min=0)
        return int((band + extra).sum())
    if causal:
        band = sympy.Rational(w * (w + 1), 2) + (n - w) * w
        extra = sympy.Rational(s * (s + 1), 2) + (n - w - s) * s
    else:
        band = n * (2 * w - 1) - w * (w - 1)
        extra = s * (n - w) - sympy.Rational(s * (s - 1), 2)
    return sympy.expand(band + extra)


def supports(q, k, v, mask, scale, window, sinks, causal) -> bool:
    """The generated kernel (mask kind ``window``): [B, H, N, D] with N == M, v's head dim equal to q's."""
    return q.dim() == 4 and v.shape[-1] == q.shape[-1] and window > 0 and q.shape[-2] == k.shape[-2]


def launch_triton(q, k, v, mask, scale, window, sinks, causal, config=None):
    from attnforge.codegen.attention import attention_triton

    return attention_triton(q, k, v, mask, scale, causal, window=window, sinks=sinks, config=config)


def tunables(args, device, backend) -> list:
    q, k, v, mask, scale, window, sinks, causal = args
    if backend != "triton":
        return [cpu.tunable(*args, device)]
    from attnforge.codegen.attention import spec_for, tunable

    spec = spec_for(q, k, scale, mask, mask="window", causal=causal, window=window, sinks=sinks)
    return [tunable(spec, q, k, v, mask, lambda c: launch_triton(*args, config=c))]


def cost(q, k, v, mask, scale, window, sinks, causal):
    return attention_cost(q, k, v, mask, pairs(q.shape[-2], window, sinks, causal))


def synthetic(shape, params, dtype, device):
    q, k, v, scale = qkv_inputs("sliding_window_attention", shape, params, dtype, device)
    return (q, k, v, None, scale, param(params, "window", 512), param(params, "sinks", 4),
            param(params, "causal", True))


VARIANT = register(Variant(
    name="sliding_window_attention", rewrite="sliding_window", params=SlidingWindowParams,
    schema="(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, int window, int sinks, bool causal) -> Tensor",
    reference=reference, cpu=cpu.sliding_window_cpu, fake=same_as_q, triton=launch_triton, supports=supports,
    cost=cost, synthetic=synthetic, tunables=tunables, onnx=sliding_window_onnx, cache=RING))
