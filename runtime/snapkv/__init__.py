"""``attnforge::snapkv_attention``: exact attention whose KV cache keeps only the keys SnapKV selects.

SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation"): at the end of the
prompt each KV head keeps the observation window (the last ``window`` keys) and the earlier keys the window's
queries attend to most (``select.py``, as ``../shared/REFERENCES.md`` states it). The prompt's own forward pass is
exact, so the op is exact attention; what changes is what decode reads: the ``snapkv`` cache policy
(``cache.py``) stores the kept keys only, and decode appends. Kernels and the ONNX translation are exact
attention's (runtime/attention/).
"""
from __future__ import annotations

from typing import Union

from pydantic import Field, model_validator

from ..attention import exact_over_the_prompt
from ..common import qkv_inputs
from ..params import Float, Tokens
from ..registry import Params, Variant, param, register
from .cache import SNAPKV
from .select import keep_count, select_keys  # noqa: F401  (the selection rule, for tests and the bench)


class SnapKVParams(Params):
    budget: Union[Tokens, Float] = Field(description="keys kept per KV head: a count of tokens (an integer >= "
                                                     "window), or a ratio of the prompt (0 < ratio <= 1)")
    window: Tokens = Field(default=64, gt=0, description="observation window: the last queries that score the "
                                                         "prompt's keys (always kept)")
    kernel: Tokens = Field(default=5, gt=0, description="width of the average pooling of the scores (odd)")

    @model_validator(mode="after")
    def _check(self):
        if isinstance(self.budget, int):
            if self.budget <= 0:
                raise ValueError(f"budget must be > 0 tokens, not {self.budget}")
            if self.budget < self.window:
                raise ValueError(f"budget={self.budget} is smaller than the observation window ({self.window}), which "
                                 "is always kept: give budget >= window, or a smaller window")
        elif not 0 < self.budget <= 1:
            raise ValueError(f"budget={self.budget:g}: a ratio of the prompt must be in (0, 1] (an integer is a "
                             "count of tokens)")
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel={self.kernel} must be odd (the pooling is centred)")
        return self

    def op_budget(self) -> tuple[int, float]:
        """(tokens, ratio) as the op takes them: one of the two is 0."""
        return (self.budget, 0.0) if isinstance(self.budget, int) else (0, float(self.budget))


def synthetic(shape, params, dtype, device):
    q, k, v, scale = qkv_inputs("snapkv_attention", shape, params, dtype, device)
    return (q, k, v, None, scale, True, param(params, "budget", 256), param(params, "ratio", 0.0),
            param(params, "window", 64), param(params, "kernel", 5))


VARIANT = register(Variant(
    name="snapkv_attention", rewrite="snapkv", params=SnapKVParams,
    schema="(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool causal, int budget, float ratio, "
           "int window, int kernel) -> Tensor",
    synthetic=synthetic, cache=SNAPKV, doc="Over the prompt: softmax(scale · q kᵀ + mask) v, exact (the selection "
    "changes only the decode cache).", **exact_over_the_prompt()))

__all__ = ["VARIANT", "SnapKVParams", "keep_count", "select_keys"]
