"""The PyTorch kernel of ``attnforge::streaming_heads_attention``: the heads split into their two sets, each set one
call of an existing kernel, the outputs stitched back in head order.

Retrieval heads run exact attention's kernel (runtime/attention/cpu.py: SDPA, GQA without repeating K/V);
streaming heads run the sliding window's banded flash kernel (runtime/sliding_window/cpu.py: work ∝ kept keys,
sinks merged by log-sum-exp). Both sets keep GQA's grouping (heads.py), so each is an ordinary call; a map with
one set only is one call, without a gather.
"""
from __future__ import annotations

from ..attention.cpu import attention_cpu
from ..sliding_window.cpu import sliding_window_cpu
from .heads import head_sets, split, stitch


def streaming_heads_cpu(q, k, v, mask, scale, retrieval, window, sinks, causal):
    sets = head_sets(retrieval, q.shape[1], k.shape[1])
    if not sets.streaming_kv:
        return attention_cpu(q, k, v, mask, scale, causal, 0.0)
    if not sets.retrieval_kv:
        return sliding_window_cpu(q, k, v, mask, scale, window, sinks, causal)
    full, band = split(q, k, v, mask, sets)
    return stitch(attention_cpu(*full, scale, causal, 0.0), sliding_window_cpu(*band, scale, window, sinks, causal),
                  sets)
