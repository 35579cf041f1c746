"""The CLI's output paths, checked before any work (docs/cli.md, "Outputs").

An output's folder must exist, the path must not be a folder (or, for a folder output, a file), one of the
command's inputs or another output, and an existing file is replaced only with ``--force`` or when it is an
attnforge artifact from an earlier run: an ONNX file whose ``metadata_props`` say ``producer: attnforge``, a
JSON report, diff or decode layout (``"producer": "attnforge"``, or the keys those writers have always
written), or an HTML report with attnforge's generator tag.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from attnforge.errors import AttnforgeError

PRODUCER = "attnforge"  # the marker the writers put in what they write
HTML_MARK = "<meta name='generator' content='attnforge'>"
_JSON_SHAPES = ({"schema_version", "uncounted_ops", "attention_memory"},  # a diff (docs/report-schema.json)
                {"capture_method", "counts", "sites", "outputs"},  # a rewrite report (Report.to_dict)
                {"file", "inputs", "outputs", "layers"})  # a decode layout (docs/generation.md)
_MAX_JSON = 64 << 20  # larger JSON files are not read: not ours


def spec_inputs(spec: str) -> list[Path]:
    """The files or folder a model spec reads (docs/cli.md, "Model specs"), found without running anything: a
    ``file.py``, a ``.pt2``, a model folder, or a top-level module's file; none for a demo or a dotted module
    (finding its file would import its package)."""
    if spec.startswith("demo:"):
        return []
    target, _, fn = spec.rpartition(":")
    if not (target and fn.isidentifier()):
        return [Path(spec)]
    if target.endswith(".py"):
        return [Path(target)]
    if target.isidentifier():
        import importlib.util

        try:
            found = importlib.util.find_spec(target)
        except (ImportError, ValueError):
            return []
        return [Path(found.origin)] if found is not None and found.origin and found.has_location else []
    return []


def check_outputs(outputs: dict[str, str | None], inputs: list[Path], force: bool, folder: str = "") -> None:
    """Raise ``AttnforgeError`` naming the option and the path when an output cannot or must not be written.

    ``outputs``: option -> path (None: not given); ``inputs``: files and folders the command reads (a folder
    covers what is inside it); ``folder``: the option whose path is a folder the command fills (the files it
    writes there are checked as outputs of that option)."""
    inputs = [p.resolve() for p in inputs]
    seen: dict[Path, str] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        p = Path(path)
        if option == folder:
            if p.exists() and not p.is_dir():
                raise AttnforgeError(f"{option} {path}: is a file; this output is a folder")
            if p.resolve() in inputs:
                raise AttnforgeError(f"{option} {path}: is an input of this command; it would be overwritten")
            files = [p / "model.onnx", p / "decode_layout.json"]
        elif p.is_dir():
            raise AttnforgeError(f"{option} {path}: is a folder; give a file name")
        else:
            files = [p]
        parent = p.absolute().parent
        if not parent.is_dir():
            raise AttnforgeError(f"{option} {path}: the folder {str(parent)!r} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise AttnforgeError(f"{option} {path}: the folder {str(parent)!r} is not writable")
        for f in files:
            _check_file(option, path, f, inputs, seen, force)


def _check_file(option: str, path: str, f: Path, inputs: list[Path], seen: dict, force: bool) -> None:
    real = f.resolve()
    for i in inputs:
        if real == i:
            raise AttnforgeError(f"{option} {path}: is an input of this command; it would be overwritten")
        if real.exists() and i.is_dir() and real.is_relative_to(i):
            raise AttnforgeError(f"{option} {path}: {str(f)!r} is a file of the input folder {str(i)!r}; it would "
                                 "be overwritten")
    if real in seen:
        raise AttnforgeError(f"{option} {path}: {seen[real]} writes the same file")
    seen[real] = option
    if real.is_file() and not force and not is_artifact(real):  # /dev/null, a FIFO: nothing stored is lost
        raise AttnforgeError(f"{option} {path}: {str(f)!r} exists and was not written by attnforge; pass --force "
                             "to overwrite it")


def is_artifact(path: Path) -> bool:
    """Whether ``path`` is a file attnforge wrote (ONNX, JSON or HTML, told apart by its first bytes)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
            if head.lstrip()[:1] == b"{":
                return path.stat().st_size <= _MAX_JSON and _json_is_ours(path)
            if head.lstrip()[:1] == b"<":
                return HTML_MARK.encode() in head or b"<title>attnforge diff:" in head
            fh.seek(0)
            return _onnx_producer(fh) == PRODUCER
    except (OSError, ValueError):
        return False


def _json_is_ours(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and (data.get("producer") == PRODUCER or
                                       any(keys <= data.keys() for keys in _JSON_SHAPES))


def _varint(fh) -> int:
    value, shift = 0, 0
    while True:
        byte = fh.read(1)
        if not byte or shift > 63:
            raise ValueError("truncated varint")
        value |= (byte[0] & 0x7F) << shift
        shift += 7
        if byte[0] < 0x80:
            return value


def _onnx_producer(fh) -> str:
    """``metadata_props["producer"]`` of an ONNX ModelProto, read field by field (the graph is skipped over,
    not read); '' when absent. ``ValueError`` when the bytes are not a protobuf message."""
    size = os.fstat(fh.fileno()).st_size
    for _ in range(10_000):  # a ModelProto has a few dozen top-level fields
        if fh.tell() >= size:
            break
        tag = _varint(fh)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise ValueError("field number 0: not an ONNX file")
        if wire == 0:
            _varint(fh)
        elif wire == 2:
            length = _varint(fh)
            if number == 14 and length < 1 << 16:  # metadata_props: StringStringEntryProto {key = 1, value = 2}
                entry = _entry(fh.read(length))
                if entry.get(1) == b"producer":
                    return entry.get(2, b"").decode("utf-8", "replace")
            else:
                fh.seek(length, os.SEEK_CUR)
        elif wire in (1, 5):
            fh.seek(8 if wire == 1 else 4, os.SEEK_CUR)
        else:
            raise ValueError(f"wire type {wire}: not an ONNX file")
    return ""


def _entry(data: bytes) -> dict[int, bytes]:
    """The length-delimited fields of a small protobuf message."""
    import io

    fh, out = io.BytesIO(data), {}
    while fh.tell() < len(data):
        tag = _varint(fh)
        if tag & 7 != 2:
            raise ValueError("not a string entry")
        out[tag >> 3] = fh.read(_varint(fh))
    return out
