"""Errors users see."""
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
