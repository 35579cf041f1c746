"""Mask predicates (codegen/masks.py): each rule written once, and every rendering of it agrees with the rule
written out element by element: torch evaluation, Triton source, interval classification of tiles, tile tables,
the generated kernel's visit ranges, and the pair counts the cost formulas use."""
from __future__ import annotations

import itertools
import math
import re

import pytest
import sympy
import torch

from attnforge.codegen import masks
from attnforge.codegen.attention import AttentionSpec, _ranges
from attnforge.runtime.chunked_attention import pairs as chunked_pairs
from attnforge.runtime.chunked_attention import predicate as chunked
from attnforge.runtime.common import causal_pairs
from attnforge.runtime.sliding_window import pairs as window_pairs


def plain(kind: str, i: int, j: int, w: int = 0, s: int = 0, causal: bool = True, c: int = 1) -> bool:
    """The rules of DESIGN.md, one pair at a time."""
    if kind == "causal":
        return j <= i
    if kind == "window":
        return (0 <= i - j < w or (j < s and j <= i)) if causal else (abs(i - j) < w or j < s)
    if kind == "chunked":
        return i // c == j // c and (j <= i or not causal)
    raise KeyError(kind)


CASES = [("causal", {}, masks.causal())] + [
    ("window", dict(w=w, s=s, causal=cz), masks.sliding_window(w, s, cz))
    for w, s, cz in itertools.product((1, 3, 8), (0, 2, 5), (True, False))] + [
    ("chunked", dict(c=c, causal=cz), chunked(c, cz)) for c, cz in itertools.product((1, 4, 7), (True, False))]


class _TL:  # enough of triton.language to evaluate the rendered source on Python ints
    abs = staticmethod(abs)
    minimum = staticmethod(min)
    maximum = staticmethod(max)


@pytest.mark.parametrize("kind,kw,m", CASES, ids=lambda x: str(x) if not isinstance(x, masks.Expr) else "")
def test_every_rendering_equals_the_rule(kind, kw, m):
    n = 23
    want = torch.tensor([[plain(kind, i, j, **kw) for j in range(n)] for i in range(n)])
    assert torch.equal(masks.dense(m, n), want)
    source = masks.triton(m, "i", "j")
    got = torch.tensor([[bool(eval(source, {"tl": _TL}, {"i": i, "j": j})) for j in range(n)] for i in range(n)])
    assert torch.equal(got, want), source
    assert all(bool(masks.evaluate(m, i, j)) == bool(want[i, j]) for i in range(n) for j in range(n))


@pytest.mark.parametrize("kind,kw,m", CASES, ids=lambda x: str(x) if not isinstance(x, masks.Expr) else "")
def test_classify_never_skips_a_visible_pair_nor_trusts_a_partial_tile(kind, kw, m):
    """Interval classification is sound on every tile: ``any`` False means no pair is visible, ``all`` True means
    every pair is. For a single comparison chain (causal, a band, a chunk) it is exact; an OR of partial terms
    (band | sinks) may call a full tile partial, which only costs the element-wise test."""
    n = 29
    dense = masks.dense(m, n)
    exact = kind == "causal" or (kind == "window" and kw["s"] == 0) or (kind == "chunked" and not kw["causal"])
    for bq, bk in ((4, 4), (5, 3), (8, 16)):
        for q0 in range(0, n, bq):
            for k0 in range(0, n, bk):
                q1, k1 = min(q0 + bq, n) - 1, min(k0 + bk, n) - 1
                tile = dense[q0:q1 + 1, k0:k1 + 1]
                any_, all_ = (bool(x) for x in masks.classify(m, q0, q1, k0, k1))
                assert (any_ or not tile.any()) and (not all_ or tile.all()), (q0, k0, bq, bk)
                if exact:
                    assert any_ == bool(tile.any()) and all_ == bool(tile.all()), (q0, k0, bq, bk)


def test_classify_is_conservative_on_correlated_terms():
    """i - i is 0 everywhere; interval arithmetic cannot see it, but never claims a wrong certainty."""
    m = (masks.I - masks.I).eq(0) & (masks.J <= 40)
    any_, all_ = masks.classify(m, 0, 7, 0, 7)
    assert any_ and not all_


def test_tile_tables_list_exactly_the_nonempty_tiles():
    m = chunked(6, True)
    n, block = 40, 8
    counts, idx, full = masks.tile_tables(m, n, n, block, block)
    dense = masks.dense(m, n)
    for qb in range(-(-n // block)):
        rows = dense[qb * block:(qb + 1) * block]
        tiles = [kb for kb in range(-(-n // block)) if rows[:, kb * block:(kb + 1) * block].any()]
        assert idx[qb, :counts[qb]].tolist() == tiles
        assert full[qb, :counts[qb]].tolist() == [bool(rows[:, kb * block:(kb + 1) * block].all()) for kb in tiles]
        assert set(idx[qb].tolist()) <= set(tiles)  # padding slots repeat a visited tile


@pytest.mark.parametrize("mask,window,sinks,causal", [("causal", 0, 0, True), ("none", 0, 0, False),
                                                     ("window", 5, 0, True), ("window", 5, 3, True),
                                                     ("window", 17, 2, False), ("window", 4, 40, False)])
def test_generated_kernel_visit_ranges_agree_with_the_predicate(mask, window, sinks, causal):
    """The Triton kernel visits key tiles [lo, hi) (plus sink tiles) and skips the element-wise test on
    [full_lo, full_hi): every tile it skips must be empty and every unmasked tile full, by ``classify``."""
    spec = AttentionSpec(mask=mask, window=window or 0, sinks=sinks, causal=causal)
    m, n_k = spec.predicate, 90
    lines = _ranges(spec)
    for block_m, block_n in ((16, 16), (16, 32), (32, 16)):
        for m0 in range(0, n_k, block_m):
            env = {"m0": m0, "BLOCK_M": block_m, "BLOCK_N": block_n, "n_k": n_k, "tl": _TL}
            for line in lines:
                exec(line, env)
            lo, hi, full_lo, full_hi = (env[x] for x in ("lo", "hi", "full_lo", "full_hi"))
            sink_end = min(sinks, lo) if mask == "window" and sinks else 0
            last_q = min(m0 + block_m, n_k) - 1
            for start in range(0, n_k, block_n):
                end = min(start + block_n, n_k) - 1
                any_, all_ = masks.classify(m, m0, last_q, start, end)
                visited = lo <= start < hi or start < sink_end
                if not visited:
                    assert not any_, (m0, start, block_m, block_n)
                if full_lo <= start < full_hi and end == start + block_n - 1:
                    assert all_, (m0, start, block_m, block_n)


def test_sliding_window_pairs_formula_and_count_equal_the_predicate():
    n_sym = sympy.Symbol("N", positive=True, integer=True)
    for w, s, causal in itertools.product((1, 4, 9), (0, 2, 4), (True, False)):
        for n in (1, 5, 13, 30):
            dense = int(masks.dense(masks.sliding_window(w, s, causal), n).sum())
            assert window_pairs(n, w, s, causal) == dense, (n, w, s, causal)
            if n >= w + s and s <= w:
                assert int(window_pairs(n_sym, w, s, causal).subs(n_sym, n)) == dense


def test_chunked_and_causal_pairs_equal_the_predicate():
    for c, causal, n in itertools.product((1, 3, 8), (True, False), (1, 7, 24, 25)):
        assert int(chunked_pairs(n, c, causal)) == int(masks.dense(chunked(c, causal), n).sum())
    for n, m in ((5, 5), (3, 8), (8, 3)):
        assert int(causal_pairs(n, m)) == int(masks.dense(masks.causal(), n, m).sum())


def test_additive_is_the_one_bool_to_float_conversion():
    keep = torch.tensor([[True, False, True]])
    add = masks.additive(keep, torch.float16)
    assert add.dtype == torch.float16 and add.tolist() == [[0.0, -math.inf, 0.0]]
    f = torch.tensor([0.5, -2.0])
    assert torch.equal(masks.additive(f, torch.float64), f.double()) and masks.additive(None, torch.float32) is None


def test_bad_constants_are_refused():
    with pytest.raises(TypeError):
        masks.J < 1.5
    with pytest.raises(TypeError):
        masks.J < True


def test_the_rule_is_spelled_once():
    """No module but codegen/masks.py writes the window comparison itself (the issue's 'seven spellings')."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spelled = re.compile(r"(d|dist) < window|abs\(\) < window|\(i - j\) < w")
    offenders = [str(p.relative_to(root)) for folder in ("runtime", "codegen", "passes", "patterns", "attnforge")
                 for p in (root / folder).rglob("*.py") if p.name != "masks.py" and spelled.search(p.read_text())]
    assert offenders == []


def test_one_mask_floor_for_the_matcher_and_the_kernels():
    """patterns (which imports torch only) and codegen each name the additive-mask floor: the same number."""
    from attnforge.codegen.masks import FLOOR
    from attnforge.patterns import MASK_FLOOR

    assert FLOOR == MASK_FLOOR
