"""The diff report (tools/diff.py) as one self-contained HTML page: inline CSS and SVG, no script, no network.

Each rewritten site is drawn before and after, side by side: with graphviz ``dot`` when it is installed,
else with a small layered layout (a node's row is its longest path from the region's inputs).
"""
from __future__ import annotations

import html
import itertools
import shutil
import subprocess

from .diff import fmt_num, fmt_quantity

BOX_W, BOX_H, GAP_X, GAP_Y, PAD = 200, 38, 12, 34, 8
_MARKERS = itertools.count()  # one arrowhead id per drawing: ids stay unique in the page

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1760px; color: #1d232b; padding: 0 16px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #d5dae0; }
h3 { font-size: 15px; font-family: ui-monospace, monospace; }
table { border-collapse: collapse; margin: 8px 0; } td, th { border: 1px solid #d5dae0; padding: 3px 8px;
  text-align: left; vertical-align: top; } th { background: #f1f3f6; }
code, .mono { font-family: ui-monospace, monospace; font-size: 12.5px; }
.pass { color: #126b2c; } .fail { color: #b3261e; } .muted { color: #66707c; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
figure { margin: 0; border: 1px solid #d5dae0; border-radius: 6px; padding: 8px; overflow-x: auto; }
figcaption { font-weight: 600; margin-bottom: 6px; } svg { display: block; }
"""


def render_html(diff: dict) -> str:
    """The whole page for a diff dict (schema in docs/report-schema.md)."""
    e = html.escape
    ok = diff["passed"]
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><meta name='generator' content='attnforge'>"
             f"<title>attnforge diff: {e(diff['model'])}"
             f"</title><style>{CSS}</style></head><body>",
             f"<h1>attnforge diff: <code>{e(diff['model'])}</code> with recipe <code>{e(diff['recipe'])}</code></h1>",
             f"<p class='{'pass' if ok else 'fail'}'>"
             f"{'[✓] every output within tolerance' if ok else '[x] outputs over tolerance'}"
             f" <span class='muted'>(captured with {e(diff['capture']['method'] or 'nothing')}; example shapes: "
             f"{e(', '.join(f'{k}={v}' for k, v in diff['symbols'].items()) or 'static')})</span></p>"]
    if diff["capture"]["error"]:
        parts.append(f"<pre>{e(diff['capture']['error'])}</pre>")
    q = fmt_quantity
    rows = [("graph nodes", diff["nodes"]["before"], diff["nodes"]["after"]),
            ("parameters", f"{diff['parameters']['before']:,}", f"{diff['parameters']['after']:,}"),
            ("FLOPs (matmul-like ops)", q(diff["flops"]["before"]), q(diff["flops"]["after"])),
            ("attention memory (bytes)", q(diff["attention_memory"]["before"]), q(diff["attention_memory"]["after"]))]
    if "kv_cache" in diff:
        rows.append(("KV cache for generation (bytes, batch 1, context N)", q(diff["kv_cache"]["before"]),
                     q(diff["kv_cache"]["after"])))
    parts.append("<h2>Model</h2>" + _table(["", "before", "after"], rows))
    parts.append("<h2>Outputs vs the original</h2>" + _table(
        ["", "output", "max abs", "rel", "cosine"],
        [("[✓]" if o["passed"] else "[x]", o["name"], fmt_num(o["max_abs"]), fmt_num(o["rel"]),
          fmt_num(o["cosine"], ".6f")) for o in diff["outputs"]]))
    site_rows = [(s["fqn"] or "<root>", s["kind"], s["pattern"], s["rewrite"], s["status"],
                  fmt_num(s["error"]["rel"]) if s["error"] else "", s["reason"]) for s in diff["sites"]]
    site_rows += [(m["fqn"] or "<root>", m["kind"], "", "", "miss", "", m["reason"]) for m in diff["misses"]]
    parts.append("<h2>Sites</h2>" + _table(["module", "kind", "pattern", "rewrite", "status", "local rel. error",
                                            "reason"], site_rows))
    if diff["uncounted_ops"]:
        parts.append(f"<p class='muted'>FLOPs not counted for: {e(', '.join(diff['uncounted_ops']))}</p>")
    parts.append("<h2>Rewritten regions</h2><p class='muted'>Dashed boxes are the region's inputs; FLOPs and "
                 "memory are formulas in the symbolic input sizes, evaluated at the example shapes.</p>")
    for s in diff["sites"]:
        if not s["region"]:
            continue
        parts.append(f"<section><h3>{e(s['fqn'] or '<root>')} · {e(s['rewrite'])} ({e(s['pattern'])})</h3>"
                     "<div class='pair'>")
        for side in ("before", "after"):
            r = s["region"][side]
            inner = [n for n in r["nodes"] if not n["boundary"]]
            parts.append(f"<figure><figcaption>{side}: {len(inner)} nodes · FLOPs {e(q(r['flops']))} · memory "
                         f"{e(q(r['memory_bytes']))} B · parameters {r['parameters']:,}</figcaption>"
                         f"{graph_svg(r['nodes'])}</figure>")
        parts.append("</div></section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _table(head: list[str], rows) -> str:
    e = html.escape
    out = ["<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows]
    return "".join(out) + "</table>"


# --------------------------------------------------------------------------- graphs


def _label(n: dict) -> tuple[str, str]:
    shape = f" [{', '.join(n['shape'])}]" if n["shape"] is not None else ""
    return n["name"], f"{n['op']}{shape}"


def graph_svg(nodes: list[dict]) -> str:
    """An SVG drawing of a region (nodes with ``inputs`` by name): graphviz when ``dot`` exists, else built in."""
    if shutil.which("dot"):
        try:
            return _dot_svg(nodes)
        except (OSError, subprocess.SubprocessError):
            pass
    return layered_svg(nodes)


def _dot_svg(nodes: list[dict]) -> str:
    q = lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'  # noqa: E731
    names = {n["name"] for n in nodes}
    lines = ['digraph G { rankdir=TB; node [shape=box, fontname="monospace", fontsize=10, style=rounded];']
    for n in nodes:
        title, sub = _label(n)
        style = ', style="rounded,dashed"' if n["boundary"] else ""
        lines.append(f"{q(n['name'])} [label={q(title + chr(10) + sub)}{style}];")
        lines += [f"{q(i)} -> {q(n['name'])};" for i in n["inputs"] if i in names]
    svg = subprocess.run(["dot", "-Tsvg"], input="\n".join(lines) + "}", capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return svg[svg.index("<svg"):]


def layered_svg(nodes: list[dict]) -> str:
    """Boxes in rows by longest path from the region's inputs, edges as curves with arrowheads."""
    e, arrow = html.escape, f"arrow{next(_MARKERS)}"
    by_name = {n["name"]: n for n in nodes}
    layer: dict[str, int] = {}
    for n in nodes:  # nodes come in graph (topological) order
        layer[n["name"]] = 1 + max((layer[i] for i in n["inputs"] if i in layer), default=-1)
    rows: dict[int, list[str]] = {}
    for name, k in layer.items():
        rows.setdefault(k, []).append(name)
    pos = {name: (PAD + j * (BOX_W + GAP_X), PAD + k * (BOX_H + GAP_Y))
           for k, row in rows.items() for j, name in enumerate(row)}
    width = PAD * 2 + max(len(r) for r in rows.values()) * (BOX_W + GAP_X) - GAP_X if rows else 2 * PAD
    height = PAD * 2 + len(rows) * (BOX_H + GAP_Y) - GAP_Y if rows else 2 * PAD
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' viewBox='0 0 {width} {height}' "
           "font-family='ui-monospace, monospace' font-size='11'>",
           f"<defs><marker id='{arrow}' viewBox='0 0 8 8' refX='8' refY='4' markerWidth='7' markerHeight='7' "
           "orient='auto'><path d='M0,0 L8,4 L0,8 z' fill='#5b6570'/></marker></defs>"]
    for n in nodes:
        x2, y2 = pos[n["name"]]
        for i in n["inputs"]:
            if i in by_name:
                x1, y1 = pos[i]
                a, b, c, d = x1 + BOX_W / 2, y1 + BOX_H, x2 + BOX_W / 2, y2
                out.append(f"<path d='M{a},{b} C{a},{b + GAP_Y / 2} {c},{d - GAP_Y / 2} {c},{d}' fill='none' "
                           f"stroke='#5b6570' marker-end='url(#{arrow})'/>")
    for n in nodes:
        x, y = pos[n["name"]]
        title, sub = _label(n)
        fill, dash = ("#f6f7f9", " stroke-dasharray='4 3'") if n["boundary"] else (
            "#e7f0fb" if not n["op"].startswith("attnforge.") else "#fdf0d8", "")
        out.append(f"<g><title>{e(n['name'])}: {e(sub)} ({e(n.get('fqn') or '')})</title>"
                   f"<rect x='{x}' y='{y}' width='{BOX_W}' height='{BOX_H}' rx='5' fill='{fill}' stroke='#5b6570'"
                   f"{dash}/><text x='{x + 6}' y='{y + 15}' font-weight='bold'>{e(_fit(title))}</text>"
                   f"<text x='{x + 6}' y='{y + 30}'>{e(_fit(sub))}</text></g>")
    out.append("</svg>")
    return "".join(out)


def _fit(text: str, chars: int = 29) -> str:
    return text if len(text) <= chars else text[:chars - 1] + "…"
