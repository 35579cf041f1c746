"""``memoryformer``: dense projections -> MemoryFormer hashed lookup tables (approximate; weights change).

MemoryFormer (Ding et al., NeurIPS 2024) replaces a linear layer y = W z + b by a memory layer
y = Σ_k w_k(z_k) · T[k·2^τ + idx_k] + b over the K = d/τ chunks of z (``runtime/memoryformer/``). The
paper trains the tables from scratch; this pass converts a trained layer, a product-quantisation view of
the matmul: W z = Σ_k W_k z_k, and chunk k is replaced by a representative of its bucket,

    T_k[b] = W_k · c_{k,b},      c_{k,b} = Σ_{z ∈ b} w_k(z)·z_k / Σ_{z ∈ b} w_k(z)²,

the least-squares centre of the calibration chunks in bucket b (the plain bucket mean when w ≡ 1; dividing
by w is what makes w·T[b] ≈ W_k z_k, since the layer multiplies the row by w). A bucket no calibration
input falls in gets its sign vector scaled by the chunk's mean magnitude m_k, as a point: c = s_b·m_k / w(s_b·m_k).

Refinement (``calibrate=True``): the rows are then fitted jointly, min_T ‖A T − Z Wᵀ‖² + λ‖T − T_0‖², where
A [tokens, K·2^τ] holds w_k at each token's K rows (the layer is linear in T). Jacobi-preconditioned
conjugate gradients run on the normal equations for every output column at once, with A applied as a
sparse matrix (no dense [tokens, K, d_out] tensor). 7/8 of the calibration tokens are fitted, the other
1/8 pick the iterate (early stopping), so the refinement cannot make held-out tokens worse than the
centroids (below 64 tokens all are fitted). The calibration inputs are the site's inputs on the example
inputs, recorded on the original model (every site of a step is converted from the dense activations).
"""
from __future__ import annotations

import sys
import warnings

import torch
from torch.fx import GraphModule

from attnforge.patterns.dense import LinearSite, match_linears
from attnforge.runtime.ffn import ACTIVATIONS
from attnforge.runtime.memoryformer import VARIANT, MemoryFormerParams, memory_hash, memory_layer_cpu

from .base import RewritePass, SkipSite, register


def match(gm: GraphModule):
    return match_linears(gm.graph, ACTIVATIONS)


def needs(site: LinearSite) -> list:
    return [site.x, site.out]


# --------------------------------------------------------------------------- conversion


def centroid_tables(w_oi: torch.Tensor, z: torch.Tensor, tau: int) -> torch.Tensor:
    """T [K·2^τ, d_out] with T_k[b] = W_k c_{k,b} (module docstring) from calibration inputs z [tokens, d]."""
    d_out, d = w_oi.shape
    k, size = d // tau, 2 ** tau
    rows, w = memory_hash(z, tau)
    chunks = z.view(-1, k, tau)
    num = z.new_zeros(k * size, tau).index_add_(0, rows.flatten(), (w[..., None] * chunks).flatten(0, 1))
    den = z.new_zeros(k * size).index_add_(0, rows.flatten(), (w * w).flatten())
    # empty buckets: the sign vector of the bucket at the chunk's mean magnitude, as a single point z/w(z)
    bits = torch.arange(size)[:, None] >> torch.arange(tau - 1, -1, -1) & 1
    m = chunks.abs().mean((0, 2)) if len(z) else torch.ones(k)
    point = (2.0 * bits - 1)[None] * m[:, None, None]  # [K, 2^τ, τ]
    fallback = (point / torch.sigmoid(2 * point.abs()).prod(-1, keepdim=True)).reshape(k * size, tau)
    c = torch.where(den[:, None] > 0, num / den.clamp_min(1e-30)[:, None], fallback.to(z.dtype))
    per_chunk = w_oi.reshape(d_out, k, tau).permute(1, 2, 0)  # W_k^T: [K, τ, d_out]
    return torch.bmm(c.view(k, size, tau), per_chunk).reshape(k * size, d_out)


def _design(rows: torch.Tensor, w: torch.Tensor, n_rows: int) -> torch.Tensor:
    """A [tokens, K·2^τ] (sparse CSR) from the hash (rows, w) [tokens, K]: A T = memory_layer(z, T)."""
    tokens = torch.arange(len(rows))[:, None].expand_as(rows)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        return torch.sparse_coo_tensor(torch.stack([tokens.flatten(), rows.flatten()]), w.flatten(),
                                       (len(rows), n_rows)).coalesce().to_sparse_csr()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def refine_tables(t0: torch.Tensor, z: torch.Tensor, target: torch.Tensor, tau: int, steps: int, ridge: float,
                  label: str = "") -> tuple[torch.Tensor, dict]:
    """Least-squares refinement of T (module docstring): PCG on fit tokens, iterate chosen on held-out tokens."""
    n_fit = len(z) - len(z) // 8 if len(z) >= 64 else len(z)
    rows, w = memory_hash(z[:n_fit], tau)
    a = _design(rows, w, len(t0))
    a_t = a.t().to_sparse_csr()
    held_z, held_y = z[n_fit:], target[n_fit:]
    diag = torch.zeros(len(t0)).index_add_(0, rows.flatten(), (w * w).flatten())  # diag(AᵀA)
    lam = ridge * float(diag[diag > 0].mean()) if bool((diag > 0).any()) else ridge
    precond = (diag + lam).clamp_min(1e-12)[:, None]

    def normal(v):
        return a_t @ (a @ v) + lam * v

    def held_err(t):
        return _rel(memory_layer_cpu(held_z, t, None, tau), held_y) if len(held_z) else 0.0

    x = t0.clone()
    r = a_t @ target[:n_fit] + lam * t0 - normal(x)
    p = r / precond
    rz = (r * p).sum(0)
    best, best_err, best_step = x.clone(), held_err(x), 0
    start_fit = _rel(a @ x, target[:n_fit])
    from rich.console import Console
    from rich.progress import Progress

    with Progress(transient=True, disable=not sys.stderr.isatty(), console=Console(stderr=True)) as bar:
        task = bar.add_task(f"memoryformer {label}", total=steps)
        for i in range(steps):
            mp = normal(p)
            alpha = rz / (p * mp).sum(0).clamp_min(1e-30)
            x += alpha * p
            r -= alpha * mp
            zr = r / precond
            rz_new = (r * zr).sum(0)
            p = zr + rz_new / rz.clamp_min(1e-30) * p
            rz = rz_new
            err = held_err(x) if len(held_z) else _rel(a @ x, target[:n_fit])
            if err < best_err or not len(held_z):
                best, best_err, best_step = x.clone(), err, i + 1
            bar.update(task, advance=1)
    stats = {"fit_tokens": n_fit, "heldout_tokens": len(held_z), "cg_steps_kept": best_step, "ridge_lambda": lam,
             "fit_rel_error": [start_fit, _rel(a @ best, target[:n_fit])]}
    if len(held_z):
        stats["heldout_rel_error"] = [held_err(t0), best_err]
    return best, stats


def convert(weight: torch.Tensor, z: torch.Tensor, params: MemoryFormerParams, label: str = ""):
    """(tables, stats) for the dense weight W [d_out, d] (nn.Linear layout) from calibration inputs z [tokens, d]."""
    w = weight.detach().float()
    z = z.detach().float().reshape(-1, w.shape[1])
    target = z @ w.T  # the bias is kept exactly; only W z is approximated
    table = centroid_tables(w, z, params.tau)
    stats = {"calibration_tokens": len(z), "rel_error_centroids": _rel(memory_layer_cpu(z, table, None, params.tau),
                                                                      target)}
    if params.calibrate and params.steps > 0 and len(z):
        table, more = refine_tables(table, z, target, params.tau, params.steps, params.ridge, label)
        stats.update(more)
        stats["rel_error_refined"] = _rel(memory_layer_cpu(z, table, None, params.tau), target)
    return table.to(weight.dtype), stats


# --------------------------------------------------------------------------- graph surgery


def apply(edit, site: LinearSite, params: MemoryFormerParams):
    missing = [r for r in site.roles if r not in params.projections]
    if missing:
        raise SkipSite(f"{'/'.join(site.roles)} projection; projections={params.projections} leave out "
                       f"{', '.join(missing)}")
    proj = site.proj
    weight = edit.fetch(proj.weight.target)
    w_oi = weight if proj.layout == "out_in" else weight.T
    d_out, d = w_oi.shape
    if d % params.tau:
        raise SkipSite(f"tau={params.tau} does not divide the input width {d}")
    table, stats = convert(w_oi, edit.values[site.x], params, site.fqn)
    owner_name, _, _ = proj.weight.target.rpartition(".")
    target = edit.add_tensor(owner_name, "memory_table", table, trainable=weight.requires_grad, parameter=True)
    out = edit.like_site(edit.call(VARIANT.op, (site.x, edit.get_attr(target, site.x), proj.bias, params.tau)))
    edit.info.update({**stats, **costs(d, d_out, params.tau, table.element_size(),
                                       edit.values[site.x].numel() // d)})
    return out


def costs(d: int, d_out: int, tau: int, elt: int, tokens: int) -> dict:
    """Multiply-adds, bytes and table memory of the dense layer and of the memory layer, per token.

    Dense: d·d_out multiply-adds; its weight is read once per forward, i.e. d·d_out·elt bytes per token when
    decoding one token, divided by the tokens of a batch. Memory layer: K·d_out multiply-adds (w_k·row) plus
    K·τ for the weights w_k (and K·τ sign tests and sigmoids); K rows of d_out read per token, whatever the batch.
    """
    k = d // tau
    act = (d + d_out) * elt
    return {"tau": tau, "chunks": k, "table_rows": k * 2 ** tau,
            "macs_per_token": [d * d_out, k * d_out + k * tau],
            "bytes_per_token_decode": [d * d_out * elt + act, k * d_out * elt + act],
            "bytes_per_token_batch": [d * d_out * elt / max(tokens, 1) + act, k * d_out * elt + act],
            "batch_tokens": tokens,
            "weight_bytes": [d * d_out * elt, k * 2 ** tau * d_out * elt]}


def describe(site: LinearSite, params: MemoryFormerParams) -> dict:
    return {"roles": list(site.roles), "layout": site.proj.layout, "tau": params.tau, "calibrate": params.calibrate}


PASS = register(RewritePass("memoryformer", "projection", False, match, apply, needs, describe, MemoryFormerParams))
