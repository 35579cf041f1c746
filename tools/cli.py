"""``attnforge`` command line (docs/cli.md): ``rewrite``, ``diff``, ``generate``, ``recipes``, ``autotune``,
``codegen``, ``bench``, ``eval recall``.

Every ``AttnforgeError`` (attnforge/errors.py: a bad recipe, spec, shape or option, an export that failed) exits
with code 2 and a message naming the problem (an unusable autotune cache warns, and the run goes on in memory)."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

from attnforge.errors import AttnforgeError, ExportError
from attnforge.report import _finite
from attnforge.specs import SPEC_FORMS, load_spec, parse_shape


class _Stages:
    """Rich progress on stderr: one line per pipeline stage, ticked off with its time when the next one starts
    (✓), or crossed (✗) when it failed."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.text import Text

        class Mark(SpinnerColumn):
            def render(self, task):
                return Text("✗", style="red") if task.fields.get("failed") else super().render(task)

        self.progress = Progress(Mark(finished_text="✓"), TextColumn("{task.description}"), TimeElapsedColumn(),
                                 console=Console(stderr=True))
        self.task = None
        self.tasks: dict[str, object] = {}

    def __enter__(self):
        self.progress.start()
        return self

    def __call__(self, stage: str) -> None:
        self._finish()
        self.task = self.progress.add_task(stage, total=1)
        self.tasks[stage] = self.task

    def fail(self, stage: str, why: str = "") -> None:
        """Cross out ``stage`` (the last one of that name), with why."""
        task = self.tasks.get(stage)
        if task is not None:
            self.progress.update(task, failed=True, description=f"{stage}: {why}" if why else stage)

    def _finish(self):
        if self.task is not None:
            self.progress.update(self.task, completed=1)

    def __exit__(self, kind, *_):
        if kind is None:
            self._finish()
        self.progress.stop()


def _recipe(a):
    from attnforge.recipe import load_recipe

    recipe = load_recipe(a.recipe)  # validated before anything runs
    if a.atol is not None:
        recipe = load_recipe({**recipe.model_dump(), "verify": {**recipe.verify.model_dump(), "atol": a.atol}})
    return recipe


def _optimize(a, stage, recipe, **options):
    """Load the spec and run ``optimize`` under the progress display; ``(opt, args, kwargs)``."""
    from attnforge.optimize import optimize

    stage(f"load {a.spec}")
    model, args, kwargs = load_spec(a.spec, parse_shape(a.input_shape), a.task,
                                    trust_pickle=getattr(a, "trust_pickle", False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the ✗ on the capture line and the report say it
        opt = optimize(model, recipe, args, kwargs, strict=a.strict, progress=stage, **options)
    if opt.report.capture_error:
        stage.fail("capture", "failed, the model runs unchanged (the report says why)")
    opt.report.model = a.spec
    return model, opt, args, kwargs


def _diff(a, stage, model, opt, args, kwargs) -> dict:
    from attnforge.tools.diff import build_diff, canonical_graph

    stage("diff against the unrewritten graph")
    return build_diff(canonical_graph(model, args, kwargs), opt, a.spec)


def _write(path: str, text: str, console) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as e:
        raise AttnforgeError(f"cannot write {path}: {e.strerror or e}") from None
    console.print(f"written: {path}", markup=False)


def _check_outputs(a, outputs: dict, folder: str = "") -> None:
    """The command's output paths, before any work (tools/outputs.py): against its inputs and each other."""
    from attnforge.tools.outputs import check_outputs, spec_inputs

    try:
        recipe = [Path(a.recipe)] if Path(a.recipe).is_file() else []
    except OSError:  # a name too long for the system: no file of ours, and load_recipe says why
        recipe = []
    inputs = spec_inputs(a.spec) + recipe
    check_outputs(outputs, inputs, a.force, folder)


def _warn(report) -> None:
    """The report's warnings (a recipe step that selects nothing) on stderr."""
    for w in report.warnings:
        print(f"attnforge: warning: {w}", file=sys.stderr)


def cmd_rewrite(a) -> int:
    import torch
    from rich.console import Console

    from attnforge.runtime.onnx import export_onnx, run_onnx
    from attnforge.verify import compare_outputs, named_leaves

    recipe = _recipe(a)
    if a.opset < 18:
        raise AttnforgeError(f"--opset {a.opset}: the torch.onnx (dynamo) exporter writes opset 18 or newer")
    generation = (a.task or "").replace("_", "-") == "text-generation"
    if generation:
        a.task = "causal-lm"
    written = {"-o": a.output, "--report": a.report} if not a.dry_run else {}  # a dry run writes only --json
    _check_outputs(a, {**written, "--json": a.json}, folder="-o" if generation else "")
    onnx_rows, export_error, export_notes = None, "", []
    with _Stages() as stage:
        model, opt, args, kwargs = _optimize(a, stage, recipe, dry_run=a.dry_run)
        if a.output and not a.dry_run and generation:
            try:
                onnx_rows = _export_decode(a, stage, opt)
            except ExportError as e:
                export_error = str(e)
        elif a.output and not a.dry_run:
            stage(f"export ONNX, opset {a.opset}")
            target = opt.graph_module if opt.graph_module is not None else opt.module
            try:
                with torch.no_grad():
                    ref = opt(*args, **kwargs)
                names = [n for n, _ in named_leaves(ref)]
                export_onnx(target, args, kwargs, a.output, a.opset, dynamic=not a.static, output_names=names,
                            notes=export_notes)
                stage("run the ONNX file in onnxruntime")
                onnx_rows = compare_outputs(ref, run_onnx(a.output, args, kwargs, ref), recipe.verify.atol)
                other = _another_shape(opt, args, kwargs) if not a.static and not export_notes else None
                if other is not None:
                    with torch.no_grad():
                        ref2 = opt(*other[0], **other[1])
                    for row in compare_outputs(ref2, run_onnx(a.output, other[0], other[1], ref2),
                                               recipe.verify.atol):
                        row["name"] += f" (at {other[2]})"
                        onnx_rows.append(row)
            except ExportError as e:
                export_error = str(e)
        diff = _diff(a, stage, model, opt, args, kwargs) if a.report and not a.dry_run and opt.graph_module else None
    _warn(opt.report)
    out = Console(width=120)
    report = opt.report
    report.render(out)
    if a.dry_run:
        out.print(f"dry run: {sum(s.status == 'planned' for s in report.sites)} planned rewrites; nothing was changed"
                  + (", no ONNX written" if a.output else ""))
    for note in export_notes:
        out.print(f"note: ONNX {note}", markup=False)
    if onnx_rows is not None:
        out.print(f"ONNX {a.output} (opset {a.opset}{', static shapes' if a.static or export_notes else ''}) in "
                  f"onnxruntime vs the rewritten model, atol {recipe.verify.atol:g}:", markup=False)
        for o in onnx_rows:
            out.print(f"{'[✓]' if o['passed'] else '[x]'} {o['name']}: max diff {o['max_abs']:.2e}"
                      + (f" ({o['note']})" if o.get("note") else ""), markup=False)
    if a.json:
        data = {**report.to_dict(), "producer": "attnforge"}  # the marker tools/outputs.py looks for
        if a.output and not a.dry_run:
            data["onnx"] = {"path": a.output, "opset": a.opset, "error": export_error, "outputs": onnx_rows or []}
        _write(a.json, json.dumps(_finite(data), indent=2, default=str), out)
    if diff is not None:
        from attnforge.tools.report_html import render_html

        _write(a.report, render_html(diff), out)
    elif a.report:
        why = "a dry run changes nothing" if a.dry_run else "the model was not captured"
        out.print(f"no HTML report written: {why}", markup=False)
    if export_error:  # an AttnforgeError like any other (exit 2), reported after the rewrite's own report
        print(f"attnforge: error: {export_error}", file=sys.stderr)
        return 2
    return 0 if report.passed and all(o["passed"] for o in onnx_rows or []) else 1


def _export_decode(a, stage, opt) -> list[dict]:
    """``--task text-generation``: the decode step with its cache as inputs and outputs (attnforge/generate.py)
    in the folder ``-o``, checked by a greedy loop in onnxruntime against ``opt.generate`` (batch 2, left-padded)."""
    import torch

    from attnforge.generate import GenerationError, export_decode_onnx, onnx_greedy
    from attnforge.verify import error_stats

    stage(f"export the decode step to {a.output}/model.onnx, opset {a.opset}")
    try:
        layout = export_decode_onnx(opt, a.output, a.opset)
    except GenerationError as e:
        raise ExportError(f"the model cannot generate: {e}") from None
    stage("greedy generation in onnxruntime")
    vocab = int(getattr(getattr(opt, "config", None), "vocab_size", 100))
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    want = opt.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[], return_dict_in_generate=True,
                        output_logits=True)
    got, logits = onnx_greedy(a.output, ids, mask, 8)
    worst = max(error_stats(g, w)["max_abs"] for g, w in zip(logits, want.logits))
    policies = ", ".join(sorted({layer["policy"] for layer in layout["layers"]}))
    return [{"name": f"greedy tokens, 8 steps, batch 2 left-padded ({policies} cache)",
             "passed": bool(torch.equal(got, want.sequences)), "max_abs": worst}]


def _another_shape(opt, args, kwargs):
    """The example call at another batch and length (each symbolic dim grown: a batch by its first row, a length
    by its last position), to check the ONNX file's dynamic axes; None when nothing is symbolic."""
    import torch

    program = opt.program
    if program is None or not any(isinstance(d, str) for dims in program.report.shapes.values() for d in dims):
        return None
    grow = {"B": 1}
    call = dict(zip(program.form.tensors, program.form.inputs(args, kwargs)))

    def widen(name, t):
        for dim, sym in enumerate(program.report.shapes.get(name, [])):
            if isinstance(sym, str):
                extra = grow.get(sym[0], 3)
                piece = t.narrow(dim, 0, 1) if sym.startswith("B") else t.narrow(dim, t.shape[dim] - 1, 1)
                t = torch.cat([t] + [piece] * extra, dim)
        return t

    grown = {k: widen(k, v) for k, v in call.items()}
    shape = "x".join(map(str, next(iter(grown.values())).shape))
    return (), {**{k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}, **grown}, shape


class _Timed:
    """A streamer wrapper: when each put came (the prompt's first), passed on to the user's streamer."""

    def __init__(self, inner):
        import time

        self.inner, self.clock, self.times = inner, time.perf_counter, []

    def put(self, value):
        self.times.append(self.clock())
        if self.inner is not None:
            self.inner.put(value)

    def end(self):
        if self.inner is not None:
            self.inner.end()


class _IdPrinter:
    """Prints the new token ids as they come (the prompt is not repeated)."""

    def __init__(self):
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        print(" ".join(str(int(t)) for t in value.reshape(-1)), end=" ", flush=True)

    def end(self):
        print(flush=True)


def _prompt_ids(a):
    import torch

    if (a.prompt_ids is None) == (a.prompt is None):
        raise AttnforgeError("give the prompt as --prompt-ids 1,2,3 or as --prompt TEXT (with a tokenizer), once")
    if a.prompt_ids is not None:
        try:
            ids = [int(t) for t in a.prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise AttnforgeError(f"--prompt-ids {a.prompt_ids!r}: expected integers, e.g. 1,2,3") from None
        if not ids:
            raise AttnforgeError("--prompt-ids is empty")
        return torch.tensor([ids]), None
    folder = a.tokenizer or (a.spec if Path(a.spec).is_dir() else None)
    if folder is None:
        raise AttnforgeError("--prompt needs a tokenizer: pass --tokenizer FOLDER (or a model folder as the spec)")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise AttnforgeError(f"--tokenizer {folder!r}: no tokenizer could be loaded ({e})") from None
    return tokenizer(a.prompt, return_tensors="pt")["input_ids"], tokenizer


def cmd_generate(a) -> int:
    import torch
    from rich.console import Console

    from attnforge.generate import check_arguments, decoder_for

    recipe = _recipe(a)
    if a.max_new_tokens < 0:
        raise AttnforgeError(f"--max-new-tokens {a.max_new_tokens}: must be >= 0")
    if a.task is None and Path(a.spec).is_dir():
        a.task = "causal-lm"
    ids, tokenizer = _prompt_ids(a)
    check_arguments(ids, None, a.max_new_tokens, a.do_sample, 1.0 if a.temperature is None else a.temperature,
                    a.top_k, a.top_p)  # before the model is loaded and optimized
    with _Stages() as stage:
        model, opt, _, _ = _optimize(a, stage, recipe)
        stage("build the decoder")
        decoder_for(opt, ids)
    _warn(opt.report)
    err = Console(stderr=True)
    if a.seed is not None:
        torch.manual_seed(a.seed)
    if tokenizer is not None:
        from transformers import TextStreamer

        inner = TextStreamer(tokenizer, skip_prompt=True)
    else:
        inner = _IdPrinter()
    timed = _Timed(inner)
    start = timed.clock()
    out = opt.generate(ids, max_new_tokens=a.max_new_tokens, do_sample=a.do_sample, temperature=a.temperature,
                       top_k=a.top_k, top_p=a.top_p, streamer=timed)
    new = out.shape[1] - ids.shape[1]
    context = out.shape[1]
    cache = opt.kv_cache_bytes(1, context)
    decode_s = timed.times[-1] - timed.times[1] if len(timed.times) > 2 else 0.0
    rate = f"{(new - 1) / decode_s:.1f} tokens/s decoding" if decode_s > 0 else "one token"
    first = timed.times[1] - start if len(timed.times) > 1 else 0.0
    err.print(f"{new} new tokens: {rate}, prefill + first token {first * 1e3:.1f} ms; KV cache {cache:,} bytes at "
              f"{context} tokens ({opt.report.kv_cache.get('total', '?')} for N tokens)", markup=False)
    return 0


def cmd_diff(a) -> int:
    from rich.console import Console

    from attnforge.tools.diff import render_text

    recipe = _recipe(a)
    _check_outputs(a, {"--json": a.json, "--html": a.html})
    with _Stages() as stage:
        model, opt, args, kwargs = _optimize(a, stage, recipe)
        if opt.graph_module is None:
            print(f"attnforge: error: nothing to diff, the model was not captured:\n{opt.report.capture_error}",
                  file=sys.stderr)
            return 1
        diff = _diff(a, stage, model, opt, args, kwargs)
    _warn(opt.report)
    out = Console(width=140)
    render_text(diff, out)
    if a.json:
        _write(a.json, json.dumps(diff, indent=2, default=str), out)
    if a.html:
        from attnforge.tools.report_html import render_html

        _write(a.html, render_html(diff), out)
    return 0 if diff["passed"] else 1


def cmd_recipes(a) -> int:
    from attnforge.recipe import BUILTIN, recipe_schema

    if a.schema:
        print(json.dumps(recipe_schema(), indent=2))
        return 0
    for name, r in BUILTIN.items():
        def step(s):
            extra = {k: v for k, v in s.items() if k not in ("rewrite", "params")}
            return s["rewrite"] + (f"({s['params']})" if s.get("params") else "") + (f" {extra}" if extra else "")
        steps = " -> ".join(step(s) for s in r["steps"])
        print(f"{name:16} {steps}\n{'':16} {r['description']}")
    return 0


def cmd_eval_recall(a) -> int:
    """MQAR recall of the original model and every approximate recipe vs their KV-cache bytes (attnforge/recall.py)."""
    from rich.console import Console
    from rich.table import Table

    from attnforge import recall
    from attnforge.tools.outputs import check_outputs

    cfg = recall.config_for(a.context, a.layers, a.hidden, a.seed)
    names = [n.strip() for n in a.recipes.split(",") if n.strip()] if a.recipes is not None else None
    if names is not None and not names:
        raise AttnforgeError("--recipes is empty: give recipe families or row names, comma-separated")
    recall.select(cfg.task, names)  # names checked before the outputs and any training
    check_outputs({"--json": a.json}, [], a.force)
    info, rows = recall.benchmark(cfg, names, a.sequences, a.retrain)
    out = Console(width=160)
    full = next((r["kv_cache_bytes"] for r in rows if r["recipe"] == "exact" and r["kv_cache_bytes"]), None)
    table = Table(title=f"MQAR recall at {cfg.task.context} tokens ({cfg.task.pairs} pairs, {cfg.task.queries} "
                        f"queries answered by decode), {a.sequences} held-out sequences; model {cfg.layers} layers x "
                        f"{cfg.hidden}, held-out accuracy {info['accuracy']:.3f}, "
                        + ("loaded from the cache" if info["cached"] else f"trained in {info['seconds']:.0f}s"))
    for col in ("recipe", "accuracy", "KV cache (bytes)", "vs original", "logits cosine", "note"):
        table.add_column(col, justify="right" if col in ("accuracy", "KV cache (bytes)", "vs original") else "left")
    for r in rows:
        size = r["kv_cache_bytes"]
        table.add_row(r["name"], "—" if r["accuracy"] is None else f"{r['accuracy']:.3f}",
                      "—" if size is None else f"{size:,}", f"{size / full:.2f}x" if size and full else "",
                      "" if r["cosine"] is None else f"{r['cosine']:.4f}", r["note"])
    out.print(table)
    if a.json:
        data = {"producer": "attnforge", "benchmark": "recall", "training": info, "rows": rows}
        _write(a.json, json.dumps(_finite(data), indent=2, default=str), out)
    return 0


DTYPES = ("float32", "float16", "bfloat16")


def _seconds(text: str) -> float:
    """--budget: a finite number of seconds above 0 (nan or inf would silently mean no budget)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive, finite number of seconds, not {text[:80]!r}")
    return value


def _count(text: str) -> int:
    """--reps: a whole number of runs, at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of runs >= 1, not {text[:80]!r}")
    return value


def _params(text: str | None) -> dict:
    out = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise AttnforgeError(f"--params {text!r}: expected name=value pairs like window=512,sinks=4")
        out[name.strip()] = value.strip()
    return out


def cmd_autotune(a) -> int:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from attnforge.codegen.autotune import Cache
    from attnforge.runtime.dispatch import check_backend

    from attnforge.tune import collect, record_calls, synthetic_call, tune_all

    out = Console(width=160)
    cache = Cache(a.cache)
    if a.show:
        return _show_cache(cache, out)
    a.model = a.spec
    if bool(a.model) == bool(a.op):
        raise AttnforgeError("give --model SPEC (with --recipe) or --op NAME --shapes ..., or --show")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AttnforgeError("--device cuda: no CUDA device is available")
    backend = a.backend or ("triton" if device.type == "cuda" else "torch")
    try:
        check_backend(backend)
    except (ValueError, RuntimeError) as e:
        raise AttnforgeError(f"--backend {backend}: {e}") from None
    dtype = getattr(torch, a.dtype)  # one of DTYPES (argparse checked it, and --budget)
    with _Stages() as stage:
        if a.model:
            from attnforge.recipe import load_recipe

            # rewritten (and verified) on CPU with the PyTorch kernels; the kernels are then recorded on the device
            model, opt, args, kwargs = _optimize(a, stage, load_recipe(a.recipe), backend="torch")
            stage(f"record the kernels the rewritten model runs on {device}")
            if opt.graph_module is None:
                raise AttnforgeError(f"{a.spec}: the model was not captured, so it runs no attnforge kernels")
            module = opt.to(device=device, dtype=dtype)  # captured again at that dtype and device on the next call

            def move(x):
                if not isinstance(x, torch.Tensor):
                    return x
                return x.to(device, dtype) if x.is_floating_point() else x.to(device)

            calls = record_calls(module, tuple(map(move, args)), {k: move(v) for k, v in kwargs.items()}, backend)
        else:
            stage(f"inputs of {a.op}")
            calls = [synthetic_call(a.op, parse_shape(s), _params(a.params), dtype, device) for s in a.shapes or []]
            if not calls:
                raise AttnforgeError("--op needs --shapes, e.g. --shapes 1x8x4096x64")
        tunables = collect(calls, device, backend)
    if not tunables:
        out.print(f"nothing to tune: the {len(calls)} op calls run kernels without tunables on {device} "
                  f"(backend {backend})")
        return 0
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=Console(stderr=True)) as bar:
        tasks = {}

        def progress(label, done, total):
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.update(tasks[label], completed=done)

        results = tune_all(tunables, cache, a.budget, a.reps, progress)
    table = Table(title=f"autotune on {tunables[0].key.device} ({tunables[0].key.capability}), backend {backend}; "
                        f"cache {cache.path}" + (" (not written: in memory only)" if cache.memory is not None else ""))
    for col in ("kernel", "shape", "dtype", "default", "best", "default ms", "best ms", "speedup", "tried"):
        table.add_column(col, justify="right" if "ms" in col or col in ("speedup", "tried") else "left")
    for r in results:
        t = r.tunable
        table.add_row(t.key.kernel, t.key.shape, t.key.dtype, _config_text(t.default), _config_text(r.best),
                      f"{r.default_ms:.3f}", f"{r.best_ms:.3f}", f"{r.speedup:.2f}x",
                      f"{r.tried}/{len(t.space) + (t.default not in t.space)}" + ("" if r.complete else " (budget)"))
    out.print(table)
    if backend == "triton" and device.type == "cpu":
        out.print("note: Triton ran in the interpreter (TRITON_INTERPRET=1): these timings check the plumbing and say "
                  "nothing about a GPU; the entries are keyed to this CPU and never used on one", markup=False)
    for r in results:
        for f in r.failed:
            out.print(f"[yellow]skipped[/] {r.tunable.key.kernel}: {f}", markup=True)
    return 0


def _config_text(config: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items())


def _show_cache(cache, out) -> int:
    from rich.table import Table
    from rich.text import Text

    def cell(value) -> Text:  # the file's text as it is (no markup), at most 80 characters
        value = str(value)
        return Text(value if len(value) <= 80 else value[:77] + "...")

    entries = cache.entries()  # valid entries only (codegen/autotune.py: a corrupt file is set aside)
    table = Table(title=f"{cache.path}: {len(entries)} entries")
    for col in ("device", "kernel", "shape", "dtype", "config", "ms", "speedup", "tuned at"):
        table.add_column(col, justify="right" if col in ("ms", "speedup") else "left")
    for key, e in sorted(entries.items()):
        device = (key.split("|", 2) + ["?", "?"])[:2]
        ratio = e.get("default_ms", float("nan")) / e["ms"] if e["ms"] else float("nan")
        table.add_row(cell(f"{device[0]} ({device[1]})"), cell(e.get("kernel", "?")), cell(e.get("shape", "?")),
                      cell(e.get("dtype", "?")), cell(_config_text(e["config"])), f"{e['ms']:.3f}", f"{ratio:.2f}x",
                      cell(e.get("tuned_at", "")))
    out.print(table)
    return 0


def cmd_codegen(a) -> int:
    from attnforge.codegen.attention import AttentionSpec, source

    try:
        spec = AttentionSpec.parse(a.dump)
    except (ValueError, TypeError) as e:
        raise AttnforgeError(f"--dump {a.dump!r}: {e}") from None
    print(source(spec), end="")
    if a.arch is not None:
        from attnforge.codegen.attention import compile_for

        if os.environ.get("TRITON_INTERPRET") == "1":
            raise AttnforgeError("--arch compiles for a GPU: unset TRITON_INTERPRET")
        for name, kernel in compile_for(spec, a.arch).items():
            print(f"# {name}: compiled for sm_{a.arch}: {len(kernel.asm['cubin'])} bytes of cubin, "
                  f"{kernel.metadata.shared} bytes of shared memory", file=sys.stderr)
    return 0


def _tunable_ops() -> list[str]:
    """The ops ``autotune --op`` takes (the registry's variants that make synthetic inputs), by rewrite name."""
    from attnforge.runtime import VARIANTS

    return sorted(v.rewrite or v.name for v in VARIANTS.values() if v.synthetic is not None)


_TRUST_PICKLE = ("let a .pt2 spec unpickle objects and run what its archive asks (only for a file you trust; "
                 "by default an archive that needs it is refused)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnforge", description="Rewrite the attention of PyTorch models.")
    sub = p.add_subparsers(dest="command", required=True)
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("spec", help=f"model spec: {SPEC_FORMS}")
    model.add_argument("--recipe", default="exact", help="builtin recipe name or YAML/JSON file (default: exact)")
    model.add_argument("--atol", type=float, help="absolute tolerance for output checks (overrides the recipe's)")
    model.add_argument("--input-shape", help="example input size, e.g. 2,32, when the spec brings no inputs")
    model.add_argument("--task", help="Hugging Face head for a model folder: causal-lm, masked-lm, ... "
                                      "(default: the bare AutoModel)")
    model.add_argument("--strict", action="store_true", help="fail (exit 2) when the model cannot be captured or a "
                                                             "recipe step's targets/skip_* select no site")
    model.add_argument("--trust-pickle", action="store_true", help=_TRUST_PICKLE)
    force = argparse.ArgumentParser(add_help=False)
    force.add_argument("--force", action="store_true", help="overwrite existing output files that attnforge did not "
                                                            "write")

    r = sub.add_parser("rewrite", parents=[model, force], help="capture, rewrite, verify; export ONNX and check it")
    r.add_argument("-o", "--output", help="ONNX file to write, then run in onnxruntime against the rewritten model "
                                          "(with --task text-generation: a folder for the decode step)")
    r.add_argument("--opset", type=int, default=23, help="ONNX opset (default 23: the Attention op; >= 18)")
    r.add_argument("--static", action="store_true", help="export the example's shapes (default: batch and sequence "
                                                          "dims dynamic)")
    r.add_argument("--report", help="write the HTML diff report to this file")
    r.add_argument("--json", help="write the report as JSON to this file")
    r.add_argument("--dry-run", action="store_true", help="show matches and planned rewrites, apply nothing")
    r.set_defaults(fn=cmd_rewrite)

    d = sub.add_parser("diff", parents=[model, force], help="what a recipe changes: sites, graph regions, FLOPs, memory")
    d.add_argument("--html", help="write the self-contained HTML report to this file")
    d.add_argument("--json", help="write the diff as JSON (docs/report-schema.md) to this file")
    d.set_defaults(fn=cmd_diff)

    b = sub.add_parser("bench", help="benchmarks (tools/bench.py): pipeline | kernels | e2e | decode | linear | autotune | gpu",
                       add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=lambda a: __import__("attnforge.tools.bench", fromlist=["main"]).main(a.rest))

    g = sub.add_parser("generate", parents=[model], help="generate tokens with the rewritten model's own KV cache")
    g.add_argument("--prompt-ids", help="the prompt as token ids, e.g. 1,2,3")
    g.add_argument("--prompt", help="the prompt as text (tokenized with --tokenizer, or the model folder's)")
    g.add_argument("--tokenizer", help="tokenizer folder for --prompt (default: the model folder)")
    g.add_argument("--max-new-tokens", type=int, default=20, help="tokens to generate (default 20)")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, help="sampling temperature (> 0)")
    g.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    g.add_argument("--top-p", type=float, help="sample within this probability mass, in (0, 1]")
    g.add_argument("--seed", type=int, help="random seed for sampling")
    g.set_defaults(fn=cmd_generate)

    t = sub.add_parser("autotune", help="tune the kernels a rewritten model (or one op) runs; cache the winners")
    t.add_argument("--model", dest="spec", metavar="SPEC", help=f"model spec: {SPEC_FORMS}")
    t.add_argument("--recipe", default="exact", help="recipe for --model (default: exact)")
    t.add_argument("--input-shape", help="example input size for --model, e.g. 1,4096")
    t.add_argument("--task", help="Hugging Face head for a model folder")
    t.add_argument("--trust-pickle", action="store_true", help=_TRUST_PICKLE)
    t.add_argument("--op", help="tune one op instead: " + ", ".join(_tunable_ops()) + " (an op or rewrite name)")
    t.add_argument("--shapes", nargs="+", help="--op input shapes: BxHxNxD (attention ops) or ROWSxD_IN (ffn)")
    t.add_argument("--params", help="--op parameters, e.g. window=512,sinks=4,kv_heads=2,causal=1")
    t.add_argument("--dtype", default="float32", choices=DTYPES, help="--op/--model dtype (default float32)")
    t.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    t.add_argument("--backend", choices=("torch", "triton"),
                   help="kernels to tune (default: triton on cuda, torch on cpu; triton on cpu needs TRITON_INTERPRET=1)")
    t.add_argument("--cache", help="cache folder (default: $ATTNFORGE_CACHE_DIR or ~/.cache/attnforge)")
    t.add_argument("--budget", type=_seconds, help="seconds for the whole search, shared among the kernels")
    t.add_argument("--reps", type=_count, default=5, help="timed runs per config; the median counts (default 5)")
    t.add_argument("--show", action="store_true", help="list the cache and exit")
    t.set_defaults(fn=cmd_autotune, strict=True, atol=None, model=None)

    cg = sub.add_parser("codegen", help="print the Triton source generated for a kernel spec")
    cg.add_argument("--dump", required=True, metavar="SPEC",
                    help="e.g. mask=window,window=512,sinks=4,head_dim=80,groups=2,dtype=float16")
    cg.add_argument("--arch", type=int, metavar="SM",
                    help="also compile it for this NVIDIA compute capability (e.g. 90), no GPU needed")
    cg.set_defaults(fn=cmd_codegen)

    ev = sub.add_parser("eval", help="task benchmarks of the rewrites: recall")
    bench = ev.add_subparsers(dest="benchmark", required=True)
    er = bench.add_parser("recall", parents=[force], help="MQAR recall vs KV-cache bytes of every approximate recipe "
                                                          "(trains a small model once, cached)")
    er.add_argument("--context", type=int, default=256, help="tokens per sequence: context/4 key-value pairs, each "
                                                             "queried once (default 256)")
    er.add_argument("--layers", type=int, default=2, help="layers of the trained Llama (default 2)")
    er.add_argument("--hidden", type=int, default=128, help="its hidden size, heads of 32 channels (default 128)")
    er.add_argument("--seed", type=int, default=0, help="training seed; held-out data comes from another stream")
    er.add_argument("--recipes", help="comma-separated families (sliding_window, linear, based, gqa, snapkv, "
                                      "streaming_heads, think) or row names (default: all)")
    er.add_argument("--sequences", type=_count, default=256, help="held-out sequences (default 256)")
    er.add_argument("--json", help="write the rows as JSON to this file")
    er.add_argument("--retrain", action="store_true", help="train again even if the cache holds the model")
    er.set_defaults(fn=cmd_eval_recall)

    rc = sub.add_parser("recipes", help="list builtin recipes")
    rc.add_argument("--schema", action="store_true", help="print the JSON Schema of recipe files")
    rc.set_defaults(fn=cmd_recipes)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except AttnforgeError as e:  # bad spec, recipe or shape: the message names the problem
        print(f"attnforge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
