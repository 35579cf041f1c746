"""Site definitions and matchers for attention and FFN subgraphs."""
from .attention import MASK_FLOOR, match_attention, refine_causal  # noqa: F401
from .ffn import match_ffn  # noqa: F401
from .sites import AttentionSite, FFNSite, Miss, Projection, RopeInfo  # noqa: F401
