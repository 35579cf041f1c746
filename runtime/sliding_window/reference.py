"""The plain definition of ``attnforge::sliding_window_attention``: dense attention under the window rule."""
from __future__ import annotations

from attnforge.codegen import masks

from ..common import predicate_reference


def sliding_window_attention(q, k, v, mask, scale: float, window: int, sinks: int, causal: bool):
    """Softmax attention restricted to a sliding window plus attention sinks.

    Local attention as in Longformer/Mistral (key j visible from query i iff 0 ≤ i − j < window, or
    |i − j| < window for bidirectional sites) plus StreamingLLM's sinks (the first ``sinks`` keys stay
    visible; causal sinks also need j ≤ i), ANDed with the model's own ``mask`` (additive or boolean keep-mask).
    q [B, H, N, D], k/v [B, Hkv, N, D] with H a multiple of Hkv.
    """
    return predicate_reference(q, k, v, mask, scale, masks.sliding_window(window, sinks, causal))
