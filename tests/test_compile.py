"""Every kernel compiles for an H100/H200 (sm_90) with the installed Triton, without a GPU (compile_check.py),
and the attention kernels, float32 included, fit the 99 KB of shared memory of an RTX 4090 or L4 (sm_89). The
quick forms: `compile_check.py` without --quick compiles every type, dtype and head dim, and every autotuned
config at every launch (--quick: the largest tile at each launch, and each config at one launch at least).

Each check runs in a fresh process: this session's kernels were made for the interpreter (TRITON_INTERPRET)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNELS = ("_act_mul_kernel", "_dequant_kernel", "_dequant_words_kernel", "_flash_attention_kernel",
           "_kv_store_kernel", "_paged_decode_kernel", "_qgemv_kernel", "_qmatmul_kernel", "_rmsnorm_kernel",
           "_rope_kernel", "_rope_kv_store_kernel", "_splitk_reduce_kernel", "_moe_kernel", "_route_kernel",
           "_align_kernel", "_combine_kernel")


CHECKS = {
    "sm90": ("--quick", "--target", "cuda:90"),
    # float16 takes bfloat16's tiles, head dims 80 and 96 those of 128, and a window, a cap, sinks or splits the
    # plain kernel's (sm_90 compiles those): the same shared memory
    "sm89_attention": ("--quick", "--dtypes", "float32,bfloat16", "--target", "cuda:89", "--plain-attention",
                       "--only", "flash_attention,paged_decode"),
}


@pytest.fixture(scope="module")
def checks():
    """Both checks started at once, in parallel: each compiles for minutes on one core."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = str(Path(__file__).with_name("compile_check.py"))
    procs = {name: subprocess.Popen([sys.executable, script, *args], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, args in CHECKS.items()}
    yield procs
    for proc in procs.values():
        proc.kill()


def finish(proc: subprocess.Popen) -> tuple[dict[str, int], str]:
    """The variants compiled per kernel, and the report, of a check that must succeed."""
    stdout, stderr = proc.communicate(timeout=1800)
    report = stdout + stderr[-3000:]
    assert proc.returncode == 0, report
    compiled = {line.split()[0]: int(line.split()[1]) for line in stdout.splitlines()
                if line.startswith("_") and len(line.split()) >= 3}
    return compiled, report


def test_every_kernel_compiles_for_sm90(checks):
    compiled, report = finish(checks["sm90"])
    assert set(KERNELS) <= set(compiled), report
    # every GGUF type's dequantization (on the word decoders for their eight), and the matmul paths of seven types,
    # each config at one launch at least (the element decoders' kernel: two of them on four paths)
    assert compiled["_dequant_kernel"] >= 17 and compiled["_dequant_words_kernel"] >= 8, report
    assert compiled["_qmatmul_kernel"] >= 2 * 4, report
    assert compiled["_qgemv_kernel"] >= 7 * 4, report


def test_attention_fits_sm89_shared_memory(checks):
    compiled, report = finish(checks["sm89_attention"])
    # three head dims x two dtypes, both GQA group sizes at 128
    assert compiled["_flash_attention_kernel"] >= 8 and compiled["_paged_decode_kernel"] >= 8, report
