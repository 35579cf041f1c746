"""Layer-input sites: the residual stream entering each transformer layer, and the token ids of the model.

Rule (from ``nn_module_stack`` FQNs). The layer of an attention site is the longest prefix of its FQN
whose last part is an integer, i.e. an item of a ModuleList (``model.layers.3.self_attn`` ->
``model.layers.3``; ``encoder.layer.0.attention.self`` -> ``encoder.layer.0``; ``h.0.attn`` -> ``h.0``).
The hidden state entering the layer is the floating-point tensor made outside the layer that a residual
``add`` inside it reads with an output of the same shape (the skip connection around attention), looking
through dtype casts and copies made inside the layer: Llama's
input of ``layers.L.input_layernorm``, BERT's and GPT-2's hidden state entering ``encoder.layer.L`` /
``h.L``. The attention mask is read by an add too, but the sum (the scores) has another shape; rotary
cos/sin are read by multiplications. Layers are numbered in graph order from 0.

The token ids are the integer placeholder (reached through view/reshape) that feeds the ``aten.embedding``
with the most rows, the vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from .attention import match_attention
from .graph import aten, is_op, module_path, shape, val
from .sites import Miss


@dataclass(frozen=True)
class LayerInputSite:
    fqn: str  # the layer module ("model.layers.3")
    out: Node  # the hidden state entering the layer, [..., N, d]
    ids: Node | None  # token ids [..., N] (a model input), None when the model has none
    vocab: int  # rows of the token embedding (0 without ids)
    layer: int  # index among the model's layers, graph order
    layers: int  # how many layers the model has
    pattern: str = "layer_input"


def token_ids(graph: Graph) -> tuple[Node | None, int]:
    """(the integer input the vocabulary embedding reads, the vocabulary size), or (None, 0)."""
    best, rows = None, 0
    for n in graph.nodes:
        if not is_op(n, aten.embedding):
            continue
        w, idx = n.args[0], n.args[1]
        while is_op(idx, aten.view, aten.reshape, aten._unsafe_view):
            idx = idx.args[0]
        wv, iv = val(w), val(idx)
        if idx.op != "placeholder" or wv is None or iv is None or iv.is_floating_point() or iv.dim() < 1:
            continue
        if wv.shape[0] > rows:
            best, rows = idx, int(wv.shape[0])
    return best, rows


def layer_of(fqn: str) -> str | None:
    parts = fqn.split(".")
    for end in range(len(parts), 0, -1):
        if parts[end - 1].isdigit():
            return ".".join(parts[:end])
    return None


def match_layer_inputs(graph: Graph) -> tuple[list[LayerInputSite], list[Miss]]:
    ids, vocab = token_ids(graph)
    layers: list[str] = []
    misses = []
    for s in match_attention(graph)[0]:
        layer = layer_of(s.fqn)
        if layer is None:
            misses.append(Miss(s.fqn, "residual", "the attention is not inside a numbered layer (ModuleList item)"))
        elif layer not in layers:
            layers.append(layer)
    found = []
    for layer in layers:
        h = _layer_input(graph, layer)
        if isinstance(h, str):
            misses.append(Miss(layer, "residual", h))
        else:
            found.append((layer, h))
    sites = [LayerInputSite(layer, h, ids, vocab, i, len(found)) for i, (layer, h) in enumerate(found)]
    return sites, misses


_PASS_THROUGH = (aten.to, aten._to_copy, aten.clone, aten.alias, aten.contiguous)


def _layer_input(graph: Graph, layer: str) -> Node | str:
    inside = {n for n in graph.nodes if n.op == "call_function" and layer in module_path(n)}
    candidates = []
    for n in graph.nodes:
        if n not in inside or not is_op(n, aten.add):
            continue
        for a in n.args[:2]:
            while a in inside and is_op(a, *_PASS_THROUGH):  # Llama's residual is the norm's .to(float32)
                a = a.args[0]
            v = val(a)
            if (isinstance(a, Node) and a not in inside and isinstance(v, torch.Tensor) and v.is_floating_point()
                    and v.dim() >= 2 and str(shape(a)) == str(shape(n)) and a not in candidates):
                candidates.append(a)
    if len(candidates) != 1:
        why = "no" if not candidates else f"{len(candidates)}"
        return f"{why} residual inputs found (a tensor from outside the layer added inside it, shape kept)"
    return candidates[0]
