"""``attnforge::streaming_heads_attention``: DuoAttention's retrieval and streaming heads (Xiao et al., 2024,
"DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads").

Each KV head is a **retrieval** head (exact attention, a full KV cache) or a **streaming** head (attention sinks
plus a recent window: key j visible from query i iff 0 ≤ i − j < window or j < sinks, the rule of
``codegen.masks.sliding_window``, so a streaming head is exactly ``sliding_window_attention``), one flag per KV
head (``retrieval``); query head h follows KV head h // (H / Hkv). The rule lives in ``reference.py`` (dense);
the PyTorch kernel (``cpu.py``) and the Triton launcher split the heads into the two sets and run exact
attention's kernel on one and the sliding window's on the other; ONNX (``onnx.py``) renders a per-head keep; the
``streaming`` cache policy (``cache.py``) stores the retrieval heads' keys whole and the streaming heads' in a
ring of sinks + window slots. Which heads are which is the pass's choice (passes/streaming_heads.py).
"""
from __future__ import annotations

from fractions import Fraction
from typing import Literal, Optional

from pydantic import Field, model_validator

from ..common import causal_pairs, qkv_inputs, same_as_q
from ..params import Float, Int, Tokens
from ..registry import Cost, Params, Shaped, Variant, io_bytes, param, register
from ..sliding_window import pairs
from ..sliding_window import cpu as window_cpu
from .cache import STREAMING
from .cpu import streaming_heads_cpu
from .heads import head_sets, split, stitch
from .onnx import streaming_heads_onnx
from .reference import streaming_heads_attention as reference

MAX_HEADS = 4096  # KV heads a site may list in a retrieval map (far above any model's)


class StreamingHeadsParams(Params):
    ratio: Optional[Float] = Field(default=None, ge=0, le=1, description=(
        "fraction of each site's KV heads kept as retrieval heads (full cache): round(ratio·Hkv) heads, halves "
        "rounded up; the others become streaming heads (sinks + window)"))
    sinks: Tokens = Field(default=4, ge=0, description="first tokens every streaming head sees (StreamingLLM)")
    window: Tokens = Field(default=64, gt=0, description="recent keys a streaming head sees behind each query")
    method: Literal["score", "optimize"] = Field(default="score", description=(
        "how heads are chosen on the example inputs: score = the attention mass each head puts outside the "
        "sinks + window band (RazorAttention-style), optimize = a trained gate per head (DuoAttention)"))
    retrieval: Optional[dict[str, list[Int]]] = Field(default=None, max_length=MAX_HEADS, description=(
        "a fixed map {site FQN: [retrieval KV head indices]} used instead of choosing (the map the report shows, "
        "fed back); sites it leaves out are chosen by `method` with `ratio`"))

    @model_validator(mode="after")
    def _ratio_or_map(self):
        if self.ratio is None and self.retrieval is None:
            raise ValueError("give ratio (the fraction of KV heads kept as retrieval heads) or a retrieval map")
        for fqn, heads in (self.retrieval or {}).items():
            if len(heads) > MAX_HEADS:
                raise ValueError(f"retrieval[{fqn!r}]: at most {MAX_HEADS} heads")
        return self


def retrieval_count(ratio: float, kv_heads: int) -> int:
    """round(ratio · kv_heads), halves rounded up (0.5 of 3 heads: 2), computed exactly (no float drift)."""
    return int((Fraction(ratio).limit_denominator(10 ** 9) * kv_heads + Fraction(1, 2)) // 1)


def supports(q, k, v, mask, scale, retrieval, window, sinks, causal) -> bool:
    """The generated kernels (causal/none and ``window``): [B, H, N, D] with N == M, v's head dim equal to q's."""
    return q.dim() == 4 and v.shape[-1] == q.shape[-1] and window > 0 and q.shape[-2] == k.shape[-2] \
        and len(retrieval) == k.shape[1]


def _parts(q, k, v, mask, retrieval):
    sets = head_sets(retrieval, q.shape[1], k.shape[1])
    full, band = split(q, k, v, mask, sets)
    return sets, full, band


def launch_triton(q, k, v, mask, scale, retrieval, window, sinks, causal, config=None):
    """Retrieval heads on the generated flash kernel (causal or none), streaming heads on its window variant."""
    from attnforge.codegen.attention import attention_triton

    sets, full, band = _parts(q, k, v, mask, retrieval)
    o_full = attention_triton(*full, scale, causal, config=config) if sets.retrieval_kv else None
    o_band = attention_triton(*band, scale, causal, window=window, sinks=sinks, config=config) \
        if sets.streaming_kv else None
    return stitch(o_full, o_band, sets)


def tunables(args, device, backend) -> list:
    """The kernels one call runs: the window kernel of the streaming heads (PyTorch or Triton) and, on Triton,
    the flash kernel of the retrieval heads (SDPA has nothing to tune)."""
    q, k, v, mask, scale, retrieval, window, sinks, causal = args
    sets, full, band = _parts(q, k, v, mask, retrieval)
    if backend != "triton":
        return [window_cpu.tunable(*band, scale, window, sinks, causal, device)] if sets.streaming_kv else []
    from attnforge.codegen.attention import attention_triton, spec_for, tunable

    out = []
    if sets.retrieval_kv:
        spec = spec_for(full[0], full[1], scale, full[3], mask="causal" if causal else "none")
        out.append(tunable(spec, *full, lambda c: attention_triton(*full, scale, causal, config=c)))
    if sets.streaming_kv:
        spec = spec_for(band[0], band[1], scale, band[3], mask="window", causal=causal, window=window, sinks=sinks)
        out.append(tunable(spec, *band, lambda c: attention_triton(*band, scale, causal, window=window, sinks=sinks,
                                                                   config=c)))
    return out


def cost(q: Shaped, k: Shaped, v: Shaped, mask, scale, retrieval, window, sinks, causal) -> Cost:
    """2·B·(D + Dv)·(Hr_q·pairs_full + Hs_q·pairs_window): each query head set over the pairs its rule keeps
    (window pairs: runtime/sliding_window ``pairs``, its formula valid for N ≥ window + sinks)."""
    b, h, n, d = q.shape
    group = int(h) // int(k.shape[1])
    hr = group * sum(bool(f) for f in retrieval)
    hs = int(h) - hr
    m = k.shape[-2]
    full = causal_pairs(n, m) if causal else n * m
    band = pairs(n, window, sinks, causal) if hs else 0
    out = Shaped((*q.shape[:-1], v.shape[-1]), q.dtype)
    return Cost(2 * b * (hr * full + hs * band) * (d + v.shape[-1]),
                io_bytes(q, k, v, mask if isinstance(mask, Shaped) else None, out))


def synthetic(shape, params, dtype, device):
    """``autotune --op streaming_heads_attention``: the first round(ratio·Hkv) KV heads retrieval heads (ratio 0.5),
    window 512 and 4 sinks unless given (the sliding window's defaults)."""
    q, k, v, scale = qkv_inputs("streaming_heads_attention", shape, params, dtype, device)
    count = retrieval_count(param(params, "ratio", 0.5), k.shape[1])
    flags = [i < count for i in range(k.shape[1])]
    return (q, k, v, None, scale, flags, param(params, "window", 512),
            param(params, "sinks", 4), param(params, "causal", True))


VARIANT = register(Variant(
    name="streaming_heads_attention", rewrite="streaming_heads", params=StreamingHeadsParams,
    schema="(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool[] retrieval, int window, int sinks, "
           "bool causal) -> Tensor",
    reference=reference, cpu=streaming_heads_cpu, fake=same_as_q, triton=launch_triton, supports=supports,
    cost=cost, synthetic=synthetic, tunables=tunables, onnx=streaming_heads_onnx, cache=STREAMING))
