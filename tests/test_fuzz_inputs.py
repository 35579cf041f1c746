"""Fuzzing what users and other users hand attnforge (#18): recipe files, CLI argument lists, autotune cache files
and model specs. Every case ends in success or attnforge's own error (the CLI's exit 2) with a short message —
never a traceback, a hang or runaway memory — and the cache never loses an entry a completed write put there.

Over 1,000 cases in all; the model never runs (``optimize`` and the tuner are replaced by a stand-in that stops
the command once every input check has passed), so the cases take milliseconds each.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import resource
import signal

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from attnforge.errors import AttnforgeError

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the set-aside and fallback warnings, by design
CASE_S = 10  # a case over this is a hang
FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)


class Hang(BaseException):
    """Raised in a case that ran past CASE_S (a BaseException, so no ``except Exception`` in the code swallows it)."""


@contextlib.contextmanager
def bounded():
    """Fail a case that runs over CASE_S seconds (SIGALRM interrupts blocking reads too) or grows the process's
    peak memory by more than 1 GB."""
    def alarm(*_):
        raise Hang(f"over {CASE_S} s")

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
    assert grown_kb < 1 << 20, f"peak memory grew by {grown_kb >> 10} MB"


def clean_error(e: AttnforgeError) -> None:
    text = str(e)
    assert text.strip() and len(text) < 4000, (len(text), text[:300])


# --------------------------------------------------------------------------- recipe files

REWRITES = ["fuse_attention", "fuse_ffn", "sliding_window", "block_sparse", "linear_attention", "gqa", "engram",
            "memoryformer", "chunked_attention", "nope"]
PARAMS = ["window", "sinks", "block", "topk", "kv_heads", "feature_map", "table_size", "eps", "seed", "chunk", "n"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["1e30", ".inf", "nan", "-0", "0x10", "elu", "causal"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                      max_leaves=12)
steps = st.fixed_dictionaries({"rewrite": st.sampled_from(REWRITES)},
                              optional={"params": st.dictionaries(st.sampled_from(PARAMS), values, max_size=3),
                                        "targets": st.one_of(st.lists(st.text(max_size=10), max_size=3), values),
                                        "skip_first": values, "skip_last": values, "extra": values})
recipes = st.fixed_dictionaries({"steps": st.one_of(st.lists(steps, max_size=4), values)},
                                optional={"name": values, "verify": st.dictionaries(
                                    st.sampled_from(["rtol", "atol", "min_cosine", "max_rel_error", "x"]), values)})


def _yaml_bomb(depth: int) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, depth)]
    return "\n".join(lines + [f"steps: *a{depth - 1}"]) + "\n"


recipe_files = st.one_of(
    recipes.map(lambda r: yaml.safe_dump(r, allow_unicode=True).encode()),
    recipes.map(lambda r: json.dumps(r).encode()),
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    st.text(max_size=60).map(lambda t: t.encode("utf-16")),
    st.integers(1, 12).map(lambda d: _yaml_bomb(d).encode()),
    st.integers(10, 30_000).map(lambda d: ("[" * d + "]" * d).encode()),
    st.integers(10, 30_000).map(lambda d: ("a:\n" + "".join(" " * i + "- \n" for i in range(0, d, 997))).encode()),
)


@settings(FUZZ, max_examples=400)
@given(data=recipe_files, suffix=st.sampled_from([".yaml", ".json", ".yml"]))
def test_recipe_files_load_or_raise_a_recipe_error(tmp_path_factory, data, suffix):
    from attnforge.recipe import Recipe, load_recipe

    path = tmp_path_factory.mktemp("recipe") / f"r{suffix}"
    path.write_bytes(data)
    with bounded():
        try:
            assert isinstance(load_recipe(str(path)), Recipe)
        except AttnforgeError as e:
            clean_error(e)


# --------------------------------------------------------------------------- CLI argument lists

class Reached(BaseException):
    """The stand-in for the model run: every input check passed."""


def _reached(*_, **__):
    raise Reached


SPECS = ["demo:tiny-llama", "demo:tiny-bert", "demo:tiny-llama-lm", "demo:nope", "nowhere.py:build", "x.pt2", ".",
         "/dev/zero", "", "a:b"]
NUMBERS = ["0", "-1", "nan", "inf", "-inf", "1e400", "3.5", "2", "x", ""]
PATHS = ["out.onnx", "out.json", "r.html", "nodir/x.json", ".", "/dev/null", "/dev/zero", "/proc/x", "m.py", ""]
RECIPES = ["exact", "long-context", "nope", "nope.yaml", "/dev/zero", ".", "bomb.yaml", ""]
MODEL_OPTS = {"--recipe": RECIPES, "--atol": NUMBERS, "--input-shape": ["2,8", "0,0", "-1", "1e9,1e9", "x", ""],
              "--task": ["text-generation", "causal-lm", "telepathy", ""], "--strict": None, "--trust-pickle": None}
OPTIONS = {
    "rewrite": {**MODEL_OPTS, "--force": None, "-o": PATHS, "--json": PATHS, "--report": PATHS, "--dry-run": None,
                "--opset": NUMBERS, "--static": None},
    "diff": {**MODEL_OPTS, "--force": None, "--html": PATHS, "--json": PATHS},
    "generate": {**MODEL_OPTS, "--prompt-ids": ["1,2,3", "", "-1", "1e9", "x,y"], "--prompt": ["hi", ""],
                 "--tokenizer": PATHS, "--max-new-tokens": NUMBERS, "--do-sample": None, "--temperature": NUMBERS,
                 "--top-k": NUMBERS, "--top-p": NUMBERS, "--seed": NUMBERS},
    "autotune": {"--model": SPECS, "--recipe": RECIPES, "--input-shape": ["1,96", "0", "x"], "--trust-pickle": None,
                 "--op": ["attention", "sliding_window", "block_sparse", "linear_attention", "softmax", ""],
                 "--shapes": ["1x2x64x16", "1x2x0x16", "2x2", "x", "1x2x64x16x3"],
                 "--params": ["window=8", "window=-4,sinks=2", "window=1e30", "topk=0", "kv_heads=3", "=", "x"],
                 "--dtype": ["float32", "float16", "int64", "float64", ""], "--device": ["cpu", "cuda", "tpu"],
                 "--backend": ["torch", "triton", "numpy"], "--cache": PATHS, "--budget": NUMBERS,
                 "--reps": NUMBERS, "--show": None},
    "codegen": {"--dump": ["mask=causal,head_dim=16", "mask=window,window=0", "mask=nope", "head_dim=-1", "x", ""]},
    "recipes": {"--schema": None},
}


@st.composite
def argv_lists(draw):
    """A command, its spec, then options of that command with good and bad values; now and then a stray word."""
    command = draw(st.sampled_from(sorted(OPTIONS)))
    argv = [command]
    if command in ("rewrite", "diff", "generate"):
        argv.append(draw(st.sampled_from(SPECS)))
    for flag in draw(st.lists(st.sampled_from(sorted(OPTIONS[command])), max_size=4, unique=True)):
        argv.append(flag)
        if OPTIONS[command][flag] is not None:
            argv.append(draw(st.sampled_from(OPTIONS[command][flag])))
    if draw(st.integers(0, 9)) == 0:
        argv.insert(draw(st.integers(0, len(argv))), draw(st.text(max_size=6)))
    return argv


@pytest.fixture(scope="module")
def stand_in():
    mp = pytest.MonkeyPatch()
    for module, name in (("attnforge.optimize", "optimize"), ("attnforge.tune", "collect")):
        mp.setattr(importlib.import_module(module), name, _reached)
    yield
    mp.undo()


@settings(FUZZ, max_examples=400)
@given(argv=argv_lists())
def test_cli_argument_lists_exit_0_or_2_with_a_message(stand_in, tmp_path_factory, monkeypatch, argv):
    from attnforge.tools.cli import main

    here = tmp_path_factory.mktemp("cli")
    monkeypatch.chdir(here)  # outputs named by the case land here, next to a model file and a recipe bomb
    (here / "m.py").write_text("raise SystemExit('never imported')\n")
    (here / "bomb.yaml").write_text(_yaml_bomb(12))
    monkeypatch.setenv("ATTNFORGE_CACHE_DIR", str(here / "cache"))
    err = io.StringIO()
    with bounded(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: 2 with usage, 0 for --help
            code = e.code
        except Reached:
            code = "reached the run"
    event(f"exit {code}")
    code = 0 if code == "reached the run" else code
    assert code in (0, 2), (argv, code, err.getvalue()[-500:])
    if code == 2:
        assert err.getvalue().strip() and len(err.getvalue()) < 8000, (argv, err.getvalue()[:300])


# --------------------------------------------------------------------------- autotune cache files

entries = st.dictionaries(st.text(max_size=20), st.one_of(
    st.fixed_dictionaries({"config": st.dictionaries(st.text(max_size=5), st.integers(1, 64), max_size=3),
                           "ms": st.floats(0.001, 100)}), values), max_size=4)
cache_bytes = st.one_of(
    entries.map(lambda e: json.dumps({"format": 1, "entries": e}).encode()),
    values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=300),
    st.integers(10, 100_000).map(lambda d: ("[" * d + "]" * d).encode()),
    st.text(max_size=100).map(lambda t: t.encode("utf-16")),
)


def _good(key: str) -> dict:
    return {"config": {"BLOCK_M": 16}, "ms": 0.5, "key": key}


@settings(FUZZ, max_examples=250)
@given(data=cache_bytes)
def test_cache_files_are_read_or_set_aside_byte_for_byte(tmp_path_factory, data):
    from attnforge.codegen.autotune import Cache, entry_problem
    from attnforge.tools.cli import main

    folder = tmp_path_factory.mktemp("cache")
    Cache(folder).put("written-by-a-completed-run", _good("k"))
    (folder / "autotune.json").write_bytes(data)  # then the file is damaged, or replaced by another writer
    with bounded(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cache = Cache(folder)
        live = cache.entries()
        assert all(entry_problem(e) is None for e in live.values())
        assert main(["autotune", "--show", "--cache", str(folder)]) == 0
        cache.put("after", _good("after"))
    aside = [p.read_bytes() for p in folder.glob("autotune.corrupt-*")]
    assert aside == [] or aside == [data], "a damaged file is set aside as it was"
    assert "after" in Cache(folder).entries(), "an entry written by a completed put is readable"


@settings(FUZZ, max_examples=60)
@given(keys=st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=8))
def test_no_entry_a_completed_put_wrote_is_lost(tmp_path_factory, keys):
    from attnforge.codegen.autotune import Cache

    folder = tmp_path_factory.mktemp("cache")
    writers = [Cache(folder), Cache(folder)]  # two tuners sharing the folder
    for i, k in enumerate(keys):
        writers[i % 2].put(k, _good(k))
        assert all(Cache(folder).get(done) is not None for done in keys[:i + 1])


# --------------------------------------------------------------------------- model specs

SPEC_BODIES = [
    "def build(:\n",  # a syntax error
    "import not_a_module_anywhere\ndef build():\n    pass\n",
    "def build():\n    raise RuntimeError('broken spec')\n",
    "def build():\n    return 3\n",
    "def build():\n    return None\n",
    "import torch\ndef build():\n    return torch.nn.Linear(4, 4), (torch.zeros(2, 4, dtype=torch.long),)\n",
    "import torch\ndef build():\n    return torch.nn.Linear(4, 4), [torch.zeros(2, 4)], [1]\n",
    "import torch\ndef build():\n    return torch.nn.Linear(4, 4), (torch.zeros(2, 5),)\n",
    "import torch\ndef build():\n    return torch.nn.Embedding(9, 4), (torch.zeros(2, 3),)\n",
    "import torch\ndef build():\n    return torch.nn.Linear(4, 4), (torch.zeros(2, 4),), {'nope': 1}\n",
    "import torch\ndef build():\n    return torch.nn.Linear(4, 4), (torch.zeros(2, 4),)\n",  # a good one
]
specs = st.one_of(
    st.tuples(st.sampled_from(SPEC_BODIES), st.sampled_from(["build", "other"])),
    st.binary(max_size=100).map(lambda b: (b, ".pt2")),
    st.sampled_from(["demo:", "demo:tiny-gpt9", "", ":", "a:b:c", "x.py", "/dev/null", "/dev/zero:build", "."]).map(
        lambda s: (s, None)),
)


@settings(FUZZ, max_examples=100)
@given(case=specs)
def test_model_specs_load_or_raise_a_spec_error(tmp_path_factory, case):
    from attnforge.specs import load_spec

    folder = tmp_path_factory.mktemp("spec")
    body, how = case
    if how == ".pt2":
        (folder / "m.pt2").write_bytes(body)
        spec = str(folder / "m.pt2")
    elif how is None:
        spec = body
    else:
        (folder / "m.py").write_text(body)
        spec = f"{folder / 'm.py'}:{how}"
    with bounded():
        try:
            model, args, kwargs = load_spec(spec)
            assert isinstance(args, tuple) and isinstance(kwargs, dict)
        except AttnforgeError as e:
            clean_error(e)
