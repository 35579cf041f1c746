"""``calibrate(optimized, batches)``: train the hedgehog feature maps of a rewritten model (LoLCATs attention transfer).

Each ``linear`` site with ``feature_map: hedgehog`` carries trainable maps (Parameters ``hedgehog_*``: W_q, W_k
and, with a window, the log window weights). Following LoLCATs (Zhang et al. 2024, "LoLCATs: On Low-Rank
Linearizing of Large Language Models", attention transfer), every such layer is trained on its own to
reproduce the softmax layer it replaced, on the same inputs:

    min over W of  Σ_layers MSE(linear_attention(q, k, v; W), softmax(scale·q kᵀ + mask) v)

The inputs are teacher-forced: the rewritten graph is run with every linear site answering with its softmax
reference, which is the original model's forward (the pass only accepted masks it reproduces exactly), and
each site's q, k, v and key mask are recorded once per batch. Only the feature-map parameters change.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Iterable

import torch
from torch import nn
from torch.fx import GraphModule, Interpreter

from attnforge.runtime.linear import softmax_attention

from .capture import flat_inputs
from .verify import error_stats

LINEAR = torch.ops.attnforge.linear_attention.default


class _Teacher(Interpreter):
    """Runs the graph with each linear site replaced by its softmax reference, recording the site's inputs."""

    def __init__(self, gm: GraphModule):
        super().__init__(gm)
        self.seen: dict = {}

    def run_node(self, n):
        if n.op == "call_function" and n.target is LINEAR:
            args = self.map_nodes_to_values(n.args, n)
            q, k, v, key_mask, scale, _, causal = args[:7]
            ref = softmax_attention(q, k, v, key_mask, scale, causal)
            self.seen[n] = (args, ref)
            return ref
        return super().run_node(n)


def _as_call(batch) -> tuple[tuple, dict]:
    """A batch is a tensor, a tuple of positional inputs, a mapping of keyword inputs, or (args, kwargs)."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], (tuple, list)) \
            and isinstance(batch[1], Mapping):
        return tuple(batch[0]), dict(batch[1])
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    raise TypeError(f"a calibration batch is a tensor, a tuple, a dict or (args, kwargs), not {type(batch).__name__}")


def _site_loss(args, ref):
    """MSE between the site's linear attention (live feature maps) and its softmax reference."""
    return torch.mean((LINEAR(*args) - ref) ** 2)


def calibrate(model, batches: Iterable, steps: int = 200, lr: float = 1e-2, progress: bool = True) -> dict:
    """Train the hedgehog maps of ``model`` (an ``OptimizedModel`` or its ``GraphModule``) with Adam for
    ``steps`` steps, cycling over ``batches``, each layer towards its softmax output (layer-wise MSE).

    Returns {site FQN: {"mse_before", "mse_after", "error_before", "error_after"}} (MSE summed over the
    batches; error stats of the first batch, as in the report). When ``model`` has a report, each calibrated
    site's ``error`` becomes the after-calibration error, its ``info["calibration"]`` holds both, and a note
    per site says before -> after.
    """
    gm = getattr(model, "graph_module", model)
    if not isinstance(gm, GraphModule):
        raise TypeError("calibrate takes the result of attnforge.optimize (or its graph_module)")
    params = [p for name, p in gm.named_parameters() if "hedgehog" in name]
    if not params:
        raise ValueError("nothing to calibrate: no hedgehog feature maps (rewrite with linear, feature_map: hedgehog)")
    cache = []
    with torch.no_grad():
        for batch in batches:
            teacher = _Teacher(gm)
            args, kwargs = _as_call(batch)
            teacher.run(*flat_inputs(gm, args, kwargs))
            cache.append(teacher.seen)  # activations carry no graph (no_grad); the maps stay live Parameters
    if not cache:
        raise ValueError("calibrate needs at least one batch")
    trained = [n for n in cache[0] if any(isinstance(a, nn.Parameter) and a.requires_grad for a in cache[0][n][0])]
    before = _measure(cache, trained)
    opt = torch.optim.Adam(params, lr=lr)
    with _bar(progress, steps) as advance:
        for step in range(steps):
            loss = sum(_site_loss(*cache[step % len(cache)][n]) for n in trained)
            opt.zero_grad()
            loss.backward()
            opt.step()
            advance(loss.item())
    after = _measure(cache, trained)
    result = {}
    for n in trained:
        fqn = n.meta.get("attnforge_fqn", n.name)
        result[fqn] = {"mse_before": before[n][0], "mse_after": after[n][0], "error_before": before[n][1],
                       "error_after": after[n][1]}
    _update_report(getattr(model, "report", None), result, steps, lr)
    return result


@torch.no_grad()
def _measure(cache, nodes) -> dict:
    """{node: (MSE summed over batches, error_stats on the first batch)}."""
    out = {}
    for n in nodes:
        mse = sum(float(_site_loss(*batch[n])) for batch in cache)
        args, ref = cache[0][n]
        out[n] = (mse, error_stats(LINEAR(*args), ref))
    return out


def _update_report(report, result: dict, steps: int, lr: float) -> None:
    if report is None:
        return
    for rec in report.sites:
        r = result.get(rec.fqn)
        if rec.rewrite != "linear" or rec.status != "applied" or r is None:
            continue
        rec.info["calibration"] = {"steps": steps, "lr": lr, **r}
        rec.error = r["error_after"]
        report.notes.append(f"calibrated {rec.fqn or '<root>'} ({steps} steps, lr {lr:g}): local rel. error "
                            f"{r['error_before']['rel']:.2e} -> {r['error_after']['rel']:.2e}, "
                            f"MSE {r['mse_before']:.2e} -> {r['mse_after']:.2e}")


@contextlib.contextmanager
def _bar(progress: bool, steps: int):
    """A rich progress bar showing the loss; yields ``advance(loss)`` (a no-op when ``progress`` is False)."""
    if not progress:
        yield lambda loss: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("calibrate"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                  TimeRemainingColumn()) as bar:
        task = bar.add_task("calibrate", total=steps, loss="-")
        yield lambda loss: bar.update(task, advance=1, loss=f"{loss:.3e}")
