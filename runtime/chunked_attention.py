"""``attnforge::chunked_attention``: attention inside fixed chunks of the sequence (the worked example of
docs/extending.md).

Chunked local attention, as Llama 4's ``attention_chunk_size`` layers: the sequence is cut into chunks of
``chunk`` tokens and key j is visible from query i iff both lie in the same chunk (and j ≤ i when causal):

    keep(i, j) = ⌊i / c⌋ = ⌊j / c⌋  [∧ j ≤ i]

Everything else comes from the generic machinery: the predicate is rendered into the reference (a dense
softmax), the PyTorch kernel (its tile tables by interval classification, runtime/blockwise.py), the Triton kernel
(the same tables and the rendered element-wise test, codegen/attention.py) and the ONNX graph (runtime/onnx.py).
"""
from __future__ import annotations

import sympy
import torch
from pydantic import Field

from attnforge.codegen import masks

from .blockwise import attend_predicate
from .cache import CachePolicy, attend_keys, prefill_mask, register_policy
from .common import attention_cost, predicate_reference, qkv_inputs, same_as_q
from .onnx import predicate_attention
from .params import Tokens
from .registry import Params, Variant, param, register

BLOCK = 64  # tile of the PyTorch and Triton kernels


class ChunkedParams(Params):
    chunk: Tokens = Field(gt=0, description="tokens per chunk: a query sees only the keys of its own chunk")


def predicate(chunk: int, causal: bool) -> masks.Expr:
    """⌊i / chunk⌋ = ⌊j / chunk⌋, and j ≤ i when causal."""
    same = (masks.I // chunk).eq(masks.J // chunk)
    return masks.and_masks(same, masks.causal()) if causal else same


def reference(q, k, v, mask, scale, chunk, causal):
    """Dense softmax attention under ``predicate(chunk, causal)``, ANDed with the model's mask."""
    return predicate_reference(q, k, v, mask, scale, predicate(chunk, causal))


def cpu(q, k, v, mask, scale, chunk, causal):
    return attend_predicate(q, k, v, mask, scale, predicate(chunk, causal), BLOCK)


def supports(q, k, v, mask, scale, chunk, causal) -> bool:
    return q.dim() == 4 and v.shape[-1] == q.shape[-1]


def launch_triton(q, k, v, mask, scale, chunk, causal):
    from attnforge.codegen.attention import predicate_triton

    return predicate_triton(q, k, v, mask, scale, predicate(chunk, causal), BLOCK)


def pairs(n, chunk: int, causal: bool):
    """Visible pairs at length n: full chunks of c tokens (c² or c(c+1)/2 each) and the last partial one."""
    c = chunk
    full, rest = sympy.floor(sympy.sympify(n) / c), sympy.Mod(n, c)
    per = (lambda m: m * (m + 1) / 2) if causal else (lambda m: m * m)
    return sympy.simplify(full * per(c) + per(rest))


def cost(q, k, v, mask, scale, chunk, causal):
    return attention_cost(q, k, v, mask, pairs(q.shape[-2], chunk, causal))


def synthetic(shape, params, dtype, device):
    q, k, v, scale = qkv_inputs("chunked_attention", shape, params, dtype, device)
    return q, k, v, None, scale, param(params, "chunk", 256), param(params, "causal", True)


def _cache_allocate(site, batch: int, capacity: int) -> list:
    c = site.params["chunk"]
    new = lambda d: torch.zeros(batch, site.kv_heads, c, d, dtype=site.dtype, device=site.device)  # noqa: E731
    return [new(site.head_dim), new(site.value_dim), torch.zeros(batch, c, dtype=torch.bool, device=site.device)]


def _cache_attend(q, k, v, state, valid, start, site):
    """Prefill: the kernel over the prompt, then the last (partial) chunk is kept. Decode at p: slot p mod chunk,
    the chunk cleared when p starts a new one; the query sees the chunk's slots up to its own."""
    c = site.params["chunk"]
    if start == 0:
        out = torch.ops.attnforge.chunked_attention(q, k, v, prefill_mask(valid), site.scale, c, True)
        first = (q.shape[2] - 1) // c * c
        n = q.shape[2] - first
        state[0][:, :, :n], state[1][:, :, :n], state[2][:, :n] = k[:, :, first:], v[:, :, first:], valid[:, first:]
        state[2][:, n:] = False
        return out
    outs = []
    for t in range(q.shape[2]):
        slot = (start + t) % c
        if slot == 0:
            state[2][:] = False
        state[0][:, :, slot], state[1][:, :, slot], state[2][:, slot] = k[:, :, t], v[:, :, t], valid[:, t]
        visible = state[2] & (torch.arange(c, device=q.device) <= slot)
        outs.append(attend_keys(q[:, :, t:t + 1], state[0], state[1], visible[:, None], site.scale))
    return torch.cat(outs, 2)


def _cache_bytes(site, batch, context):
    item = torch.empty(0, dtype=site.dtype).element_size()
    return batch * site.params["chunk"] * (site.kv_heads * (site.head_dim + site.value_dim) * item + 1)


CACHE = register_policy(CachePolicy(
    "chunk", "the current chunk's keys: constant in the context length", _cache_allocate, _cache_attend, _cache_bytes,
    pack=lambda p: ([p["chunk"]], [], [], []), unpack=lambda ints, floats, strs, weights: {"chunk": ints[0]},
    params_of=lambda a: {"chunk": a["chunk"]}))


def onnx(op, q, k, v, mask, scale, chunk, causal):
    return predicate_attention(op, q, k, v, mask, scale, predicate(chunk, causal))


VARIANT = register(Variant(
    name="chunked_attention", rewrite="chunked_attention", params=ChunkedParams,
    schema="(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, int chunk, bool causal) -> Tensor",
    reference=reference, cpu=cpu, fake=same_as_q, triton=launch_triton, supports=supports, cost=cost,
    synthetic=synthetic, onnx=onnx, cache=CACHE))
