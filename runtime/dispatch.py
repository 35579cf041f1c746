"""Which kernel an op runs: ``backend = "auto" | "torch" | "triton"`` (DESIGN.md, "Runtime ops").

``auto``: the Triton kernel for CUDA tensors, the PyTorch kernel otherwise. ``triton`` forces the Triton kernels
(on CPU tensors too, which works under ``TRITON_INTERPRET=1``: how every kernel is tested without a GPU);
``torch`` forces the PyTorch kernels, on any device. Where a Triton kernel does not cover a case (dropout,
the linear hybrid, ...) the op runs its PyTorch kernel whatever the backend. The choice is a context
(``use_backend``) so that one process can hold models built for different backends.
"""
from __future__ import annotations

import contextlib
import contextvars
import os

from torch import Tensor

BACKENDS = ("auto", "torch", "triton")
_backend = contextvars.ContextVar("attnforge_backend", default="auto")


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {name!r}")
    if name == "triton":
        import torch

        try:
            import triton  # noqa: F401
        except ImportError:
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)") from None
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("backend='triton' needs a CUDA GPU, or TRITON_INTERPRET=1 to run the Triton kernels "
                               "on CPU tensors (slow: for testing)")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block on ``name``'s kernels."""
    token = _backend.set(check_backend(name))
    try:
        yield
    finally:
        _backend.reset(token)


def current_backend() -> str:
    return _backend.get()


def wants_triton(x: Tensor) -> bool:
    """Whether an op called on ``x`` runs its Triton kernel."""
    backend = _backend.get()
    return backend == "triton" or (backend == "auto" and x.is_cuda)
