"""``attnforge::attention``: exact softmax attention, the op ``fuse_attention`` (and ``gqa``) insert.

Reference: ``reference.py`` (dense). PyTorch kernel: ``cpu.py`` (SDPA, GQA without repeating K/V). Triton: the
generated flash-attention kernel (codegen/attention.py), or its split-KV decode kernel for one query that sees
every key. ONNX: ``onnx.py`` (opset-23 ``Attention``, else the MatMul/Softmax composition). ``softcap`` c > 0:
scores soft-capped to c · tanh(s / c) before the mask (Gemma 2; the Triton kernels and ONNX's ``Attention`` take
it, the PyTorch kernel runs it in blocks of queries)."""
from __future__ import annotations

from ..common import attention_cost, causal_pairs, qkv_inputs, same_as_q
from ..registry import Variant, param, register
from .cache import FULL
from .cpu import attention_cpu
from .onnx import attention_onnx
from .reference import attention as reference


def one_query_over_all_keys(q, k, causal) -> bool:
    """Where the split-KV decode kernel computes the op: one query that sees every key (top-left causal with
    one query and several keys sees only key 0, so it stays on the forward kernel)."""
    return q.shape[-2] == 1 and (not causal or k.shape[-2] == 1)


def supports(q, k, v, mask, scale, causal, dropout_p, softcap=0.0) -> bool:
    """The generated kernels: no dropout, v's head dim equal to q's, [B, H, N, D] or [B·H, N, D] inputs."""
    return dropout_p == 0 and v.shape[-1] == q.shape[-1] and q.dim() in (3, 4)


def _four_d(fn):
    """Run ``fn`` on [B, H, N, D] views of [B·H, N, D] inputs (heads folded into the batch)."""
    def run(q, k, v, mask, *rest, **kw):
        if q.dim() == 3:
            return fn(q[None], k[None], v[None], mask, *rest, **kw)[0]
        return fn(q, k, v, mask, *rest, **kw)
    return run


def _launcher(q, k, v, mask, scale, causal, softcap=0.0, config=None):
    from attnforge.codegen.attention import attention_triton, decode_triton

    if one_query_over_all_keys(q, k, causal):
        return decode_triton(q, k, v, mask, scale, softcap=softcap, config=config)
    return attention_triton(q, k, v, mask, scale, causal, softcap=softcap, config=config)


def launch_triton(q, k, v, mask, scale, causal, dropout_p, softcap=0.0):
    return _four_d(_launcher)(q, k, v, mask, scale, causal, softcap)


def tunables(args, device, backend) -> list:
    """The generated kernel of this call (the PyTorch kernel is SDPA: nothing to tune)."""
    if backend != "triton":
        return []
    from attnforge.codegen.attention import spec_for, tunable

    q, k, v, mask, scale, causal, _, *rest = args
    softcap = rest[0] if rest else 0.0
    q4, k4, v4 = (x[None] if x.dim() == 3 else x for x in (q, k, v))
    decode = one_query_over_all_keys(q4, k4, causal)
    spec = spec_for(q4, k4, scale, mask, decode=True, softcap=softcap) if decode else \
        spec_for(q4, k4, scale, mask, mask="causal" if causal else "none", softcap=softcap)
    return [tunable(spec, q4, k4, v4, mask,
                    lambda c: _four_d(_launcher)(q, k, v, mask, scale, causal, softcap, config=c))]


def cost(q, k, v, mask, scale, causal, dropout_p, softcap=0.0):
    n, m = q.shape[-2], k.shape[-2]
    return attention_cost(q, k, v, mask, causal_pairs(n, m) if causal else n * m)


def synthetic(shape, params, dtype, device):
    q, k, v, scale = qkv_inputs("attention", shape, params, dtype, device)
    return (q, k, v, None, scale, param(params, "causal", True), 0.0, param(params, "softcap", 0.0))


VARIANT = register(Variant(
    name="attention", rewrite="fuse_attention",
    schema="(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool causal, float dropout_p, "
           "float softcap=0.0) -> Tensor",
    reference=reference, cpu=attention_cpu, fake=same_as_q, triton=launch_triton, supports=supports,
    no_grad=lambda *a: "dropout_p > 0 is not supported in training (the recomputed mask would differ)"
    if a[6] > 0 else None,
    cost=cost, synthetic=synthetic, tunables=tunables, onnx=attention_onnx, cache=FULL))


def exact_over_the_prompt() -> dict:
    """The ``Variant`` fields of an op that is exact attention over the prompt and takes parameters after
    (q, k, v, mask, scale, causal) that only its cache policy reads (SnapKV, ThinK): every kernel, the cost and the
    ONNX translation are this variant's, called without them."""
    def exact(fn):
        return lambda q, k, v, mask, scale, causal, *params: fn(q, k, v, mask, scale, causal, 0.0)

    return dict(reference=exact(reference), cpu=exact(attention_cpu), fake=same_as_q, triton=exact(launch_triton),
                supports=exact(supports), cost=exact(cost),
                tunables=lambda args, device, backend: tunables((*args[:6], 0.0), device, backend),
                onnx=lambda op, q, k, v, mask, scale, causal, *params: attention_onnx(op, q, k, v, mask, scale, causal,
                                                                                    0.0))
