"""What ``optimize`` did: sites, misses, errors, timings. Text (rich) and JSON views."""
from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field


@dataclass
class SiteRecord:
    fqn: str
    kind: str  # attention | ffn
    rewrite: str
    status: str  # applied | rolled_back | skipped | planned (dry run)
    reason: str = ""
    pattern: str = ""
    error: dict | None = None  # local error of the rewritten site vs the original subgraph
    info: dict = field(default_factory=dict)


@dataclass
class MissRecord:
    fqn: str
    kind: str
    reason: str
    node: str = ""


@dataclass
class Report:
    model: str = ""
    recipe: str = ""
    capture_method: str = ""
    capture_error: str = ""
    dynamic: bool = False
    backend: str = "auto"
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # recipe steps whose selection selects nothing
    sites: list[SiteRecord] = field(default_factory=list)
    misses: list[MissRecord] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    nodes_before: int = 0
    nodes_after: int = 0
    call_form: str = ""  # the call the graph serves: its tensor inputs and baked flags
    shapes: dict = field(default_factory=dict)  # input -> dims as captured ("B", "N": symbolic; ints: static)
    recaptures: list[dict] = field(default_factory=list)  # later programs: other call forms, dtypes, training
    decode: dict = field(default_factory=dict)  # the decode contract on the example (attnforge/generate.py)
    kv_cache: dict = field(default_factory=dict)  # KV-cache bytes per layer and in all, formulas in N

    # ------------------------------------------------------------------ queries
    def counts(self) -> dict[str, int]:
        """{rewrite name: number of sites it was applied to}."""
        out: dict[str, int] = {}
        for s in self.sites:
            if s.status == "applied":
                out[s.rewrite] = out.get(s.rewrite, 0) + 1
        return out

    @property
    def passed(self) -> bool:
        return not self.capture_error and all(o.get("passed", False) for o in self.outputs) and \
            self.decode.get("passed", True)

    # ------------------------------------------------------------------ views
    def to_dict(self) -> dict:
        d = asdict(self)
        d["counts"] = self.counts()
        return _finite(d)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_text(self, width: int = 120) -> str:
        from rich.console import Console

        buf = io.StringIO()
        console = Console(file=buf, width=width, force_terminal=False, color_system=None)
        self.render(console)
        return buf.getvalue()

    def render(self, console) -> None:
        from rich.table import Table

        head = f"attnforge report: {self.model or 'model'} with recipe {self.recipe!r}"
        console.print(head)
        if self.capture_error:
            console.print(f"capture failed, the model runs unchanged:\n{self.capture_error}")
        else:
            console.print(f"captured with {self.capture_method} ({'dynamic' if self.dynamic else 'static'} shapes, "
                          f"backend {self.backend}); "
                          f"graph nodes {self.nodes_before} -> {self.nodes_after}; applied {self.counts() or 'nothing'}")
            if self.shapes:
                dims = "; ".join(f"{k} [{', '.join(map(str, v))}]" for k, v in self.shapes.items())
                symbols = sorted({d for v in self.shapes.values() for d in v if isinstance(d, str)})
                console.print(f"inputs {dims}" + (f"; any {', '.join(symbols)} >= 1" if symbols else ""),
                              markup=False)
        for note in self.notes:
            console.print(f"note: {note}")
        for warning in self.warnings:
            console.print(f"warning: {warning}", markup=False)
        if self.sites:
            t = Table(title="sites", show_lines=False)
            for col in ("module", "kind", "rewrite", "status", "local rel. error", "detail"):
                t.add_column(col)
            for s in self.sites:
                err = f"{s.error['rel']:.2e}" if s.error else ""
                t.add_row(s.fqn or "<root>", s.kind, s.rewrite, s.status, err, s.reason or s.pattern)
            console.print(t)
        if self.misses:
            t = Table(title="near misses (not rewritten)")
            for col in ("module", "kind", "reason"):
                t.add_column(col)
            for m in self.misses:
                t.add_row(m.fqn or "<root>", m.kind, m.reason)
            console.print(t)
        if self.outputs:
            t = Table(title="outputs vs original")
            for col in ("", "output", "max abs", "rel", "cosine", "allowed"):
                t.add_column(col)
            for o in self.outputs:
                t.add_row("[✓]" if o["passed"] else "\\[x]", o["name"], f"{o['max_abs']:.2e}", f"{o['rel']:.2e}",
                          f"{o['cosine']:.6f}", o.get("budget", ""))
            console.print(t)
            for o in self.outputs:
                if o.get("note") and not o["passed"]:
                    console.print(f"[x] {o['name']}: {o['note']}", markup=False)
        if self.decode:
            d = self.decode
            if d.get("checked"):
                mark = "[✓]" if d["passed"] else "[x]"
                note = "" if d.get("exact_policies", True) else " (a policy that decodes by its own rule: not compared)"
                console.print(f"{mark} decode with the cache ({', '.join(d['policies'])}) equals the full sequence: "
                              f"max |Δ logit| {d['max_abs']:.2e} over {d['positions']} positions{note}", markup=False)
            else:
                console.print(f"decode not checked: {d.get('reason', '')}", markup=False)
        if self.kv_cache.get("total"):
            console.print(f"KV cache bytes at context N, batch 1: {self.kv_cache.get('before', '?')} -> "
                          f"{self.kv_cache['total']}", markup=False)
        for r in self.recaptures:
            console.print(f"captured again for {r['why']}: applied {r['counts'] or 'nothing'}"
                          + ("" if r.get("passed", True) else " [outputs over the budget]"), markup=False)
        if self.timings:
            console.print("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()))


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x
