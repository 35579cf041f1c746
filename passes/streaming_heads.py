"""``streaming_heads``: DuoAttention's split of the KV heads into retrieval and streaming heads (approximate).

DuoAttention (Xiao et al., 2024): only some KV heads ("retrieval heads") need every key; the others ("streaming
heads") lose little with attention sinks plus a recent window (StreamingLLM), so their cache is constant in the
context length. Each site keeps k = round(ratio · Hkv) retrieval heads (halves rounded up,
runtime/streaming_heads ``retrieval_count``) and runs ``attnforge::streaming_heads_attention``; its ``streaming``
cache stores the retrieval heads whole and a ring of sinks + window slots for the others.

The k heads are chosen on the example inputs (the site's q, k, v and mask as recorded, so after rotary
embeddings), on the query rows that are real (the model's mask keeps their own position):

``score`` (in the spirit of RazorAttention, Tang et al., 2024, which finds retrieval heads by a score instead of
training): the softmax attention mass each query head puts on keys it sees *outside* the streaming band,

    s_g = mean over the query heads h of KV head g and the real rows i that see some key outside the band of
          Σ_{j visible, j outside band(i)} softmax_j(scale·q_i·k_j + mask_ij)

(band(i): 0 ≤ i − j < window or j < sinks): what a streaming head would drop. The k highest are retrieval heads.

``optimize`` (DuoAttention's gate): per KV head a gate α_g = σ(θ_g) mixes the full and the streaming attention
outputs of its query heads, o = α·o_full + (1 − α)·o_stream, trained to reproduce o_full with an L1 penalty:

    min_θ  Σ_g mean_{h∈g, real i} ‖o_h,i − o_full h,i‖² / mean ‖o_full‖²  +  λ Σ_g α_g

per site, teacher-forced (each site's recorded inputs, as attnforge/calibrate.py trains: not DuoAttention's
end-to-end loss on the last hidden state, so heads of different layers do not interact). Since
o − o_full = (1 − α)(o_stream − o_full), the first term is (1 − α_g)²·D_g exactly, D_g the streaming head's relative
squared error, and each step costs O(Hkv). Adam, ``STEPS`` steps at learning rate ``LR`` from θ = 0, λ = ``L1``:
no random draw (deterministic). The optimum is α_g = clip(1 − λ/(2·D_g), 0, 1); the k largest gates are retrieval
heads, ranked by θ (α saturates near 1, θ ≈ log(2·D_g/λ − 1) does not; θ equal to 2 decimals, e.g. heads all
pushed towards 0, are ordered by D_g).

A ``retrieval`` map {site FQN: [KV heads]} fixes a site's heads instead (the map the report shows, fed back). The
chosen map is in the report (``info``: ``retrieval``, ``streaming``, the scores or gates, the KV-cache bytes before
and after); ``retrieval_map(report)`` collects it for every site.

A model is captured again for other call forms (generation captures (input_ids, attention_mask, position_ids) on
a short example): the heads chosen for a site on the first capture's example are kept for that model's later
captures (``_CHOSEN``, keyed by the model's own weight tensors, which every capture shares), so every program of
one optimized model uses one map.
"""
from __future__ import annotations

import weakref
from typing import Optional

import sympy
import torch
from torch import Tensor

from attnforge.patterns import AttentionSite
from attnforge.patterns.graph import example_size, shape, val
from attnforge.runtime.cache import Site
from attnforge.runtime.streaming_heads import VARIANT, StreamingHeadsParams, retrieval_count
from attnforge.runtime.streaming_heads.cache import FULL, STREAMING
from attnforge.runtime.streaming_heads.choose import (  # noqa: F401  (the methods, for tests)
    BETAS, L1, LR, ROWS, STEPS, retrieval_scores, streaming_distortion, top, train_gates, visible)

from .base import ParamError, RewritePass, SkipSite, register
from .fuse_attention import dense_flops, match, needs, site_flops

N = sympy.Symbol("N", positive=True, integer=True)

_CHOSEN: dict[int, tuple] = {}  # id(model tensor) -> (weakref to it, {key: choice}): tensors compare elementwise
_FQNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # graph module -> its attention sites' FQNs


# --------------------------------------------------------------------------- the pass


def _site_fqns(gm) -> set:
    """FQNs of the attention sites of ``gm`` (found once per graph module: the first site's call sees them all)."""
    known = _FQNS.get(gm)
    if known is None:
        known = _FQNS[gm] = {s.fqn for s in match(gm)[0]}
    return known


def _given(edit, site: AttentionSite, params: StreamingHeadsParams) -> Optional[list[int]]:
    """This site's heads from the ``retrieval`` map (checked: every FQN a site, every head in range), or None."""
    if params.retrieval is None:
        return None
    known = _site_fqns(edit.gm) | {site.fqn}
    unknown = sorted(set(params.retrieval) - known)
    if unknown:
        listed = ", ".join(sorted(f or "<root>" for f in known)[:6])
        raise ParamError("retrieval", f"{unknown[0]!r} is not an attention site of this model (its sites: {listed}"
                                      f"{' …' if len(known) > 6 else ''})")
    heads = params.retrieval.get(site.fqn)
    if heads is None:
        return None
    for i in heads:
        if not 0 <= i < site.num_kv_heads:
            raise ParamError("retrieval", f"{site.fqn or '<root>'}: KV head {i} is out of range (the site has "
                                          f"{site.num_kv_heads} KV heads: 0 … {site.num_kv_heads - 1})")
    if len(set(heads)) != len(heads):
        raise ParamError("retrieval", f"{site.fqn or '<root>'}: a KV head is listed twice ({heads})")
    return sorted(heads)


def _anchors(edit, site: AttentionSite) -> list[Tensor]:
    """Tensors of the model that every capture of it shares: the site's projection weights, the first parameter."""
    out = []
    for name in ("k_proj", "q_proj", "v_proj"):
        fqn = site.proj.get(name)
        if fqn:
            try:
                t = edit.fetch(f"{fqn}.weight")
            except AttributeError:
                continue
            if isinstance(t, Tensor):
                out.append(t)
    first = next(iter(edit.gm.parameters()), None)
    return out + ([first] if first is not None else [])


def _memo(t: Tensor) -> dict:
    """The choices recorded under the model tensor ``t`` (dropped with the tensor)."""
    entry = _CHOSEN.get(id(t))
    if entry is None or entry[0]() is not t:
        def forget(ref, i=id(t)):
            if _CHOSEN.get(i, (None,))[0] is ref:
                del _CHOSEN[i]

        entry = _CHOSEN[id(t)] = (weakref.ref(t, forget), {})
    return entry[1]


def _choose(edit, site: AttentionSite, params: StreamingHeadsParams) -> tuple[list[int], dict]:
    """(retrieval heads, what the report says of the choice) by ``params.method`` on the example values."""
    if params.ratio is None:
        raise ParamError("ratio", f"{site.fqn or '<root>'} is not in the retrieval map: give ratio to choose its "
                                  "heads, or list them")
    count = retrieval_count(params.ratio, site.num_kv_heads)
    key = (site.fqn, params.ratio, params.window, params.sinks, params.method)
    anchors = _anchors(edit, site)
    for t in anchors:
        hit = _memo(t).get(key)
        if hit is not None:
            return list(hit[0]), {**hit[1], "reused": "chosen on this model's first capture"}
    n = example_size(shape(site.q)[-2]) if shape(site.q) else None
    if n is not None and params.window > n:
        raise ParamError("window", f"window={params.window} is longer than the example prompt ({n} tokens): choosing "
                                   "the heads needs queries that see past the window (give a longer example or a "
                                   "retrieval map)")
    q, k, v = (edit.values[x] for x in (site.q, site.k, site.v))
    mask = _mask_value(edit)
    info: dict = {"chosen_by": params.method}
    if params.method == "score":
        scores = retrieval_scores(q, k, mask, site.scale, params.window, params.sinks, site.causal)
        heads = top(scores, count)
        info["scores"] = [round(float(s), 6) for s in scores]
        flat = scores
    else:
        d = streaming_distortion(q, k, v, mask, site.scale, params.window, params.sinks, site.causal)
        gates, logits, loss = train_gates(d)
        heads = top(torch.round(logits * 100), count, tie=d)
        info.update(gates=[round(float(a), 6) for a in gates], gate_logits=[round(float(x), 3) for x in logits],
                    distortion=[float(f"{float(x):.6g}") for x in d], gate_loss=loss,
                    gate_training={"steps": STEPS, "lr": LR, "betas": list(BETAS), "l1": L1,
                                   "loss": "per-site L2 of the attention output, teacher-forced"})
        flat = d
    if not bool((flat != 0).any()):
        info["note"] = ("no query of the example sees a key outside sinks + window: every head scores 0 and the "
                        "first heads are taken")
    for t in anchors:
        _memo(t)[key] = (tuple(heads), dict(info))
    return heads, info


def _mask_value(edit) -> Optional[Tensor]:
    """The site's mask on the example (its parts combined as ``build_mask`` combines them)."""
    parts = edit.site.mask_parts
    if not parts:
        return None
    before = set(edit.new_nodes)
    node = edit.build_mask()
    new = [n for n in edit.new_nodes if n not in before]
    value = edit.evaluate(new) if new else edit.values.get(node)
    for n in reversed(new):
        edit.graph.erase_node(n)
    return value


def _bytes(site: AttentionSite, flags: list[bool], params) -> tuple:
    """KV-cache bytes of this site for one sequence as formulas in N: the full cache of its KV heads, and the
    streaming cache."""
    q = val(site.q)
    dtype = q.dtype if q is not None else torch.float32
    base = Site(site.num_heads, site.num_kv_heads, site.head_dim, _value_dim(site), site.scale, dtype, "cpu", {})
    mine = Site(**{**base.__dict__, "params": {"window": params.window, "sinks": params.sinks,
                                               "retrieval": tuple(flags)}})
    return FULL.bytes(base, 1, N), STREAMING.bytes(mine, 1, N)


def _value_dim(site: AttentionSite) -> int:
    v = shape(site.v)
    return int(v[-1]) if v and isinstance(v[-1], int) else site.head_dim


def apply(edit, site: AttentionSite, params: StreamingHeadsParams):
    q = val(site.q)
    if q is not None and q.dim() != 4:
        raise SkipSite("heads folded into the batch ([B·H, N, D]): retrieval and streaming heads need them apart")
    heads = _given(edit, site, params)
    info = {"chosen_by": "retrieval map"} if heads is not None else None
    if heads is None:
        heads, info = _choose(edit, site, params)
    flags = [i in heads for i in range(site.num_kv_heads)]
    before, after = _bytes(site, flags, params)
    n = example_size(shape(site.q)[-2]) if shape(site.q) else None
    edit.info.update(info)
    edit.info.update({"retrieval": list(heads), "streaming": [i for i in range(site.num_kv_heads) if i not in heads],
                      "kv_bytes_before": str(sympy.expand(before)), "kv_bytes_after": str(sympy.expand(after)),
                      "kv_bytes_formula_valid_for": "batch 1, N positions of context"})
    if n:
        edit.info.update(kv_bytes_before_at_n=int(before.subs(N, n)), kv_bytes_after_at_n=int(sympy.sympify(
            after).subs(N, n)))
    return edit.replace_core(VARIANT.op, site.scale, flags, params.window, params.sinks, site.causal)


def describe(site: AttentionSite, params: StreamingHeadsParams) -> dict:
    n = example_size(shape(site.q)[-2]) if shape(site.q) else None
    w, s = params.window, params.sinks
    count = len((params.retrieval or {}).get(site.fqn, ())) if site.fqn in (params.retrieval or {}) else \
        retrieval_count(params.ratio, site.num_kv_heads) if params.ratio is not None else None
    info = {"window": w, "sinks": s, "ratio": params.ratio, "method": params.method, "causal": site.causal,
            "heads": site.num_heads, "kv_heads": site.num_kv_heads}
    if count is not None:
        flags = [i < count for i in range(site.num_kv_heads)]  # FLOPs depend on how many, not which
        after = lambda n: site_flops(site, VARIANT, n, flags, w, s, site.causal)  # noqa: E731
        info.update(retrieval_heads=count, flops_before=str(sympy.expand(dense_flops(site, N))),
                    flops_after=str(sympy.expand(after(N))), formula_valid_for=f"N >= {w + s}")
        if n:
            info.update(example_n=n, flops_before_at_n=int(dense_flops(site, n)), flops_after_at_n=int(after(n)))
    return info


def retrieval_map(report) -> dict[str, list[int]]:
    """{site FQN: retrieval KV heads} of every site a ``streaming_heads`` step rewrote: the ``retrieval`` param that
    reproduces the choice (``{"rewrite": "streaming_heads", "params": {"retrieval": ..., "window": ..., ...}}``)."""
    return {r.fqn: list(r.info["retrieval"]) for r in report.sites
            if r.rewrite == "streaming_heads" and r.status == "applied" and "retrieval" in r.info}


PASS = register(RewritePass("streaming_heads", "attention", False, match, apply, needs, describe,
                            StreamingHeadsParams))
