"""``gqa`` on all-MiniLM-L6-v2's real weights: sentence-embedding cosine vs the original, run by hand.

    python tools/gqa_minilm.py            (also ``python -m attnforge.tools.gqa_minilm``)

The rewrite is calibrated on 16 generated sentences (the example inputs ``norm`` and ``cluster`` read)
and measured on 48 others: cosine similarity of the mean-pooled embeddings (the model's sentence
embedding) of the rewritten model against the original, for kv_heads 6/3/2/1 (12 heads) and each
pooling. Prints a Markdown table; no weights are trained.
"""
from __future__ import annotations

import argparse

import torch

import attnforge
from attnforge.tools.minilm_data import mean_pool, minilm, sentences


def embed(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    return mean_pool(out["last_hidden_state"], batch["attention_mask"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kv-heads", type=int, nargs="+", default=[6, 3, 2, 1])
    ap.add_argument("--pooling", nargs="+", default=["mean", "norm", "cluster"])
    ap.add_argument("--calibrate", type=int, default=16, help="sentences the rewrite sees (example inputs)")
    ap.add_argument("--evaluate", type=int, default=48, help="other sentences the cosine is measured on")
    args = ap.parse_args(argv)

    model, tok = minilm()
    calib = tok(sentences(args.calibrate, seed=0), padding=True, return_tensors="pt")
    test = tok(sentences(args.evaluate, seed=1), padding=True, return_tensors="pt")
    ref = embed(model, test)
    print(f"all-MiniLM-L6-v2 ({model.config.num_attention_heads} heads, {model.config.num_hidden_layers} layers): "
          f"cosine of mean-pooled embeddings vs the original on {args.evaluate} held-out sentences, "
          f"mean (min); calibrated on {args.calibrate}\n")
    print("| kv_heads | KV cache / token / layer | params removed | " + " | ".join(args.pooling) + " |")
    print("| --- | --- | --- |" + " --- |" * len(args.pooling))
    for kv in args.kv_heads:
        cells, info = [], {}
        for pooling in args.pooling:
            recipe = {"steps": [{"rewrite": "gqa", "params": {"kv_heads": kv, "pooling": pooling}}]}
            opt = attnforge.optimize(model, recipe, (calib["input_ids"],),
                                     {"attention_mask": calib["attention_mask"]}, verify=False)
            applied = [s for s in opt.report.sites if s.status == "applied"]
            assert len(applied) == model.config.num_hidden_layers, opt.report.to_text()
            info = applied[0].info
            cos = torch.nn.functional.cosine_similarity(embed(opt, test), ref)
            cells.append(f"{float(cos.mean()):.4f} ({float(cos.min()):.4f})")
        before, after = info["kv_cache_bytes_per_token"]
        removed = sum(s.info["params_removed"] for s in applied)
        print(f"| {kv} | {before} → {after} B | {removed:,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
