"""``streaming_heads`` (DuoAttention: retrieval heads keep every key, streaming heads sinks + a window), end to end.

References written here, independently of runtime/streaming_heads/: per head, exact attention's reference or the
sliding window's (a retrieval head is exact attention, a streaming head is ``sliding_window_attention``); the
score method's definition as loops over (head, query, key); the cache's decode against the op's dense reference
over the whole sequence (as tests/test_cache.py does for every policy); on a tiny Hugging Face Llama: the report's
map, the map fed back, ratio 1 = Hugging Face's ``generate``, the decode contract, an onnxruntime greedy loop."""
from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import attnforge
from attnforge import RecipeError
from attnforge.runtime import VARIANTS
from attnforge.runtime.attention import cache as full_cache
from attnforge.runtime.cache import POLICIES, VARIANT as CACHED, Site
from attnforge.runtime.dispatch import use_backend

OP = VARIANTS["streaming_heads_attention"]
EXACT, WINDOW = VARIANTS["attention"], VARIANTS["sliding_window_attention"]
B, H, HKV, N, D = 2, 4, 2, 23, 16
SCALE = D ** -0.5
PAD = 3  # row 1 is left-padded by 3 tokens
W, S = 5, 2  # window, sinks
MAPS = {"mixed": (True, False), "mixed_other": (False, True), "retrieval": (True, True), "streaming": (False, False)}


def _inputs(dtype=torch.float64, n=N, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, n, D, dtype=dtype, generator=gen)
    k, v = (torch.randn(B, HKV, n, D, dtype=dtype, generator=gen) for _ in range(2))
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[1, :PAD] = False
    return q, k, v, valid


def _padding(valid, dtype=torch.float64):
    """The key padding as an additive [B, 1, N, N] mask (the op adds causality)."""
    n = valid.shape[1]
    return torch.zeros(B, 1, n, n, dtype=dtype).masked_fill(~valid[:, None, None, :], -math.inf)


def _per_head(q, k, v, mask, flags, causal):
    """Query head h: exact attention's reference if its KV head h // 2 is a retrieval head, else the sliding
    window's reference."""
    exact = EXACT.reference(q, k, v, mask, SCALE, causal, 0.0)
    band = WINDOW.reference(q, k, v, mask, SCALE, W, S, causal)
    pick = torch.tensor([flags[h // (H // HKV)] for h in range(H)])[None, :, None, None]
    return torch.where(pick, exact, band)


# --------------------------------------------------------------------------- the op


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", sorted(MAPS))
def test_the_op_is_exact_attention_on_retrieval_heads_and_the_window_on_streaming_heads(name, causal):
    q, k, v, valid = _inputs()
    mask = _padding(valid)
    flags = list(MAPS[name])
    want = _per_head(q, k, v, mask, flags, causal)
    ref = OP.reference(q, k, v, mask, SCALE, flags, W, S, causal)
    got = OP.op(q, k, v, mask, SCALE, flags, W, S, causal)  # the PyTorch kernel
    real = valid[:, None, :, None].expand_as(want)
    torch.testing.assert_close(ref[real], want[real], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[real], want[real], rtol=1e-10, atol=1e-10)
    if name == "retrieval":
        torch.testing.assert_close(got, EXACT.op(q, k, v, mask, SCALE, causal, 0.0), rtol=1e-12, atol=1e-12)
    if name == "streaming":
        torch.testing.assert_close(got, WINDOW.op(q, k, v, mask, SCALE, W, S, causal), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sinks", [0, S])
def test_gradients_through_the_op_equal_gradients_through_the_definition(sinks):
    q, k, v, _ = _inputs(n=11)
    up = torch.randn(B, H, 11, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    copies = [x.clone().requires_grad_() for x in (q, k, v)]
    (OP.op(*leaves, None, SCALE, [True, False], W, sinks, True) * up).sum().backward()
    exact = EXACT.reference(*copies, None, SCALE, True, 0.0)
    band = WINDOW.reference(*copies, None, SCALE, W, sinks, True)
    (torch.cat([exact[:, :2], band[:, 2:]], 1) * up).sum().backward()
    for a, b in zip(leaves, copies):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10)


def _triton_available():
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set")


def test_the_triton_kernels_equal_the_reference_in_the_interpreter():
    _triton_available()
    q, k, v, valid = _inputs(torch.float32, n=19)
    mask = _padding(valid, torch.float32)
    for flags in ([True, False], [False, True]):
        args = (q, k, v, mask, SCALE, flags, W, S, True)
        assert OP.supports(*args)
        with use_backend("triton"):
            got = OP.op(*args)
        want = OP.reference(*(x.double() if isinstance(x, torch.Tensor) else x for x in args))
        real = valid[:, None, :, None].expand_as(got)
        torch.testing.assert_close(got[real].double(), want[real], rtol=2e-4, atol=2e-5)


# --------------------------------------------------------------------------- the cache policy


def _site(flags, dtype=torch.float64):
    return Site(H, HKV, D, D, SCALE, dtype, "cpu", {"retrieval": tuple(flags), "window": W, "sinks": S})


def _decode(flags, q, k, v, valid, prompt, backend="torch"):
    """Outputs [B, H, N, D] of a prefill of ``prompt`` tokens and one decode step per remaining token."""
    policy, site = POLICIES["streaming"], _site(flags, q.dtype)
    params = site.params
    state = policy.allocate(site, B, prompt)
    packed = policy.pack(params)
    assert policy.unpack(*packed) == params

    def run(s, e):
        nonlocal state
        state = policy.grow(state, e)
        return CACHED.op(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], state, valid[:, s:e], s, SCALE, "streaming",
                         *packed)

    outs = [run(0, prompt)]
    with use_backend(backend):
        outs += [run(t, t + 1) for t in range(prompt, q.shape[2])]
    return torch.cat(outs, 2), state


@pytest.mark.parametrize("prompt", [1, 9, N - 1])
@pytest.mark.parametrize("name", sorted(MAPS))
def test_prefill_then_decode_equals_the_ops_dense_reference(name, prompt):
    q, k, v, valid = _inputs()
    flags = MAPS[name]
    got, state = _decode(flags, q, k, v, valid, prompt)
    want = OP.reference(q, k, v, valid[:, None, None, :], SCALE, list(flags), W, S, True)
    real = valid[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[real], want[real], rtol=1e-9, atol=1e-10)
    retrieval = sum(flags)
    assert state[0].shape[1] == retrieval and state[3].shape[1] == HKV - retrieval  # each part holds its heads only
    assert state[3].shape[2] == (S + W if retrieval < HKV else 0)  # the ring: constant


def test_the_retrieval_heads_cache_grows_in_chunks(monkeypatch):
    monkeypatch.setattr(full_cache, "GROW", 4)
    q, k, v, valid = _inputs()
    flags = (False, True)
    policy, site = POLICIES["streaming"], _site(flags)
    state = policy.allocate(site, B, 5)
    sizes = set()
    for s, e in [(0, 5)] + [(t, t + 1) for t in range(5, N)]:
        state = policy.grow(state, e)
        sizes.add((state[0].shape[2], state[3].shape[2]))
        CACHED.op(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], state, valid[:, s:e], s, SCALE, "streaming",
                  *policy.pack(site.params))
    assert sizes == {(c, S + W) for c in (8, 12, 16, 20, 24)}  # the full part grows 4 at a time, the ring never


def test_the_state_holds_the_bytes_of_the_formula_and_less_than_a_full_cache():
    policy, full = POLICIES["streaming"], POLICIES["full"]
    for dtype in (torch.float32, torch.float16):
        item = torch.empty(0, dtype=dtype).element_size()
        for flags in MAPS.values():
            site = _site(flags, dtype)
            state = policy.allocate(site, B, 256)
            held = sum(t.numel() * t.element_size() for t in state)
            r = sum(flags)
            context = state[0].shape[2] if r else 256
            formula = B * context * (r * 2 * D * item + 1) * (r > 0) + \
                B * (S + W) * ((HKV - r) * 2 * D * item + 8 + 1) * (r < HKV)  # keys + values, flags, positions
            assert int(policy.bytes(site, B, context)) == held == formula, flags
            exact = Site(H, HKV, D, D, SCALE, dtype, "cpu", {})
            if r < HKV:
                assert policy.bytes(site, 1, 4096) < full.bytes(exact, 1, 4096)
            else:
                assert policy.bytes(site, 1, 4096) == full.bytes(exact, 1, 4096)


@pytest.mark.parametrize("prompt", [1, 9, N - 1])
@pytest.mark.parametrize("name", sorted(MAPS))
def test_the_exported_functional_step_equals_the_reference(name, prompt):
    """The step an ONNX decode graph is made of: past state in, present out, the mask over past and current
    tokens (optimum's convention), from the initial state."""
    q, k, v, valid = _inputs()
    flags = MAPS[name]
    policy, site = POLICIES["streaming"], _site(flags)
    state = policy.initial(site, B)
    assert [t.shape[2] for t in state[:2]] == [0, 0]  # the retrieval heads' past starts empty
    outs = []
    for s, e in [(0, prompt)] + [(t, t + 1) for t in range(prompt, N)]:
        out, state = policy.step(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], state, valid[:, :e], site)
        outs.append(out)
    got = torch.cat(outs, 2)
    want = OP.reference(q, k, v, valid[:, None, None, :], SCALE, list(flags), W, S, True)
    real = valid[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[real], want[real], rtol=1e-9, atol=1e-10)
    assert state[0].shape[1:3] == (sum(flags), N if sum(flags) else 0)
    assert [tuple(t.shape) for t in state[2:]] == [tuple(t.shape) for t in policy.initial(site, B)[2:]]


def test_decode_on_the_triton_split_kv_kernel_equals_the_reference():
    _triton_available()
    from attnforge.codegen import attention as codegen

    q, k, v, valid = _inputs(torch.float32)
    calls = []
    real_decode = codegen.decode_triton
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(codegen, "decode_triton", lambda *a, **kw: calls.append(1) or real_decode(*a, **kw))
        got, _ = _decode((True, False), q, k, v, valid, N - 3, backend="triton")
    assert len(calls) == 6  # per decode step: one launch over the retrieval heads' keys, one over the ring
    want = OP.reference(*(x.double() for x in (q, k, v)), valid[:, None, None, :], SCALE, [True, False], W, S, True)
    real = valid[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[real].double(), want[real], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- choosing the heads


def _planted(n=32, batch=1, seed=0):
    """q [batch, 4, n, 16], k, v [batch, 2, n, 16]: KV head 0's queries all look up one far key (position 6, a
    needle), KV head 1's queries each look at their own key (local)."""
    gen = torch.Generator().manual_seed(seed)
    d = 16
    k = torch.randn(batch, 2, n, d, generator=gen) * 0.1
    u = F.normalize(torch.randn(d, generator=gen), dim=0)
    k[:, 0, 6] = u
    q = torch.empty(batch, 4, n, d)
    q[:, :2] = 6 * math.sqrt(d) * u + 0.1 * torch.randn(batch, 2, n, d, generator=gen)
    k[:, 1] = F.normalize(torch.randn(batch, n, d, generator=gen), dim=-1)
    q[:, 2:] = 10 * math.sqrt(d) * k[:, 1:2]
    v = torch.randn(batch, 2, n, d, generator=gen)
    return q, k, v


def test_the_score_is_the_attention_mass_outside_the_band_written_pair_by_pair(monkeypatch):
    from attnforge.passes import streaming_heads

    n, w, s = 10, 3, 1
    q, k, _, valid = _inputs(n=n, seed=4)
    mask = _padding(valid)
    got = streaming_heads.retrieval_scores(q, k, mask, SCALE, w, s, True)
    from attnforge.runtime.streaming_heads import choose

    monkeypatch.setattr(choose, "ROWS", 3)  # scored 3 query rows at a time: the same
    torch.testing.assert_close(streaming_heads.retrieval_scores(q, k, mask, SCALE, w, s, True), got)
    want = []
    for g in range(HKV):
        masses = []
        for b in range(B):
            for h in (2 * g, 2 * g + 1):
                for i in range(n):
                    seen = [j for j in range(i + 1) if valid[b, j]]
                    if i not in seen:
                        continue  # a padding query
                    outside = [j for j in seen if not (0 <= i - j < w or j < s)]
                    if not outside:
                        continue  # the band holds every key it sees: nothing to lose
                    logits = {j: float(q[b, h, i] @ k[b, g, j]) * SCALE for j in seen}
                    top = max(logits.values())
                    total = sum(math.exp(x - top) for x in logits.values())
                    masses.append(sum(math.exp(logits[j] - top) for j in outside) / total)
        want.append(sum(masses) / len(masses))
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_the_score_picks_the_head_that_attends_far():
    from attnforge.passes.streaming_heads import retrieval_scores, top

    q, k, _ = _planted()
    scores = retrieval_scores(q, k, None, 0.25, 4, 1, True)
    assert scores[0] > 0.8 and scores[1] < 0.1, scores
    assert top(scores, 1) == [0]


def test_the_trained_gates_pick_the_same_planted_head():
    from attnforge.passes.streaming_heads import L1, streaming_distortion, top, train_gates

    q, k, v = _planted()
    d = streaming_distortion(q, k, v, None, 0.25, 4, 1, True)
    gates, logits, _ = train_gates(d)
    o_full = OP.reference(q, k, v, None, 0.25, [True, True], 4, 1, True)  # D from its definition
    o_stream = OP.reference(q, k, v, None, 0.25, [False, False], 4, 1, True)
    err = ((o_stream - o_full) ** 2).sum(-1).mean((0, 2)).unflatten(0, (2, 2)).mean(1)
    torch.testing.assert_close(d.float(), err / (o_full ** 2).sum(-1).mean(), rtol=1e-4, atol=1e-7)
    assert d[0] > 10 * d[1] and gates[0] > gates[1]
    assert top(logits, 1) == [0]
    optimum = (1 - L1 / (2 * d)).clamp(0, 1)  # the closed form of the per-head objective
    torch.testing.assert_close(gates[optimum > 0.05].double(), optimum[optimum > 0.05].double(), atol=2e-3, rtol=0)


class _Core(torch.nn.Module):
    """A bare GQA attention core (4 query heads over 2 KV heads) whose q, k, v are the inputs."""

    def forward(self, q, k, v):
        b, h, n, d = k.shape
        k, v = (x[:, :, None].expand(b, h, 2, n, d).reshape(b, 2 * h, n, d) for x in (k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("method", ["score", "optimize"])
def test_the_pass_chooses_the_planted_retrieval_head(method):
    q, k, v = _planted()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = attnforge.optimize(_Core(), {"steps": [{"rewrite": "streaming_heads", "params": {
            "ratio": 0.5, "window": 4, "sinks": 1, "method": method}}]}, (q, k, v))
    (site,) = opt.report.sites
    assert site.status == "applied" and site.info["chosen_by"] == method
    assert site.info["retrieval"] == [0] and site.info["streaming"] == [1]
    assert ("scores" if method == "score" else "gates") in site.info
    with torch.no_grad():
        want = OP.reference(q, k, v, None, 0.25, [True, False], 4, 1, True)
        torch.testing.assert_close(opt(q, k, v), want, rtol=1e-5, atol=1e-5)


def test_the_rewritten_graph_exports_to_onnx_and_runs_in_onnxruntime(tmp_path):
    """The op's ONNX translation (a per-head keep into MatMul/Where/Softmax), at another length than the example."""
    ort = pytest.importorskip("onnxruntime")
    from attnforge.runtime.onnx import export_onnx

    q, k, v = _planted()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = attnforge.optimize(_Core(), {"steps": [{"rewrite": "streaming_heads", "params": {
            "retrieval": {"": [1]}, "window": 4, "sinks": 1}}]}, (q, k, v))
        path = export_onnx(opt.graph_module, (q, k, v), {}, tmp_path / "core.onnx")
    q, k, v = (torch.randn(2, x.shape[1], 40, 16) for x in (q, k, v))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, dict(zip([i.name for i in session.get_inputs()], (q.numpy(), k.numpy(), v.numpy()))))
    want = OP.reference(q, k, v, None, 0.25, [False, True], 4, 1, True)
    torch.testing.assert_close(torch.from_numpy(got[0]), want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- a Hugging Face model, end to end

VOCAB, LENGTH = 100, 24
PARAMS = {"window": 12, "sinks": 2}  # longer than the 8 tokens generation captures its program on: the map is kept


def _llama(layers=1):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                               num_hidden_layers=layers, num_attention_heads=4,
                                               num_key_value_heads=2, max_position_embeddings=256)).eval()
    model.generation_config.eos_token_id = None  # every step runs
    return model


def _prompt(batch=2, length=12, pad=4, seed=3):
    ids = torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :pad] = 0
        ids[1, :pad] = 0
    return ids, mask


def _optimize(model, params, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return attnforge.optimize(model, {"steps": [{"rewrite": "streaming_heads", "params": params}]},
                                  (_prompt(1, LENGTH, seed=1)[0],), **kw)


@pytest.fixture(scope="module")
def llama():
    """One layer (4 query heads over 2 KV heads), half its KV heads retrieval heads, chosen by score."""
    model = _llama(layers=1)
    return model, _optimize(model, {"ratio": 0.5, **PARAMS})


def test_the_report_has_the_map_and_the_cache_is_smaller(llama):
    from attnforge.passes.streaming_heads import retrieval_map

    _, opt = llama
    sites = [s for s in opt.report.sites if s.rewrite == "streaming_heads"]
    assert [s.status for s in sites] == ["applied"]
    for s in sites:
        assert len(s.info["retrieval"]) == 1 and sorted(s.info["retrieval"] + s.info["streaming"]) == [0, 1]
        assert len(s.info["scores"]) == 2 and s.error is not None
        assert s.info["kv_bytes_before"] == "257*N" and s.info["kv_bytes_after"] == "129*N + 1918"
    assert set(retrieval_map(opt.report)) == {"model.layers.0.self_attn"}
    assert opt.report.decode["passed"] and opt.report.decode["policies"] == ["streaming"], opt.report.decode
    # per position: 1 retrieval KV head × (key + value) × fp32 + a flag; 14 ring slots: key, value, position, flag
    assert opt.report.kv_cache["before"] == "257*N" and opt.report.kv_cache["total"] == "129*N + 1918"
    assert opt.kv_cache_bytes(1, 4096) == 4096 * 129 + 14 * (32 * 4 + 9) < 0.51 * 4096 * 257


def test_the_map_fed_back_gives_the_same_model(llama):
    from attnforge.passes.streaming_heads import retrieval_map

    model, opt = llama
    again = _optimize(model, {"retrieval": retrieval_map(opt.report), **PARAMS}, check_decode=False)
    assert [s.info["chosen_by"] for s in again.report.sites] == ["retrieval map"]
    assert retrieval_map(again.report) == retrieval_map(opt.report)
    ids, _ = _prompt(2, 20)  # the call form both were captured on (input_ids): no new capture
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, opt(ids).logits, rtol=0, atol=0)


def test_the_decode_contract_holds_for_a_mixed_map(llama):
    from attnforge.generate import check_decode, decoder_for
    from attnforge.passes.streaming_heads import retrieval_map

    _, opt = llama
    ids, mask = _prompt(2, 20)
    got = check_decode(opt, ids, mask, steps=6)  # decoding past sinks + window: the ring wraps
    assert got["passed"] and got["max_abs"] <= 1e-4 and got["policies"] == ["streaming"], got
    decoder = decoder_for(opt, ids)  # generation's own program (captured on 8 tokens) kept the report's map
    chosen = retrieval_map(opt.report)["model.layers.0.self_attn"]
    assert [s.site.params["retrieval"] for s in decoder.graph.sites] == [tuple(i in chosen for i in range(2))]


def test_ratio_one_generates_hugging_faces_tokens(llama):
    model, _ = llama
    opt = _optimize(model, {"ratio": 1.0, **PARAMS}, check_decode=False)
    assert [(s.info["retrieval"], s.info["streaming"]) for s in opt.report.sites] == [([0, 1], [])]
    ids, mask = _prompt(2, 12)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    got = opt.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0)
    assert torch.equal(got, want)


def test_an_onnxruntime_greedy_loop_reproduces_generate(llama, tmp_path):
    """The exported decode step (each retrieval head's keys grow as optimum's past, each streaming head's ring is
    fixed) in a numpy + onnxruntime greedy loop: a left-padded batch of 2, decoding past the window."""
    pytest.importorskip("onnxruntime")
    from attnforge.generate import export_decode_onnx, onnx_greedy

    _, opt = llama
    layout = export_decode_onnx(opt, tmp_path)
    assert [layer["policy"] for layer in layout["layers"]] == ["streaming"]
    state = {s["name"].rsplit(".", 1)[1]: s["shape"] for s in layout["layers"][0]["state"]}
    assert state["key"] == ["batch", 1, "past", 16] and state["ring_key"] == ["batch", 1, 14, 16]
    ids, mask = _prompt(2, 12)
    want = opt.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0)
    got, _ = onnx_greedy(tmp_path, ids, mask, 12)
    assert torch.equal(got, want)


@pytest.mark.parametrize("params, field", [
    ({"ratio": 1.5}, "steps[0].params.ratio"),
    ({"ratio": -0.1}, "steps[0].params.ratio"),
    ({"ratio": 0.5, "window": 0}, "steps[0].params.window"),
    ({"ratio": 0.5, "sinks": -1}, "steps[0].params.sinks"),
    ({"ratio": 0.5, "method": "train"}, "steps[0].params.method"),
    ({"ratio": 0.5, "windw": 8}, "steps[0].params.windw"),
    ({"retrieval": {"model.layers.0.self_attn": [True]}}, "steps[0].params.retrieval"),
])
def test_bad_params_are_refused_before_anything_runs(params, field):
    with pytest.raises(RecipeError) as e:
        attnforge.optimize(torch.nn.Linear(2, 2), {"steps": [{"rewrite": "streaming_heads", "params": params}]},
                           (torch.randn(1, 2),))
    assert e.value.field.startswith(field), e.value


@pytest.mark.parametrize("params, field, match", [
    ({"ratio": 0.5, "window": 33}, "window", "longer than the example prompt"),
    ({"window": 4, "retrieval": {"model.layers.7.self_attn": [0]}}, "retrieval", "not an attention site"),
    ({"window": 4, "retrieval": {"": [2]}}, "retrieval", "out of range"),
    ({"window": 4, "retrieval": {"": [1, 1]}}, "retrieval", "listed twice"),
])
def test_params_that_do_not_fit_the_model_name_the_field(params, field, match):
    q, k, v = _planted()  # 32 tokens, one site (the root module), 2 KV heads
    with warnings.catch_warnings(), pytest.raises(RecipeError, match=match) as e:
        warnings.simplefilter("ignore")
        attnforge.optimize(_Core(), {"steps": [{"rewrite": "streaming_heads", "params": params}]}, (q, k, v))
    assert e.value.field == f"steps[0].params.{field}"
