"""Smoke test of the benchmark harness (--quick): it runs and prints its tables. No timing is asserted."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "tools" / "bench.py"


@pytest.mark.parametrize("command,needle", [("pipeline", "| layers |"), ("kernels", "attnforge sliding_window"),
                                            ("e2e", "long-context"), ("decode", "decode tokens/s"),
                                            ("linear", "linear elu"), ("autotune", "sliding_window_cpu"),
                                            ("generate", "sliding window 512 + 4 sinks")])
def test_quick_mode_runs(command, needle):
    docs = BENCH.parent.parent / "docs" / "benchmarks.md"
    before = docs.read_text() if docs.exists() else None
    p = subprocess.run([sys.executable, str(BENCH), command, "--quick"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert needle in p.stdout
    after = docs.read_text() if docs.exists() else None
    assert before == after  # --quick never writes to docs/
