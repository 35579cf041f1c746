"""``linear``: softmax attention -> normalised linear attention with a feature map (approximate).

    causal:        o_t = φ(q_t) Σ_{s≤t} φ(k_s)ᵀ v_s / (φ(q_t) · Σ_{s≤t} φ(k_s) + eps)
    bidirectional: o_t = φ(q_t) (φ(K)ᵀ V) / (φ(q_t) · Σ_s φ(k_s) + eps)

``feature_map``: elu (elu + 1, Katharopoulos et al. 2020), relu, cosine (Cottention's L2-normalised q and k,
shifted to 1 + cos ≥ 0), taylor (BASED's 2nd-order Taylor map, Arora et al. 2024), performer (FAVOR+ positive
random features, Choromanski et al. 2021), hedgehog (learnable [softmax(xW), softmax(−xW)], W = I at first,
Zhang et al. 2024; train it with ``attnforge.calibrate``). ``window > 0``: the LoLCATs hybrid, exact softmax
over the last ``window`` keys plus linear attention over the rest, one normaliser (runtime/linear.py).

The model's mask must be a key-padding mask (plus causality): linear attention keeps one state for all
queries, so per-query masks cannot be expressed and such sites are skipped with the reason. The pass reads
the mask's last query row as the per-key keep vector (hidden keys get φ(k) = 0).
"""
from __future__ import annotations

from typing import Literal, Optional

import sympy
import torch
from pydantic import Field, field_validator
from torch import nn
from torch.fx import GraphModule

from attnforge.patterns import AttentionSite, match_attention
from attnforge.patterns.attention import _MASK_FLOOR
from attnforge.patterns.graph import aten, example_size, insert_call, shape, val
from attnforge.runtime import linear as rt

from .base import Params, RewritePass, SkipSite, register
from .fuse_attention import build_mask, needs
from .gqa import _get_attr
from .manager import evaluate

N = sympy.Symbol("N", positive=True, integer=True)
PERFORMER_FEATURES = 256  # ≈ D·ln D random features for D = 64 (the Performer paper's choice)


class LinearParams(Params):
    feature_map: Literal["elu", "relu", "cosine", "taylor", "performer", "hedgehog"] = Field(
        description="φ: elu, relu, cosine, taylor (BASED), performer (FAVOR+), hedgehog (learnable)")
    window: int = Field(default=0, ge=0, description="> 0: exact softmax over the last `window` keys, linear "
                                                     "attention over the rest (LoLCATs/BASED hybrid)")
    features: Optional[int] = Field(default=None, ge=1, description=f"performer: random features (default "
                                                                    f"{PERFORMER_FEATURES})")
    seed: int = Field(default=0, description="performer: seed of the random features")
    eps: float = Field(default=1e-6, gt=0, description="added to the normaliser φ(q)·Σφ(k)")

    @field_validator("features")
    @classmethod
    def _performer_only(cls, v, info):
        if v is not None and info.data.get("feature_map") != "performer":
            raise ValueError("features sets the performer's random feature count; it applies to "
                             "feature_map: performer only")
        return v


def match(gm: GraphModule):
    return match_attention(gm.graph)


def _key_mask(gm: GraphModule, site: AttentionSite, mask, mask_nodes: list, values: dict):
    """The keep-per-key vector (the mask's last query row) as a node and its example value, after checking on
    the example inputs that the mask is nothing more than key padding plus causality."""
    m = evaluate(gm, mask_nodes, values) if mask_nodes else values[mask]
    is_bool = m.dtype == torch.bool
    visible = m if is_bool else m > _MASK_FLOOR
    if not is_bool and not bool((m[visible] == 0).all()):
        raise SkipSite("the model's mask adds biases to the scores (not only 0 / hidden); linear attention "
                       "keeps per-key masks only")
    rows, cols = visible.shape[-2:]
    keys = visible[..., -1:, :]
    allowed = torch.ones(rows, cols, dtype=torch.bool)
    if site.causal and rows > 1:
        allowed = allowed.tril()
    want = keys & allowed
    live = want.any(-1, keepdim=True)  # rows with no visible key at all are left to the kernel's 0 output
    if not bool(((visible & allowed) == want).logical_or(~live).all()):
        raise SkipSite("the model's mask is not a key-padding mask (plus causality): linear attention keeps one "
                       "state for all queries and cannot hide a key from some queries only")
    row = insert_call(gm.graph, aten.select.int, (mask, -2, -1), fqn=site.fqn)
    node = row if is_bool else insert_call(gm.graph, aten.gt.Scalar, (row, _MASK_FLOOR), fqn=site.fqn)
    return node, visible[..., -1, :]


def _attr(gm: GraphModule, base: str, tensor: torch.Tensor, trainable: bool, like):
    """Register ``tensor`` on ``gm`` under a free name (a Parameter when trainable) and return a get_attr node."""
    name = base
    while hasattr(gm, name):
        name += "_"
    if trainable:
        gm.register_parameter(name, nn.Parameter(tensor))
    else:
        gm.register_buffer(name, tensor)
    return _get_attr(gm, name, like)


def _weights(gm: GraphModule, site: AttentionSite, params: LinearParams, key_mask, values: dict):
    """(wq, wk, mix) nodes: performer's random projection (a buffer), hedgehog's per-head maps and the window
    weights (Parameters named ``hedgehog_*``, what ``calibrate`` trains), other maps' window weights (buffers)."""
    slug = site.fqn.replace(".", "_") or "root"
    dtype = val(site.q).dtype if val(site.q) is not None else torch.float32
    fmap, wq, wk, nodes = params.feature_map, None, None, {}
    if fmap == "performer":
        wq = wk = rt.orthogonal_features(site.head_dim, params.features or PERFORMER_FEATURES, params.seed).to(dtype)
        nodes["q"] = nodes["k"] = _attr(gm, f"performer_{slug}_proj", wq, False, site.q)
    elif fmap == "hedgehog":
        wq, wk = (rt.hedgehog_init(h, site.head_dim).to(dtype) for h in (site.num_heads, site.num_kv_heads))
        nodes["q"], nodes["k"] = (_attr(gm, f"hedgehog_{slug}_{r}", w, True, site.q) for r, w in (("q", wq), ("k", wk)))
    if params.window > 0:
        q, k = values[site.q], values[site.k]
        if q.dim() == 3:  # [B·H, N, D]: the op runs it as one batch of B·H heads
            q, k = q[None], k[None]
        mix = rt.window_weight(q, k, key_mask, site.scale, fmap, site.causal, params.window, wq, wk).to(dtype)
        trainable = fmap == "hedgehog"
        nodes["mix"] = _attr(gm, f"{'hedgehog' if trainable else 'linear'}_{slug}_mix", mix, trainable, site.q)
    return nodes.get("q"), nodes.get("k"), nodes.get("mix")


def apply(gm: GraphModule, site: AttentionSite, params: LinearParams, values: dict | None) -> list:
    if values is None:
        raise SkipSite("linear needs the example-input values of the site (to check its mask)")
    if params.feature_map == "hedgehog" and len(shape(site.q) or ()) != 4:
        raise SkipSite("heads are folded into the batch dim ([B·H, N, D]): hedgehog's per-head maps need them")
    g = gm.graph
    before = set(g.nodes)
    with g.inserting_before(site.out):
        mask = build_mask(gm, site)
        keep = key_mask = None
        if mask is not None:
            try:
                keep, key_mask = _key_mask(gm, site, mask, [n for n in g.nodes if n not in before], values)
            except SkipSite:
                for n in reversed([n for n in g.nodes if n not in before]):
                    g.erase_node(n)
                raise
        wq, wk, mix = _weights(gm, site, params, key_mask, values)
        out = insert_call(g, torch.ops.attnforge.linear_attention.default,
                          (site.q, site.k, site.v, keep, site.scale, params.feature_map, site.causal, params.window,
                           params.eps, wq, wk, mix), fqn=site.fqn)
    out.meta["nn_module_stack"] = site.out.meta.get("nn_module_stack", {})
    out.meta["val"] = site.out.meta.get("val", out.meta.get("val"))
    out.meta["attnforge_info"] = {"trainable": [n.target for n in (wq, wk, mix) if n is not None
                                                and n.target.startswith("hedgehog_")]}
    return [n for n in g.nodes if n not in before]


def flops(site: AttentionSite, params: LinearParams):
    """(before, after): matmul FLOPs of the softmax core and of the linear kernel, formulas in N."""
    h, d = site.num_heads, site.head_dim
    f = {"performer": params.features or PERFORMER_FEATURES, "hedgehog": 2 * d}.get(params.feature_map) or \
        rt.feature_dim(params.feature_map, d)
    before = 4 * h * d * (N * (N + 1) / 2 if site.causal else N ** 2)
    return sympy.nsimplify(before), sympy.nsimplify(rt.flops(N, h, d, f, site.causal, params.window))


def describe(site: AttentionSite, params: LinearParams) -> dict:
    before, after = flops(site, params)
    info = {"feature_map": params.feature_map, "window": params.window, "causal": site.causal,
            "heads": site.num_heads, "kv_heads": site.num_kv_heads, "head_dim": site.head_dim,
            "flops_before": str(sympy.expand(before)), "flops_after": str(sympy.expand(after))}
    n = example_size(shape(site.q)[-2]) if shape(site.q) else None
    if n:
        info.update(example_n=n, flops_before_at_n=int(before.subs(N, n)), flops_after_at_n=int(after.subs(N, n)))
    return info


PASS = register(RewritePass("linear", "attention", False, match, needs, apply, describe, LinearParams,
                            uses_values=True))
