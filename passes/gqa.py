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

Q and O are otherwise unchanged. Pooling is linear per head, and rotary embeddings (whole, partial or
interleaved) rotate every head with the same cos/sin, so pooling the weights equals pooling the rotated keys:
each rebuilt K/V/Q is checked against Σ a_h k_h of the original on the example inputs before the new weights
are kept. A norm on the way (q/k-norm over the head dim, Qwen3; over the whole projection output, OLMo 2) is
not linear: the projection is pooled and the norm kept after it, norm(Σ a_h W^h x), as the family's own GQA
model computes it, with norm weights laid out per head ([heads·D], [heads, D]) pooled like the projection; such
a path is checked against the original path run on the pooled heads repeated per group. The site then runs
``attnforge::attention`` on the kv_heads K/V heads (never repeated). docs/rewrites/gqa.md has the math.
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
from attnforge.patterns.graph import aten, is_op, shape, static_int
from attnforge.patterns.projections import trace_heads
from attnforge.runtime.params import Int

from . import fuse_attention
from .base import ParamError, Params, RewritePass, SkipSite, register
from .edit import run_nodes


class GQAParams(Params):
    kv_heads: Int = Field(ge=1, description="key/value heads per site afterwards; must divide the query heads")
    pooling: Literal["mean", "norm", "cluster"] = Field(
        default="mean", description="mean of each group (GQA), key-norm weighted mean, or groups by key similarity")


@dataclasses.dataclass(frozen=True)
class _Path:
    """How q, k or v comes from its projection: output features -> (layout ops) -> ``pre`` -> steps -> ``end``.

    ``layout``: the nodes after the projection's output up to ``pre`` (layout ops only); ``region``: the nodes after
    ``pre`` up to ``end`` (rotary embeddings, norms, ...), graph order, replayed on the new heads; ``params``: the
    parameters the steps read (norm weights); ``steps``: their kinds (patterns.projections.HeadPath)."""

    proj: Projection
    pre: Node  # the input of the first step that is not a layout op (``end`` when there is none)
    end: Node
    layout: tuple
    region: tuple
    params: tuple
    steps: tuple


def _path(graph, end: Node) -> _Path | None:
    hp = trace_heads(end)
    if hp is None:
        return None
    region = set(_between(graph, hp.pre, end))
    for p in hp.params:  # a norm weight and its casts are replayed too: a pooled one takes its place
        region |= set(_between(graph, p, end))
    order = {n: i for i, n in enumerate(graph.nodes)}
    layout = _between(graph, hp.proj.out, hp.pre) if hp.pre is not hp.proj.out else ()
    return _Path(hp.proj, hp.pre, end, layout, tuple(sorted(region, key=order.get)), hp.params, hp.steps)


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
            inner = set(p.region) | set(p.layout)
            nodes += [p.proj.x, p.proj.out, p.pre, *p.params]
            nodes += [a for n in inner for a in n.all_input_nodes if a not in inner]
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


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where a path's heads sit in its projection's output features p [..., F]: ``rows`` [heads, D] holds the feature
    of each head's dims; pre == p[..., rows].permute(perm) with p[..., rows] laid out [..., heads, D], or, with
    ``perm`` None, pre == p[..., rows.flatten()] (pre not yet split into heads)."""

    rows: torch.Tensor
    perm: tuple | None

    @property
    def axis(self):
        """pre's head axis (None: pre is flat, [..., heads·D])."""
        return None if self.perm is None else self.perm.index(len(self.perm) - 2)


def _replay_indices(edit, path: _Path, p: torch.Tensor):
    """The layout ops from the projection's output to ``pre`` run on p's feature indices (casts skipped)."""
    env = {path.proj.out: torch.arange(p.shape[-1], dtype=torch.float64).expand(p.shape).contiguous()}

    def value(a):
        return env[a] if a in env else edit.values[a] if a in edit.values else edit.fetch(a.target)

    for n in path.layout:
        if is_op(n, aten.to, aten._to_copy, aten.type_as):  # a dtype cast would round indices (bf16)
            env[n] = env[n.args[0]]
        else:
            env[n] = n.target(*map_arg(n.args, value), **map_arg(n.kwargs, value))
    return env[path.pre]


def _layout(edit, path: _Path, heads: int, d: int) -> _Layout | None:
    """The layout of ``path``'s heads in its projection's features, found by running the layout ops on the feature
    indices and checked on the example values; None when pre is not made of heads·D projection features."""
    p, pre = edit.values[path.proj.out], edit.values[path.pre]
    try:
        idx = _replay_indices(edit, path, p)
    except Exception:  # noqa: BLE001 - a layout op that does not take indices: not a layout we know
        return None
    if not isinstance(idx, torch.Tensor) or idx.shape != pre.shape:
        return None
    lead = tuple(p.shape[:-1])
    if pre.dim() == p.dim():  # not split into heads yet
        cands = [(idx, None)] if pre.shape[-1] == heads * d else []
    elif pre.dim() == p.dim() + 1:  # pre == x.permute(perm), x laid out [..., heads, D]
        cands = [(idx.permute(torch.tensor(perm).argsort().tolist()), perm)
                 for perm in itertools.permutations(range(pre.dim()))]
    else:
        return None
    for x, perm in cands:
        if tuple(x.shape[:len(lead)]) != lead or tuple(x.shape[len(lead):]) not in ((heads, d), (heads * d,)):
            continue
        rows = x[(0,) * len(lead)]
        if not torch.equal(x, rows.expand(x.shape)) or rows.unique().numel() != heads * d:
            continue
        rows = rows.reshape(heads, d).long()
        got = p[..., rows.flatten()]
        got = got if perm is None else got.unflatten(-1, (heads, d)).permute(perm)
        if torch.equal(got, pre):
            return _Layout(rows, perm)
    return None


def _doomed(graph, out: Node) -> set:
    """Nodes nothing reads any more once ``out``'s users read its replacement."""
    dead = {out}
    for n in reversed(graph.nodes):
        if n.users and all(u in dead for u in n.users):
            dead.add(n)
    return dead


def _mixed(w: torch.Tensor, segments: list) -> tuple[torch.Tensor, list[int]]:
    """``w`` [F, ...] with the rows of each segment (rows [heads, D], m [heads', heads]) replaced by one block of
    heads' · D rows, the heads mixed by m, at the place of the segment's first row (the other rows keep their
    order); and the blocks' new offsets. Contiguous segments are replaced in place."""
    used = torch.zeros(len(w), dtype=torch.bool)
    blocks, items = [], []
    for i, (rows, m) in enumerate(segments):
        block = w[rows.flatten()].unflatten(0, tuple(rows.shape)).double()
        blocks.append(torch.einsum("gh,hd...->gd...", m, block).flatten(0, 1).to(w.dtype))
        used[rows.flatten()] = True
        items.append((int(rows.min()), i))
    items += [(int(r), -1) for r in (~used).nonzero().flatten()]
    index, offsets, start = [], [0] * len(blocks), [len(w)]
    for b in blocks:
        start.append(start[-1] + len(b))
    for key, i in sorted(items):
        if i < 0:
            index.append(key)
        else:
            offsets[i] = len(index)
            index.extend(range(start[i], start[i] + len(blocks[i])))
    return torch.cat([w, *blocks])[index], offsets


def _mix_heads(t: torch.Tensor, m: torch.Tensor, axis, d: int) -> torch.Tensor:
    """``t`` with its heads (along ``axis``, or ``"flat"``: the last dim is heads·D) mixed by m [heads', heads]."""
    x = t.detach().double()
    if axis == "flat":
        return _mix_heads(x.unflatten(-1, (-1, d)), m, -2, d).flatten(-2).to(t.dtype)
    return (x.movedim(axis, -1) @ m.T).movedim(-1, axis).to(t.dtype)


def _head_params(path: _Path, heads: int, d: int) -> list:
    """(get_attr, axis) of the parameters on ``path`` laid out per head (a norm over the whole projection:
    [heads·D]; per-head weights: [..., heads, D]): pooled like the projection. A [D] weight is shared: kept."""
    out = []
    for n in path.params:
        s = tuple(n.meta["val"].shape) if n.meta.get("val") is not None else ()
        if heads > 1 and s and s[-1] == heads * d:
            out.append((n, "flat"))
        elif heads > 1 and s[-2:] == (heads, d):
            out.append((n, -2))
    return out


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


def _splits_heads(n: Node, heads: int, d: int) -> bool:
    """``n`` views [..., heads·D] as [..., heads, D] (a head split, perhaps spelled with the head count)."""
    if not is_op(n, aten.view, aten.reshape, aten._unsafe_view, aten.unflatten):
        return False
    a, b = shape(n.args[0]), shape(n)
    return a is not None and b is not None and len(b) == len(a) + 1 and static_int(a[-1]) == heads * d and \
        [static_int(x) for x in b[-2:]] == [heads, d] and [str(x) for x in a[:-1]] == [str(x) for x in b[:-2]]


def _heads(edit, p_new: Node, width: int, path: _Path, off: int, perm, heads: int, d: int, swap: dict,
           was: int) -> Node:
    """The path's tensor rebuilt from the new projection output: slice, split into heads, replay the rest (with
    the nodes in ``swap``, pooled parameters, in place of the old ones, and a head split of the ``was`` heads,
    when the path has one after ``pre``, splitting the new heads)."""
    x = p_new
    if off or width != heads * d:
        x = edit.call(aten.slice.Tensor, (x, -1, off, off + heads * d))
    if perm is not None:
        x = edit.call(aten.unflatten.int, (x, -1, [heads, d]))
        x = edit.call(aten.permute.default, (x, list(perm)))
    env = {path.pre: x, **swap}
    for n in path.region:
        if perm is None and _splits_heads(n, was, d):
            env[n] = edit.call(aten.unflatten.int, (env.get(n.args[0], n.args[0]), -1, [heads, d]))
            continue
        args = map_arg(n.args, lambda a: env.get(a, a))
        if perm is None and is_op(n, aten.layer_norm, aten.rms_norm, aten.native_layer_norm) and \
                [static_int(x) for x in n.args[1]] == [was * d]:  # a norm over all heads, before the split
            args = (args[0], [heads * d], *args[2:])
        env[n] = edit.call(n.target, args, map_arg(n.kwargs, lambda a: env.get(a, a)))
    return env[path.end]


def _segments(edit, site: AttentionSite, paths: dict, rebuilt: list) -> tuple[dict, set]:
    """{projection output: [(name, layout)]} of the rebuilt paths, and the tensors to replace (projection weights
    and biases, per-head norm weights).

    Raises SkipSite when a path's heads cannot be located in its projection's features, or when a
    projection is read by something that outlives the site."""
    by_proj, g = {}, edit.graph
    for name in rebuilt:
        p = paths[name]
        heads = site.num_heads if name == "q" else site.num_kv_heads
        found = _layout(edit, p, heads, site.head_dim)
        if found is None:
            raise SkipSite(f"cannot map {p.proj.fqn}'s output features to {name.upper()}'s heads (its layout is "
                           "not [..., heads·head_dim] split into heads)")
        by_proj.setdefault(p.proj.out, []).append((name, found))
    for segs in by_proj.values():
        segs.sort(key=lambda s: int(s[1].rows.min()))
        seen = torch.cat([lay.rows.flatten() for _, lay in segs])
        if seen.unique().numel() != seen.numel():
            raise SkipSite("two of q/k/v read the same projection features")
    doomed, targets = _doomed(g, site.out), set()

    def owned(t, what):
        if any(n.op == "get_attr" and n.target == t and not set(n.users) <= doomed for n in g.nodes):
            raise SkipSite(f"{what} is also used outside this attention (a returned KV cache or a shared layer)")
        targets.add(t)

    for name in rebuilt:
        p = paths[name].proj
        for t in [x.target for x in (p.weight, p.bias) if x is not None]:
            owned(t, f"{name.upper()}'s projection {p.fqn or '<root>'}")
        heads = site.num_heads if name == "q" else site.num_kv_heads
        for n, _ in _head_params(paths[name], heads, site.head_dim):
            if n.target in targets:
                raise SkipSite(f"{n.target} is read by two of q/k/v")
            owned(n.target, f"{name.upper()}'s norm weight {n.target}")
    return by_proj, targets


def _rebuild(edit, site: AttentionSite, paths: dict, by_proj: dict, mix: dict) -> dict:
    """Store the mixed weights in place of the old ones and insert the rebuilt paths; {name: end node}."""
    d, ends = site.head_dim, {}
    for out_node, segs in by_proj.items():
        proj = paths[segs[0][0]].proj
        mixes = [(lay.rows, mix[name]) for name, lay in segs]
        w = edit.fetch(proj.weight.target).detach()
        w_new, offsets = _mixed(w if proj.layout == "out_in" else w.T, mixes)
        edit.store(proj.weight.target, (w_new if proj.layout == "out_in" else w_new.T).contiguous())
        if proj.bias is not None:
            edit.store(proj.bias.target, _mixed(edit.fetch(proj.bias.target).detach(), mixes)[0])
        p_new = _project(edit, proj)
        for (name, lay), off in zip(segs, offsets):
            swap = {}
            for n, axis in _head_params(paths[name], mix[name].shape[1], d):  # pooled as the heads are
                edit.store(n.target, _mix_heads(edit.fetch(n.target), mix[name], axis, d).contiguous())
                swap[n] = edit.get_attr(n.target, p_new)
            ends[name] = _heads(edit, p_new, len(w_new), paths[name], off, lay.perm, mix[name].shape[0], d, swap,
                                mix[name].shape[1])
    return ends


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.shape != want.shape:
        return float("inf")
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


def _grouped_reference(edit, path: _Path, lay: _Layout, m: torch.Tensor, d: int,
                       query_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the original path run on the pooled heads, each repeated; rep: the pooled head at each of its heads).

    The original nodes from ``pre`` on (original spellings) run on the pooled heads m·pre, each repeated n / kv
    times (pooled norm weights alike), n the path's own heads when kv_heads divides them, else the query heads:
    the model with its K/V heads repeated per group, which is the grouped model's function when the steps act on
    each head alone or, before the head split, on all heads with weights that follow them (a norm over the
    whole projection output: its statistic over n·D features of equally repeated heads is the one over kv·D)."""
    heads, kv = m.shape[1], m.shape[0]
    n = heads if heads % kv == 0 else query_heads
    rep = torch.arange(n) * kv // n
    env = dict(edit.values)
    env[path.pre] = _mix_heads(edit.values[path.pre], m[rep], "flat" if lay.axis is None else lay.axis, d)
    for n, axis in _head_params(path, heads, d):
        env[n] = _mix_heads(edit.values[n], m[rep], axis, d)
    return run_nodes(edit.gm, list(path.region), env), rep


def _check(edit, site: AttentionSite, ends: dict, mix: dict) -> dict:
    """Each rebuilt tensor equals its original heads mixed by ``mix`` on the example inputs (a path linear per
    head), or, on a path with a norm or per-head norm weights, the original path run on the pooled heads repeated
    per group; else SkipSite. {name: how it was checked}."""
    mine, how, g = edit.new_nodes, {}, edit.graph
    with torch.no_grad():
        for name, end in ends.items():
            got = edit.evaluate(mine[:mine.index(end) + 1])
            orig = edit.values[getattr(site, name)]
            tol = max(1e-4, 4 * torch.finfo(orig.dtype).eps)
            err = _rel(got, torch.einsum("gh,...hnd->...gnd", mix[name], orig.double()))
            if err <= tol:
                how[name] = "pooled"
                continue
            p = _path(g, getattr(site, name))  # the original path (the rebuilt one reads none of its nodes)
            heads = mix[name].shape[1]
            if "norm" not in p.steps and not _head_params(p, heads, site.head_dim):
                raise SkipSite(f"rebuilt {name.upper()} differs from the pooled original by {err:.1e} (relative) "
                               "on the example inputs: the path from its projection is not linear per head")
            lay = _layout(edit, p, heads, site.head_dim)
            if lay is None:
                raise SkipSite(f"cannot map {p.proj.fqn}'s output features to {name.upper()}'s heads")
            ref, rep = _grouped_reference(edit, p, lay, mix[name], site.head_dim, site.num_heads)
            err2 = _rel(got.index_select(-3, rep), ref)
            if not err2 <= tol:
                raise SkipSite(f"rebuilt {name.upper()} differs from the original path run on the pooled heads by "
                               f"{err2:.1e} (relative) on the example inputs: its steps ({', '.join(p.steps)}) do "
                               "not act on each head alone")
            how[name] = "normalised after pooling"
    return how


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
            raise SkipSite(f"no {name.upper()} projection found (the path from a linear layer to {name.upper()} is "
                           "not made of layout ops, rotary embeddings (whole or partial), norms over the head dim "
                           "or over the projection's output, and their weights)")
    order, a, weight = _plan(site, params, values[site.k])
    permuted = order != list(range(h))
    mix = {"k": a, "v": a, "q": torch.eye(h, dtype=torch.float64)[order]}
    rebuilt = ["k", "v"]
    if permuted or (paths["q"] is not None and paths["q"].proj.out in (paths["k"].proj.out, paths["v"].proj.out)):
        if paths["q"] is None:
            raise SkipSite("cluster pooling permutes the query heads, but no Q projection was found")
        rebuilt.append("q")  # permuted, or re-fused with K and V
    by_proj, targets = _segments(edit, site, paths, rebuilt)

    old = {t: edit.fetch(t) for t in targets}
    try:
        ends = _rebuild(edit, site, paths, by_proj, mix)
        how = _check(edit, site, ends, mix)
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
    projections = {t for n in rebuilt for x in (paths[n].proj.weight, paths[n].proj.bias) if x is not None
                   for t in [x.target]}
    edit.info.update({
        "kv_heads_after": kv, "pooling": params.pooling,
        "groups": [order[i:i + h // kv] for i in range(0, h, h // kv)],
        "head_weights": [round(float(x), 6) for x in weight / weight.sum() * h],
        "params_removed": sum(old[t].numel() - edit.fetch(t).numel() for t in targets),
        "kv_cache_bytes_per_token": [2 * hkv * d * elt, 2 * kv * d * elt],
        # Q/K/V projections and the attention core (q·kᵀ and p·v over the example's keys), per token
        "flops_per_token": [2 * d_in * (h + 2 * n) * d + 4 * h * n_keys * d for n in (hkv, kv)],
        # the steps between each projection and the attention (projection -> attention order), how each rebuilt
        # tensor was checked, and the norm weights pooled with the projections
        "steps": {n: list(p.steps) for n, p in paths.items() if p is not None},
        "checked": how,
        "pooled_norm_weights": sorted(targets - projections),
    })
    return out


def describe(site: AttentionSite, params: GQAParams) -> dict:
    return {**fuse_attention.describe(site), "kv_heads_requested": params.kv_heads, "pooling": params.pooling}


PASS = register(RewritePass("gqa", "attention", False, match, apply, needs, describe, GQAParams))
