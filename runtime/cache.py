"""KV-cache policies and ``attnforge::cached_attention``, the one op every attention site becomes for generation.

A causal model generates with one graph for prefill and decode (attnforge/generate.py): the cache pass
(passes/decode.py) turns each attention site's op into ``cached_attention(q, k, v, state, valid, start, ...)``,
where ``state`` is the site's cache (a list of tensors the op updates in place), ``valid`` says which of the
current tokens are real (left padding), and ``start`` is the position of the first current token. Prefill writes
the cache (``start`` 0, the prompt's T tokens); decode reads it and appends (T = 1).

The cache's layout is the variant's **cache policy**, declared in the variant's home (``runtime/<variant>/``) and
named in its ``Variant.cache``:

    full        every key and value (exact attention, GQA: the KV heads only)            O(N)
    ring        the sinks and a ring buffer of the last ``window`` keys (sliding window)   O(1)
    recurrent   the state Σ φ(k)ᵀv and Σ φ(k) (linear; + a ring of the window: hybrid)   O(1)
    blocks      every key; decode reads the blocks its layout keeps (block-sparse)       O(N)
    chunk       the current chunk's keys (chunked attention)                              O(1)

A policy says how to allocate its state (and, for a growing one, how to grow it before a step), how to attend (and write) for a prefill or a decode step, and how many
bytes its state holds at a context length (a sympy formula). Its ``params`` are the site op's own parameters
(window, feature map, weights...), packed into the op's generic ``ints``/``floats``/``strs``/``weights``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import sympy
import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import wants_triton
from .registry import Cost, Shaped, Variant, io_bytes, register

POLICIES: dict[str, "CachePolicy"] = {}


@dataclass(frozen=True)
class Site:
    """What a policy knows of an attention site: its head counts and sizes, dtype and device, and params."""

    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    scale: float
    dtype: torch.dtype
    device: Any
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CachePolicy:
    name: str
    summary: str
    allocate: Callable[[Site, int, int], list]  # (site, batch, capacity) -> the state tensors
    attend: Callable[..., Tensor]  # (q, k, v, state, valid, start, site) -> out; writes the state
    bytes: Callable[[Site, Any, Any], Any]  # (site, batch, context) -> bytes the state holds (sympy)
    pack: Callable[[dict], tuple]  # params -> (ints, floats, strs, weights) of the op
    unpack: Callable[[list, list, list, list], dict]  # the op's (ints, floats, strs, weights) -> params
    exact_decode: Callable[[dict], bool] = lambda params: True  # decode equals the rewritten model's own prefill
    params_of: Callable[[dict], dict] = lambda args: {}  # the site op's arguments (by name) -> the policy's params
    grow: Optional[Callable[[list, int], list]] = None  # (state, positions needed) -> a state with room (full caches)
    # ONNX decode (passes/decode.py, export_graph): the state as named graph inputs/outputs, functional
    state_names: tuple = ()  # past_key_values.{i}.<name> in, present.{i}.<name> out
    initial: Optional[Callable[[Site, int], list]] = None  # (site, batch) -> the state before the prompt
    step: Optional[Callable[..., tuple]] = None  # (q, k, v, past, mask [B, P+T], site) -> (out, present)


def register_policy(p: CachePolicy) -> CachePolicy:
    if p.name in POLICIES:
        raise ValueError(f"cache policy {p.name!r} is registered twice")
    POLICIES[p.name] = p
    return p


def _site(q: Tensor, k: Tensor, v: Tensor, scale: float, params: dict) -> Site:
    return Site(q.shape[1], k.shape[1], q.shape[-1], v.shape[-1], scale, q.dtype, q.device, params)


def cached_attention_cpu(q, k, v, state, valid, start, scale, policy, ints, floats, strs, weights):
    p = POLICIES[policy]
    return p.attend(q, k, v, state, valid, start, _site(q, k, v, scale, p.unpack(ints, floats, strs, weights)))


def _fake(q, k, v, state, valid, start, scale, policy, ints, floats, strs, weights):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _cost(q: Shaped, k: Shaped, v: Shaped, state, valid, start, scale, policy, ints, floats, strs, weights):
    """The step's attention over what the state holds: at most the state's keys per query."""
    keys = sympy.Add(*[s.shape[2] for s in state if isinstance(s, Shaped) and s.dim() == 4]) or k.shape[2]
    b, h, t, d = q.shape
    return Cost(2 * b * h * t * keys * (d + v.shape[-1]), io_bytes(q, k, v, *[s for s in state if
                                                                          isinstance(s, Shaped)]))


def reference(q, k, v, state, valid, start, scale, policy, ints, floats, strs, weights):
    """The policy's own attend (the decode contract, decode against the rewritten model's prefill, is what checks
    it: tests/test_generate.py)."""
    return cached_attention_cpu(q, k, v, state, valid, start, scale, policy, ints, floats, strs, weights)


VARIANT = register(Variant(
    name="cached_attention",
    schema="(Tensor q, Tensor k, Tensor v, Tensor(a!)[] state, Tensor valid, SymInt start, float scale, str policy, "
           "int[] ints, float[] floats, str[] strs, Tensor?[] weights) -> Tensor",
    reference=reference, cpu=cached_attention_cpu, fake=_fake, cost=_cost, differentiable=False, mutates=("state",),
    inserted_by="the cache pass of generation (passes/decode.py), one call per attention site"))


def prefill_mask(valid: Tensor) -> Optional[Tensor]:
    """The prompt's key padding as the model mask [B, 1, 1, T] a variant's own kernel takes with its causal rule
    (None without padding; rows that see no key come out 0)."""
    return None if bool(valid.all()) else valid[:, None, None, :]


def attend_plain(q: Tensor, keys: Tensor, values: Tensor, visible: Tensor, scale: float,
                 softcap: float = 0.0) -> Tensor:
    """softmax attention of q [B, H, T, D] over keys/values [B, Hkv, M, D] where ``visible`` [B, T, M] (or per
    head, [B, H, T, M]), in plain tensor ops (what an exported decode step is made of); rows that see no key give
    0."""
    groups = q.shape[1] // keys.shape[1]
    if groups > 1:
        keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    s = (q @ keys.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    return softmax_times(s, visible if visible.dim() == 4 else visible[:, None], values)


def softmax_times(s: Tensor, visible: Tensor, values: Tensor) -> Tensor:
    """softmax(s over the ``visible`` keys) @ values in plain tensor ops (exportable); rows that see no key give 0."""
    s = s.masked_fill(~visible, float("-inf"))
    m = s.amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    return (e @ values) / e.sum(-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)


def attend_keys(q: Tensor, keys: Tensor, values: Tensor, visible: Tensor, scale: float,
                softcap: float = 0.0) -> Tensor:
    """softmax attention of q [B, H, T, D] over keys [B, Hkv, M, D] and values [B, Hkv, M, Dv] (Dv may differ
    from D) where ``visible`` [B, T, M] (the same for every head) or [B, H, T, M] (per head), GQA without repeating
    K/V -> [B, H, T, Dv]; rows that see no key give 0
    (left-padding rows of a prompt). One query on the Triton backend runs the generated split-KV decode kernel
    (codegen/attention.py) with ``visible`` as its mask. ``softcap`` c > 0: scores c·tanh(s / c) (Gemma 2)."""
    if visible.dim() == 3:
        visible = visible[:, None]
    any_key = visible.any(-1, keepdim=True)
    safe = visible | ~any_key  # a row with no key attends to all (finite), then is zeroed
    b, h, t, d = q.shape
    hkv = keys.shape[1]
    if t == 1 and wants_triton(q):  # values may have their own head dim (pruned key channels: ThinK)
        from attnforge.codegen.attention import decode_triton

        out = decode_triton(q, keys, values, safe, scale, softcap=softcap)
    elif t == 1 and not softcap:  # one query: a GQA group's heads are the query rows of one SDPA call over its KV head
        if bool(safe.all()):
            mask = None
        elif safe.shape[1] == 1:
            mask = safe  # [B, 1, 1, M]: the same for every head
        else:
            mask = safe.reshape(b, hkv, h // hkv, safe.shape[-1])  # per head: a row per query head of the group
        out = F.scaled_dot_product_attention(q.reshape(b, hkv, h // hkv, d), keys, values, attn_mask=mask,
                                             scale=scale).reshape(b, h, 1, values.shape[-1])
    else:
        from .attention.cpu import attention_cpu

        out = attention_cpu(q, keys, values, safe, scale, False, 0.0, softcap)
    return out.masked_fill(~any_key, 0.0)
