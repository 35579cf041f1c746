"""``engram``: hash ids against plain Python, exact insertion, ids threading, training, offload, Triton, ONNX."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

import attnforge
from attnforge import RecipeError
from attnforge.runtime.engram import EngramMemory, engram_multipliers, engram_primes, engram_rows
from conftest import assert_unchanged, build_hf, other_inputs, snapshot
from test_memoryformer import triton_device

engram_embed = torch.ops.attnforge.engram_embed
VOCAB = 50257  # GPT-2's vocabulary: multipliers near 2^63 / 50257, so the products use most of int64


def recipe(**params):
    return {"steps": [{"rewrite": "engram", "params": {"heads": 2, "dim": 8, "table_size": 101, **params}}]}


def plain_rows(ids: list[list[int]], multipliers, ngram, heads, primes, pad_id) -> list:
    """The hash written out with Python integers (no overflow possible): rows[b][t][head]."""
    offsets = [sum(primes[:h]) for h in range(len(primes))]
    out = []
    for seq in ids:
        out.append([])
        for t in range(len(seq)):
            row = []
            for i, n in enumerate(ngram):
                mix = 0
                for k in range(n):
                    x = seq[t - k] if t - k >= 0 else pad_id
                    mix = x * multipliers[k] if k == 0 else mix ^ (x * multipliers[k])
                for j in range(heads):
                    h = i * heads + j
                    row.append(mix % primes[h] + offsets[h])
            out[-1].append(row)
    return out


def _hash_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 17), generator=g)
    ids[0, :4] = VOCAB - 1  # the largest id: the largest products
    ngram, heads = [2, 3], 3
    mult = engram_multipliers(VOCAB, 3, seed=7, layer=2)
    primes = engram_primes(1009, len(ngram) * heads, skip=12)
    return ids, mult, ngram, heads, primes, 5


def test_constants_are_odd_bounded_and_distinct():
    for layer in range(3):
        m = engram_multipliers(VOCAB, 3, seed=0, layer=layer)
        assert all(x % 2 == 1 and 0 < x and (VOCAB - 1) * x < 2 ** 63 for x in m)
    assert engram_multipliers(VOCAB, 3, 0, 0) != engram_multipliers(VOCAB, 3, 0, 1)
    primes = [engram_primes(1000, 6, skip=6 * layer) for layer in range(3)]
    flat = [p for ps in primes for p in ps]
    assert len(set(flat)) == len(flat) and min(flat) >= 1000 and flat[0] == 1009
    assert all(all(p % q for q in range(2, int(p ** 0.5) + 1)) for p in flat)


def test_hash_ids_equal_plain_python_reference():
    ids, mult, ngram, heads, primes, pad = _hash_case()
    want = torch.tensor(plain_rows(ids.tolist(), mult, ngram, heads, primes, pad))
    assert torch.equal(engram_rows(ids, mult, ngram, heads, primes, pad), want)
    table = torch.arange(sum(primes), dtype=torch.float64)[:, None]  # row r holds r: the lookup shows the ids
    assert torch.equal(engram_embed(ids, table, mult, ngram, heads, primes, pad).long(), want)


def test_triton_kernel_equals_python_reference():
    dev = triton_device()
    from attnforge.runtime.engram.triton import engram_embed_triton

    ids, mult, ngram, heads, primes, pad = _hash_case(1)
    want = torch.tensor(plain_rows(ids.tolist(), mult, ngram, heads, primes, pad))
    table = torch.arange(sum(primes), dtype=torch.float64)[:, None].repeat(1, 3)  # dim 3: masked lanes
    got = engram_embed_triton(ids.to(dev), table.to(dev), mult, ngram, heads, primes, pad, block_t=8).cpu()
    assert torch.equal(got.view(3, 17, -1, 3)[..., 0].long(), want)
    real = torch.randn(sum(primes), 16)
    assert torch.equal(engram_embed_triton(ids.to(dev), real.to(dev), mult, ngram, heads, primes, pad).cpu(),
                       engram_embed(ids, real, mult, ngram, heads, primes, pad))


class _Lookup(torch.nn.Module):
    def __init__(self, table, *hash_args):
        super().__init__()
        self.table, self.hash_args = table, hash_args

    def forward(self, ids):
        return engram_embed(ids, self.table, *self.hash_args)


def test_onnx_lookup_matches_python_reference_bit_for_bit(tmp_path):
    pytest.importorskip("onnxruntime")
    from attnforge.runtime.onnx import export_onnx, run_onnx

    ids, mult, ngram, heads, primes, pad = _hash_case(2)
    table = torch.arange(sum(primes), dtype=torch.float64)[:, None]
    path = export_onnx(_Lookup(table, mult, ngram, heads, primes, pad), (ids,), {}, tmp_path / "lookup.onnx")
    got = run_onnx(path, (ids,), {}, ids)
    assert torch.equal(got.long(), torch.tensor(plain_rows(ids.tolist(), mult, ngram, heads, primes, pad)))


def test_table_gradient_is_a_scatter_add():
    ids, mult, ngram, heads, primes, pad = _hash_case(3)
    table = torch.randn(sum(primes), 4, requires_grad=True)
    g = torch.randn(3, 17, len(ngram) * heads * 4)
    (grad,) = torch.autograd.grad(engram_embed(ids, table, mult, ngram, heads, primes, pad), table, g)
    want = torch.zeros_like(table)
    for (b, t, h), row in zip(torch.cartesian_prod(*map(torch.arange, (3, 17, len(ngram) * heads))).tolist(),
                              engram_rows(ids, mult, ngram, heads, primes, pad).flatten().tolist()):
        want[row] += g[b, t, h * 4:(h + 1) * 4]
    torch.testing.assert_close(grad, want)


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
def test_inserted_model_equals_original_exactly(family):
    model, args, kwargs = build_hf(family, "eager")
    before = snapshot(model)
    opt = attnforge.optimize(model, recipe(), args, kwargs)
    assert_unchanged(model, before)
    assert opt.report.counts() == {"engram": 2} and opt.report.passed
    assert all(s.error["max_abs"] == 0 for s in opt.report.sites)
    with torch.no_grad():
        for a, k in ((args, kwargs), other_inputs(family, args, kwargs)):
            assert torch.equal(opt(*a, **k)[0], model(*a, **k)[0])


def test_token_ids_are_threaded_from_the_input_ahead_of_the_layers():
    model, args, kwargs = build_hf("llama", "eager")
    opt = attnforge.optimize(model, recipe(layers=[1]), args, kwargs)
    g = opt.graph_module.graph
    (lookup,) = [n for n in g.nodes if n.target is engram_embed.default]
    assert lookup.args[0].op == "placeholder" and lookup.args[0].target == "input_ids"
    order = list(g.nodes)
    first_layer_node = next(n for n in order if n.meta.get("nn_module_stack") and any(
        v[0].endswith("layers.0") for v in n.meta["nn_module_stack"].values()))
    assert order.index(lookup) < order.index(first_layer_node)  # fetched before layer 0 runs
    assert [s.status for s in opt.report.sites] == ["skipped", "applied"]
    assert opt.report.sites[0].reason == "layer 0 is not in layers=[1]"
    assert opt.report.sites[1].fqn == "layers.1"


def test_layer_indices():
    model, args, kwargs = build_hf("gpt2", "eager")
    last = attnforge.optimize(model, recipe(layers=[-1]), args, kwargs).report
    assert [s.fqn for s in last.sites if s.status == "applied"] == ["h.1"]
    with pytest.raises(RecipeError) as e:
        attnforge.optimize(model, recipe(layers=[2]), args, kwargs)
    assert e.value.field == "steps[0].params.layers"
    with pytest.raises(RecipeError) as e:
        attnforge.load_recipe(recipe(ngram=[2, 2]))
    assert e.value.field == "steps[0].params.ngram"


def test_model_without_token_ids_is_skipped():
    model, args, kwargs = build_hf("vit", "eager")
    rep = attnforge.optimize(model, recipe(), args, kwargs).report
    assert rep.counts() == {} and all("no token-id input" in s.reason for s in rep.sites)


def _phrases(vocab=64, phrases=12, n=3, seqs=16, per=10):
    """Sequences made of a few repeated 3-token phrases: the next token often follows from the last two."""
    g = torch.Generator().manual_seed(0)
    bank = torch.randint(1, vocab, (phrases, n), generator=g)
    return bank[torch.randint(0, phrases, (seqs, per), generator=g)].flatten(1)


def _train(model, ids, steps=20, lr=1e-2):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _toy_lm():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, use_cache=False, attn_implementation="eager")
    return tf.LlamaForCausalLM(cfg)


def test_engram_lowers_the_loss_faster_on_repeated_ngrams():
    model, ids = _toy_lm(), _phrases()
    opt = attnforge.optimize(model, recipe(ngram=[2, 3], table_size=211, layers=[0]), (ids[:2],))
    base = _train(copy.deepcopy(model), ids)
    with_engram = _train(opt, ids)
    assert with_engram[0] == pytest.approx(base[0], abs=1e-6)  # the same model at insertion
    assert sum(with_engram[-5:]) < 0.9 * sum(base[-5:]), (base[-5:], with_engram[-5:])


def test_freeze_except_engram_trains_only_the_memory():
    model, ids = _toy_lm(), _phrases()
    opt = attnforge.optimize(model, recipe(layers=[0, 1]), (ids[:2],))
    names = attnforge.freeze_except_engram(opt)
    assert sorted(names) == sorted(f"model.layers.{i}.engram.{p}" for i in (0, 1)
                                   for p in ("table", "key", "value", "key_norm", "hidden_norm"))
    frozen = {n: p.detach().clone() for n, p in opt.named_parameters() if "engram" not in n}
    losses = _train(opt, ids, steps=5)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in opt.named_parameters() if "engram" not in n)


def test_offload_keeps_tables_in_host_memory():
    model, args, kwargs = build_hf("llama", "eager")
    opt = attnforge.optimize(model, recipe(offload="cpu"), args, kwargs)
    memories = [m for m in opt.modules() if isinstance(m, EngramMemory)]
    assert len(memories) == 2 and all(m.offload == "cpu" for m in memories)
    opt.to(torch.float64)  # dtype conversions reach the table
    assert all(m.table.dtype == torch.float64 for m in memories)
    opt.to("meta")  # a device move leaves it in host memory, moves everything else
    assert all(m.table.device.type == "cpu" and m.key.device.type == "meta" for m in memories)
    assert next(p for n, p in opt.named_parameters() if "embed_tokens" in n).device.type == "meta"


def test_onnx_export_matches_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    from attnforge.runtime.onnx import export_onnx, run_onnx

    model, args, kwargs = build_hf("llama", "eager")
    opt = attnforge.optimize(model, recipe(), args, kwargs)
    with torch.no_grad():  # a trained memory: the engram path must change the output
        for m in opt.modules():
            if isinstance(m, EngramMemory):
                m.value.normal_(0, 0.1)
        want = opt(*args, **kwargs)
        assert not torch.allclose(want[0], model(*args, **kwargs)[0], atol=1e-3)
    path = export_onnx(opt.graph_module, args, kwargs, tmp_path / "m.onnx")
    got = run_onnx(path, args, kwargs, want)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
