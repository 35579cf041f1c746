"""Triton kernels and the per-device autotuning cache (DESIGN.md, "Autotuning"; docs/codegen.md).

attention.py generates a flash-attention source per ``AttentionSpec``; ffn.py, linear_attention.py,
memoryformer.py and engram.py hold the other ops' kernels; autotune.py owns the config cache.
"""
