"""``attnforge diff``: what a recipe changed in a model's graph, as a JSON-ready dict (docs/report-schema.md).

The canonical graph before rewriting is compared with the rewritten one by node name: a node only in
the first was removed, one only in the second was added, and each belongs to the site whose module
FQN is the longest prefix of its own. FLOPs (2 × multiply-adds of matmul-like ops) and memory (bytes
of the tensors a region materialises; views excluded, a fused kernel's internal workspace is not in the
graph) come from the symbolic shapes of the capture, as sympy formulas and at the example shapes.
"""
from __future__ import annotations

import sympy
import torch
from torch.fx import GraphModule, Node

from attnforge.patterns.graph import call_args, fqn_of
from attnforge.report import _finite
from attnforge.runtime import of_op, shaped, variant

SCHEMA_VERSION = 1
aten = torch.ops.aten


def canonical_graph(model, args, kwargs) -> GraphModule:
    """The graph ``optimize`` starts from: captured the same way and canonicalised, not rewritten."""
    from attnforge.capture import capture
    from attnforge.passes import canonicalize

    gm = capture(model, args, kwargs).gm
    canonicalize(gm)
    return gm


def build_diff(before: GraphModule, opt, model_name: str = "") -> dict:
    """The diff of ``before`` (canonical, unrewritten) and ``opt``, an ``OptimizedModel`` whose capture worked."""
    report, after = opt.report, opt.graph_module
    names = _symbol_names(before)
    quantity = _Quantity(names, _hints(before))
    out = {"schema_version": SCHEMA_VERSION, "model": model_name or report.model, "recipe": report.recipe,
           "capture": {"method": report.capture_method, "dynamic": report.dynamic, "error": report.capture_error},
           "symbols": {str(s): quantity.hints.get(k) for k, s in names.items()},
           "nodes": {"before": len(before.graph.nodes), "after": len(after.graph.nodes)},
           "parameters": {side: _parameters(gm, gm.graph.nodes) for side, gm in (("before", before), ("after", after))},
           "flops": {side: quantity(_total(gm.graph.nodes, node_flops)) for side, gm in (("before", before),
                                                                                         ("after", after))},
           "sites": [], "misses": [{"fqn": m.fqn, "kind": m.kind, "reason": m.reason} for m in report.misses],
           "outputs": _finite(report.outputs), "passed": report.passed, "uncounted_ops": [],
           "warnings": list(report.warnings), "producer": "attnforge"}
    removed, added = _changed(before, after)
    applied = sorted({s.fqn for s in report.sites if s.status == "applied"}, key=len, reverse=True)
    regions = {f: ([], []) for f in applied}
    for side, nodes in enumerate((removed, added)):
        for n in nodes.values():
            owner = next((f for f in applied if fqn_of(n) == f or fqn_of(n).startswith(f + ".") or not f), None)
            if owner is not None:
                regions[owner][side].append(n)
    memory = {"before": sympy.Integer(0), "after": sympy.Integer(0)}
    for s in report.sites:
        row = {"fqn": s.fqn, "kind": s.kind, "rewrite": s.rewrite, "pattern": s.pattern, "status": s.status,
               "reason": s.reason, "error": _finite(s.error), "region": None}
        region = regions.pop(s.fqn, None) if s.status == "applied" else None  # a shared FQN shows its region once
        if region is not None:
            row["region"] = {side: _region(gm, nodes, quantity, out["uncounted_ops"])
                             for side, gm, nodes in zip(("before", "after"), (before, after), region)}
            if s.kind == "attention":
                for side, nodes in zip(("before", "after"), region):
                    memory[side] += _total(nodes, node_bytes)
        out["sites"].append(row)
    out["attention_memory"] = {side: quantity(v) for side, v in memory.items()}
    if report.kv_cache.get("total"):  # a model that generates: its cache before (the model's own) and after
        out["kv_cache"] = {side: _kv_quantity(report.kv_cache[key], out["symbols"].get("N"))
                           for side, key in (("before", "before"), ("after", "total"))}
    return out


def _kv_quantity(formula: str, context) -> dict:
    """A KV-cache formula in the context length N (batch 1) and its value at the example's length."""
    expr = sympy.sympify(formula, locals={"N": sympy.Symbol("N", positive=True, integer=True)})
    value = expr.subs({s: context for s in expr.free_symbols}) if context is not None else expr
    return {"formula": str(expr), "value": int(value) if value.is_number else None}


# --------------------------------------------------------------------------- graph comparison


def _changed(before: GraphModule, after: GraphModule):
    """Call nodes only in ``before`` (removed) and only in ``after`` (added), by name, in graph order."""
    b = {n.name: n for n in before.graph.nodes if n.op == "call_function"}
    a = {n.name: n for n in after.graph.nodes if n.op == "call_function"}
    return ({k: n for k, n in b.items() if k not in a or a[k].target != n.target},
            {k: n for k, n in a.items() if k not in b or b[k].target != n.target})


def _region(gm: GraphModule, nodes: list[Node], quantity, uncounted: list) -> dict:
    inside, order = set(nodes), {n: i for i, n in enumerate(gm.graph.nodes)}
    boundary = {i for n in nodes for i in n.all_input_nodes if i not in inside and isinstance(_val(i), torch.Tensor)}
    boundary = sorted(boundary, key=order.get)  # graph order: shared inputs line up before and after
    for n in nodes:
        v = of_op(n.target)
        if _target_name(n).startswith("attnforge.") and (v is None or v.cost is None) and \
                _target_name(n) not in uncounted:
            uncounted.append(_target_name(n))
    return {"nodes": [_node(n, quantity, True) for n in boundary] + [_node(n, quantity, False) for n in nodes],
            "parameters": _parameters(gm, nodes),
            "flops": quantity(_total(nodes, node_flops)),
            "memory_bytes": quantity(_total(nodes, node_bytes))}


def _node(n: Node, quantity, boundary: bool) -> dict:
    v = n.meta.get("val")
    shape = [str(quantity.readable(d)) for d in v.shape] if isinstance(v, torch.Tensor) else None
    return {"name": n.name, "op": _target_name(n), "fqn": fqn_of(n), "shape": shape,
            "inputs": [i.name for i in n.all_input_nodes], "boundary": boundary}


def _target_name(n: Node) -> str:
    if n.op in ("placeholder", "get_attr", "output"):
        return n.op
    t = n.target
    if isinstance(t, torch._ops.OpOverload):
        ns, name = t._schema.name.split("::")
        return f"{ns}.{name}" if ns != "aten" else name
    return getattr(t, "__name__", str(t))


def _parameters(gm: GraphModule, nodes) -> int:
    """Elements of the parameters and buffers that ``nodes`` read (each counted once)."""
    targets = {i.target for n in nodes for i in [n, *n.all_input_nodes] if i.op == "get_attr"}
    total = 0
    for t in targets:
        obj = gm
        for part in t.split("."):
            obj = getattr(obj, part, None)
        total += obj.numel() if isinstance(obj, torch.Tensor) else 0
    return total


# --------------------------------------------------------------------------- FLOPs and memory


def _dim(d):
    return d.node.expr if isinstance(d, torch.SymInt) else sympy.Integer(int(d))


def _numel(v) -> sympy.Expr:
    return sympy.Mul(*[_dim(d) for d in v.shape]) if isinstance(v, torch.Tensor) else sympy.Integer(0)


def _val(x):
    return x.meta.get("val") if isinstance(x, Node) else None


def _matmul(n):  # 2 · out elements · contracted size
    a = _val(n.args[1] if n.target in (aten.addmm.default, aten.baddbmm.default) else n.args[0])
    return 2 * _numel(_val(n)) * _dim(a.shape[-1])


def _linear(n):
    return 2 * _numel(_val(n)) * _dim(_val(n.args[1]).shape[-1])


def _sdpa(n):  # the exact attention variant's cost formula, so the fused op counts the same pairs
    a = call_args(n)
    mask = shaped(_val(a["attn_mask"])) if isinstance(a["attn_mask"], Node) else None
    return variant("attention").cost(*(shaped(_val(a[x])) for x in ("query", "key", "value")), mask, 1.0,
                                     bool(a["is_causal"]), 0.0).flops


FLOP_RULES = {aten.linear.default: _linear, aten.matmul.default: _matmul, aten.mm.default: _matmul,
              aten.bmm.default: _matmul, aten.addmm.default: _matmul, aten.baddbmm.default: _matmul,
              aten.scaled_dot_product_attention.default: _sdpa}  # aten ops; attnforge ops: their variant's cost


def _variant_cost(n: Node, v):
    """The variant's cost formula (runtime/registry.py) on the node's argument shapes."""
    args = [shaped(_val(a)) if isinstance(a, Node) else a for a in n.args]
    return v.cost(*args)


def node_flops(n: Node) -> sympy.Expr:
    v = of_op(n.target)
    try:
        if v is not None and v.cost is not None:
            return sympy.sympify(_variant_cost(n, v).flops)
        rule = FLOP_RULES.get(n.target)
        return rule(n) if rule else sympy.Integer(0)
    except (AttributeError, IndexError, TypeError):  # a node without shapes
        return sympy.Integer(0)


RESHAPES = {aten.reshape.default, aten.contiguous.default, aten.flatten.using_ints}


def node_bytes(n: Node) -> sympy.Expr:
    """Bytes of the tensor ``n`` materialises: 0 for views, non-tensors, and reshapes of contiguous inputs."""
    v = _val(n)
    if not isinstance(v, torch.Tensor) or not isinstance(n.target, torch._ops.OpOverload):
        return sympy.Integer(0)
    returns = n.target._schema.returns
    if returns and returns[0].alias_info is not None:
        src = _val(n.args[0]) if n.args else None
        if n.target not in RESHAPES or not isinstance(src, torch.Tensor) or src.is_contiguous():
            return sympy.Integer(0)
    return _numel(v) * v.element_size()


def _total(nodes, rule) -> sympy.Expr:
    return sympy.Add(*[rule(n) for n in nodes if n.op == "call_function"])


# --------------------------------------------------------------------------- symbols


def _symbol_names(gm: GraphModule) -> dict:
    """Readable names for the input dims the capture kept symbolic: B (dim 0), N (sequence), H, W (image)."""
    names: dict = {}
    for p in (n for n in gm.graph.nodes if n.op == "placeholder"):
        v = _val(p)
        if not isinstance(v, torch.Tensor):
            continue
        rank = v.dim()
        for i, d in enumerate(v.shape):
            if not isinstance(d, torch.SymInt) or not isinstance(d.node.expr, sympy.Symbol) or d.node.expr in names:
                continue
            base = "B" if i == 0 else "N" if rank in (2, 3) and i == 1 else "HW"[i - 2] if rank == 4 and i > 1 \
                else f"D{i}"
            name = base if base not in {str(s) for s in names.values()} else f"{base}_{p.name}"
            names[d.node.expr] = sympy.Symbol(name, positive=True, integer=True)
    return names


def _hints(gm: GraphModule) -> dict:
    """Example value of each shape symbol (what the capture saw)."""
    for n in gm.graph.nodes:
        v = _val(n)
        for d in getattr(v, "shape", ()):
            if isinstance(d, torch.SymInt):
                env = d.node.shape_env
                return dict(env.backed_var_to_val if hasattr(env, "backed_var_to_val") else env.var_to_val)
    return {}


class _Quantity:
    """sympy expression -> {"formula": in the readable symbols, "value": at the example shapes}."""

    def __init__(self, names: dict, hints: dict):
        self.names, self.hints = names, {k: int(v) for k, v in hints.items()}

    def readable(self, d):
        return _dim(d).subs(self.names)

    def __call__(self, expr) -> dict:
        expr = sympy.sympify(expr)
        value = expr.subs(self.hints)
        return {"formula": str(sympy.factor(sympy.expand(expr.subs(self.names)))),
                "value": int(value) if value.is_number else None}


# --------------------------------------------------------------------------- terminal view


def render_text(diff: dict, console) -> None:
    """The diff as rich tables (what ``attnforge diff`` prints)."""
    from rich.markup import escape
    from rich.table import Table

    console.print(f"attnforge diff: {diff['model']} with recipe {diff['recipe']!r}", markup=False)
    syms = ", ".join(f"{k}={v}" for k, v in diff["symbols"].items()) or "static shapes"
    t = Table(title=f"model ({syms})")
    for col in ("", "before", "after"):
        t.add_column(col)
    t.add_row("graph nodes", str(diff["nodes"]["before"]), str(diff["nodes"]["after"]))
    t.add_row("parameters", f"{diff['parameters']['before']:,}", f"{diff['parameters']['after']:,}")
    for key, label in (("flops", "FLOPs (matmul-like ops)"), ("attention_memory", "attention memory (bytes)"),
                       ("kv_cache", "KV cache for generation (bytes, batch 1, context N)")):
        if key in diff:
            t.add_row(label, fmt_quantity(diff[key]["before"]), fmt_quantity(diff[key]["after"]))
    console.print(t)
    t = Table(title="sites")
    for col in ("module", "pattern", "rewrite", "status", "nodes", "FLOPs", "memory (bytes)", "reason"):
        t.add_column(col)
    for s in diff["sites"]:
        r = s["region"]
        cells = ["", "", ""] if r is None else [
            f"{len([n for n in r['before']['nodes'] if not n['boundary']])} -> "
            f"{len([n for n in r['after']['nodes'] if not n['boundary']])}",
            f"{fmt_quantity(r['before']['flops'])} -> {fmt_quantity(r['after']['flops'])}",
            f"{fmt_quantity(r['before']['memory_bytes'])} -> {fmt_quantity(r['after']['memory_bytes'])}"]
        t.add_row(s["fqn"] or "<root>", s["pattern"], s["rewrite"], s["status"], *cells, escape(s["reason"]))
    for m in diff["misses"]:
        t.add_row(m["fqn"] or "<root>", "", "", "miss", "", "", "", escape(m["reason"]))
    console.print(t)
    for o in diff["outputs"]:
        console.print(f"{'[✓]' if o['passed'] else '[x]'} {o['name']}: max abs error {fmt_num(o['max_abs'])} "
                      f"(rel {fmt_num(o['rel'])}) vs the original" + (f": {o['note']}" if o.get("note") else ""),
                      markup=False)
    for w in diff.get("warnings", []):
        console.print(f"warning: {w}", markup=False)


def fmt_quantity(q: dict) -> str:
    """``formula = value`` (just the value when the formula is a constant)."""
    value = f"{q['value']:,}" if q.get("value") is not None else "?"
    return value if q["formula"] == str(q.get("value")) else f"{q['formula']} = {value}"


def fmt_num(x, fmt: str = ".2e") -> str:
    """A number in ``fmt``; 'inf'/'nan' (text in the JSON) as they are."""
    return format(x, fmt) if isinstance(x, (int, float)) else str(x)
