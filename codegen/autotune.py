"""Autotuning: a search space per kernel, median timings, and one JSON cache per user (DESIGN.md, "Autotuning").

A cache entry is keyed by everything that can change the answer: device name and capability, torch and triton
versions, the kernel's name and source hash, dtype, and a shape bucket (lengths rounded up to powers of two).
The file (``$ATTNFORGE_CACHE_DIR/autotune.json``, default ``~/.cache/attnforge``) is rewritten whole under a
file lock through a temporary file with a random name and ``os.replace`` (codegen/safefs.py): concurrent tuners
never lose each other's entries, readers never see half a file, and the file keeps its permissions. A file that
is not a valid cache (any bytes, depth or field types) is moved aside as it is, with a warning, and rebuilt; a
folder that cannot be used turns the cache into an in-memory one, with a warning. ``lookup`` never raises: a
broken cache costs the default config, never the model.

Kernels take part through the variant registry (runtime/registry.py): each variant's ``tunables(args, device,
backend)`` returns the ``Tunable`` kernels one call would run (key, default, search space and a closure that
runs one config). ``attnforge autotune`` records the ops a model calls and tunes each.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from filelock import FileLock

from attnforge.errors import CacheError

from . import safefs

ENV = "ATTNFORGE_CACHE_DIR"
FILENAME = "autotune.json"
FORMAT = 1  # bump when the entry layout changes: older files are then set aside and rebuilt


def cache_dir(directory: Optional[str | os.PathLike] = None) -> Path:
    return Path(directory or os.environ.get(ENV) or Path.home() / ".cache" / "attnforge").expanduser()


def source_hash(*parts: Any) -> str:
    """sha256 (16 hex digits) of texts, functions or modules (their source): a kernel's identity in the key."""
    h = hashlib.sha256()
    for p in parts:
        h.update((p if isinstance(p, str) else inspect.getsource(p)).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def bucket(n: int) -> int:
    """The power of two at or above ``n``: one cache entry serves every length in (bucket/2, bucket]."""
    return 1 << max(0, int(n) - 1).bit_length()


@functools.cache
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


@functools.cache
def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


def device_fields(device) -> tuple[str, str]:
    """(name, capability) of a device: ``("NVIDIA H100 ...", "sm_90")`` or ``(cpu model, "cpu/2threads")``
    (CPU timings depend on the thread count, so it is part of the capability)."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return torch.cuda.get_device_name(index), f"sm_{major}{minor}"
    return _cpu_name(), f"{device.type}/{torch.get_num_threads()}threads"


@dataclass(frozen=True)
class Key:
    """What a cache entry is valid for. ``str(key)`` is the JSON key."""

    kernel: str
    source: str
    dtype: str
    shape: str
    device: str
    capability: str
    torch: str
    triton: str

    def __str__(self) -> str:
        return "|".join((self.device, self.capability, f"torch {self.torch}", f"triton {self.triton}", self.kernel,
                         self.source, self.dtype, self.shape))


def make_key(kernel: str, source: str, dtype, shape: str, device) -> Key:
    name, capability = device_fields(device)
    return Key(kernel, source, str(dtype).removeprefix("torch."), shape, name, capability, torch.__version__,
               _triton_version())


class CorruptCache(CacheError):
    """The cache file does not parse as a cache (it is set aside and rebuilt, never raised to the user)."""


def _is_config(v) -> bool:
    return isinstance(v, dict) and all(isinstance(x, (int, str)) or (isinstance(x, float) and math.isfinite(x))
                                       for x in v.values())


def _is_ms(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


_FIELDS: dict[str, Callable[[Any], bool]] = {
    "config": _is_config, "ms": _is_ms, "default": _is_config, "default_ms": _is_ms,
    "tried": lambda v: isinstance(v, int) and not isinstance(v, bool), "complete": lambda v: isinstance(v, bool),
    **{name: lambda v: isinstance(v, str) for name in ("kernel", "shape", "dtype", "device", "tuned_at")}}
_REQUIRED = ("config", "ms")
_WANT = {"config": "an object of numbers and strings", "default": "an object of numbers and strings",
         "ms": "a finite number >= 0", "default_ms": "a finite number >= 0", "tried": "an integer",
         "complete": "true or false"}


def entry_problem(entry) -> Optional[str]:
    """What is wrong with one cache entry (a field the code reads has the wrong type), or None."""
    if not isinstance(entry, dict):
        return "not an object"
    for name, ok in _FIELDS.items():
        if (name in entry or name in _REQUIRED) and not ok(entry.get(name)):
            return f"{name} is {'missing' if name not in entry else 'not ' + _WANT.get(name, 'a string')}"
    return None


def _excerpt(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


class Cache:
    """The JSON cache file: ``{"format": 1, "entries": {str(key): entry}}``.

    When its folder cannot be used (read-only, not a folder, unsafe: see codegen/safefs.py), the cache warns once
    and lives in memory for the rest of the process: this run's results are kept, nothing is written."""

    def __init__(self, directory: Optional[str | os.PathLike] = None):
        self.dir = cache_dir(directory)
        self.path = self.dir / FILENAME
        self._lock = FileLock(str(self.path) + ".lock", timeout=120)
        self._seen: tuple[Any, dict] = (None, {})  # (stat of the file read last, its entries)
        self._dir_ok = False
        self.memory: Optional[dict[str, dict]] = None  # the entries, once the folder proved unusable

    def entries(self) -> dict[str, dict]:
        """Every entry (re-read only when the file changed). A corrupt file is set aside, and reads as the entries
        in it that are valid (often none)."""
        if self.memory is not None:
            return self.memory
        entries: dict[str, dict] = {}
        try:
            if not self._usable(create=False):
                return {}
            sig = self._signature()
            if sig is not None and sig == self._seen[0]:
                return self._seen[1]
            entries, problem = self._read()
            if problem is not None:
                with self._lock:
                    entries = self._read_or_set_aside()
        except OSError as e:
            return self._unusable(e, entries)
        self._seen = (sig, entries)  # the stat taken before the read: a newer file is re-read next time
        return entries

    def get(self, key: Key | str) -> Optional[dict]:
        return self.entries().get(str(key))

    def put(self, key: Key | str, entry: dict) -> None:
        """Add or replace one entry: read, merge and write back under the lock, atomically. When the folder
        cannot be written the entry is kept in memory (with one warning): a run never loses its results."""
        problem = entry_problem(entry)
        if problem is not None:
            raise ValueError(f"not a cache entry: {problem}")
        if self.memory is None:
            try:
                self._usable(create=True)
                with self._lock:
                    entries = dict(self._read_or_set_aside())
                    entries[str(key)] = entry
                    self._write(entries)
                self._seen = (None, {})
                return
            except OSError as e:
                self._unusable(e)
        self.memory[str(key)] = entry

    def _usable(self, create: bool) -> bool:
        """Whether the folder exists (made, 0700, when ``create``) and is safe to use; ``CacheError`` if not."""
        if not self._dir_ok:
            if not create:
                try:
                    os.lstat(self.dir)
                except FileNotFoundError:  # no cache yet (a path through a file is an error, though)
                    return False
            safefs.use_dir(self.dir, private=False)
            self._dir_ok = True
        return True

    def _unusable(self, error: OSError, entries: Optional[dict] = None) -> dict[str, dict]:
        """Go on in memory (with the entries read so far), warning once."""
        self.memory = dict(self._seen[1] if entries is None else entries)
        warnings.warn(f"attnforge: cannot use the autotune cache {self.path} ({error}); keeping this run's "
                      "results in memory only", RuntimeWarning, stacklevel=3)
        return self.memory

    def _signature(self):
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _read(self) -> tuple[dict[str, dict], Optional[str]]:
        """(the valid entries, what is wrong with the file or None). Only ``OSError`` (an unreadable folder)
        escapes: any content, however broken, is a problem to report."""
        try:
            data = safefs.read_regular(self.path)
            if data is None:
                return {}, None
            doc = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            return {}, "not UTF-8 text"
        except RecursionError:
            return {}, "JSON nested too deeply"
        except ValueError as e:  # not JSON, or not a regular file
            return {}, f"not JSON ({e})" if isinstance(e, json.JSONDecodeError) else str(e)
        if (not isinstance(doc, dict) or type(doc.get("format")) is not int or doc["format"] != FORMAT
                or not isinstance(doc.get("entries"), dict)):
            return {}, f"not an attnforge autotune cache of format {FORMAT}"
        entries, bad = {}, []
        for key, entry in doc["entries"].items():
            problem = entry_problem(entry)
            if problem is None:
                entries[key] = entry
            else:
                bad.append(f"entry {_excerpt(key)}: {problem}")
        if bad:
            return entries, f"{bad[0]}; {len(bad)} of {len(doc['entries'])} entries are invalid"
        return entries, None

    def _read_or_set_aside(self) -> dict[str, dict]:
        """Under the lock: the entries. A corrupt file is first moved aside as it is (nothing is deleted), and a
        new file holds its valid entries, if any."""
        entries, problem = self._read()
        if problem is None:
            return entries
        stamp, n = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}", 0
        aside = self.path.with_name(f"autotune.corrupt-{stamp}.json")
        while os.path.lexists(aside):
            n += 1
            aside = self.path.with_name(f"autotune.corrupt-{stamp}-{n}.json")
        os.replace(self.path, aside)
        kept = f"with its {len(entries)} valid entries" if entries else ""
        warnings.warn(f"attnforge: the autotune cache {self.path} was unreadable ({problem}); moved it to {aside} "
                      f"and started a new one {kept}".rstrip(), RuntimeWarning, stacklevel=4)
        if entries:
            self._write(entries)
        return entries

    def _write(self, entries: dict[str, dict]) -> None:
        """Under the lock: replace the file (keeping its permissions), removing killed writers' leftovers."""
        safefs.clean_stale(self.dir, ".autotune.*.tmp")
        text = json.dumps({"format": FORMAT, "entries": entries}, indent=1, sort_keys=True, allow_nan=False)
        safefs.replace(self.path, text.encode("utf-8"), keep_mode=True)


@functools.lru_cache(maxsize=8)
def _cache_at(path: Path) -> Cache:
    return Cache(path)


def default_cache() -> Cache:
    """The cache of ``$ATTNFORGE_CACHE_DIR`` (read at each call, so tests and tools may point it elsewhere)."""
    return _cache_at(cache_dir())


_warned: set[str] = set()


def lookup(key: Key | Callable[[], Key], default: dict, cache: Optional[Cache] = None) -> dict:
    """The tuned config for ``key`` (or for the key a function makes: its errors are caught too), else ``default``.
    Never raises (a broken cache warns once)."""
    try:
        entry = (cache or default_cache()).get(key() if callable(key) else key)
        if entry is not None:
            return {**default, **entry["config"]}
    except Exception as e:  # noqa: BLE001 - the cache is an optimisation; the model must run regardless
        if str(e) not in _warned:
            _warned.add(str(e))
            warnings.warn(f"attnforge: autotune cache lookup failed ({e}); using the default config",
                          RuntimeWarning, stacklevel=2)
    return default


# --------------------------------------------------------------------------- tuning


@dataclass
class Tunable:
    """One kernel at one shape: its cache key, default config, search space and a runner of one config."""

    key: Key
    default: dict
    space: list[dict]
    run: Callable[[dict], Any]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def label(self) -> str:
        return f"{self.key.kernel} {self.key.shape} {self.key.dtype}"


@dataclass
class Result:
    tunable: Tunable
    best: dict
    best_ms: float
    default_ms: float
    tried: int
    failed: list[str]
    complete: bool  # False when the budget ran out before the whole space was timed
    timings: list[tuple[dict, float]] = field(default_factory=list)  # (config, median ms) in the order tried

    @property
    def speedup(self) -> float:
        return self.default_ms / self.best_ms


def _timer(fn: Callable[[], Any], device) -> Callable[[], float]:
    """A function that runs ``fn`` once and returns its wall time in ms (CUDA synchronised)."""
    sync = torch.cuda.synchronize if device is not None and torch.device(device).type == "cuda" else (lambda: None)

    def timed() -> float:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - t) * 1e3
    return timed


def tune(t: Tunable, cache: Optional[Cache] = None, budget_s: Optional[float] = None, reps: int = 5,
         on_config: Optional[Callable[[int, int], None]] = None) -> Result:
    """Time every config of the space and the default, keep the fastest, store it in the cache.

    Each config first runs once (compiling it, and finding those that cannot run, e.g. out of shared memory on
    a GPU: they are skipped and listed); then ``reps`` rounds time every config in turn, so a change of load
    hits all alike, and each config's median counts. ``budget_s`` stops the warm-ups once spent (the default
    always runs) and the rounds after the first. ``on_config(done, total)`` reports the warm-ups' progress.
    """
    start = time.perf_counter()
    spent = lambda: budget_s is not None and time.perf_counter() - start > budget_s  # noqa: E731
    space = [t.default] + [c for c in t.space if c != t.default]
    runs, failed = [], []
    for i, config in enumerate(space):
        if i > 0 and spent():
            break
        timed = _timer(lambda config=config: t.run(config), t.device)
        try:
            timed()
        except Exception as e:  # noqa: BLE001 - a config that cannot run is not a candidate
            if i == 0:
                raise
            failed.append(f"{config}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        else:
            runs.append((config, timed, []))
        if on_config is not None:
            on_config(i + 1, len(space))
    for r in range(max(1, reps)):
        if r > 0 and spent():
            break
        for _, timed, times in runs:
            times.append(timed())
    timings = [(config, statistics.median(times)) for config, _, times in runs]
    best, best_ms = min(timings, key=lambda ct: ct[1])
    default_ms = timings[0][1]
    complete = len(runs) + len(failed) == len(space)
    (cache or default_cache()).put(t.key, {
        "config": best, "ms": best_ms, "default": t.default, "default_ms": default_ms, "tried": len(runs),
        "complete": complete, "kernel": t.key.kernel, "shape": t.key.shape, "dtype": t.key.dtype,
        "device": t.key.device, "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return Result(t, best, best_ms, default_ms, len(runs), failed, complete, timings)
