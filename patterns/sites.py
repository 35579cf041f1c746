"""Site records: what the matchers found (DESIGN.md, "Sites")."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch.fx import Node


@dataclass(frozen=True)
class RopeInfo:
    """Where rotary embeddings are applied: the q/k nodes before rotation and the cos/sin inputs."""

    q_in: Node
    k_in: Node
    cos: Node | None
    sin: Node | None


@dataclass(frozen=True)
class Projection:
    """A dense projection y = x W^T + b (``layout="out_in"``, nn.Linear) or x W + b (``"in_out"``, GPT-2 Conv1D)."""

    fqn: str
    x: Node  # input
    out: Node  # output, same leading dims as x
    weight: Node  # get_attr
    bias: Node | None  # get_attr or None
    layout: str = "out_in"


@dataclass(frozen=True)
class AttentionSite:
    fqn: str
    q: Node
    k: Node
    v: Node
    out: Node
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    causal: bool
    mask: Node | None  # additive float mask or boolean keep-mask, already scaled to the softmax input
    dropout_p: float
    proj: dict = field(default_factory=dict)
    rope: RopeInfo | None = None
    pattern: str = ""  # which spelling matched ("sdpa", "eager")
    core_nodes: tuple = ()  # the nodes the fused op replaces (for reports and diffs)
    mask_parts: tuple = ()  # (node, coefficient, kind) pieces the mask is built from
    mask_is_bool: bool = False
    sdpa_causal: bool = False  # causality comes from an is_causal flag, not from the mask
    softcap: float = 0.0  # scores soft-capped to c·tanh(s / c) before the mask (Gemma 2); 0: none
    folded: frozenset = frozenset()  # mask parts computed with heads folded into the batch, [B·H, N|1, M]


@dataclass(frozen=True)
class FFNSite:
    fqn: str
    x: Node
    out: Node
    up: Projection
    down: Projection
    gate: Projection | None
    activation: str  # relu, gelu, gelu_tanh, silu, ...
    pattern: str = ""
    core_nodes: tuple = ()


@dataclass(frozen=True)
class Miss:
    """A subgraph that looked like a site but was not matched, and why."""

    fqn: str
    kind: str  # "attention" | "ffn"
    reason: str
    node: str = ""
