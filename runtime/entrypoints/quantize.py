"""`ggtriton quantize IN OUT TYPE`: a GGUF model written again in one of llama-quantize's mixes."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ggtriton.gguf import GGMLType, GGUFFile
from ggtriton.gguf.quant_mix import MIXES, TENSOR_TYPES, plan_model, write_quantized


def _mix(text: str) -> str:
    name = text.upper()
    if name not in MIXES:
        raise ValueError(f"unknown type {text!r}; choose one of {', '.join(MIXES)}")
    return name


def _tensor_type(text: str | None) -> GGMLType | None:
    if text is None:
        return None
    name = text.upper()
    if name not in TENSOR_TYPES:
        raise ValueError(f"unknown tensor type {text!r}; choose one of {', '.join(TENSOR_TYPES)}")
    return TENSOR_TYPES[name]


def add_command(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Register `quantize` through the CLI's subcommand factory."""
    p = command("quantize", "write a GGUF model again in one of llama-quantize's mixes (its types and rules)")
    p.add_argument("input", help="GGUF model (F32, F16 or BF16 weights; any type with --allow-requantize)")
    p.add_argument("output", help="GGUF file to write")
    p.add_argument("type", metavar="TYPE", help=f"the mix: {', '.join(MIXES)}")
    p.add_argument("--allow-requantize", action="store_true",
                   help="quantize tensors that are quantized already (dequantized first; loses accuracy twice)")
    p.add_argument("--pure", action="store_true",
                   help="every quantizable tensor in TYPE's main type: no per-tensor rules (row fallbacks still apply)")
    types = ", ".join(TENSOR_TYPES)
    p.add_argument("--output-tensor-type", metavar="T", help=f"type of output.weight: {types}")
    p.add_argument("--token-embedding-type", metavar="T", help=f"type of token_embd.weight: {types}")
    p.set_defaults(run=run)


def _check_output(inp: Path, out: Path) -> None:
    """Fail before any work if the output cannot be written or would overwrite the input."""
    if out.exists() and out.resolve() == inp.resolve():
        raise ValueError(f"{out}: the output would overwrite the input")
    if out.is_dir():
        raise ValueError(f"{out}: is a directory")
    parent = out.parent
    if not parent.is_dir():
        raise ValueError(f"{out}: no directory {parent}")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ValueError(f"{out}: not writable")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    mix = _mix(args.type)
    output_type, embedding_type = _tensor_type(args.output_tensor_type), _tensor_type(args.token_embedding_type)
    inp, out = Path(args.input), Path(args.output)
    _check_output(inp, out)
    with GGUFFile(inp) as f:
        plan = plan_model(f, mix, pure=args.pure, output_type=output_type, embedding_type=embedding_type,
                          allow_requantize=args.allow_requantize)
        total = sum(t.nbytes for t in f)
        done = False
        try:
            with open(out, "wb") as dst, tqdm(total=total, unit="B", unit_scale=True, desc=mix,
                                              file=sys.stderr, disable=None) as bar:
                for info in write_quantized(f, dst, mix, plan):
                    bar.set_postfix_str(f"{info.name} -> {plan[info.name].name}", refresh=False)
                    bar.update(info.nbytes)
                size = dst.tell()
            done = True
        finally:
            if not done:
                out.unlink(missing_ok=True)
    print(f"{inp.name} ({total / 2**20:.1f} MiB) -> {out} ({mix}, {size / 2**20:.1f} MiB)", file=sys.stderr)
    return 0
