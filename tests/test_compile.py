"""Every kernel compiles for an H100/H200 (sm_90) with the installed Triton, without a GPU (compile_check.py),
and the attention kernels, float32 included, fit the 99 KB of shared memory of an RTX 4090 or L4 (sm_89).

Each check runs in a fresh process: this session's kernels were made for the interpreter (TRITON_INTERPRET)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

KERNELS = ("_act_mul_kernel", "_dequant_kernel", "_flash_attention_kernel", "_kv_store_kernel",
           "_paged_decode_kernel", "_paged_decode_reduce_kernel", "_qmatmul_kernel", "_rmsnorm_kernel",
           "_rope_kernel", "_splitk_reduce_kernel")


def compile_check(*args: str) -> tuple[dict[str, int], str]:
    """Runs compile_check.py; returns the variants compiled per kernel, and the report."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_check.py")
    result = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                            timeout=1800)
    report = result.stdout + result.stderr[-3000:]
    assert result.returncode == 0, report
    compiled = {line.split()[0]: int(line.split()[1]) for line in result.stdout.splitlines()
                if line.startswith("_") and len(line.split()) >= 3}
    return compiled, report


def test_every_kernel_compiles_for_sm90():
    compiled, report = compile_check("--quick", "--target", "cuda:90")
    assert set(KERNELS) <= set(compiled), report
    # every GGUF type's dequantization, and four matmul paths of seven types with all their configs
    assert compiled["_dequant_kernel"] >= 25 and compiled["_qmatmul_kernel"] >= 7 * 4, report


def test_attention_fits_sm89_shared_memory():
    compiled, report = compile_check("--target", "cuda:89", "--only", "flash_attention,paged_decode")
    # five head dims x three dtypes x two flag sets, both GQA group sizes
    assert compiled["_flash_attention_kernel"] >= 30 and compiled["_paged_decode_kernel"] >= 60, report
