"""Embedding cosine similarity of linear-attention rewrites on all-MiniLM-L6-v2 (real weights), before and after
Hedgehog calibration.

``python tools/linear_minilm.py`` prints a markdown table: for each feature map (every attention layer
rewritten), the mean and minimum cosine similarity between mean-pooled embeddings of the rewritten and the
original model on generated sentences; hedgehog rows also after ``attnforge.calibrate`` on other generated
sentences (a disjoint seed), with the time calibration took.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attnforge  # noqa: E402
from minilm_data import documents, mean_pool, minilm, sentences  # noqa: E402

MAPS = ["elu", "relu", "cosine", "taylor", "performer", "hedgehog"]


def _encode(tok, texts, max_length):
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _cosine(model, ref, ids, mask, batch=64):
    with torch.no_grad():
        got = torch.cat([mean_pool(model(ids[i:i + batch], attention_mask=mask[i:i + batch]).last_hidden_state,
                                   mask[i:i + batch]) for i in range(0, len(ids), batch)])
    cos = torch.nn.functional.cosine_similarity(got, ref)
    return float(cos.mean()), float(cos.min())


def rows_for(model, tok, texts, calib_texts, max_length, a) -> list[str]:
    ids, mask = _encode(tok, texts, max_length)
    with torch.no_grad():
        ref = torch.cat([mean_pool(model(ids[i:i + 64], attention_mask=mask[i:i + 64]).last_hidden_state,
                                   mask[i:i + 64]) for i in range(0, len(ids), 64)])
    c_ids, c_mask = _encode(tok, calib_texts, max_length)
    batches = [((c_ids[i:i + a.batch],), {"attention_mask": c_mask[i:i + a.batch]})
               for i in range(0, len(c_ids), a.batch)]
    tokens = int(mask.sum(1).float().mean())
    out = []
    for window in [0] + [int(w) for w in a.windows.split(",") if w]:
        for name in MAPS:
            recipe = {"steps": [{"rewrite": "linear", "params": {"feature_map": name, "window": window}}]}
            opt = attnforge.optimize(model, recipe, (ids[:4],), {"attention_mask": mask[:4]}, verify=False)
            assert opt.report.counts() == {"linear": 6}, opt.report.to_text()
            mean, low = _cosine(opt, ref, ids, mask)
            label = f"{name}" + (f", window {window}" if window else "")
            out.append(f"| {label} | {tokens} | no | {mean:.5f} | {low:.5f} | |")
            if name == "hedgehog":
                t = time.perf_counter()
                attnforge.calibrate(opt, batches, steps=a.steps, lr=a.lr, progress=a.progress)
                took = time.perf_counter() - t
                mean, low = _cosine(opt, ref, ids, mask)
                out.append(f"| {label} | {tokens} | {a.steps} steps, lr {a.lr:g} | {mean:.5f} | {low:.5f} "
                           f"| {took:.0f} s |")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sentences", type=int, default=300, help="evaluation sentences (seed 0; 0: skip)")
    p.add_argument("--calib", type=int, default=256, help="calibration sentences (seed 1)")
    p.add_argument("--docs", type=int, default=0, help="also: this many ~128-token documents (seed 0), "
                                                       "calibrated on as many others (seed 1); 0: skip")
    p.add_argument("--windows", default="4", help="hybrid windows to add (comma separated)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--progress", action="store_true", help="show calibration progress bars")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    model, tok = minilm()
    lines = ["| feature map | tokens (mean) | calibrated | mean cosine | min cosine | calibration time |",
             "|---|---|---|---|---|---|"]
    if a.sentences:
        lines += rows_for(model, tok, sentences(a.sentences, seed=0), sentences(a.calib, seed=1), 64, a)
    if a.docs:
        lines += rows_for(model, tok, documents(a.docs, 128, seed=0), documents(a.docs, 128, seed=1), 128, a)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
