"""moekit's Triton kernels (NF4 dequantization, the grouped GEMM reading NF4, SiLU(gate) * up, RMSNorm) checked on
the CPU through Triton's interpreter, so that CI, which has no GPU, tests their indexing and arithmetic on every commit. Each check runs in a
fresh process: Triton decides at import whether kernels are interpreted. The checks are in tests/kernel_checks.py;
the GPU tests (`pytest -m gpu`) check the same kernels compiled, bfloat16 rounding included."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("check", ["nf4", "nf4_grouped_mm", "nf4_grouped_mm_in_the_expert_block", "swiglu", "rms_norm"])
def test_kernel_matches_its_reference_in_the_triton_interpreter(check):
    import triton  # a test dependency (pyproject's `test` extra): a missing one fails here, never skips

    tests = Path(__file__).parent
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-c", f"import kernel_checks; kernel_checks.{check}(); print('checked')"],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and "checked" in proc.stdout, f"triton {triton.__version__}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
