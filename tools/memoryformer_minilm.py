"""MemoryFormer on the FFN layers of all-MiniLM-L6-v2 (real weights): embedding similarity and multiply-adds.

``python tools/memoryformer_minilm.py`` converts the 12 FFN projections (up and down of 6 layers) with τ = 4
and 8, from the bucket centroids alone and with the least-squares refinement, calibrating on one set of
generated documents and measuring on another (different seed, never seen by the conversion). It prints a
markdown table: mean and minimum cosine similarity of the mean-pooled sentence embeddings against the
original model, the per-layer relative error of the projections on their calibration tokens and on the
held-out 1/8 of them, and the FFN multiply-adds per token before and after (from the report).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attnforge  # noqa: E402
from minilm_data import documents, mean_pool, minilm  # noqa: E402


def encode(tok, texts, length):
    enc = tok(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return (enc["input_ids"],), {"attention_mask": enc["attention_mask"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--taus", default="4,8")
    p.add_argument("--calib-docs", type=int, default=48, help="calibration documents (128 tokens each)")
    p.add_argument("--eval-docs", type=int, default=64)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=32, help="conjugate-gradient iterations of the refinement")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    model, tok = minilm()
    calib_args, calib_kwargs = encode(tok, documents(a.calib_docs, a.length, seed=1), a.length)
    eval_args, eval_kwargs = encode(tok, documents(a.eval_docs, a.length, seed=2), a.length)
    mask = eval_kwargs["attention_mask"]
    with torch.no_grad():
        ref = mean_pool(model(*eval_args, **eval_kwargs).last_hidden_state, mask)
    rows = ["| τ | tables | calibrated | mean cosine | min cosine | layer rel. error (calib.) | layer rel. error "
            "(held-out) | FFN MACs/token | reduction | table MiB | convert s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for tau in [int(x) for x in a.taus.split(",")]:
        for calibrate in (False, True):
            recipe = {"steps": [{"rewrite": "memoryformer",
                                 "params": {"tau": tau, "calibrate": calibrate, "steps": a.steps}}]}
            t = time.perf_counter()
            opt = attnforge.optimize(model, recipe, calib_args, calib_kwargs)
            seconds = time.perf_counter() - t
            sites = [s for s in opt.report.sites if s.status == "applied"]
            with torch.no_grad():
                got = mean_pool(opt(*eval_args, **eval_kwargs).last_hidden_state, mask)
            cos = torch.nn.functional.cosine_similarity(got, ref)
            key = "rel_error_refined" if calibrate else "rel_error_centroids"
            calib_err = statistics.mean(s.info[key] for s in sites)
            held = ("–" if not calibrate else
                    f"{statistics.mean(s.info['heldout_rel_error'][0] for s in sites):.3f} -> "
                    f"{statistics.mean(s.info['heldout_rel_error'][1] for s in sites):.3f}")
            before = sum(s.info["macs_per_token"][0] for s in sites)
            after = sum(s.info["macs_per_token"][1] for s in sites)
            mib = sum(s.info["weight_bytes"][1] for s in sites) / 2 ** 20
            rows.append(f"| {tau} | {len(sites)} | {'yes' if calibrate else 'centroids only'} | {cos.mean():.4f} | "
                        f"{cos.min():.4f} | {calib_err:.3f} | {held} | {before:,} -> {after:,} | "
                        f"{before / after:.2f}x | {mib:.0f} | {seconds:.0f} |")
            print(rows[-1], file=sys.stderr)
            del opt
    print(f"all-MiniLM-L6-v2, calibration: {a.calib_docs} x {a.length} tokens, evaluation: {a.eval_docs} other "
          f"documents x {a.length} tokens, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
