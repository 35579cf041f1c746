"""``OptimizedModel``: the rewritten model, which behaves like the model it came from (DESIGN.md, "The artifact").

It holds one *program* (a captured, rewritten, verified graph, attnforge/optimize.py) per call form: a call binds
to the original forward's signature (positional or keyword, which optional inputs are given, the flags, the
training mode, the inputs' dtypes and ranks: ``attnforge.capture.call_form``), and a form not seen before is
captured and rewritten again with the same recipe, in the manner of torch.compile's recompilation (counted in
``report.recaptures``, at most ``MAX_PROGRAMS``, least recently used evicted). Every program shares one set of
tensors: those of the first program, registered on this module under the original model's names, so
``state_dict()`` has the original keys wherever the rewrite kept a weight and an original checkpoint loads.

``.to(dtype)``, ``.half()``, ``.to(device)`` convert the tensors; the programs, whose graphs record dtypes and
devices, are captured again from the converted model on the next call (the tensors, trained or not, are kept).
``attnforge.save`` / ``attnforge.load`` write and read the programs as torch.export archives with the recipe and
the report; ``torch.save(opt)`` says to use them.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import io
import json
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from attnforge.passes.base import REPLAY
from attnforge.runtime.dispatch import use_backend

from .capture import CallForm, Uncapturable, call_form
from .errors import AttnforgeError, CaptureError
from .optimize import Program, build_program
from .pt2 import load_exported, may_import
from .recipe import Recipe, load_recipe
from .report import MissRecord, Report, SiteRecord

MAX_PROGRAMS = 8
FORMAT = 1  # of attnforge.save archives


class OptimizedModel(nn.Module):
    """The rewritten model. Call it like the original; ``.report`` (what the rewrite did), ``.graph_module`` (the
    first program's graph), ``.recipe``, ``.backend`` (the kernels its ops run on: runtime/dispatch.py),
    ``.config`` (a Hugging Face model's)."""

    def __init__(self, source: Optional[nn.Module], recipe: Recipe, backend: str, options: dict,
                 program: Optional[Program], report: Report):
        super().__init__()
        object.__setattr__(self, "_source", source)  # attnforge's copy of the model: not a submodule
        self.recipe, self.backend, self.report = recipe, backend, report
        self._options = dict(options)
        self._programs: OrderedDict = OrderedDict()
        self._failed: dict = {}  # call forms that could not be captured: they run the model eagerly
        self._warned: set = set()
        self._static_forms = False  # whether some calls needed a static graph of their exact shapes
        self._decoders: dict = {}  # placement -> the generation decoder (attnforge/generate.py)
        self._example_form = program.form if program is not None else None  # the call optimize was given
        self.train(bool(source.training) if source is not None else False)
        if program is not None:
            self._programs[program.form] = program
            self._adopt(program.gm)
        elif source is not None:
            self._adopt(source)  # a passthrough: the model's own tensors, under their names

    # ------------------------------------------------------------------ views

    @property
    def program(self) -> Optional[Program]:
        """The program of the example call ``optimize`` was given (else the oldest one kept; None when nothing was
        captured). Later call forms, generation's included, have programs of their own (``programs``)."""
        if not self._programs:
            return None
        return self._programs.get(self._example_form) or next(iter(self._programs.values()))

    @property
    def graph_module(self):
        """The example call's rewritten ``fx.GraphModule`` (None when the model could not be captured)."""
        return self.program.gm if self._programs else None

    @property
    def module(self) -> nn.Module:
        """What runs the first call form: its graph, or the original model when nothing was captured."""
        return self.graph_module if self._programs else self._source

    @property
    def programs(self) -> list[Program]:
        return list(self._programs.values())

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("config", "generation_config", "main_input_name", "name_or_path") and \
                    self.__dict__.get("_source") is not None and hasattr(self.__dict__["_source"], name):
                return getattr(self.__dict__["_source"], name)
            raise

    # ------------------------------------------------------------------ calls

    def forward(self, *args, **kwargs):
        with use_backend(self.backend):
            if self._source is None:
                return self._run_loaded(args, kwargs)
            if not self._programs and self.report.capture_error:
                return self._source(*args, **kwargs)
            try:
                form, inputs = call_form(self._source, args, kwargs, self.training)
            except Uncapturable as e:
                self._warn(f"eager:{e}", f"this call runs the original model: {e}")
                return self._source(*args, **kwargs)
            if self._static_forms:  # shapes this form's dynamic graph excluded, seen before
                exact = dataclasses.replace(form, shapes=tuple(tuple(t.shape) for t in inputs))
                if exact in self._programs:
                    self._programs.move_to_end(exact)
                    return self._programs[exact].gm(*inputs)
            program = self._programs.get(form)
            if program is None:
                program = self._recapture(form, args, kwargs)
                if program is None:
                    return self._source(*args, **kwargs)
            else:
                self._programs.move_to_end(form)
            try:
                return program.gm(*inputs)
            except (AssertionError, RuntimeError) as e:
                if not _excluded_by_guards(e):
                    raise
                return self._run_exact_shapes(form, inputs, args, kwargs, e)

    def _program_for(self, args, kwargs) -> Optional[Program]:
        """The inference program of a call (captured when new), or None when it cannot be captured."""
        form, _ = call_form(self._source, args, kwargs, False)
        return self._programs.get(form) or self._recapture(form, args, kwargs)

    def _failed_reason(self, args, kwargs) -> str:
        form, _ = call_form(self._source, args, kwargs, False)
        return self._failed.get(form, "unknown")

    def _source_signature(self) -> set:
        import inspect

        return set(inspect.signature(type(self._source).forward).parameters)

    # ------------------------------------------------------------------ generation

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Hugging Face-style generation over attnforge's own KV cache (attnforge/generate.py): the prompt and the
        new tokens as a LongTensor, or with ``return_dict_in_generate=True`` the output object with
        ``.sequences`` and the per-step ``.logits``/``.scores``. A model that was not captured generates with its
        own ``generate``."""
        from .generate import generate

        if not self._programs and self.report.capture_error and hasattr(self._source, "generate"):
            return self._source.generate(input_ids, attention_mask=attention_mask, **kwargs)
        return generate(self, input_ids, attention_mask, **kwargs)

    def kv_cache_bytes(self, batch_size: int, context_length: int) -> int:
        """Bytes the decode state (every layer's cache) holds for ``batch_size`` sequences of ``context_length``."""
        from .generate import decoder_for

        decoder = decoder_for(self, torch.zeros(1, 8, dtype=torch.long))
        return int(decoder.cache_bytes(batch_size, context_length)[1])

    def _run_exact_shapes(self, form: CallForm, inputs, args, kwargs, error: Exception):
        """A call at shapes the graph's guards exclude (a size the capture had to fix): a static graph for exactly
        these shapes, captured like any other program; the original model if that fails (its own error, if any)."""
        exact = dataclasses.replace(form, shapes=tuple(tuple(t.shape) for t in inputs))
        self._static_forms = True
        program = self._programs.get(exact) or self._recapture(exact, args, kwargs, dynamic=False,
                                                                why=f"shapes the graph excludes ({error})")
        if program is None:
            return self._source(*args, **kwargs)
        return program.gm(*inputs)

    def _run_loaded(self, args, kwargs):
        """A model read by ``attnforge.load``: the saved program whose call form this call has."""
        for program in self._programs.values():
            form = program.form
            try:
                named = _bind_loaded(form, args, kwargs)
            except TypeError:
                continue
            given = {k: v for k, v in named.items() if not isinstance(v, torch.Tensor) and k not in ("use_cache",)}
            if [k for k, v in named.items() if isinstance(v, torch.Tensor)] == list(form.tensors) and \
                    all(dict(form.consts).get(k, v) == v for k, v in given.items()) and form.training == self.training:
                return program.gm(*(named[n] for n in form.tensors))
        raise AttnforgeError(f"this model was loaded from an archive with programs for "
                             f"{[p.form.describe() for p in self.programs]}; other calls need the original model: "
                             "optimize it again")

    @torch._dynamo.disable
    def _recapture(self, form: CallForm, args, kwargs, *, dynamic: Optional[bool] = None,
                   why: str = "") -> Optional[Program]:
        """Capture and rewrite the model again for a new call form (the recipe's decisions re-applied), with the
        tensors of this model; None (and the model runs eagerly for this form) when it cannot be captured."""
        if form in self._failed:
            return None
        why = why or self._why(form)
        options = dict(self._options)
        if dynamic is not None:
            options["dynamic"] = dynamic
        replay = REPLAY.set(True)
        try:
            program = build_program(self._source, self.recipe, args, kwargs, backend=self.backend,
                                    training=form.training, **options)
            program.form = form
        except CaptureError as e:
            self._failed[form] = str(e)
            self._warn(f"fail:{form}", f"the call {form.describe()} could not be captured, it runs the original "
                                       f"model: {e}")
            self.report.recaptures.append({"why": why, "form": form.describe(), "counts": {}, "error": str(e)})
            return None
        finally:
            REPLAY.reset(replay)
        self._tie(program.gm)
        program.gm.train(form.training)
        if not self._programs:
            self._adopt(program.gm)
        self._programs[form] = program
        if len(self._programs) > MAX_PROGRAMS:
            evicted, _ = self._programs.popitem(last=False)
            self._warn("evict", f"more than {MAX_PROGRAMS} call forms: the least recently used are dropped and "
                                f"captured again when they come back (first dropped: {evicted.describe()})")
        self.report.recaptures.append({"why": why, "form": form.describe(), "counts": program.report.counts(),
                                       "passed": program.report.passed, "outputs": program.report.outputs})
        return program

    def _why(self, form: CallForm) -> str:
        first = next(iter(self._programs), None)
        if first is None:
            return f"{form.describe()} after a dtype or device change"
        if form.training != first.training:
            return f"{'training' if form.training else 'inference'} mode {form.describe()}"
        return f"another call form {form.describe()}"

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"attnforge: {message}", RuntimeWarning, stacklevel=4)

    # ------------------------------------------------------------------ one set of tensors

    def _adopt(self, gm: nn.Module) -> None:
        """Register ``gm``'s submodules and own tensors on this module: its state is ``state_dict()``, under the
        original names."""
        self._modules.clear()
        self._modules.update(gm._modules)
        self._parameters.clear()
        self._parameters.update(gm._parameters)
        self._buffers.clear()
        self._buffers.update(gm._buffers)
        self._non_persistent_buffers_set = set(gm._non_persistent_buffers_set)

    def _tie(self, gm) -> None:
        """Point ``gm``'s parameters and buffers at this model's tensors of the same name (and shape and dtype), so
        every program reads and trains one set of weights."""
        if not self._modules and not self._parameters:
            return
        mine = dict(self.named_parameters(remove_duplicate=False))
        buffers = dict(self.named_buffers(remove_duplicate=False))
        for table, names, kind in ((mine, gm.named_parameters(remove_duplicate=False), "_parameters"),
                                   (buffers, gm.named_buffers(remove_duplicate=False), "_buffers")):
            for name, t in list(names):
                have = table.get(name)
                if have is not None and have is not t and have.shape == t.shape and have.dtype == t.dtype:
                    owner, _, leaf = name.rpartition(".")
                    getattr(gm.get_submodule(owner) if owner else gm, kind)[leaf] = have

    def _apply(self, fn, recurse=True):
        """dtype and device moves: the tensors are converted, and the programs (which record dtypes and devices in
        their graphs) are captured again from the converted model on the next call."""
        before = self._placement()
        super()._apply(fn, recurse)
        if self.__dict__.get("_source") is not None:
            self._source._apply(fn)
        for program in getattr(self, "_programs", {}).values():
            program.gm._apply(fn)
        if before is not None and self._placement() != before:
            if self._source is None:
                raise AttnforgeError("a model loaded from an archive runs at the dtype and device it was saved with "
                                     f"({before[0]} on {before[1]}): optimize the original model after moving it")
            self._programs.clear()
            self._failed.clear()
            self._decoders.clear()
        return self

    def _placement(self):
        for t in self.parameters():
            if t.is_floating_point():
                return str(t.dtype), str(t.device)
        return None

    def train(self, mode: bool = True):
        """Training mode selects (or captures) the programs of that mode; the graphs' own flags follow."""
        super().train(mode)
        for program in self.__dict__.get("_programs", {}).values():
            program.gm.train(mode)
        return self

    # ------------------------------------------------------------------ copies and files

    def __reduce_ex__(self, protocol):
        raise TypeError("an OptimizedModel is not pickled: use attnforge.save(model, path) and attnforge.load(path) "
                        "(a torch.export archive with the recipe and the report)")

    def __deepcopy__(self, memo):
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        return new

    def save_pretrained(self, path, **kwargs) -> Path:
        """A Hugging Face-style folder: ``model.safetensors`` (this model's ``state_dict``, original names where
        weights are unchanged), the model's ``config.json``, and ``attnforge.json`` (the recipe and the report)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().clone() for k, v in self.state_dict().items()}
        save_file(state, str(path / "model.safetensors"),
                  metadata={"format": "pt", "attnforge_recipe": self.recipe.name})
        config = getattr(self._source, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(str(path))
        (path / "attnforge.json").write_text(json.dumps({"recipe": self.recipe.model_dump(),
                                                         "report": self.report.to_dict()}, indent=1, default=str))
        return path


def _excluded_by_guards(e: Exception) -> bool:
    """Whether a graph refused its inputs: a shape guard or an input check of torch.export's module."""
    text = str(e)
    return "Guard failed" in text or "Expected input at" in text


def _bind_loaded(form: CallForm, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by name against a loaded form's signature (its tensors in order, flags by keyword)."""
    bound = form.signature.bind(None, *args, **kwargs)
    named = {k: v for k, v in bound.arguments.items() if k not in ("self", "kwargs")}
    named.update(bound.arguments.get("kwargs", {}))
    return named


def save(model: OptimizedModel, path) -> Path:
    """Write ``model`` to one file: each program as a torch.export archive (the rewritten graph with its weights;
    the attnforge ops it calls are registered again by importing attnforge), the recipe, the report and the call
    forms. ``attnforge.load(path)`` reads it back in any process."""
    if not isinstance(model, OptimizedModel):
        raise TypeError(f"attnforge.save takes the result of attnforge.optimize, not {type(model).__name__}")
    if not model.programs:
        raise AttnforgeError("nothing to save: the model was not captured (its report says why)")
    path = Path(path)
    meta = {"format": FORMAT, "recipe": model.recipe.model_dump(), "report": model.report.to_dict(),
            "backend": model.backend, "programs": []}
    with zipfile.ZipFile(path, "w") as archive:
        for i, program in enumerate(model.programs):
            ep = _export(program)
            buf = io.BytesIO()
            torch.export.save(ep, buf)
            archive.writestr(f"program_{i}.pt2", buf.getvalue())
            form = program.form
            meta["programs"].append({"tensors": list(form.tensors), "consts": [list(c) for c in form.consts],
                                     "training": form.training, "specs": [list(s) for s in form.specs],
                                     "positional": list(form.positional), "output_modules": _output_modules(ep)})
        archive.writestr("attnforge.json", json.dumps(meta, indent=1, default=str))
    return path


def _output_modules(ep) -> list[str]:
    """Modules defining the output's container types (e.g. transformers.modeling_outputs): imported before a load,
    since a type is known to torch.export's deserializer once its module has registered it."""
    found = set()

    def walk(spec):
        t = getattr(spec, "type", None)
        if isinstance(t, type) and t.__module__.split(".")[0] not in ("builtins", "torch", "collections"):
            found.add(t.__module__)
        for child in getattr(spec, "children_specs", []):
            walk(child)

    for sig in ep.module_call_graph:
        if sig.signature is not None:
            walk(sig.signature.out_spec)
    return sorted(found)


def _export(program: Program):
    """The program's graph as an ExportedProgram, batch and sequence dims kept symbolic."""
    auto = torch.export.Dim.AUTO
    shapes = {name: {i: auto for i in range(rank)} for name, (_, rank) in zip(program.form.tensors,
                                                                            program.form.specs)}
    holders = [n.name for n in program.gm.graph.nodes if n.op == "placeholder"]
    try:
        return torch.export.export(program.gm, tuple(program.example), dynamic_shapes=dict(zip(holders,
                                                                                               shapes.values())),
                                   strict=False)
    except Exception:  # noqa: BLE001 - a graph whose shapes cannot stay symbolic is saved with static ones
        return torch.export.export(program.gm, tuple(program.example), strict=False)


def load(path, trust_pickle: bool = False) -> OptimizedModel:
    """Read a model written by ``attnforge.save``. It serves the call forms that were saved, at their dtype and
    device; anything else needs the original model (optimize it again). The programs load as data (attnforge/pt2.py:
    nothing unpickled, no module imported but installed ones) unless ``trust_pickle``."""
    import inspect

    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
        meta = json.loads(archive.read("attnforge.json"))
    except (OSError, KeyError, zipfile.BadZipFile, ValueError) as e:
        raise AttnforgeError(f"{str(path)!r} is not an attnforge archive: {type(e).__name__}: {e}") from None
    if meta.get("format") != FORMAT:
        raise AttnforgeError(f"{str(path)!r} is an attnforge archive of format {meta.get('format')}; this version "
                             f"reads format {FORMAT}")
    recipe = load_recipe(meta["recipe"])
    data = meta["report"]
    report = Report(**{k: v for k, v in data.items() if k in Report.__dataclass_fields__
                       and k not in ("sites", "misses")})
    report.sites = [SiteRecord(**d) for d in data.get("sites", [])]
    report.misses = [MissRecord(**d) for d in data.get("misses", [])]
    opt = OptimizedModel(None, recipe, meta.get("backend", "auto"), {}, None, report)
    for i, info in enumerate(meta["programs"]):
        for module in info.get("output_modules", []):
            if trust_pickle or may_import(str(module)):
                with contextlib.suppress(ImportError):
                    importlib.import_module(module)
        ep = load_exported(archive.read(f"program_{i}.pt2"), f"{str(path)!r} (program_{i}.pt2)", trust_pickle)
        gm = ep.module()
        for name in ("train", "eval"):
            gm.__dict__.pop(name, None)
        params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)] + [
            inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in info["tensors"]]
        form = CallForm(tuple(info["tensors"]), tuple((k, v) for k, v in info["consts"]), info["training"],
                        tuple((d, r) for d, r in info["specs"]), tuple(info["positional"]),
                        signature=inspect.Signature(params + [inspect.Parameter("kwargs",
                                                                                inspect.Parameter.VAR_KEYWORD)]))
        gm.meta["attnforge_form"] = form
        program = Program(form, gm, report)
        opt.train(form.training)
        if not opt._programs:
            opt._adopt(gm)
        else:
            opt._tie(gm)
        opt._programs[form] = program
    return opt
