"""Benchmarks, run by hand: ``python tools/bench.py pipeline`` (also ``python -m attnforge.tools.bench``).

Each command prints a table and, unless ``--no-save``, appends a dated section to docs/benchmarks.md.
Timings are medians of repeated runs in one process; ratios are against a baseline of the same run.
Nothing here asserts a timing.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

_REPO_DOCS = Path(__file__).resolve().parent.parent / "docs"
DOCS = _REPO_DOCS if _REPO_DOCS.is_dir() else Path.cwd() / "docs"  # a checkout's docs/, else ./docs


def header() -> str:
    import importlib.metadata as md

    def ver(p):
        try:
            return md.version(p)
        except md.PackageNotFoundError:
            return "absent"

    return (f"{datetime.date.today().isoformat()} · {platform.machine()} · {os.cpu_count()} cores · "
            f"torch {torch.__version__} · triton {ver('triton')} · transformers {ver('transformers')} · "
            f"threads {torch.get_num_threads()}")


def plot(a, name: str, series: dict, xlabel: str, ylabel: str, title: str, log: bool = True) -> list[str]:
    """Write docs/img/<name>.png (one line per series: {label: (xs, ys)}) and return its markdown line."""
    if a.no_save:
        return []
    try:
        import matplotlib
    except ImportError:
        print("bench: no plot, matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
        return ["", f"(no plot: matplotlib was not installed for this run: {title})"]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if log:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = DOCS / "img" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return ["", f"![{title}](img/{name}.png)"]


def llama(layers: int, hidden: int = 256, heads: int = 8, kv_heads: int = 4, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, use_cache=False,
                         attn_implementation="sdpa")
    return tf.LlamaModel(cfg).eval()


def cmd_pipeline(a) -> list[str]:
    """optimize() wall time vs depth, with the per-stage breakdown from the report."""
    import attnforge

    depths = [int(x) for x in a.depths.split(",")]
    ids = torch.randint(0, 1000, (1, 64))
    rows = []
    attnforge.optimize(llama(2), "exact", (ids,))  # warm-up: imports, op registration, first export
    for d in depths:
        model = llama(d)
        times, stages = [], None
        for _ in range(a.repeat):
            t = time.perf_counter()
            opt = attnforge.optimize(model, "exact", (ids,))
            times.append(time.perf_counter() - t)
            stages = opt.report.timings
        nodes = opt.report.nodes_before
        rows.append((d, nodes, statistics.median(times), stages, opt.report.counts()))
    base = rows[0]
    lines = ["| layers | graph nodes | optimize (s, median) | per layer (ms) | vs first | capture | canonicalize "
             "| match | rewrite | verify | sites |", "|" + "---|" * 11]
    for d, nodes, t, st, counts in rows:
        lines.append(f"| {d} | {nodes} | {t:.3f} | {1000 * t / d:.1f} | {t / base[2]:.2f}x | {st['capture']:.3f} "
                     f"| {st['canonicalize']:.3f} | {st['match']:.3f} | {st['rewrite']:.3f} | {st['verify']:.3f} "
                     f"| {sum(counts.values())} |")
    growth = rows[-1][2] / base[2]
    lines.append("")
    lines.append(f"Depth {base[0]} -> {rows[-1][0]} ({rows[-1][0] / base[0]:.0f}x layers): optimize time x{growth:.2f}, "
                 f"graph nodes x{rows[-1][1] / base[1]:.2f}.")
    xs = [r[0] for r in rows]
    series = {"optimize (total)": (xs, [r[2] for r in rows])}
    for stage in ("capture", "canonicalize", "match", "rewrite", "verify"):
        series[stage] = (xs, [max(r[3][stage], 1e-4) for r in rows])
    return lines + plot(a, "pipeline", series, "layers", "seconds", "optimize() time vs depth (Llama, hidden 256)")


def matmul_peak(size: int = 2048, repeat: int = 5) -> float:
    """Measured fp32 matmul throughput (GFLOP/s) on this machine: the roofline kernels are compared to."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_time(lambda: a @ b) for _ in range(repeat))
    return 2 * size ** 3 / best / 1e9


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(fns: dict, repeat: int) -> dict:
    """Median seconds per function, runs interleaved round-robin so load changes hit every one alike."""
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            times[k].append(_time(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def _flex_sliding(n: int, window: int, sinks: int):
    """torch.compile(flex_attention) with the sliding-window(+sinks) BlockMask; (fn, build and compile seconds)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def rule(b, h, qi, kv):
        return (qi >= kv) & ((qi - kv < window) | (kv < sinks))

    t = time.perf_counter()
    block_mask = torch.compile(create_block_mask)(rule, None, None, n, n, device="cpu")  # no N×N tensor
    compiled = torch.compile(flex_attention, dynamic=False)
    return (lambda q, k, v: compiled(q, k, v, block_mask=block_mask)), time.perf_counter() - t


def cmd_kernels(a) -> list[str]:
    """Sliding-window attention kernels vs dense causal SDPA and FlexAttention, same inputs, one process."""
    import torch.nn.functional as F

    from attnforge.runtime.sliding_window import pairs as window_pairs
    from attnforge.runtime.sliding_window.cpu import sliding_window_cpu

    heads, dim, window, sinks = 8, 64, a.window, a.sinks
    peak = matmul_peak()
    lines = [f"B=1, H={heads}, D={dim}, fp32, causal; window {window}, sinks {sinks}; measured fp32 matmul peak "
             f"{peak:.0f} GFLOP/s; medians of {a.repeat} interleaved runs; FLOPs = 4·D·H·(visible pairs)", "",
             "| N | kernel | time (s) | vs dense SDPA | vs FlexAttention | GFLOP/s | % of matmul peak | warm-up/compile (s) |",
             "|" + "---|" * 8]
    series: dict = {}
    for n in [int(x) for x in a.n.split(",")]:
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, heads, n, dim) for _ in range(3))
        scale = dim ** -0.5
        fns = {"dense causal SDPA": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
               "attnforge sliding_window": lambda: sliding_window_cpu(q, k, v, None, scale, window, sinks, True,
                                                                      a.block)}
        warm = {}
        if not a.no_flex:
            flex, build = _flex_sliding(n, window, sinks)
            t = time.perf_counter()
            flex(q, k, v)
            warm["FlexAttention (compiled)"] = build + time.perf_counter() - t
            fns["FlexAttention (compiled)"] = lambda: flex(q, k, v)
        for name, fn in fns.items():
            if name not in warm:
                warm[name] = _time(fn)
        ref = sliding_window_cpu(q, k, v, None, scale, window, sinks, True, a.block)
        if "FlexAttention (compiled)" in fns:
            err = float((fns["FlexAttention (compiled)"]() - ref).abs().max())
            lines_err = f"max |flex − attnforge| at N={n}: {err:.1e}"
        else:
            lines_err = ""
        med = interleaved(fns, a.repeat)
        for name, t in med.items():
            series.setdefault(name, ([], []))
            series[name][0].append(n)
            series[name][1].append(t)
        pairs_window = window_pairs(n, window, sinks, True)
        pairs_dense = n * (n + 1) // 2
        for name, t in med.items():
            pairs = pairs_dense if name.startswith("dense") else pairs_window
            gflops = 4 * dim * heads * pairs / t / 1e9
            vs_flex = f"{med['FlexAttention (compiled)'] / t:.2f}x" if "FlexAttention (compiled)" in med else "n/a"
            lines.append(f"| {n} | {name} | {t:.4f} | {med['dense causal SDPA'] / t:.2f}x | {vs_flex} | {gflops:.1f} "
                         f"| {100 * gflops / peak:.0f}% | {warm[name]:.2f} |")
        if lines_err:
            lines.append(f"| {n} | (check) | {lines_err} | | | | | |")
    lines.append("")
    lines.append("Ratios are (baseline time) / (row time): above 1x the row is faster. The dense row counts its own "
                 "N(N+1)/2 pairs; the windowed rows count only the pairs the window keeps.")
    return lines + plot(a, "kernels", series, "sequence length N", "seconds (median)",
                        f"causal attention, B=1 H={heads} D={dim}, window {window}")


def e2e_model(layers: int = 4, hidden: int = 512, heads: int = 8, seed: int = 0):
    """The end-to-end subject: a Llama-style HF model (random weights), eager SDPA attention."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=65536, use_cache=False, attn_implementation="sdpa")
    return tf.LlamaModel(cfg).eval()


E2E_RECIPES = {
    "exact": "exact",
    "long-context": "long-context",
    "sliding window 512 + 4 sinks, all layers": {"name": "window-all", "steps": [
        {"rewrite": "fuse_attention"}, {"rewrite": "fuse_ffn"},
        {"rewrite": "sliding_window", "params": {"window": 512, "sinks": 4}}]},
    "gqa (8->2 KV heads, mean)": {"name": "gqa", "steps": [{"rewrite": "gqa", "params": {"kv_heads": 2}},
                                                           {"rewrite": "fuse_ffn"}]},
    "linear (elu)": {"name": "linear", "steps": [{"rewrite": "linear", "params": {"feature_map": "elu"}},
                                                 {"rewrite": "fuse_ffn"}]},
}


def cmd_e2e(a) -> list[str]:
    """Prefill tokens/s of an HF Llama-style model: original vs torch.compile vs optimize(recipe)."""
    import attnforge
    from attnforge.passes import REGISTRY

    model = e2e_model(a.layers, a.hidden)
    cfg = model.config
    lines = [f"HF LlamaModel: {a.layers} layers, hidden {a.hidden}, {cfg.num_attention_heads} heads, FFN "
             f"{cfg.intermediate_size}, fp32, batch 1, random weights; medians of {a.repeat} interleaved runs; "
             "optimize() captured once at 128 tokens (dynamic shapes) and run at every length", "",
             "| N | variant | prefill (s) | tokens/s | vs eager | output cos vs eager | max abs err |",
             "|" + "---|" * 7]
    ids0 = torch.randint(0, cfg.vocab_size, (1, 128))
    variants = {"eager (sdpa)": model}
    for name, recipe in E2E_RECIPES.items():
        if a.only and name.split(" ")[0] not in a.only.split(","):
            continue
        steps = recipe if isinstance(recipe, str) else None
        needed = [s["rewrite"] for s in recipe["steps"]] if isinstance(recipe, dict) else []
        if any(r not in REGISTRY for r in needed):
            lines_missing = f"{name}: rewrite not available in this build"
            print(lines_missing)
            continue
        variants[name] = attnforge.optimize(model, recipe if steps is None else steps, (ids0,))
    compiled = torch.compile(model, dynamic=False) if not a.no_compile else None
    series: dict = {}
    for n in [int(x) for x in a.n.split(",")]:
        ids = torch.randint(0, cfg.vocab_size, (1, n))
        fns = {name: (lambda m=m: m(ids)) for name, m in variants.items()}
        if compiled is not None and n <= a.compile_max:
            t = time.perf_counter()
            compiled(ids)
            lines.append(f"| {n} | (torch.compile warm-up and compile: {time.perf_counter() - t:.1f}s) | | | | | |")
            fns["torch.compile(eager)"] = lambda: compiled(ids)
        with torch.no_grad():
            outs = {name: fn()[0] for name, fn in fns.items()}  # warm-up, and the outputs for the error column
            med = interleaved(fns, a.repeat)
        ref = outs["eager (sdpa)"]
        for name, t in med.items():
            series.setdefault(name, ([], []))
            series[name][0].append(n)
            series[name][1].append(n / t)
            o = outs[name]
            cos = float(torch.nn.functional.cosine_similarity(o.double().flatten(), ref.double().flatten(), dim=0))
            lines.append(f"| {n} | {name} | {t:.3f} | {n / t:,.0f} | {med['eager (sdpa)'] / t:.2f}x | {cos:.6f} "
                         f"| {float((o - ref).abs().max()):.1e} |")
    lines.append("")
    lines.append("Decode: the captured graphs carry no KV cache; decode tokens/s with a cache is measured for the "
                 "original model by `python tools/bench.py decode`.")
    return lines + plot(a, "e2e", series, "sequence length N", "prefill tokens/s",
                        f"HF Llama-style, {a.layers} layers, hidden {a.hidden}: prefill throughput")


def cmd_decode(a) -> list[str]:
    """Decode tokens/s of the original model with Hugging Face's KV cache, after a prefill of N tokens."""
    from transformers import DynamicCache

    model = e2e_model(a.layers, a.hidden)
    vocab = model.config.vocab_size
    lines = ["| context N | decode tokens/s (KV cache) | ms/token |", "|---|---|---|"]
    for n in [int(x) for x in a.n.split(",")]:
        ids = torch.randint(0, vocab, (1, n))
        rates = []
        with torch.no_grad():
            for _ in range(a.repeat):
                cache = DynamicCache()
                out = model(ids, past_key_values=cache, use_cache=True)
                tok = torch.randint(0, vocab, (1, 1))
                t = time.perf_counter()
                for _ in range(a.tokens):
                    out = model(tok, past_key_values=out.past_key_values, use_cache=True)
                rates.append(a.tokens / (time.perf_counter() - t))
        r = statistics.median(rates)
        lines.append(f"| {n} | {r:,.1f} | {1000 / r:.1f} |")
    return lines


def e2e_lm(layers: int = 4, hidden: int = 512, heads: int = 8, seed: int = 0):
    """The e2e subject with its LM head, for generation: HF defaults (use_cache, sdpa), no end-of-sequence token."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=65536, attn_implementation="sdpa")
    model = tf.LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None  # every run decodes all its tokens
    return model


GENERATE_RECIPES = {
    "exact": "exact",
    "sliding window 512 + 4 sinks": {"name": "window", "steps": [
        {"rewrite": "sliding_window", "params": {"window": 512, "sinks": 4}}, {"rewrite": "fuse_ffn"}]},
    "linear (elu)": {"name": "linear", "steps": [{"rewrite": "linear", "params": {"feature_map": "elu"}},
                                                 {"rewrite": "fuse_ffn"}]},
    "gqa 8->2": {"name": "gqa", "steps": [{"rewrite": "gqa", "params": {"kv_heads": 2}}, {"rewrite": "fuse_attention"},
                                          {"rewrite": "fuse_ffn"}]},
}


class _Clock:
    """A streamer that notes when each put comes: the prompt, then one per new token."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def _generate_times(fn, ids, tokens: int) -> tuple[float, float]:
    """(prefill + first token seconds, decode seconds per token) of one generate call."""
    clock = _Clock()
    fn(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens + 1, do_sample=False, streamer=clock)
    return clock.times[1] - clock.times[0], (clock.times[-1] - clock.times[1]) / tokens


def _floor(model, repeat: int) -> tuple[float, float]:
    """Seconds for one token through the model's projection and FFN matmuls alone (every weight read once), and
    the same with the LM head."""
    import torch.nn.functional as F

    linears = [m.weight for m in model.model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(1, w.shape[1]) for w in linears]
    head, last = model.lm_head.weight, torch.randn(1, model.lm_head.weight.shape[1])
    layers = lambda: [F.linear(x, w) for x, w in zip(inputs, linears)]  # noqa: E731
    with torch.no_grad():
        med = interleaved({"layers": layers, "head": lambda: (layers(), F.linear(last, head))}, repeat * 10)
    return med["layers"], med["head"]


def cmd_generate(a) -> list[str]:
    """Generation on the e2e model: prefill time, decode tokens/s and KV-cache bytes per context, HF generate vs
    attnforge's generate per recipe, with the matmul floor of one token, from one run."""
    import warnings

    import attnforge

    model = e2e_lm(a.layers, a.hidden)
    cfg = model.config
    vocab = cfg.vocab_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opts = {name: attnforge.optimize(model, recipe, (torch.randint(0, vocab, (1, 64)),))
                for name, recipe in GENERATE_RECIPES.items() if not a.only or name.split(" ")[0] in a.only}
    floor, floor_head = _floor(model, a.repeat)
    params = sum(p.numel() for n, p in model.named_parameters() if "layers" in n and p.dim() == 2)
    lines = [f"HF LlamaForCausalLM: {a.layers} layers, hidden {a.hidden}, {cfg.num_attention_heads} heads, "
             f"vocab {vocab}, fp32, batch 1, random weights; greedy, {a.tokens} decode tokens after the prompt's first "
             f"(timed by a streamer), median of {a.repeat}; HF `generate` uses DynamicCache and sdpa.", "",
             f"Floor: the projection and FFN matmuls alone for one token ({params * 4 / 1e6:.0f} MB of weights): "
             f"{floor * 1e3:.2f} ms; with the LM head ({model.lm_head.weight.numel() * 4 / 1e6:.0f} MB more): "
             f"{floor_head * 1e3:.2f} ms.", "",
             "| context | variant | prefill + 1st token (s) | decode ms/token | decode tokens/s | vs HF | vs floor "
             "(with head) | KV cache MB |", "|" + "---|" * 8]
    series: dict = {}
    for n in [int(x) for x in a.n.split(",")]:
        ids = torch.randint(0, vocab, (1, n))
        runs = {"HF generate": model.generate, **{name: opt.generate for name, opt in opts.items()}}
        results = {}
        with torch.no_grad():
            for name, fn in runs.items():
                times = [_generate_times(fn, ids, a.tokens) for _ in range(a.repeat)]
                results[name] = (statistics.median(t[0] for t in times), statistics.median(t[1] for t in times))
        hf_ms = results["HF generate"][1]
        for name, (prefill, per_token) in results.items():
            if name == "HF generate":
                cache = 2 * cfg.num_hidden_layers * n * cfg.num_key_value_heads * cfg.head_dim * 4
            else:
                cache = opts[name].kv_cache_bytes(1, n)
            series.setdefault(name, ([], []))
            series[name][0].append(n)
            series[name][1].append(1 / per_token)
            lines.append(f"| {n} | {name} | {prefill:.2f} | {per_token * 1e3:.2f} | {1 / per_token:,.1f} | "
                         f"{hf_ms / per_token:.2f}x | {per_token / floor_head:.2f}x | {cache / 2 ** 20:.2f} |")
    lines += ["", "vs HF: HF's ms/token over the row's (above 1x: faster). vs floor: the row's ms/token over the "
              "floor with the LM head (1x: nothing but the weights' matmuls)."]
    return lines + plot(a, "generate", series, "context length", "decode tokens/s",
                        f"generate, HF Llama-style {a.layers} layers hidden {a.hidden}, fp32, batch 1")


def cmd_autotune(a) -> list[str]:
    """CPU autotuning of the sliding-window and linear kernels: every config's median time, the winner, and its
    ratio to the default config, all from one run (a private cache folder; the user's cache is not touched)."""
    import tempfile

    from attnforge.codegen.autotune import Cache, tune
    from attnforge.runtime import variant

    cache = Cache(tempfile.mkdtemp(prefix="attnforge-bench-cache-"))
    lines = ["| kernel | N | default | tuned | default ms | tuned ms | default / tuned | all configs (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for n in [int(x) for x in a.n.split(",")]:
        q = torch.randn(1, a.heads, n, a.dim)
        k, v = torch.randn(1, a.heads, n, a.dim), torch.randn(1, a.heads, n, a.dim)
        calls = [("sliding_window_attention", (q, k, v, None, a.dim ** -0.5, a.window, a.sinks, True)),
                 ("linear_attention", (q, k, v, None, a.dim ** -0.5, "elu", True, 0, 1e-6, None, None, None))]
        for op, args in calls:
            (t,) = variant(op).tunables_for(args, "cpu", "torch")
            r = tune(t, cache, reps=a.repeat)
            every = ", ".join(f"{next(iter(c.values()))}: {ms:.1f}" for c, ms in r.timings)
            lines.append(f"| {t.key.kernel} | {n} | {t.default} | {r.best} | {r.default_ms:.1f} | {r.best_ms:.1f} | "
                         f"{r.speedup:.2f}x | {every} |")
    lines += ["", f"Sliding window: B=1, H={a.heads}, D={a.dim}, window {a.window}, sinks {a.sinks}, causal; linear: "
              "elu map, causal. The key includes the shape bucket, so one tuned entry serves N in (N/2, N]."]
    return lines


def cmd_gpu(a) -> list[str]:
    """TFLOP/s of the generated dense causal kernel against ``F.scaled_dot_product_attention`` (needs CUDA)."""
    import torch.nn.functional as F

    from attnforge.codegen.attention import attention_triton, flops

    if not torch.cuda.is_available():
        raise SystemExit("bench gpu: needs a CUDA GPU (the interpreter's timings mean nothing)")
    dtype = getattr(torch, a.dtype)
    lines = [f"GPU: {torch.cuda.get_device_name()}; B={a.batch}, H={a.heads}, D={a.dim}, {a.dtype}, causal; "
             "FLOPs = 2·B·H·N²·D (half of dense, the causal work); default config unless the cache holds a tuned one",
             "", "| N | kernel | ms | TFLOP/s | vs SDPA | max abs diff |", "|---|---|---|---|---|---|"]
    for n in [int(x) for x in a.n.split(",")]:
        q, k, v = (torch.randn(a.batch, a.heads, n, a.dim, device="cuda", dtype=dtype) for _ in range(3))
        fns = {"F.scaled_dot_product_attention": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
               "attnforge generated (causal)": lambda: attention_triton(q, k, v, None, a.dim ** -0.5, True)}
        diff = (fns["F.scaled_dot_product_attention"]() - fns["attnforge generated (causal)"]()).abs().max().item()
        ms = {}
        for name, fn in fns.items():
            for _ in range(3):
                fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(a.repeat):
                fn()
            end.record()
            torch.cuda.synchronize()
            ms[name] = start.elapsed_time(end) / a.repeat
        work = flops(n, n, a.heads, a.dim, a.batch) / 2
        for name, t in ms.items():
            lines.append(f"| {n} | {name} | {t:.3f} | {work / t / 1e9:.1f} | "
                         f"{ms['F.scaled_dot_product_attention'] / t:.2f}x | {diff:.1e} |")
    return lines


def cmd_recall(a) -> list[str]:
    """MQAR recall (attnforge/recall.py) of the original model and every approximate recipe, decoded through each
    recipe's own KV cache, against the bytes that cache holds: one table and one plot."""
    from attnforge import recall

    names = [n.strip() for n in a.recipes.split(",") if n.strip()] or None
    if a.quick:  # a tiny model trained in seconds, not cached; the original and the sliding windows
        cfg = recall.Config(task=recall.Task(4, 4, 32), hidden=64, steps=150, tokens=2048, lr=3e-3)
        model, info = recall.train(cfg, progress=False)
        info["cached"] = False
        rows = recall.evaluate(model, cfg.task, recall.select(cfg.task, names or ["original", "sliding_window"]),
                               a.sequences, recall.held_out_seed(cfg))
    else:
        cfg = recall.config_for(a.context, a.layers, a.hidden, a.seed)
        info, rows = recall.benchmark(cfg, names, a.sequences, a.retrain)
    task = cfg.task
    full = next((r["kv_cache_bytes"] for r in rows if r["recipe"] == "exact"), None)
    trained = f"cached, trained earlier in {info['seconds']:.0f}s" if info["cached"] else \
        f"trained in this run in {info['seconds']:.0f}s"
    lines = [f"MQAR (Zoology): {task.pairs} key-value pairs then {task.queries} queries, {task.context} tokens, "
             f"vocab {task.vocab} (keys and values from disjoint halves); the prompt is the key-value section "
             f"({task.prompt} tokens, prefilled), each query is one decode step through the recipe's own cache. "
             f"Model: LlamaForCausalLM, {cfg.layers} layers, hidden {cfg.hidden}, {cfg.hidden // 32} heads = KV "
             f"heads of 32, tied embeddings; AdamW lr {cfg.lr:g}, {cfg.steps} steps of {cfg.tokens} tokens, "
             f"pairs doubling from {cfg.start_pairs} over the first {cfg.ramp:.0%} of the steps, seed {cfg.seed} "
             f"({trained}); held-out accuracy of the original (HF forward): {info['accuracy']:.4f}. "
             f"{a.sequences} held-out sequences per row; "
             f"{'CUDA' if torch.cuda.is_available() else 'CPU only, no GPU'}.",
             "",
             "Method notes: the cache bytes are `opt.kv_cache_bytes(1, N)` at N = the whole sequence, except snapkv's, "
             "whose formula counts the kept keys of an N-token prompt: its rows add the decoded tokens' slots (the "
             "note gives both). snapkv and think choose what they keep at prefill from the prompt's last queries, and "
             "the prompt here holds no query of the task; streaming_heads chooses its heads once, on 4 example "
             "sequences (queries included). Windows: snapkv observes the last prompt/8 queries (kernel 5), think the "
             "last prompt/4, a streaming head sees 4 sinks + N/8. snapkv's and think's prompt forward pass is "
             "exact, so their logits cosine (full forward on an example) is 1. The taylor map's state (BASED) is "
             "constant in N but at head dim 32 larger than the full cache at this context.",
             "",
             "| recipe | family | recall accuracy | KV cache (bytes, 1 sequence, N tokens) | vs original "
             "| logits cosine (example) | note |", "|" + "---|" * 7]
    for r in rows:
        size, cos = r["kv_cache_bytes"], r["cosine"]
        acc = "—" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        ratio = f"{size / full:.2f}x" if size and full else ""
        lines.append(f"| {r['name']} | {r['family']} | {acc} | {'—' if size is None else f'{size:,}'} | {ratio} | "
                     f"{'' if cos is None else f'{cos:.4f}'} | {r['note'].replace('|', '/')} |")
    lines += ["", "Reproduce: `python tools/bench.py recall` (this section and docs/img/recall.png), or "
              "`attnforge eval recall [--recipes snapkv,think] [--json rows.json]` (a table on stdout); the trained "
              "model is cached in `$ATTNFORGE_CACHE_DIR/recall/<config hash>/` (`--retrain` trains it again)."]
    return lines + recall_plot(a, rows, f"MQAR recall at {task.context} tokens vs KV-cache bytes "
                                        f"(Llama {cfg.layers}x{cfg.hidden})")


def recall_plot(a, rows: list[dict], title: str) -> list[str]:
    """docs/img/recall.png: accuracy vs KV-cache bytes (log x), one marker per recipe family, each point named."""
    if a.no_save:
        return []
    try:
        import matplotlib
    except ImportError:
        return ["", f"(no plot: matplotlib was not installed for this run: {title})"]
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    shown = sorted((r for r in rows if r["accuracy"] is not None and r["kv_cache_bytes"]),
                   key=lambda r: r["kv_cache_bytes"])
    families = list(dict.fromkeys(r["family"] for r in rows))
    for family, marker in zip(families, "*osD^vPXh<>"):
        points = [r for r in shown if r["family"] == family]
        if points:
            ax.scatter([r["kv_cache_bytes"] for r in points], [r["accuracy"] for r in points], marker=marker, s=50,
                       label=family)
    placed: list = []  # (x from, x to, y) of each label so far, x in decades
    for r in shown:  # each label right or left of its point, above or below: the first place that is free
        x, y = math.log10(r["kv_cache_bytes"]), r["accuracy"]
        label = r["name"].replace(" + 4 sinks", "").replace(" ratio", "").replace(" kv heads", " kv")
        label = label.replace(" keys", "").replace(" of ", "/")
        width = 0.011 * len(label) + 0.02  # decades, at this size and font
        for dy, side in ((4, 1), (-9, 1), (4, -1), (-9, -1), (13, 1), (-18, 1), (13, -1), (-18, -1)):
            box = (x, x + width) if side > 0 else (x - width, x)
            box = (*box, y + (dy + 3) * 0.0037)  # the label's middle, in accuracy units (1 point = 0.0037)
            if not any(box[0] < p[1] and p[0] < box[1] and abs(box[2] - p[2]) < 0.03 for p in placed):
                break
        placed.append(box)
        ax.annotate(label, (r["kv_cache_bytes"], y), fontsize=6, xytext=(4 * side, dy), textcoords="offset points",
                    ha="left" if side > 0 else "right")
    ax.set_xscale("log")
    ax.set_ylim(-0.03, 1.05)
    ax.set_xlabel("KV-cache bytes per sequence at the full context (log)")
    ax.set_ylabel("recall accuracy (held-out, through decode)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = DOCS / "img" / "recall.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return ["", f"![{title}](img/recall.png)"]


COMMANDS = {"pipeline": (cmd_pipeline, "optimize() cost vs model depth (linear growth)"),
            "kernels": (cmd_kernels, "sparse attention kernels vs SDPA and FlexAttention"),
            "e2e": (cmd_e2e, "end-to-end prefill on an HF Llama-style model"),
            "decode": (cmd_decode, "decode tokens/s of the original model with a KV cache"),
            "generate": (cmd_generate, "generation: HF generate vs attnforge's cache per recipe, and the floor"),
            "linear": (None, "linear attention kernels vs dense causal SDPA"),
            "gpu": (cmd_gpu, "generated dense causal Triton kernel vs SDPA, TFLOP/s (CUDA only)"),
            "autotune": (cmd_autotune,
                         "CPU autotuning: tuned vs default config of the sliding-window and linear kernels"),
            "recall": (cmd_recall, "Recall (MQAR): accuracy vs KV-cache bytes of every recipe")}


def _bench_linear():
    try:
        from attnforge.tools import bench_linear
    except ImportError:  # run as a script from tools/
        import bench_linear
    return bench_linear


def _options(parser, **defaults):
    """``--name`` options typed by their defaults."""
    for name, default in defaults.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    return parser


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("pipeline", help=COMMANDS["pipeline"][1])
    pp.add_argument("--depths", default="2,4,8,12,16,32")
    pp.add_argument("--repeat", type=int, default=3)
    pk = sub.add_parser("kernels", help=COMMANDS["kernels"][1])
    pk.add_argument("--n", default="1024,2048,4096,8192,16384,32768")
    pk.add_argument("--window", type=int, default=512)
    pk.add_argument("--sinks", type=int, default=0)
    pk.add_argument("--block", type=int, default=64, help="query block of the CPU sliding-window kernel")
    pk.add_argument("--repeat", type=int, default=5)
    pk.add_argument("--no-flex", action="store_true", help="skip FlexAttention (no C++ compiler for inductor)")
    pe = sub.add_parser("e2e", help=COMMANDS["e2e"][1])
    pe.add_argument("--n", default="1024,4096,8192")
    pe.add_argument("--layers", type=int, default=4)
    pe.add_argument("--hidden", type=int, default=512)
    pe.add_argument("--repeat", type=int, default=3)
    pe.add_argument("--no-compile", action="store_true")
    pe.add_argument("--only", default="", help="comma-separated variant names to run (default: all)")
    pe.add_argument("--compile-max", type=int, default=8192, help="longest N for the torch.compile baseline")
    pd = _options(sub.add_parser("decode", help=COMMANDS["decode"][1]), n="1024,4096", tokens=32, layers=4,
                  hidden=512, repeat=3)
    pgen = _options(sub.add_parser("generate", help=COMMANDS["generate"][1]), n="1024,4096,16384,32768", tokens=32,
                    layers=4, hidden=512, repeat=2, only="")
    pl = sub.add_parser("linear", help=COMMANDS["linear"][1])
    _bench_linear().add_arguments(pl)
    pa = _options(sub.add_parser("autotune", help=COMMANDS["autotune"][1]), n="4096,8192,32768", heads=8, dim=64,
                  window=512, sinks=4, repeat=5)
    pg = _options(sub.add_parser("gpu", help=COMMANDS["gpu"][1]), n="4096,16384", batch=1, heads=16, dim=128,
                  dtype="float16", repeat=20)
    pr = _options(sub.add_parser("recall", help=COMMANDS["recall"][1]), context=256, layers=2, hidden=128, seed=0,
                  sequences=256, recipes="")
    pr.add_argument("--retrain", action="store_true", help="train the model again even if it is cached")
    for sp in (pp, pk, pe, pd, pgen, pl, pa, pg, pr):
        sp.add_argument("--quick", action="store_true", help="tiny sizes, for CI smoke tests; nothing saved")
        sp.add_argument("--no-save", action="store_true", help="print only; do not append to docs/benchmarks.md")
    a = p.parse_args(argv)
    if a.quick:
        a.no_save = True
        if a.command == "pipeline":
            a.depths, a.repeat = "1,2", 1
        if a.command == "kernels":
            a.n, a.repeat, a.window, a.no_flex = "256,512", 1, 64, True
        if a.command == "e2e":
            a.n, a.repeat, a.layers, a.hidden, a.no_compile = "256", 1, 2, 128, True
        if a.command in ("decode", "generate"):
            a.n, a.repeat, a.layers, a.hidden, a.tokens = "64", 1, 2, 128, 4
        if a.command == "autotune":
            a.n, a.repeat, a.heads, a.dim, a.window = "256", 1, 2, 16, 32
        if a.command == "recall":
            a.sequences = 16
    fn, title = COMMANDS[a.command]
    fn = fn or _bench_linear().cmd_linear
    lines = fn(a)
    cmd = "python tools/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = [f"## {a.command}: {title}", "", f"`{cmd}` — {header()}", ""] + lines + [""]
    print("\n".join(section))
    if not a.no_save:
        path = DOCS / "benchmarks.md"
        text = path.read_text() if path.exists() else "# Benchmarks\n\nSections are appended by `tools/bench.py`.\n\n"
        old = text.find(f"\n## {a.command}: ") if a.command == "recall" else -1
        if old >= 0:  # recall keeps one section, the latest run's, where it was
            end = text.find("\n## ", old + 1)
            path.write_text(text[:old + 1] + "\n".join(section) + "\n" + (text[end + 1:] if end >= 0 else ""))
        else:
            path.write_text(text + "\n".join(section) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
