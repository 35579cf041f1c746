"""The activations a fused FFN runs, by name, each once in PyTorch and once in ONNX ops (the Triton spellings are
in ``triton.py``). Order matters: the FFN matcher identifies an activation by probing, the first match wins."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

ACTIVATIONS: dict[str, Callable] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu2": lambda x: F.relu(x).square(),
    "mish": F.mish,
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
    "softplus": F.softplus,
    "hardswish": F.hardswish,
}


def _gelu(op, x, approximate: str):
    if op.version >= 20:
        return op.Gelu(x, approximate=approximate)
    if approximate == "tanh":
        inner = op.Mul(op.Add(x, op.Mul(op.Mul(op.Mul(x, x), x), 0.044715)), math.sqrt(2 / math.pi))
        return op.Mul(op.Mul(x, 0.5), op.Add(op.Tanh(inner), 1.0))
    return op.Mul(op.Mul(x, 0.5), op.Add(op.Erf(op.Mul(x, 1 / math.sqrt(2))), 1.0))


ONNX_ACTIVATIONS: dict[str, Callable] = {  # the same names, in standard ONNX ops
    "relu": lambda op, x: op.Relu(x),
    "gelu": lambda op, x: _gelu(op, x, "none"),
    "gelu_tanh": lambda op, x: _gelu(op, x, "tanh"),
    "silu": lambda op, x: op.Mul(x, op.Sigmoid(x)),
    "quick_gelu": lambda op, x: op.Mul(x, op.Sigmoid(op.Mul(x, 1.702))),
    "sigmoid": lambda op, x: op.Sigmoid(x),
    "tanh": lambda op, x: op.Tanh(x),
    "relu2": lambda op, x: op.Mul(op.Relu(x), op.Relu(x)),
    "mish": lambda op, x: op.Mish(x),
    "leaky_relu": lambda op, x: op.LeakyRelu(x, alpha=0.01),
    "elu": lambda op, x: op.Elu(x, alpha=1.0),
    "softplus": lambda op, x: op.Softplus(x),
    "hardswish": lambda op, x: op.HardSwish(x),
}
