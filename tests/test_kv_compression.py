"""KV-cache compression (snapkv, think): each policy's kept set equals the rule of its paper written out plainly
here (float64 loops), decode over the compressed cache equals dense attention over exactly the kept keys (PyTorch
and the Triton split-KV kernel in the interpreter, and the exported functional step), budgets that cover the prompt
are exact on a Hugging Face model, and bad params are RecipeErrors naming the field."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import attnforge
from attnforge.errors import RecipeError
from attnforge.runtime.cache import POLICIES, VARIANT as CACHED, Site
from attnforge.runtime.dispatch import use_backend
from attnforge.runtime.snapkv import select_keys
from attnforge.runtime.think import select_channels

B, H, HKV, N, D = 2, 4, 2, 23, 8
SCALE = D ** -0.5
PAD = 3


def _inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, dtype=torch.float64, generator=g).to(dtype)
    k, v = (torch.randn(B, HKV, N, D, dtype=torch.float64, generator=g).to(dtype) for _ in range(2))
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1, :PAD] = False
    return q, k, v, valid


# --------------------------------------------------------------------------- the rules, written from the papers

def snapkv_by_definition(q, k, valid, t, budget, ratio, window, kernel, causal=True, group_mean=True):
    """SnapKV over the first t tokens: per (row, KV head) the set of kept key positions. ``causal`` False lets the
    window's queries see all of the window, ``group_mean`` False scores by the group's first query head only
    (both wrong: for the sensitivity test)."""
    kept = {}
    for b in range(q.shape[0]):
        real = [j for j in range(t) if valid[b, j]]
        n = len(real)
        keep = min(n, max(budget if budget else math.floor(n * ratio), window))
        w = min(window, t)
        win = list(range(t - w, t))
        for g in range(HKV):
            if keep >= n:
                kept[b, g] = set(real)
                continue
            group = range(g * (H // HKV), (g + 1) * (H // HKV) if group_mean else g * (H // HKV) + 1)
            score = [0.0] * (t - w)
            for h in group:
                a = [0.0] * (t - w)
                for i in win:  # the window's query i attends causally to the real keys j <= i
                    seen = [j for j in real if j <= i or not causal]
                    logits = torch.tensor([float(q[b, h, i] @ k[b, g, j]) * SCALE for j in seen])
                    p = torch.softmax(logits, 0)
                    for j, pj in zip(seen, p.tolist()):
                        if j < t - w:
                            a[j] += pj / len(win)
                half = kernel // 2
                padded = [0.0] * half + a + [0.0] * half
                for j in range(t - w):
                    score[j] += sum(padded[j:j + kernel]) / kernel / len(group)
            before = sorted((j for j in real if j < t - w), key=lambda j: -score[j])
            kept[b, g] = set(win) | set(before[:keep - len(win)])
    return kept


def think_by_definition(q, k, valid, t, ratio, window):
    """ThinK over the first t tokens: per (row, KV head) the set of kept channels."""
    kept = {}
    for b in range(q.shape[0]):
        real = [j for j in range(t) if valid[b, j]]
        last = real[-window:]
        for g in range(HKV):
            group = range(g * (H // HKV), (g + 1) * (H // HKV))
            score = []
            for c in range(D):
                qc = sum(float(q[b, h, i, c]) ** 2 for h in group for i in last) / (len(last) * len(group))
                kc = sum(float(k[b, g, j, c]) ** 2 for j in real) / len(real)
                score.append(qc * kc)
            kept[b, g] = set(sorted(range(D), key=lambda c: -score[c])[:D - math.floor(D * ratio)])
    return kept


def _sets(index, kept=None):
    out = {}
    for b in range(index.shape[0]):
        for g in range(index.shape[1]):
            row = index[b, g].tolist()
            out[b, g] = {j for r, j in enumerate(row) if kept is None or bool(kept[b, g, r])}
    return out


@pytest.mark.parametrize("budget,ratio,window,kernel", [(10, 0.0, 4, 5), (7, 0.0, 3, 3), (0, 0.4, 4, 5),
                                                        (0, 0.9, 5, 1), (30, 0.0, 4, 5)])
def test_snapkv_keeps_the_keys_of_its_definition(budget, ratio, window, kernel):
    q, k, _, valid = _inputs()
    index, kept = select_keys(q, k, valid, SCALE, budget, ratio, window, kernel)
    assert _sets(index, kept) == snapkv_by_definition(q, k, valid, N, budget, ratio, window, kernel)


def test_the_definition_is_sensitive_to_group_averaging_and_causal_masking():
    """On inputs where dropping either detail changes the kept set (the per-head rule without the group mean, or
    window queries that see the window's later keys), the implementation keeps the definition's set."""
    found = 0
    for seed in range(40):
        q, k, _, valid = _inputs(seed=seed)
        want = snapkv_by_definition(q, k, valid, N, 8, 0.0, 6, 3)
        if (want != snapkv_by_definition(q, k, valid, N, 8, 0.0, 6, 3, causal=False)
                and want != snapkv_by_definition(q, k, valid, N, 8, 0.0, 6, 3, group_mean=False)):
            index, kept = select_keys(q, k, valid, SCALE, 8, 0.0, 6, 3)
            assert _sets(index, kept) == want, seed
            found += 1
    assert found >= 3


@pytest.mark.parametrize("ratio,window", [(0.5, 4), (0.25, 32), (0.75, 1)])
def test_think_keeps_the_channels_of_its_definition(ratio, window):
    q, k, _, valid = _inputs()
    got = select_channels(q, k, valid, ratio, window)
    assert _sets(got) == think_by_definition(q, k, valid, N, ratio, window)


# --------------------------------------------------------------------------- decode over what was kept

def _dense(q, keys, values, scale):
    p = torch.softmax((q @ keys.T) * scale, -1)
    return p @ values


def _run(policy_name, params, prompt, backend="torch", dtype=torch.float64):
    q, k, v, valid = _inputs(dtype)
    policy = POLICIES[policy_name]
    site = Site(H, HKV, D, D, SCALE, q.dtype, q.device, params)
    state = policy.allocate(site, B, prompt)
    pack = policy.pack(params)
    outs = []
    for s, e in [(0, prompt)] + [(t, t + 1) for t in range(prompt, N)]:
        state = policy.grow(state, e)
        with use_backend(backend if s else "torch"):
            outs.append(CACHED.op(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], state, valid[:, s:e], s, SCALE,
                                  policy_name, *pack))
    return torch.cat(outs, 2), state, (q, k, v, valid)


SNAP = {"budget": 9, "ratio": 0.0, "window": 4, "kernel": 5}
THINK = {"ratio": 0.5, "window": 4}


@pytest.mark.parametrize("prompt", [15, N - 2])
def test_snapkv_decode_is_dense_attention_over_the_kept_keys(prompt):
    got, state, (q, k, v, valid) = _run("snapkv", SNAP, prompt)
    kept = snapkv_by_definition(q, k, valid, prompt, SNAP["budget"], 0.0, SNAP["window"], SNAP["kernel"])
    for b in range(B):
        for h in range(H):
            g = h // (H // HKV)
            for t in range(prompt, N):
                keys = sorted(kept[b, g]) + list(range(prompt, t + 1))
                want = _dense(q[b, h, t], k[b, g, keys], v[b, g, keys], SCALE)
                torch.testing.assert_close(got[b, h, t], want, rtol=1e-9, atol=1e-10)
    # the prompt's own outputs are exact attention
    exact = torch.ops.attnforge.attention(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt],
                                          valid[:, None, None, :prompt], SCALE, True, 0.0)
    real = valid[:, None, :prompt, None].expand_as(exact)
    torch.testing.assert_close(got[:, :, :prompt][real], exact[real])
    # the cache holds the kept keys and the decoded ones, nothing more
    assert int(state[3][0]) == SNAP["budget"] + (N - prompt)
    assert state[0].shape[2] == 256  # shrunk to one chunk after the prompt's selection


@pytest.mark.parametrize("prompt", [9, N - 2])
def test_think_decode_is_dense_attention_with_the_pruned_channels(prompt):
    got, state, (q, k, v, valid) = _run("channels", THINK, prompt)
    channels = think_by_definition(q, k, valid, prompt, THINK["ratio"], THINK["window"])
    for b in range(B):
        for h in range(H):
            g = h // (H // HKV)
            c = sorted(channels[b, g])
            for t in range(prompt, N):
                keys = [j for j in range(t + 1) if valid[b, j]]
                want = _dense(q[b, h, t, c], k[b, g][keys][:, c], v[b, g, keys], SCALE)
                torch.testing.assert_close(got[b, h, t], want, rtol=1e-9, atol=1e-10)
    assert state[0].shape[-1] == D // 2 and state[1].shape[-1] == D  # pruned keys, whole values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("policy,params", [("snapkv", SNAP), ("channels", THINK)])
def test_triton_decode_equals_the_pytorch_decode(policy, params, dtype):
    pytest.importorskip("triton")
    from attnforge.codegen import attention as codegen

    calls = []
    real = codegen.decode_triton
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(codegen, "decode_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        got, _, _ = _run(policy, params, N - 3, "triton", dtype)
    want, _, (_, _, _, valid) = _run(policy, params, N - 3, "torch", torch.float64)
    assert len(calls) == 3  # the split-KV kernel ran each decode step
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    rows = valid[:, None, :, None].expand_as(want)
    torch.testing.assert_close(got.double()[rows], want[rows], rtol=tol, atol=tol)


@pytest.mark.parametrize("policy,params", [("snapkv", SNAP), ("snapkv", {**SNAP, "budget": 0, "ratio": 0.5}),
                                           ("channels", THINK)])
def test_the_exported_step_equals_the_cache_op(policy, params):
    """The functional step an ONNX decode graph holds (past in, present out) gives the op's outputs and keeps
    the same keys: the prompt selects, each decode step appends one slot."""
    want, state, (q, k, v, valid) = _run(policy, params, 15)
    p = POLICIES[policy]
    site = Site(H, HKV, D, D, SCALE, q.dtype, q.device, params)
    past, outs = p.initial(site, B), []
    for s, e in [(0, 15)] + [(t, t + 1) for t in range(15, N)]:
        out, past = p.step(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], past, valid[:, :e], site)
        outs.append(out)
    got = torch.cat(outs, 2)
    rows = valid[:, None, :, None].expand_as(want)
    torch.testing.assert_close(got[rows], want[rows], rtol=1e-9, atol=1e-10)
    if policy == "snapkv":
        assert past[0].shape[2] == int(state[3][0])


def test_cache_bytes_follow_the_formula_and_shrink():
    site = Site(H, HKV, D, D, SCALE, torch.float32, "cpu", SNAP)
    snap, full = POLICIES["snapkv"], POLICIES["full"]
    per_slot = B * HKV * (2 * D * 4 + 1)
    assert int(snap.bytes(site, B, 1000)) == per_slot * SNAP["budget"]
    assert int(snap.bytes(site, B, 5)) == per_slot * 5  # a prompt shorter than the budget keeps everything
    ratio = Site(H, HKV, D, D, SCALE, torch.float32, "cpu", {**SNAP, "budget": 0, "ratio": 0.25})
    assert int(snap.bytes(ratio, B, 1000)) == per_slot * 250
    think = Site(H, HKV, D, D, SCALE, torch.float32, "cpu", THINK)
    kept = POLICIES["channels"].bytes(think, B, 1000)
    assert int(kept) == B * 1000 * (HKV * (D // 2 + D) * 4 + 1) + B * HKV * (D // 2) * 8
    assert kept < full.bytes(think, B, 1000)
    _, state, _ = _run("channels", {**THINK}, N - 2, dtype=torch.float32)
    held = sum(t[..., :N].numel() * t.element_size() if t.dim() == 2 else
               (t[:, :, :N].numel() if t.dim() == 4 else t.numel()) * t.element_size() for t in state)
    assert held == int(POLICIES["channels"].bytes(think, B, N))


# --------------------------------------------------------------------------- on a Hugging Face model

@pytest.fixture(scope="module")
def llama():
    import transformers as tf

    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=256)).eval()


def _opt(model, step, ids):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return attnforge.optimize(model, {"steps": [step]}, (ids,))


@pytest.mark.parametrize("step", [{"rewrite": "snapkv", "params": {"budget": 40, "window": 8}},
                                  {"rewrite": "snapkv", "params": {"budget": 1.0, "window": 8}},
                                  {"rewrite": "think", "params": {"ratio": 0.0, "window": 8}}])
def test_a_budget_that_covers_the_prompt_generates_hugging_faces_tokens(llama, step):
    ids = torch.randint(3, 100, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    opt = _opt(llama, step, ids[:1])
    want = llama.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(opt.generate(ids, attention_mask=mask, max_new_tokens=8), want)


def test_compressing_changes_decode_not_the_prompt(llama):
    """Below the prompt length the prompt's logits stay the original's (the forward pass is exact), the report
    says what was kept and measures the window's error, and the cache is smaller."""
    ids = torch.randint(3, 100, (1, 32), generator=torch.Generator().manual_seed(2))
    snap = _opt(llama, {"rewrite": "snapkv", "params": {"budget": 12, "window": 4}}, ids)
    think = _opt(llama, {"rewrite": "think", "params": {"ratio": 0.5, "window": 4}}, ids)
    for opt in (snap, think):
        torch.testing.assert_close(opt(ids).logits, llama(ids).logits, rtol=1e-5, atol=1e-5)
        site = opt.report.sites[0]
        assert site.status == "applied" and site.info["window_error_rel"] > 0
    assert snap.report.sites[0].info["kept_at_n"] == 12
    assert think.report.sites[0].info["kept_channels"] == 8
    full = 2 * 2 * 32 * (2 * 16 * 4 + 1)  # 2 layers, 2 KV heads, 32 tokens of fp32 keys and values, a flag
    assert snap.kv_cache_bytes(1, 32) == 2 * 2 * 12 * (2 * 16 * 4 + 1) < full
    assert think.kv_cache_bytes(1, 32) < full


@pytest.mark.parametrize("step,field", [
    ({"rewrite": "snapkv", "params": {"budget": 0}}, "budget"),
    ({"rewrite": "snapkv", "params": {"budget": -4}}, "budget"),
    ({"rewrite": "snapkv", "params": {"budget": 1.5}}, "budget"),
    ({"rewrite": "snapkv", "params": {"budget": 0.0}}, "budget"),
    ({"rewrite": "snapkv", "params": {"budget": 8, "window": 16}}, "budget"),
    ({"rewrite": "snapkv", "params": {"budget": 0.5, "kernel": 4}}, "kernel"),
    ({"rewrite": "snapkv", "params": {"budget": 64, "window": 40}}, "window"),
    ({"rewrite": "think", "params": {"ratio": 1.0}}, "ratio"),
    ({"rewrite": "think", "params": {"ratio": -0.1}}, "ratio"),
    ({"rewrite": "think", "params": {"ratio": 0.5, "window": 40}}, "window"),
])
def test_bad_params_are_recipe_errors_naming_the_field(llama, step, field):
    ids = torch.randint(3, 100, (1, 20))
    with pytest.raises(RecipeError, match=field):
        _opt(llama, step, ids)


@pytest.mark.parametrize("step", [{"rewrite": "snapkv", "params": {"budget": 66}},  # window 64 (the default)
                                  {"rewrite": "think", "params": {"ratio": 0.5}}])  # window 32
def test_default_windows_generate_from_a_prompt_longer_than_them(llama, step):
    """The window check judges the user's example, not generation's own short capture of the model; a prompt
    longer than the window compresses (snapkv keeps 66 of 70 keys), one shorter keeps everything."""
    ids = torch.randint(3, 100, (1, 70), generator=torch.Generator().manual_seed(4))
    opt = _opt(llama, step, ids)
    out = opt.generate(ids, max_new_tokens=3)
    assert out.shape == (1, 73)
    short = torch.randint(3, 100, (1, 10))
    want = llama.generate(short, max_new_tokens=4, do_sample=False)
    assert torch.equal(opt.generate(short, max_new_tokens=4), want)  # 10 tokens: below either window, exact
    if step["rewrite"] == "snapkv":
        assert opt.kv_cache_bytes(1, 70) == 2 * 2 * 66 * (2 * 16 * 4 + 1)
