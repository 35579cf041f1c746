"""The errors users see: every one subclasses ``AttnforgeError`` (the CLI exits with code 2 on any of them).

This module imports nothing from the package, so every layer may raise these (the one exception to the
layering of DESIGN.md, checked by tests/test_layering.py).
"""
from __future__ import annotations


class AttnforgeError(Exception):
    """Base class of attnforge's own errors."""


class RecipeError(AttnforgeError, ValueError):
    """A recipe is invalid. ``field`` names where (e.g. ``steps[1].params.window``)."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class CaptureError(AttnforgeError):
    """The model could not be captured as a graph; the message says why for each method tried."""


class SpecError(AttnforgeError):
    """A model spec that cannot be loaded; the message names the problem."""


class ExportError(AttnforgeError, RuntimeError):
    """The graph could not be exported to ONNX or run in onnxruntime; the message names the op or the cause."""


class CacheError(AttnforgeError, OSError):
    """The autotuning cache could not be read or written (the message names the file and the cause)."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of ``error``'s message, cut to ``limit`` characters (for messages that quote a cause)."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    return text if len(text) <= limit else text[:limit] + "..."
