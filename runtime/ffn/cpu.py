"""The PyTorch kernel of ``attnforge::ffn``: the projections as F.linear / addmm, the activation between."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .activations import ACTIVATIONS


def project(x, w, b, layout):
    """x Wᵀ + b for "out_in" (nn.Linear) weights, x W + b for "in_out" (GPT-2 Conv1D)."""
    if layout == "out_in":
        return F.linear(x, w, b)
    flat = x.reshape(-1, x.shape[-1])
    y = torch.addmm(b, flat, w) if b is not None else flat @ w
    return y.view(*x.shape[:-1], w.shape[1])


def ffn_cpu(x, w_up, b_up, w_down, b_down, w_gate, b_gate, activation, layout):
    act = ACTIVATIONS[activation]
    if w_gate is not None:
        h = act(project(x, w_gate, b_gate, layout)) * project(x, w_up, b_up, layout)
    else:
        h = act(project(x, w_up, b_up, layout))
    return project(h, w_down, b_down, layout)
