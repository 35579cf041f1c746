"""The layering of DESIGN.md, enforced on the import statements (module level and inside functions alike):

    patterns -> torch only;  passes -> patterns, runtime;  runtime -> codegen;  codegen -> neither runtime nor
    attnforge/;  attnforge/ -> patterns, passes, runtime, codegen;  tools -> everything above.

``attnforge.errors`` imports nothing of the package and every layer may raise its errors. A backwards import or a
cycle between folders fails, and so does an import cycle between modules at module level.
"""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"attnforge": "attnforge", "patterns": "patterns", "passes": "passes", "runtime": "runtime",
           "codegen": "codegen", "tools": "tools"}
ALLOWED = {
    "patterns": set(),
    "codegen": set(),
    "runtime": {"codegen"},
    "passes": {"patterns", "runtime", "codegen"},
    "attnforge": {"patterns", "passes", "runtime", "codegen"},
    "tools": {"attnforge", "patterns", "passes", "runtime", "codegen"},
}
ALLOWED["passes"].discard("codegen")  # passes reach kernels only through runtime's op handles
LEAF = "attnforge.errors"


def _module_name(path: Path) -> str:
    folder = path.relative_to(ROOT).parts[0]
    parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    prefix = "attnforge" if folder == "attnforge" else f"attnforge.{folder}"
    return ".".join([prefix, *parts])


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "attnforge":
        return None
    if len(parts) > 1 and parts[1] in FOLDERS and parts[1] != "attnforge":
        return parts[1]
    return "attnforge"


def _imports(path: Path, module: str):
    """(imported module, at module level?) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top = {id(n) for n in tree.body}
    guarded = {id(n) for node in tree.body if isinstance(node, ast.If) for n in ast.walk(node)}
    for node in ast.walk(tree):
        level_ok = id(node) in top or id(node) in guarded
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, level_ok
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            yield base, level_ok
            for a in node.names:  # "from . import x" imports the module x
                yield f"{base}.{a.name}", level_ok


def _files():
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path, _module_name(path)


def _known(name: str, modules: set) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _violations(files) -> list[str]:
    modules = {m for _, m in _files()} | {m for _, m in files}
    wrong = []
    for path, module in files:
        src = _layer(module)
        for target, _ in _imports(path, module):
            hit = _known(target, modules)
            if hit is None or hit == LEAF:
                continue
            dst = _layer(hit)
            if dst != src and dst not in ALLOWED[src]:
                wrong.append(f"{path.name} ({module}) imports {hit} ({src} -> {dst})")
    return wrong


def test_no_backward_imports_between_layers():
    wrong = _violations(list(_files()))
    assert wrong == [], "\n".join(wrong)


def test_the_checker_flags_a_backward_import(tmp_path):
    """The rule can fail: a codegen module that imports runtime inside a function is flagged, a leaf import is not."""
    bad = tmp_path / "bad.py"
    bad.write_text("from attnforge.errors import AttnforgeError\n\ndef f():\n"
                   "    from attnforge.runtime import registry\n    return registry\n")
    assert _violations([(bad, "attnforge.codegen.bad")]) == [
        "bad.py (attnforge.codegen.bad) imports attnforge.runtime (codegen -> runtime)",
        "bad.py (attnforge.codegen.bad) imports attnforge.runtime.registry (codegen -> runtime)"]


def test_the_errors_module_is_a_leaf():
    modules = {m for _, m in _files()}
    path = ROOT / "attnforge" / "errors.py"
    assert [t for t, _ in _imports(path, LEAF) if _known(t, modules) not in (None, "attnforge")] == []
    assert [t for t, _ in _imports(path, LEAF) if t.startswith("attnforge")] == []


def test_no_cycles_between_layers_or_between_modules():
    modules = {m for _, m in _files()}
    layers, top_level = nx.DiGraph(), nx.DiGraph()
    for path, module in _files():
        for target, at_top in _imports(path, module):
            hit = _known(target, modules)
            if hit is None or hit == module or hit == LEAF:
                continue
            if _layer(hit) != _layer(module):
                layers.add_edge(_layer(module), _layer(hit))
            if at_top:
                top_level.add_edge(module, hit)
    assert list(nx.simple_cycles(layers)) == []
    cycles = [c for c in nx.simple_cycles(top_level)]
    assert cycles == [], cycles[:5]


def test_every_package_folder_is_installed():
    """A variant folder is a package: pyproject must list it, or a wheel would ship without it (the editable
    install used here would not notice)."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {name: ROOT / path for name, path in config["package-dir"].items()}
    found = set()
    for name, path in folders.items():
        for init in path.rglob("__init__.py"):
            rel = init.parent.relative_to(path).parts
            found.add(".".join([name, *rel]))
    assert found == set(config["packages"]), f"pyproject packages: add {sorted(found - set(config['packages']))}, " \
                                             f"drop {sorted(set(config['packages']) - found)}"
