"""The Triton kernels (generated attention, FFN, linear, MemoryFormer, Engram) compile for an H100 (sm_90) on this GPU-less machine: TTIR → PTX → cubin through the
ptxas that ships with triton. The interpreter runs kernels as numpy and cannot catch what only the compiler sees
(types that differ between branches, layouts, shared memory over the device's limit)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
if not PTXAS.exists():
    pytest.skip(f"this triton has no ptxas ({PTXAS})", allow_module_level=True)

SPECS = [  # every mask kind, GQA, padded head dims, softcap, model mask, each dtype, decode
    "mask=none,head_dim=64,dtype=float16",
    "mask=causal,head_dim=128,dtype=float16",
    "mask=causal,head_dim=96,groups=4,dtype=bfloat16",
    "mask=window,causal=1,window=512,sinks=4,head_dim=80,groups=2,dtype=float16,has_mask=1,softcap=30",
    "mask=window,causal=0,window=128,sinks=0,head_dim=64,dtype=float32",
    "mask=block_sparse,causal=1,block=64,head_dim=64,groups=2,dtype=float16",
    "mask=window,window=256,sinks=4,head_dim=128,groups=8,dtype=float16,decode=1,has_mask=1",
    "mask=none,head_dim=64,groups=1,dtype=float32,decode=1",
]

SCRIPT = """
import json, sys
from attnforge.runtime.engram import triton as engram
from attnforge.runtime.ffn import triton as ffn
from attnforge.runtime.linear import triton as linear_attention
from attnforge.runtime.memoryformer import triton as memoryformer
from attnforge.codegen.attention import AttentionSpec, compile_for
from attnforge.codegen.gpu import compile_kernel

out = {}
for text in sys.argv[1:]:
    for name, k in compile_for(AttentionSpec.parse(text), 90).items():
        out[text + " " + name] = [len(k.asm["cubin"]), k.metadata.shared]


def build(name, fn, pointers, consts, floats=()):
    k = compile_kernel(fn, pointers, consts, 90, floats=floats)
    out[name] = [len(k.asm["cubin"]), k.metadata.shared]


h = "*fp16"
build("ffn gated silu", ffn._ffn_matmul, dict(X=h, WU=h, BU=h, WG=h, BG=h, OUT=h),
      dict(ACT="silu", GATED=True, HAS_BU=True, HAS_BG=False, PRECISION="tf32", BLOCK_M=32, BLOCK_N=64, BLOCK_K=32))
build("linear elu causal", linear_attention._linear_fwd, dict(Q=h, K=h, V=h, KEEP="*fp32", O=h),
      dict(F=64, DV=64, BLOCK=64, FEATURE=1, CAUSAL=True, HAS_KEEP=True), floats=("eps",))
build("memoryformer", memoryformer._memory_layer_fwd, dict(X=h, T=h, B=h, Y=h),
      dict(TAU=8, BLOCK_T=32, BLOCK_O=64, HAS_BIAS=True))
i64 = "*i64"
build("engram", engram._engram_embed_fwd, dict(IDS=i64, TABLE=h, OUT=h, MULT=i64, ORDER=i64, PRIMES=i64, OFFSETS=i64),
      dict(MAX_N=3, DIM=32, DIM_P=32, BLOCK_T=32))
print(json.dumps(out))
"""


def test_every_triton_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    p = subprocess.run([sys.executable, "-c", SCRIPT, *SPECS], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    built = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(built) == len(SPECS) + 2 + 4  # decode specs build two kernels; ffn, linear, memoryformer, engram
    for name, (cubin, shared) in built.items():
        assert cubin > 0, name
        assert shared <= 227 * 1024, f"{name}: {shared} bytes of shared memory do not fit an H100"
