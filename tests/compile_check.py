"""Every kernel variant compiled for a GPU target by Triton's own backend, on a machine without a GPU.

    python tests/compile_check.py [--target cuda:90] [--quick] [--dtypes float32,bfloat16] [--only qmatmul,rope]

Triton compiles in-process down to the target's binary (PTX and a cubin through the ptxas it ships, for
CUDA); only loading and launching need the device. Here a driver that names the target and has no device
stands in for the real one: every launch stops once its kernel is compiled, the autotuner compiles every
config instead of timing it (--quick: at each launch the largest tile, and every config once per autotuned
kernel), and the launchers run as on a GPU of that backend (its config tables and dispatch, tensor-core
`dot`). Each kernel's shared memory is held against the target's per-block limit. The launchers get CPU
tensors, so nothing is computed: this shows that the code compiles for the target, not that it computes the
right thing (the interpreter tests and the GPU runs do that).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time
from collections import defaultdict

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile, do not interpret

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from ggtriton.gguf import TYPE_TRAITS, GGMLType  # noqa: E402
from ggtriton.gguf.quants import DEQUANTIZERS  # noqa: E402
from ggtriton.kernels import gelu_mul, silu_mul  # noqa: E402
from ggtriton.kernels.planar import PLANAR_TYPES  # noqa: E402

# the modules, not the functions of the same names that ggtriton.kernels exports
_common, dequant, flash_attention, kv_store, paged_decode, qgemv, qmatmul, rmsnorm, rope, rope_kv_store = (
    importlib.import_module(f"ggtriton.kernels.{name}")
    for name in ("_common", "dequant", "flash_attention", "kv_store", "paged_decode", "qgemv", "qmatmul", "rmsnorm",
                 "rope", "rope_kv_store"))
KERNEL_MODULES = (_common, importlib.import_module("ggtriton.kernels.activations"), dequant, flash_attention,
                  kv_store, paged_decode, qgemv, qmatmul, rmsnorm, rope, rope_kv_store)
moe = importlib.import_module("ggtriton.kernels.moe")
KERNEL_MODULES += (moe,)

# Shared memory one block may use (the opt-in maximum): H100/H200, A100, L4/4090, MI300.
SHARED_LIMIT = {("cuda", 90): 232448, ("cuda", 80): 166912, ("cuda", 89): 101376, ("hip", "gfx942"): 65536}
QUICK_TYPES = (GGMLType.F16, GGMLType.Q4_0, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.IQ2_XXS,
               GGMLType.IQ4_XS)


class CompileOnlyDriver:
    """The active-driver interface `JITFunction.run` reads, for a target and no device."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


class Compiler:
    """Installs the compile-only launches and keeps what they compiled: per kernel, the variants and the
    most shared memory one of them takes."""

    def __init__(self, target: GPUTarget, every_config: bool = True):
        self.target = target
        self.variants: dict[str, set] = defaultdict(set)
        self.shared: dict[str, int] = defaultdict(int)
        self.latest: list[tuple[str, int]] = []  # (kernel, shared bytes) of each compile of the current launch
        driver.set_active(CompileOnlyDriver(target))
        run = JITFunction.run
        compiler = self

        def compile_only(fn, *args, grid, warmup, **kwargs):
            kernel = run(fn, *args, grid=grid, warmup=True, **kwargs)
            name = fn.fn.__name__
            compiler.variants[name].add(kernel.hash)
            compiler.shared[name] = max(compiler.shared[name], kernel.metadata.shared)
            compiler.latest.append((name, kernel.metadata.shared))
            return kernel

        chosen: set = set()  # (autotuner, config) to compile at the current launch
        compiled: set = set()  # (autotuner, config) compiled at some launch

        def compile_config(tuner, *args, config, **meta):
            if (id(tuner), config) not in chosen:
                return [2.0, 2.0, 2.0]  # not compiled, and slower than those that are: never launched
            tuner.fn.run(*args, **(meta | config.all_kwargs() | {"warmup": True}))
            compiled.add((id(tuner), config))
            return [1.0, 1.0, 1.0]  # every compiled config "as fast": the autotuner then launches the first

        def bench_without_disk_cache(tuner, tuning_key, configs, bench_fn):
            # Every config of the launch, or (quick) the largest tile (the most shared memory) and each config
            # this autotuner has not compiled at another launch; the launch then takes one of those.
            picked = configs if every_config else [max(configs, key=tile)] + [
                c for c in configs if (id(tuner), c) not in compiled]
            chosen.clear()
            chosen.update((id(tuner), c) for c in picked)
            bench_fn()  # the stand-in timings must never reach the on-disk tuning cache a real GPU reads
            return False

        JITFunction.run = compile_only
        Autotuner._bench = compile_config
        Autotuner.check_disk_cache = bench_without_disk_cache
        # the launchers take the target backend's configs, dispatch and dot precision for CPU tensors
        name = "hip" if target.backend == "hip" else "cuda"
        for module in KERNEL_MODULES:
            if hasattr(module, "backend"):
                module.backend = lambda device, name=name: name
            if hasattr(module, "sm_count"):
                module.sm_count = lambda device: 132
            if hasattr(module, "f32_dot"):
                module.f32_dot = lambda t: t.dtype == torch.float32


def tile(config) -> int:
    """A config's tile elements times its pipeline stages: what its shared memory grows with."""
    return math.prod(v for k, v in config.kwargs.items() if k.startswith("BLOCK_")) * config.num_stages


def raw_weight(ggml_type: GGMLType, n: int, k: int) -> torch.Tensor:
    traits = TYPE_TRAITS[ggml_type]
    return torch.zeros(n * k // traits.block_elements * traits.block_bytes, dtype=torch.uint8)


def launches(quick: bool, dtypes: list[torch.dtype] | None = None, plain_attention: bool = False):
    """(description, call) for every variant: each GGUF type, float dtype, matmul path and attention shape.
    quick: bfloat16 (unless `dtypes` says otherwise) and a few types. plain_attention: attention without window, cap
    or sinks, in one split (those take the same shared memory)."""
    dtypes = dtypes or ([torch.bfloat16] if quick else [torch.float32, torch.float16, torch.bfloat16])
    types = QUICK_TYPES if quick else tuple(DEQUANTIZERS)
    for t in DEQUANTIZERS:
        k = 2 * TYPE_TRAITS[t].block_elements if TYPE_TRAITS[t].block_elements > 1 else 256
        for dtype in dtypes:
            yield f"dequantize {t.name} {dtype}", lambda t=t, k=k, d=dtype: dequant.dequantize(
                raw_weight(t, 4, k), t, (4, k), d)
    for t in types:
        k = max(256, TYPE_TRAITS[t].block_elements)
        # "gemm" of a type the word decoders take runs their GEMM tiles; "skinny" and "splitk": the other types
        words = t in qgemv.GEMV_TYPES
        paths = [(64, "gemm")] if words else [(1, "skinny"), (16, "skinny"), (1, "splitk"), (64, "gemm")]
        for dtype in dtypes:
            for m, path in paths:
                yield f"qmatmul {t.name} {dtype} M={m} {path}", lambda t=t, k=k, d=dtype, m=m, p=path: \
                    qmatmul.qmatmul(torch.zeros(m, 4 * k, dtype=d), raw_weight(t, 64, 4 * k), t, (64, 4 * k), path=p)
            planar = t in PLANAR_TYPES
            # one row of x in one K range, 16 rows in two (the ranges' partial sums added by the last to arrive)
            for m, splits in [(1, 1), (16, 2)] if words else ():
                yield f"qmatmul {t.name} {dtype} M={m} gemv splits={splits}", \
                    lambda t=t, k=k, d=dtype, m=m, p=planar, s=splits: qmatmul.qmatmul(
                        torch.zeros(m, 4 * k, dtype=d), raw_weight(t, 64, 4 * k), t, (64, 4 * k), path="gemv",
                        planar=p, split_k=s)
            if words:
                # the fused epilogues: residual add and norm sums (one row), act(gate) * up of a PendingNorm's rows
                # (16 rows, K split: the last of both tiles' ranges combines)
                yield f"qmatmul_add_norm {t.name} {dtype} M=1", lambda t=t, k=k, d=dtype, p=planar: \
                    qmatmul.qmatmul_add_norm(torch.zeros(1, 4 * k, dtype=d), raw_weight(t, 64, 4 * k), t, (64, 4 * k),
                                             torch.zeros(1, 64, dtype=d), torch.ones(64), 1e-6, planar=p)
                yield f"qmatmul_act {t.name} {dtype} M=16 norm_in", lambda t=t, k=k, d=dtype, p=planar: \
                    qmatmul.qmatmul_act(rmsnorm.PendingNorm(torch.zeros(16, 4 * k, dtype=d), torch.zeros(
                        16, 4 * k // rmsnorm.RMS_CHUNK), 1e-6), [raw_weight(t, 64, 4 * k)] * 2, t, (64, 4 * k),
                        "silu", planar=p)
            if planar:
                yield f"dequantize {t.name} {dtype} planar", lambda t=t, k=k, d=dtype: dequant.dequantize(
                    raw_weight(t, 4, k), t, (4, k), d, planar=True)
    page = 16
    for head_dim in (64, 128, 256) if quick else (64, 80, 96, 128, 256):
        for dtype in dtypes:
            flag_sets = [(None, None, False), (512, 50.0, False), (128, None, True)]
            for window, cap, sink in flag_sets[:1] if plain_attention else flag_sets:
                for group in (1, 4) if not quick or head_dim == 128 else (4,):
                    args = attention_args(head_dim, group, dtype, page)
                    sinks = torch.zeros(args["q"].shape[1], dtype=torch.float32) if sink else None
                    yield (f"flash_attention d={head_dim} {dtype} group={group} window={window} cap={cap} "
                           f"sinks={sink}",
                           lambda a=args, w=window, c=cap, sk=sinks: flash_attention.flash_attention(
                               a["q"], a["k"], a["v"], a["tables"], a["cu"], a["lens"], scale=0.1,
                               sliding_window=w, soft_cap=c, max_seqlen_q=64, sinks=sk))
                    for splits in (1,) if plain_attention else (1, 4):
                        yield (f"paged_decode d={head_dim} {dtype} group={group} window={window} cap={cap} "
                               f"sinks={sink} splits={splits}",
                               lambda a=args, w=window, c=cap, s=splits, sk=sinks: paged_decode.paged_decode(
                                   a["q"][:1], a["k"], a["v"], a["tables"], a["lens"], scale=0.1, sliding_window=w,
                                   soft_cap=c, num_splits=s, sinks=sk))
    for dtype in dtypes:
        x = torch.zeros(8, 4096, dtype=dtype)
        yield f"rmsnorm {dtype}", lambda x=x: rmsnorm.rmsnorm(x, torch.ones(4096, dtype=x.dtype), 1e-6)
        yield f"rmsnorm+residual {dtype}", lambda x=x: rmsnorm.rmsnorm(x, torch.ones(4096, dtype=x.dtype), 1e-6,
                                                                         residual=x.clone())
        yield f"silu_mul {dtype}", lambda x=x: silu_mul(x, x.clone())
        yield f"gelu_mul {dtype}", lambda x=x: gelu_mul(x, x.clone())
        for neox in (False, True):
            q, k = torch.zeros(8, 32, 128, dtype=dtype), torch.zeros(8, 8, 128, dtype=dtype)
            yield f"rope neox={neox} {dtype}", lambda q=q, k=k, n=neox: rope.rope(
                q, k, torch.arange(8, dtype=torch.int32), rope.rope_inv_freq(128, 10000.0)[0], neox=n)
        a = attention_args(128, 4, dtype, page)
        yield f"kv_store {dtype}", lambda a=a: kv_store.kv_store(
            a["q"][:8, :2], a["q"][:8, :2], a["k"], a["v"], torch.arange(8, dtype=torch.int64))
        for neox in (False, True):
            yield f"rope_kv_store neox={neox} {dtype}", lambda a=a, n=neox: rope_kv_store.rope_kv_store(
                a["q"][:8], a["q"][:8, :2], a["q"][:8, 2:4], a["k"], a["v"], torch.arange(8, dtype=torch.int64),
                torch.arange(8, dtype=torch.int32), rope.rope_inv_freq(128, 10000.0)[0], neox=n)
    # the fused MoE op: every type at each tile form (quick: the word decoders at decode, the element decoders with
    # tensor-core tiles), gpt-oss's activation on the 16-row form
    for t, block_m in [(GGMLType.Q4_K, 1), (GGMLType.MXFP4, 16)] if quick else [
            (t, m) for t in types for m in (1, 16, 64)]:
        k = max(256, TYPE_TRAITS[t].block_elements)
        for dtype in dtypes:
            act = "swiglu_oai" if block_m == 16 else "silu"
            yield f"fused_moe {t.name} {dtype} M={block_m} {act}", lambda t=t, k=k, d=dtype, m=block_m, a=act: \
                moe.fused_moe(torch.zeros(m, k, dtype=d), torch.zeros(m, 4), 2, *[raw_weight(t, 4 * k, k)] * 3,
                              (t, t, t), k, activation=a, block_m=m)


def attention_args(head_dim: int, group: int, dtype: torch.dtype, page: int) -> dict[str, torch.Tensor]:
    n_kv, pages = 2, 2048 // page
    return {
        "q": torch.zeros(64, n_kv * group, head_dim, dtype=dtype),
        "k": torch.zeros(pages, page, n_kv, head_dim, dtype=dtype),
        "v": torch.zeros(pages, page, n_kv, head_dim, dtype=dtype),
        "tables": torch.arange(pages, dtype=torch.int32)[None],
        "cu": torch.tensor([0, 64], dtype=torch.int32),
        "lens": torch.tensor([2048], dtype=torch.int32),
    }


def parse_target(text: str) -> GPUTarget:
    backend, arch = text.split(":")
    if backend == "cuda":
        return GPUTarget("cuda", int(arch), 32)
    return GPUTarget("hip", arch, 64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="cuda:90", help="cuda:<sm> or hip:<gfx arch>, e.g. cuda:80, hip:gfx942")
    parser.add_argument("--quick", action="store_true", help="bfloat16, a few GGUF types, and at each autotuned "
                        "launch the largest tile and the configs not compiled yet")
    parser.add_argument("--dtypes", default="", help="comma-separated float dtypes, e.g. float32,bfloat16")
    parser.add_argument("--plain-attention", action="store_true", help="attention without window, cap or sinks, "
                        "in one split: the same shared memory as with them")
    parser.add_argument("--only", default="", help="comma-separated launchers to compile, e.g. qmatmul,rope")
    args = parser.parse_args(argv)
    target = parse_target(args.target)
    compiler = Compiler(target, every_config=not args.quick)
    limit = SHARED_LIMIT.get((target.backend, target.arch))
    failures = []
    start = time.perf_counter()
    only = tuple(args.only.split(",")) if args.only else ("",)
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")] if args.dtypes else None
    for description, call in launches(args.quick, dtypes, args.plain_attention):
        if not description.split()[0].startswith(only):
            continue
        compiler.latest.clear()
        try:
            call()
        except Exception as e:  # noqa: BLE001 - every failure is reported, the rest still compile
            failures.append(f"{description}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        failures += [f"{description}: {name} takes {shared} bytes of shared memory, the target has {limit}"
                     for name, shared in compiler.latest if limit is not None and shared > limit]
    print(f"Triton {triton.__version__}, target {target.backend} {target.arch}, "
          f"{time.perf_counter() - start:.0f} s")
    print(f"{'kernel':32} {'variants':>8} {'max shared (bytes)':>19}")
    for name in sorted(compiler.variants):
        shared = compiler.shared[name]
        over = " over the limit" if limit is not None and shared > limit else ""
        print(f"{name:32} {len(compiler.variants[name]):>8} {shared:>19}{over}")
    for failure in failures:
        print("FAILED", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
