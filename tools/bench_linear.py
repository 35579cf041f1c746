"""Benchmark of the linear attention CPU kernels against dense causal SDPA (a ``tools/bench.py`` subcommand).

``add_arguments(subparser)`` declares the options, ``cmd_linear(args)`` runs and returns markdown lines:
for each N, every kernel's median time over interleaved runs in one process, its speed-up over
``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` on the same inputs, and its GFLOP/s (matmul FLOPs:
4·D·H·N(N+1)/2 for SDPA, ``runtime.linear.flops`` for the kernels), then the growth from the first N to the last.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

HEADS, DIM = 8, 64


def add_arguments(p) -> None:
    from attnforge.runtime import linear

    p.add_argument("--n", default="2048,4096,8192,16384,32768", help="sequence lengths")
    p.add_argument("--maps", default="elu,relu,cosine,hedgehog,performer,taylor", help="feature maps to time")
    p.add_argument("--window", type=int, default=64, help="also time the elu hybrid with this window (0: skip)")
    p.add_argument("--chunk", type=int, default=linear.CHUNK, help="chunk length of the causal kernel")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--taylor-max", type=int, default=8192, help="largest N for taylor (2145 features at D=64)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")


def _helpers():
    try:
        from attnforge.tools import bench
    except ImportError:  # run as a script from tools/
        import bench
    return bench


def _kernels(a, n):
    """{name: (fn, features, window)} on one set of inputs."""
    from attnforge.runtime import linear

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, n, DIM) for _ in range(3))
    weights = {"performer": (linear.orthogonal_features(DIM, 256, 0),) * 2,
               "hedgehog": (linear.hedgehog_init(HEADS, DIM),) * 2}
    scale = DIM ** -0.5
    fns = {"dense causal SDPA": (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), None, 0)}
    for name in a.maps.split(","):
        if name == "taylor" and n > a.taylor_max:
            continue
        wq, wk = weights.get(name, (None, None))
        f = linear.feature_dim(name, DIM, wq)
        fns[f"linear {name}"] = (lambda name=name, wq=wq, wk=wk: linear.linear_attention_cpu(
            q, k, v, None, scale, name, True, 0, 1e-6, wq, wk, None, a.chunk), f, 0)
    if a.window:
        mix = torch.zeros(HEADS)
        fns[f"hybrid elu, window {a.window}"] = (lambda: linear.linear_attention_cpu(
            q, k, v, None, scale, "elu", True, a.window, 1e-6, None, None, mix, a.chunk), DIM, a.window)
    return fns


def cmd_linear(a) -> list[str]:
    """Linear attention kernels vs dense causal SDPA, N = 2k … 32k (B=1, H=8, D=64, fp32)."""
    from attnforge.runtime import linear

    if getattr(a, "quick", False):
        a.n, a.repeat, a.maps = "512,1024", 1, "elu"
    if a.threads:
        torch.set_num_threads(a.threads)
    bench = _helpers()
    lines = [f"B=1, H={HEADS}, D={DIM}, fp32, causal; chunk {a.chunk}; {torch.get_num_threads()} threads; medians of "
             f"{a.repeat} interleaved runs; FLOPs: dense 4·D·H·N(N+1)/2, linear `runtime.linear.flops`", "",
             "| N | kernel | time (s) | vs dense causal SDPA | GFLOP/s |", "|---|---|---|---|---|"]
    seen = {}
    for n in [int(x) for x in a.n.split(",")]:
        fns = _kernels(a, n)
        for fn, _, _ in fns.values():  # warm-up
            fn()
        med = bench.interleaved({name: fn for name, (fn, _, _) in fns.items()}, a.repeat)
        dense = med["dense causal SDPA"]
        for name, (fn, f, window) in fns.items():
            if f is None:
                work = 4 * DIM * HEADS * n * (n + 1) / 2
            else:
                work = linear.flops(n, HEADS, DIM, f, True, window, a.chunk)
            gflops = work / med[name] / 1e9
            lines.append(f"| {n} | {name} | {med[name]:.4f} | {dense / med[name]:.2f}x | {gflops:.1f} |")
            seen.setdefault(name, []).append((n, med[name]))
    lines.append("")
    for name, rows in seen.items():
        if len(rows) > 1:
            (n0, t0), (n1, t1) = rows[0], rows[-1]
            lines.append(f"- {name}: N {n0} -> {n1} (x{n1 / n0:.0f}), time x{t1 / t0:.1f}")
    if hasattr(a, "no_save"):  # run through tools/bench.py: draw docs/img/linear.png
        series = {name: ([n for n, _ in rows], [t for _, t in rows]) for name, rows in seen.items()}
        lines += bench.plot(a, "linear", series, "sequence length N", "seconds (median)",
                            f"linear attention vs dense causal SDPA, B=1 H={HEADS} D={DIM}")
    return lines


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=cmd_linear.__doc__)
    add_arguments(parser)
    print("\n".join(cmd_linear(parser.parse_args())))
