"""Every kernel compiles for an H100/H200 (sm_90) with the installed Triton, without a GPU (compile_check.py).

It runs in a fresh process: this session's kernels were made for the interpreter (TRITON_INTERPRET)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

KERNELS = ("_act_mul_kernel", "_dequant_kernel", "_flash_attention_kernel", "_kv_store_kernel",
           "_paged_decode_kernel", "_paged_decode_reduce_kernel", "_qmatmul_kernel", "_rmsnorm_kernel",
           "_rope_kernel", "_splitk_reduce_kernel")


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_check.py")
    result = subprocess.run([sys.executable, str(script), "--quick", "--target", "cuda:90"], env=env,
                            capture_output=True, text=True, timeout=1800)
    report = result.stdout + result.stderr[-3000:]
    assert result.returncode == 0, report
    compiled = {line.split()[0]: int(line.split()[1]) for line in result.stdout.splitlines()
                if line.startswith("_") and len(line.split()) >= 3}
    assert set(KERNELS) <= set(compiled), report
    # every GGUF type's dequantization, and four matmul paths of seven types with all their configs
    assert compiled["_dequant_kernel"] >= 25 and compiled["_qmatmul_kernel"] >= 7 * 4, report
