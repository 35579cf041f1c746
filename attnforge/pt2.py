"""Load a ``torch.export`` archive (.pt2) as data: nothing in it may run code.

``torch.export.load`` unpickles parts of an archive (it retries a failed safe load with ``weights_only=False``,
unpickles opaque constants with ``pickle``), evaluates its symbolic-shape strings with ``sympy.sympify`` (an
``eval``), imports the modules its input specs name and runs AOTInductor libraries shipped inside it. Before the
archive is loaded, ``load_exported`` checks it: every pickled record must load with ``weights_only=True``, no
constant may be a pickled Python object, no compiled code may be shipped, every shape expression must be a plain
sympy expression and every module named must be imported already or installed (``may_import``). It is then
loaded with ``torch.load`` forced to ``weights_only=True``. An archive that fails a check is refused with a
``SpecError`` saying why; whoever trusts the file may pass ``trust_pickle=True`` (``--trust-pickle``), which
loads it with ``torch.export.load`` as is.
"""
from __future__ import annotations

import ast
import builtins
import contextlib
import importlib.util
import io
import json
import keyword
import os
import pickle
import re
import sys
import tokenize
from pathlib import Path

import torch

from .errors import SpecError, first_line

OPT_IN = "--trust-pickle"
_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_NO_FORCE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
_OPS = {"+", "-", "*", "/", "//", "%", "**", "(", ")", ",", "=", "==", "!=", "<", ">", "<=", ">=", "&", "|", "~"}
_NAME_STRING = re.compile(r"[A-Za-z][A-Za-z0-9_]*|[-+]?[0-9.]+(e[-+]?[0-9]+)?")


class Refused(SpecError):
    """An archive that loading would make run code (or unpickle objects)."""


def load_exported(data: bytes, label: str, trust_pickle: bool = False):
    """The ExportedProgram in the .pt2 bytes ``data`` (``label`` names it in errors); refused with a ``SpecError``
    when loading it could run code, unless ``trust_pickle``."""
    from torch.export.pt2_archive._package import load_pt2

    if trust_pickle:
        return _load(lambda: torch.export.load(io.BytesIO(data)), label)
    check_archive(data, label)
    with _weights_only():
        contents = _load(lambda: load_pt2(io.BytesIO(data)), label)
    if "model" not in contents.exported_programs:
        raise SpecError(f"{label} holds no program named 'model' (it has {sorted(contents.exported_programs)})")
    return contents.exported_programs["model"]


def _load(fn, label: str):
    try:
        return fn()
    except pickle.UnpicklingError as e:  # the forced weights_only load refused something the checks let by
        raise _refuse(label, f"a record needs unpickling beyond tensors ({unpickle_reason(e)})") from None
    except Exception as e:  # noqa: BLE001 - any load failure is a bad archive
        raise SpecError(f"{label} is not a loadable torch.export archive: {type(e).__name__}: {first_line(e)}") from None


def _refuse(label: str, why: str) -> Refused:
    return Refused(f"refusing to load {label}: {why}. Loading it would run code from the file; if you trust "
                   f"whoever made it, pass {OPT_IN} (trust_pickle=True)")


def check_archive(data: bytes, label: str) -> None:
    """Raise ``Refused`` when loading the archive ``data`` could run code; ``SpecError`` when it is no archive."""
    from torch.export.pt2_archive import PT2ArchiveReader
    from torch.export.pt2_archive import constants as c

    try:
        reader = PT2ArchiveReader(io.BytesIO(data))
        names = reader.get_file_names()
    except Exception as e:  # noqa: BLE001 - not a zip, or not in torch.export.save's format
        raise SpecError(f"{label} is not a torch.export archive in this torch's format (torch.export.save): "
                        f"{type(e).__name__}: {first_line(e)}") from None
    if any(n.startswith(c.AOTINDUCTOR_DIR) for n in names):
        raise _refuse(label, f"it ships AOTInductor compiled code ({c.AOTINDUCTOR_DIR})")
    for name in names:
        if name.endswith(".pt"):  # sample inputs, and weights or constants of the legacy layout
            _check_pickle(reader.read_bytes(name), label, name)
        elif name.startswith(c.MODELS_DIR) and name.endswith(".json"):
            _check_program(_json(reader, name, label), label, name)
        elif name.endswith(("_weights_config.json", "_constants_config.json")):
            folder = c.WEIGHTS_DIR if name.startswith(c.WEIGHTS_DIR) else c.CONSTANTS_DIR
            for fqn, meta in (_json(reader, name, label).get("config") or {}).items():
                path = str(meta.get("path_name", ""))
                if path.startswith((c.CUSTOM_OBJ_FILENAME_PREFIX, c.OPAQUE_OBJ_FILENAME_PREFIX)):
                    raise _refuse(label, f"its constant {fqn!r} is a pickled Python object ({folder}{path})")
                if meta.get("use_pickle"):
                    _check_pickle(reader.read_bytes(folder + path), label, folder + path)


def _json(reader, name: str, label: str):
    try:
        return json.loads(reader.read_string(name))
    except (ValueError, UnicodeDecodeError) as e:
        raise SpecError(f"{label}: {name} is not valid JSON: {first_line(e)}") from None


def _check_pickle(blob: bytes, label: str, name: str) -> None:
    """``blob`` must unpickle with ``weights_only=True`` (tensors, containers, numbers, strings)."""
    if not blob:
        return
    try:
        torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise _refuse(label, f"{name} needs unpickling beyond tensors ({unpickle_reason(e)})") from None
    except Exception as e:  # noqa: BLE001 - a broken record
        raise SpecError(f"{label}: {name} is not a readable tensor file: {type(e).__name__}: {first_line(e)}") from None


def _check_program(tree, label: str, name: str) -> None:
    """Walk a serialized program (and the JSON strings inside it: input specs, their contexts)."""
    if isinstance(tree, dict):
        if isinstance(tree.get("expr_str"), str):
            check_expr(tree["expr_str"], label, name)
        module = tree.get("default_factory_module")
        if "__enum__" in tree:
            module = str(tree.get("fqn", "")).partition(":")[0]
        if module is not None and not may_import(str(module)):
            raise _refuse(label, f"{name} names module {str(module)[:80]!r}, which loading would import")
        for value in tree.values():
            _check_program(value, label, name)
    elif isinstance(tree, list):
        for value in tree:
            _check_program(value, label, name)
    elif isinstance(tree, str) and tree[:1] in ("[", "{"):
        try:
            inner = json.loads(tree)
        except ValueError:
            return
        _check_program(inner, label, name)


def may_import(module: str) -> bool:
    """Whether a module an archive names may be imported: one imported already, or one of an installed package
    (its top-level package in site-packages), never a file lying next to the archive or in the working folder."""
    if module in sys.modules:
        return True
    top = module.partition(".")[0]
    if not top.isidentifier():
        return False
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    origin = (spec.origin or "") if spec else ""
    return any(part in ("site-packages", "dist-packages") for part in Path(origin).parts)


def check_expr(text: str, label: str = "archive", name: str = "") -> None:
    """A symbolic-shape string must be a plain sympy expression (``Symbol('s0', integer=True)``, ``Mul(...)``,
    ``s0*8``): sympy names, numbers, simple string literals, arithmetic. torch ``eval``s it on load."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        tokens = None
    bad = "it does not tokenize" if tokens is None else None
    for i, tok in enumerate(tokens or []):
        if bad:
            break
        nxt = tokens[i + 1].string if i + 1 < len(tokens) else ""
        if tok.type == tokenize.NAME:
            bad = None if (nxt == "=" and not keyword.iskeyword(tok.string)) or _sympy_name(tok.string) \
                else f"name {tok.string!r}"
        elif tok.type == tokenize.STRING:
            bad = None if _plain_string(tok.string) else f"string {tok.string[:40]!r}"
        elif tok.type == tokenize.OP:
            bad = None if tok.string in _OPS else f"operator {tok.string!r}"
        elif tok.type not in (tokenize.NUMBER, tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER):
            bad = f"token {tok.string[:40]!r}"
    if bad:
        where = f"{name}: " if name else ""
        raise _refuse(label, f"{where}the shape expression {text[:80]!r} is not a plain sympy expression ({bad})")


def _sympy_name(name: str) -> bool:
    """A sympy expression class or constant (``Mul``, ``Symbol``, ``oo``), torch's sympy functions, True/False/
    None, or a name unknown to sympy and to Python (sympy makes it a Symbol)."""
    import sympy
    import torch.utils._sympy.functions as torch_sympy

    if keyword.iskeyword(name):
        return name in ("True", "False", "None")
    if name.startswith("_"):
        return False
    obj = getattr(torch_sympy, name, None) or getattr(sympy, name, None)
    if obj is None:
        return not hasattr(builtins, name)
    return isinstance(obj, sympy.Basic) or (isinstance(obj, type) and issubclass(obj, sympy.Basic))


def _plain_string(literal: str) -> bool:
    try:
        value = ast.literal_eval(literal)
    except Exception:  # noqa: BLE001 - not a plain literal
        return False
    return isinstance(value, str) and _NAME_STRING.fullmatch(value) is not None


@contextlib.contextmanager
def _weights_only():
    """Force every ``torch.load`` to ``weights_only=True`` (torch's own switch), so no fallback unpickles."""
    saved = {k: os.environ.pop(k, None) for k in (_FORCE, _NO_FORCE)}
    os.environ[_FORCE] = "1"
    try:
        yield
    finally:
        os.environ.pop(_FORCE, None)
        os.environ.update({k: v for k, v in saved.items() if v is not None})


def unpickle_reason(e: Exception) -> str:
    """What a refused ``weights_only`` load names (``the pickle names the global os.system``), in short."""
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    return f"the pickle names the global {found.group(1)}" if found else first_line(e)
