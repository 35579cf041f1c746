"""Model specs the CLI accepts, each loaded as ``(model, args, kwargs)``.

``demo:NAME``                 a built-in demo (attnforge/demos.py)
``path/to/file.py:fn``        a callable returning ``model``, ``(model, example_inputs)`` or ``(model, args, kwargs)``
``package.module:fn``         the same, imported by module name
``path/to/hf-folder``         a local Hugging Face model (config.json + weights), offline; ``task`` picks the head
``path/to/program.pt2``       an ExportedProgram from ``torch.export.save``, with its stored example inputs

``input_shape`` makes example inputs when the spec has none (a model alone, a .pt2 saved without
inputs, a Hugging Face model: token ids for text models, random pixels/values otherwise).

What a spec may run: a ``.py`` or ``module:function`` spec runs its code (by design); a Hugging Face folder loads
config and weights (safetensors, or ``torch.load(weights_only=True)``) and never remote code; a ``.pt2`` loads as
data (attnforge/pt2.py) unless ``trust_pickle``. Inputs the model refuses are diagnosed by ``check_example``, which
``optimize`` runs when capture fails (no extra forward pass at load time).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import linecache
import pickle
import re
import sys
import traceback
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils.weak import WeakIdKeyDictionary

from .errors import SpecError, first_line
from .pt2 import load_exported, unpickle_reason

SPEC_FORMS = "demo:NAME, path/to/file.py:fn, package.module:fn, a Hugging Face model folder or a .pt2 archive"


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``"2,32"`` or ``"2x32"`` -> ``(2, 32)``."""
    if not text:
        return None
    try:
        shape = tuple(int(p) for p in re.split(r"[,x× ]+", text.strip()) if p)
    except ValueError:
        raise SpecError(f"--input-shape {text!r}: expected sizes like 2,32") from None
    if not shape or any(d <= 0 for d in shape):
        raise SpecError(f"--input-shape {text!r}: expected positive sizes like 2,32")
    return shape


def load_spec(spec: str, input_shape: tuple[int, ...] | None = None, task: str | None = None,
              trust_pickle: bool = False):
    """``(model, args, kwargs)`` for a spec string; ``SpecError`` saying why when it cannot be loaded.
    ``trust_pickle`` lets a .pt2 archive unpickle (run code); see attnforge/pt2.py."""
    if spec.startswith("demo:"):
        from .demos import build_demo

        try:
            return build_demo(spec[5:], input_shape=input_shape)
        except KeyError as e:
            raise SpecError(str(e.args[0])) from None
    path = Path(spec)
    if spec.endswith(".pt2"):
        return _load_pt2(_existing(path), input_shape, trust_pickle)
    target, _, fn = spec.rpartition(":")
    if target and fn.isidentifier():
        return _from_callable(target, fn, input_shape)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise SpecError(f"model folder {spec!r} has no config.json (not a Hugging Face model)")
        return _load_hf(path, input_shape, task)
    if path.suffix == ".py":
        raise SpecError(f"model spec {spec!r} names no function: use {spec}:FUNCTION")
    raise SpecError(f"unknown model spec {spec!r}: expected {SPEC_FORMS}")


def _existing(path: Path) -> Path:
    if not path.exists():
        raise SpecError(f"model file {str(path)!r} does not exist")
    return path


def example_input(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A random input: normal floats, or small non-negative integers (valid ids for any embedding)."""
    torch.manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=dtype)
    return torch.randint(0, 2, shape, dtype=dtype)


def _from_callable(target: str, fn: str, input_shape):
    name = f"{target}:{fn}"
    module = _run_module(target)
    if not callable(getattr(module, fn, None)):
        raise SpecError(f"{target} has no function {fn!r}")
    try:
        result = getattr(module, fn)()
    except Exception as e:  # noqa: BLE001 - the spec's own failure, reported with where it happened
        raise SpecError(f"model spec {name!r}: {fn}() raised {_raised(e)}") from None
    if isinstance(result, nn.Module):
        result = (result, None)
    if not (isinstance(result, tuple) and len(result) in (2, 3) and isinstance(result[0], nn.Module)):
        raise SpecError(f"{name} returned {type(result).__name__}; expected a model, "
                        "(model, example_inputs) or (model, args, kwargs)")
    model = result[0].eval()
    if len(result) == 3:
        args, kwargs = result[1], {} if result[2] is None else result[2]
        if isinstance(args, torch.Tensor):
            args = (args,)
        if not isinstance(args, (tuple, list)):
            raise SpecError(f"{name} returned args (the second element) as a {type(args).__name__}; expected a "
                            "tuple of positional inputs")
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise SpecError(f"{name} returned kwargs (the third element) as a {type(kwargs).__name__}; expected a "
                            "dict of keyword inputs {name: value} (or None)")
        return model, tuple(args), dict(kwargs)
    inputs = result[1]
    if inputs is None:
        if input_shape is None:
            raise SpecError(f"{name} returned a model without example inputs: pass --input-shape")
        return model, (example_input(input_shape),), {}
    if isinstance(inputs, dict):
        return model, (), inputs
    if isinstance(inputs, torch.Tensor):
        return model, (inputs,), {}
    if not isinstance(inputs, (tuple, list)):
        raise SpecError(f"{name} returned example_inputs (the second element) as a {type(inputs).__name__}; "
                        "expected a tensor, a tuple of inputs or a dict of keyword inputs")
    return model, tuple(inputs), {}


def _run_module(target: str):
    """Import the spec's module (a .py file, or a module by name); a ``SpecError`` with file:line if it fails."""
    if target.endswith(".py"):
        path = _existing(Path(target)).resolve()
        mod_spec = importlib.util.spec_from_file_location(f"attnforge_spec_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.path.insert(0, str(path.parent))  # the file's own imports of its neighbours
        try:
            mod_spec.loader.exec_module(module)
        except SyntaxError as e:
            raise SpecError(_syntax(e)) from None
        except Exception as e:  # noqa: BLE001 - the module's own failure
            raise SpecError(f"model spec {target!r}: running the file raised {_raised(e)}") from None
        finally:
            sys.path.remove(str(path.parent))
        return module
    if "/" in target or "\\" in target:
        raise SpecError(f"model file {target!r} must be a .py file")
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        raise SpecError(f"cannot import module {target!r}: {e}") from None
    except SyntaxError as e:
        raise SpecError(_syntax(e)) from None
    except Exception as e:  # noqa: BLE001
        raise SpecError(f"model spec {target!r}: importing it raised {_raised(e)}") from None


def _syntax(e: SyntaxError) -> str:
    return f"{e.filename}:{e.lineno}: syntax error in the model spec: {e.msg}"


def _raised(e: BaseException) -> str:
    """``Type: message (file:line)``, the message's first line, shortened; the place is the innermost frame."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {first_line(e)}{where}"


def _load_pt2(path: Path, input_shape, trust_pickle: bool = False):
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SpecError(f"cannot read model file {str(path)!r}: {e.strerror or e}") from None
    ep = load_exported(data, repr(str(path)), trust_pickle)
    stored = getattr(ep, "example_inputs", None)
    if stored is not None:
        return ep.module(), tuple(stored[0]), dict(stored[1])
    if input_shape is None:
        raise SpecError(f"{str(path)!r} stores no example inputs: pass --input-shape")
    user = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    first = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name in user)
    return ep.module(), (example_input(input_shape, first.meta["val"].dtype),), {}


def _auto_class(task: str | None):
    """``causal-lm`` / ``CausalLM`` / ``AutoModelForCausalLM`` -> that transformers class (AutoModel by default)."""
    import transformers

    if not task:
        return transformers.AutoModel
    key = re.sub(r"[-_ ]", "", task).lower()
    for name in dir(transformers):
        if name.startswith("AutoModelFor") and key in (name.lower(), name.lower()[len("automodelfor"):]):
            return getattr(transformers, name)
    raise SpecError(f"unknown --task {task!r}; e.g. causal-lm, masked-lm, sequence-classification, "
                    "image-classification (any transformers AutoModelFor* name)")


def _load_hf(path: Path, input_shape, task):
    """A local Hugging Face model, loaded without network, and example inputs for its main input."""
    cls = _auto_class(task)
    try:
        # never the folder's own code (trust_remote_code), never an unsafe unpickling of .bin weights
        model = cls.from_pretrained(str(path), local_files_only=True, trust_remote_code=False,
                                    weights_only=True).eval()
    except pickle.UnpicklingError as e:
        raise SpecError(f"cannot load Hugging Face model from {str(path)!r}: a weights file needs unpickling beyond "
                        f"tensors ({unpickle_reason(e)}); attnforge reads .bin weights with weights_only=True "
                        "(save the model as safetensors)") from None
    except Exception as e:  # noqa: BLE001 - report why transformers refused
        raise SpecError(f"cannot load Hugging Face model from {str(path)!r} with {cls.__name__}: "
                        f"{type(e).__name__}: {first_line(e)}") from None
    cfg, name = model.config, getattr(model, "main_input_name", "input_ids")
    if name == "input_ids":
        shape = input_shape or (1, 16)
        torch.manual_seed(0)
        kwargs = {name: torch.randint(0, cfg.vocab_size, shape)}
        if "attention_mask" in inspect.signature(type(model).forward).parameters and len(shape) == 2:
            mask = torch.ones(shape, dtype=torch.long)  # an optional input the ONNX graph keeps
            if shape[0] > 1:
                mask[-1, max(1, shape[1] * 5 // 8):] = 0
            kwargs["attention_mask"] = mask
        return model, (), kwargs
    if input_shape is None and name == "pixel_values" and hasattr(cfg, "image_size"):
        size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        input_shape = (1, getattr(cfg, "num_channels", 3), size, size)
    if input_shape is None:
        raise SpecError(f"{cls.__name__} reads {name!r}: pass --input-shape")
    return model, (), {name: example_input(input_shape)}


def check_example(model: nn.Module, args: tuple, kwargs: dict, label: str = "the model") -> None:
    """Run ``model`` once on its example inputs; when it fails, a ``SpecError`` naming the input that does not fit
    (its name, dtype and shape), the op or line that refused it and the error."""
    try:
        with torch.no_grad():
            model(*args, **kwargs)
        return
    except Exception:  # noqa: BLE001 - diagnosed below, on a second run that follows every input
        pass
    inputs = _named_inputs(model, args, kwargs)
    lineage = _Lineage(inputs)
    try:
        with torch.no_grad(), lineage:
            model(*args, **kwargs)
        return  # it ran the second time: nothing to blame
    except Exception as e:  # noqa: BLE001
        error = e
    op, blamed = lineage.failed[1:] if lineage.failed and lineage.failed[0] is error else ("", set())
    frame, place, code = _user_frame(error)
    if not blamed and frame is not None:  # an error in the model's own code: the inputs named on its line
        for word in set(re.findall(r"[A-Za-z_]\w*", code)):
            value = frame.f_locals.get(word)
            if isinstance(value, torch.Tensor):
                blamed |= lineage.seen.get(value, set())
    where = f" at {place}" + (f" ({code})" if code else "") if place else ""
    cause = f"{type(error).__name__}: {first_line(error)}{where}"
    if not blamed:
        listed = ", ".join(f"{n} {_describe(t)}" for n, t in inputs) or "none"
        raise SpecError(f"{label}: the model fails on its example inputs ({listed}): {cause}")
    culprits = ", ".join(f"{n} {_describe(t)}" for n, t in inputs if n in blamed)
    raise SpecError(f"{label}: the model fails on example input{'s' if len(blamed) > 1 else ''} {culprits}"
                    f"{f' in {op}' if op else ''}: {cause}")


def _describe(t: torch.Tensor) -> str:
    return f"({str(t.dtype).removeprefix('torch.')}{list(t.shape)})"


def _named_inputs(model: nn.Module, args: tuple, kwargs: dict) -> list[tuple[str, torch.Tensor]]:
    """Every example tensor by the forward parameter it is given to (``'x'``, ``'args[1]'``, ``'mask'['k']``)."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        bound = {**{f"args[{i}]": a for i, a in enumerate(args)}, **kwargs}
    out = []
    for name, value in bound.items():
        leaves, _ = pytree.tree_flatten_with_path(value)
        for path, leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                out.append((repr(name) + "".join(str(k) for k in path), leaf))
    return out


class _Lineage(TorchFunctionMode):
    """Follows which example inputs each tensor derives from; records the first torch function that raised, with
    the inputs its arguments derive from."""

    def __init__(self, inputs):
        super().__init__()
        self.seen = WeakIdKeyDictionary()
        for name, t in inputs:
            self.seen[t] = self.seen.get(t, set()) | {name}
        self.failed = None  # (exception, op name, input names)

    def _sources(self, tree) -> set:
        found = set()
        for leaf in pytree.tree_leaves(tree):
            if isinstance(leaf, torch.Tensor):
                found |= self.seen.get(leaf, set())
        return found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sources = self._sources((args, kwargs))
        try:
            out = func(*args, **kwargs)
        except Exception as e:
            if self.failed is None:
                self.failed = (e, getattr(func, "__name__", str(func)), sources)
            raise
        if sources:
            for leaf in pytree.tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    self.seen[leaf] = self.seen.get(leaf, set()) | sources
        return out


def _user_frame(error: BaseException):
    """``(frame, "file:line", source line)`` of the innermost traceback entry in the model's code (not torch's,
    not this module's); ``(None, "", "")`` when there is none."""
    torch_dir = str(Path(torch.__file__).parent)
    found, tb = None, error.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if not filename.startswith(torch_dir) and filename != __file__:
            found = tb
        tb = tb.tb_next
    if found is None:
        return None, "", ""
    filename = found.tb_frame.f_code.co_filename
    code = linecache.getline(filename, found.tb_lineno).strip()
    return found.tb_frame, f"{filename}:{found.tb_lineno}", code[:120]
