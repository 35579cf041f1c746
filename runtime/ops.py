"""The custom ops that rewritten graphs call (namespace ``attnforge``).

Each op has a CPU kernel (vectorised PyTorch, no Python loop over tokens) and a fake
implementation so graphs that contain it still trace and export.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from attnforge.codegen.autotune import register_tuner

from .activations import ACTIVATIONS
from .dispatch import wants_triton


# --------------------------------------------------------------------------- exact attention


@torch.library.custom_op("attnforge::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, causal: bool,
              dropout_p: float) -> Tensor:
    """softmax(scale · q kᵀ + mask) v over the last two dims (Vaswani et al., 2017).

    q: [..., H, N, D]; k, v: [..., Hkv, M, D] with H a multiple of Hkv (grouped-query attention,
    Ainslie et al., 2023): query head h reads key/value head h // (H / Hkv). ``mask`` is additive
    (float) or a boolean keep-mask, broadcastable to [..., H, N, M]. ``causal`` hides key j > i.
    Triton (codegen/attention.py): the generated forward kernel, or the split-KV decode kernel for one query.
    """
    if wants_triton(q) and dropout_p == 0 and v.shape[-1] == q.shape[-1] and q.dim() in (3, 4):
        return attention_triton_op(q, k, v, mask, scale, causal)
    return attention_cpu(q, k, v, mask, scale, causal, dropout_p)


@attention.register_fake
def _(q, k, v, mask, scale, causal, dropout_p):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _attention_setup(ctx, inputs, output):
    q, k, v, mask, scale, causal, dropout_p = inputs
    ctx.save_for_backward(q, k, v, mask)
    ctx.scale, ctx.causal, ctx.dropout_p = scale, causal, dropout_p


def _attention_backward(ctx, grad):
    """Gradients of q, k, v (and a float mask) by differentiating the CPU kernel on the saved inputs.

    Recomputes the forward (as flash attention's backward does); with dropout the recomputed mask would
    differ from the forward's, so training with ``dropout_p > 0`` is refused.
    """
    if ctx.dropout_p > 0:
        raise NotImplementedError("attnforge::attention backward with dropout_p > 0 is not supported")
    saved = ctx.saved_tensors
    wants = [need and t is not None and t.is_floating_point() for t, need in zip(saved, ctx.needs_input_grad)]
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(w) if t is not None else None for t, w in zip(saved, wants)]
        out = attention_cpu(*inputs, ctx.scale, ctx.causal, 0.0)
        grads = iter(torch.autograd.grad(out, [t for t, w in zip(inputs, wants) if w], grad))
    return (*[next(grads) if w else None for w in wants], None, None, None)


attention.register_autograd(_attention_backward, setup_context=_attention_setup)


def _one_query_over_all_keys(q, k, causal) -> bool:
    """Where the split-KV decode kernel computes the op: one query that sees every key (top-left causal with
    one query and several keys sees only key 0, so it stays on the forward kernel)."""
    return q.shape[-2] == 1 and (not causal or k.shape[-2] == 1)


def attention_triton_op(q, k, v, mask, scale, causal):
    from attnforge.codegen.attention import attention_triton, decode_triton

    squeeze = q.dim() == 3
    if squeeze:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    if _one_query_over_all_keys(q, k, causal):
        out = decode_triton(q, k, v, mask, scale)
    else:
        out = attention_triton(q, k, v, mask, scale, causal)
    return out.squeeze(0) if squeeze else out


def attention_cpu(q, k, v, mask, scale, causal, dropout_p):
    if causal and mask is not None:  # SDPA takes one or the other: fold causality into the mask
        n, m = q.shape[-2], k.shape[-2]
        keep = torch.ones(n, m, dtype=torch.bool, device=q.device).tril()
        mask = mask & keep if mask.dtype == torch.bool else mask.masked_fill(~keep, float("-inf"))
        causal = False
    squeeze = q.dim() == 3
    if squeeze:  # [B*H, N, D] spellings (bmm-based attention)
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        if mask is not None and mask.dim() == 3:
            mask = mask.unsqueeze(0)
    heads, kv_heads = q.shape[-3], k.shape[-3]
    if heads == kv_heads:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                             is_causal=causal, scale=scale)
    else:
        out = _grouped(q, k, v, mask, scale, causal, dropout_p, heads // kv_heads)
    return out.squeeze(0) if squeeze else out


def _grouped(q, k, v, mask, scale, causal, dropout_p, groups):
    """GQA without repeating k/v: one SDPA call per position inside a group of query heads."""
    kv_heads = k.shape[-3]
    qg = q.unflatten(-3, (kv_heads, groups))  # [..., Hkv, G, N, D]
    per_head_mask = mask is not None and mask.dim() >= 3 and mask.shape[-3] == q.shape[-3] and q.shape[-3] > 1
    if per_head_mask:
        mask = mask.unflatten(-3, (kv_heads, groups))
    outs = []
    for j in range(groups):
        m = mask[..., j, :, :] if per_head_mask else mask
        outs.append(F.scaled_dot_product_attention(qg[..., j, :, :], k, v, attn_mask=m, dropout_p=dropout_p,
                                                   is_causal=causal, scale=scale))
    return torch.stack(outs, dim=-3).flatten(-4, -3)


# --------------------------------------------------------------------------- exact FFN


@torch.library.custom_op("attnforge::ffn", mutates_args=())
def ffn(x: Tensor, w_up: Tensor, b_up: Optional[Tensor], w_down: Tensor, b_down: Optional[Tensor],
        w_gate: Optional[Tensor], b_gate: Optional[Tensor], activation: str, layout: str) -> Tensor:
    """down(act(up(x))), or down(act(gate(x)) ⊙ up(x)) when a gate is given (GLU variants, Shazeer 2020).

    ``layout`` "out_in": W is [out, in] (nn.Linear, y = x Wᵀ + b); "in_out": W is [in, out]
    (GPT-2 Conv1D, y = x W + b). Triton (codegen/ffn.py): the up/gate matmul with act(g)·u in its epilogue.
    """
    if wants_triton(x):
        from attnforge.codegen.ffn import ffn_triton, supports

        if supports(activation):
            return ffn_triton(x, w_up, b_up, w_down, b_down, w_gate, b_gate, activation, layout)
    return ffn_cpu(x, w_up, b_up, w_down, b_down, w_gate, b_gate, activation, layout)


@ffn.register_fake
def _(x, w_up, b_up, w_down, b_down, w_gate, b_gate, activation, layout):
    out = w_down.shape[0] if layout == "out_in" else w_down.shape[1]
    return x.new_empty((*x.shape[:-1], out))


def _project(x, w, b, layout):
    if layout == "out_in":
        return F.linear(x, w, b)
    flat = x.reshape(-1, x.shape[-1])
    y = torch.addmm(b, flat, w) if b is not None else flat @ w
    return y.view(*x.shape[:-1], w.shape[1])


def ffn_cpu(x, w_up, b_up, w_down, b_down, w_gate, b_gate, activation, layout):
    act = ACTIVATIONS[activation]
    if w_gate is not None:
        h = act(_project(x, w_gate, b_gate, layout)) * _project(x, w_up, b_up, layout)
    else:
        h = act(_project(x, w_up, b_up, layout))
    return _project(h, w_down, b_down, layout)


# --------------------------------------------------------------------------- autotuning (codegen/autotune.py)


@register_tuner("attention")
def _attention_tunables(args, device, backend):
    """The generated Triton kernel (the CPU kernel is SDPA: nothing to tune)."""
    q, k, v, mask, scale, causal, dropout_p = args
    if backend != "triton" or q.dim() != 4 or v.shape[-1] != q.shape[-1]:
        return []
    from attnforge.codegen.attention import attention_triton, decode_triton, spec_for, tunable

    if _one_query_over_all_keys(q, k, causal):
        spec = spec_for(q, k, scale, mask, decode=True)
        return [tunable(spec, q, k, v, mask, lambda c: decode_triton(q, k, v, mask, scale, config=c))]
    spec = spec_for(q, k, scale, mask, mask="causal" if causal else "none")
    return [tunable(spec, q, k, v, mask, lambda c: attention_triton(q, k, v, mask, scale, causal, config=c))]


@register_tuner("ffn")
def _ffn_tunables(args, device, backend):
    x, w_up, b_up, w_down, b_down, w_gate, b_gate, activation, layout = args
    if backend != "triton":
        return []
    from attnforge.codegen import ffn as kernel

    if not kernel.supports(activation):
        return []
    return [kernel.tunable(*args)]
