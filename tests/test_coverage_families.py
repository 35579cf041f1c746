"""Issue #17, item 4: the ``exact`` recipe over Hugging Face families × {eager, sdpa} (tools/coverage.py builds the
tiny models, calls them as users do and measures each row once; docs/rewrites/coverage.md is its table).

Per row: every attention block (cross-attention included) and every FFN block is fused, or, for a block the op
cannot express (mixture-of-experts routing), reported as a miss naming it; the optimized model's first output is
within 1e-5 (relative max error) of the original on the example and on a second shape; where the model has more
than one KV head, ``gqa`` to heads/2 KV heads is applied at every attention site. A row that is not fully fused
has misses that name the construct in the way.

What does not pass yet is marked ``xfail(strict=True)`` with what is missing and the reason the report gives
today, so that a fix turns the mark into a failure (remove the mark then).
"""
from __future__ import annotations

import os
import pathlib

import pytest

from attnforge.tools.coverage import FAMILIES, Row, markdown, measure

# Decoder families share Hugging Face's one sdpa integration, so CI runs sdpa for a sample of the distinct code
# paths (GQA decoder, GPT-2's Conv1D, an encoder, relative bias + cross-attention, Whisper, ModernBERT) and eager
# for every family; ATTNFORGE_COVERAGE_ALL=1 runs every (family, impl), as docs/rewrites/coverage.md was measured.
SDPA_SAMPLE = {"llama", "gpt2", "bert", "t5", "whisper", "modernbert"}
ROWS = [(name, impl) for name, f in FAMILIES.items() for impl in f.impls
        if impl == "eager" or name in SDPA_SAMPLE or os.environ.get("ATTNFORGE_COVERAGE_ALL")]

# blocks whose semantics the fused ops cannot express: (kind, phrase every such miss carries)
INEXPRESSIBLE = {
    "mixtral": ("ffn", "mixture-of-experts block"),
    "qwen2_moe": ("ffn", "mixture-of-experts block"),  # its shared expert is a plain gated FFN: fused
}

# for a row that is not fully fused: words one of which each attention/FFN miss must contain (case-insensitive)
CONSTRUCT = {
    "mixtral": ("mixture-of-experts",),
    "qwen2_moe": ("mixture-of-experts",),
}

XFAIL: dict[tuple[str, str], str] = {  # (test, family) -> what is missing; every impl of the family
    ("gqa", "albert"): "ALBERT runs one layer's weights at every layer, and gqa refuses a projection that another "
                       "site reads (with mean pooling, the shared weights pooled once would serve every site). "
                       "Today's skip: 'K's projection encoder.albert_layer_groups.0.albert_layers.0.attention.key is "
                       "also used outside this attention (a returned KV cache or a shared layer)'",
}


def _params(test: str, rows) -> list:
    out = []
    for name, impl in rows:
        reason = XFAIL.get((test, name))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(name, impl, id=f"{name}-{impl}", marks=marks))
    return out


@pytest.fixture(scope="module")
def measured():
    """One ``measure`` per (family, impl) for the whole module: every test below reads the same row. With
    ATTNFORGE_COVERAGE_TABLE=path set, the rows measured are written there as Markdown at the end (the table of
    docs/rewrites/coverage.md)."""
    cache: dict = {}

    def get(name: str, impl: str) -> Row:
        if (name, impl) not in cache:
            try:
                cache[name, impl] = measure(name, impl)
            except Exception as e:  # noqa: BLE001  (a row that cannot be built fails each of its tests, once)
                cache[name, impl] = e
        got = cache[name, impl]
        if isinstance(got, Exception):
            raise got
        return got

    yield get
    path = os.environ.get("ATTNFORGE_COVERAGE_TABLE")
    if path:
        done = [cache[r] for r in ROWS if isinstance(cache.get(r), Row)]
        pathlib.Path(path).write_text(markdown(done) + "\n")


def _misses(row: Row, kind: str) -> list[str]:
    return [reason for k, _, reason in row.misses if k == kind]


def _inexpressible(row: Row, kind: str) -> int:
    """Blocks of ``kind`` reported as inexpressible (a miss per block, counted on the report itself)."""
    want = INEXPRESSIBLE.get(row.family)
    if not want or want[0] != kind:
        return 0
    return sum(m.kind == kind and want[1] in m.reason for m in row.report.misses)


@pytest.mark.parametrize("name, impl", _params("attention", ROWS))
def test_every_attention_block_fused(measured, name, impl):
    row = measured(name, impl)
    applied, expected = row.attention
    assert applied + _inexpressible(row, "attention") == expected, row.report.to_text()


@pytest.mark.parametrize("name, impl", _params("ffn", ROWS))
def test_every_ffn_block_fused_or_named(measured, name, impl):
    row = measured(name, impl)
    applied, expected = row.ffn
    assert applied + _inexpressible(row, "ffn") == expected, row.report.to_text()


@pytest.mark.parametrize("name, impl", _params("error", ROWS))
def test_outputs_equal_on_two_shapes(measured, name, impl):
    row = measured(name, impl)
    assert max(row.errors) <= 1e-5, (row.errors, row.report.to_text())


@pytest.mark.parametrize("name, impl", _params("gqa", [r for r in ROWS if FAMILIES[r[0]].kv_heads > 1]))
def test_gqa_applies_at_every_attention_site(measured, name, impl):
    row = measured(name, impl)
    applied, sites = row.gqa
    assert applied == sites, row.gqa_skips


@pytest.mark.parametrize("name, impl", _params("misses", ROWS))
def test_misses_name_the_construct(measured, name, impl):
    """A fully fused row has no attention/FFN misses (a router's softmax is no attention miss, say); any other
    row's misses name what is in the way."""
    row = measured(name, impl)
    misses = _misses(row, "attention") + _misses(row, "ffn")
    if row.fused:
        assert not misses
        return
    assert misses, "not fully fused, and no miss says why"
    words = CONSTRUCT.get(name, ())
    for reason in misses:
        assert any(w in reason.lower() for w in words), reason

