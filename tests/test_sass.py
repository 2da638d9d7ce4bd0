"""bench/sass.py: the loop reading on SASS and amdgcn snippets trimmed from kernels compiled for sm_90 and gfx942,
and one real compile for sm_90 in a fresh process (this session's kernels were made for the interpreter)."""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.append(str(BENCH))  # as when the bench scripts run: sass.py imports gpu_timing from beside it
import sass  # noqa: E402

# A skinny-matmul loop (from _qmatmul_kernel, Q8_0), loads of every width (from other kernels), a short loop
# before it, and spill code after it.
LOOPS = """
	code for sm_90a
	.target	sm_90a

		Function : _qmatmul_kernel
	.headerflags	@"EF_CUDA_ACCELERATORS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                                 /* 0x00000a00ff017b82 */
                                                                                          /* 0x000ff00000000800 */
        /*0010*/                   IADD3 R7, R7, 0x1, RZ ;                                /* 0x0000000107077810 */
                                                                                          /* 0x000fc80007ffe0ff */
        /*0020*/                   ISETP.NE.AND P2, PT, R7, 0x4, PT ;                     /* 0x000000040700780c */
                                                                                          /* 0x000fda0003f45270 */
        /*0030*/               @P2 BRA 0x10 ;                                             /* 0xfffffffc00f42947 */
                                                                                          /* 0x000fea000383ffff */
        /*0040*/               @P0 BRA 0x100 ;                                            /* 0x00000060004c0947 */
                                                                                          /* 0x000fec0003800000 */
        /*0050*/                   S2R R206, SR_TID.X ;                                   /* 0x0000000000ce7919 */
                                                                                          /* 0x000e220000002100 */
        /*0060*/                   LDG.E.U16 R63, desc[UR10][R196.64] ;                   /* 0x0000000ac43f7981 */
                                                                                          /* 0x000ea8000c1e1500 */
        /*0070*/                   LDG.E.U8 R220, desc[UR10][R194.64+0x2] ;               /* 0x0000020ac2dc7981 */
                                                                                          /* 0x000ee8000c1e1100 */
        /*0080*/                   LDG.E.U8 R221, desc[UR10][R196.64+0x2] ;               /* 0x0000020ac4dd7981 */
                                                                                          /* 0x000f28000c1e1100 */
        /*0090*/              @!P1 LDG.E.128 R4, desc[UR28][R2.64] ;                      /* 0x0000001c02049981 */
                                                                                          /* 0x000f68000c1e1d00 */
        /*00a0*/                   LDG.E.64 R4, desc[UR14][R4.64] ;                       /* 0x0000000e04047981 */
                                                                                          /* 0x000f68000c1e1b00 */
        /*00b0*/                   LDG.E R11, desc[UR28][R2.64] ;                         /* 0x0000001c020b7981 */
                                                                                          /* 0x000f68000c1e1900 */
        /*00c0*/                   LDGSTS.E.BYPASS.128 [R15+0x4000], desc[UR12][R8.64], P3 ;  /* 0x04000000080f7fae */
                                                                                          /* 0x0001e40009921c4c */
        /*00d0*/                   LDGDEPBAR ;                                            /* 0x00000000000079af */
                                                                                          /* 0x000fe20000000000 */
        /*00e0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;                          /* 0x0000000000007b1d */
                                                                                          /* 0x000fec0000010000 */
        /*00f0*/              @!P1 BRA 0x50 ;                                             /* 0xffffffb0006c9947 */
                                                                                          /* 0x000fea000383ffff */
        /*0100*/                   STL.64 [R1+0x40], R16 ;                                /* 0x0000401001007387 */
                                                                                          /* 0x000fe80000100a00 */
        /*0110*/                   LDL.LU R14, [R1+0x48] ;                                /* 0x00004800010e7983 */
                                                                                          /* 0x000ea80000300800 */
        /*0120*/                   STG.E desc[UR6][R2.64], R0 ;                           /* 0x0000000002007986 */
                                                                                          /* 0x000fe2000c101906 */
        /*0130*/                   EXIT ;                                                 /* 0x000000000000794d */
                                                                                          /* 0x000fea0003800000 */
        /*0140*/                   BRA 0x140;                                             /* 0xfffffffc00fc7947 */
                                                                                          /* 0x000fc0000383ffff */
        /*0150*/                   NOP;                                                   /* 0x0000000000007918 */
                                                                                          /* 0x000fc00000000000 */
"""

# A loop nest with a counted inner loop: a byte offset from 0 by 0x2000 up to 0x20000, 16 passes (trimmed from a
# kernel with `for j in range(0, 16)` inside a runtime loop).
NESTED = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;                                     /* 0x00000a00ff017b82 */
                                                                                              /* 0x000ff00000000800 */
        /*0010*/                   LDC R0, c[0x0][0x220] ;                                    /* 0x00008800ff007b82 */
                                                                                              /* 0x000e220000000800 */
        /*0020*/                   ISETP.GE.AND P0, PT, R0, 0x1, PT ;                         /* 0x000000010000780c */
                                                                                              /* 0x001fe20003f06270 */
        /*0030*/              @!P0 BRA 0x170 ;                                                /* 0x0000004800688947 */
                                                                                              /* 0x000fec0003800000 */
        /*0040*/                   LEA R24, P0, R20.reuse, R18, 0x1 ;                         /* 0x0000001214187211 */
                                                                                              /* 0x040fe200078008ff */
        /*0050*/                   HFMA2.MMA R26, -RZ, RZ, 0, 0 ;                             /* 0x00000000ff1a7435 */
                                                                                              /* 0x000fe200000001ff */
        /*0060*/                   MOV R28, RZ ;                                              /* 0x000000ff001c7202 */
                                                                                              /* 0x000fe20000000f00 */
        /*0070*/                   IADD3 R2, P0, R26, R24, RZ ;                               /* 0x000000181a027210 */
                                                                                              /* 0x000fc80007f1e0ff */
        /*0080*/                   IADD3.X R3, R28, R16, RZ, P0, !PT ;                        /* 0x000000101c037210 */
                                                                                              /* 0x000fca00007fe4ff */
        /*0090*/                   LDG.E.U16 R42, desc[UR8][R2.64] ;                          /* 0x00000008022a7981 */
                                                                                              /* 0x000ea8000c1e1500 */
        /*00a0*/                   LDG.E.U16 R40, desc[UR8][R2.64+0x100] ;                    /* 0x0001000802287981 */
                                                                                              /* 0x000ee8000c1e1500 */
        /*00b0*/                   SHF.L.U32 R42, R42, 0x10, RZ ;                             /* 0x000000102a2a7819 */
                                                                                              /* 0x004fca00000006ff */
        /*00c0*/                   IADD3 R26, P0, R26, 0x2000, RZ ;                           /* 0x000020001a1a7810 */
                                                                                              /* 0x000fc40007f1e0ff */
        /*00d0*/                   IADD3.X R28, RZ, R28, RZ, P0, !PT ;                        /* 0x0000001cff1c7210 */
                                                                                              /* 0x000fe400007fe4ff */
        /*00e0*/                   ISETP.NE.U32.AND P0, PT, R26, 0x20000, PT ;                /* 0x000200001a00780c */
                                                                                              /* 0x000fca0003f05070 */
        /*00f0*/                   FFMA.FTZ R32, R44, 1.1920928955078125e-07, R32 ;           /* 0x340000002c207823 */
                                                                                              /* 0x000fe20000010020 */
        /*0100*/                   ISETP.NE.U32.AND.EX P0, PT, R28, RZ, PT, P0 ;              /* 0x000000ff1c00720c */
                                                                                              /* 0x000fe20003f05100 */
        /*0110*/               @P0 BRA 0x70 ;                                                 /* 0xffffffb800580947 */
                                                                                              /* 0x000fec000383ffff */
        /*0120*/                   LDC R2, c[0x0][0x220] ;                                    /* 0x00008800ff027b82 */
                                                                                              /* 0x000e220000000800 */
        /*0130*/                   UIADD3 UR5, UP0, UR5, 0x1, URZ ;                           /* 0x0000000105057890 */
                                                                                              /* 0x000fe2000ff1e03f */
        /*0140*/                   ISETP.NE.U32.AND P0, PT, R2, UR5, PT ;                     /* 0x0000000502007c0c */
                                                                                              /* 0x001fc8000bf05070 */
        /*0150*/                   ISETP.NE.U32.AND.EX P0, PT, RZ, UR6, PT, P0 ;              /* 0x00000006ff007c0c */
                                                                                              /* 0x000fda000bf05100 */
        /*0160*/               @P0 BRA 0x40 ;                                                 /* 0xffffffb800280947 */
                                                                                              /* 0x000fea000383ffff */
        /*0170*/                   S2R R2, SR_TID.X ;                                         /* 0x0000000000027919 */
                                                                                              /* 0x000e220000002100 */
        /*0180*/                   STG.E desc[UR8][R2.64], R9 ;                               /* 0x0000000902007986 */
                                                                                              /* 0x000fe8000c101908 */
        /*0190*/                   EXIT ;                                                     /* 0x000000000000794d */
                                                                                              /* 0x000fea0003800000 */
        /*01a0*/                   BRA 0x1a0;                                                 /* 0xfffffffc00fc7947 */
                                                                                              /* 0x000fc0000383ffff */
"""

# An inner loop over a runtime count, unrolled by ptxas: its bound is a register, its trips cannot be read.
RUNTIME_INNER = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;                                     /* 0x00000a00ff017b82 */
                                                                                              /* 0x000fe20000000800 */
        /*0010*/                   IMAD.MOV.U32 R0, RZ, RZ, RZ ;                              /* 0x000000ffff007224 */
                                                                                              /* 0x000fe200078e00ff */
        /*0020*/                   ULDC.64 UR10, c[0x0][0x220] ;                              /* 0x00008800000a7ab9 */
                                                                                              /* 0x000fe20000000a00 */
        /*0030*/                   IMAD.U32 R6, RZ, RZ, UR4 ;                                 /* 0x00000004ff067e24 */
                                                                                              /* 0x000fe2000f8e00ff */
        /*0040*/                   LEA R16, P1, R6.reuse, R4, 0x1 ;                           /* 0x0000000406107211 */
                                                                                              /* 0x040fe200078208ff */
        /*0050*/                   LEA.HI.X.SX32 R17, R6, R5, 0x1, P1 ;                       /* 0x0000000506117211 */
                                                                                              /* 0x000fca00008f0eff */
        /*0060*/                   LDG.E.U16 R16, desc[UR6][R16.64] ;                         /* 0x0000000610107981 */
                                                                                              /* 0x0000a2000c1e1500 */
        /*0070*/                   VIADD R6, R6, 0x200 ;                                      /* 0x0000020006067836 */
                                                                                              /* 0x000fe40000000000 */
        /*0080*/                   IADD3 R7, P1, R7, 0x4, RZ ;                                /* 0x0000000407077810 */
                                                                                              /* 0x000fe40007f3e0ff */
        /*0090*/                   IMAD.X R8, RZ, RZ, R8, P1 ;                                /* 0x000000ffff087224 */
                                                                                              /* 0x000fe200008e0608 */
        /*00a0*/                   ISETP.GE.U32.AND P1, PT, R7, UR5, PT ;                     /* 0x0000000507007c0c */
                                                                                              /* 0x000fe2000bf26070 */
        /*00b0*/                   ISETP.GE.AND.EX P1, PT, R8, UR8, PT, P1 ;                  /* 0x0000000808007c0c */
                                                                                              /* 0x000fe2000bf26310 */
        /*00c0*/                   FFMA R0, R9, R10, R0 ;                                     /* 0x0000000a09007223 */
                                                                                              /* 0x000fd00000000000 */
        /*00d0*/              @!P1 BRA 0x40 ;                                                 /* 0xfffffffc00709947 */
                                                                                              /* 0x000fea000383ffff */
        /*00e0*/                   VIADD R18, R18, 0x1 ;                                      /* 0x0000000112127836 */
                                                                                              /* 0x000fc60000000000 */
        /*00f0*/                   ISETP.NE.U32.AND P1, PT, R18, UR10, PT ;                   /* 0x0000000a12007c0c */
                                                                                              /* 0x000fe4000bf25070 */
        /*0100*/              @P1 BRA 0x20 ;                                                  /* 0xfffffff800701947 */
                                                                                              /* 0x000ff6000383ffff */
        /*0110*/                   STG.E desc[UR6][R4.64], R0 ;                               /* 0x0000000004007986 */
                                                                                              /* 0x000fe2000c101906 */
        /*0120*/                   EXIT ;                                                     /* 0x000000000000794d */
                                                                                              /* 0x000fea0003800000 */
        /*0130*/                   BRA 0x130;                                                 /* 0xfffffffc00fc7947 */
                                                                                              /* 0x000fc0000383ffff */
"""

# The skinny loop of _qmatmul_kernel for gfx942, trimmed, and its metadata.
AMDGCN = """
_qmatmul_kernel:                        ; @_qmatmul_kernel
.Lfunc_begin0:
; %bb.5:
	s_load_dwordx2 s[2:3], s[0:1], 0x0
	s_cbranch_scc1 .LBB0_3
	v_mov_b32_e32 v40, 0
.LBB0_2:                                ; =>This Inner Loop Header: Depth=1
	.loc	1 108 16                        ; qmatmul.py:108:16
	v_add_u32_e32 v2, s16, v35
	buffer_load_ushort v41, v5, s[20:23], 0 offen
	buffer_load_sbyte v16, v77, s[24:27], 0 offen
	global_load_ushort v87, v[4:5], off
	global_load_dwordx4 v[2:5], v[6:7], off
	ds_write_b128 v40, v[26:29] offset:16
	s_waitcnt lgkmcnt(0)
	s_barrier
	v_add_f32_e32 v34, v34, v2
	s_cbranch_scc1 .LBB0_2
	s_branch .LBB0_4
.LBB0_3:
	v_mov_b32_e32 v34, 0
.LBB0_4:                                ; %Flow8
	buffer_store_short v0, v1, s[8:11], 0 offen
	s_endpgm
.Lfunc_end0:
	.amdhsa_user_sgpr_count 16
    .sgpr_count:     96
    .sgpr_spill_count: 0
    .vgpr_count:     111
    .vgpr_spill_count: 3
"""


def test_the_longest_backward_branch_is_the_loop_and_loads_count_by_width():
    instrs = sass.parse_sass(LOOPS)
    assert len(instrs) == 22 and instrs[0].opcode == "LDC" and instrs[4].predicate == "@P0"
    assert sass.backward_branches(instrs) == [(1, 3), (5, 15)]  # the trap `BRA 0x140` is no loop
    p = sass.profile(instrs)
    assert p.instructions == 11 and p.exact and p.loops == 2
    # LDGSTS counts as a global load, LDGDEPBAR does not
    assert p.loads == Counter({8: 2, 16: 1, 32: 1, 64: 1, 128: 2})
    assert p.local == 2  # STL.64 and LDL.LU, after the loop: the whole kernel counts


def test_whole_kernel_runs_to_the_last_exit():
    p = sass.profile(sass.parse_sass(LOOPS), whole_kernel=True)
    # 0x0000 .. the EXIT at 0x0130; neither loop's trip count shows (no counter set before the short one, no
    # compare in the long one), so each counts once
    assert p.instructions == 20 and not p.exact


def test_a_counted_inner_loop_counts_once_per_pass():
    instrs = sass.parse_sass(NESTED)
    assert sass.backward_branches(instrs) == [(7, 17), (4, 22)]
    assert sass.trip_count(instrs, (7, 17)) == 16
    p = sass.profile(instrs)
    assert p.exact and p.instructions == (22 - 4 + 1) - 11 + 16 * 11
    assert p.loads == Counter({16: 2 * 16})


def test_an_inner_loop_of_unknown_trips_is_counted_once_and_marked():
    instrs = sass.parse_sass(RUNTIME_INNER)
    assert sass.trip_count(instrs, (4, 13)) is None
    p = sass.profile(instrs)
    assert not p.exact and p.instructions == 16 - 2 + 1 and p.loads == Counter({16: 1})


@pytest.mark.parametrize("body, branch, trips", [
    (["IADD3 R5, R5, 0x1, RZ", "ISETP.NE.AND P0, PT, R5, 0x8, PT"], "@P0", 8),  # the compare sees the stepped value
    (["ISETP.LT.AND P0, PT, R5, 0x7, PT", "IADD3 R5, R5, 0x1, RZ"], "@P0", 8),  # ... or the value before the step
    (["VIADD R5, R5, 0x4", "ISETP.GE.AND P0, PT, R5, 0x20, PT"], "@!P0", 8),
    (["IADD3 R5, R5, 0x1, RZ", "ISETP.NE.AND P0, PT, R5, R9, PT"], "@P0", None),  # a register bound
    (["IADD3 R5, R5, R7, RZ", "ISETP.NE.AND P0, PT, R5, 0x8, PT"], "@P0", None),  # a register step
])
def test_trip_count_forms(body, branch, trips):
    code = ["MOV R5, RZ", "FFMA R0, R1, R2, R0", *body, f"{branch} BRA 0x10", "EXIT"]
    text = "\n".join(f"        /*{16 * i:04x}*/                   {op} ;" for i, op in enumerate(code))
    assert sass.trip_count(sass.parse_sass(text), (1, 4)) == trips


def test_amdgcn_loop_loads_and_registers():
    instrs = sass.parse_amdgcn(AMDGCN)
    assert sass.backward_branches(instrs) == [(3, 12)]
    p = sass.profile(instrs)
    assert p.instructions == 10 and p.exact and p.loops == 1
    assert p.loads == Counter({16: 2, 8: 1, 128: 1})
    assert sass.amdgcn_report(AMDGCN) == (111, 3, 0)


def skinny_row(t: str, instructions: int, spill: tuple[int, int] = (0, 0)) -> sass.Row:
    """A row of type t's decode path (gemv or skinny) with a skinny config's numbers."""
    return sass.Row(sass.Job(t, sass.decode_path(t), 1), "N32 K256 w4 s3", 4,
                    sass.Profile(instructions, Counter(), True, 1, 0, 0), 96, spill, 1024, 32 * 256 * 34 / 32, 32 * 256,
                    1)


def test_rate_ceiling_and_check():
    row = skinny_row("Q8_0", 1253)
    assert row.ipb == pytest.approx(1253 * 4 / 8704)
    assert row.ceiling == pytest.approx(4 / row.ipb / (4.8e12 / (132 * 1.98e9)))
    assert skinny_row("Q8_0", 400).ceiling == 1.0
    assert sass.check([skinny_row(t, 400) for t in sass.DECODE_TYPES]) == []
    rows = [skinny_row(t, 400) for t in sass.DECODE_TYPES if t != "Q8_0"]
    rows += [skinny_row("Q8_0", 1253), skinny_row("Q8_0", 1300), skinny_row("Q4_K", 100, (120, 120)),
             skinny_row("Q6_K", 1253)]
    failures = sass.check(rows)
    assert len(failures) == 2 and failures[0].startswith("Q4_K") and "spills" in failures[0]
    assert failures[1].startswith("Q8_0: best M=1 gemv loop (N32 K256 w4 s3) takes 0.58 ")


def test_check_holds_the_m16_loops_reached():
    # IQ4_XS's and MXFP4's M = 16 gemv loops are held to the figures reached with each Triton: a spill-free config
    # over the bound fails, a spilling one under it does not count, and a Triton without figures holds none
    ones = [skinny_row(t, 400) for t in sass.DECODE_TYPES]

    def m16(t: str, ipb: float, spill: tuple[int, int] = (0, 0)) -> sass.Row:
        return dataclasses.replace(skinny_row(t, round(ipb * 8704 / 4), spill), job=sass.Job(t, "gemv", 16))

    bound = sass.M16_IPB["3.9"]
    rows = ones + [m16("IQ4_XS", bound["IQ4_XS"] - 0.01), m16("MXFP4", bound["MXFP4"] - 0.01)]
    assert sass.check(rows, triton_version="3.9.0") == []
    rows = ones + [m16("IQ4_XS", bound["IQ4_XS"] + 0.01), m16("MXFP4", bound["MXFP4"] - 0.01, (8, 8)),
                   m16("MXFP4", bound["MXFP4"] + 0.02)]
    failures = sass.check(rows, triton_version="3.9.0")
    assert len(failures) == 2 and all("M=16 gemv loop" in f and "Triton 3.9.0" in f for f in failures)
    assert failures[0].startswith(f"IQ4_XS: best spill-free M=16 gemv loop (N32 K256 w4 s3) takes "
                                  f"{bound['IQ4_XS'] + 0.01:.3f}, over {bound['IQ4_XS']}")
    assert failures[1].startswith("MXFP4")
    assert sass.check(rows, triton_version="2.0.0") == []
    spilling = ones + [m16("MXFP4", 0.1, (4, 4))]
    assert sass.check(spilling, triton_version="3.6.0") == [
        f"MXFP4: best spill-free M=16 gemv loop spills, over {sass.M16_IPB['3.6']['MXFP4']} for Triton 3.6.0"]


def test_gemm_rows_count_tensor_core_instructions_per_flop():
    code = ["MOV R5, RZ", "HMMA.16816.F32.BF16 R32, R40, R52, R32", "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24",
            "WARPGROUP.ARRIVE", "IADD3 R5, R5, 0x1, RZ", "ISETP.NE.AND P0, PT, R5, 0x8, PT", "@P0 BRA 0x10", "EXIT"]
    text = "\n".join(f"        /*{16 * i:04x}*/                   {op} ;" for i, op in enumerate(code))
    p = sass.profile(sass.parse_sass(text))
    assert (p.instructions, p.mma) == (6, 2)
    # a [128, 128] tile over a 256-element Q4_K block per pass: 2 * 128 * 128 * 256 FLOPs, 8 warps
    gemm = sass.Row(sass.Job("Q4_K", "gemm", 256), "M128 N128 w8", 8, p, 96, (0, 0), 0, 128 * 144, 128 * 256, 128)
    assert gemm.per_kflop == pytest.approx(1000 * 6 * 8 / (2 * 128 * 128 * 256))
    dequant = sass.Row(sass.Job("Q4_K", "dequant", None), "TILE16 w4", 4, p, 32, (0, 0), 0, 16 * 144, 16 * 256, 0)
    assert dequant.per_kflop == pytest.approx(1000 * 6 * 4 / (16 * 256))  # per 1000 weight elements
    table = sass.gemm_table([gemm, dequant])
    assert len(table) == 3 and f"| {gemm.per_kflop:.3f} | {dequant.per_kflop / (2 * sass.GEMM_M):.3f} + cuBLAS |" \
        in table[2]


def test_real_q4_1_skinny_for_sm90():
    """Every skinny config of Q4_1 (a type without a word decoder) at M=1, compiled for sm_90 and read: the report
    is whole and consistent."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(BENCH / "sass.py"), "--types", "Q4_1", "--paths", "skinny",
                           "--no-append"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in proc.stdout.splitlines()
            if line.startswith("| Q4_1 |")]
    configs = importlib.import_module("ggtriton.kernels.qmatmul")._SKINNY_CONFIGS["cuda"]
    assert sorted(r[3] for r in rows) == sorted(f"N{n} K{k} w{w} s{s}" for n, k, w, s in configs), proc.stdout
    assert sum(r[12].endswith("*") for r in rows) == 1
    for (_, path, m, config, instrs, loads, loops, regs, spill, local, shared, weight, ipb, ceiling) in rows:
        block_n, block_k, warps = map(int, re.fullmatch(r"N(\d+) K(\d+) w(\d+) s\d+", config).groups())
        assert (path, m) == ("skinny", "1") and int(loops) >= 1 and 0 < int(regs) <= 255
        assert min(map(int, spill.split("/"))) >= 0 and int(local) >= 0 and int(shared) >= 0
        instrs = int(instrs.lstrip("~"))
        assert instrs > 0 and sum(map(int, loads.split("/"))) > 0
        assert int(weight) == block_n * block_k * 20 // 32  # Q4_1: 20 bytes per 32 elements
        assert float(ipb.strip("~ *")) == pytest.approx(instrs * warps / int(weight), abs=1e-3)
        assert 0 < float(ceiling.rstrip("%")) <= 100


def test_decode_loops_meet_the_target_on_sm90():
    """The decode kernel of every type it decodes by words, compiled for sm_90 with the installed Triton: at most
    0.25 warp instructions per weight byte in its best config, with no spills (`sass.py --check`). IQ4_XS and MXFP4,
    whose nibbles index a table, included (their lookups are byte permutes: about 0.24 and 0.23)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    types = ",".join(t for t in sass.DECODE_TYPES if sass.decode_path(t) == "gemv")
    assert "IQ4_XS" in types and "MXFP4" in types
    proc = subprocess.run([sys.executable, str(BENCH / "sass.py"), "--types", types, "--paths", "gemv", "--check",
                           "--no-append"], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and " gemv " in line]
    assert {line.split("|")[1].strip() for line in rows} == set(types.split(","))


def test_loops_at_16_rows_hold_the_figures_reached_on_sm90():
    """The decode kernel at 16 rows of x of the types whose loop multiplies a step's weights with one dot over x's
    contiguous runs (IQ4_XS, MXFP4, Q8_0, Q5_0) or exact float16 integers (Q4_K, Q5_K), compiled for sm_90 with the
    installed Triton: their best spill-free loops within `sass.M16_IPB` (`sass.py --check` at --m 16)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    types = {"IQ4_XS", "MXFP4", "Q8_0", "Q5_0", "Q4_K", "Q5_K"}
    proc = subprocess.run([sys.executable, str(BENCH / "sass.py"), "--types", ",".join(sorted(types)), "--paths",
                           "gemv", "--m", "16", "--check", "--no-append"], check=False, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| ") and " gemv | 16 " in line]
    assert {r[1].strip() for r in rows} == types
    assert any(line.startswith("MXFP4: gemv M=16 / M=1 = ") for line in proc.stdout.splitlines())
