"""Engram's hashed N-gram addressing: per-layer odd multipliers, prime moduli, and the table rows of each N-gram.

For token ids x_t and each N-gram order n, the last n ids are mixed with odd int64 multipliers m_k drawn per layer,

    mix_n(t) = (x_t·m_0) XOR (x_{t−1}·m_1) XOR … XOR (x_{t−n+1}·m_{n−1}),   x_{t−k} = pad for t − k < 0,

and hash head j of order n reads table row mix_n(t) mod p_{n,j} + offset_{n,j}, the p_{n,j} being distinct
primes ≥ the table size and the offsets their running sum (one table, one segment per head). The multipliers are
below (2^63 − 1)/vocab, so no product overflows and every kernel computes the same integers as plain Python.
"""
from __future__ import annotations

from typing import List

import numpy as np
import sympy
import torch
import torch.nn.functional as F
from torch import Tensor

LAYER_SEED_STRIDE = 10007  # the Engram demo's per-layer seed step (seed + 10007·layer)


def engram_multipliers(vocab: int, max_n: int, seed: int, layer: int) -> list[int]:
    """Odd multipliers m_0..m_{max_n−1} for ``layer``, each < (2^63 − 1) // vocab so x·m cannot overflow."""
    half_bound = max(1, (2 ** 63 - 1) // vocab // 2)
    rng = np.random.default_rng(seed + LAYER_SEED_STRIDE * layer)
    return [int(r) * 2 + 1 for r in rng.integers(0, half_bound, size=max_n, dtype=np.int64)]


def engram_primes(table_size: int, count: int, skip: int = 0) -> list[int]:
    """The primes ≥ ``table_size`` numbered skip .. skip + count − 1 (so layers that skip different ranges
    never share a modulus)."""
    out, p = [], table_size - 1
    for i in range(skip + count):
        p = int(sympy.nextprime(p))
        if i >= skip:
            out.append(p)
    return out


def offsets(primes: List[int]) -> list[int]:
    return [0] + np.cumsum(primes[:-1], dtype=np.int64).tolist()


def engram_rows(ids: Tensor, multipliers: List[int], ngram: List[int], heads: int, primes: List[int],
                pad_id: int) -> Tensor:
    """Table rows [..., N, H] (H = len(ngram)·heads, per-head offsets added) of the hashed N-grams of ``ids``."""
    x = ids.long()
    n_ctx = x.shape[-1]
    shifted = [x] + [F.pad(x, (k, 0), value=pad_id)[..., :n_ctx] for k in range(1, max(ngram))]
    starts = offsets(primes)
    out = []
    for i, n in enumerate(ngram):
        mix = shifted[0] * multipliers[0]
        for k in range(1, n):
            mix = mix ^ (shifted[k] * multipliers[k])
        heads_of_n = slice(i * heads, (i + 1) * heads)
        p = torch.tensor(primes[heads_of_n], device=x.device)
        out.append(mix[..., None] % p + torch.tensor(starts[heads_of_n], device=x.device))
    return torch.cat(out, -1)
