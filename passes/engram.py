"""``engram``: a hashed N-gram memory added to the residual stream before attention (exact at insertion).

Engram (Cheng et al., 2026, "Conditional Memory via Scalable Lookup"). At each chosen layer, with h_t the
hidden state entering the layer (``patterns/residual.py`` says how it is found) and e_t the multi-head
hashed N-gram embedding of the token ids (``runtime/engram.py``):

    k_t = W_K e_t,   v_t = W_V e_t,   α_t = σ(⟨RMSNorm(k_t), RMSNorm(h_t)⟩ / √d),   h_t ← h_t + α_t · v_t.

W_V starts at zero, so the rewritten model equals the original exactly until it is trained. The token
ids are threaded from the model's input to the lookup (the graph gains that edge; the call signature is
unchanged). The lookup and the key/value projections depend on the ids only, so they are placed at the
start of the graph, ahead of every layer: that is where ``offload="cpu"`` gathers the rows from host memory.
Each insertion owns an ``EngramMemory`` registered as ``<layer>.engram`` (``layers.3.engram.table``, ...);
``freeze_except_engram`` leaves only those trainable.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.fx import GraphModule

from attnforge.patterns.graph import aten, insert_call, shape
from attnforge.patterns.residual import LayerInputSite, match_layer_inputs
from attnforge.runtime.engram import EngramMemory, engram_multipliers, engram_primes

from .base import ParamError, Params, RewritePass, SkipSite, register
from .gqa import _get_attr


class EngramParams(Params):
    ngram: list[int] = Field(default=[2, 3], min_length=1, description="N-gram orders (each ≥ 1)")
    heads: int = Field(default=4, ge=1, description="hash heads per order")
    dim: int = Field(default=16, ge=1, description="embedding width of each head")
    table_size: int = Field(default=10007, ge=2,
                            description="rows per head: the heads' moduli are distinct primes ≥ this")
    layers: list[int] | None = Field(default=None, description="layer indices (graph order, negative from the end); "
                                                                "absent: every layer the step's targets select")
    pad_id: int = Field(default=0, ge=0, description="token id used for positions before the start")
    seed: int = Field(default=0, description="seeds the multipliers (seed + 10007·layer) and the initial weights")
    offload: Literal["none", "cpu"] = Field(default="none", description="cpu: tables stay in host memory")
    eps: float = Field(default=1e-6, gt=0, description="RMSNorm epsilon")

    @field_validator("ngram")
    @classmethod
    def _orders(cls, v):
        if any(n < 1 for n in v) or len(set(v)) != len(v):
            raise ValueError("N-gram orders must be distinct and ≥ 1")
        return v


def match(gm: GraphModule):
    return match_layer_inputs(gm.graph)


def needs(site: LayerInputSite) -> list:
    return [site.out] + ([site.ids] if site.ids is not None else [])


def _selected(site: LayerInputSite, params: EngramParams) -> bool:
    if params.layers is None:
        return True
    for i in params.layers:
        if not -site.layers <= i < site.layers:
            raise ParamError("layers", f"layer {i} does not exist: the model has {site.layers} layers")
    return site.layer in {i % site.layers for i in params.layers}


def apply(gm: GraphModule, site: LayerInputSite, params: EngramParams) -> list:
    if not _selected(site, params):
        raise SkipSite(f"layer {site.layer} is not in layers={params.layers}")
    if site.ids is None:
        raise SkipSite("the model has no token-id input (no integer input feeding the vocabulary embedding)")
    if params.pad_id >= site.vocab:
        raise ParamError("pad_id", f"pad_id={params.pad_id} is not below the vocabulary size {site.vocab}")
    h = site.out
    d = shape(h)[-1]
    if not isinstance(d, int):
        raise SkipSite("the hidden width is not static")
    n_heads = len(params.ngram) * params.heads
    memory = EngramMemory(d, params.dim, params.ngram, params.heads,
                          engram_primes(params.table_size, n_heads, skip=site.layer * n_heads),
                          engram_multipliers(site.vocab, max(params.ngram), params.seed, site.layer), params.pad_id,
                          params.seed + site.layer, params.offload)
    owner = gm.get_submodule(site.fqn) if _has_module(gm, site.fqn) else gm
    prefix = f"{site.fqn}." if owner is not gm else ""
    name = "engram" if owner is not gm else f"engram_{site.layer}"
    while hasattr(owner, name):
        name += "_"
    owner.add_module(name, memory)
    prefix += name

    g, fqn, eps = gm.graph, f"{site.fqn}.engram", params.eps
    before = set(g.nodes)
    start = next(n for n in g.nodes if n.op != "placeholder")
    with g.inserting_before(start):  # depends on the ids only: ahead of every layer
        p = {k: _get_attr(gm, f"{prefix}.{k}", h) for k in ("table", "key", "value", "key_norm", "hidden_norm")}
        e = insert_call(g, torch.ops.attnforge.engram_embed.default,
                        (site.ids, p["table"], memory.multipliers, params.ngram, params.heads, memory.primes,
                         params.pad_id), fqn=fqn)
        if e.meta.get("val") is not None and e.meta["val"].dtype != h.meta["val"].dtype:
            e = insert_call(g, aten._to_copy.default, (e,), {"dtype": h.meta["val"].dtype}, fqn=fqn)
        key = insert_call(g, aten.rms_norm.default, (insert_call(g, aten.linear.default, (e, p["key"]), fqn=fqn),
                                                     [d], p["key_norm"], eps), fqn=fqn)
        value = insert_call(g, aten.linear.default, (e, p["value"]), fqn=fqn)
    with g.inserting_before(h.next):
        hidden = insert_call(g, aten.rms_norm.default, (h, [d], p["hidden_norm"], eps), fqn=fqn)
        score = insert_call(g, aten.sum.dim_IntList, (insert_call(g, aten.mul.Tensor, (key, hidden), fqn=fqn), [-1],
                                                      True), fqn=fqn)
        gate = insert_call(g, aten.sigmoid.default, (insert_call(g, aten.mul.Tensor, (score, 1 / math.sqrt(d)),
                                                                 fqn=fqn),), fqn=fqn)
        out = insert_call(g, aten.add.Tensor, (h, insert_call(g, aten.mul.Tensor, (gate, value), fqn=fqn)), fqn=fqn)
    out.meta["attnforge_info"] = {"parameters": sum(t.numel() for t in memory.parameters()), "table": prefix + ".table",
                                  "table_rows": memory.table.shape[0], "primes": memory.primes,
                                  "multipliers": memory.multipliers}
    return [n for n in g.nodes if n not in before]


def _has_module(gm: GraphModule, fqn: str) -> bool:
    try:
        return isinstance(gm.get_submodule(fqn), nn.Module)
    except AttributeError:
        return False


def describe(site: LayerInputSite, params: EngramParams) -> dict:
    """Sizes and per-token costs (multiply-adds; the hash's integer ops and the gather are counted apart)."""
    width = len(params.ngram) * params.heads * params.dim
    d = shape(site.out)[-1]
    info = {"layer": site.layer, "ngram": params.ngram, "heads_per_order": params.heads, "dim_per_head": params.dim,
            "embedding_width": width, "offload": params.offload}
    if isinstance(d, int):
        info.update(hidden=d, macs_per_token=2 * width * d + 4 * d, gathered_values_per_token=width,
                    hash_int_ops_per_token=sum(2 * n - 1 + 2 * params.heads for n in params.ngram))
    return info


def freeze_except_engram(model: nn.Module) -> list[str]:
    """Leave only the parameters whose names contain "engram" trainable; returns their names."""
    kept = []
    for name, p in model.named_parameters():
        p.requires_grad_("engram" in name)
        if "engram" in name:
            kept.append(name)
    return kept


PASS = register(RewritePass("engram", "residual", True, match, needs, apply, describe, EngramParams))
