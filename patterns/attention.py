"""Find attention cores in a canonical aten graph.

Two spellings cover the models we know: a ``scaled_dot_product_attention`` call, and the eager
chain ``matmul(q, kᵀ) → scale → mask → softmax → dropout → matmul(·, v)`` with the scale on q, on k,
on the scores, or split between them, and the mask added, ``masked_fill``-ed or ``where``-d.
Everything between the two matmuls is folded into one record:

    softmax(s · q kᵀ + M) v,   s = product of every scalar factor,   M = Σ mask terms × their factor,

Heads folded into the batch around the softmax (Bloom: scores ``baddbmm(alibi, q, kᵀ)`` in [B·H, N, M], viewed
to [B, H, N, M] for the mask and the softmax, and back for the matmul with v) are unfolded: q, k, v are taken
before their fold, the output after its unfold, and a mask term added in the folded layout (ALiBi) stays an
additive term, unflattened to [B, H, ·, M].

Or, with Gemma 2's soft-capping ``c · tanh(s · q kᵀ / c)`` before the mask, softmax(c·tanh(s·q kᵀ / c) + M) v
(c = the factors applied after the tanh, s / c those before it).

A chain that looks like attention but cannot be folded exactly becomes a ``Miss`` with the reason.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch.fx import Graph, Node

from .graph import aten, call_args, fqn_of, is_op, scalar, shape, static_int
from .projections import trace_projection
from .sites import AttentionSite, Miss

SOFTMAX = (aten.softmax, aten._softmax, aten._safe_softmax)
_PASS_THROUGH = (aten.to, aten._to_copy, aten.contiguous, aten.clone, aten.alias, aten.type_as)
_VIEWS = (aten.view, aten.reshape, aten._unsafe_view, aten.flatten)
# a masked_fill/where value this negative removes the key exactly as an additive mask would
MASK_FLOOR = -1.0e4


class _NoMatch(Exception):
    pass


class _NotAttention(_NoMatch):
    """A softmax that is plainly something else (a mixture-of-experts router): not reported as a near miss."""


def match_attention(graph: Graph) -> tuple[list[AttentionSite], list[Miss]]:
    sites: list[AttentionSite] = []
    misses: list[Miss] = []
    for node in graph.nodes:
        try:
            if is_op(node, aten.scaled_dot_product_attention):
                sites.append(_match_sdpa(node))
            elif _is_fused(node):
                sites.append(_match_fused(node))
            elif is_op(node, *SOFTMAX):
                sites.append(_match_eager(node))
        except _NotAttention:
            continue
        except _NoMatch as e:
            misses.append(Miss(fqn_of(node), "attention", str(e), node.name))
    return sites, misses


# --------------------------------------------------------------------------- SDPA


def _match_sdpa(node: Node) -> AttentionSite:
    a = call_args(node)
    q, k, v = a["query"], a["key"], a["value"]
    qs = shape(q)
    if qs is None or len(qs) < 3:
        raise _NoMatch("query shape unknown or rank < 3")
    head_dim = static_int(qs[-1])
    if head_dim is None:
        raise _NoMatch("head dim is not static")
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(head_dim)
    k0, v0 = _unrepeat_kv(k, v)
    mask = a["attn_mask"]
    is_bool = mask is not None and mask.meta.get("val") is not None and mask.meta["val"].dtype == torch.bool
    return _site(node, q, k0, v0, node, scale=float(scale), mask=mask, mask_is_bool=is_bool,
                 causal=bool(a["is_causal"]), sdpa_causal=bool(a["is_causal"]),
                 dropout_p=float(a["dropout_p"] or 0.0), pattern="sdpa", core=(node,),
                 parts=((mask, 1.0, "bool" if is_bool else "add"),) if mask is not None else ())


def _is_fused(node: Node) -> bool:
    """A call of attnforge::attention (a site fused by an earlier step), which later steps may rewrite."""
    t = node.target if node.op == "call_function" else None
    return isinstance(t, torch._ops.OpOverload) and t.namespace == "attnforge" and t._opname == "attention"


def _match_fused(node: Node) -> AttentionSite:
    a = call_args(node)  # by the op's schema names
    q, k, v, mask, scale, causal, dropout_p = (a[n] for n in ("q", "k", "v", "mask", "scale", "causal", "dropout_p"))
    is_bool = mask is not None and mask.meta.get("val") is not None and mask.meta["val"].dtype == torch.bool
    return _site(node, q, k, v, node, scale=float(scale), mask=mask, mask_is_bool=is_bool, causal=bool(causal),
                 sdpa_causal=bool(causal), dropout_p=float(dropout_p), pattern="fused", core=(node,),
                 parts=((mask, 1.0, "bool" if is_bool else "add"),) if mask is not None else (),
                 softcap=float(a.get("softcap") or 0.0))


# --------------------------------------------------------------------------- eager


def _match_eager(softmax: Node) -> AttentionSite:
    sa = call_args(softmax)
    x = softmax.args[0]
    xs = shape(x)
    dim = sa["dim"]
    if xs is None or dim not in (-1, len(xs) - 1):
        raise _NoMatch(f"softmax over dim {dim}, not the key dim")
    if _feeds_topk(softmax):
        raise _NotAttention("softmax feeds topk: a router, not attention")
    # forward: softmax -> (dtype casts, dropout) -> matmul(probs, v)
    core, cur, dropout_p, fold_v = [softmax], softmax, 0.0, 0
    while True:
        if len(cur.users) != 1:
            raise _NoMatch("attention weights are used outside the core (need_weights / output_attentions)")
        u = next(iter(cur.users))
        if is_op(u, aten.dropout, aten.native_dropout):
            if u.args[2] if len(u.args) > 2 else u.kwargs.get("train", False):
                dropout_p = float(u.args[1])
        elif is_op(u, *_PASS_THROUGH):
            pass
        elif is_op(u, aten.matmul) and u.args[0] is cur:
            pv = u
            break
        elif not fold_v and _heads_of_fold(cur, u):
            fold_v = _heads_of_fold(cur, u)
        else:
            raise _NoMatch(f"softmax output flows into {getattr(u.target, '__name__', u.target)}, not a matmul with v")
        core.append(u)
        cur = u
    v, out = pv.args[1], pv
    if fold_v:  # probabilities folded to [B·H, N, M] for the matmul: v and the output unfolded
        v, out = _unfold(v, fold_v, "v"), _unfolded_output(pv, fold_v)
        core.append(pv)
    # backward: softmax input -> ... -> matmul(q, kT)
    qk, coef, parts, chain, softcap, fold_qk, folded = _walk_scores(x)
    q, qscale = _peel_scale(qk.args[0])
    kt, kscale1 = _peel_scale(qk.args[1])
    k = _untranspose(kt)
    if k is None:
        raise _NoMatch("the key operand of q·kᵀ is not an explicit transpose of k")
    k, kscale2 = _peel_scale(k)
    if fold_qk:
        q, k = _unfold(q, fold_qk, "q"), _unfold(k, fold_qk, "k")
        q, qscale2 = _peel_scale(q)
        k, kscale3 = _peel_scale(k)
        qscale, kscale2 = qscale * qscale2, kscale2 * kscale3
    if bool(fold_qk) != bool(fold_v) and (_rank(q) != _rank(v)):
        raise _NoMatch("heads folded into the batch on one side of the softmax only")
    scale = coef * qscale * kscale1 * kscale2
    k0, v0 = _unrepeat_kv(k, v)
    if any(len(n.users) != 1 for n in chain) or len(qk.users) != 1:
        raise _NoMatch("attention scores are used outside the core")
    return _site(softmax, q, k0, v0, out, scale=scale, mask=parts[0][0] if len(parts) == 1 and parts[0][2] == "add"
                 and parts[0][1] == 1.0 and not folded else None, mask_is_bool=False, causal=False,
                 sdpa_causal=False, dropout_p=dropout_p, pattern="eager" if not (fold_qk or fold_v) else
                 "eager-folded", core=tuple(chain + [qk] + core + [pv]), parts=tuple(parts), softcap=softcap,
                 folded=frozenset(folded))


def _rank(n) -> int:
    s = shape(n)
    return len(s) if s is not None else -1


def _heads_of_fold(a: Node, b: Node) -> int:
    """H when one of the views ``a -> b`` / ``b -> a`` is [B, H, N, M] <-> [B·H, N, M] (heads folded into the
    batch, or unfolded from it); 0 otherwise."""
    if not is_op(b, *_VIEWS) or b.args[0] is not a:
        return 0
    sa, sb = shape(a), shape(b)
    if sa is None or sb is None:
        return 0
    four, three = (sa, sb) if len(sa) == 4 and len(sb) == 3 else (sb, sa) if len(sb) == 4 and len(sa) == 3 else \
        (None, None)
    if four is None or str(four[-2:]) != str(three[-2:]) and [str(d) for d in four[-2:]] != [str(d) for d in three[-2:]]:
        return 0
    h = static_int(four[1])
    if not h or str(three[0]) not in (str(four[0] * h), str(h * four[0])):
        return 0
    return h


def _unfold(n: Node, heads: int, name: str) -> Node:
    """The [B, H, N, D] tensor whose fold into the batch is ``n`` [B·H, N, D] (the reshape's input)."""
    m = n
    while is_op(m, *_PASS_THROUGH):
        m = m.args[0]
    src = m.args[0] if is_op(m, *_VIEWS) else None
    ss = shape(src) if isinstance(src, Node) else None
    if ss is None or len(ss) != 4 or static_int(ss[1]) != heads:
        raise _NoMatch(f"heads folded into the batch: {name} is not a view of a [B, {heads}, N, D] tensor")
    return src


def _unfolded_output(pv: Node, heads: int) -> Node:
    """The view of the core's output [B·H, N, D] back to [B, H, N, D], which the fused op's output replaces."""
    users = list(pv.users)
    if len(users) == 1 and _heads_of_fold(pv, users[0]) == heads and _rank(users[0]) == 4:
        return users[0]
    raise _NoMatch("heads folded into the batch: the output of the core is not viewed back to [B, H, N, D]")


def _feeds_topk(n: Node) -> bool:
    """True when ``n`` (through dtype casts and copies) is read by a topk: a mixture-of-experts router."""
    return any(is_op(u, aten.topk) or (is_op(u, *_PASS_THROUGH) and _feeds_topk(u)) for u in n.users)


def _walk_scores(x: Node):
    """Follow the softmax input back to q·kᵀ, collecting the scale factor and the mask terms; with a soft-cap
    c·tanh(·) on the way, (q·kᵀ, c · the factors inside, mask terms, chain, c)."""
    parts: list[tuple[Node, float, str]] = []
    chain: list[Node] = []
    capped: list[float] = []  # the factor applied after the tanh: the cap c
    fold: list[int] = []  # the heads, once a view unfolds [B·H, N, M] scores to [B, H, N, M]
    folded: list[Node] = []  # mask terms added in the folded layout

    def walk(n, coef):
        if is_op(n, aten.matmul):
            return n, coef
        chain.append(n)
        if not fold and is_op(n, *_VIEWS) and isinstance(n.args[0], Node) and _heads_of_fold(n.args[0], n) \
                and _rank(n) == 4:
            fold.append(_heads_of_fold(n.args[0], n))
            return walk(n.args[0], coef)
        if capped and not (is_op(n, aten.mul, aten.div) and scalar(n.args[1]) is not None) and \
                not is_op(n, *_PASS_THROUGH):
            raise _NoMatch("soft-capped scores: a term inside the tanh other than a scale of q·kᵀ")
        if is_op(n, aten.tanh):
            if coef <= 0:
                raise _NoMatch("soft-capped scores with a non-positive cap")
            capped.append(coef)
            return walk(n.args[0], 1.0)
        if is_op(n, aten.mul) and scalar(n.args[1]) is not None:
            return walk(n.args[0], coef * scalar(n.args[1]))
        if is_op(n, aten.div) and scalar(n.args[1]) is not None:
            return walk(n.args[0], coef / scalar(n.args[1]))
        if is_op(n, aten.add) or is_op(n, aten.sub):
            a, b = n.args[:2]
            alpha = n.kwargs.get("alpha", 1)
            sign = -1.0 if is_op(n, aten.sub) else 1.0
            if scalar(b) is not None:  # a constant shift: softmax does not see it
                return walk(a, coef)
            if _reaches_qk(a):
                parts.append((b, coef * alpha * sign, "add"))
                return walk(a, coef)
            if _reaches_qk(b) and sign > 0:
                parts.append((a, coef, "add"))
                return walk(b, coef)
            for side in (a, b):
                _refuse_tensor_scale(side)
            raise _NoMatch("scores add two tensors and neither is q·kᵀ")
        if is_op(n, aten.masked_fill):
            value = scalar(n.args[2])
            if value is None or value > MASK_FLOOR:
                raise _NoMatch(f"masked_fill value {n.args[2]!r} is not a large negative constant")
            parts.append((n.args[1], coef * value, "fill"))
            return walk(n.args[0], coef)
        if is_op(n, aten.where) and len(n.args) == 3:
            cond, a, b = n.args
            value = scalar(b)
            if value is None and is_op(b, aten.full, aten.scalar_tensor) and isinstance(b.args[-1], (int, float)):
                value = float(b.args[-1])
            if value is None or value > MASK_FLOOR or not _reaches_qk(a):
                raise _NoMatch("where() on scores is not a keep-mask with a large negative fill")
            parts.append((cond, coef * value, "keep"))
            return walk(a, coef)
        if is_op(n, *_PASS_THROUGH):
            return walk(n.args[0], coef)
        _refuse_tensor_scale(n)
        name = getattr(getattr(n, "target", None), "__name__", str(getattr(n, "target", n)))
        raise _NoMatch(f"softmax input comes from {name}, not a q·kᵀ matmul")

    qk, coef = walk(x, 1.0)
    heads = fold[0] if fold else 0
    folded = [p[0] for p in parts if heads and _rank(p[0]) == 3]  # terms added before the unfold: [B·H, ·, M]
    if capped:
        return qk, coef * capped[0], parts, chain, capped[0], heads, folded
    return qk, coef, parts, chain, 0.0, heads, folded


def _refuse_tensor_scale(n) -> None:
    """The true cause when scores are multiplied or divided by a tensor (a learned temperature, a computed scale):
    the op's scale is a constant."""
    if is_op(n, aten.mul, aten.div) and len(n.args) == 2 and isinstance(n.args[1], Node) and _reaches_qk(n.args[0]):
        what = n.args[1].target if n.args[1].op == "get_attr" else n.args[1].name
        raise _NoMatch(f"scores are {'divided' if is_op(n, aten.div) else 'multiplied'} by a tensor ({what}), not a "
                       "constant: a learned or computed scale the fused op cannot take")


def _reaches_qk(n, depth: int = 8) -> bool:
    if is_op(n, aten.matmul):
        return True
    if depth == 0 or not isinstance(n, Node):
        return False
    if is_op(n, aten.mul, aten.div) and scalar(n.args[1]) is not None or is_op(n, aten.tanh, *_VIEWS):
        return _reaches_qk(n.args[0], depth - 1)
    if is_op(n, aten.add, aten.sub, aten.masked_fill, *_PASS_THROUGH):
        return _reaches_qk(n.args[0], depth - 1) or (
            is_op(n, aten.add) and _reaches_qk(n.args[1], depth - 1))
    if is_op(n, aten.where) and len(n.args) == 3:
        return _reaches_qk(n.args[1], depth - 1)
    return False


def _peel_scale(n: Node) -> tuple[Node, float]:
    s = 1.0
    while True:
        if is_op(n, aten.mul) and scalar(n.args[1]) is not None:
            s *= scalar(n.args[1])
            n = n.args[0]
        elif is_op(n, aten.div) and scalar(n.args[1]) is not None:
            s /= scalar(n.args[1])
            n = n.args[0]
        else:
            return n, s


def _untranspose(kt: Node) -> Node | None:
    """k for kt = kᵀ (a transpose of the last two dims)."""
    ks = shape(kt)
    if ks is None:
        return None
    nd = len(ks)
    if is_op(kt, aten.transpose):
        dims = sorted(d % nd for d in kt.args[1:3])
        if dims == [nd - 2, nd - 1]:
            return kt.args[0]
    if is_op(kt, aten.permute):
        perm = [d % nd for d in kt.args[1]]
        if perm == list(range(nd - 2)) + [nd - 1, nd - 2]:
            return kt.args[0]
    return None


def _unrepeat_kv(k: Node, v: Node) -> tuple[Node, Node]:
    """Undo repeat_kv (unsqueeze→expand→reshape, or repeat_interleave) when both k and v use it."""
    k0, gk = _unrepeat(k)
    v0, gv = _unrepeat(v)
    if gk > 1 and gk == gv:
        return k0, v0
    return k, v


def _unrepeat(n: Node) -> tuple[Node, int]:
    if is_op(n, *_VIEWS):
        e = n.args[0]
        while is_op(e, aten.clone, aten.contiguous):
            e = e.args[0]
        u = _skip_full_slices(e.args[0]) if is_op(e, aten.expand) else None
        if is_op(u, aten.unsqueeze):
            base, es, ns = _skip_full_slices(u.args[0]), shape(e), shape(n)
            bs = shape(base)
            if es is None or ns is None or bs is None or len(es) != len(ns) + 1 or len(bs) != len(ns):
                return n, 1
            hd = len(ns) - 3  # head dim of [.., H, N, D]
            if u.args[1] % len(es) != hd + 1:
                return n, 1
            g = static_int(es[hd + 1])
            if g and static_int(bs[hd]) and static_int(ns[hd]) == static_int(bs[hd]) * g:
                return base, g
    if is_op(n, aten.repeat_interleave) and len(n.args) >= 2 and isinstance(n.args[1], int):
        dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim")
        ns = shape(n)
        if ns is not None and dim is not None and dim % len(ns) == len(ns) - 3:
            return n.args[0], n.args[1]
    return n, 1


def _skip_full_slices(n):
    """Skip ``x[:, :, ...]``-style slices that keep the whole dim (export writes them for indexing)."""
    while is_op(n, aten.slice, aten.alias):
        if is_op(n, aten.slice):
            a = call_args(n)
            if a["start"] not in (None, 0) or a["step"] != 1 or (
                    a["end"] is not None and a["end"] < 2**62 and a["end"] != shape(a["self"])[a["dim"]]):
                return n
            n = a["self"]
        else:
            n = n.args[0]
    return n


# --------------------------------------------------------------------------- site record


def _site(anchor: Node, q, k, v, out, *, scale, mask, mask_is_bool, causal, sdpa_causal, dropout_p,
          pattern, core, parts, softcap: float = 0.0, folded=frozenset()) -> AttentionSite:
    qs, ks = shape(q), shape(k)
    if qs is None or ks is None or len(qs) < 3 or len(qs) != len(ks):
        raise _NoMatch("q/k shapes unknown or of different rank")
    if len(qs) == 3:  # bmm spelling: heads are folded into the batch dim, [B*H, N, D]
        if str(qs[0]) != str(ks[0]):
            raise _NoMatch(f"batched q/k leading dims differ ({qs[0]} vs {ks[0]})")
        heads, kv_heads, head_dim = 1, 1, static_int(qs[-1])
    else:
        heads, kv_heads, head_dim = static_int(qs[-3]), static_int(ks[-3]), static_int(qs[-1])
    if None in (heads, kv_heads, head_dim) or heads % kv_heads:
        raise _NoMatch(f"head counts {qs[-3]}/{ks[-3]} are not static multiples")
    proj, rope = {}, None
    for name, n in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
        p, r = trace_projection(n)
        if p is not None:
            proj[name] = p.fqn
        rope = rope or r
    fqn = fqn_of(anchor)
    return AttentionSite(fqn=fqn, q=q, k=k, v=v, out=out, num_heads=heads, num_kv_heads=kv_heads,
                         head_dim=head_dim, scale=float(scale), causal=causal, mask=mask,
                         dropout_p=dropout_p, proj=proj, rope=rope, pattern=pattern, core_nodes=core,
                         mask_parts=parts, mask_is_bool=mask_is_bool, sdpa_causal=sdpa_causal, softcap=softcap,
                         folded=folded)


def refine_causal(site: AttentionSite, values: dict) -> AttentionSite:
    """Set ``site.causal`` when its mask hides every key after the query on the example inputs.

    When, in addition, the mask is *only* the causal pattern (allowed entries exactly 0 / kept, the
    rest hidden) and is computed from tensor sizes and constants alone (no input values reach it,
    as with a model called without a padding mask), the mask is dropped and the site becomes
    ``is_causal``: the same function at every length, without an N×N tensor.
    """
    if site.sdpa_causal or not site.mask_parts:
        return site
    causal, pure = False, True
    for node, coef, kind in site.mask_parts:
        m = values.get(node)
        if not isinstance(m, torch.Tensor) or m.dim() < 2 or m.shape[-1] != m.shape[-2] or m.shape[-1] < 2:
            pure = False
            continue
        upper = torch.ones(m.shape[-2:], dtype=torch.bool).triu(1)
        if kind == "add":
            hidden, exact_keep = (m * coef) <= MASK_FLOOR, m == 0
        else:
            hidden = m.bool() if kind == "fill" else ~m.bool()
            exact_keep = ~hidden
        causal = causal or bool(hidden[..., upper].all())
        pure = pure and bool(hidden[..., upper].all()) and bool(exact_keep[..., ~upper].all()) and _structural(node)
    if causal and pure:
        return dataclasses.replace(site, causal=True, sdpa_causal=True, mask=None, mask_parts=())
    return dataclasses.replace(site, causal=True) if causal else site


def _structural(node: Node) -> bool:
    """True when ``node`` depends on the graph inputs only through their sizes (``sym_size``)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            return False
        if is_op(n, aten.sym_size):
            continue
        stack.extend(n.all_input_nodes)
    return True
