"""sentence-transformers: optimize the transformer inside a ``SentenceTransformer`` and keep ``.encode()``.

``optimize(SentenceTransformer(...), recipe)`` returns a copy of it whose input module runs an ``OptimizedModel``
in place of the Hugging Face model (tokenising, pooling and normalising are unchanged), with the report at
``.report``. Without example inputs, two sentences of different lengths (so the padding mask is exercised) are
tokenised as the example.
"""
from __future__ import annotations

import copy
import inspect

import torch

EXAMPLE = ["attnforge rewrites the attention of this model.",
           "A second, somewhat longer sentence, so that the batch is padded and the mask is used."]


def is_sentence_transformer(model) -> bool:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return False
    return isinstance(model, SentenceTransformer)


def _transformer(st) -> tuple:
    """(the input module, the name of its transformer attribute): ``model`` (sentence-transformers 6) or
    ``auto_model`` (5)."""
    first = st._first_module()
    for name in ("model", "auto_model"):
        if isinstance(first.__dict__.get("_modules", {}).get(name), torch.nn.Module):
            return first, name
    raise TypeError(f"the SentenceTransformer's first module ({type(first).__name__}) holds no transformer")


def optimize_sentence_transformer(st, recipe, example_inputs=(), example_kwargs=None, **options):
    """The SentenceTransformer with its transformer rewritten (module docstring)."""
    from .optimize import optimize

    st = copy.deepcopy(st)
    first, attr = _transformer(st)
    model = getattr(first, attr)
    if not example_inputs and not example_kwargs:
        features = st.preprocess(EXAMPLE) if hasattr(st, "preprocess") else st.tokenize(EXAMPLE)
        accepted = inspect.signature(type(model).forward).parameters
        example_kwargs = {k: v for k, v in features.items() if isinstance(v, torch.Tensor) and k in accepted}
        example_kwargs["return_dict"] = True  # what the input module passes
    opt = optimize(model, recipe, example_inputs, example_kwargs, **options)
    setattr(first, attr, opt)
    st.report = opt.report
    return st
