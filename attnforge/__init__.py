"""attnforge: a compiler for attention in PyTorch models.

``attnforge.optimize(model, recipe, example_inputs)`` captures the model, finds its attention and
FFN subgraphs, rewrites them as the recipe says, verifies the result and returns an ``nn.Module``.
"""
from .calibrate import calibrate  # noqa: F401
from .capture import capture  # noqa: F401
from .errors import AttnforgeError, CacheError, CaptureError, ExportError, RecipeError, SpecError  # noqa: F401
from .model import OptimizedModel, load, save  # noqa: F401
from .optimize import optimize  # noqa: F401
from attnforge.passes.engram import freeze_except_engram  # noqa: F401
from .recipe import BUILTIN as BUILTIN_RECIPES  # noqa: F401
from .recipe import Recipe, load_recipe, recipe_schema  # noqa: F401
from .report import Report  # noqa: F401

__version__ = "0.1.0"
__all__ = ["optimize", "OptimizedModel", "save", "load", "Recipe", "Report", "AttnforgeError", "RecipeError",
           "CaptureError", "SpecError", "ExportError", "CacheError", "load_recipe", "recipe_schema", "capture",
           "calibrate", "freeze_except_engram"]
