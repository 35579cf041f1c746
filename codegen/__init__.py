"""Triton kernel generators and the per-device autotuning cache (see DESIGN.md, "Autotuning").

Nothing is generated yet: the foundation runs every op on its CPU kernel. The codegen issue adds
the Triton kernels and ``autotune.py`` here.
"""
