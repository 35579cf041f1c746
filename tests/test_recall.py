"""attnforge/recall.py: the MQAR data, a tiny training run, the disk cache, recall measured through decode, and
``attnforge eval recall``'s argument checks. One tiny model (4 pairs, hidden 64) is trained once for the module,
for seconds: it answers about half the queries right (chance: 1/16), enough to see a window that hides the pairs
forget them."""
from __future__ import annotations

import contextlib
import io
import json
import stat

import pytest
import torch

import attnforge
from attnforge import recall

TINY = recall.Config(task=recall.Task(4, 4, 32), hidden=64, steps=150, tokens=2048, lr=3e-3)


def test_mqar_sequences():
    task = recall.Task(16, 8, 64)
    ids = recall.mqar(task, 32, seed=0)
    assert ids.shape == (32, task.context) == (32, 48)
    keys, values = ids[:, :task.prompt:2], ids[:, 1:task.prompt:2]
    assert bool((keys < 32).all()) and bool(((values >= 32) & (values < 64)).all())  # disjoint halves
    asked, answers = ids[:, task.query_positions()], recall.targets(task, ids)
    for b in range(len(ids)):
        table = dict(zip(keys[b].tolist(), values[b].tolist()))
        assert len(table) == task.pairs and len(set(asked[b].tolist())) == task.queries  # distinct, asked once
        assert [table[k] for k in asked[b].tolist()] == answers[b].tolist()  # the target is the pair's value
        assert torch.equal(ids[b, task.query_positions() + 1], answers[b])
    assert torch.equal(ids, recall.mqar(task, 32, seed=0))
    assert not torch.equal(ids, recall.mqar(task, 32, seed=1))
    held = recall.held_out_seed(TINY)
    assert not TINY.seed * recall.STREAM <= held < TINY.seed * recall.STREAM + TINY.steps  # no training batch's seed
    with pytest.raises(recall.RecallError, match="queries"):
        recall.Task(4, 5, 32)


def test_most_queries_are_far_from_their_pair():
    task = recall.config_for(256).task
    ids = recall.mqar(task, 64, seed=3)
    for b in range(len(ids)):
        where = {k: 2 * i for i, k in enumerate(ids[b, :task.prompt:2].tolist())}
        far = [t - where[int(ids[b, t])] >= 64 for t in task.query_positions().tolist()]
        assert sum(far) >= 0.75 * task.queries


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny model, trained into a private cache folder (the environment points there for the module)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNFORGE_CACHE_DIR", str(tmp_path_factory.mktemp("recall-cache")))
        before, threads = recall.TRAINED["count"], torch.get_num_threads()
        torch.set_num_threads(1)  # a model this small trains no faster on two threads, and slower on a busy machine
        try:
            model, info = recall.load_or_train(TINY, progress=False)
        finally:
            torch.set_num_threads(threads)
        assert recall.TRAINED["count"] == before + 1 and not info["cached"]
        yield model, info


def test_training_beats_chance(trained):
    model, info = trained
    chance = 2 / TINY.task.vocab
    assert info["accuracy"] >= 3 * chance, info
    assert recall.full_accuracy(model, TINY.task, recall.held_out(TINY, 64)) >= 3 * chance


def test_second_call_loads_the_cache(trained):
    model, _ = trained
    before = recall.TRAINED["count"]
    again, info = recall.load_or_train(TINY, progress=False)
    assert info["cached"] and recall.TRAINED["count"] == before  # not trained again
    folder = recall.cache_folder(TINY)
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))  # no pickle
    assert stat.S_IMODE(folder.parent.stat().st_mode) == 0o700
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert recall.Config(task=TINY.task, hidden=64, steps=201).key() != TINY.key()  # the hash covers the config


def test_decode_answers_equal_the_full_forward(trained):
    """The exact recipe's answers through prefill + decode steps are the HF model's own logits at the queries."""
    model, _ = trained
    task = TINY.task
    ids = recall.held_out(TINY, 32)
    opt = attnforge.optimize(model, "exact", (recall.mqar(task, 2, seed=5),))
    with torch.no_grad():
        want = model(ids).logits[:, task.query_positions()]
    torch.testing.assert_close(recall.decode_logits(opt, task, ids, batch=16), want, atol=1e-4, rtol=1e-4)
    assert recall.decode_accuracy(opt, task, ids) == recall.full_accuracy(model, task, ids)


def test_a_short_window_forgets(trained):
    """A window far shorter than the query–pair distance recalls clearly less; rows that cannot run say why."""
    model, _ = trained
    task = TINY.task
    rows = [{"name": "window 2", "family": "sliding_window",
             "recipe": recall._steps("sliding_window", {"window": 2, "sinks": 0})},
            {"name": "missing", "family": "x", "recipe": {"name": "x", "steps": [{"rewrite": "no_such_rewrite"}]}},
            {"name": "bad", "family": "x", "recipe": recall._steps("sliding_window", {"window": -1})}]
    seed = recall.held_out_seed(TINY)
    out = recall.evaluate(model, task, rows, sequences=64, seed=seed, progress=False)
    original = recall.full_accuracy(model, task, recall.mqar(task, 64, seed))
    window, missing, bad = out
    assert window["accuracy"] <= original - 0.12, (window, original)
    full = TINY.layers * task.context * 2 * TINY.hidden * 4  # keys and values of every position, fp32
    assert 0 < window["kv_cache_bytes"] < full / 4
    assert missing["accuracy"] is None and "not available" in missing["note"]
    assert bad["accuracy"] is None and bad["note"].startswith("failed:")


def _cli(*args):
    from attnforge.tools.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(["eval", "recall", *map(str, args)])
        except SystemExit as e:  # argparse
            code = e.code
    return code, err.getvalue()


@pytest.mark.parametrize("args,needle", [(["--context", "30"], "--context"), (["--context", "4096"], "--context"),
                                         (["--hidden", "100"], "--hidden"), (["--layers", "0"], "--layers"),
                                         (["--recipes", "snapkv,nope"], "--recipes"), (["--recipes", ","], "--recipes"),
                                         (["--sequences", "0"], "--sequences"),
                                         (["--json", "/no/such/folder/r.json"], "--json")])
def test_cli_bad_arguments_exit_2(args, needle, monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNFORGE_CACHE_DIR", str(tmp_path))
    before = recall.TRAINED["count"]
    code, err = _cli(*args)
    assert code == 2 and needle in err, err
    assert recall.TRAINED["count"] == before  # refused before any training


def test_cli_writes_json_from_the_cached_model(trained, monkeypatch, tmp_path):
    monkeypatch.setattr(recall, "config_for", lambda *a, **k: TINY)
    out = tmp_path / "rows.json"
    code, err = _cli("--recipes", "original", "--sequences", "16", "--json", out)
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["producer"] == "attnforge" and data["training"]["cached"]
    (row,) = data["rows"]
    assert row["name"] == "original" and row["accuracy"] > 2 / TINY.task.vocab and row["kv_cache_bytes"] > 0
