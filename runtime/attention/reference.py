"""The plain definition of ``attnforge::attention``, what its kernels are tested against."""
from __future__ import annotations

from attnforge.codegen import masks

from ..common import dense_attention


def attention(q, k, v, mask, scale: float, causal: bool, dropout_p: float = 0.0, softcap: float = 0.0):
    """softmax(scale · q kᵀ + mask) v over the last two dims (Vaswani et al., 2017); with ``softcap`` c > 0 the
    scores are soft-capped first, c · tanh(scale · q kᵀ / c) (Gemma 2).

    q: [..., H, N, D]; k, v: [..., Hkv, M, D] with H a multiple of Hkv (grouped-query attention,
    Ainslie et al., 2023): query head h reads key/value head h // (H / Hkv). ``mask`` is additive
    (float) or a boolean keep-mask, broadcastable to [..., H, N, M]. ``causal`` hides key j > i (top-left, as SDPA).
    """
    if dropout_p:
        raise ValueError("the reference has no dropout")
    keep = masks.dense(masks.causal(), q.shape[-2], k.shape[-2], device=q.device) if causal else None
    return dense_attention(q, k, v, mask, scale, keep, softcap)
