"""optimize(model, "exact") on Hugging Face families (eager and sdpa) and real all-MiniLM-L6-v2 weights."""
from __future__ import annotations

import pytest
import torch

import attnforge
from conftest import FAMILIES, LAYERS, assert_unchanged, build_hf, other_inputs, rel_err, snapshot


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_layer_fused_and_exact(family, impl):
    model, args, kwargs = build_hf(family, impl)
    before = snapshot(model)
    opt = attnforge.optimize(model, "exact", args, kwargs)
    report = opt.report
    assert report.counts() == {"fuse_attention": LAYERS, "fuse_ffn": LAYERS}, report.to_text()
    assert not report.misses, report.to_text()
    assert report.passed
    # the graph really calls the fused ops, and no softmax/SDPA is left
    targets = [str(n.target) for n in opt.graph_module.graph.nodes if n.op == "call_function"]
    assert targets.count("attnforge.attention.default") == LAYERS
    assert targets.count("attnforge.ffn.default") == LAYERS
    assert not [t for t in targets if "softmax" in t or "scaled_dot_product" in t]
    # outputs equal the HF model with the same weights, on the example and on another shape
    for a, kw in [(args, kwargs), other_inputs(family, args, kwargs)]:
        with torch.no_grad():
            ref, got = model(*a, **kw), opt(*a, **kw)
        assert rel_err(got[0], ref[0]) <= 1e-5
    assert_unchanged(model, before)


def test_gqa_sites_read_kv_heads_directly():
    model, args, kwargs = build_hf("llama", "eager")
    opt = attnforge.optimize(model, "exact", args, kwargs)
    for s in opt.report.sites:
        if s.kind == "attention":
            assert (s.info["heads"], s.info["kv_heads"]) == (4, 2)
            assert s.info["projections"]["k_proj"].endswith("self_attn.k_proj")
            assert s.info["rope"] and s.info["causal"]
    calls = [n for n in opt.graph_module.graph.nodes if str(n.target) == "attnforge.attention.default"]
    for n in calls:  # k and v arrive with 2 heads: repeat_kv is gone
        assert n.args[1].meta["val"].shape[1] == 2 and n.args[2].meta["val"].shape[1] == 2


def test_bert_is_bidirectional_and_gpt2_causal():
    for family, causal in (("bert", False), ("gpt2", True)):
        model, args, kwargs = build_hf(family, "eager")
        opt = attnforge.optimize(model, "exact", args, kwargs)
        assert {s.info["causal"] for s in opt.report.sites if s.kind == "attention"} == {causal}


def test_minilm_real_weights(minilm_path):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_path).eval()
    before = snapshot(model)
    ids = torch.randint(1000, 20000, (3, 24))
    mask = torch.ones(3, 24, dtype=torch.long)
    mask[1, 15:] = 0
    mask[2, 6:] = 0
    opt = attnforge.optimize(model, "exact", (ids,), {"attention_mask": mask})
    assert opt.report.counts() == {"fuse_attention": 6, "fuse_ffn": 6}, opt.report.to_text()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).last_hidden_state
        got = opt(ids, attention_mask=mask).last_hidden_state
    assert rel_err(got, ref) <= 1e-5
    # mean-pooled sentence embeddings (how the model is used) agree too
    w = mask.unsqueeze(-1).float()
    emb_ref, emb_got = (ref * w).sum(1) / w.sum(1), (got * w).sum(1) / w.sum(1)
    assert torch.nn.functional.cosine_similarity(emb_ref, emb_got).min() > 1 - 1e-6
    assert_unchanged(model, before)


def test_model_mode_and_parameters_not_touched():
    model, args, kwargs = build_hf("bert", "sdpa")
    ids_before = {k: id(p) for k, p in model.named_parameters()}
    opt = attnforge.optimize(model, "exact", args, kwargs)
    assert {k: id(p) for k, p in model.named_parameters()} == ids_before
    assert not model.training
    # the optimized model does not share parameter storage with the user's model
    user = {p.data_ptr() for p in model.parameters()}
    assert not user & {p.data_ptr() for p in opt.parameters()}
