"""``engram``: a hashed N-gram memory added to the residual stream before attention (exact at insertion).

Engram (Cheng et al., 2026, "Conditional Memory via Scalable Lookup"). At each chosen layer, with h_t the
hidden state entering the layer (``patterns/residual.py`` says how it is found) and e_t the multi-head
hashed N-gram embedding of the token ids (``runtime/engram/``):

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

from torch import nn
from torch.fx import GraphModule

from attnforge.patterns.graph import aten, shape
from attnforge.patterns.residual import LayerInputSite, match_layer_inputs
from attnforge.runtime.engram import VARIANT, EngramMemory, EngramParams, engram_multipliers, engram_primes

from .base import ParamError, RewritePass, SkipSite, register


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


def apply(edit, site: LayerInputSite, params: EngramParams):
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
    owned = edit.owner(site.fqn) is not edit.gm
    prefix = edit.add_module(site.fqn if owned else "", "engram" if owned else f"engram_{site.layer}", memory)
    eps, fqn = params.eps, f"{site.fqn}.engram"

    def call(target, args, kwargs=None):
        return edit.call(target, args, kwargs, fqn=fqn)

    order = {n: i for i, n in enumerate(edit.graph.nodes)}
    anchor = max([n for n in edit.graph.nodes if n.op == "placeholder"] + [site.ids], key=order.get)
    with edit.inserting_before(anchor.next):  # depends on the ids only: ahead of every layer, after every input
        p = {k: edit.get_attr(f"{prefix}.{k}", h) for k in ("table", "key", "value", "key_norm", "hidden_norm")}
        e = call(VARIANT.op, (site.ids, p["table"], memory.multipliers, params.ngram, params.heads, memory.primes,
                              params.pad_id))
        if e.meta.get("val") is not None and e.meta["val"].dtype != h.meta["val"].dtype:
            e = call(aten._to_copy.default, (e,), {"dtype": h.meta["val"].dtype})
        key = call(aten.rms_norm.default, (call(aten.linear.default, (e, p["key"])), [d], p["key_norm"], eps))
        value = call(aten.linear.default, (e, p["value"]))
    with edit.inserting_before(h.next):
        hidden = call(aten.rms_norm.default, (h, [d], p["hidden_norm"], eps))
        score = call(aten.sum.dim_IntList, (call(aten.mul.Tensor, (key, hidden)), [-1], True))
        gate = call(aten.sigmoid.default, (call(aten.mul.Tensor, (score, 1 / math.sqrt(d))),))
        out = call(aten.add.Tensor, (h, call(aten.mul.Tensor, (gate, value))))
    edit.info.update({"parameters": sum(t.numel() for t in memory.parameters()), "table": prefix + ".table",
                      "table_rows": memory.table.shape[0], "primes": memory.primes,
                      "multipliers": memory.multipliers})
    return out


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


PASS = register(RewritePass("engram", "residual", True, match, apply, needs, describe, EngramParams))
