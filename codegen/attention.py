"""Generated Triton flash-attention kernels: one specialised source per ``AttentionSpec``.

Forward (FlashAttention, Dao et al. 2022): one program owns BLOCK_M query rows of one (batch, head) and walks
the KV tiles its mask can reach, keeping the online-softmax running max m, sum l and accumulator in registers:

    s = (q kᵀ)·scale  [→ cap·tanh(s / cap), the logit softcap of Gemma 2]  + model mask
    m' = max(m, rowmax s);  p = exp(s − m');  l = l·exp(m − m') + rowsum p;  acc = acc·exp(m − m') + p v
    out = acc / l                                     (exp2 with log2 e folded into the scale)

The mask kind decides which tiles are visited, so sparse masks cost in proportion to the kept tiles:
``none`` all; ``causal`` the tiles at or left of the diagonal; ``window`` the band |i − j| < w (causal: 0 ≤
i − j < w) plus the sink tiles j < sinks (StreamingLLM); ``block_sparse`` the KV blocks named by per-query-block
index tables (counts, indices), which ``predicate_triton`` builds for any mask predicate. Inside the visited
tiles the element-wise test is the spec's mask predicate rendered as Triton (codegen/masks.py, the same rule
the references, the CPU kernels and ONNX render); tiles wholly inside the mask skip it. GQA: head h reads K/V
head h // G. Head dims that are not a power of two (80, 96) are padded in registers. Rows that see no key
output 0.

Decode (query length 1, a KV cache: the query sits at position M − 1) splits the keys over programs instead
(split-KV, as flash-decoding and LeanAttention): every program reduces one slice of keys for the G query heads
of one KV head to a partial (m, l, acc), and a second kernel merges the partials by log-sum-exp.
v may have its own head dim there (``value_dim``: keys with pruned channels, ThinK); the prefill kernel
takes v's head dim equal to q's.

``source(spec)`` is the generated text (``attnforge codegen --dump``); it is written to a file, imported once
per spec, and keyed by its hash in the autotune cache. Runs on CUDA tensors, and on CPU tensors under
``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import functools
import importlib.util
import tempfile
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from . import masks, safefs
from .autotune import Tunable, bucket, cache_dir, lookup, make_key, source_hash
from .masks import KEEP_ALL, Expr

MASKS = ("none", "causal", "window", "block_sparse")
DTYPES = ("float32", "float16", "bfloat16")
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class AttentionSpec:
    """What a generated kernel is specialised on (everything else is a runtime argument or a tunable)."""

    mask: str = "none"        # none | causal | window | block_sparse
    causal: bool = False      # for window and block_sparse (``causal`` is always causal)
    window: int = 0           # window: keys with |i − j| < window (causal: 0 ≤ i − j < window)
    sinks: int = 0            # window: the first ``sinks`` keys stay visible
    block: int = 0            # block_sparse: the index tables' block size (= BLOCK_M = BLOCK_N)
    groups: int = 1           # query heads per K/V head
    head_dim: int = 64        # of q and k
    value_dim: int = 0        # of v (and the output) when it differs from head_dim (decode only); 0: head_dim
    scale: float = 0.125
    softcap: float = 0.0      # 0: none
    dtype: str = "float32"
    has_mask: bool = False    # an additive model mask is an input
    tf32: bool = False        # float32 dots in TF32 (torch.set_float32_matmul_precision("high")), else IEEE
    decode: bool = False      # query length 1 at position M − 1, split over the keys
    keep: Optional[Expr] = None  # block_sparse: the element-wise rule inside the visited tiles (codegen/masks.py),
    #                              ``causal`` folded in; None: causal() when causal, else every key

    def __post_init__(self):
        if self.mask in ("none", "causal"):  # the mask kind says it all
            object.__setattr__(self, "causal", self.mask == "causal")
        if self.value_dim == self.head_dim:  # one spelling of "v's head dim is q's": one kernel, one cache key
            object.__setattr__(self, "value_dim", 0)
        problems = []
        if self.mask not in MASKS:
            problems.append(f"mask must be one of {MASKS}, not {self.mask!r}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {DTYPES}, not {self.dtype!r}")
        if self.head_dim < 1 or self.groups < 1:
            problems.append("head_dim and groups must be positive")
        if self.value_dim < 0:
            problems.append("value_dim must be >= 0 (0: the same as head_dim)")
        elif self.value_dim and not self.decode:
            problems.append("value_dim different from head_dim needs decode=1 (the prefill kernel takes v's head "
                            "dim equal to q's)")
        if self.mask == "window" and self.window < 1:
            problems.append("mask='window' needs window >= 1")
        if self.mask == "block_sparse" and (self.block < 16 or self.block & (self.block - 1)):
            problems.append("mask='block_sparse' needs block, a power of two >= 16")
        if self.decode and self.mask not in ("none", "causal", "window"):
            problems.append("decode kernels take mask none, causal or window")
        if self.softcap < 0 or self.sinks < 0:
            problems.append("softcap and sinks must be >= 0")
        if self.keep is not None and self.mask != "block_sparse":
            problems.append("keep (an element-wise rule) goes with mask='block_sparse' (the tiles of index tables)")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def parse(cls, text: str) -> "AttentionSpec":
        """``"mask=window,window=512,sinks=4,head_dim=80,groups=2,dtype=float16"`` (the CLI's form)."""
        types = {f.name: f.type for f in fields(cls) if f.name != "keep"}
        values = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in types:
                raise ValueError(f"bad kernel spec item {part!r}: use name=value with names {sorted(types)}")
            kind = types[name]
            if kind in ("bool", bool):
                values[name] = value.strip().lower() in ("1", "true", "yes")
            elif kind in ("int", int):
                values[name] = int(value)
            elif kind in ("float", float):
                values[name] = float(value)
            else:
                values[name] = value.strip()
        return cls(**values)

    @property
    def name(self) -> str:
        parts = [self.mask + ("_causal" if self.causal and self.mask in ("window", "block_sparse") else "")]
        if self.mask == "window":
            parts.append(f"w{self.window}s{self.sinks}")
        if self.mask == "block_sparse":
            parts.append(f"b{self.block}")
        parts += [f"g{self.groups}", f"d{self.head_dim}" + (f"v{self.value_dim}" if self.value_dim else ""),
                  self.dtype]
        if self.softcap:
            parts.append(f"cap{self.softcap:g}")
        if self.has_mask:
            parts.append("masked")
        if self.keep is not None:
            parts.append("p" + source_hash(str(self.keep))[:8])
        return ("decode_" if self.decode else "attn_") + "_".join(parts)

    @property
    def v_dim(self) -> int:
        """The head dim of v and of the output."""
        return self.value_dim or self.head_dim

    @property
    def predicate(self) -> Expr:
        """Which keys a query sees, as a mask predicate (codegen/masks.py): rendered into the element-wise test."""
        if self.mask == "causal":
            return masks.causal()
        if self.mask == "window":
            return masks.sliding_window(self.window, self.sinks, self.causal)
        if self.mask == "block_sparse":
            return self.keep if self.keep is not None else masks.causal() if self.causal else KEEP_ALL
        return KEEP_ALL


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << (n - 1).bit_length())


# --------------------------------------------------------------------------- source generation


def _dot(spec: AttentionSpec, a: str, b: str) -> str:
    if spec.dtype != "float32":
        return f"tl.dot({a}, {b})"
    return f"tl.dot({a}, {b}, input_precision={'tf32' if spec.tf32 else 'ieee'!r})"


def _scores(spec: AttentionSpec, q: str, kt: str) -> list[str]:
    """Lines computing the log2-domain scores ``s`` of one tile."""
    if spec.softcap:
        return [f"s = {_dot(spec, q, kt)} * {spec.scale!r}",
                f"s = {spec.softcap!r} * (2.0 * tl.sigmoid(s * {2.0 / spec.softcap!r}) - 1.0) * {LOG2E!r}"
                "  # cap·tanh(s/cap)"]
    return [f"s = {_dot(spec, q, kt)} * {spec.scale * LOG2E!r}  # scale·log2(e)"]


def _keep(spec: AttentionSpec, row: str) -> str:
    """The element-wise visibility of key ``offs_n`` from query position ``row``: the sequence end, then the
    spec's mask predicate rendered as Triton (codegen/masks.py)."""
    j = "offs_n[None, :]"
    rule = f"({j} < n_k)"
    if spec.predicate != KEEP_ALL:
        rule += " & " + masks.triton(spec.predicate, row, j)
    return rule


def _v_offsets(spec: AttentionSpec) -> str:
    """The name of v's (and the output's) channel offsets: ``offs_d`` when v's head dim is q's, else ``offs_dv``."""
    return "offs_dv" if spec.value_dim else "offs_d"


def _tile_fn(spec: AttentionSpec, d_pad: int) -> str:
    """``_tile``: one KV tile folded into the running (m, l, acc). ``MROW``: the model mask's row pointers. K is
    read over q's channels ``offs_d`` (padded to ``d_pad``), V over its own (``_v_offsets``, padded to a power of
    two)."""
    row = "(n_k - 1)" if spec.decode else "offs_m[:, None]"
    dv, dv_pad = _v_offsets(spec), _pow2(spec.v_dim)
    k_ok = "" if d_pad == spec.head_dim else f"(offs_d[:, None] < {spec.head_dim})"
    v_ok = "" if dv_pad == spec.v_dim else f"({dv}[None, :] < {spec.v_dim})"

    def load(ptr, ok, tail):
        both = " & ".join(filter(None, (tail, ok)))
        return f"tl.load({ptr}, mask={both}, other=0.0)" if both else f"tl.load({ptr})"

    k_ptr, v_ptr = "K + offs_n[None, :] * skn + offs_d[:, None]", f"V + offs_n[:, None] * svn + {dv}[None, :]"
    lines = [
        "@triton.jit",
        f"def _tile(q, m_i, l_i, acc, K, V, {'MROW, smk, ' if spec.has_mask else ''}start, offs_m, offs_n0, offs_d, "
        + ("offs_dv, " if spec.value_dim else "") + "n_q, n_k, skn, svn,",
        "          MASKED: tl.constexpr):",
        "    offs_n = start + offs_n0",
        "    if MASKED:",
        f"        kt = {load(k_ptr, k_ok, '(offs_n[None, :] < n_k)')}",
        f"        v = {load(v_ptr, v_ok, '(offs_n[:, None] < n_k)')}",
        "    else:",
        f"        kt = {load(k_ptr, k_ok, '')}",
        f"        v = {load(v_ptr, v_ok, '')}",
    ]
    lines += ["    " + s for s in _scores(spec, "q", "kt")]
    lines += ["    if MASKED:",
              f"        s = tl.where({_keep(spec, row)}, s, float('-inf'))"]
    if spec.has_mask:
        lines += ["    s += tl.load(MROW + offs_n[None, :] * smk, mask=(offs_m[:, None] < n_q) & (offs_n[None, :] < n_k),",
                  f"                 other=0.0).to(tl.float32) * {LOG2E!r}"]
    lines += [
        "    m_new = tl.maximum(m_i, tl.max(s, 1))",
        "    m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)  # rows that have seen no key yet",
        "    p = tl.math.exp2(s - m_safe[:, None])",
        "    alpha = tl.math.exp2(m_i - m_safe)",
        "    l_i = l_i * alpha + tl.sum(p, 1)",
        f"    acc = acc * alpha[:, None] + {_dot(spec, 'p.to(v.dtype)', 'v')}",
        "    return m_new, l_i, acc",
    ]
    return "\n".join(lines)


def _ranges(spec: AttentionSpec) -> list[str]:
    """Lines computing the visited key range [lo, hi) and its unmasked part [full_lo, full_hi) for the query
    rows [m0, m0 + BLOCK_M): loops run masked over [lo, full_lo) and [full_hi, hi), unmasked in between."""
    tail = "n_k // BLOCK_N * BLOCK_N"  # tiles past it hold the sequence end
    if spec.mask == "none":
        return ["lo, hi = 0, n_k", f"full_lo, full_hi = 0, {tail}"]
    if spec.mask == "causal":
        return ["lo, hi = 0, tl.minimum(n_k, m0 + BLOCK_M)",
                f"full_lo, full_hi = 0, tl.minimum((m0 + 1) // BLOCK_N * BLOCK_N, {tail})"]
    w = spec.window
    right = "m0 + BLOCK_M" if spec.causal else f"m0 + BLOCK_M + {w - 1}"
    if spec.sinks and not spec.causal:  # bidirectional sinks are seen by every query, also past the band's end
        right = f"tl.maximum({right}, {spec.sinks})"
    full_end = "(m0 + 1)" if spec.causal else f"(m0 + {w})"  # a tile [j, j + BLOCK_N) is inside for every row iff
    return [  # j ≥ (last row) − w + 1 and j + BLOCK_N ≤ full_end
        f"lo = tl.maximum(m0 - {w - 1}, 0) // BLOCK_N * BLOCK_N",
        f"hi = tl.minimum(n_k, {right})",
        f"full_lo = tl.minimum(tl.maximum((tl.maximum(m0 + BLOCK_M - {w}, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N, lo), hi)",
        f"full_hi = tl.minimum(tl.maximum(tl.minimum({full_end} // BLOCK_N * BLOCK_N, {tail}), full_lo), hi)",
    ]


def _forward_src(spec: AttentionSpec, d_pad: int) -> str:
    g = spec.groups
    mask_params = "MASK, smb, smh, smq, smk, " if spec.has_mask else ""
    table_params = "COUNTS, INDICES, sc, si, sib, " if spec.mask == "block_sparse" else ""
    d_ok = "" if d_pad == spec.head_dim else f" & (offs_d[None, :] < {spec.head_dim})"
    mask_args = ", MASK + offs_m[:, None] * smq, smk" if spec.has_mask else ""
    call = f"q, m_i, l_i, acc, K, V{mask_args}, start, offs_m, offs_n0, offs_d, n_q, n_k, skn, svn"
    lines = [
        "@triton.jit",
        f"def attention_fwd(Q, K, V, O, {mask_params}{table_params}n_q, n_k, heads,",
        "                  sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,",
        "                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):",
        "    qb = tl.program_id(0)",
        "    bh = tl.program_id(1)",
        "    b = bh // heads",
        "    h = bh % heads",
        f"    kvh = h // {g}" if g > 1 else "    kvh = h",
        "    m0 = qb * BLOCK_M",
        "    offs_m = m0 + tl.arange(0, BLOCK_M)",
        "    offs_n0 = tl.arange(0, BLOCK_N)",
        f"    offs_d = tl.arange(0, {d_pad})",
        "    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :],",
        f"                mask=(offs_m[:, None] < n_q){d_ok}, other=0.0)",
        "    K += b * skb + kvh * skh",
        "    V += b * svb + kvh * svh",
    ]
    if spec.has_mask:
        lines.append("    MASK += b * smb + h * smh")
    lines += [
        "    m_i = tl.full([BLOCK_M], float('-inf'), tl.float32)",
        "    l_i = tl.zeros([BLOCK_M], tl.float32)",
        f"    acc = tl.zeros([BLOCK_M, {d_pad}], tl.float32)",
    ]
    if spec.mask == "block_sparse":
        lines += [
            "    count = tl.load(COUNTS + bh * sc + qb)",
            "    for slot in range(0, count):",
            "        start = tl.load(INDICES + bh * si + qb * sib + slot) * BLOCK_N",
            f"        m_i, l_i, acc = _tile({call}, MASKED=True)",
        ]
    else:
        lines += ["    " + x for x in _ranges(spec)]
        if spec.mask == "window" and spec.sinks:
            lines += [f"    for start in range(0, tl.minimum({spec.sinks}, lo), BLOCK_N):"
                      "  # sink tiles left of the band",
                      f"        m_i, l_i, acc = _tile({call}, MASKED=True)"]
        if spec.mask != "none":
            lines += ["    for start in range(lo, full_lo, BLOCK_N):",
                      f"        m_i, l_i, acc = _tile({call}, MASKED=True)"]
        lines += ["    for start in range(full_lo, full_hi, BLOCK_N):",
                  f"        m_i, l_i, acc = _tile({call}, MASKED=False)",
                  "    for start in range(full_hi, hi, BLOCK_N):",
                  f"        m_i, l_i, acc = _tile({call}, MASKED=True)"]
    lines += [
        "    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]",
        "    tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], out.to(O.dtype.element_ty),",
        f"             mask=(offs_m[:, None] < n_q){d_ok})",
    ]
    return "\n".join(lines)


def _decode_src(spec: AttentionSpec, d_pad: int) -> str:
    """Split-KV decode; q and k have ``head_dim`` channels (padded to ``d_pad``), v, the partial accumulators and
    the output ``v_dim`` (padded to ``dv_pad``): the partials are rows of ``dv_pad`` floats."""
    g, rows = spec.groups, _pow2(spec.groups)
    dv, dv_pad = _v_offsets(spec), _pow2(spec.v_dim)
    mask_params = "MASK, smb, smh, smq, smk, " if spec.has_mask else ""
    d_ok = "" if d_pad == spec.head_dim else f" & (offs_d[None, :] < {spec.head_dim})"
    mask_args = ", MASK + heads_of_row[:, None] * smh, smk" if spec.has_mask else ""
    call = (f"q, m_i, l_i, acc, K, V{mask_args}, start, offs_m, offs_n0, offs_d, "
            + ("offs_dv, " if spec.value_dim else "") + "n_q, n_k, skn, svn")
    return "\n".join([
        "@triton.jit",
        f"def decode_partial(Q, K, V, PO, PM, PL, {mask_params}n_k, kv_heads, lo, split_len, sinks_end,",
        "                   sqb, sqh, skb, skh, skn, svb, svh, svn,",
        "                   BLOCK_N: tl.constexpr):",
        "    split = tl.program_id(0)  # the last split holds the sink keys left of the window",
        "    bkv = tl.program_id(1)",
        "    b = bkv // kv_heads",
        "    kvh = bkv % kv_heads",
        f"    offs_m = tl.arange(0, {rows})  # the query heads of this K/V head, one per row",
        f"    heads_of_row = kvh * {g} + offs_m",
        f"    n_q = {g}  # rows past it are padding",
        "    offs_n0 = tl.arange(0, BLOCK_N)",
        f"    offs_d = tl.arange(0, {d_pad})",
        *([f"    offs_dv = tl.arange(0, {dv_pad})  # v's channels"] if spec.value_dim else []),
        "    q = tl.load(Q + b * sqb + heads_of_row[:, None] * sqh + offs_d[None, :],",
        f"                mask=(offs_m[:, None] < n_q){d_ok}, other=0.0)",
        "    K += b * skb + kvh * skh",
        "    V += b * svb + kvh * svh",
        *(["    MASK += b * smb"] if spec.has_mask else []),
        f"    m_i = tl.full([{rows}], float('-inf'), tl.float32)",
        f"    l_i = tl.zeros([{rows}], tl.float32)",
        f"    acc = tl.zeros([{rows}, {dv_pad}], tl.float32)",
        "    is_sink = split == tl.num_programs(0) - 1",
        "    start_key = tl.where(is_sink, 0, lo + split * split_len)",
        "    end_key = tl.where(is_sink, sinks_end, tl.minimum(lo + split * split_len + split_len, n_k))",
        "    for start in range(start_key, end_key, BLOCK_N):",
        f"        m_i, l_i, acc = _tile({call}, MASKED=True)",
        f"    part = (bkv * tl.num_programs(0) + split) * {rows} + offs_m",
        f"    tl.store(PO + part[:, None] * {dv_pad} + {dv}[None, :], acc)",
        "    tl.store(PM + part, m_i)",
        "    tl.store(PL + part, l_i)",
        "",
        "",
        "@triton.jit",
        "def decode_reduce(PO, PM, PL, O, n_splits, kv_heads, sob, soh,",
        "                  SPLITS: tl.constexpr):",
        "    bkv = tl.program_id(0)",
        "    row = tl.program_id(1)",
        "    b = bkv // kv_heads",
        f"    h = (bkv % kv_heads) * {g} + row",
        "    offs_s = tl.arange(0, SPLITS)",
        f"    offs_d = tl.arange(0, {dv_pad})",
        f"    part = (bkv * n_splits + offs_s) * {rows} + row",
        "    ok = offs_s < n_splits",
        "    m = tl.load(PM + part, mask=ok, other=float('-inf'))",
        "    m_all = tl.max(m, 0)",
        "    w = tl.math.exp2(m - tl.where(m_all == float('-inf'), 0.0, m_all))  # 0 for empty splits",
        "    l = tl.sum(tl.load(PL + part, mask=ok, other=0.0) * w, 0)",
        f"    acc = tl.load(PO + part[:, None] * {dv_pad} + offs_d[None, :], mask=ok[:, None], other=0.0)",
        "    out = tl.sum(acc * w[:, None], 0) / tl.where(l == 0.0, 1.0, l)",
        f"    tl.store(O + b * sob + h * soh + offs_d, out.to(O.dtype.element_ty), mask=offs_d < {spec.v_dim})",
    ])


def source(spec: AttentionSpec) -> str:
    """The Triton source generated for ``spec``."""
    d_pad = _pow2(spec.head_dim)
    body = _decode_src(spec, d_pad) if spec.decode else _forward_src(spec, d_pad)
    head = "\n".join(f"# {f.name} = {_show(getattr(spec, f.name))}" for f in fields(spec)
                     if f.name != "value_dim" or spec.value_dim)  # v's head dim is q's: the text it always had
    return (f'"""attnforge generated kernel {spec.name} (codegen/attention.py)."""\n{head}\n'
            "import triton\nimport triton.language as tl\n\n\n"
            f"{_tile_fn(spec, d_pad)}\n\n\n{body}\n")


def _show(value) -> str:
    return str(value) if isinstance(value, Expr) else repr(value)


@functools.cache
def _kernel_dir() -> Path:
    """Where generated sources are written and imported from: ``kernels/`` in the cache folder when that is safe
    (codegen/safefs.py: a real folder of ours that no one else can write in or swap), else a fresh private
    temporary folder (with one warning)."""
    path = cache_dir() / "kernels"
    try:
        return safefs.use_dir(path, private=True)
    except OSError as e:
        fallback = Path(tempfile.mkdtemp(prefix="attnforge-kernels-"))
        warnings.warn(f"attnforge: {e}; generated kernels go to the private folder {fallback} instead",
                      RuntimeWarning, stacklevel=2)
        return fallback


@functools.lru_cache(maxsize=None)
def compile_spec(spec: AttentionSpec):
    """The module of ``spec``'s kernels (written to a file named by its hash, imported once per process). Only a
    regular file of ours holding exactly this source is imported: anything else at that name is replaced."""
    text = source(spec)
    digest = source_hash(text)
    folder = _kernel_dir()
    path = folder / f"{spec.name}_{digest}.py"
    try:
        same = safefs.read_regular(path, private=True) == text.encode()
    except ValueError:
        same = False
    if not same:
        safefs.clean_stale(folder, ".*.tmp")
        safefs.replace(path, text.encode())
    module_spec = importlib.util.spec_from_file_location(f"attnforge_kernels.{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    module.SOURCE_HASH = digest
    return module


# --------------------------------------------------------------------------- tunables

FORWARD_SPACE = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
                 for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3)]
DECODE_SPACE = [dict(BLOCK_N=n, SPLIT=s, num_warps=w) for n in (32, 64, 128) for s in (256, 512, 1024, 2048)
                for w in (2, 4)]


def _default_forward(spec: AttentionSpec) -> dict:
    if spec.mask == "block_sparse":
        return dict(BLOCK_M=spec.block, BLOCK_N=spec.block, num_warps=4, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=64 if spec.head_dim <= 128 else 32, num_warps=4, num_stages=2)


def _space(spec: AttentionSpec) -> list[dict]:
    if spec.decode:
        return DECODE_SPACE
    if spec.mask == "block_sparse":
        return [dict(BLOCK_M=spec.block, BLOCK_N=spec.block, num_warps=w, num_stages=s) for w in (2, 4, 8)
                for s in (1, 2, 3)]
    return FORWARD_SPACE


def _key(spec: AttentionSpec, n_q: int, n_k: int, device):
    return make_key(spec.name, compile_spec(spec).SOURCE_HASH, spec.dtype, f"n={bucket(n_q)},m={bucket(n_k)}",
                    device)


def _default(spec: AttentionSpec, n_k: int) -> dict:
    return _default_decode(n_k) if spec.decode else _default_forward(spec)


def _config(spec, n_q, n_k, device, config):
    default = _default(spec, n_k)
    if config is not None:
        return {**default, **config}
    return lookup(lambda: _key(spec, n_q, n_k, device), default)


def _default_decode(n_k: int) -> dict:
    return dict(BLOCK_N=64, SPLIT=max(64, min(2048, bucket(_cdiv(n_k, 16)))), num_warps=4)


# --------------------------------------------------------------------------- launchers


def _mask_args(mask: Optional[Tensor], shape) -> list:
    """The kernel arguments of the model mask: the additive mask (masks.additive) broadcast by strides, no copy,
    to ``shape`` [B, H, N, M], and its four strides."""
    if mask is None:
        return []
    mask = masks.additive(mask, torch.float32 if mask.dtype == torch.bool else mask.dtype)
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    mask = mask.expand(*shape)
    return [mask, *mask.stride()]


def _last_dim_contiguous(*xs: Tensor):
    return [x if x.stride(-1) == 1 else x.contiguous() for x in xs]


def spec_for(q: Tensor, k: Tensor, scale: float, model_mask: Optional[Tensor], **kw) -> AttentionSpec:
    """The spec of a call with these inputs; ``value_dim=v.shape[-1]`` among ``kw`` for a decode whose v has its
    own head dim (equal to q's it is the same spec as without)."""
    return AttentionSpec(groups=q.shape[1] // k.shape[1], head_dim=q.shape[-1], scale=float(scale),
                         dtype=str(q.dtype).removeprefix("torch."), has_mask=model_mask is not None,
                         tf32=q.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest", **kw)


def attention_triton(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, causal: bool = False,
                     *, window: int = 0, sinks: int = 0, softcap: float = 0.0, config: Optional[dict] = None):
    """softmax(scale·q kᵀ [softcapped] + mask) v with a causal or sliding-window mask, on the generated kernel.

    q [B, H, N, D], k/v [B, Hkv, M, D]; ``mask`` additive or boolean keep, broadcastable to [B, H, N, M];
    ``window > 0`` selects the band (+ ``sinks``) and needs N == M. ``config`` overrides the tuned config."""
    kind = "window" if window > 0 else "causal" if causal else "none"
    spec = spec_for(q, k, scale, mask, mask=kind, causal=causal and window > 0, window=window, sinks=sinks,
                    softcap=softcap)
    return _forward(spec, q, k, v, mask, config)


def block_sparse_triton(q, k, v, mask, scale, counts, indices, block, causal, config=None, keep=None):
    """Attention over the KV blocks in index tables (counts [.., nqb], indices [.., nqb, W] broadcast to [B, H]);
    ``keep``: the element-wise rule inside those blocks (a mask predicate; default: causal or every key)."""
    spec = spec_for(q, k, scale, mask, mask="block_sparse", causal=causal, block=block, keep=keep)
    b, h = q.shape[:2]
    nqb = _cdiv(q.shape[2], block)
    counts = counts.expand(b, h, nqb).reshape(b * h, nqb).to(torch.int32).contiguous()
    indices = indices.expand(b, h, nqb, indices.shape[-1]).reshape(b * h, nqb, -1).to(torch.int32).contiguous()
    return _forward(spec, q, k, v, mask, config, (counts, indices))


def predicate_triton(q, k, v, mask, scale, keep: Expr, block: int = 64, config=None):
    """Attention under any mask predicate ``keep``: the key tiles each query tile visits come from
    ``masks.tile_tables`` (interval classification of the predicate), the element-wise test from its rendering."""
    counts, indices, _ = masks.tile_tables(keep, q.shape[2], k.shape[2], block, block, q.device)
    return block_sparse_triton(q, k, v, mask, scale, counts[None, None], indices[None, None], block, False, config,
                               keep)


def _forward(spec, q, k, v, mask, config, tables=None):
    b, h, n, d = q.shape
    m = k.shape[2]
    if v.shape[-1] != d:
        raise ValueError(f"the generated kernels need v's head dim ({v.shape[-1]}) to equal q's ({d})")
    cfg = _config(spec, n, m, q.device, config)
    kernel = compile_spec(spec).attention_fwd
    q, k, v = _last_dim_contiguous(q, k, v)
    out = torch.empty(b, h, n, d, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    extra = _mask_args(mask, (b, h, n, m))
    if tables is not None:
        counts, indices = tables
        extra += [counts, indices, counts.stride(0), indices.stride(0), indices.stride(1)]
    grid = (_cdiv(n, cfg["BLOCK_M"]), b * h)
    kernel[grid](q, k, v, out, *extra, n, m, h, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                 *out.stride()[:3], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
                 num_stages=cfg["num_stages"])
    return out


def decode_triton(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, *, window: int = 0,
                  sinks: int = 0, softcap: float = 0.0, config: Optional[dict] = None) -> Tensor:
    """One query token per head at position M − 1 over a KV cache of M keys, split over the keys.

    q [B, H, 1, D], k [B, Hkv, M, D], v [B, Hkv, M, Dv] (Dv may differ from D: keys with pruned channels, ThinK)
    -> [B, H, 1, Dv]; ``window > 0``: keys M − window ... M − 1 plus the first ``sinks``; ``mask`` additive or
    boolean keep, broadcastable to [B, H, 1, M]."""
    b, h, n, d = q.shape
    kv_heads, m = k.shape[1], k.shape[2]
    dv = v.shape[-1]
    if n != 1:
        raise ValueError(f"decode_triton takes one query per head, got {n}")
    if k.shape[-1] != d or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"decode_triton needs k [B, Hkv, M, {d}] and v [B, Hkv, M, Dv] of the same B, Hkv, M; "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    spec = spec_for(q, k, scale, mask, mask="window" if window else "none", window=window, sinks=sinks,
                    softcap=softcap, decode=True, value_dim=dv)
    cfg = _config(spec, 1, m, q.device, config)
    mod = compile_spec(spec)
    q, k, v = _last_dim_contiguous(q, k, v)
    lo = max(0, m - window) // cfg["BLOCK_N"] * cfg["BLOCK_N"] if window else 0
    sinks_end = min(_cdiv(sinks, cfg["BLOCK_N"]) * cfg["BLOCK_N"], lo) if window else 0
    split = max(cfg["SPLIT"] // cfg["BLOCK_N"], 1) * cfg["BLOCK_N"]
    n_splits = max(1, _cdiv(m - lo, split)) + 1  # + the sink split (empty without sinks)
    rows, dv_pad = _pow2(spec.groups), _pow2(dv)
    po = torch.empty(b * kv_heads * n_splits * rows, dv_pad, dtype=torch.float32, device=q.device)
    pm = torch.empty(b * kv_heads * n_splits * rows, dtype=torch.float32, device=q.device)
    pl = torch.empty_like(pm)
    extra = _mask_args(mask, (b, h, 1, m))
    mod.decode_partial[(n_splits, b * kv_heads)](
        q, k, v, po, pm, pl, *extra, m, kv_heads, lo, split, sinks_end, q.stride(0), q.stride(1),
        *k.stride()[:3], *v.stride()[:3], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"])
    out = torch.empty(b, h, 1, dv, dtype=q.dtype, device=q.device)
    mod.decode_reduce[(b * kv_heads, spec.groups)](po, pm, pl, out, n_splits, kv_heads, out.stride(0), out.stride(1),
                                                   SPLITS=_pow2(n_splits, 2))
    return out


def compile_for(spec: AttentionSpec, arch: int = 90, config: Optional[dict] = None) -> dict:
    """Compile ``spec``'s kernels for an NVIDIA GPU of compute capability ``arch`` (e.g. 90: H100) without one
    (codegen/gpu.py). ``{kernel name: compiled}`` (``.asm``, ``.metadata``)."""
    from .gpu import compile_kernel

    mod = compile_spec(spec)
    element = "*" + {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[spec.dtype]
    pointers = dict(Q=element, K=element, V=element, O=element, MASK="*fp32", COUNTS="*i32", INDICES="*i32",
                    PO="*fp32", PM="*fp32", PL="*fp32")
    cfg = {**_default(spec, 4096), **(config or {})}
    if spec.decode:
        kernels = [(mod.decode_partial, {"BLOCK_N": cfg["BLOCK_N"]}), (mod.decode_reduce, {"SPLITS": 16})]
    else:
        kernels = [(mod.attention_fwd, {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]})]
    return {fn.__name__: compile_kernel(fn, pointers, constexprs, arch, cfg["num_warps"], cfg.get("num_stages", 2))
            for fn, constexprs in kernels}


def tunable(spec: AttentionSpec, q, k, v, mask, run) -> Tunable:
    """The generated kernel of ``spec`` at these inputs, for ``autotune.tune``; ``run(config)`` launches it."""
    return Tunable(_key(spec, q.shape[2], k.shape[2], q.device), _default(spec, k.shape[2]), _space(spec), run,
                   q.device)


def flops(n: int, m: int, heads: int, head_dim: int, batch: int = 1) -> float:
    """Matmul FLOPs of dense attention (4·B·H·N·M·D), for TFLOP/s reports; halve for causal."""
    return 4.0 * batch * heads * n * m * head_dim


__all__ = ["AttentionSpec", "source", "compile_spec", "compile_for", "attention_triton", "block_sparse_triton",
           "predicate_triton", "decode_triton", "tunable", "flops"]
