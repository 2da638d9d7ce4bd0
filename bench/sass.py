"""The decode loops' cost read from the machine code compiled for a GPU target, without a GPU.

    python bench/sass.py [--target cuda:90] [--types Q4_K,Q8_0] [--paths skinny,splitk,gemm,dequant,moe] [--m 1,16]
                         [--dtype bfloat16] [--check] [--no-append]

Each matmul path compiles at every autotune config of its backend's table (tests/compile_check.py's compile-only
launches), for x [M, 4096] (gemm: M = 256, where no config is pruned; its code does not depend on M) and a 4096 x
4096 weight of each GGUF type (skinny and splitk: the types without word decoders, which decode on every other
path); the dequant kernel compiles once per type. For each compiled kernel the report
gives its main loop, the longest backward branch: the instructions from the branch target to the backward branch,
with an inner loop's instructions multiplied by its trip count when the SASS shows a counted loop (a counter set
to a constant before it, stepped by an immediate and compared with an immediate), else counted once and marked ~.
The dequant kernel of the types of `qgemv.GEMV_TYPES` runs the gemv path's loop over the blocks of its rows (its
weight bytes per pass counted as the gemv path's); for the others it has no loop: a program decodes one tile, so its
row counts the whole kernel once.

Per kernel: loop instructions; global loads in the loop by width (LDG and LDGSTS: .U8/.S8, .U16/.S16, 32-bit,
.64, .128); registers and the spill stores / loads in bytes that ptxas reports (a kernel's n_regs and n_spills
come from the driver when it is loaded on a GPU, in Triton 3.6 and 3.9 alike: here Triton's own ptxas step runs
again on the kernel's PTX with its log on, and must give the same cubin); local loads and stores (LDL, STL) in the
whole kernel; shared memory (metadata.shared); the weight bytes a program consumes per iteration, BLOCK_N rows x
BLOCK_K elements x block bytes / block elements; and warp instructions per weight byte, ipb = loop instructions x
warps per program / those bytes. The best config of each (type, path, M) by ipb is marked *.

The issue-bound ceiling: an H200 SM issues 4 warp instructions per clock (4 schedulers); at 4.8 TB/s of HBM3e
(peak; 4.3 TB/s is the measured copy the project plans with) over 132 SMs at 1.98 GHz, each SM must take in
~18.4 weight bytes per clock, so above ~0.22 warp instructions per weight byte a loop is issue-bound:
ceiling = min(1, (4 / ipb) / 18.4), the fraction of HBM bandwidth the instruction issue allows.

HIP (--target hip:gfx942): the same report from the amdgcn listing: all instructions (s_, v_, ds_, buffer_,
global_ ...) between a backward s_cbranch / s_branch and its label, loads by width (ubyte .. dwordx4), VGPRs and
spilled VGPRs / SGPRs from the kernel metadata, wave instructions per byte. Inner-loop trip counts are not read
there (inner loops count once, marked ~), and there is no issue model of a CDNA3 CU, so no ceiling.

The "gemv" path is the decode step's own kernel (kernels/qgemv.py, M <= 16, the types it decodes by words); a pass
of its loop covers one block of each row (256-element types) or 8 blocks (32-element types), so weight bytes per pass
are BLOCK_N x that x block bytes. With --check, the ratio of its best M = 16 loop to its best M = 1 loop per byte is
printed for each type where both compiled (at most 1.3 is the aim: M rows should not multiply the decoding).

The "moe" path is the fused MoE op's grouped product (kernels/moe.py) over MOE_EXPERTS experts of a 4096 x 4096
weight each, --m giving its rows per expert tile (1: one token-expert pair per program, the decode form; 16; 32 or
64: prefill tiles); both of its launches are read, "gate+up" (two weights, one loop each: a pass covers one block
of one weight's rows, as the gemv path's) and "down". Its passes cover as many bytes as the gemv path's for the
types it decodes by words, BLOCK_N x BLOCK_K elements for the others.

--check (CUDA targets) exits 1 when any selected decode type's best M=1 decode loop (gemv where the type has it, else
skinny) exceeds 0.25 warp instructions per weight byte or spills, naming each; those variants compile whatever
--paths and --m select. Where gemv compiles at M = 16, it also fails a type whose best spill-free loop there exceeds
its M16_IPB bound for the installed Triton (the figures reached, so that a regression fails).
The table is appended to bench/RESULTS.md unless --no-append.
A loop that the compiler unrolled (ptxas may, for short bodies) covers several K tiles per pass: its ipb is then
overstated by that factor; the loops column counts the backward branches of the kernel to help spot it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import math
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton import knobs
from triton.compiler.compiler import make_backend
from triton.runtime.jit import JITFunction

from ggtriton.gguf import TYPE_TRAITS, GGMLType
from ggtriton.kernels.qgemv import GEMV_TYPES
from ggtriton.kernels.qmatmul import path_takes
from gpu_timing import append_results

ISSUE_PER_CLOCK = 4  # warp instructions an H200 SM issues per clock (4 schedulers)
SMS = 132
CLOCK_HZ = 1.98e9  # boost clock
HBM_BYTES_PER_S = 4.8e12  # HBM3e peak (the measured copy, the planning figure, is 4.3e12)
BYTES_PER_SM_CLOCK = HBM_BYTES_PER_S / (SMS * CLOCK_HZ)  # ~18.4
CHECK_IPB = 0.25  # DESIGN.md's bound on a decode loop
# The best spill-free M = 16 gemv loops reached, warp instructions per weight byte, per Triton minor version: --check
# holds the types compiled at M = 16 to them, so that a regression fails (the aim: 1.3x the M = 1 loop).
M16_IPB = {"3.9": {"Q4_K": 0.23, "Q5_K": 0.21, "Q6_K": 0.22, "Q8_0": 0.14, "Q5_0": 0.25, "IQ4_XS": 0.29,
                   "MXFP4": 0.27},
           "3.6": {"Q4_K": 0.22, "Q5_K": 0.20, "Q6_K": 0.22, "Q8_0": 0.14, "Q5_0": 0.26, "IQ4_XS": 0.27,
                   "MXFP4": 0.25}}

DECODE_TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q5_0", "IQ4_XS", "MXFP4")
PATHS = ("gemv", "skinny", "splitk", "gemm", "dequant", "moe")
GEMV_STEP_BLOCKS = 8  # qgemv's steps of the 32-element types: 8 blocks per row
N = K = 4096
GEMM_M = 256  # gemm's configs are pruned to BLOCK_M <= max(32, M): at 256 every one compiles
MOE_EXPERTS, MOE_TOP_K = 2, 2  # the moe path's experts (each W's shape) and experts per token
WIDTHS = (8, 16, 32, 64, 128)


# Reading the machine code.


@dataclass(frozen=True)
class Instr:
    opcode: str  # "LDG.E.U16", "v_add_u32_e32"
    operands: tuple[str, ...]
    predicate: str = ""  # "@!P0" (SASS)
    target: int | None = None  # a branch's target: the index of the instruction it jumps to


_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s*(.*?)\s*;")


def parse_sass(text: str) -> list[Instr]:
    """The instructions of `cuobjdump -sass` output (one function), branch targets resolved to indices."""
    lines = [(int(m[1], 16), m[2]) for m in map(_SASS_LINE.match, text.splitlines()) if m]
    index = {address: i for i, (address, _) in enumerate(lines)}
    out = []
    for _, code in lines:
        words = code.split(None, 1)
        predicate = words.pop(0) if words[0].startswith("@") else ""
        opcode, _, rest = " ".join(words).partition(" ")
        operands = tuple(o.strip() for o in rest.split(",")) if rest else ()
        target = None
        if opcode.split(".")[0] == "BRA":
            target = index[int(next(o for o in operands if o.startswith("0x")), 16)]
        out.append(Instr(opcode, operands, predicate, target))
    return out


_AMD_LABEL = re.compile(r"^([\w.$]+):")
_AMD_INSTR = re.compile(r"^\t([a-z_][a-z0-9_]*)\b\s*(.*)$")


def parse_amdgcn(text: str) -> list[Instr]:
    """The instructions of an amdgcn listing (Triton's asm["amdgcn"]), branch targets resolved to indices."""
    labels: dict[str, int] = {}
    raw = []
    for line in text.splitlines():
        line = line.split(";")[0].split("//")[0].rstrip()
        if m := _AMD_LABEL.match(line):
            labels[m[1]] = len(raw)
        elif m := _AMD_INSTR.match(line):
            raw.append((m[1], tuple(o.strip() for o in m[2].split(",")) if m[2] else ()))
    return [Instr(op, ops, target=labels.get(ops[0]) if op.startswith(("s_cbranch", "s_branch")) else None)
            for op, ops in raw]


def backward_branches(instrs: list[Instr]) -> list[tuple[int, int]]:
    """(head, tail) of every loop: a branch at tail to an earlier instruction head (a branch to itself is the
    trap after the kernel's end, not a loop)."""
    return [(ins.target, i) for i, ins in enumerate(instrs) if ins.target is not None and ins.target < i]


def _imm(operand: str) -> int | None:
    """An integer immediate (32-bit two's complement), or None."""
    try:
        value = int(operand, 0)
    except ValueError:
        return None
    return value - (1 << 32) if value >= 1 << 31 else value


_ZERO = ("RZ", "URZ", "SRZ")
_CMP = {"EQ": lambda a, b: a == b, "NE": lambda a, b: a != b, "LT": lambda a, b: a < b,
        "LE": lambda a, b: a <= b, "GT": lambda a, b: a > b, "GE": lambda a, b: a >= b}


def trip_count(instrs: list[Instr], loop: tuple[int, int]) -> int | None:
    """Passes through a counted SASS loop, or None where the code does not show them: the backward branch tests
    one compare of a counter with an immediate, the counter steps by an immediate once in the body and is set to
    a constant before the loop (the high-word compare of a 64-bit counter against zero is passed over)."""
    head, tail = loop
    branch = instrs[tail]
    pred = branch.predicate.lstrip("@!")
    if not pred:
        return None
    writers = [i for i in range(head, tail) if instrs[i].operands[:1] == (pred,)]
    while writers and ".EX" in instrs[writers[-1]].opcode and instrs[writers[-1]].operands[3] in _ZERO:
        writers.pop()
    if not writers:
        return None
    cmp_at = writers[-1]
    cmp = instrs[cmp_at]
    parts = cmp.opcode.split(".")
    if parts[0] not in ("ISETP", "UISETP") or len(cmp.operands) != 5 or cmp.operands[4] not in ("PT", "UPT"):
        return None
    counter, bound = cmp.operands[2], _imm(cmp.operands[3])
    steps = [i for i in range(head, tail) if instrs[i].operands[:1] == (counter,)]
    if bound is None or parts[1] not in _CMP or len(steps) != 1:
        return None
    step_ins = instrs[steps[0]]
    sources = [o for o in step_ins.operands[1:] if not re.fullmatch(r"U?P[0-9T]", o)]
    step = [_imm(o) for o in sources if o != counter and o not in _ZERO]
    if step_ins.opcode.split(".")[0] not in ("IADD3", "UIADD3", "VIADD", "IADD") or counter not in sources \
            or len(step) != 1 or step[0] is None:
        return None
    init = _initial_value(instrs, head, counter)
    if init is None:
        return None
    unsigned, negate = "U32" in parts, branch.predicate.startswith("@!")
    after = steps[0] < cmp_at  # the compare sees the stepped value
    for trips in range(1, 1 << 20):
        value = init + step[0] * (trips if after else trips - 1)
        a, b = (value % (1 << 32), bound % (1 << 32)) if unsigned else (value, bound)
        if _CMP[parts[1]](a, b) == negate:
            return trips
    return None


def _initial_value(instrs: list[Instr], head: int, reg: str) -> int | None:
    """The constant the last write before `head` gives `reg` (MOV, IMAD.MOV, HFMA2.MMA of zeros, CS2R SRZ)."""
    pair = re.fullmatch(r"(U?R)(\d+)", reg)
    for ins in reversed(instrs[:head]):
        dest = ins.operands[:1]
        base = ins.opcode.split(".")[0]
        if base == "CS2R" and pair and ins.operands[1] == "SRZ" and \
                dest[0] in (reg, f"{pair[1]}{int(pair[2]) - 1}"):
            return 0
        if dest != (reg,):
            continue
        if ins.predicate:
            return None
        if base in ("MOV", "UMOV") or ins.opcode.startswith("IMAD.MOV"):
            value = ins.operands[-1]
            return 0 if value in _ZERO else _imm(value)
        if ins.opcode == "HFMA2.MMA" and ins.operands[1:] == ("-RZ", "RZ", "0", "0"):
            return 0
        return None
    return None


def load_width(ins: Instr) -> int | None:
    """Bits a global load moves per thread (LDG, LDGSTS; global_/buffer_/flat_load_*), or None for others."""
    parts = ins.opcode.split(".")
    if parts[0] in ("LDG", "LDGSTS"):
        sizes = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}
        return next((sizes[p] for p in parts[1:] if p in sizes), 32)
    m = re.fullmatch(r"(?:global|buffer|flat)_load_(u|s)?(byte|short|dword)(x[234])?\w*", ins.opcode)
    if m is None:
        return None
    return {"byte": 8, "short": 16, "dword": 32}[m[2]] * (int(m[3][1]) if m[3] else 1)


def is_local(ins: Instr) -> bool:
    """A local-memory (spill) access: LDL / STL, scratch_ on AMD."""
    return ins.opcode.split(".")[0] in ("LDL", "STL") or ins.opcode.startswith("scratch_")


@dataclass(frozen=True)
class Profile:
    instructions: int  # executed per pass of the main loop (the whole kernel where there is none)
    loads: Counter  # global loads per pass, by width in bits
    exact: bool  # False where an inner loop's trip count could not be read (counted once)
    loops: int  # backward branches in the kernel
    local: int  # LDL / STL (scratch_) instructions in the whole kernel
    mma: int  # tensor-core instructions (HMMA, HGMMA, IMMA; v_mfma) per pass


_MMA_OPCODES = ("HMMA", "HGMMA", "IMMA", "IGMMA", "v_mfma")


def profile(instrs: list[Instr], whole_kernel: bool = False) -> Profile:
    """The main loop's cost: the longest backward branch's body, inner loops weighted by their trip counts."""
    loops = backward_branches(instrs)
    if whole_kernel or not loops:
        end = max(i for i, ins in enumerate(instrs) if ins.opcode in ("EXIT", "s_endpgm"))
        region = (0, end)
    else:
        region = max(loops, key=lambda loop: loop[1] - loop[0])
    weight = {i: 1 for i in range(region[0], region[1] + 1)}
    exact = True
    for loop in loops:
        if loop != region and region[0] <= loop[0] and loop[1] <= region[1]:
            trips = trip_count(instrs, loop)
            exact &= trips is not None
            for i in range(loop[0], loop[1] + 1):
                weight[i] *= trips or 1
    loads: Counter = Counter()
    mma = 0
    for i, w in weight.items():
        if (width := load_width(instrs[i])) is not None:
            loads[width] += w
        mma += w * instrs[i].opcode.startswith(_MMA_OPCODES)
    return Profile(sum(weight.values()), loads, exact, len(loops), sum(map(is_local, instrs)), mma)


# Compiling the variants.


@dataclass(frozen=True)
class Job:
    type: str
    path: str
    m: int | None  # rows of x; None for the dequant kernel


@dataclass(frozen=True)
class Row:
    job: Job
    config: str
    warps: int
    profile: Profile
    regs: int
    spill: tuple[int, int]  # ptxas's spill stores / loads in bytes (HIP: spilled VGPRs / SGPRs)
    shared: int
    weight_bytes: float  # per pass of the main loop (dequant: per program)
    weight_elements: int  # the same, in weight elements
    tile_m: int  # rows of x a program multiplies (dequant: 0)

    @property
    def ipb(self) -> float:
        return self.profile.instructions * self.warps / self.weight_bytes

    @property
    def per_kflop(self) -> float:
        """Warp instructions per 1000 output FLOPs (2 per multiply-add); dequant: per 1000 weight elements."""
        return 1000 * self.profile.instructions * self.warps / (self.weight_elements * max(2 * self.tile_m, 1))

    @property
    def ceiling(self) -> float:
        return min(1.0, ISSUE_PER_CLOCK / self.ipb / BYTES_PER_SM_CLOCK)

    @property
    def spills(self) -> bool:
        return any(self.spill) or self.profile.local > 0


def sass(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", f.name], check=True, capture_output=True,
                              text=True).stdout


def ptxas_report(kernel) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ptxas's log of Triton's own cubin step, run again."""
    backend = make_backend(kernel.metadata.target)
    options = backend.parse_options(kernel.metadata._asdict())
    log = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        cubin = backend.make_cubin(kernel.asm["ptx"], {}, options, kernel.metadata.target.arch)
    if cubin != kernel.asm["cubin"]:
        raise RuntimeError(f"ptxas run again on {kernel.name}'s PTX made another cubin: its report would not apply")
    text = log.getvalue()
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return int(re.search(r"Used (\d+) registers", text)[1]), int(spill[1]), int(spill[2])


def amdgcn_report(listing: str) -> tuple[int, ...]:
    """(VGPRs, spilled VGPRs, spilled SGPRs) from the kernel metadata of an amdgcn listing."""
    return tuple(int(re.search(rf"\.{name}:\s+(\d+)", listing)[1])
                 for name in ("vgpr_count", "vgpr_spill_count", "sgpr_spill_count"))


def compile_rows(target_text: str, jobs: list[Job], dtype: torch.dtype) -> list[Row]:
    """Every job's kernels compiled for the target (every autotune config), read."""
    # Imported here, not at the top: compile_check takes Triton out of interpreter mode and installs compile-only
    # launches for the whole process, which a process that only parses (the tests) must not get.
    sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))
    import compile_check as cc

    target = cc.parse_target(target_text)
    cc.Compiler(target)
    launch = JITFunction.run  # the Compiler's compile-only launch
    compiled: dict[str, tuple] = {}

    def record(fn, *args, **kwargs):
        kernel = launch(fn, *args, **kwargs)
        if fn.fn.__name__ in ("_qmatmul_kernel", "_dequant_kernel", "_dequant_words_kernel", "_qgemv_kernel",
                              "_moe_kernel"):
            compiled.setdefault(kernel.hash, (kernel, kwargs))  # the autotuner's final launch repeats a config
        return kernel

    JITFunction.run = record
    rows = []
    for job in jobs:
        print(f"compiling {job.type} {job.path} M={job.m}", file=sys.stderr, flush=True)
        t = GGMLType[job.type]
        compiled.clear()
        raw = cc.raw_weight(t, N, K)
        if job.path == "dequant":
            cc.dequant.dequantize(raw, t, (N, K), dtype)
        elif job.path == "moe":
            cc.moe._tuned.cache_clear()
            w = cc.raw_weight(t, MOE_EXPERTS * N, K)
            # planar: the layout does not change the code, and no relaid copy is made
            cc.moe.fused_moe(torch.zeros(job.m, K, dtype=dtype), torch.zeros(job.m, MOE_EXPERTS), MOE_TOP_K, w, w, w,
                             (t, t, t), N, planar=True, block_m=job.m)
        elif job.path == "gemv":
            cc.qgemv._tuned.cache_clear()
            cc.qmatmul.qmatmul(torch.zeros(job.m, K, dtype=dtype), raw, t, (N, K), path="gemv")
        else:
            cc.qmatmul._tuned.cache_clear()  # a fresh autotuner per job: a tuned key would compile one config only
            cc.qmatmul.qmatmul(torch.zeros(job.m, K, dtype=dtype), raw, t, (N, K), path=job.path)
        for kernel, kw in compiled.values():
            rows.append(read(job, kernel, kw, target.backend))
    return rows


def read(job: Job, kernel, kw: dict, backend: str) -> Row:
    """The row of one compiled kernel, launched with the arguments kw."""
    meta = kernel.metadata
    traits = TYPE_TRAITS[GGMLType[job.type]]
    whole_kernel = "TILE" in kw  # the element decoders' dequant kernel
    if whole_kernel:
        config, tile_m, elements = f"TILE{kw['TILE']} w{meta.num_warps}", 0, kw["TILE"] * traits.block_elements
    elif "BLOCK_K" not in kw or kw.get("WORDS"):  # qgemv's decoders: gemv, gemm, moe and dequant of their types
        # a pass covers one block of each row (K-quants) or a step of 8 blocks (32-element types)
        blocks = 1 if traits.block_elements == 256 else GEMV_STEP_BLOCKS
        tile_m = 0 if job.path == "dequant" else kw["BLOCK_M"]
        tile = f"M{tile_m} " if job.path == "gemm" else _moe_part(kw) if job.path == "moe" else ""
        config, elements = f"{tile}N{kw['BLOCK_N']} w{meta.num_warps}", kw["BLOCK_N"] * blocks * traits.block_elements
    else:
        tile_m = kw["BLOCK_M"]
        tile = f"M{tile_m} " if job.path == "gemm" else _moe_part(kw) if job.path == "moe" else ""
        config = f"{tile}N{kw['BLOCK_N']} K{kw['BLOCK_K']} w{meta.num_warps} s{meta.num_stages}"
        elements = kw["BLOCK_N"] * kw["BLOCK_K"]
    weight_bytes = elements * traits.block_bytes / traits.block_elements
    if backend == "cuda":
        instrs, (regs, *spill) = parse_sass(sass(kernel.asm["cubin"])), ptxas_report(kernel)
    else:
        instrs, (regs, *spill) = parse_amdgcn(kernel.asm["amdgcn"]), amdgcn_report(kernel.asm["amdgcn"])
    return Row(job, config, meta.num_warps, profile(instrs, whole_kernel=whole_kernel), regs,
               tuple(spill), meta.shared, weight_bytes, elements, tile_m)


def _moe_part(kw: dict) -> str:
    """The moe kernel's launch in a config's name: the gate and up product with its activation, or down."""
    return "down " if kw["ACT"] == "none" else "gate+up "


# The report.


def table(rows: list[Row], cuda: bool) -> list[str]:
    best = {}
    for r in rows:
        if r.job not in best or r.ipb < best[r.job].ipb:
            best[r.job] = r
    spill = "ptxas spill st/ld B" if cuda else "spilled VGPR/SGPR"
    unit = "warp instr/B" if cuda else "wave instr/B"
    lines = [f"| type | path | M | config | loop instrs | loads 8/16/32/64/128 | loops | regs | {spill} | "
             f"{'LDL+STL' if cuda else 'scratch'} | shared B | W B/iter | {unit} | ceiling |",
             "|---|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        p, approx = r.profile, "" if r.profile.exact else "~"
        loads = "/".join(str(p.loads[w]) for w in WIDTHS)
        loads += "".join(f" +{n}x{w}b" for w, n in sorted(p.loads.items()) if w not in WIDTHS)
        ceiling = f"{r.ceiling:.0%}" if cuda else "n/a"
        mark = " *" if best[r.job] is r else ""
        lines.append(f"| {r.job.type} | {r.job.path} | {'-' if r.job.m is None else r.job.m} | {r.config} | "
                     f"{approx}{p.instructions} | {loads} | {p.loops} | {r.regs} | {r.spill[0]}/{r.spill[1]} | "
                     f"{p.local} | {r.shared} | {r.weight_bytes:.0f} | {approx}{r.ipb:.3f}{mark} | {ceiling} |")
    return lines


def gemm_table(rows: list[Row]) -> list[str]:
    """Per type: the GEMM loop's warp instructions per 1000 output FLOPs at each config, beside the dequant kernel's
    per 1000 weight elements divided by 2 M (dequantize once, then torch.mm: what the dequant path adds to cuBLAS's
    own instructions, which no compile-only run can read)."""
    lines = [f"| type | path | config | loop instrs | MMA instrs | regs | spill st/ld B | warp instr / kFLOP | "
             f"dequant at M={GEMM_M}: warp instr / kFLOP |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.job.path != "gemm":
            continue
        dq = [d for d in rows if d.job == Job(r.job.type, "dequant", None)]
        dequant = f"{min(d.per_kflop for d in dq) / (2 * GEMM_M):.3f} + cuBLAS" if dq else "-"
        lines.append(f"| {r.job.type} | gemm | {r.config} | {r.profile.instructions} | {r.profile.mma} | {r.regs} | "
                     f"{r.spill[0]}/{r.spill[1]} | {r.per_kflop:.3f} | {dequant} |")
    return lines


def decode_path(t: str) -> str:
    """The path a decode step (M = 1) takes for type t: the GEMV where it has a word decoder, else skinny."""
    return "gemv" if GGMLType[t] in GEMV_TYPES else "skinny"


def m_ratios(rows: list[Row]) -> list[str]:
    """Per type: the best M = 16 gemv loop's instructions per byte over the best M = 1 loop's."""
    best: dict[tuple[str, int], float] = {}
    for r in rows:
        if r.job.path == "gemv" and not r.spills:
            key = (r.job.type, r.job.m)
            best[key] = min(best.get(key, math.inf), r.ipb)
    return [f"{t}: gemv M=16 / M=1 = {best[(t, 16)]:.3f} / {best[(t, 1)]:.3f} = {best[(t, 16)] / best[(t, 1)]:.2f}"
            for t in dict.fromkeys(t for t, _ in best) if (t, 1) in best and (t, 16) in best]


def check(rows: list[Row], types: tuple[str, ...] = DECODE_TYPES,
          triton_version: str = triton.__version__) -> list[str]:
    """Each of `types` whose best M=1 decode loop (`decode_path`) exceeds CHECK_IPB or spills, and whose best
    spill-free M=16 gemv loop, where rows has one compiled, exceeds its M16_IPB bound for that Triton."""
    failures = []
    bounds = M16_IPB.get(".".join(triton_version.split(".")[:2]), {})
    for t in (t for t in types if t in bounds and any(r.job == Job(t, "gemv", 16) for r in rows)):
        best16 = min((r for r in rows if r.job == Job(t, "gemv", 16) and not r.spills), key=lambda r: r.ipb,
                     default=None)
        if best16 is None or best16.ipb > bounds[t]:
            failures.append(f"{t}: best spill-free M=16 gemv loop "
                            f"{'spills' if best16 is None else f'({best16.config}) takes {best16.ipb:.3f}'}, over "
                            f"{bounds[t]} for Triton {triton_version}")
    for t in types:
        path = decode_path(t)
        best = min((r for r in rows if r.job == Job(t, path, 1)), key=lambda r: r.ipb)
        if best.ipb > CHECK_IPB:
            failures.append(f"{t}: best M=1 {path} loop ({best.config}) takes {best.ipb:.2f} warp instructions "
                            f"per weight byte, over {CHECK_IPB}")
        if best.spills:
            failures.append(f"{t}: best M=1 {path} loop ({best.config}) spills: ptxas {best.spill[0]}/"
                            f"{best.spill[1]} bytes stored/loaded, {best.profile.local} LDL/STL")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="cuda:90", help="cuda:<sm> or hip:<gfx arch>, e.g. hip:gfx942")
    parser.add_argument("--types", default=",".join(DECODE_TYPES), help="comma-separated GGUF types (%(default)s)")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated (%(default)s)")
    parser.add_argument("--m", default="1", help="comma-separated rows of x for gemv, skinny and splitk, rows per "
                        "expert tile for moe (1, 16, 32, 64), e.g. 1,16")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 if a selected decode type's best M=1 decode loop is over {CHECK_IPB} ipb or "
                             "spills")
    parser.add_argument("--no-append", action="store_true", help="print only, do not append to bench/RESULTS.md")
    args = parser.parse_args(argv)
    if knobs.runtime.interpret:  # triton was imported interpreting: nothing would compile
        parser.error("TRITON_INTERPRET is set: unset it to compile for a GPU target")
    cuda = args.target.startswith("cuda:")
    types, paths = args.types.split(","), args.paths.split(",")
    if unknown := [t for t in types if t not in GGMLType.__members__] + [p for p in paths if p not in PATHS]:
        parser.error(f"unknown types or paths: {', '.join(unknown)}")
    if args.check and not cuda:
        parser.error("--check reads the SASS of a CUDA target")
    ms = [int(m) for m in args.m.split(",")]
    jobs = [Job(t, p, None if p == "dequant" else GEMM_M if p == "gemm" else m)
            for t in types for p in paths for m in (ms if p in ("gemv", "skinny", "splitk", "moe") else ms[:1])
            if path_takes(p, GGMLType[t], m)]
    checked = tuple(t for t in types if t in DECODE_TYPES) if args.check else ()
    jobs += [job for job in (Job(t, decode_path(t), 1) for t in checked) if job not in jobs]
    rows = compile_rows(args.target, jobs, getattr(torch, args.dtype))

    rate = (f"Ceiling = min(1, ({ISSUE_PER_CLOCK} / ipb) / {BYTES_PER_SM_CLOCK:.1f}): an H200 SM issues "
            f"{ISSUE_PER_CLOCK} warp instructions per clock and takes in {BYTES_PER_SM_CLOCK:.1f} bytes per clock at "
            f"{HBM_BYTES_PER_S / 1e12} TB/s ({SMS} SMs, {CLOCK_HZ / 1e9} GHz): issue-bound above "
            f"{ISSUE_PER_CLOCK / BYTES_PER_SM_CLOCK:.2f} ipb." if cuda else
            "No ceiling: the H200 issue model does not apply, and no CDNA3 model is made here.")
    lines = ["", f"## Kernel loops read from the {'SASS' if cuda else 'amdgcn'} compiled without a GPU "
             f"({datetime.date.today()}, Triton {triton.__version__}, target {args.target.replace(':', ' ')}, "
             f"{args.dtype} x)", "",
             f"`python bench/sass.py {' '.join(sys.argv[1:] if argv is None else argv)}`: x [M, {K}], W {N} x {K}; "
             "per pass of each kernel's main loop (dequant: per program, the whole kernel). ipb = loop instructions "
             f"x {'warps' if cuda else 'waves'} / weight bytes per pass; * best config of its (type, path, M); "
             "~ inner-loop trips unread.", rate, "", *table(rows, cuda)]
    if any(r.job.path == "gemm" for r in rows):
        lines += ["", f"GEMM loops (x [{GEMM_M}, {K}]): warp instructions per 1000 output FLOPs (2 per multiply-add; "
                  "the tensor-core instructions count one each).", "", *gemm_table(rows)]
    text = "\n".join(lines) + "\n"
    if args.no_append:
        print(text)
    else:
        append_results(text)
    if args.check:
        for line in m_ratios(rows):
            print(line)
        failures = check(rows, checked)
        for failure in failures:
            print("CHECK FAILED", failure)
        return 1 if failures else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
