"""Issue #18, the autotune cache and the kernel folder on shared machines (codegen/autotune.py, codegen/safefs.py,
codegen/attention.py): planted symlinks are never written through or imported, every corrupt cache is set aside
byte-for-byte and rebuilt, an unusable folder costs a warning and never this run's results, and the cache file
keeps its permissions."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
import time
import warnings
from pathlib import Path

import pytest

from attnforge.codegen import attention
from attnforge.codegen.autotune import source_hash
from attnforge.tools.cli import main

NOBODY = 65534
TUNE = ["autotune", "--op", "sliding_window", "--params", "window=8", "--reps", "1", "--device", "cpu"]


def run(capsys, *argv):
    """(exit code, stdout with its white space collapsed, attnforge's warnings) of one in-process CLI call."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(list(argv))
    said = [str(w.message) for w in caught if str(w.message).startswith("attnforge:")]
    return code, " ".join(capsys.readouterr().out.split()), said


def tune(capsys, cache, shape="1x2x64x16"):
    return run(capsys, *TUNE, "--shapes", shape, "--cache", str(cache))


def show(capsys, cache):
    return run(capsys, "autotune", "--show", "--cache", str(cache))


def entries(cache: Path) -> dict:
    return json.loads((cache / "autotune.json").read_text())["entries"]


def set_aside(cache: Path) -> list[Path]:
    return sorted(cache.glob("autotune.corrupt-*.json"))


# --------------------------------------------------------------------------- the kernel folder (Why 2)


@pytest.fixture
def kernels(tmp_path, monkeypatch):
    """The kernel folder of a fresh cache folder (both ours, writable by no one else), and a victim file."""
    monkeypatch.setenv("ATTNFORGE_CACHE_DIR", str(tmp_path / "cache"))
    attention._kernel_dir.cache_clear()
    attention.compile_spec.cache_clear()
    folder = tmp_path / "cache" / "kernels"
    folder.parent.mkdir()
    folder.parent.chmod(0o700)
    (tmp_path / "victim.txt").write_text("precious")
    yield folder
    attention._kernel_dir.cache_clear()
    attention.compile_spec.cache_clear()


SPEC = attention.AttentionSpec(mask="causal", head_dim=16)


def _module_file(module) -> Path:
    path = Path(module.__file__)
    assert not path.is_symlink() and path.is_file() and path.read_text() == attention.source(SPEC)
    return path


def test_a_symlink_planted_at_the_probe_name_truncates_nothing(kernels, tmp_path):
    kernels.mkdir(mode=0o700)
    (kernels / f".probe-{os.getpid()}").symlink_to(tmp_path / "victim.txt")
    path = _module_file(attention.compile_spec(SPEC))
    assert (tmp_path / "victim.txt").read_text() == "precious"
    assert path.parent == kernels


def test_a_symlink_planted_at_the_temporary_name_is_not_written_nor_imported(kernels, tmp_path):
    kernels.mkdir(mode=0o700)
    digest = source_hash(attention.source(SPEC))
    (kernels / f"{SPEC.name}_{digest}.{os.getpid()}.tmp").symlink_to(tmp_path / "victim.txt")
    path = _module_file(attention.compile_spec(SPEC))
    assert (tmp_path / "victim.txt").read_text() == "precious"
    assert path == kernels / f"{SPEC.name}_{digest}.py"


def test_a_module_planted_as_a_symlink_is_replaced_not_imported(kernels, tmp_path):
    """Even with the right source in it, a link at the module's name is not imported through."""
    kernels.mkdir(mode=0o700)
    victim = tmp_path / "victim.txt"
    victim.write_text(attention.source(SPEC))
    (kernels / f"{SPEC.name}_{source_hash(attention.source(SPEC))}.py").symlink_to(victim)
    _module_file(attention.compile_spec(SPEC))
    assert victim.read_text() == attention.source(SPEC)


def test_a_kernels_folder_that_is_a_symlink_is_not_followed(kernels, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    kernels.symlink_to(elsewhere)
    with pytest.warns(RuntimeWarning, match="symlink"):
        path = _module_file(attention.compile_spec(SPEC))
    assert list(elsewhere.iterdir()) == []
    assert elsewhere not in path.resolve().parents


# --------------------------------------------------------------------------- corrupt cache bytes (Why 4)


def test_random_bytes_are_set_aside_byte_for_byte_then_rebuilt(tmp_path, capsys):
    junk = bytes(range(256)) * 8
    (tmp_path / "autotune.json").write_bytes(junk)
    code, out, said = show(capsys, tmp_path)
    assert code == 0 and "0 entries" in out
    assert len(said) == 1 and "unreadable" in said[0], said
    (aside,) = set_aside(tmp_path)
    assert aside.read_bytes() == junk and not (tmp_path / "autotune.json").exists()
    code, out, said = tune(capsys, tmp_path)
    assert code == 0 and said == [] and len(entries(tmp_path)) == 1


def test_a_file_that_is_not_utf8_is_set_aside_and_the_run_keeps_its_entry(tmp_path, capsys):
    latin1 = b'{"format": 1, "entries": {}, "note": "caf\xe9"}'
    (tmp_path / "autotune.json").write_bytes(latin1)
    code, out, said = tune(capsys, tmp_path)
    assert code == 0 and "sliding_window_cpu" in out
    assert len(said) == 1 and "not UTF-8" in said[0], said
    (aside,) = set_aside(tmp_path)
    assert aside.read_bytes() == latin1 and len(entries(tmp_path)) == 1


def test_json_nested_100k_deep_is_set_aside(tmp_path, capsys):
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "autotune.json").write_text(deep)
    code, out, said = show(capsys, tmp_path)
    assert code == 0 and "0 entries" in out
    assert len(said) == 1 and "nested too deeply" in said[0], said
    (aside,) = set_aside(tmp_path)
    assert aside.read_text() == deep


def test_an_entry_whose_ms_is_not_a_number_is_set_aside_and_the_rest_kept(tmp_path, capsys):
    assert tune(capsys, tmp_path)[0] == 0
    doc = json.loads((tmp_path / "autotune.json").read_text())
    (good_key, good), = doc["entries"].items()
    doc["entries"]["cpu|bad"] = {**good, "ms": "x"}
    broken = json.dumps(doc).encode()
    (tmp_path / "autotune.json").write_bytes(broken)
    code, out, said = show(capsys, tmp_path)
    assert code == 0 and "1 entries" in out and "sliding_window_cpu" in out
    assert len(said) == 1 and "'cpu|bad': ms is not a finite number" in said[0], said
    (aside,) = set_aside(tmp_path)
    assert aside.read_bytes() == broken
    assert entries(tmp_path) == {good_key: good}  # rebuilt with the valid entry
    assert show(capsys, tmp_path)[2] == []  # and read without complaint from then on


# --------------------------------------------------------------------------- unusable cache folders (Why 5)


@pytest.fixture
def reachable(tmp_path):
    """A folder for files that the user nobody must reach too (root's pytest folders are private to root)."""
    if os.geteuid() != 0:
        yield tmp_path
        return
    base = Path(tempfile.mkdtemp())
    base.chmod(0o711)
    yield base
    shutil.rmtree(base)


@contextlib.contextmanager
def unwritable(folder: Path):
    """``folder`` cannot be written in: mode 0555. Root ignores modes, so as root the block runs with the
    effective uid of nobody, who then owns the folder."""
    if os.geteuid() == 0:
        os.chown(folder, NOBODY, NOBODY)
    folder.chmod(0o555)
    try:
        if os.geteuid() == 0:
            os.seteuid(NOBODY)
        yield
    finally:
        if os.getuid() == 0:
            os.seteuid(0)
        folder.chmod(0o755)


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_a_read_only_folder_keeps_this_runs_results_in_memory(reachable, capsys):
    cache = reachable / "cache"
    cache.mkdir()
    assert tune(capsys, cache)[0] == 0  # a first entry (and every module the run needs is imported)
    before = (cache / "autotune.json").read_bytes()
    with unwritable(cache):
        code, out, said = tune(capsys, cache, shape="1x2x128x16")
    assert code == 0, said
    assert "n=128,d=16,w=8" in out and "in memory only" in out  # this run's result, with what became of it
    assert len(said) == 1 and "in memory only" in said[0] and str(cache) in said[0], said
    assert (cache / "autotune.json").read_bytes() == before


def test_a_cache_path_that_is_a_folder_is_set_aside_and_rebuilt(tmp_path, capsys):
    (tmp_path / "autotune.json").mkdir()
    (tmp_path / "autotune.json" / "keep.txt").write_text("mine")
    code, out, said = tune(capsys, tmp_path)
    assert code == 0 and "sliding_window_cpu" in out
    assert len(said) == 1 and "not a regular file" in said[0], said
    (aside,) = set_aside(tmp_path)
    assert (aside / "keep.txt").read_text() == "mine"
    assert (tmp_path / "autotune.json").is_file() and len(entries(tmp_path)) == 1


def test_a_cache_folder_that_is_a_file_costs_a_warning_not_the_results(tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("mine")
    code, out, said = tune(capsys, blocker)
    assert code == 0 and "sliding_window_cpu" in out and "in memory only" in out
    assert len(said) == 1 and "is not a folder" in said[0] and str(blocker) in said[0], said
    code, out, said = show(capsys, blocker)
    assert code == 0 and "0 entries" in out and len(said) == 1
    assert blocker.read_text() == "mine"


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX permissions")
def test_the_cache_file_keeps_its_mode(tmp_path, capsys):
    umask = os.umask(0o022)
    os.umask(umask)
    assert tune(capsys, tmp_path)[0] == 0
    path = tmp_path / "autotune.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # a first file: as the umask says
    path.chmod(0o664)  # a team's shared cache
    assert tune(capsys, tmp_path, shape="1x2x128x16")[0] == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o664 and len(entries(tmp_path)) == 2


def test_stale_temporary_files_are_removed_on_the_next_write(tmp_path, capsys):
    dead, live = tmp_path / ".autotune.dead.tmp", tmp_path / ".autotune.live.tmp"
    dead.write_text("{")
    live.write_text("{")
    hours_ago = time.time() - 2 * 3600
    os.utime(dead, (hours_ago, hours_ago))
    assert tune(capsys, tmp_path)[0] == 0
    assert not dead.exists() and live.exists()  # a running writer's file is left alone


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="giving a folder away needs root")
def test_a_folder_of_another_user_that_everyone_may_write_is_not_used(tmp_path, capsys):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chown(shared, NOBODY, NOBODY)
    shared.chmod(0o777)
    code, out, said = tune(capsys, shared)
    assert code == 0 and "sliding_window_cpu" in out
    assert len(said) == 1 and "everyone may write" in said[0], said
    assert list(shared.iterdir()) == []


def test_a_symlink_planted_at_the_lock_name_truncates_nothing(tmp_path, capsys):
    """The lock file is a predictable name too: filelock >= 3.20.3 opens it without following a symlink
    (pyproject's floor), so the run goes on in memory and the victim keeps its bytes."""
    cache = tmp_path / "cache"
    cache.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (cache / "autotune.json.lock").symlink_to(victim)
    code, out, said = tune(capsys, cache)
    assert code == 0 and "in memory only" in out, (out, said)
    assert victim.read_text() == "precious"
