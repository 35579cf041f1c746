"""``gqa``: grouped-query attention by weight surgery (approximate; exact when nothing is pooled).

GQA (Ainslie et al., 2023, "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
Checkpoints"): a site whose H query heads read Hkv key/value heads (query head h reads KV head
h // (H/Hkv)) is converted to ``kv_heads`` KV heads, query head h then reading head h // G, G = H / kv_heads.
The new KV head of group g pools the KV heads its query heads read, weights summing to one:

    W_K'^g = Σ_{h∈g} a_h · W_K^{h // (H/Hkv)}   (rows of head g in nn.Linear layout; b_K, W_V, b_V alike)

``mean``: a_h = 1/G (the paper; beats keeping one head). ``norm``: a_h ∝ the mean key norm of h's head on
the example inputs (after Key-Driven GQA, Khan et al., 2024, which allocates by key-head norms).
``cluster``: groups are chosen by key similarity instead of adjacency, minimising Σ_g Σ_{h∈g} ‖k_h − k̄_g‖²
(the error mean pooling makes), Q's weight rows are permuted so that each group's heads sit together and
the site's output heads are put back in order (O is unchanged), so duplicated heads convert exactly.

Q and O are otherwise unchanged. Pooling is linear per head, and rotary embeddings rotate every head with
the same cos/sin, so pooling the weights equals pooling the rotated keys: each rebuilt K/V/Q is checked
against Σ a_h k_h of the original on the example inputs before the new weights are kept. The site then
runs ``attnforge::attention`` on the kv_heads K/V heads (never repeated).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from attnforge.patterns import AttentionSite, Projection
from attnforge.patterns.graph import aten, shape
from attnforge.patterns.projections import trace_projection
from attnforge.runtime.params import Int

from . import fuse_attention
from .base import ParamError, Params, RewritePass, SkipSite, register


class GQAParams(Params):
    kv_heads: Int = Field(ge=1, description="key/value heads per site afterwards; must divide the query heads")
    pooling: Literal["mean", "norm", "cluster"] = Field(
        default="mean", description="mean of each group (GQA), key-norm weighted mean, or groups by key similarity")


@dataclasses.dataclass(frozen=True)
class _Path:
    """How q, k or v comes from its projection: output features -> heads (``pre``) -> rotary etc. -> ``end``."""

    proj: Projection
    pre: Node  # [..., heads, N, D] before rotary embeddings (``end`` when there are none)
    end: Node
    region: tuple  # nodes after ``pre`` up to ``end``, graph order (replayed on the new heads)


def _path(graph, end: Node) -> _Path | None:
    proj, rope = trace_projection(end)
    if proj is None:
        return None
    pre = rope.k_in if rope is not None else end
    return _Path(proj, pre, end, _between(graph, pre, end))


def _between(graph, pre: Node, end: Node) -> tuple:
    """Nodes on the paths from ``pre`` to ``end`` (``end`` included), in graph order."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    down, todo = set(), [pre]
    while todo:
        for u in todo.pop().users:
            if u not in down and order[u] <= order[end]:
                down.add(u)
                todo.append(u)
    keep, todo = set(), [end]
    while todo:
        n = todo.pop()
        if n in down and n not in keep:
            keep.add(n)
            todo.extend(n.all_input_nodes)
    return tuple(sorted(keep, key=order.get))


def _paths(graph, site: AttentionSite) -> dict:
    return {name: _path(graph, node) for name, node in (("q", site.q), ("k", site.k), ("v", site.v))}


def match(gm: GraphModule):
    return fuse_attention.match(gm)


def needs(site: AttentionSite) -> list:
    nodes = fuse_attention.needs(site)
    for p in _paths(site.out.graph, site).values():
        if p is not None:
            inner = set(p.region)
            nodes += [p.proj.x, p.proj.out, p.pre]
            nodes += [a for n in p.region for a in n.all_input_nodes if a not in inner and a is not p.pre]
    return nodes


# --------------------------------------------------------------------------- pooling plan


def _cluster(dist: torch.Tensor, groups: int) -> list[list[int]]:
    """Equal-size groups with a small sum of within-group distances ``dist`` [n, n].

    Greedy (each group: the first free head and its nearest free heads), then the best improving swap of
    two heads between groups until none improves. Groups come sorted by their first head.
    """
    n = dist.shape[0]
    size, label, free = n // groups, torch.empty(n, dtype=torch.long), list(range(n))
    for c in range(groups):
        near = sorted(free, key=lambda j: (float(dist[free[0], j]), j))[:size]
        label[near] = c
        free = [j for j in free if j not in near]
    for _ in range(n * n):
        s = dist @ F.one_hot(label, groups).to(dist.dtype)  # s[x, c] = Σ_{y in c} d(x, y)
        own, cross = s.gather(1, label[:, None])[:, 0], s[:, label]
        gain = cross + cross.T - own[:, None] - own[None, :] - 2 * dist  # cost change when x and y swap
        gain[label[:, None] == label[None, :]] = 0
        x, y = divmod(int(gain.argmin()), n)
        if gain[x, y] >= -1e-12 * float(dist.max()):
            break
        label[x], label[y] = label[y].clone(), label[x].clone()
    return sorted(([i for i in range(n) if label[i] == c] for c in range(groups)), key=lambda g: g[0])


def _plan(site: AttentionSite, params: GQAParams, keys: torch.Tensor):
    """(order, a, weight): query heads in their new order, a [kv_heads, Hkv] with K' = a·K, per-head weights."""
    h, hkv, kv = site.num_heads, site.num_kv_heads, params.kv_heads
    owner = torch.arange(h) // (h // hkv)  # the KV head each query head reads
    keys = keys.detach().double().movedim(-3, 0).flatten(1, -2)  # [Hkv, tokens, D]
    weight = torch.ones(h, dtype=torch.float64)
    if params.pooling == "norm":
        weight = keys.norm(dim=-1).mean(1)[owner]
    order = list(range(h))
    if params.pooling == "cluster":
        flat = keys.flatten(1)[owner]
        dist = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist") ** 2
        order = [i for group in _cluster(dist, kv) for i in group]
    a = torch.zeros(kv, hkv, dtype=torch.float64)
    for pos, head in enumerate(order):
        a[pos // (h // kv), owner[head]] += weight[head]
    return order, a / a.sum(1, keepdim=True), weight


# --------------------------------------------------------------------------- graph surgery


def _layout(p: torch.Tensor, pre: torch.Tensor, heads: int, d: int):
    """(offset, perm) with pre == p[..., off:off + heads·d].unflatten(-1, (heads, d)).permute(perm), or None."""
    for off in range(0, p.shape[-1] - heads * d + 1, d):
        x = p[..., off:off + heads * d].unflatten(-1, (heads, d))
        for perm in itertools.permutations(range(x.dim())):
            if [x.shape[i] for i in perm] == list(pre.shape) and torch.equal(x.permute(perm), pre):
                return off, perm
    return None


def _doomed(graph, out: Node) -> set:
    """Nodes nothing reads any more once ``out``'s users read its replacement."""
    dead = {out}
    for n in reversed(graph.nodes):
        if n.users and all(u in dead for u in n.users):
            dead.add(n)
    return dead


def _mixed(w: torch.Tensor, segments: list, d: int) -> tuple[torch.Tensor, list[int]]:
    """``w`` [F, ...] with each segment (offset, heads, m) of its rows replaced by the heads mixed by m, and
    the segments' new offsets."""
    parts, offsets, pos = [], [], 0
    for off, heads, m in segments:
        block = w[off:off + heads * d].unflatten(0, (heads, d)).double()
        parts += [w[pos:off], torch.einsum("gh,hd...->gd...", m, block).flatten(0, 1).to(w.dtype)]
        offsets.append(sum(len(x) for x in parts[:-1]))
        pos = off + heads * d
    return torch.cat(parts + [w[pos:]]), offsets


def _project(edit, proj: Projection) -> Node:
    """A call of ``proj``'s (new) weights on its input, spelled as the original (nn.Linear or Conv1D)."""
    x = proj.x
    w = edit.get_attr(proj.weight.target, x)
    b = edit.get_attr(proj.bias.target, x) if proj.bias is not None else None
    if proj.layout == "out_in":
        return edit.call(aten.linear.default, (x, w, b))
    flat = edit.call(aten.reshape.default, (x, [-1, shape(x)[-1]]))
    mm = edit.call(aten.addmm.default, (b, flat, w)) if b is not None else edit.call(aten.mm.default, (flat, w))
    sizes = [edit.call(aten.sym_size.int, (x, i)) for i in range(len(shape(x)) - 1)]
    return edit.call(aten.view.default, (mm, sizes + [w.meta["val"].shape[1]]))


def _heads(edit, p_new: Node, width: int, path: _Path, off: int, perm, heads: int, d: int) -> Node:
    """The path's tensor rebuilt from the new projection output: slice, split into heads, replay the rest."""
    x = p_new
    if off or width != heads * d:
        x = edit.call(aten.slice.Tensor, (x, -1, off, off + heads * d))
    x = edit.call(aten.unflatten.int, (x, -1, [heads, d]))
    x = edit.call(aten.permute.default, (x, list(perm)))
    env = {path.pre: x}
    for n in path.region:
        env[n] = edit.call(n.target, map_arg(n.args, lambda a: env.get(a, a)),
                           map_arg(n.kwargs, lambda a: env.get(a, a)))
    return env[path.end]


def _segments(g, site: AttentionSite, paths: dict, rebuilt: list, values: dict) -> tuple[dict, set]:
    """{projection output: [(offset, heads, name, perm)]} of the rebuilt paths, and the weights to replace.

    Raises SkipSite when a path's heads cannot be located in its projection's features, or when a
    projection is read by something that outlives the site."""
    by_proj: dict = {}
    for name in rebuilt:
        p = paths[name]
        heads = site.num_heads if name == "q" else site.num_kv_heads
        found = _layout(values[p.proj.out], values[p.pre], heads, site.head_dim)
        if found is None:
            raise SkipSite(f"cannot map {p.proj.fqn}'s output features to {name.upper()}'s heads (its layout is "
                           "not [..., heads·head_dim] split into heads)")
        by_proj.setdefault(p.proj.out, []).append((found[0], heads, name, found[1]))
    for segs in by_proj.values():
        segs.sort()
        if any(s1[0] + s1[1] * site.head_dim > s2[0] for s1, s2 in zip(segs, segs[1:])):
            raise SkipSite("two of q/k/v read the same projection features")
    doomed, targets = _doomed(g, site.out), set()
    for name in rebuilt:
        p = paths[name].proj
        for t in [x.target for x in (p.weight, p.bias) if x is not None]:
            if any(n.op == "get_attr" and n.target == t and not set(n.users) <= doomed for n in g.nodes):
                raise SkipSite(f"{name.upper()}'s projection {p.fqn or '<root>'} is also used outside this attention "
                               "(a returned KV cache or a shared layer)")
            targets.add(t)
    return by_proj, targets


def _rebuild(edit, site: AttentionSite, paths: dict, by_proj: dict, mix: dict) -> dict:
    """Store the mixed weights in place of the old ones and insert the rebuilt paths; {name: end node}."""
    d, ends = site.head_dim, {}
    for out_node, segs in by_proj.items():
        proj = paths[segs[0][2]].proj
        mixes = [(off, heads, mix[name]) for off, heads, name, _ in segs]
        w = edit.fetch(proj.weight.target).detach()
        w_new, offsets = _mixed(w if proj.layout == "out_in" else w.T, mixes, d)
        edit.store(proj.weight.target, (w_new if proj.layout == "out_in" else w_new.T).contiguous())
        if proj.bias is not None:
            edit.store(proj.bias.target, _mixed(edit.fetch(proj.bias.target).detach(), mixes, d)[0])
        p_new = _project(edit, proj)
        for (_, _, name, perm), off in zip(segs, offsets):
            ends[name] = _heads(edit, p_new, len(w_new), paths[name], off, perm, mix[name].shape[0], d)
    return ends


def _check(edit, site: AttentionSite, ends: dict, mix: dict) -> None:
    """Each rebuilt tensor equals its original heads mixed by ``mix`` on the example inputs, or SkipSite."""
    mine = edit.new_nodes
    with torch.no_grad():
        for name, end in ends.items():
            got = edit.evaluate(mine[:mine.index(end) + 1]).double()
            orig = edit.values[getattr(site, name)]
            want = torch.einsum("gh,...hnd->...gnd", mix[name], orig.double())
            err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
            if not err <= max(1e-4, 4 * torch.finfo(orig.dtype).eps):
                raise SkipSite(f"rebuilt {name.upper()} differs from the pooled original by {err:.1e} (relative) "
                               "on the example inputs: the path from its projection is not linear per head")


def apply(edit, site: AttentionSite, params: GQAParams):
    h, hkv, kv, d, g = site.num_heads, site.num_kv_heads, params.kv_heads, site.head_dim, edit.graph
    values = edit.values
    if len(shape(site.q) or ()) < 4:
        raise SkipSite("heads are folded into the batch dim ([B·H, N, D]): the head count is unknown")
    if h % kv:
        raise ParamError("kv_heads", f"kv_heads={kv} does not divide the {h} query heads of {site.fqn or '<root>'}")
    if kv > hkv:
        raise SkipSite(f"the site has {hkv} KV heads, fewer than kv_heads={kv}; gqa only pools")
    paths = _paths(g, site)
    for name in ("k", "v"):
        if paths[name] is None:
            raise SkipSite(f"no {name.upper()} projection found (the path from a linear layer to "
                           f"{name.upper()} is not made of layout ops and rotary embeddings)")
    order, a, weight = _plan(site, params, values[site.k])
    permuted = order != list(range(h))
    mix = {"k": a, "v": a, "q": torch.eye(h, dtype=torch.float64)[order]}
    rebuilt = ["k", "v"]
    if permuted or (paths["q"] is not None and paths["q"].proj.out in (paths["k"].proj.out, paths["v"].proj.out)):
        if paths["q"] is None:
            raise SkipSite("cluster pooling permutes the query heads, but no Q projection was found")
        rebuilt.append("q")  # permuted, or re-fused with K and V
    by_proj, targets = _segments(g, site, paths, rebuilt, values)

    old = {t: edit.fetch(t) for t in targets}
    try:
        ends = _rebuild(edit, site, paths, by_proj, mix)
        _check(edit, site, ends, mix)
    except SkipSite:
        raise  # the transaction puts the graph and the weights back
    except Exception as e:  # noqa: BLE001
        raise SkipSite(f"rebuilding q/k/v failed on the example inputs: {type(e).__name__}: {e}") from e

    out = fuse_attention.apply(edit, site, None, q=ends.get("q", site.q), k=ends["k"], v=ends["v"])
    if permuted:  # output heads back in the original order
        target = edit.add_tensor("", "gqa_head_order_" + (site.fqn.replace(".", "_") or "root"),
                                 torch.tensor(order).argsort(), persistent=False)
        out = edit.call(aten.index_select.default, (out, -3, edit.get_attr(target, site.q)))
        out.meta["val"] = site.out.meta.get("val")
    elt, n_keys, d_in = values[site.k].element_size(), values[site.k].shape[-2], shape(paths["k"].proj.x)[-1]
    edit.info.update({
        "kv_heads_after": kv, "pooling": params.pooling,
        "groups": [order[i:i + h // kv] for i in range(0, h, h // kv)],
        "head_weights": [round(float(x), 6) for x in weight / weight.sum() * h],
        "params_removed": sum(old[t].numel() - edit.fetch(t).numel() for t in targets),
        "kv_cache_bytes_per_token": [2 * hkv * d * elt, 2 * kv * d * elt],
        # Q/K/V projections and the attention core (q·kᵀ and p·v over the example's keys), per token
        "flops_per_token": [2 * d_in * (h + 2 * n) * d + 4 * h * n_keys * d for n in (hkv, kv)],
    })
    return out


def describe(site: AttentionSite, params: GQAParams) -> dict:
    return {**fuse_attention.describe(site), "kv_heads_requested": params.kv_heads, "pooling": params.pooling}


PASS = register(RewritePass("gqa", "attention", False, match, apply, needs, describe, GQAParams))
