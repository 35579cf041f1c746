"""The plain definition of ``attnforge::ffn``."""
from __future__ import annotations

from .activations import ACTIVATIONS


def ffn(x, w_up, b_up, w_down, b_down, w_gate, b_gate, activation: str, layout: str):
    """down(act(up(x))), or down(act(gate(x)) ⊙ up(x)) when a gate is given (GLU variants, Shazeer 2020).

    ``layout`` "out_in": W is [out, in] (nn.Linear, y = x Wᵀ + b); "in_out": W is [in, out] (GPT-2 Conv1D, y = x W + b).
    """
    def linear(h, w, b):
        y = h @ (w.T if layout == "out_in" else w)
        return y if b is None else y + b

    act = ACTIVATIONS[activation]
    up = linear(x, w_up, b_up)
    h = act(up) if w_gate is None else act(linear(x, w_gate, b_gate)) * up
    return linear(h, w_down, b_down)
