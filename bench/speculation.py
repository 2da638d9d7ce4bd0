"""What speculative decoding can gain, modelled from measured pass times, at batch 1 and at a large batch.

    python bench/speculation.py [-m target.gguf] [--draft draft.gguf | --draft-layers 3] [--device cuda] [-k 4]

Times, per batch size, the target's decode step (one token per sequence), its verify pass (k + 1 tokens per
sequence) and the draft's decode step, each after `--context` cached tokens. With acceptance a, a verify
step yields (1 - a^(k+1)) / (1 - a) tokens for k draft steps and one verify pass, against one token per
decode step: the modelled speed-up is tokens * decode / (verify + k * draft). Also prints the drafts the
engine's adaptive rule (`step_cost.choose_lookahead`) picks under these measured costs at each acceptance and
batch, with its modelled speed-up (never below 1x by construction: it drafts nothing when nothing pays).
Without `--draft`, the draft is the target's first `--draft-layers` layers (same vocabulary, a tenth or so of
its bytes): its acceptance is not measured, only its cost.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from ggtriton.gguf import GGUFFile
from ggtriton.gguf.bundled import default_model_path
from ggtriton.gguf.writer import TensorData, typed_metadata, write_gguf
from ggtriton.runtime import LLM, SamplingParams
from ggtriton.runtime.engine.model_runner import Chunk
from ggtriton.runtime.engine.sequence import Sequence
from ggtriton.runtime.engine.step_cost import StepCost, choose_lookahead


def first_layers(src: Path, dst: Path, n_layers: int) -> None:
    """A copy of `src` with only its first `n_layers` layers."""
    f = GGUFFile(src)
    arch = f.metadata["general.architecture"]
    metadata = typed_metadata(f.metadata, f.value_types)
    metadata[f"{arch}.block_count"] = replace(metadata[f"{arch}.block_count"], value=n_layers)
    keep = [t for t in f.tensors.values() if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < n_layers]
    write_gguf(dst, metadata, [TensorData(t.name, t.ggml_type, t.shape, f.tensor_bytes(t.name)) for t in keep])


def pass_ms(llm: LLM, batch: int, n_tokens: int, context: int, reps: int) -> float:
    """Median ms of one forward of `batch` sequences, each `n_tokens` new tokens after `context` cached ones,
    with logits for all new tokens."""
    pages = -(-(context + n_tokens) // llm.block_size)
    llm.runner.allocate_kv(batch * pages)  # the engine is never built: these passes own the cache
    chunks = []
    for b in range(batch):
        seq = Sequence(f"timing{b}", [1 + (b + i) % 32 for i in range(context + n_tokens)], SamplingParams())
        seq.block_table = list(range(b * pages, (b + 1) * pages))
        chunks.append(Chunk(seq, context, seq.token_ids[context:], n_tokens))
    llm.runner.run(chunks)  # compile and tune outside the timing
    times = []
    for _ in range(reps):
        if llm.device.type == "cuda":
            torch.cuda.synchronize(llm.device)
        start = time.perf_counter()
        llm.runner.run(chunks)
        if llm.device.type == "cuda":
            torch.cuda.synchronize(llm.device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None, help="target GGUF (default: the bundled SmolLM2)")
    p.add_argument("--draft", default=None, help="draft GGUF (default: the target's first --draft-layers layers)")
    p.add_argument("--draft-layers", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("-k", type=int, default=4, help="draft tokens per step")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()

    target_path = Path(args.model) if args.model else default_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        draft_path = Path(args.draft) if args.draft else Path(tmp) / "draft.gguf"
        if not args.draft:
            first_layers(target_path, draft_path, args.draft_layers)
        batches = [int(b) for b in args.batches.split(",")]
        target = LLM(target_path, device=args.device, kv_cache_bytes=1, warm_up=False)
        draft = LLM(draft_path, device=args.device, kv_cache_bytes=1, warm_up=False)
        share = draft_path.stat().st_size / target_path.stat().st_size
        k = args.k
        draft_name = draft_path.name if args.draft else f"its first {args.draft_layers} layers"
        print(f"target {target_path.name}, draft {draft_name} ({share:.0%} of its bytes) on {target.device} "
              f"({target.backend}), k = {k}, context {args.context}, torch {torch.__version__}")
        print("| batch | decode ms | verify k+1 ms | draft step ms | verify / decode | "
              "speed-up a=0.5 | a=0.7 | a=0.9 |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        measured = {}
        for batch in batches:
            decode = pass_ms(target, batch, 1, args.context, args.reps)
            verify = pass_ms(target, batch, k + 1, args.context, args.reps)
            step = pass_ms(draft, batch, 1, args.context, args.reps)
            measured[batch] = decode, verify, step
            gains = [(1 - a ** (k + 1)) / (1 - a) * decode / (verify + k * step) for a in (0.5, 0.7, 0.9)]
            print(f"| {batch} | {decode:.1f} | {verify:.1f} | {step:.1f} | {verify / decode:.2f} | "
                  + " | ".join(f"{g:.2f}x" for g in gains) + " |")
        # The engine's choice (`choose_lookahead`) under these measured costs, every sequence at acceptance a.
        unit = measured[batches[0]][0]
        points = {}
        for b, (decode, verify, _) in measured.items():
            points[b], points[b * (k + 1)] = decode / unit, verify / unit
        cost = StepCost(sorted(points.items()), [(b, step / unit) for b, (_, _, step) in measured.items()])
        print("\n| batch | acceptance | drafts chosen | modelled speed-up |\n|---:|---:|---:|---:|")
        for batch in batches:
            for a in (0.3, 0.5, 0.7, 0.9):
                ks = choose_lookahead([a] * batch, [k] * batch, cost)
                depth = max(ks)
                tokens = sum((1 - a ** (n + 1)) / (1 - a) for n in ks)
                time_ = cost.target_time(batch + sum(ks)) + sum(
                    cost.draft_time(sum(n >= j for n in ks)) for j in range(1, depth + 1))
                print(f"| {batch} | {a} | {sum(ks) / batch:.2f} per sequence | "
                      f"{tokens / time_ / (batch / cost.target_time(batch)):.2f}x |")

if __name__ == "__main__":
    main()
