"""The stages of `bench/gpu_check.py`, each run in a process of its own (a CUDA fault or a hang then costs
one stage, not the run):

    python bench/gpu_stages.py STAGE --result FILE [--shard I/N] [--prior JSON] [--cache-dir DIR]
                               [--work-dir DIR] [--smoke] [--llamacpp DIR] [--inject-failure STAGE[:hang]]

A stage records its checks in FILE (JSON) one by one, so what it reached survives it being stopped. An
exception inside one check becomes that check's FAIL and the stage goes on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import triton

from ggtriton.gguf import GGMLType
from ggtriton.gguf import dequantize as dequantize_ref
from ggtriton.gguf.quants import DEQUANTIZERS
from ggtriton.kernels import dequantize, gelu_mul, qmatmul, rmsnorm, rope, rope_inv_freq, silu_mul
from ggtriton.kernels.activations import gelu_mul_ref, silu_mul_ref
from ggtriton.kernels.cache import use_cache_dir
from ggtriton.kernels.flash_attention import flash_attention, flash_attention_ref
from ggtriton.kernels.paged_decode import paged_decode, paged_decode_ref
from ggtriton.kernels.planar import to_planar
from ggtriton.kernels.qgemv import GEMV_TYPES
from ggtriton.kernels.qmatmul import path_takes
from ggtriton.kernels.rmsnorm import rmsnorm_ref
from ggtriton.kernels.rope import rope_ref
from ggtriton.runtime import LLM, SamplingParams
from ggtriton.runtime.synthetic import SyntheticModel

import attention
import e2e
import qmatmul as qbench
from dequant import dequant_point
from gpu_timing import copy_gbps, device, device_name, matmul_tflops, quick_autotune, rel_err

TOL = 1e-2  # relative error allowed with bf16 operands (DESIGN.md, Numerics)
NO_TIMING = "timing needs CUDA"
QTYPES = ("Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "IQ4_XS", "MXFP4", "BF16", "F16")


@dataclass(frozen=True)
class Sizes:
    """The shapes each stage uses: real ones on a GPU, tiny ones in the smoke run (kernels interpreted)."""

    check_shapes: tuple[tuple[int, int], ...]  # (N, K) of the qmatmul checks
    check_ms: dict[str, tuple[int, ...]]  # rows of x per path
    q_lens: tuple[int, ...]  # attention checks: new tokens per sequence ...
    prefixes: tuple[int, ...]  # ... behind cached ones
    heads: dict[int, tuple[int, int]]  # head_dim -> (heads, kv heads)
    ops: tuple[int, int, int]  # small ops: rows, hidden, ffn
    dequant_shape: tuple[int, int]
    check_model: dict  # SyntheticModel of the model checks
    check_tokens: int
    speed_shapes: tuple[tuple[int, int], ...]
    speed_types: tuple[str, ...]
    speed_ms: tuple[int, ...]
    big_shape: tuple[int, int]  # large-M qmatmul against cuBLAS
    big_ms: tuple[int, ...]
    sweeps: tuple[tuple[str, int, int], ...]  # (type, N, K) swept over M for the dispatch crossovers
    sweep_ms: tuple[int, ...]
    prefill_tokens: tuple[int, ...]
    decode: tuple[int, int]  # sequences, context
    dequant_elements: int
    rep: int  # ms of calls per median
    target: dict  # the e2e models
    draft: dict
    plan: e2e.Plan = field(default_factory=e2e.Plan)


GPU = Sizes(
    check_shapes=((4096, 4096), (14336, 4096), (4096, 14336)),
    check_ms={"gemv": (1, 5), "skinny": (1, 5), "splitk": (1, 5), "gemm": (100,), "dequant": (64,)},
    q_lens=(1, 15, 16, 17, 100, 700), prefixes=(0, 5, 16, 3, 37, 300),
    heads={64: (16, 4), 128: (32, 8), 256: (8, 2)},
    ops=(33, 4096, 14336),
    dequant_shape=(8, 4096),
    check_model=dict(n_layers=4, hidden=1024, n_heads=8, n_kv_heads=2, head_dim=128, ffn=2816, vocab=4096,
                     weight_type=GGMLType.Q4_K),
    check_tokens=128,
    speed_shapes=((4096, 4096), (14336, 4096), (4096, 14336)),
    speed_types=QTYPES,
    speed_ms=(1, 16, 8),
    big_shape=(14336, 4096), big_ms=(512, 2048),
    sweeps=(("Q4_K", 4096, 4096), ("Q4_K", 14336, 4096), ("BF16", 14336, 4096)),
    sweep_ms=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
    prefill_tokens=(2048, 8192), decode=(64, 2048),
    dequant_elements=1 << 26,
    rep=30,
    target=e2e.LLAMA3_8B | dict(weight_type=GGMLType.Q4_K),
    draft=e2e.LLAMA3_8B | dict(weight_type=GGMLType.Q4_K, n_layers=2, seed=1),
)
_TINY = dict(n_layers=1, hidden=64, n_heads=2, n_kv_heads=1, head_dim=32, ffn=64, vocab=64, context_length=512,
             weight_type=GGMLType.Q8_0)
SMOKE = Sizes(
    check_shapes=((64, 512), (96, 256)),
    check_ms={"gemv": (1, 5), "skinny": (1, 5), "splitk": (1, 5), "gemm": (40,), "dequant": (8,)},
    q_lens=(1, 17, 40), prefixes=(0, 3, 16),
    heads={64: (4, 1), 128: (4, 2), 256: (2, 1)},
    ops=(5, 256, 256),
    dequant_shape=(2, 512),
    check_model=_TINY, check_tokens=12,
    speed_shapes=((64, 512),), speed_types=("Q4_K", "BF16"), speed_ms=(1, 16),
    big_shape=(64, 512), big_ms=(40,),
    sweeps=(("Q4_K", 64, 512),), sweep_ms=(1, 32),
    prefill_tokens=(32,), decode=(2, 32),
    dequant_elements=1 << 13,
    rep=1,
    target=_TINY, draft=_TINY | dict(seed=1),
    plan=e2e.Plan(concurrency=(1, 2), prompt_len=8, output_len=2, decode_tokens=4, prefill_tokens=16, k=2,
                  target_kv_bytes=1 << 22, draft_kv_bytes=1 << 22),
)


class Recorder:
    """A stage's checks, rewritten to `path` after each one. `fault` ("crash" or "hang") strikes right
    after the first check: the hook by which the tests see a failing stage reported without the others
    lost."""

    def __init__(self, path: Path, stage: str, fault: str | None):
        self.path, self.stage, self.fault = path, stage, fault
        self.order = 0  # where the checks recorded now go in the stage's table (a shard's jobs interleave)
        self.checks: list[dict] = []
        self.info = dict(device=device_name(), torch=torch.__version__, triton=triton.__version__,
                         python=platform.python_version(), cuda=torch.version.cuda)
        self._save()

    def add(self, check: str, verdict: str, figure: str = "", ratio: str = "", why: str = "", value=None) -> None:
        self.checks.append(dict(stage=self.stage, check=check, verdict=verdict, figure=figure, ratio=ratio,
                                why=why, value=value, order=self.order))
        print(f"{verdict:7} {check}: {figure} {ratio} {why}", flush=True)
        self._save()
        if self.fault == "crash":
            os._exit(3)
        if self.fault == "hang":
            time.sleep(1e6)

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(checks=self.checks, info=self.info), indent=1, default=str))
        tmp.replace(self.path)

    @contextmanager
    def guard(self, check: str) -> Iterator[None]:
        """An exception in the block becomes a FAIL of `check`; the stage goes on."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - any failure is a verdict, not the end of the stage
            traceback.print_exc()
            frame = traceback.extract_tb(e.__traceback__)[-1]
            self.add(check, "FAIL", why=f"{type(e).__name__}: {str(e)[:300]} ({Path(frame.filename).name}:"
                                        f"{frame.lineno})")

    def tolerance(self, check: str, err: float, where: str, what: str, tol: float = TOL) -> None:
        ok = math.isfinite(err) and err <= tol
        self.add(check, "PASS" if ok else "FAIL", f"max err {err:.1e}{where}", what, value=err)


@dataclass
class Context:
    sizes: Sizes
    shard: int
    shards: int
    work_dir: Path
    cache_dir: Path
    prior: list[dict]
    llamacpp: Path | None

    def value(self, stage: str, check: str):
        return next((c["value"] for c in self.prior if c["stage"] == stage and c["check"] == check), None)

    def copy(self) -> float | None:
        """The copy bandwidth the env stage measured (measured now if it did not run)."""
        return self.value("env", "copy bandwidth") or copy_gbps()

    def model(self, name: str, spec: dict) -> Path:
        return e2e.model_file(self.work_dir, name, SyntheticModel("llama", **spec))


@contextmanager
def poisoned() -> Iterator[None]:
    """Inside the block, torch.empty gives NaN-filled float tensors: an output element a kernel fails to
    write shows up as NaN."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    torch.empty = nan_empty
    try:
        yield
    finally:
        torch.empty = empty


def worst(errs: list[tuple[float, str]]) -> tuple[float, str]:
    """The largest error and where (NaN counts as the largest)."""
    return max(errs, key=lambda e: math.inf if math.isnan(e[0]) else e[0])


# --- 1. environment and ceilings ---------------------------------------------------------------------


def env(rec: Recorder, ctx: Context) -> None:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.split("\n")[0].strip()
        except (OSError, subprocess.TimeoutExpired):
            driver = "unknown"
        rec.info["driver"] = driver
        rec.add("device", "PASS", f"{p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB",
                f"driver {driver}, CUDA {torch.version.cuda}")
    else:
        rec.add("device", "PASS", device_name())
    rec.add("versions", "PASS", f"torch {torch.__version__}, Triton {triton.__version__}",
            f"Python {platform.python_version()}")
    with rec.guard("copy bandwidth"):
        copy = copy_gbps()
        if copy is None:
            rec.add("copy bandwidth", "SKIP", why="needs CUDA")
        else:
            rec.add("copy bandwidth", "PASS", f"{copy:.0f} GB/s", "1 GiB device copy, read + written", value=copy)
    with rec.guard("bf16 matmul"):
        tflops = matmul_tflops()
        if tflops is None:
            rec.add("bf16 matmul", "SKIP", why="needs CUDA")
        else:
            rec.add("bf16 matmul", "PASS", f"{tflops:.0f} TFLOP/s", "8192^3, torch.matmul", value=tflops)


# --- 2. correctness ----------------------------------------------------------------------------------


def qmatmul_check(t: GGMLType, paths: tuple[str, ...], sizes: Sizes) -> Callable[[Recorder], None]:
    """qmatmul on `paths` (those that take type t) with each of their configs forced in turn (compiled, never
    tuned: the speed stage then finds every config in the cache), against float64 x @ W^T, W from the torch
    reference decoder."""
    paths = tuple(p for p in paths if any(path_takes(p, t, m) for m in sizes.check_ms[p]
                                          for _, k in sizes.check_shapes))

    def run(rec: Recorder) -> None:
        dev = device()
        errs: dict[str, list[tuple[float, str]]] = {p: [] for p in paths}
        for n, k in sizes.check_shapes:
            raw = qbench.random_weight(t, (n, k), dev)
            w = dequantize_ref(raw, t, (n, k)).double()
            planar = qbench.planar(t, k)
            if planar:  # as the engine keeps it
                raw = to_planar(raw, t, (n, k))
            xs = {m: torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dev, torch.bfloat16)
                  for p in paths for m in sizes.check_ms[p]}
            refs = {m: x.double() @ w.t() for m, x in xs.items()}
            del w
            for path in paths:
                for i, config in enumerate(qbench.configs(path, dev) or [None]):
                    with qbench.only_config(path, config, dev) if config else nullcontext(), poisoned():
                        for m in sizes.check_ms[path]:
                            if not path_takes(path, t, m):
                                continue
                            out = qmatmul(xs[m], raw, t, (n, k), path=path, planar=planar)
                            where = f" ({n}x{k}, M={m}" + (f", config {i})" if config else ")")
                            errs[path].append((rel_err(out, refs[m]), where))
        for path in paths:
            n_configs = len(qbench.configs(path, dev)) or 1
            rec.tolerance(f"qmatmul {t.name} {path}", *worst(errs[path]),
                          f"configs {n_configs}, shapes {len(sizes.check_shapes)}, M {sizes.check_ms[path]}")

    return run


def attention_check(kernel: str, head_dim: int, sizes: Sizes) -> Callable[[Recorder], None]:
    """flash_attention (prefill, ragged batch behind cached prefixes) or paged_decode against its torch
    reference, plain and with a sliding window and soft-capping."""

    def run(rec: Recorder) -> None:
        dev = device()
        gen = torch.Generator().manual_seed(head_dim)
        n_heads, n_kv = sizes.heads[head_dim]
        ctx_lens = [p + q for p, q in zip(sizes.prefixes, sizes.q_lens)]
        k_cache, v_cache, tables = attention.paged(ctx_lens, gen, n_kv_heads=n_kv, head_dim=head_dim)
        lens = torch.tensor(ctx_lens, dtype=torch.int32, device=dev)
        scale = head_dim**-0.5
        errs = []
        for window, cap in ((None, None), (48, 30.0)):
            opts = dict(scale=scale, sliding_window=window, soft_cap=cap)
            if kernel == "flash attention":
                q = torch.randn(sum(sizes.q_lens), n_heads, head_dim, generator=gen).to(dev, torch.bfloat16)
                cu = torch.tensor([0, *np.cumsum(sizes.q_lens)], dtype=torch.int32, device=dev)
                args = (q, k_cache, v_cache, tables[0], cu, lens)
                with poisoned():
                    out = flash_attention(*args, **opts, max_seqlen_q=max(sizes.q_lens))
                ref = flash_attention_ref(*args, **opts)
            else:
                q = torch.randn(len(ctx_lens), n_heads, head_dim, generator=gen).to(dev, torch.bfloat16)
                args = (q, k_cache, v_cache, tables[0], lens)
                with poisoned():
                    out = paged_decode(*args, **opts)
                ref = paged_decode_ref(*args, **opts)
            errs.append((rel_err(out, ref), f" (window {window}, soft cap {cap})"))
        rec.tolerance(f"{kernel} d{head_dim}", *worst(errs),
                      f"{n_heads}/{n_kv} heads, contexts {ctx_lens}, bf16, against the torch reference")

    return run


def small_ops_check(sizes: Sizes) -> Callable[[Recorder], None]:
    def run(rec: Recorder) -> None:
        dev = device()
        gen = torch.Generator().manual_seed(0)
        rows, hidden, ffn = sizes.ops

        def randn(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen) * scale).to(dev, torch.bfloat16)

        with rec.guard("rmsnorm"):
            x, res = randn(rows, hidden, scale=3.0), randn(rows, hidden)
            w = (torch.randn(hidden, generator=gen) * 0.5 + 1).to(dev)
            errs = []
            for r in (None, res):
                with poisoned():
                    out, h = rmsnorm(x, w, 1e-6, r)
                ref, ref_h = rmsnorm_ref(x, w, 1e-6, r)
                errs += [(rel_err(out, ref), f" (residual {r is not None})"), (rel_err(h, ref_h), " (sum)")]
            rec.tolerance("rmsnorm", *worst(errs), f"[{rows}, {hidden}] bf16, with and without a residual")
        with rec.guard("rope"):
            n_heads, n_kv = sizes.heads[128]
            inv_freq, attn_factor = rope_inv_freq(128, 500000.0, scaling="llama3", factor=8.0,
                                                  original_context=8192)
            inv_freq = inv_freq.to(dev)
            pos = torch.randint(0, 8192, (rows,), generator=gen, dtype=torch.int32).to(dev)
            errs = []
            for neox in (False, True):
                q, k = randn(rows, n_heads, 128), randn(rows, n_kv, 128)
                q_ref, k_ref = q.clone(), k.clone()
                rope(q, k, pos, inv_freq, neox=neox, attn_factor=attn_factor)
                rope_ref(q_ref, k_ref, pos, inv_freq, neox=neox, attn_factor=attn_factor)
                errs += [(rel_err(q, q_ref), f" (q, neox {neox})"), (rel_err(k, k_ref), f" (k, neox {neox})")]
            rec.tolerance("rope", *worst(errs), f"{n_heads}/{n_kv} heads x 128, llama3 scaling, both styles")
        with rec.guard("activations"):
            gate, up = randn(rows, ffn, scale=4.0), randn(rows, ffn)
            errs = []
            for fn, ref in ((silu_mul, silu_mul_ref), (gelu_mul, gelu_mul_ref)):
                with poisoned():
                    out = fn(gate, up)
                errs.append((rel_err(out, ref(gate, up)), f" ({fn.__name__})"))
            rec.tolerance("activations", *worst(errs), f"silu_mul, gelu_mul on [{rows}, {ffn}] bf16")

    return run


def dequant_check(sizes: Sizes) -> Callable[[Recorder], None]:
    """The dequant kernel, float32 out, bit for bit against the torch reference (on CPU, the one checked
    against the PyPI gguf package), every type."""

    def run(rec: Recorder) -> None:
        dev = device()
        bad = []
        for t in DEQUANTIZERS:
            raw = qbench.random_weight(t, sizes.dequant_shape, dev)
            with poisoned():
                out = dequantize(raw, t, sizes.dequant_shape, torch.float32).cpu()
            ref = dequantize_ref(raw.cpu(), t, sizes.dequant_shape)
            same_nan = torch.equal(out.isnan(), ref.isnan())
            if not (same_nan and torch.equal(out.nan_to_num(0.0, math.inf, -math.inf).view(torch.int32),
                                             ref.nan_to_num(0.0, math.inf, -math.inf).view(torch.int32))):
                bad.append(t.name)
        rec.add("dequant bit-exact", "FAIL" if bad else "PASS", f"{len(DEQUANTIZERS) - len(bad)}/{len(DEQUANTIZERS)} types",
                f"{sizes.dequant_shape} float32", why=f"differ: {', '.join(bad)}" if bad else "")

    return run


def model_check(ctx: Context) -> Callable[[Recorder], None]:
    """A random-weight model's logits, Triton path against torch path on this device."""

    def run(rec: Recorder) -> None:
        path = ctx.model("check-llama", ctx.sizes.check_model)
        ids = np.random.default_rng(0).integers(0, ctx.sizes.check_model["vocab"] - 3, ctx.sizes.check_tokens).tolist()
        logits = {}
        for be in ("torch", "triton"):
            llm = LLM(path, device=device(), backend=be, warm_up=False, kv_cache_bytes=1 << 28, cache_dir=ctx.cache_dir)
            logits[be] = llm.logits(ids)
            del llm
        ref, out = logits["torch"], logits["triton"]
        top1 = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
        kld = (ref.softmax(-1) * (ref.log_softmax(-1) - out.log_softmax(-1))).sum(-1).mean().item()
        ok = top1 >= 0.95 and kld <= 5e-3
        rec.add("model: Triton against torch", "PASS" if ok else "FAIL", f"top-1 {top1:.1%}, KLD {kld:.1e}",
                f"{len(ids)} tokens through a {ctx.sizes.check_model['n_layers']}-layer "
                f"{ctx.sizes.check_model['weight_type'].name} llama; needs >= 95 %, <= 5e-3",
                value=dict(top1=top1, kld=kld, rel_err=rel_err(out, ref)))

    return run


def graphs_check(ctx: Context) -> Callable[[Recorder], None]:
    """Greedy generation with decode steps replayed as CUDA graphs against eager: the same tokens. Three
    prompts that finish at different steps, so that batches of 3, 2 and 1 replay padded graphs."""

    def run(rec: Recorder) -> None:
        if not torch.cuda.is_available():
            rec.add("CUDA graphs against eager", "SKIP", why="CUDA graphs need CUDA")
            return
        path = ctx.model("check-llama", ctx.sizes.check_model)
        prompts = [list(range(10, 10 + n)) for n in (5, 9, 14)]
        params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (24, 16, 8)]
        tokens = {}
        for graphs in (True, False):
            llm = LLM(path, device="cuda", cuda_graphs=graphs, warm_up=False, kv_cache_bytes=1 << 28,
                      cache_dir=ctx.cache_dir)
            tokens[graphs] = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            del llm
        same = tokens[True] == tokens[False]
        rec.add("CUDA graphs against eager", "PASS" if same else "FAIL",
                f"{sum(map(len, tokens[True]))} greedy tokens {'identical' if same else 'differ'}",
                "3 prompts, decode batches 3, 2, 1", value=dict(graphs=tokens[True], eager=tokens[False]))

    return run


def speculation_check(ctx: Context) -> Callable[[Recorder], None]:
    """Speculative decoding on the device: the check model drafting for itself, every step's verify pass and
    draft steps replayed as graphs, under `torch.cuda.set_sync_debug_mode("error")` everywhere but the step's
    one read-back (`engine.to_host`). Greedy agreement with plain decoding is reported, not required: in
    bfloat16 the verify pass's k + 1 rows round differently from one decode row."""

    def run(rec: Recorder) -> None:
        name = "speculative decoding: one sync per step, verify graphs"
        if not torch.cuda.is_available():
            rec.add(name, "SKIP", why="needs CUDA")
            return
        from ggtriton.runtime.engine import engine as engine_module

        path = ctx.model("check-llama", ctx.sizes.check_model)
        prompts = [list(range(10, 10 + n)) for n in (5, 9, 14)]
        params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (24, 16, 8)]
        opts = dict(device="cuda", kv_cache_bytes=1 << 28, cache_dir=ctx.cache_dir)
        plain = [o.token_ids for o in LLM(path, **opts).generate(prompts, params, use_tqdm=False)]
        llm = LLM(path, draft_model=path, num_speculative_tokens=3, adaptive_speculation=False, **opts)
        read_back = engine_module.to_host

        def allowed(parts):
            torch.cuda.set_sync_debug_mode(0)
            try:
                return read_back(parts)
            finally:
                torch.cuda.set_sync_debug_mode("error")

        engine_module.to_host = allowed
        torch.cuda.set_sync_debug_mode("error")
        try:
            outputs = llm.generate(prompts, params, use_tqdm=False)
        except RuntimeError as e:
            rec.add(name, "FAIL", f"a host sync outside the read-back: {str(e).splitlines()[0][:200]}")
            return
        finally:
            torch.cuda.set_sync_debug_mode(0)
            engine_module.to_host = read_back
        spec = [o.token_ids for o in outputs]
        same = sum(next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(spec, plain))
        verify = sorted({q for _, q in llm.runner._graphs})
        steps = sum(o.metrics["steps_per_token"] * len(o.token_ids) for o in outputs) / sum(map(len, spec))
        ok = max(verify) == 4
        rec.add(name, "PASS" if ok else "FAIL",
                f"greedy agreement {same / sum(map(len, plain)):.0%}, {steps:.2f} steps per token",
                f"graphs of q = {verify} tokens per sequence; 3 prompts drafting 3 tokens",
                value=dict(agreement=same / sum(map(len, plain)), steps_per_token=steps, spec=spec, plain=plain))

    return run


def correctness(rec: Recorder, ctx: Context) -> None:
    """The checks, dealt to the shards by estimated cost (mostly compiles), each shard taking its own in
    order of value; every shard runs its share in parallel with the others."""
    s = ctx.sizes
    jobs: list[tuple[str, float, Callable[[Recorder], None]]] = [
        ("model: Triton against torch", 20, model_check(ctx)),
        ("CUDA graphs against eager", 10, graphs_check(ctx)),
        ("speculative decoding: one sync per step, verify graphs", 12, speculation_check(ctx)),
    ]
    for name in QTYPES:
        t = GGMLType[name]
        small = ("gemv",) if t in GEMV_TYPES else ("skinny", "splitk")  # the paths of up to 16 rows that take t
        jobs += [(f"qmatmul {name} {', '.join(small)}", 19, qmatmul_check(t, small, s)),
                 (f"qmatmul {name} gemm, dequant", 5, qmatmul_check(t, ("gemm", "dequant"), s))]
    for d in s.heads:
        jobs += [(f"flash attention d{d}", 2, attention_check("flash attention", d, s)),
                 (f"paged decode d{d}", 3, attention_check("paged decode", d, s))]
    jobs += [("rmsnorm, rope, activations", 6, small_ops_check(s)), ("dequant bit-exact", 15, dequant_check(s))]

    load = [0.0] * ctx.shards
    mine = set()
    for i in sorted(range(len(jobs)), key=lambda i: -jobs[i][1]):
        shard = load.index(min(load))
        load[shard] += jobs[i][1]
        if shard == ctx.shard:
            mine.add(i)
    for i, (name, _, job) in enumerate(jobs):
        if i in mine:
            rec.order = i
            with rec.guard(name):
                job(rec)


# --- 3. kernel speed ---------------------------------------------------------------------------------


def timed(rec: Recorder, check: str, errs: list[tuple[float, str]], measured: bool, figure: str, ratio: str,
          value=None) -> None:
    """A speed check: FAIL if a result was wrong (`errs`: relative errors, if checked), SKIP if it could not
    be timed, else PASS."""
    err, where = worst(errs) if errs else (0.0, "")
    if not (math.isfinite(err) and err <= TOL):
        rec.add(check, "FAIL", figure if measured else "", ratio, f"err {err:.1e}{where}", value)
    elif not measured:
        rec.add(check, "SKIP", why=NO_TIMING + (f"; err {err:.1e} checked" if errs else ""), value=value)
    else:
        rec.add(check, "PASS", figure, ratio, value=value)


def runs(ms: list[int], names: list[str]) -> str:
    """'a 1-4, b 8-16': consecutive M sharing a name, grouped."""
    out = []
    for m, name in zip(ms, names):
        if out and out[-1][0] == name:
            out[-1][2] = m
        else:
            out.append([name, m, m])
    return ", ".join(f"{n} {a}" if a == b else f"{n} {a}-{b}" for n, a, b in out)


def sweep_row(rec: Recorder, bench: qbench.Bench, name: str, n: int, k: int, ms: tuple[int, ...]) -> None:
    """Every path at every M: the fastest per M, where it changes against the dispatch thresholds, and how
    close the dispatched path comes to the fastest."""
    t = GGMLType[name]
    dev = device()
    paths = {m: [p for p in qbench.PATHS if path_takes(p, t, m)] for m in ms}
    pts = {(p, m): bench.point(t, n, k, m, p) for m in ms for p in paths[m]}
    check = f"dispatch {name} {n}x{k}"
    errs = [(p["err"], f" ({p['path']}, M={p['m']})") for p in pts.values()]
    th = qbench.thresholds(dev)
    dequant_th = "float_dequant_min_m" if t in (GGMLType.F32, GGMLType.F16, GGMLType.BF16) else "dequant_min_m"
    us = {key: p["us"] for key, p in pts.items()}
    if None in us.values():
        timed(rec, check, errs, False, "", "")
        return
    fastest = [min(paths[m], key=lambda p: us[(p, m)]) for m in ms]
    skinny = [m for m, f in zip(ms, fastest) if f in ("gemv", "skinny", "splitk")]
    dequant = [m for m, f in zip(ms, fastest) if f == "dequant"]
    dispatched = [us[(bench.point(t, n, k, m)["path"], m)] / us[(f, m)] for m, f in zip(ms, fastest)]
    # the element decoders' split-K against their skinny path (the word decoders' types take neither)
    split = (f"; split-K {us[('skinny', ms[0])] / us[('splitk', ms[0])]:.2f}x skinny at M={ms[0]} (split_max_n "
             f"{th['split_max_n']})" if ("splitk", ms[0]) in us else "")
    timed(rec, check, errs, True, f"fastest: {runs(list(ms), fastest)}",
          f"skinny up to M={max(skinny, default='-')} (skinny_max_m {th['skinny_max_m']}), dequant from "
          f"M={min(dequant, default='-')} ({dequant_th} {th[dequant_th]}){split}; dispatch within 10 % of the "
          f"fastest at {sum(r <= 1.1 for r in dispatched)}/{len(ms)} M",
          value={f"{p} M={m}": v for (p, m), v in us.items()})


def speed(rec: Recorder, ctx: Context) -> None:
    s = ctx.sizes
    copy = ctx.copy()
    bench = qbench.Bench(copy, s.rep)
    gen = torch.Generator().manual_seed(0)

    def attention_rows() -> None:
        for n in s.prefill_tokens:
            with rec.guard(f"flash prefill {n} tokens"):
                p = attention.prefill_point(n, gen)
                timed(rec, f"flash prefill {n} tokens", [(p["err"], " (against SDPA)")], p["ms"] is not None,
                      f"{p['tflops'] or 0:.0f} TFLOP/s",
                      p["ms"] and f"{p['sdpa_ms'] / p['ms']:.2f}x SDPA flash ({p['sdpa_tflops']:.0f} TFLOP/s)", p)
        batch, context = s.decode
        with rec.guard(f"paged decode {batch} x {context}"):
            p = attention.decode_point(batch, context, gen, copy)
            if "skipped" in p:
                rec.add(f"paged decode {batch} x {context}", "SKIP", why=p["skipped"])
            else:
                timed(rec, f"paged decode {batch} x {context}", [], p["ms"] is not None,
                      f"{p['gbps'] or 0:.0f} GB/s", p["of_copy"] and f"{p['of_copy']:.0%} of copy", p)

    times: dict[tuple[str, int], float] = {}  # the shapes' total microseconds per (type, M), where timed
    for i, m in enumerate(s.speed_ms):
        for name in s.speed_types:
            check = f"qmatmul {name} M={m}"
            with rec.guard(check):
                t = GGMLType[name]
                pts = [bench.point(t, n, k, m) for n, k in s.speed_shapes]
                measured = pts[0]["us"] is not None
                if measured:
                    times[(name, m)] = sum(p["us"] for p in pts)
                timed(rec, check, [(p["err"], f" ({p['n']}x{p['k']})") for p in pts], measured,
                      ", ".join(f"{p['n']}x{p['k']} {p['path']} {p['gbps'] or 0:.0f} GB/s" for p in pts),
                      measured and f"{min(p['of_copy'] for p in pts):.0%}-{max(p['of_copy'] for p in pts):.0%} of copy",
                      pts)
        if i == 0:  # attention is cheap and telling: before the less common M
            attention_rows()
    if 1 in s.speed_ms and 16 in s.speed_ms:  # 16 rows of x still read each weight byte once
        for name in s.speed_types:
            check = f"qmatmul {name} M=16 against M=1"
            if (name, 1) in times and (name, 16) in times:
                ratio = times[(name, 16)] / times[(name, 1)]
                rec.add(check, "PASS", f"{ratio:.2f}x the M=1 time", "goal <= 1.3x", value=ratio)
            else:
                rec.add(check, "SKIP", why=NO_TIMING)
    n, k = s.big_shape
    for name in s.speed_types:
        for m in s.big_ms:
            check = f"qmatmul {name} M={m} {n}x{k} against cuBLAS"
            with rec.guard(check):
                p = bench.point(GGMLType[name], n, k, m)
                cublas = bench.cublas_ms(n, k, m)
                timed(rec, check, [(p["err"], "")], p["us"] is not None, f"{p['path']} {p['tflops'] or 0:.0f} TFLOP/s",
                      cublas and p["us"] and f"{cublas * 1e3 / p['us']:.2f}x cuBLAS bf16 on a dense weight "
                                             f"({2 * m * n * k / cublas / 1e9:.0f} TFLOP/s)", p | dict(cublas_ms=cublas))
    for name, n, k in s.sweeps:
        with rec.guard(f"dispatch {name} {n}x{k}"):
            sweep_row(rec, bench, name, n, k, s.sweep_ms)
    for name in s.speed_types:
        check = f"dequant {name} to bf16"
        with rec.guard(check):
            p = dequant_point(GGMLType[name], s.dequant_elements, torch.bfloat16, copy)
            timed(rec, check, [], p["us"] is not None, f"{p['gbps'] or 0:.0f} GB/s",
                  p["of_copy"] and f"{p['of_copy']:.0%} of copy", p)


# --- 4. end to end -----------------------------------------------------------------------------------


def model_name(spec: dict) -> str:
    return f"llama{spec['n_layers']}l-{spec['hidden']}-{spec['weight_type'].name}-{spec.get('seed', 0)}"


def end_to_end(rec: Recorder, ctx: Context) -> None:
    s = ctx.sizes
    copy = ctx.copy()
    start = time.perf_counter()
    existed = (ctx.work_dir / f"{model_name(s.target)}.gguf").exists()
    target = ctx.model(model_name(s.target), s.target)
    took = time.perf_counter() - start
    rec.add("write the target GGUF", "PASS", "reused" if existed else f"{took:.1f} s",
            f"{target.stat().st_size / 1e6:.0f} MB", value=None if existed else took)
    draft = ctx.model(model_name(s.draft), s.draft)
    with rec.guard("end to end"):
        for r in e2e.measurements(target, draft, copy, s.plan, device=device(), backend="triton",
                                  cache_dir=ctx.cache_dir):
            rec.add(r["check"], "PASS" if r["figure"] else "SKIP", r["figure"] or "", r["ratio"], r["why"],
                    r["value"])


# --- 5. llama.cpp beside it --------------------------------------------------------------------------


def llamacpp(rec: Recorder, ctx: Context) -> None:
    """llama-bench on the same file, pp512 and tg128, beside our prefill and batch-1 decode. On a GPU its
    figures count only if it ran on CUDA (bench/llamacpp/llamacpp.py's check): a CPU fallback compares
    nothing."""
    sys.path.insert(0, str(Path(__file__).with_name("llamacpp")))
    import llamacpp as bundle_runner

    try:
        bin_dir = bundle_runner.locate(ctx.llamacpp) if ctx.llamacpp else None
    except FileNotFoundError:
        bin_dir = None
    if bin_dir is None:
        rec.add("llama-bench", "SKIP", why=f"skipped: no bundle (no llama-bench in {ctx.llamacpp})")
        return
    target = ctx.model(model_name(ctx.sizes.target), ctx.sizes.target)
    cmd = [str(bin_dir / "llama-bench"), "-m", str(target), "-p", "512", "-n", "128", "-fa", "1", "-ngl", "99",
           "-r", "3", "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=bundle_runner.environment(bin_dir))
    if out.returncode:
        rec.add("llama-bench", "FAIL", why=f"exited with status {out.returncode}: {out.stderr.strip()[-300:]}")
        return
    records = bundle_runner.parse_llama_bench(out.stdout)
    try:
        bundle_runner.check_backend(records, allow_cpu=not torch.cuda.is_available())
    except bundle_runner.BackendError as e:
        rec.add("llama-bench", "FAIL", why=str(e))
        return
    plan = ctx.sizes.plan
    ours = {"pp": ctx.value("e2e", f"prefill {plan.prefill_tokens} tokens"), "tg": ctx.value("e2e", "batch-1 decode")}
    for r in records:
        kind = "pp" if r["n_prompt"] else "tg"
        mine = ours[kind]
        rec.add(f"llama.cpp {kind}{r['n_prompt'] or r['n_gen']}", "PASS",
                f"{r['avg_ts']:.1f} ± {r['stddev_ts']:.1f} tokens/s",
                f"ours {mine:.1f} tokens/s, {mine / r['avg_ts']:.2f}x" if mine else "ours: not measured",
                value=dict(llamacpp=r["avg_ts"], ours=mine))


STAGES: dict[str, Callable[[Recorder, Context], None]] = {
    "env": env, "correctness": correctness, "speed": speed, "e2e": end_to_end, "llamacpp": llamacpp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--shard", default="0/1", help="I/N: this process takes shard I of N")
    parser.add_argument("--prior", type=Path, help="gpu_check.json of the stages before")
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--llamacpp", type=Path)
    parser.add_argument("--fault", choices=("crash", "hang"))
    args = parser.parse_args()
    if args.smoke:  # the Triton interpreter, as the tests run it (tests/interpreter_patching.py)
        sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))
        from interpreter_patching import patch_languages_once_per_launch

        patch_languages_once_per_launch()
    quick_autotune()
    dev = device()
    # Before the first kernel compiles; and for LLM(), which points Triton at $GGTRITON_CACHE_DIR by default.
    use_cache_dir(args.cache_dir, dev)
    os.environ["GGTRITON_CACHE_DIR"] = str(args.cache_dir)
    shard, shards = map(int, args.shard.split("/"))
    prior = json.loads(args.prior.read_text())["checks"] if args.prior and args.prior.exists() else []
    ctx = Context(SMOKE if args.smoke else GPU, shard, shards, args.work_dir, args.cache_dir, prior, args.llamacpp)
    STAGES[args.stage](Recorder(args.result, args.stage, args.fault), ctx)


if __name__ == "__main__":
    sys.exit(main())
