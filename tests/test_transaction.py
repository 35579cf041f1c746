"""Site transactions (passes/edit.py, passes/manager.py): a site rolled back leaves the graph and the module state
exactly as they were, whatever the pass changed; every pass has the one ``apply(edit, site, params)`` form."""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import attnforge
from attnforge.passes import REGISTRY, canonicalize
from attnforge.passes import gqa as gqa_pass
from attnforge.passes.base import RewritePass, SkipSite, register
from attnforge.passes.fuse_attention import match, needs
from attnforge.runtime.attention import VARIANT as ATTENTION
from conftest import build_hf


def _state(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_state(module: nn.Module, before: dict):
    after = module.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def _graph(gm) -> list:
    return [(n.name, n.op, str(n.target), str(n.args)) for n in gm.graph.nodes]


@pytest.fixture
def temporary_pass():
    """Register test-only passes, removed afterwards."""
    added = []

    def add(p: RewritePass) -> RewritePass:
        added.append(p.name)
        return register(p)

    yield add
    for name in added:
        REGISTRY.pop(name)


def _tamper(edit, site, params, *, skip: bool):
    """Change every kind of module state a pass can change, then return a wrong replacement (or give up)."""
    proj = site.proj.get("k_proj")
    edit.store(f"{proj}.weight", torch.zeros_like(edit.fetch(f"{proj}.weight")))  # replace a parameter
    edit.add_tensor(proj, "extra", torch.ones(3), trainable=True)                # a new parameter
    edit.add_tensor("", "scratch", torch.ones(2))                                # a new buffer
    edit.add_module(site.fqn, "helper", nn.Linear(2, 2))                         # a new submodule
    if skip:
        raise SkipSite("changed my mind")
    wrong = edit.replace_core(ATTENTION.op, site.scale * 3.0, site.sdpa_causal, 0.0)
    return edit.call(torch.ops.aten.mul.Tensor, (wrong, 2.0))


@pytest.mark.parametrize("skip", [False, True], ids=["fails-its-local-check", "skips-after-editing"])
def test_a_rolled_back_site_leaves_state_dict_and_graph_identical(temporary_pass, skip):
    temporary_pass(RewritePass(f"_tamper_{skip}", "attention", True, match,
                               lambda e, s, p: _tamper(e, s, p, skip=skip), needs))
    model, args, kwargs = build_hf("llama", "sdpa")
    captured = attnforge.capture(model, args, kwargs)
    canonicalize(captured.gm)
    gm = captured.gm
    before_state, before_graph = _state(gm), _graph(gm)
    opt = attnforge.optimize(model, {"steps": [{"rewrite": f"_tamper_{skip}"}]}, args, kwargs)
    assert [s.status for s in opt.report.sites] == ["skipped" if skip else "rolled_back"] * 2
    assert (not skip) or opt.report.sites[0].reason == "changed my mind"
    _assert_same_state(opt.graph_module, before_state)
    assert not hasattr(opt.graph_module, "scratch")
    assert not any(name.endswith("helper") for name, _ in opt.graph_module.named_modules())
    assert _graph(opt.graph_module) == before_graph
    with torch.no_grad():
        assert torch.equal(opt(*args, **kwargs)[0], model(*args, **kwargs)[0])


def test_a_gqa_site_that_fails_after_pooling_its_weights_is_put_back(monkeypatch):
    """gqa stores pooled K/V weights before its own check; a failure after that must restore them."""
    def fail(edit, site, ends, mix):
        raise SkipSite("forced failure after the weights were pooled")

    monkeypatch.setattr(gqa_pass, "_check", fail)
    model, args, kwargs = build_hf("llama", "sdpa")
    reference = attnforge.optimize(model, "fuse-attention", args, kwargs)
    opt = attnforge.optimize(model, {"steps": [{"rewrite": "gqa", "params": {"kv_heads": 1}}]}, args, kwargs)
    assert {s.status for s in opt.report.sites} == {"skipped"}
    assert set(opt.graph_module.state_dict()) == set(reference.graph_module.state_dict())
    _assert_same_state(opt.graph_module, _state(reference.graph_module))


def test_an_applied_site_keeps_its_edits():
    model, args, kwargs = build_hf("llama", "sdpa")
    opt = attnforge.optimize(model, {"steps": [{"rewrite": "gqa", "params": {"kv_heads": 1}}]}, args, kwargs)
    assert opt.report.counts() == {"gqa": 2}
    k = opt.graph_module.state_dict()["layers.0.self_attn.k_proj.weight"]
    assert k.shape[0] == model.config.head_dim  # one KV head left


def test_every_pass_has_the_one_apply_signature():
    for name, p in REGISTRY.items():
        params = list(inspect.signature(p.apply).parameters.values())
        required = [x for x in params if x.default is inspect.Parameter.empty]
        assert len(required) == 3, name
        assert len(inspect.signature(p.describe).parameters) >= 2, name
