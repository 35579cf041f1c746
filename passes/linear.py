"""``linear``: softmax attention -> normalised linear attention with a feature map (approximate).

Feature maps and kernels: runtime/linear/ (elu, relu, cosine, taylor, performer, hedgehog; ``window > 0``: the
LoLCATs hybrid, exact softmax over the last ``window`` keys plus linear attention over the rest).

The model's mask must be a key-padding mask (plus causality): linear attention keeps one state for all
queries, so per-query masks cannot be expressed and such sites are skipped with the reason. The pass reads
the mask's last query row as the per-key keep vector (hidden keys get φ(k) = 0).
"""
from __future__ import annotations

import sympy
import torch

from attnforge.patterns import MASK_FLOOR, AttentionSite
from attnforge.patterns.graph import aten, example_size, shape, val
from attnforge.runtime import Shaped
from attnforge.runtime import linear as rt
from attnforge.runtime.linear import PERFORMER_FEATURES, VARIANT, LinearParams

from .base import RewritePass, SkipSite, register
from .fuse_attention import dense_flops, match, needs, site_flops

N = sympy.Symbol("N", positive=True, integer=True)


def _key_mask(edit, site: AttentionSite, mask):
    """The keep-per-key vector (the mask's last query row) as a node and its example value, after checking on
    the example inputs that the mask is nothing more than key padding plus causality."""
    m = edit.evaluate() if edit.new_nodes else edit.values[mask]
    is_bool = m.dtype == torch.bool
    visible = m if is_bool else m > MASK_FLOOR
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
    row = edit.call(aten.select.int, (mask, -2, -1))
    node = row if is_bool else edit.call(aten.gt.Scalar, (row, MASK_FLOOR))
    return node, visible[..., -1, :]


def _weights(edit, site: AttentionSite, params: LinearParams, key_mask):
    """(wq, wk, mix) nodes: performer's random projection (a buffer), hedgehog's per-head maps and the window
    weights (Parameters named ``hedgehog_*``, what ``calibrate`` trains), other maps' window weights (buffers)."""
    slug = site.fqn.replace(".", "_") or "root"
    dtype = val(site.q).dtype if val(site.q) is not None else torch.float32
    fmap, wq, wk, nodes = params.feature_map, None, None, {}

    def attr(base, tensor, trainable):
        return edit.get_attr(edit.add_tensor("", base, tensor, trainable=trainable), site.q)

    if fmap == "performer":
        wq = wk = rt.orthogonal_features(site.head_dim, params.features or PERFORMER_FEATURES, params.seed).to(dtype)
        nodes["q"] = nodes["k"] = attr(f"performer_{slug}_proj", wq, False)
    elif fmap == "hedgehog":
        wq, wk = (rt.hedgehog_init(h, site.head_dim).to(dtype) for h in (site.num_heads, site.num_kv_heads))
        nodes["q"], nodes["k"] = (attr(f"hedgehog_{slug}_{r}", w, True) for r, w in (("q", wq), ("k", wk)))
    if params.window > 0:
        q, k = edit.values[site.q], edit.values[site.k]
        if q.dim() == 3:  # [B·H, N, D]: the op runs it as one batch of B·H heads
            q, k = q[None], k[None]
        mix = rt.window_weight(q, k, key_mask, site.scale, fmap, site.causal, params.window, wq, wk).to(dtype)
        trainable = fmap == "hedgehog"
        nodes["mix"] = attr(f"{'hedgehog' if trainable else 'linear'}_{slug}_mix", mix, trainable)
    return nodes.get("q"), nodes.get("k"), nodes.get("mix")


def apply(edit, site: AttentionSite, params: LinearParams):
    if params.feature_map == "hedgehog" and len(shape(site.q) or ()) != 4:
        raise SkipSite("heads are folded into the batch dim ([B·H, N, D]): hedgehog's per-head maps need them")
    mask = edit.build_mask()
    keep = key_mask = None
    if mask is not None:
        keep, key_mask = _key_mask(edit, site, mask)
    wq, wk, mix = _weights(edit, site, params, key_mask)
    out = edit.like_site(edit.call(VARIANT.op, (site.q, site.k, site.v, keep, site.scale, params.feature_map,
                                                site.causal, params.window, params.eps, wq, wk, mix)))
    edit.info["trainable"] = [n.target for n in (wq, wk, mix) if n is not None and n.target.startswith("hedgehog_")]
    return out


def flops(site: AttentionSite, params: LinearParams):
    """(before, after): matmul FLOPs of the softmax core and of the linear kernel, formulas in N (the variants'
    cost formulas; performer's feature count from the params)."""
    wq = Shaped((site.head_dim, params.features), torch.float32) if params.feature_map == "performer" and \
        params.features else None
    after = site_flops(site, VARIANT, N, params.feature_map, site.causal, params.window, params.eps, wq, None, None)
    return sympy.nsimplify(dense_flops(site, N)), sympy.nsimplify(after)


def describe(site: AttentionSite, params: LinearParams) -> dict:
    before, after = flops(site, params)
    info = {"feature_map": params.feature_map, "window": params.window, "causal": site.causal,
            "heads": site.num_heads, "kv_heads": site.num_kv_heads, "head_dim": site.head_dim,
            "flops_before": str(sympy.expand(before)), "flops_after": str(sympy.expand(after))}
    n = example_size(shape(site.q)[-2]) if shape(site.q) else None
    if n:
        info.update(example_n=n, flops_before_at_n=int(before.subs(N, n)), flops_after_at_n=int(after.subs(N, n)))
    return info


PASS = register(RewritePass("linear", "attention", False, match, apply, needs, describe, LinearParams))
