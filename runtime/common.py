"""What several attention variants share: GQA head views, the log-sum-exp merge, dense references, costs and
the synthetic q/k/v of ``attnforge autotune --op``."""
from __future__ import annotations

import math
from typing import Optional

import sympy
import torch
from torch import Tensor

from attnforge.codegen import masks
from attnforge.errors import AttnforgeError

from .registry import Cost, Shaped, io_bytes, param

flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
NEG = float("-inf")


def repeat_heads(k: Tensor, heads: int) -> Tensor:
    """[..., Hkv, M, D] -> [..., heads, M, D]: query head h reads K/V head h // (heads / Hkv)."""
    return k if k.shape[-3] == heads else k.repeat_interleave(heads // k.shape[-3], -3)


def dense_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float,
                    keep: Optional[Tensor] = None, softcap: float = 0.0) -> Tensor:
    """softmax(scale·q kᵀ + mask) v, written plainly: K/V repeated over GQA groups, ``keep`` a boolean [.., N, M]
    rule ANDed with the model's ``mask`` (additive or boolean keep), scores soft-capped to c·tanh(s / c) first
    when ``softcap`` c > 0. Rows that see no key give 0. q [.., H, N, D] (or [B·H, N, D], heads folded into the
    batch)."""
    if q.dim() >= 4:
        k, v = repeat_heads(k, q.shape[-3]), repeat_heads(v, q.shape[-3])
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        s = s + masks.additive(mask, s.dtype)
    if keep is not None:
        s = s.masked_fill(~keep, NEG)
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


def predicate_reference(q, k, v, mask, scale, predicate: masks.Expr) -> Tensor:
    """Dense attention under a mask predicate on (query, key) positions."""
    return dense_attention(q, k, v, mask, scale, masks.dense(predicate, q.shape[-2], k.shape[-2], device=q.device))


def merge(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor):
    """Combine two softmax-attention partials over disjoint key sets (log-sum-exp merge)."""
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse).nan_to_num(0.0).unsqueeze(-1)
    w2 = torch.exp(lse2 - lse).nan_to_num(0.0).unsqueeze(-1)
    return o1 * w1 + o2 * w2, lse


def broadcast_mask(mask: Optional[Tensor], dtype, n: int, m: Optional[int] = None) -> Optional[Tensor]:
    """The model's mask as an additive float mask (masks.additive) broadcast to [B|1, H|1, N, M]."""
    if mask is None:
        return None
    mask = masks.additive(mask, dtype)
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask.expand(*mask.shape[:2], n, n if m is None else m)


def same_as_q(q, k, v, *rest):
    """The fake of attention-like ops: q's shape with v's head dim."""
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def attention_cost(q: Shaped, k: Shaped, v: Shaped, mask, pairs) -> Cost:
    """FLOPs 2·B·H·pairs·(D + Dv) (q·kᵀ and p·v over the visible pairs) and bytes of q, k, v, the mask and out."""
    b = sympy.Mul(*q.shape[:-3]) if q.dim() >= 4 else q.shape[0]
    h = q.shape[-3] if q.dim() >= 4 else 1
    d, dv = q.shape[-1], v.shape[-1]
    out = Shaped((*q.shape[:-1], dv), q.dtype)
    return Cost(2 * b * h * pairs * (d + dv), io_bytes(q, k, v, mask if isinstance(mask, Shaped) else None, out))


def causal_pairs(n, m):
    """Visible pairs of top-left causal attention (query i sees keys j ≤ i): Σ_i min(i + 1, M)."""
    n, m = sympy.sympify(n), sympy.sympify(m)
    if sympy.simplify(n - m) == 0:
        return n * (n + 1) / 2
    return sympy.Piecewise((n * (n + 1) / 2, sympy.Le(n, m)), (m * (m + 1) / 2 + (n - m) * m, True))


def qkv_inputs(op: str, shape: tuple, params: dict, dtype, device):
    """Random q [B, H, N, D], k and v [B, kv_heads, N, D] and the softmax scale, for ``autotune --op``."""
    if len(shape) != 4:
        raise AttnforgeError(f"--shapes {'x'.join(map(str, shape))}: {op} takes q's shape BxHxNxD, e.g. 1x8x4096x64")
    b, h, n, d = shape
    kv = param(params, "kv_heads", h)
    if kv < 1 or h % kv:
        raise AttnforgeError(f"--params kv_heads={kv}: must divide the {h} query heads")
    make = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
    return make(b, h, n, d), make(b, kv, n, d), make(b, kv, n, d), param(params, "scale", 1 / math.sqrt(d))
