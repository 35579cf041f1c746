"""MemoryFormer's memory layer against the dense ``nn.Linear`` it replaces, on CPU.

``python tools/bench_memoryformer.py`` prints a markdown table: for d_in = d_out = d, τ and a number of tokens,
the median time of ``nn.Linear`` (BLAS GEMM), of ``attnforge::memory_layer`` (the CPU kernel: hash plus one
weighted ``embedding_bag``) and of its hash alone, the median of the per-round ratios memory/dense, the
multiply-add ratio and the table size. Runs are interleaved (dense, memory, hash, dense, ...) and every
ratio comes from the same round, so load from other processes on a shared machine hits both sides alike.

What to expect: the memory layer does τ times fewer multiply-adds, but they are gathers of K rows per
token that are not shared between tokens, while GEMM reads the weight once for the whole batch and runs at
peak FLOPs. So with many tokens BLAS wins despite doing more arithmetic; with one token (decoding) the
dense layer reads all d·d_out weights per token and the memory layer only K·d_out table entries.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

import attnforge  # noqa: F401  (registers the ops)
from attnforge.runtime.memoryformer import memory_hash

memory_layer = torch.ops.attnforge.memory_layer


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@torch.no_grad()
def bench(d: int, tau: int, tokens: int, reps: int) -> dict:
    torch.manual_seed(0)
    dense = nn.Linear(d, d)
    table = torch.randn(d // tau * 2 ** tau, d) * 0.02
    x = torch.randn(tokens, d)
    runs = {"dense": lambda: dense(x), "memory": lambda: memory_layer(x, table, dense.bias, tau),
            "hash": lambda: memory_hash(x, tau)}
    for fn in runs.values():  # warm-up: allocations, page faults of the table
        fn()
    times = {k: [] for k in runs}
    for _ in range(reps):
        for k, fn in runs.items():
            times[k].append(_time(fn))
    ratio = statistics.median(m / dd for m, dd in zip(times["memory"], times["dense"]))
    k = d // tau
    return {"d": d, "tau": tau, "tokens": tokens, **{k_: statistics.median(v) * 1e3 for k_, v in times.items()},
            "ratio": ratio, "macs": (k * d + k * tau) / (d * d), "table_mib": table.numel() * 4 / 2 ** 20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", default="1024,4096")
    p.add_argument("--taus", default="4,8")
    p.add_argument("--tokens", default="1,16,256")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads; on a shared machine more threads than free cores stall at every barrier")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = ["| d | τ | tokens | dense ms | memory ms | hash ms | memory/dense | MACs ratio | table MiB |",
            "|---|---|---|---|---|---|---|---|---|"]
    for d in [int(x) for x in a.dims.split(",")]:
        for tau in [int(x) for x in a.taus.split(",")]:
            for tokens in [int(x) for x in a.tokens.split(",")]:
                r = bench(d, tau, tokens, a.reps)
                rows.append(f"| {d} | {tau} | {tokens} | {r['dense']:.3f} | {r['memory']:.3f} | {r['hash']:.3f} | "
                            f"{r['ratio']:.2f}x | {r['macs']:.3f} | {r['table_mib']:.0f} |")
                print(rows[-1], file=sys.stderr)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
