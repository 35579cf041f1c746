"""Triton block-sparse attention kernel (TRITON_INTERPRET=1 on CPU) against the dense masked reference."""
from __future__ import annotations

import os

import pytest
import torch

from attnforge.runtime import sparse
from test_sparse import _keep_from_table, masked_softmax_reference, padding_mask, visible_plain

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

from attnforge.codegen.sparse_attention import block_sparse_triton, sliding_window_triton, window_tables  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("n,window,sinks,causal,heads,mask_kind", [
    (40, 8, 0, True, (2, 2), None), (40, 8, 3, True, (4, 2), "padding"), (37, 20, 2, False, (2, 1), None),
    (50, 5, 0, True, (2, 2), "per_head"), (16, 64, 0, True, (1, 1), None),
])
def test_sliding_window_kernel(n, window, sinks, causal, heads, mask_kind):
    torch.manual_seed(0)
    h, hk = heads
    q, k, v = (torch.randn(2, x, n, 16, device=DEV) for x in (h, hk, hk))
    mask = {None: None, "padding": padding_mask(2, n, n - 7),
            "per_head": torch.randn(2, h, n, n)}[mask_kind]
    mask = mask.to(DEV) if mask is not None else None
    got = sliding_window_triton(q, k, v, mask, 0.3, window, sinks, causal, block=16)
    want = masked_softmax_reference(q.cpu(), k.cpu(), v.cpu(), visible_plain(n, window, sinks, causal), 0.3,
                                    mask.cpu() if mask is not None else None)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)


def test_window_tables_are_compact_and_cover_the_band():
    counts, idx = window_tables(256, 16, 40, 4, True)
    assert idx.shape == (16, 5) and int(counts.max()) <= 5  # (40 + 16) / 16 + sink block, not 16 blocks
    keep = _keep_from_table(counts, idx, 256, 16, True)
    assert bool(keep[visible_plain(256, 40, 4, True)].all())


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("topk", [0, 1])
def test_block_sparse_kernel(causal, topk):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 48, 16) for _ in range(3))
    counts, idx = sparse.block_tables(q, k, 16, 1, 1, 1, 3, topk, 0.3, causal)
    got = block_sparse_triton(q.to(DEV), k.to(DEV), v.to(DEV), None, 0.3, counts.to(DEV), idx.to(DEV), 16,
                              causal=causal)
    for h in range(2):
        c = counts[0, h] if counts.shape[1] > 1 else counts[0, 0]
        i = idx[0, h] if idx.shape[1] > 1 else idx[0, 0]
        keep = _keep_from_table(c, i, 48, 16, causal)
        want = masked_softmax_reference(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], keep, 0.3)
        torch.testing.assert_close(got[:, h:h + 1].cpu(), want, rtol=1e-4, atol=1e-5)


def test_fp16():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 32, 16, dtype=torch.float16, device=DEV) for _ in range(3))
    got = sliding_window_triton(q, k, v, None, 0.3, 8, 2, True, block=16)
    want = masked_softmax_reference(q.float().cpu(), k.float().cpu(), v.float().cpu(), visible_plain(32, 8, 2, True),
                                    0.3)
    torch.testing.assert_close(got.float().cpu(), want, rtol=2e-3, atol=2e-3)
