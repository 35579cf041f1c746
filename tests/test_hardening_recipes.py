"""Issue #18, recipes and parameter values: a recipe file that is not a recipe, or a value that would validate
and fail later, is a short ``RecipeError`` (or exit 2 on the command line) before anything runs."""
from __future__ import annotations

import os
import threading
import time

import pytest

from attnforge.errors import RecipeError
from attnforge.recipe import load_recipe
from attnforge.tools.cli import main


def _load_within(recipe, seconds: float = 10.0):
    """``load_recipe`` in a thread: what it raised or returned, or a failure if it is still running (a FIFO that
    blocks, /dev/zero read to the end) rather than a hung test run."""
    out = {}

    def target():
        try:
            out["value"] = load_recipe(recipe)
        except BaseException as e:  # noqa: BLE001  (what it raised is the result)
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"load_recipe({recipe!r}) still running after {seconds} s"
    return out


def _refused(recipe, *needles, seconds: float = 10.0) -> RecipeError:
    out = _load_within(recipe, seconds)
    err = out.get("error")
    assert isinstance(err, RecipeError), out
    assert len(str(err)) < 2000, f"a {len(str(err))}-character message"
    for needle in needles:
        assert needle in str(err), str(err)
    return err


def _step(rewrite: str, **params) -> dict:
    return {"steps": [{"rewrite": rewrite, "params": params}]}


def test_a_yaml_alias_bomb_is_a_short_error_at_once(tmp_path):
    levels = ["&a [x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdef", "bcdefg"):
        levels.append(f"&{name} [{', '.join([f'*{prev}'] * 9)}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"name: [{', '.join(levels)}]\nsteps: [{{rewrite: fuse_ffn}}]\n")  # 9**7 values expanded
    assert bomb.stat().st_size < 400
    start = time.perf_counter()
    err = _refused(bomb, "aliases", "bomb.yaml")
    assert time.perf_counter() - start < 5 and len(str(err)) < 2000


def test_a_few_small_aliases_still_load(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("steps:\n- {rewrite: fuse_ffn, targets: &t ['layers.1.*']}\n- {rewrite: fuse_attention, targets: *t}\n")
    assert [s.targets for s in load_recipe(f).steps] == [["layers.1.*"], ["layers.1.*"]]


def test_a_file_that_is_not_utf8_names_the_byte_offset(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("name: café\nsteps:\n- rewrite: fuse_ffn\n".encode("latin-1"))
    _refused(f, "UTF-8", "offset 9")


def test_a_utf16_file_with_a_byte_order_mark_loads(tmp_path):
    f = tmp_path / "utf16.yaml"
    f.write_bytes("name: wide\nsteps:\n- rewrite: fuse_ffn\n".encode("utf-16"))
    out = _load_within(f)
    assert "error" not in out, out
    assert out["value"].name == "wide"


def test_a_directory_is_not_a_recipe(tmp_path):
    (tmp_path / "r.yaml").mkdir()
    _refused(tmp_path / "r.yaml", "directory")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "r.yaml"
    os.mkfifo(fifo)
    try:
        _refused(fifo, "FIFO", seconds=5)
    finally:
        try:  # a regression blocks in open(): a writer end lets its thread finish
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero here")
def test_dev_zero_is_refused_without_reading_it():
    _refused("/dev/zero", "character device", seconds=2)


def test_yaml_nested_20k_deep_is_a_recipe_error(tmp_path):
    f = tmp_path / "deep.yaml"
    f.write_text("steps: " + "[" * 20000 + "]" * 20000 + "\n")
    _refused(f, "nested more than")


def test_a_window_too_large_for_the_kernels_is_refused():
    _refused(_step("sliding_window", window=10 ** 30), "steps[0].params.window", "at most")


def test_an_engram_table_too_large_for_memory_names_its_bytes():
    err = _refused(_step("engram", table_size=10 ** 12), "steps[0].params.table_size")
    assert str(2 * 4 * 10 ** 12 * 16 * 4) in str(err)  # 2 orders × 4 heads × rows × dim 16 × 4 bytes


def test_a_bool_is_not_an_int():
    _refused(_step("sliding_window", window=True), "steps[0].params.window", "boolean")


def test_an_infinite_eps_is_refused(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("steps:\n- rewrite: engram\n  params: {eps: .inf}\n")
    _refused(f, "steps[0].params.eps", "finite")


def test_autotune_params_are_validated_before_anything_is_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATTNFORGE_CACHE_DIR", str(tmp_path / "cache"))
    code = main(["autotune", "--op", "sliding_window", "--shapes", "1x2x64x16", "--params", "window=-4",
                 "--device", "cpu", "--reps", "1"])
    assert code == 2 and "window" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("flag,value", [("--budget", "nan"), ("--dtype", "int64")])
def test_autotune_refuses_a_nan_budget_and_an_integer_dtype(flag, value, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATTNFORGE_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as exit_:
        main(["autotune", "--op", "attention", "--shapes", "1x2x64x16", "--device", "cpu", "--reps", "1",
              flag, value])
    assert exit_.value.code == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_every_rewrite_param_refuses_bools_and_non_finite_floats():
    """The shared types (runtime/params.py) are used by every rewrite's params model, not field by field: each
    int or float parameter (or list of them) refuses true, each float one also .inf."""
    from pydantic import ValidationError

    from attnforge.passes import REGISTRY

    checked = 0
    for rewrite in REGISTRY.values():
        for field, info in rewrite.params.model_fields.items():
            kind = str(info.annotation)
            if info.annotation is bool or not ("int" in kind or "float" in kind):
                continue
            bad = [True] + ([float("inf")] if "float" in kind else [])
            for value in bad:
                value = [value] if kind.startswith("list") else value
                with pytest.raises(ValidationError) as e:
                    rewrite.params.model_validate({field: value})
                assert any(err["loc"][:1] == (field,) for err in e.value.errors()), (rewrite.name, field, value)
            checked += 1
    assert checked >= 20
