"""The cache pass: a rewritten causal graph -> the graph that prefills and decodes over an explicit cache.

Every attention site's op (``attnforge::attention``, ``sliding_window_attention``, ``linear_attention``, ...)
becomes one ``attnforge::cached_attention`` call with the site's cache policy (its variant's ``cache``,
runtime/cache.py): the graph gains the inputs ``valid`` (which current tokens are real, [B, T]), ``start`` (the
position of the first current token) and one state per site, and the model's own attention mask, which the
cache's validity flags replace, becomes dead code. Positions are inputs of the graph (``position_ids``), so rotary
or learned position embeddings see absolute positions. An Engram lookup reads the last n−1 token ids too
(``engram_ids``, its window, and ``engram_offset``, how many of them precede the current tokens).

A site can decode only if its attention is causal and its mask, when it has one, is causal masking plus key
padding (checked on example values with a left-padded row: a window or a bias in the model's mask would be lost);
``DecodeUnsupported`` says which site and why otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from operator import getitem
from typing import Any

import torch
from torch.fx import CodeGen, Graph, GraphModule, Node

from attnforge.patterns import MASK_FLOOR
from attnforge.patterns.graph import call_args, fqn_of
from attnforge.runtime import of_op
from attnforge.runtime.cache import VARIANT as CACHED, Site

from .check import record
from .manager import dead_code


class DecodeUnsupported(Exception):
    """The graph cannot decode with a cache; the message names the site and the reason."""


@dataclass
class CacheSite:
    fqn: str
    policy: str
    site: Site  # heads, sizes, dtype, device and the policy's params (tensors for weights)


@dataclass
class DecodeGraph:
    gm: GraphModule
    inputs: list[str]  # the prefill graph's own inputs, in order (input_ids, attention_mask, position_ids)
    sites: list[CacheSite]
    out_spec: Any  # how the flat outputs form the model's output (CausalLMOutputWithPast...)
    engram_context: int = 0  # previous token ids an Engram lookup reads (max order − 1), 0 without Engram
    notes: list[str] = field(default_factory=list)


def _attention_sites(gm: GraphModule, example: list, valid: torch.Tensor):
    """The attention op nodes of ``gm`` and their plans, each checked able to decode."""
    sites = [n for n in gm.graph.nodes if n.op == "call_function" and (of_op(n.target) or _NoCache).cache]
    if not sites:
        raise DecodeUnsupported("the graph has no attention op to cache (rewrite its attention first)")
    masks_to_check = [call_args(n).get("mask", call_args(n).get("key_mask")) for n in sites]
    values = record(gm, example, [m for m in masks_to_check if isinstance(m, Node)])
    return sites, [_plan(n, values.get(m) if isinstance(m, Node) else None, valid)
                   for n, m in zip(sites, masks_to_check)]


def decode_graph(gm: GraphModule, example: list, valid: torch.Tensor) -> DecodeGraph:
    """The prefill/decode graph of ``gm`` (a rewritten program graph whose inputs include ``position_ids``), its
    masks checked on ``example`` (the graph's inputs) where ``valid`` [B, T] marks the real tokens."""
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = [n.name for n in holders]
    engrams = [n for n in gm.graph.nodes if n.op == "call_function" and getattr(of_op(n.target), "name", "")
               == "engram_embed"]
    sites, plans = _attention_sites(gm, example, valid)

    graph, mapping = Graph(), {}
    out = graph.graph_copy(gm.graph, mapping)
    outputs = out if isinstance(out, (tuple, list)) else (out,)
    last = next(n for n in reversed(graph.nodes) if n.op == "placeholder")
    with graph.inserting_after(last):
        valid_in = graph.placeholder("valid")
    with graph.inserting_after(valid_in):
        start_in = graph.placeholder("start")
    cursor, states, cache_sites = start_in, [], []
    for i, (node, (policy, params, site_meta)) in enumerate(zip(sites, plans)):
        with graph.inserting_after(cursor):
            cursor = graph.placeholder(f"state_{i}")
        states.append(cursor)
        new = mapping[node]
        a = call_args(new)
        ints, floats, strs, weights = policy.pack(params)
        weights = [mapping.get(w, w) if isinstance(w, Node) else w for w in weights]
        with graph.inserting_before(new):
            cached = graph.call_function(CACHED.op, (a["q"], a["k"], a["v"], cursor, valid_in, start_in, a["scale"],
                                                      policy.name, ints, floats, strs, weights))
        cached.meta.update({k: v for k, v in new.meta.items() if k in ("val", "nn_module_stack", "attnforge_fqn")})
        new.replace_all_uses_with(cached)
        graph.erase_node(new)
        cache_sites.append(CacheSite(fqn_of(node), policy.name, _site(gm, node, params, site_meta)))
    context = 0
    if engrams:
        with graph.inserting_after(cursor):
            ids_in = graph.placeholder("engram_ids")
        with graph.inserting_after(ids_in):
            offset_in = graph.placeholder("engram_offset")
        for node in engrams:
            new = mapping[node]
            context = max(context, max(call_args(node)["ngram"]) - 1)
            new.update_arg(0, ids_in)
            with graph.inserting_after(new):
                sliced = graph.call_function(torch.ops.aten.slice.Tensor, (new, 1, offset_in, 2 ** 62))
            new.replace_all_uses_with(sliced, delete_user_cb=lambda u: u is not sliced)
    graph.output(tuple(outputs) if isinstance(out, (tuple, list)) else out)
    graph.set_codegen(CodeGen())
    out_spec = gm.graph._codegen.pytree_info.out_spec if hasattr(gm.graph._codegen, "pytree_info") else None
    decode = GraphModule(gm, graph, class_name="DecodeGraph")
    dead_code(decode)
    return DecodeGraph(decode, inputs, cache_sites, out_spec, context)


class _NoCache:
    cache = None


@dataclass
class ExportGraph:
    """The functional decode step an ONNX file holds: the state as named inputs and outputs."""

    gm: GraphModule
    inputs: list[str]  # input_ids, attention_mask, position_ids, then past_key_values.{i}.{name}
    outputs: list[str]  # logits, then present.{i}.{name}
    sites: list[CacheSite]


def export_graph(gm: GraphModule, example: list, valid: torch.Tensor, out_spec) -> ExportGraph:
    """The decode step of ``gm`` as a pure function for export: each attention site's op becomes its cache
    policy's ``step`` (past state in, present out, runtime/cache.py); ``attention_mask`` covers the past and the
    current tokens (optimum's convention), so the graph prefills (an empty past) and decodes with one file."""
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    if names != ["input_ids", "attention_mask", "position_ids"]:
        raise DecodeUnsupported(f"the ONNX decode step needs a graph of input_ids, attention_mask and position_ids, "
                                f"not {names}")
    if any(getattr(of_op(n.target), "name", "") == "engram_embed" for n in gm.graph.nodes if n.op == "call_function"):
        raise DecodeUnsupported("an Engram lookup's token-id window has no exported decode step yet")
    sites, plans = _attention_sites(gm, example, valid)
    graph, mapping = Graph(), {}
    out = graph.graph_copy(gm.graph, mapping)
    flat = list(out) if isinstance(out, (tuple, list)) else [out]
    mask_in = next(n for n in graph.nodes if n.op == "placeholder" and n.name == "attention_mask")
    ids_in = next(n for n in graph.nodes if n.op == "placeholder" and n.name == "input_ids")
    for n in list(mask_in.users):  # the capture read the length off the mask too: here it is input_ids' only
        if n.target == torch.ops.aten.sym_size.int and n.args[1] == 1:
            n.update_arg(0, ids_in)
    cursor, inputs, outputs, presents, cache_sites = mask_in, list(names), ["logits"], [], []
    for node in graph.nodes:
        if node.op == "placeholder":
            cursor = node
    for i, (node, (policy, params, site_meta)) in enumerate(zip(sites, plans)):
        if policy.step is None:
            raise DecodeUnsupported(f"{fqn_of(node) or node.name}: the {policy.name!r} cache has no exported decode "
                                    "step yet")
        site = _site(gm, node, params, site_meta)
        past = []
        for name in policy.state_names:
            with graph.inserting_after(cursor):
                cursor = graph.placeholder(f"past_key_values_{i}_{name}")
            past.append(cursor)
            inputs.append(f"past_key_values.{i}.{name}")
            outputs.append(f"present.{i}.{name}")
        new = mapping[node]
        a = call_args(new)
        weights = {k: mapping[v] for k, v in params.items() if isinstance(v, Node)}
        with graph.inserting_before(new):
            call = graph.call_function(_step_of(policy, site, list(weights)),
                                       (a["q"], a["k"], a["v"], mask_in, *past, *weights.values()))
            result = graph.call_function(getitem, (call, 0))
            presents += [graph.call_function(getitem, (call, 1 + j)) for j in range(len(past))]
        new.replace_all_uses_with(result)
        graph.erase_node(new)
        cache_sites.append(CacheSite(fqn_of(node), policy.name, site))
    logits = _logits_leaf(flat, out_spec)
    for n in list(graph.nodes):  # the capture's shape guards tie attention_mask to input_ids: not here
        if n.op == "output" or (n.op == "call_module" and n.target == "_guards_fn"):
            graph.erase_node(n)
    graph.output((logits, *presents))
    graph.set_codegen(CodeGen())
    step = GraphModule(gm, graph, class_name="DecodeStep")
    dead_code(step)
    return ExportGraph(step, inputs, outputs, cache_sites)


def _step_of(policy, site: Site, weight_names: list[str]):
    """``(q, k, v, mask, *past, *weights) -> (out, *present)``: the policy's step over this site."""
    n = len(policy.state_names)

    def cache_step(q, k, v, mask, *rest):
        bound = Site(**{**site.__dict__, "params": {**site.params, **dict(zip(weight_names, rest[n:]))}})
        out, present = policy.step(q, k, v, list(rest[:n]), mask, bound)
        return (out, *present)

    cache_step.__name__ = f"{policy.name}_cache_step"
    return cache_step


def _logits_leaf(flat: list, out_spec):
    """The logits among the graph's flat outputs (the first leaf, or the output object's ``logits``)."""
    if out_spec is None:
        return flat[0]
    import torch.utils._pytree as pytree

    tree = pytree.tree_unflatten(list(range(len(flat))), out_spec)
    index = getattr(tree, "logits", None)
    if index is None and isinstance(tree, dict):
        index = tree.get("logits")
    return flat[index if isinstance(index, int) else 0]


def _plan(node: Node, mask_value, valid: torch.Tensor):
    """(policy, params, (heads, kv heads, head dim, value dim, scale)) of an attention site, after checking that it
    can decode: causal, and a mask that is no more than causal masking plus key padding."""
    v = of_op(node.target)
    a = call_args(node)
    where = fqn_of(node) or node.name
    causal = bool(a.get("causal"))
    if mask_value is None and not causal:
        raise DecodeUnsupported(f"{where}: the attention is bidirectional; generation needs a causal model")
    if mask_value is not None and not _causal_padding(mask_value, valid, causal):
        raise DecodeUnsupported(f"{where}: the attention mask is more than causal masking and key padding (a "
                                "window, a bias, or bidirectional), which the cache would not keep")
    if a.get("dropout_p"):
        raise DecodeUnsupported(f"{where}: attention dropout (a training graph)")
    q, k, vv = (a[x].meta["val"] for x in ("q", "k", "v"))
    if q.dim() != 4:
        raise DecodeUnsupported(f"{where}: heads folded into the batch ([B·H, N, D]): the cache needs them apart")
    return v.cache, v.cache.params_of(a), (q.shape[1], k.shape[1], q.shape[-1], vv.shape[-1], float(a["scale"]))


def _causal_padding(m: torch.Tensor, valid: torch.Tensor, causal: bool) -> bool:
    """Whether the mask (with the op's own causality when ``causal``) keeps exactly j ≤ i ∧ key j real, on the
    real query rows (padding rows are don't-care)."""
    t = valid.shape[1]
    if m.dim() < 2 or m.shape[-1] != t:
        return False
    if m.dtype == torch.bool:
        keep = m
    else:
        keep = m > MASK_FLOOR
        if not bool((m[keep] == 0).all()):
            return False  # a bias on the kept scores
    if keep.dim() == 3 and keep.shape[-2] == 1:  # linear attention's key row [B, 1, T]
        keep = keep[:, :, None, :]
    while keep.dim() < 4:
        keep = keep.unsqueeze(0)
    tril = torch.ones(t, t, dtype=torch.bool, device=keep.device).tril()
    effective = keep & tril if causal else keep
    want = valid[:, None, None, :] & tril
    rows = valid[:, None, :, None]
    return bool(((effective == want) | ~rows).all())


def _site(gm: GraphModule, node: Node, params: dict, meta) -> Site:
    heads, kv_heads, d, dv, scale = meta
    resolved = {k: (_fetch(gm, v.target) if isinstance(v, Node) and v.op == "get_attr" else v)
                for k, v in params.items()}
    q = call_args(node)["q"].meta["val"]
    return Site(heads, kv_heads, d, dv, scale, q.dtype, q.device, resolved)


def _fetch(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


__all__ = ["DecodeGraph", "DecodeUnsupported", "decode_graph", "CacheSite", "ExportGraph", "export_graph"]
