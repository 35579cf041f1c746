"""The autotuning cache (codegen/autotune.py): keys, concurrent writers, corrupt files, lookups that never fail, and
real tuning of the CPU sliding-window and linear kernels."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

from attnforge.codegen import autotune
from attnforge.codegen.autotune import Cache, Tunable, lookup, make_key, source_hash, tune
from attnforge.runtime import variant
from attnforge.runtime.linear import cpu as linear_cpu
from attnforge.runtime.sliding_window import cpu as window_cpu
from test_sparse import masked_softmax_reference, visible_plain


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """Point $ATTNFORGE_CACHE_DIR at a fresh folder: tests never touch the user's cache."""
    monkeypatch.setenv(autotune.ENV, str(tmp_path))
    return tmp_path


def key(name="k", shape="n=64"):
    return make_key(name, "abc", torch.float32, shape, "cpu")


def test_key_names_what_the_answer_depends_on():
    k = key()
    text = str(k)
    assert torch.__version__ in text and k.triton in text and "float32" in text and "n=64" in text
    assert k.capability == f"cpu/{torch.get_num_threads()}threads"
    assert str(key(shape="n=128")) != text and str(make_key("k", "abd", torch.float32, "n=64", "cpu")) != text
    assert autotune.bucket(1) == 1 and autotune.bucket(1000) == 1024 and autotune.bucket(1024) == 1024


def test_key_changes_when_the_kernel_source_changes():
    from attnforge.codegen import attention

    a = attention.AttentionSpec(mask="causal", head_dim=32)
    b = attention.AttentionSpec(mask="causal", head_dim=32, softcap=30.0)  # a different generated source
    q = torch.randn(1, 2, 64, 32)
    assert attention._key(a, 64, 64, "cpu") != attention._key(b, 64, 64, "cpu")
    assert attention._key(a, 64, 64, "cpu").source == source_hash(attention.source(a))
    # a CPU kernel's key hashes its functions' source: an edited function is a different kernel
    import inspect

    texts = [inspect.getsource(f) for f in (window_cpu.sliding_window_cpu, window_cpu._windows, window_cpu._slab,
                                             window_cpu._with_sinks)]
    assert window_cpu.window_key(q, 16).source == window_cpu._source() == source_hash(*texts)
    edited = texts[2].replace("k0, k1 = max(0, r0 - window + 1)", "k0, k1 = max(0, r0 - window)")
    assert edited != texts[2]
    texts[2] = edited
    assert source_hash(*texts) != window_cpu._source()


def test_put_get_round_trip_and_file_layout(cache_dir):
    c = Cache()
    assert c.path == cache_dir / "autotune.json" and c.entries() == {}
    c.put(key(), {"config": {"block": 32}, "ms": 1.0})
    c.put(key("other"), {"config": {"block": 16}, "ms": 2.0})
    data = json.loads(c.path.read_text())
    assert data["format"] == autotune.FORMAT and set(data["entries"]) == {str(key()), str(key("other"))}
    assert Cache().get(key())["config"] == {"block": 32}  # a fresh reader sees it
    assert lookup(key(), {"block": 64, "extra": 1}) == {"block": 32, "extra": 1}
    assert lookup(key("missing"), {"block": 64}) == {"block": 64}
    assert not list(cache_dir.glob(".autotune.*.tmp"))  # no temporary files left behind


WRITER = textwrap.dedent("""
    import sys, torch
    from attnforge.codegen.autotune import Cache, make_key
    c = Cache(sys.argv[1])
    for i in range(int(sys.argv[3])):
        c.put(make_key(f"w{sys.argv[2]}", "src", torch.float32, f"n={i}", "cpu"), {"config": {"i": i}, "ms": 1.0})
""")


def test_concurrent_tuners_lose_no_entry(tmp_path):
    """Four processes write 25 entries each into one file at the same time: all 100 survive, the file parses."""
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(w), "25"]) for w in range(4)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    entries = Cache(tmp_path).entries()
    assert len(entries) == 100
    assert {e["config"]["i"] for e in entries.values()} == set(range(25))


@pytest.mark.parametrize("damage", ["truncated", "not_a_cache", "old_format"])
def test_a_corrupt_file_is_set_aside_and_rebuilt(cache_dir, damage):
    c = Cache()
    c.put(key(), {"config": {"block": 32}, "ms": 1.0})
    good = c.path.read_text()
    bad = {"truncated": good[: len(good) // 2], "not_a_cache": "[1, 2, 3]",
           "old_format": json.dumps({"format": 0, "entries": {}})}[damage]
    c.path.write_text(bad)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert Cache().entries() == {}
    aside = list(cache_dir.glob("autotune.corrupt-*.json"))
    assert len(aside) == 1 and aside[0].read_text() == bad  # kept for the user, not deleted
    assert not c.path.exists()
    c.put(key(), {"config": {"block": 16}, "ms": 1.0})  # rebuilt
    assert Cache().get(key())["config"] == {"block": 16}


def test_put_over_a_corrupt_file_keeps_the_new_entry(cache_dir):
    (cache_dir / "autotune.json").write_text("{not json")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        Cache().put(key(), {"config": {"block": 8}, "ms": 1.0})
    assert Cache().get(key())["config"] == {"block": 8}


def test_lookups_never_fail_the_model(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(autotune.ENV, str(blocker / "sub"))  # a cache dir that cannot exist
    with pytest.warns(RuntimeWarning, match="cannot use the autotune cache .*in memory only"):
        assert lookup(key("unique-to-this-test"), {"block": 64}) == {"block": 64}
    monkeypatch.setenv(autotune.ENV, str(tmp_path))
    (tmp_path / "autotune.json").write_text(json.dumps({"format": 1, "entries": {str(key()): {"no": "config"}}}))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert lookup(key(), {"block": 64}) == {"block": 64}
    # and the op still runs on the default
    q = torch.randn(1, 2, 40, 16)
    out = torch.ops.attnforge.sliding_window_attention(q, q, q, None, 0.3, 8, 2, True)
    torch.testing.assert_close(out, masked_softmax_reference(q, q, q, visible_plain(40, 8, 2, True), 0.3),
                               rtol=1e-4, atol=1e-5)


def test_a_file_replaced_during_a_read_is_read_again(cache_dir, monkeypatch):
    """Another tuner replaces the file between a reader's read and its stat: the reader must not keep the old
    entries under the new file's identity (it would never see the new entry)."""
    Cache().put(key("a"), {"config": {"x": 1}, "ms": 1.0})
    reader, real = Cache(), Cache._read

    def read_then_another_tuner_writes(self):
        entries = real(self)
        monkeypatch.setattr(Cache, "_read", real)
        Cache().put(key("b"), {"config": {"x": 2}, "ms": 1.0})
        return entries

    monkeypatch.setattr(Cache, "_read", read_then_another_tuner_writes)
    assert reader.get(key("b")) is None  # this read predates b
    assert reader.get(key("b"))["config"] == {"x": 2}  # the next one sees it


def test_a_key_that_cannot_be_made_costs_the_default():
    def broken_key():
        raise OSError("could not get source code")

    with pytest.warns(RuntimeWarning, match="could not get source code"):
        assert lookup(broken_key, {"block": 64}) == {"block": 64}


def _sleeper(ms_by_config):
    return lambda c: time.sleep(ms_by_config[c["x"]] / 1e3)


def test_tune_keeps_the_fastest_config_and_stores_it(cache_dir):
    times = {0: 6.0, 1: 1.0, 2: 3.0}
    t = Tunable(key(), {"x": 0}, [{"x": 0}, {"x": 1}, {"x": 2}, {"x": 3}], lambda c: (
        (_ for _ in ()).throw(RuntimeError("out of resources")) if c["x"] == 3 else _sleeper(times)(c)))
    seen = []
    r = tune(t, reps=3, on_config=lambda done, total: seen.append((done, total)))
    assert r.best == {"x": 1} and r.tried == 3 and r.complete and r.speedup > 3
    assert len(r.failed) == 1 and "out of resources" in r.failed[0]
    assert seen[-1] == (4, 4)
    entry = Cache().get(t.key)
    assert entry["config"] == {"x": 1} and entry["default"] == {"x": 0} and entry["default_ms"] > entry["ms"]
    assert lookup(t.key, {"x": 0}) == {"x": 1}


def test_the_budget_stops_the_search_but_the_default_is_always_timed(cache_dir):
    t = Tunable(key(), {"x": 0}, [{"x": i} for i in range(10)], _sleeper({i: 20.0 for i in range(10)}))
    r = tune(t, budget_s=0.05, reps=1)
    assert not r.complete and 1 <= r.tried < 10 and r.default_ms == r.default_ms  # not NaN


def test_cpu_autotune_finds_configs_for_the_window_and_linear_kernels(cache_dir, monkeypatch):
    """The real tuners on this machine: a winner from the search space lands in the cache, and the op then runs
    with it and still computes the same attention."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 512, 32), torch.randn(1, 2, 512, 32), torch.randn(1, 2, 512, 32)
    args = (q, k, v, None, 0.2, 64, 4, True)
    (tw,) = tunables_for("sliding_window_attention", args, "cpu", "torch")
    r = tune(tw, reps=2)
    assert r.best in tw.space and r.tried == len(tw.space)

    used = []
    real = window_cpu.lookup
    monkeypatch.setattr(window_cpu, "lookup", lambda *a, **kw: used.append(real(*a, **kw)) or used[-1])
    out = torch.ops.attnforge.sliding_window_attention(*args)
    assert used == [r.best]
    want = masked_softmax_reference(q, k, v, visible_plain(512, 64, 4, True), 0.2)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)

    largs = (q, k, v, None, 0.2, "elu", True, 0, 1e-6, None, None, None)
    (tl,) = tunables_for("linear_attention", largs, "cpu", "torch")
    r = tune(tl, reps=2)
    assert r.best in tl.space and Cache().get(tl.key)["config"] == r.best
    used = []
    real_lookup = linear_cpu.lookup
    monkeypatch.setattr(linear_cpu, "lookup", lambda *a, **kw: used.append(real_lookup(*a, **kw)) or used[-1])
    got = torch.ops.attnforge.linear_attention(*largs)
    assert used == [r.best]
    torch.testing.assert_close(got, linear_cpu.linear_attention_cpu(*largs, chunk=64), rtol=1e-4, atol=1e-5)


def tunables_for(op, args, device, backend):
    """The kernels one call of ``op`` runs, from its variant (runtime/registry.py)."""
    return variant(op).tunables_for(args, device, backend)


def test_triton_tunables_run_under_the_interpreter(cache_dir):
    pytest.importorskip("triton")
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    q = torch.randn(1, 2, 40, 16)
    (t,) = tunables_for("attention", (q, q, q, None, 0.3, True, 0.0), "cpu", "triton")
    t.space = t.space[:2]  # the interpreter's timings mean nothing; this checks the plumbing
    r = tune(t, reps=1)
    assert r.tried == 3 and Cache().get(t.key)["config"] == r.best
    (d,) = tunables_for("attention", (q[:, :, :1], q, q, None, 0.3, False, 0.0), "cpu", "triton")
    assert d.key.kernel.startswith("decode_") and "SPLIT" in d.default
    assert tunables_for("attention", (q, q, q, None, 0.3, True, 0.0), "cpu", "torch") == []  # SDPA: no tunables
