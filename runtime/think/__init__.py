"""``attnforge::think_attention``: exact attention whose KV cache keeps only the key channels ThinK selects.

ThinK (Xu et al., 2024): per KV head, the key channels that the prompt's last queries weigh least are pruned
from the cache (``select.py``). The prompt's forward pass is exact, so the op is exact attention; the ``channels``
cache policy (``cache.py``) stores D − ⌊D · ratio⌋ channels per key and gathers the query's to match at decode.
Kernels and the ONNX translation are exact attention's (runtime/attention/).
"""
from __future__ import annotations

from pydantic import Field

from ..attention import exact_over_the_prompt
from ..common import qkv_inputs
from ..params import Float, Tokens
from ..registry import Params, Variant, param, register
from .cache import CHANNELS
from .select import channel_scores, kept_channels, select_channels  # noqa: F401  (the rule, for tests)


class ThinKParams(Params):
    ratio: Float = Field(ge=0, lt=1, description="fraction of each key's channels pruned from the cache (0: none)")
    window: Tokens = Field(default=32, gt=0, description="the last queries of the prompt that score the channels")


def synthetic(shape, params, dtype, device):
    q, k, v, scale = qkv_inputs("think_attention", shape, params, dtype, device)
    return (q, k, v, None, scale, True, param(params, "ratio", 0.5), param(params, "window", 32))


VARIANT = register(Variant(
    name="think_attention", rewrite="think", params=ThinKParams,
    schema="(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool causal, float ratio, int window) -> Tensor",
    synthetic=synthetic, cache=CHANNELS, doc="Over the prompt: softmax(scale · q kᵀ + mask) v, exact (the pruning "
    "changes only the decode cache).", **exact_over_the_prompt()))
