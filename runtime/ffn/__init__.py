"""``attnforge::ffn``: a feed-forward block in one op, what ``fuse_ffn`` inserts (exact).

down(act(up(x))), or down(act(gate(x)) ⊙ up(x)) with a gate. PyTorch kernel: ``cpu.py``. Triton: ``triton.py``,
the up/gate matmul with act(g)·u in its epilogue, then the down projection. ONNX: ``onnx.py``.
"""
from __future__ import annotations

import math

import sympy

from attnforge.errors import AttnforgeError

from ..registry import Cost, Shaped, Variant, io_bytes, param, register
from .activations import ACTIVATIONS, ONNX_ACTIVATIONS  # noqa: F401
from .cpu import ffn_cpu
from .onnx import ffn_onnx
from .reference import ffn as reference


def _fake(x, w_up, b_up, w_down, b_down, w_gate, b_gate, activation, layout):
    out = w_down.shape[0] if layout == "out_in" else w_down.shape[1]
    return x.new_empty((*x.shape[:-1], out))


def supports(x, w_up, b_up, w_down, b_down, w_gate, b_gate, activation, layout) -> bool:
    from .triton import supports as has_kernel

    return layout in ("out_in", "in_out") and has_kernel(activation)


def launch_triton(*args):
    from .triton import ffn_triton

    return ffn_triton(*args)


def tunables(args, device, backend) -> list:
    """The Triton kernels' tiles (one config serves both launches); the PyTorch kernel is BLAS: nothing to tune."""
    if backend != "triton":
        return []
    from .triton import tunable

    return [tunable(*args)]


def cost(x: Shaped, w_up, b_up, w_down, b_down, w_gate, b_gate, activation, layout):
    """2 · tokens · (|W_up| + |W_down| + |W_gate|) FLOPs; x, the weights and the output read/written once."""
    tokens = sympy.Mul(*x.shape[:-1])
    weights = [w.numel() for w in (w_up, w_down, w_gate) if w is not None]
    d_out = w_down.shape[0] if layout == "out_in" else w_down.shape[1]
    out = Shaped((*x.shape[:-1], d_out), x.dtype)
    return Cost(2 * tokens * sympy.Add(*weights), io_bytes(x, w_up, b_up, w_down, b_down, w_gate, b_gate, out))


def synthetic(shape, params, dtype, device):
    """ROWS×D_IN inputs; params ``hidden``, ``out``, ``activation``, ``gated``, ``layout``."""
    import torch

    if len(shape) != 2:
        raise AttnforgeError(f"--shapes {'x'.join(map(str, shape))}: ffn takes ROWSxD_IN, e.g. 512x384")
    rows, d = shape
    hidden, out = param(params, "hidden", 4 * d), param(params, "out", d)
    act, gated = param(params, "activation", "gelu"), param(params, "gated", False)
    layout = param(params, "layout", "out_in")
    if act not in ACTIVATIONS:
        raise AttnforgeError(f"--params activation={act}: expected one of {', '.join(ACTIVATIONS)}")
    make = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
    w = (lambda i, o: make(o, i) / math.sqrt(i)) if layout == "out_in" else (lambda i, o: make(i, o) / math.sqrt(i))
    return (make(rows, d), w(d, hidden), make(hidden), w(hidden, out), make(out), w(d, hidden) if gated else None,
            None, act, layout)


VARIANT = register(Variant(
    name="ffn", rewrite="fuse_ffn",
    schema="(Tensor x, Tensor w_up, Tensor? b_up, Tensor w_down, Tensor? b_down, Tensor? w_gate, Tensor? b_gate, "
           "str activation, str layout) -> Tensor",
    reference=reference, cpu=ffn_cpu, fake=_fake, triton=launch_triton, supports=supports, cost=cost,
    synthetic=synthetic, tunables=tunables, onnx=ffn_onnx))
