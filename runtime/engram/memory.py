"""The module holding one Engram insertion's weights (registered as ``<layer>.engram``)."""
from __future__ import annotations

import math

import torch
from torch import nn


class EngramMemory(nn.Module):
    """The weights of one Engram insertion (all trainable, every name containing ``engram`` once registered):

    ``table`` [Σ primes, dim] (N(0, 1), as nn.Embedding), ``key`` W_K [d, H·dim] (nn.Linear's init),
    ``value`` W_V [d, H·dim] (zero: the inserted model equals the original until trained), ``key_norm`` and
    ``hidden_norm`` (RMSNorm gains, one). The hash constants are plain attributes.
    ``offload="cpu"``: ``model.to(...)`` changes the table's dtype but leaves it in host memory.
    """

    def __init__(self, d_model: int, dim: int, ngram: list[int], heads: int, primes: list[int],
                 multipliers: list[int], pad_id: int, seed: int, offload: str = "none"):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        width = len(ngram) * heads * dim
        self.table = nn.Parameter(torch.randn(sum(primes), dim, generator=gen))
        bound = 1 / math.sqrt(width)
        self.key = nn.Parameter(torch.rand(d_model, width, generator=gen) * 2 * bound - bound)
        self.value = nn.Parameter(torch.zeros(d_model, width))
        self.key_norm = nn.Parameter(torch.ones(d_model))
        self.hidden_norm = nn.Parameter(torch.ones(d_model))
        self.ngram, self.heads, self.primes, self.multipliers, self.pad_id = ngram, heads, primes, multipliers, pad_id
        self.offload = offload

    def _apply(self, fn, recurse=True):
        if self.offload != "cpu":
            return super()._apply(fn, recurse)
        table = self._parameters["table"]
        self._parameters["table"] = None  # nn.Module._apply skips None entries
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["table"] = table
        dtype = fn(torch.empty(0, dtype=table.dtype)).dtype  # what the conversion does to a dtype, without moving
        if dtype != table.dtype:
            table.data = table.data.to(dtype)
        return self

    def extra_repr(self) -> str:
        return (f"ngram={self.ngram}, heads={self.heads}, dim={self.table.shape[1]}, rows={self.table.shape[0]}, "
                f"offload={self.offload!r}")
