"""Generation over attnforge's own KV cache (attnforge/generate.py, passes/decode.py, runtime/cache.py). References:
Hugging Face's ``generate`` on the same model (exact recipe: the same tokens, the same logits), and for every
rewrite the rewritten model's own full-sequence logits (the decode contract: greedy tokens are the argmax of
``opt(prompt + generated)`` at each step). Default configs (use_cache=True), batch-1 and left-padded batches."""
from __future__ import annotations

import warnings

import pytest
import torch

import attnforge
from attnforge.generate import GenerationError, positions

VOCAB = 100


def _lm(family: str, layers: int = 2, **kw):
    import transformers as tf

    torch.manual_seed(0)
    small = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    small.update(kw)
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=64,
                                                bos_token_id=0, eos_token_id=0)).eval()
    if family == "gemma":
        return tf.GemmaForCausalLM(tf.GemmaConfig(head_dim=16, **small)).eval()
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
           "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[family]
    return cls[1](cls[0](**small)).eval()


def _prompt(batch=2, length=10, pad=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :pad] = 0
        ids[1, :pad] = 0
    return ids, mask


def _optimize(model, recipe="exact", example=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return attnforge.optimize(model, recipe, (example if example is not None else _prompt(1, 8)[0],))


@pytest.fixture(scope="module")
def llama():
    model = _lm("llama")
    assert model.config.use_cache
    return model, _optimize(model)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "mistral", "gemma"])
def test_greedy_tokens_equal_hugging_face_generate(family):
    model = _lm(family)
    opt = _optimize(model)
    assert opt.report.decode["passed"] and opt.report.decode["max_abs"] <= 1e-4, opt.report.decode
    for ids, mask in (_prompt(1, 7), _prompt(2, 10)):  # batch 1, and a left-padded batch of 2
        want = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        got = opt.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0)
        assert got.dtype == torch.long and torch.equal(got, want), (family, got[:, -12:], want[:, -12:])


def _family(name: str):
    """More causal families from small configs (random weights, default generation settings)."""
    import transformers as tf

    torch.manual_seed(0)
    small = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)
    plain = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    build = {
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**small, pad_token_id=0)),
        "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**small, head_dim=16)),
        "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**small, head_dim=16)),
        "olmo2": lambda: tf.Olmo2ForCausalLM(tf.Olmo2Config(**small)),
        "granite": lambda: tf.GraniteForCausalLM(tf.GraniteConfig(**small)),
        "stablelm": lambda: tf.StableLmForCausalLM(tf.StableLmConfig(**small)),
        "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**plain, intermediate_size=96,
                                                                   max_position_embeddings=256)),
        "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                                      num_attention_heads=4, max_position_embeddings=256,
                                                      word_embed_proj_dim=64)),
        "falcon": lambda: tf.FalconForCausalLM(tf.FalconConfig(**plain, new_decoder_architecture=False)),
        "gptj": lambda: tf.GPTJForCausalLM(tf.GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                                         n_positions=256, rotary_dim=8)),
        "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**small, head_dim=16)),
        "bloom": lambda: tf.BloomForCausalLM(tf.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4)),
    }[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build().eval()


@pytest.mark.parametrize("family", ["phi3", "qwen3", "gemma3", "olmo2", "granite", "stablelm", "gpt_neox", "opt",
                                    "falcon", "gptj", "gemma2"])
def test_more_families_generate_hugging_faces_tokens(family):
    model = _family(family)
    opt = _optimize(model)
    assert opt.report.decode["passed"], opt.report.decode
    ids, mask = _prompt(2, 10)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(opt.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0), want), family


@pytest.mark.parametrize("family, why", [
    ("bloom", "forward takes position_ids"),  # ALiBi, no position input
])
def test_a_family_that_cannot_decode_says_why(family, why):
    model = _family(family)
    with pytest.warns(RuntimeWarning, match="cannot generate"):
        opt = attnforge.optimize(model, "exact", (_prompt(1, 8)[0],))
    assert not opt.report.decode["checked"] and why in opt.report.decode["reason"]
    with pytest.raises(GenerationError, match=why):
        opt.generate(_prompt(1, 6)[0], max_new_tokens=2)


def test_logits_and_scores_are_hugging_faces(llama):
    model, opt = llama
    ids, mask = _prompt(2, 9)
    kw = dict(attention_mask=mask, max_new_tokens=6, return_dict_in_generate=True, output_logits=True,
              output_scores=True, pad_token_id=0)
    want = model.generate(ids, do_sample=False, **kw)
    got = opt.generate(ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    assert len(got.logits) == len(want.logits) == 6 and len(got.scores) == 6
    for g, w in zip(got.logits + got.scores, want.logits + want.scores):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_sampling_draws_what_hugging_face_draws_with_the_same_seed(llama):
    """temperature, top-k and top-p, in Hugging Face's order: the processed scores and, from one seed, the tokens."""
    model, opt = llama
    ids, mask = _prompt(2, 9)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=0.7, top_k=20, top_p=0.9,
              return_dict_in_generate=True, output_scores=True, pad_token_id=0)
    torch.manual_seed(5)
    want = model.generate(ids, **kw)
    torch.manual_seed(5)
    got = opt.generate(ids, **kw)
    for g, w in zip(got.scores, want.scores):
        finite = torch.isfinite(w)
        assert torch.equal(torch.isfinite(g), finite)  # the same tokens survive top-k and top-p
        torch.testing.assert_close(g[finite], w[finite], rtol=1e-4, atol=1e-4)
    assert torch.equal(got.sequences, want.sequences)


RECIPES = {
    "exact": "exact",
    "sliding_window": {"steps": [{"rewrite": "sliding_window", "params": {"window": 4, "sinks": 2}}]},
    "linear_elu": {"steps": [{"rewrite": "linear", "params": {"feature_map": "elu"}}]},
    "linear_hedgehog_hybrid": {"steps": [{"rewrite": "linear", "params": {"feature_map": "hedgehog", "window": 3}}]},
    "block_sparse": {"steps": [{"rewrite": "block_sparse", "params": {"block": 4, "local": 1}}]},
    "gqa": {"steps": [{"rewrite": "gqa", "params": {"kv_heads": 1}}, {"rewrite": "fuse_attention"}]},
    "chunked": {"steps": [{"rewrite": "chunked_attention", "params": {"chunk": 5}}]},
    "engram": {"steps": [{"rewrite": "fuse_attention"}, {"rewrite": "engram", "params": {"ngram": [2, 3],
                                                                                        "table_size": 101}}]},
    "memoryformer": {"steps": [{"rewrite": "fuse_attention"}, {"rewrite": "memoryformer", "params": {
        "tau": 4, "projections": ["up", "gate", "down"], "calibrate": False}}]},
    "engram_alone": {"steps": [{"rewrite": "engram", "params": {"ngram": [2], "table_size": 101}}]},
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_decode_equals_the_rewritten_models_own_full_sequence(name, llama):
    """The decode contract: greedy tokens are the argmax of the rewritten model's logits of prompt + generated at
    each step, and each step's logits are those logits (fp32, 1e-4)."""
    model, _ = llama
    opt = _optimize(model, RECIPES[name])
    assert opt.report.decode["checked"] and opt.report.decode["passed"], opt.report.decode
    assert opt.report.decode["max_abs"] <= 1e-4
    ids, mask = _prompt(2, 10)
    out = opt.generate(ids, attention_mask=mask, max_new_tokens=10, return_dict_in_generate=True,
                       output_logits=True, pad_token_id=0)
    full_mask = torch.cat([mask, torch.ones(2, 10, dtype=torch.long)], 1)
    with torch.no_grad():  # positions as generate gives them to a left-padded row (and Hugging Face's generate)
        full = opt(out.sequences, attention_mask=full_mask, position_ids=positions(full_mask)).logits
    steps = torch.stack(out.logits, 1)  # [B, new, V]
    torch.testing.assert_close(steps, full[:, 9:-1], rtol=1e-4, atol=1e-4)
    new, argmax = out.sequences[:, 10:], full[:, 9:-1].argmax(-1)
    eos = opt.generation_config.eos_token_id
    after_eos = torch.zeros_like(new, dtype=torch.bool)
    after_eos[:, 1:] = (new == eos).cumsum(1)[:, :-1] > 0  # finished rows are padded, not argmax'd
    assert torch.equal(new[~after_eos], argmax[~after_eos]) and bool((new[after_eos] == 0).all())


def test_kv_cache_bytes_window_and_linear_are_constant_gqa_a_fraction():
    model = _lm("llama", num_key_value_heads=4)  # 4 heads, 4 KV heads of 16: 2 layers
    exact = _optimize(model)
    window = _optimize(model, RECIPES["sliding_window"])
    linear = _optimize(model, RECIPES["linear_elu"])
    gqa = _optimize(model, {"steps": [{"rewrite": "gqa", "params": {"kv_heads": 1}}, {"rewrite": "fuse_attention"}]})
    per_token = 2 * (4 * (16 + 16) * 4 + 1)  # layers × (KV heads × (key + value) × fp32 + a validity flag)
    assert exact.kv_cache_bytes(1, 1000) == 1000 * per_token and exact.kv_cache_bytes(3, 1000) == 3000 * per_token
    assert gqa.kv_cache_bytes(1, 1000) == 1000 * 2 * (1 * 32 * 4 + 1)  # one KV head of four
    assert window.kv_cache_bytes(1, 100) == window.kv_cache_bytes(1, 100_000) == 2 * 6 * (4 * 32 * 4 + 9)
    assert linear.kv_cache_bytes(1, 100) == linear.kv_cache_bytes(1, 100_000) == 2 * 4 * 16 * 17 * 4
    # the report: formulas in N, before (the model's own full cache) and after
    assert exact.report.kv_cache["total"] == exact.report.kv_cache["before"] == f"{per_token}*N"
    assert window.report.kv_cache["before"] == f"{per_token}*N" and "N" not in window.report.kv_cache["total"]
    assert "KV cache bytes" in window.report.to_text()


def test_a_streamer_sees_the_prompt_then_each_token_then_the_end(llama):
    _, opt = llama

    class Recorder:
        def __init__(self):
            self.calls = []

        def put(self, value):
            self.calls.append(value.clone())

        def end(self):
            self.calls.append("end")

    ids, _ = _prompt(1, 6)
    streamer = Recorder()
    out = opt.generate(ids, max_new_tokens=5, streamer=streamer)
    assert torch.equal(streamer.calls[0], ids) and streamer.calls[-1] == "end" and len(streamer.calls) == 7
    assert torch.equal(torch.cat([c.reshape(1, -1) for c in streamer.calls[:-1]], 1), out)


def test_eos_stops_and_pads_finished_rows(llama):
    model, opt = llama
    ids, mask = _prompt(2, 10)
    free = opt.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0)
    eos = int(free[0, 12])  # row 0's third new token, as the end of sequence
    want = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos,
                          pad_token_id=0)
    got = opt.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want)


def test_generation_config_supplies_what_the_call_leaves_out(llama):
    from transformers import GenerationConfig

    _, opt = llama
    ids, _ = _prompt(1, 6)
    got = opt.generate(ids, generation_config=GenerationConfig(max_new_tokens=3, do_sample=False))
    assert got.shape == (1, 9)
    assert torch.equal(opt.generate(ids, max_new_tokens=0), ids)


@pytest.mark.parametrize("kwargs, field", [
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ({"do_sample": True, "temperature": 0.0}, "temperature"),
    ({"do_sample": True, "top_p": 1.5}, "top_p"),
    ({"do_sample": True, "top_k": -2}, "top_k"),
    ({"num_beams": 4}, "num_beams"),
    ({"attention_mask": torch.ones(1, 3, dtype=torch.long)}, "attention_mask"),
])
def test_bad_arguments_are_named(llama, kwargs, field):
    _, opt = llama
    with pytest.raises(GenerationError, match=field):
        opt.generate(_prompt(1, 6)[0], **kwargs)


def test_bad_input_ids_are_named(llama):
    _, opt = llama
    for bad in (torch.randn(1, 5), torch.zeros(1, 0, dtype=torch.long), torch.zeros(5, dtype=torch.long)):
        with pytest.raises(GenerationError, match="input_ids"):
            opt.generate(bad, max_new_tokens=2)


def test_a_prompt_past_the_learned_positions_is_refused():
    model = _lm("gpt2")  # 64 learned positions
    opt = _optimize(model)
    with pytest.raises(GenerationError, match=r"64 positions .*wpe"):
        opt.generate(torch.randint(3, VOCAB, (1, 60)), max_new_tokens=5)
    assert opt.generate(torch.randint(3, VOCAB, (1, 60)), max_new_tokens=4).shape == (1, 64)


def test_a_model_that_is_not_causal_cannot_generate():
    import transformers as tf

    torch.manual_seed(0)
    bert = tf.BertModel(tf.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4)).eval()
    opt = _optimize(bert)
    assert not opt.report.decode  # not a generating model: nothing to check
    with pytest.raises(GenerationError, match="bidirectional"):
        opt.generate(_prompt(1, 6)[0], max_new_tokens=2)


def test_generate_after_a_dtype_move_uses_a_cache_of_that_dtype(llama):
    model, _ = llama
    opt = _optimize(model).to(torch.float64)
    ids, mask = _prompt(2, 8)
    want = model.double().generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    model.float()
    got = opt.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0)
    assert torch.equal(got, want)
    decoder = next(iter(opt._decoders.values()))
    assert {s.site.dtype for s in decoder.graph.sites} == {torch.float64}


def test_generation_past_the_models_own_sliding_window_is_refused():
    """Mistral keeps a sliding window in its own attention: within it, HF's tokens; past it, a GenerationError
    naming the window (the cache keeps every key, and an 8-token capture cannot see the window)."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.MistralForCausalLM(tf.MistralConfig(vocab_size=100, hidden_size=64, intermediate_size=96,
                                                   num_hidden_layers=2, num_attention_heads=4,
                                                   num_key_value_heads=2, sliding_window=12)).eval()
    opt = _optimize(model)
    ids, mask = _prompt(2, 6)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(opt.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0), want)
    with pytest.raises(GenerationError, match="12-token sliding window.*config.sliding_window"):
        opt.generate(ids, attention_mask=mask, max_new_tokens=7, pad_token_id=0)
