"""Embedding cosine similarity of sparse-attention rewrites on all-MiniLM-L6-v2 (real weights).

``python tools/sparse_minilm.py`` prints a markdown table: for each recipe and sequence length, the
mean and minimum cosine similarity between mean-pooled embeddings of the rewritten and the original model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attnforge  # noqa: E402
from minilm_data import documents, mean_pool, minilm  # noqa: E402

INNER = {"skip_first": 1, "skip_last": 1}
RECIPES = {
    "long-context (w 512, 4 sinks, inner layers)": "long-context",
    "sliding w 64, 4 sinks, inner layers": {"steps": [{"rewrite": "sliding_window", "params": {"window": 64, "sinks": 4},
                                                       **INNER}]},
    "sliding w 32, 4 sinks, inner layers": {"steps": [{"rewrite": "sliding_window", "params": {"window": 32, "sinks": 4},
                                                       **INNER}]},
    "sliding w 32, 4 sinks, all layers": {"steps": [{"rewrite": "sliding_window", "params": {"window": 32, "sinks": 4}}]},
    "sliding w 32, no sinks, all layers": {"steps": [{"rewrite": "sliding_window", "params": {"window": 32}}]},
    "block_sparse 32, top-2, all layers": {"steps": [{"rewrite": "block_sparse", "params": {"block": 32, "topk": 2}}]},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="128,256")
    p.add_argument("--docs", type=int, default=32)
    a = p.parse_args(argv)
    model, tok = minilm()
    rows = ["| recipe | tokens | mean cosine | min cosine |", "|---|---|---|---|"]
    for length in [int(x) for x in a.lengths.split(",")]:
        enc = tok(documents(a.docs, length, seed=length), padding="max_length", truncation=True, max_length=length,
                  return_tensors="pt")
        args, kwargs = (enc["input_ids"],), {"attention_mask": enc["attention_mask"]}
        with torch.no_grad():
            ref = mean_pool(model(*args, **kwargs).last_hidden_state, enc["attention_mask"])
        for name, recipe in RECIPES.items():
            opt = attnforge.optimize(model, recipe, (args[0][:2],), {"attention_mask": kwargs["attention_mask"][:2]})
            with torch.no_grad():
                got = mean_pool(opt(*args, **kwargs).last_hidden_state, enc["attention_mask"])
            cos = torch.nn.functional.cosine_similarity(got, ref)
            rows.append(f"| {name} | {length} | {cos.mean():.5f} | {cos.min():.5f} |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
