"""Sparse attention: sliding window with sinks, static and top-k block-sparse."""
from __future__ import annotations

import itertools

import pytest
import torch

import attnforge
from attnforge import RecipeError
from attnforge.runtime.block_sparse import static_layout, topk_layout
from attnforge.runtime.sliding_window.cpu import sliding_window_cpu
from conftest import rel_err

sliding = torch.ops.attnforge.sliding_window_attention
block_sparse = torch.ops.attnforge.block_sparse_attention


def visible_plain(n: int, window: int, sinks: int, causal: bool) -> torch.Tensor:
    """The DESIGN.md rule written out element by element (causal sinks never look ahead)."""
    keep = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if causal:
                keep[i, j] = (0 <= i - j < window) or (j < sinks and j <= i)
            else:
                keep[i, j] = abs(i - j) < window or j < sinks
    return keep


def masked_softmax_reference(q, k, v, keep, scale, mask=None):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1).double(), v.repeat_interleave(rep, 1).double()
    s = (q.double() @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~keep, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    return (torch.softmax(s, -1).nan_to_num(0.0) @ v).float()


def padding_mask(b, n, keep_len):
    m = torch.zeros(b, 1, 1, n)
    m[-1, ..., keep_len:] = float("-inf")
    return m


@pytest.mark.parametrize("n,window,sinks,causal,heads", [
    (1, 1, 0, True, (2, 2)), (13, 4, 0, True, (4, 2)), (13, 4, 3, True, (4, 4)), (13, 5, 2, False, (4, 2)),
    (70, 16, 4, True, (4, 1)), (70, 16, 0, False, (2, 2)), (9, 30, 2, True, (2, 2)),
])
@pytest.mark.parametrize("mask_kind", [None, "padding", "bool"])
def test_sliding_window_op_equals_dense_masked_softmax(n, window, sinks, causal, heads, mask_kind):
    torch.manual_seed(0)
    h, hk = heads
    q, k, v = torch.randn(2, h, n, 16), torch.randn(2, hk, n, 16), torch.randn(2, hk, n, 16)
    mask = None
    if mask_kind == "padding":
        mask = padding_mask(2, n, max(1, n - 3))
    elif mask_kind == "bool":
        mask = torch.rand(2, 1, n, n) > 0.4
        mask |= torch.eye(n, dtype=torch.bool)
    keep = visible_plain(n, window, sinks, causal)
    want = masked_softmax_reference(q, k, v, keep, 0.25, mask)
    got = sliding(q, k, v, mask, 0.25, window, sinks, causal)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for block in (3, 32):  # the block size is a tunable: results must not depend on it
        torch.testing.assert_close(sliding_window_cpu(q, k, v, mask, 0.25, window, sinks, causal, block),
                                   want, rtol=1e-4, atol=1e-5)


def test_sinks_change_only_rows_that_cannot_see_them():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 8) for _ in range(3))
    plain = sliding(q, k, v, None, 0.3, 4, 0, True)
    sunk = sliding(q, k, v, None, 0.3, 4, 3, True)
    # queries 0..3 already see keys 0..2 inside their window (i − j < 4): sinks change nothing there;
    # from query 4 on, key 0 has left the window and only the sink keeps it
    torch.testing.assert_close(sunk[:, :, :4], plain[:, :, :4])
    assert (sunk[:, :, 4:] - plain[:, :, 4:]).abs().amax(-1).min() > 1e-4


def test_sliding_window_is_strictly_causal():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    base = sliding(q, k, v, None, 0.3, 8, 2, True)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, :, 25:] = torch.randn_like(t[:, :, 25:])
    other = sliding(q2, k2, v2, None, 0.3, 8, 2, True)
    assert torch.equal(base[:, :, :25], other[:, :, :25])


@pytest.mark.parametrize("layout", [dict(local=1, global_=0, random=0), dict(local=2, global_=1, random=1),
                                    dict(local=1, global_=1, random=3)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mask_kind", [None, "padding"])
def test_static_block_sparse_equals_reference_from_its_table(layout, causal, mask_kind):
    torch.manual_seed(0)
    n, block = 40, 8
    q, k, v = torch.randn(2, 4, n, 16), torch.randn(2, 2, n, 16), torch.randn(2, 2, n, 16)
    mask = padding_mask(2, n, 29) if mask_kind else None
    counts, idx = static_layout(n // block, layout["local"], layout["global_"], layout["random"], 7, causal)
    assert idx.shape[0] == n // block and idx.dim() == 2  # a compact table, not an N×N mask
    keep = _keep_from_table(counts, idx, n, block, causal)
    got = block_sparse(q, k, v, mask, 0.25, block, layout["local"], layout["global_"], layout["random"], 7, 0, causal)
    torch.testing.assert_close(got, masked_softmax_reference(q, k, v, keep, 0.25, mask), rtol=1e-4, atol=1e-5)


def _keep_from_table(counts, idx, n, block, causal):
    keep = torch.zeros(n, n, dtype=torch.bool)
    for qb in range(idx.shape[-2]):
        for slot in range(int(counts[..., qb].max())):
            kb = int(idx[..., qb, slot].flatten()[0])
            keep[qb * block:(qb + 1) * block, kb * block:(kb + 1) * block] = True
    return keep & torch.ones(n, n, dtype=torch.bool).tril() if causal else keep


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("topk", [1, 2])
def test_topk_block_sparse_equals_reference_from_its_table(causal, topk):
    torch.manual_seed(0)
    n, block = 48, 8
    q, k, v = torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16)
    counts, idx = topk_layout(q, k, block, topk, 0.25, causal)
    assert idx.shape == (1, 2, n // block, min(topk + 2, n // block))
    got = block_sparse(q, k, v, None, 0.25, block, 0, 0, 0, 0, topk, causal)
    for h in range(2):
        keep = _keep_from_table(counts[0, h], idx[0, h], n, block, causal)
        want = masked_softmax_reference(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], keep, 0.25)
        torch.testing.assert_close(got[:, h:h + 1], want, rtol=1e-4, atol=1e-5)
        # the first block (sink) and the diagonal are always kept
        for qb in range(n // block):
            row = set(idx[0, h, qb, :counts[0, h, qb]].tolist())
            assert {0, qb} <= row and (not causal or max(row) <= qb)


def _llama_and_mistral(window, impl="eager", layers=2):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, use_cache=False, attn_implementation=impl)
    llama = tf.LlamaModel(tf.LlamaConfig(**common)).eval()
    mistral = tf.MistralModel(tf.MistralConfig(sliding_window=window, **common)).eval()
    mistral.load_state_dict(llama.state_dict())
    return llama, mistral


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_sliding_window_equals_hf_mistral(impl):
    window = 5
    llama, mistral = _llama_and_mistral(window, impl)
    ids = torch.randint(0, 100, (2, 19))
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[1, :3] = 0  # left padding, as in batched generation
    recipe = {"steps": [{"rewrite": "sliding_window", "params": {"window": window}}]}
    opt = attnforge.optimize(llama, recipe, (ids,), {"attention_mask": mask})
    assert opt.report.counts() == {"sliding_window": 2}
    assert all(s.info["causal"] for s in opt.report.sites)
    with torch.no_grad():
        want = mistral(ids, attention_mask=mask).last_hidden_state
        got = opt(ids, attention_mask=mask).last_hidden_state
        plain = llama(ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    assert rel_err(got[keep], want[keep]) <= 1e-4
    assert rel_err(plain[keep], want[keep]) > 1e-2  # the window really changed the model


def test_window_at_least_sequence_length_is_exact():
    llama, _ = _llama_and_mistral(4)
    ids = torch.randint(0, 100, (1, 16))
    for rewrite, params in [("sliding_window", {"window": 16}), ("sliding_window", {"window": 64, "sinks": 4}),
                            ("block_sparse", {"block": 4, "local": 4, "global_": 0}),
                            ("block_sparse", {"block": 4, "topk": 4})]:
        opt = attnforge.optimize(llama, {"steps": [{"rewrite": rewrite, "params": params}]}, (ids,))
        assert opt.report.counts() == {rewrite: 2}
        with torch.no_grad():
            assert rel_err(opt(ids)[0], llama(ids)[0]) <= 1e-5, (rewrite, params)


def test_report_states_kept_fraction_flops_and_error():
    llama, _ = _llama_and_mistral(4)
    ids = torch.randint(0, 100, (1, 64))
    rep = attnforge.optimize(llama, {"steps": [{"rewrite": "sliding_window", "params": {"window": 8, "sinks": 2}}]},
                             (ids,)).report
    s = rep.sites[0]
    keep = visible_plain(64, 8, 2, True)
    assert s.info["kept_fraction"] == pytest.approx(int(keep.sum()) / (64 * 65 / 2))
    assert "N**2" in s.info["flops_before"] and "N**2" not in s.info["flops_after"]
    assert s.info["flops_after_at_n"] < s.info["flops_before_at_n"]
    assert s.error["rel"] > 0 and rep.outputs[0]["cosine"] < 1


@pytest.mark.parametrize("step,field", [
    ({"rewrite": "sliding_window", "params": {"window": 0}}, "steps[0].params.window"),
    ({"rewrite": "sliding_window", "params": {"window": -4}}, "steps[0].params.window"),
    ({"rewrite": "sliding_window", "params": {"window": 4, "sinks": -1}}, "steps[0].params.sinks"),
    ({"rewrite": "sliding_window", "params": {"windw": 4}}, "steps[0].params.windw"),
    ({"rewrite": "block_sparse", "params": {"topk": 0}}, "steps[0].params.topk"),
    ({"rewrite": "block_sparse", "params": {"block": 0}}, "steps[0].params.block"),
    ({"rewrite": "block_sparse", "params": {"local": 0}}, "steps[0].params"),
])
def test_bad_params(step, field):
    with pytest.raises(RecipeError) as e:
        attnforge.load_recipe({"steps": [step]})
    assert e.value.field == field, str(e.value)


def test_block_not_dividing_sequence_is_a_recipe_error():
    llama, _ = _llama_and_mistral(4)
    with pytest.raises(RecipeError, match="does not divide") as e:
        attnforge.optimize(llama, {"steps": [{"rewrite": "block_sparse", "params": {"block": 5}}]},
                           (torch.randint(0, 100, (1, 16)),))
    assert e.value.field == "steps[0].params.block"


def test_long_context_recipe_skips_first_and_last_layer():
    llama, _ = _llama_and_mistral(4, layers=4)
    rep = attnforge.optimize(llama, "long-context", (torch.randint(0, 100, (1, 16)),)).report
    applied = [s.fqn for s in rep.sites if s.rewrite == "sliding_window" and s.status == "applied"]
    assert applied == ["layers.1.self_attn", "layers.2.self_attn"]
    assert rep.counts()["fuse_attention"] == 4 and rep.passed  # window 512 > 16 tokens: exact here


def test_kept_work_is_proportional_to_the_window():
    """Cost model check, not a timing: the band the kernel reads grows as N·(block + window)."""
    for n, window, block in itertools.product([256, 1024], [16, 64], [32]):
        span = block + window - 1
        assert span * (-(-n // block)) * block <= n * (block + window)


@pytest.mark.parametrize("rewrite,params", [
    ("sliding_window", {"window": 5, "sinks": 2}),
    ("block_sparse", {"block": 4, "local": 1, "global_": 1, "random": 1}),
    ("block_sparse", {"block": 4, "topk": 1}),
])
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_onnx_export_matches_onnxruntime(rewrite, params, family, tmp_path):
    pytest.importorskip("onnxruntime")
    from attnforge.runtime.onnx import export_onnx, run_onnx
    from conftest import build_hf

    model, args, kwargs = build_hf(family, "eager")
    opt = attnforge.optimize(model, {"steps": [{"rewrite": rewrite, "params": params}]}, args, kwargs)
    assert opt.report.counts() == {rewrite: 2}
    path = export_onnx(opt.graph_module, args, kwargs, tmp_path / "m.onnx")
    with torch.no_grad():
        want = opt(*args, **kwargs)
    got = run_onnx(path, args, kwargs, want)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)


def test_sliding_window_gradients_with_sinks_outside_the_window_equal_the_rule():
    """The sinks are merged by log-sum-exp in the forward kernel; its backward must still be the rule's gradient
    (a window shorter than the sequence, so the sinks lie outside it)."""
    from attnforge.runtime import VARIANTS

    v = VARIANTS["sliding_window_attention"]
    g = torch.Generator().manual_seed(0)
    q, k, vv = (torch.randn(2, h, 11, 8, dtype=torch.float64, generator=g) for h in (4, 2, 2))
    up = torch.randn(2, 4, 11, 8, dtype=torch.float64, generator=g)
    leaves = [x.clone().requires_grad_() for x in (q, k, vv)]
    copies = [x.clone().requires_grad_() for x in (q, k, vv)]
    (v.op(*leaves, None, 0.25, 5, 2, True) * up).sum().backward()
    (v.reference(*copies, None, 0.25, 5, 2, True) * up).sum().backward()
    for a, b in zip(leaves, copies):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10)
