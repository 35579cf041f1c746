"""Model specs the CLI accepts, each loaded as ``(model, args, kwargs)``.

``demo:NAME``                 a built-in demo (attnforge/demos.py)
``path/to/file.py:fn``        a callable returning ``model``, ``(model, example_inputs)`` or ``(model, args, kwargs)``
``package.module:fn``         the same, imported by module name
``path/to/hf-folder``         a local Hugging Face model (config.json + weights), offline; ``task`` picks the head
``path/to/program.pt2``       an ExportedProgram from ``torch.export.save``, with its stored example inputs

``input_shape`` makes example inputs when the spec has none (a model alone, a .pt2 saved without
inputs, a Hugging Face model: token ids for text models, random pixels/values otherwise).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path

import torch
from torch import nn

from .errors import SpecError

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


def load_spec(spec: str, input_shape: tuple[int, ...] | None = None, task: str | None = None):
    """``(model, args, kwargs)`` for a spec string; ``SpecError`` saying why when it cannot be loaded."""
    if spec.startswith("demo:"):
        from .demos import build_demo

        try:
            return build_demo(spec[5:], input_shape=input_shape)
        except KeyError as e:
            raise SpecError(str(e.args[0])) from None
    path = Path(spec)
    if spec.endswith(".pt2"):
        return _load_pt2(_existing(path), input_shape)
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
    if target.endswith(".py"):
        path = _existing(Path(target)).resolve()
        mod_spec = importlib.util.spec_from_file_location(f"attnforge_spec_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.path.insert(0, str(path.parent))  # the file's own imports of its neighbours
        try:
            mod_spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.parent))
    else:
        if "/" in target or "\\" in target:
            raise SpecError(f"model file {target!r} must be a .py file")
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise SpecError(f"cannot import module {target!r}: {e}") from None
    if not callable(getattr(module, fn, None)):
        raise SpecError(f"{target} has no function {fn!r}")
    result = getattr(module, fn)()
    if isinstance(result, nn.Module):
        result = (result, None)
    if not (isinstance(result, tuple) and len(result) in (2, 3) and isinstance(result[0], nn.Module)):
        raise SpecError(f"{target}:{fn} returned {type(result).__name__}; expected a model, "
                        "(model, example_inputs) or (model, args, kwargs)")
    model = result[0].eval()
    if len(result) == 3:
        return model, tuple(result[1]), dict(result[2] or {})
    inputs = result[1]
    if inputs is None:
        if input_shape is None:
            raise SpecError(f"{target}:{fn} returned a model without example inputs: pass --input-shape")
        return model, (example_input(input_shape),), {}
    if isinstance(inputs, dict):
        return model, (), inputs
    return model, (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs), {}


def _load_pt2(path: Path, input_shape):
    try:
        ep = torch.export.load(str(path))
    except Exception as e:  # noqa: BLE001 - any load failure is a bad archive
        raise SpecError(f"{str(path)!r} is not a torch.export archive: {type(e).__name__}: {e}") from None
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
        model = cls.from_pretrained(str(path), local_files_only=True).eval()
    except Exception as e:  # noqa: BLE001 - report why transformers refused
        raise SpecError(f"cannot load Hugging Face model from {str(path)!r} with {cls.__name__}: "
                        f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
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
