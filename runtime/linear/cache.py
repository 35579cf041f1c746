"""The ``recurrent`` cache policy of linear attention: the state S = Σ φ(k)ᵀ v and z = Σ φ(k) per KV head, O(1) in
the context length (Katharopoulos et al. 2020, "Transformers are RNNs"). Decode is the recurrence

    S ← S + φ(k_t)ᵀ v_t,   z ← z + φ(k_t),   o_t = φ(q_t) S / (φ(q_t)·z + eps).

The hybrid (``window > 0``) also keeps a ring of the last ``window`` keys, which decode attends with exact softmax
under the shared normaliser (runtime/linear/__init__.py); a key leaving the window is folded into S and z. Padding
keys get φ(k) = 0, as in the prefill."""
from __future__ import annotations

import torch

from attnforge.codegen import masks

from ..cache import CachePolicy, Site, register_policy
from .features import EXP_KERNELS, feature_dim, phi


def allocate(site: Site, batch: int, capacity: int) -> list:
    p = site.params
    f = feature_dim(p["feature_map"], site.head_dim, p.get("wk"))
    zeros = lambda *s: torch.zeros(batch, site.kv_heads, *s, dtype=site.dtype, device=site.device)  # noqa: E731
    state = [zeros(f, site.value_dim), zeros(f)]
    if p["window"]:
        w = p["window"]
        state += [zeros(w, site.head_dim), zeros(w, site.value_dim),
                  torch.full((batch, w), -1, dtype=torch.long, device=site.device),
                  torch.zeros(batch, w, dtype=torch.bool, device=site.device)]
    return state


def _fold(state, k, v, keep, site):
    """S += Σ keep·φ(k)ᵀ v and z += Σ keep·φ(k) over the given keys [B, Hkv, T, ·]."""
    fk = phi(k, site.params["feature_map"], site.scale, site.params.get("wk")) * keep[:, None, :, None]
    state[0] += fk.transpose(-1, -2) @ v
    state[1] += fk.sum(2)


def attend(q, k, v, state, valid, start, site: Site):
    p = site.params
    w = p["window"]
    if start == 0:  # prefill: the rewrite's own kernel over the prompt, then the state decode continues from
        out = torch.ops.attnforge.linear_attention(q, k, v, None if bool(valid.all()) else valid[:, None, :],
                                                   site.scale, p["feature_map"], True, w, p["eps"], p.get("wq"),
                                                   p.get("wk"), p.get("mix"))
        t = k.shape[2]
        old = max(0, t - w) if w else t  # keys that decode will see through the state
        _fold(state, k[:, :, :old], v[:, :, :old], valid[:, :old].to(q.dtype), site)
        for j in range(old, t):
            _ring_write(state, k[:, :, j:j + 1], v[:, :, j:j + 1], valid[:, j:j + 1], j, w, site, fold=False)
        return out
    outs = []
    for t in range(q.shape[2]):
        pos = start + t
        if w:
            _ring_write(state, k[:, :, t:t + 1], v[:, :, t:t + 1], valid[:, t:t + 1], pos, w, site, fold=True)
        else:
            _fold(state, k[:, :, t:t + 1], v[:, :, t:t + 1], valid[:, t:t + 1].to(q.dtype), site)
        outs.append(_read(q[:, :, t:t + 1], state, pos, site))
    return torch.cat(outs, 2)


def _ring_write(state, k, v, valid, pos: int, w: int, site, fold: bool):
    """Put key ``pos`` in its ring slot; the key it replaces (pos − window) leaves the window: into S and z."""
    slot = pos % w
    if fold:
        held = state[4][:, slot]
        keep = ((held >= 0) & state[5][:, slot]).to(k.dtype)[:, None]  # [B, 1]
        _fold(state, state[2][:, :, slot:slot + 1], state[3][:, :, slot:slot + 1], keep, site)
    state[2][:, :, slot] = k[:, :, 0]
    state[3][:, :, slot] = v[:, :, 0]
    state[4][:, slot] = pos
    state[5][:, slot] = valid[:, 0]


def _read(q, state, pos: int, site: Site):
    """One query at ``pos``: the linear part from the state, the window (hybrid) by exact softmax; GQA: query head
    h reads KV head h // (H / Hkv)."""
    p = site.params
    groups = q.shape[1] // state[0].shape[1]
    rep = (lambda x: x.repeat_interleave(groups, 1)) if groups > 1 else (lambda x: x)  # noqa: E731
    fq = phi(q, p["feature_map"], site.scale, p.get("wq"))  # [B, H, 1, F]
    num, den = fq @ rep(state[0]), (fq * rep(state[1])[:, :, None]).sum(-1, keepdim=True)
    if p["window"]:
        held, ok = state[4], state[5]
        band = (held >= 0) & ok & masks.evaluate(masks.window(p["window"], True), torch.tensor(pos), held)
        s = (q @ rep(state[2]).transpose(-1, -2)) * site.scale  # [B, H, 1, w]
        s = s.masked_fill(~band[:, None, None, :], float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = m.masked_fill(m == float("-inf"), 0.0)
        rho = torch.exp(-m) if p["feature_map"] in EXP_KERNELS else 1.0
        mix = p.get("mix")
        gamma = torch.exp(mix if mix is not None else q.new_zeros(q.shape[1])).to(q.dtype)[None, :, None, None]
        e = gamma * torch.exp(s - m)
        num = e @ rep(state[3]) + num * rho
        den = e.sum(-1, keepdim=True) + den * rho
    return num / (den + p["eps"])


def nbytes(site: Site, batch, context):
    """S [F, Dv] and z [F] per KV head (+ the hybrid's ring of the window): constant in the context length."""
    p = site.params
    item = torch.empty(0, dtype=site.dtype).element_size()
    f = feature_dim(p["feature_map"], site.head_dim, p.get("wk"))
    total = batch * site.kv_heads * f * (site.value_dim + 1) * item
    if p["window"]:
        total += batch * p["window"] * (site.kv_heads * (site.head_dim + site.value_dim) * item + 8 + 1)
    return total


def initial(site: Site, batch: int) -> list:
    if site.params["window"]:
        raise ValueError("the hybrid linear attention (window > 0) has no exported decode step yet")
    return allocate(site, batch, 0)


def step(q, k, v, past, mask, site: Site):
    """The exported step (window 0): the current chunk causally among itself plus the state,
    o_t = φ(q_t)(S + Σ_{j≤t} φ(k_j)ᵀv_j) / (φ(q_t)·(z + Σ_{j≤t} φ(k_j)) + eps); then S, z absorb the chunk."""
    p = site.params
    if p["window"]:
        raise ValueError("the hybrid linear attention (window > 0) has no exported decode step yet")
    t = q.shape[2]
    groups = q.shape[1] // k.shape[1]
    rep = (lambda x: x.repeat_interleave(groups, 1)) if groups > 1 else (lambda x: x)  # noqa: E731
    keep = mask.bool()[:, -t:].to(q.dtype)[:, None, :, None]
    fq = phi(q, p["feature_map"], site.scale, p.get("wq"))
    fk = phi(k, p["feature_map"], site.scale, p.get("wk")) * keep
    a = (fq @ rep(fk).transpose(-1, -2)) * torch.ones(t, t, dtype=q.dtype, device=q.device).tril()
    num = fq @ rep(past[0]) + a @ rep(v)
    den = (fq * rep(past[1])[:, :, None]).sum(-1, keepdim=True) + a.sum(-1, keepdim=True)
    return num / (den + p["eps"]), [past[0] + fk.transpose(-1, -2) @ v, past[1] + fk.sum(2)]


def _pack(p):
    return [p["window"]], [p["eps"]], [p["feature_map"]], [p.get("wq"), p.get("wk"), p.get("mix")]


def _unpack(ints, floats, strs, weights):
    return {"window": ints[0], "eps": floats[0], "feature_map": strs[0], "wq": weights[0], "wk": weights[1],
            "mix": weights[2]}


RECURRENT = register_policy(CachePolicy(
    "recurrent", "the state Σ φ(k)ᵀv, Σ φ(k) per KV head (+ a ring of the window for the hybrid): constant",
    allocate, attend, nbytes, _pack, _unpack,
    params_of=lambda a: {k: a[k] for k in ("feature_map", "window", "eps", "wq", "wk", "mix")},
    state_names=("state", "normalizer"), initial=initial, step=step))
