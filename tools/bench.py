"""Benchmarks, run by hand: ``python tools/bench.py pipeline`` (also ``python -m attnforge.tools.bench``).

Each command prints a table and, unless ``--no-save``, appends a dated section to docs/benchmarks.md.
Timings are medians of repeated runs in one process; ratios are against a baseline of the same run.
Nothing here asserts a timing.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

DOCS = Path(__file__).resolve().parent.parent / "docs"


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
    return lines


COMMANDS = {"pipeline": (cmd_pipeline, "optimize() cost vs model depth (linear growth)")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("pipeline", help=COMMANDS["pipeline"][1])
    pp.add_argument("--depths", default="2,4,8,12,16,32")
    pp.add_argument("--repeat", type=int, default=3)
    for sp in (pp,):
        sp.add_argument("--quick", action="store_true", help="tiny sizes, for CI smoke tests; nothing saved")
        sp.add_argument("--no-save", action="store_true", help="print only; do not append to docs/benchmarks.md")
    a = p.parse_args(argv)
    if a.quick:
        a.no_save = True
        if a.command == "pipeline":
            a.depths, a.repeat = "1,2", 1
    fn, title = COMMANDS[a.command]
    lines = fn(a)
    cmd = "python tools/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = [f"## {a.command}: {title}", "", f"`{cmd}` — {header()}", ""] + lines + [""]
    print("\n".join(section))
    if not a.no_save:
        path = DOCS / "benchmarks.md"
        text = path.read_text() if path.exists() else "# Benchmarks\n\nSections are appended by `tools/bench.py`.\n\n"
        path.write_text(text + "\n".join(section) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
