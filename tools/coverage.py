"""Coverage of the ``exact`` recipe over Hugging Face families, eager and sdpa: what fused, the output error, gqa.

    python tools/coverage.py [FAMILY ...] [--impl eager sdpa]   (also ``python -m attnforge.tools.coverage``)

Every model is the family's base model from a tiny config (random weights, 2 layers, hidden 32, 4 heads, FFN 64,
vocab 100; the family's defaults otherwise) called as users call it: ``input_ids`` (batch 1, 8 tokens), with
``attention_mask`` for encoders and encoder-decoders, ``decoder_input_ids`` for encoder-decoders, log-mel
``input_features`` for Whisper. For each (family, attn_implementation) row ``measure`` runs
``attnforge.optimize(model, "exact", example)`` and records the attention and FFN sites applied against the blocks
the model has (cross-attention included), the relative max error of the first output on the example and on a
second shape (batch 2, 11 tokens, a padded row where a mask is passed: the optimized model called directly), and,
where the model has more than one KV head, whether ``gqa`` with kv_heads = heads / 2 is applied at every attention
site. Prints the Markdown table of docs/rewrites/coverage.md; tests/test_coverage_families.py asserts the same rows.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

VOCAB, HIDDEN, HEADS, LAYERS, FFN = 100, 32, 4, 2, 64
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


@dataclass(frozen=True)
class Family:
    name: str
    model: str  # transformers class
    config: str  # its config class
    kwargs: dict  # tiny-config arguments
    kind: str = "decoder"  # decoder | encoder | seq2seq | speech
    impls: tuple = ("eager", "sdpa")  # the attn_implementations transformers allows for it
    kv_heads: int = HEADS  # KV heads of the tiny model (after the config)
    ffn_per_layer: int = 1  # FFN blocks per (decoder) layer: 2 for a mixture of experts with a shared expert

    def build(self, impl: str, seed: int = 0) -> torch.nn.Module:
        import transformers as tf

        torch.manual_seed(seed)
        cfg = getattr(tf, self.config)(**{**IDS, **self.kwargs}, attn_implementation=impl)
        return getattr(tf, self.model)(cfg).eval()

    @property
    def attention_blocks(self) -> int:
        """Attention blocks: self-attention per layer, and cross-attention per decoder layer."""
        return 3 * LAYERS if self.kind in ("seq2seq", "speech") else LAYERS

    @property
    def ffn_blocks(self) -> int:
        return 2 * LAYERS if self.kind in ("seq2seq", "speech") else self.ffn_per_layer * LAYERS


def _llama_like(**extra) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, **{"num_key_value_heads": HEADS, **extra})


def _bert_like(**extra) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, max_position_embeddings=64, **extra)


def _bart_like(**extra) -> dict:
    return dict(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
                decoder_ffn_dim=FFN, **{"decoder_start_token_id": 2, **extra})


# families whose default config groups K/V heads get 2 KV heads (of 4); the others keep one per query head
FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama", "LlamaModel", "LlamaConfig", _llama_like()),
    Family("mistral", "MistralModel", "MistralConfig", _llama_like(num_key_value_heads=2), kv_heads=2),
    Family("qwen2", "Qwen2Model", "Qwen2Config", _llama_like()),
    Family("qwen3", "Qwen3Model", "Qwen3Config", _llama_like(num_key_value_heads=2, head_dim=8), kv_heads=2),
    Family("gemma", "GemmaModel", "GemmaConfig", _llama_like(head_dim=8)),
    Family("gemma2", "Gemma2Model", "Gemma2Config", _llama_like(num_key_value_heads=2, head_dim=8), kv_heads=2,
           impls=("eager",)),
    Family("phi", "PhiModel", "PhiConfig", _llama_like()),
    Family("phi3", "Phi3Model", "Phi3Config", _llama_like(pad_token_id=0)),
    Family("gpt2", "GPT2Model", "GPT2Config", dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                                   n_inner=FFN, n_positions=64)),
    Family("gptj", "GPTJModel", "GPTJConfig", dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                                   n_inner=FFN, n_positions=64, rotary_dim=4)),
    Family("gpt_neox", "GPTNeoXModel", "GPTNeoXConfig", _llama_like()),
    Family("falcon", "FalconModel", "FalconConfig", dict(vocab_size=VOCAB, hidden_size=HIDDEN,
                                                         num_hidden_layers=LAYERS, num_attention_heads=HEADS),
           kv_heads=1),
    Family("bloom", "BloomModel", "BloomConfig", dict(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS,
                                                      n_head=HEADS), impls=("eager",)),
    Family("opt", "OPTModel", "OPTConfig", dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                                num_attention_heads=HEADS, ffn_dim=FFN, word_embed_proj_dim=HIDDEN,
                                                max_position_embeddings=64)),
    Family("stablelm", "StableLmModel", "StableLmConfig", _llama_like()),
    Family("olmo2", "Olmo2Model", "Olmo2Config", _llama_like()),
    Family("mixtral", "MixtralModel", "MixtralConfig", _llama_like(num_key_value_heads=2, num_local_experts=4),
           kv_heads=2),
    Family("qwen2_moe", "Qwen2MoeModel", "Qwen2MoeConfig",
           _llama_like(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=64), kv_heads=2, ffn_per_layer=2),
    Family("gemma3", "Gemma3TextModel", "Gemma3TextConfig", _llama_like(num_key_value_heads=2, head_dim=8,
                                                                        sliding_window=4), kv_heads=2),
    Family("starcoder2", "Starcoder2Model", "Starcoder2Config", _llama_like(num_key_value_heads=2), kv_heads=2),
    Family("gpt_neo", "GPTNeoModel", "GPTNeoConfig", dict(vocab_size=VOCAB, hidden_size=HIDDEN,
                                                          num_layers=LAYERS, num_heads=HEADS,
                                                          attention_types=[[["global", "local"], 1]],
                                                          max_position_embeddings=64), impls=("eager",)),
    Family("bert", "BertModel", "BertConfig", _bert_like(), kind="encoder"),
    Family("roberta", "RobertaModel", "RobertaConfig", _bert_like(pad_token_id=1), kind="encoder"),
    Family("modernbert", "ModernBertModel", "ModernBertConfig", _bert_like(cls_token_id=1, sep_token_id=2),
           kind="encoder"),
    Family("distilbert", "DistilBertModel", "DistilBertConfig", dict(vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS,
                                                                      n_heads=HEADS, hidden_dim=FFN,
                                                                      max_position_embeddings=64), kind="encoder"),
    Family("albert", "AlbertModel", "AlbertConfig", _bert_like(embedding_size=16), kind="encoder"),
    # as DeBERTa-v3 checkpoints set it: relative positions in the scores (c2p and p2c terms), not in the input
    Family("deberta_v2", "DebertaV2Model", "DebertaV2Config",
           _bert_like(relative_attention=True, pos_att_type=["p2c", "c2p"], position_biased_input=False,
                      position_buckets=16, norm_rel_ebd="layer_norm", share_att_key=True), kind="encoder",
           impls=("eager",)),
    Family("t5", "T5Model", "T5Config", dict(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=FFN, num_layers=LAYERS,
                                            num_heads=HEADS, decoder_start_token_id=0), kind="seq2seq"),
    Family("bart", "BartModel", "BartConfig", _bart_like(max_position_embeddings=64), kind="seq2seq"),
    Family("whisper", "WhisperModel", "WhisperConfig", _bart_like(num_mel_bins=8, max_source_positions=16,
                                                                  max_target_positions=32,
                                                                  decoder_start_token_id=1), kind="speech"),
]}


def inputs(family: Family, batch: int = 1, length: int = 8, seed: int = 0) -> tuple[tuple, dict]:
    """(args, kwargs) of a call of ``family``'s model: batch ``batch``, ``length`` tokens; past batch 1 the last row
    is padded (4 tokens) where a mask is passed."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[-1, 4:] = 0
    if family.kind == "decoder":
        return (ids,), {}
    if family.kind == "encoder":
        return (ids,), {"attention_mask": mask}
    dec = torch.randint(3, VOCAB, (batch, max(2, length // 2)), generator=g)
    if family.kind == "seq2seq":
        return (ids,), {"attention_mask": mask, "decoder_input_ids": dec}
    frames = 2 * family.kwargs["max_source_positions"]  # Whisper's encoder takes exactly this many
    feats = torch.randn(batch, family.kwargs["num_mel_bins"], frames, generator=g)
    return (feats,), {"decoder_input_ids": dec}


def rel_err(got, ref) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def _first(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out.to_tuple()[0] if hasattr(out, "to_tuple") else out


@dataclass
class Row:
    family: str
    impl: str
    attention: tuple  # (applied, expected)
    ffn: tuple
    errors: tuple  # rel. max error of the first output: example, second shape
    gqa: tuple | None  # (applied, attention sites) where the model has more than one KV head, else None
    misses: list = field(default_factory=list)  # (kind, fqn, reason), deduplicated over layers
    gqa_skips: list = field(default_factory=list)  # reasons gqa gave for sites it did not apply
    seconds: float = 0.0
    report: object = None

    @property
    def fused(self) -> bool:
        return self.attention[0] == self.attention[1] and self.ffn[0] == self.ffn[1]


def _layerless(text: str) -> str:
    """``text`` with layer indices written ``*`` (``layers.3.mlp`` -> ``layers.*.mlp``): one line per construct."""
    import re

    return re.sub(r"(?<=[A-Za-z_])\.\d+(?=\.|\b)", ".*", text)


def _dedup(items) -> list:
    out = []
    for x in items:
        if x not in out:
            out.append(x)
    return out


def measure(name: str, impl: str, *, gqa: bool = True) -> Row:
    import attnforge

    family = FAMILIES[name]
    t0 = time.perf_counter()
    model = family.build(impl)
    args, kwargs = inputs(family)
    # verify=False: the per-site checks (and rollbacks) run while rewriting either way; the output check is the
    # one below, on the example and on a second shape
    opt = attnforge.optimize(model, "exact", args, kwargs, verify=False)
    rep = opt.report
    applied = rep.counts()
    errors = []
    for a, kw in ((args, kwargs), inputs(family, batch=2, length=11, seed=1)):
        with torch.no_grad():
            errors.append(rel_err(_first(opt(*a, **kw)), _first(model(*a, **kw))))
    misses = _dedup((m.kind, _layerless(m.fqn), _layerless(m.reason)) for m in rep.misses)
    gqa_row, skips = None, []
    if gqa and family.kv_heads > 1:
        recipe = {"name": "gqa-half", "steps": [{"rewrite": "gqa", "params": {"kv_heads": HEADS // 2}}]}
        # static shapes, no output check: only whether each site takes the rewrite is read here
        g = attnforge.optimize(model, recipe, args, kwargs, verify=False, dynamic=False)
        sites = [s for s in g.report.sites if s.rewrite == "gqa"]
        gqa_row = (sum(s.status == "applied" for s in sites), family.attention_blocks)
        skips = _dedup(_layerless(s.reason) for s in sites if s.status != "applied")
    return Row(name, impl, (applied.get("fuse_attention", 0), family.attention_blocks),
               (applied.get("fuse_ffn", 0), family.ffn_blocks), tuple(errors), gqa_row, misses, skips,
               time.perf_counter() - t0, rep)


def rows(names=None, impls=("eager", "sdpa"), progress: Callable[[str], None] | None = None, **kw) -> list[Row]:
    out = []
    for name in names or FAMILIES:
        for impl in FAMILIES[name].impls:
            if impl in impls:
                try:
                    out.append(measure(name, impl, **kw))
                except Exception as e:  # noqa: BLE001  (a row that cannot be measured says why)
                    out.append(Row(name, impl, (0, FAMILIES[name].attention_blocks), (0, FAMILIES[name].ffn_blocks),
                                   (float("nan"), float("nan")), None, [("error", "", f"{type(e).__name__}: {e}")]))
                if progress:
                    progress(f"{name} {impl}: {out[-1].seconds:.1f}s")
    return out


def markdown(table: list[Row]) -> str:
    lines = ["| family | attn | attention fused | FFN fused | rel. error (1×8) | rel. error (2×11) | "
             "gqa applied | misses |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in table:
        if r.gqa is not None:
            gqa = f"{r.gqa[0]}/{r.gqa[1]}"
        else:
            gqa = "n/a (1 KV head)" if FAMILIES[r.family].kv_heads == 1 else "not run"
        notes = [f"{k}: {reason} (`{fqn}`)" for k, fqn, reason in r.misses]
        notes += [f"gqa skipped: {reason}" for reason in r.gqa_skips]
        lines.append(f"| {r.family} | {r.impl} | {r.attention[0]}/{r.attention[1]} | {r.ffn[0]}/{r.ffn[1]} | "
                     f"{r.errors[0]:.1e} | {r.errors[1]:.1e} | {gqa} | {'<br>'.join(notes) or '—'} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("families", nargs="*", help=f"default: all ({', '.join(FAMILIES)})")
    ap.add_argument("--impl", nargs="+", default=["eager", "sdpa"])
    ap.add_argument("--no-gqa", action="store_true")
    a = ap.parse_args(argv)
    import sys
    import warnings

    warnings.filterwarnings("ignore")
    table = rows(a.families or None, tuple(a.impl), progress=lambda s: print(s, file=sys.stderr), gqa=not a.no_gqa)
    print(markdown(table))


if __name__ == "__main__":
    main()
