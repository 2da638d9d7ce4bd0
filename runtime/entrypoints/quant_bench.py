"""`ggtriton quant-bench BASE Q1 [Q2 ...]`: quantizations of one model against a base, in one command.

Per model: file size and bits per weight (from the tensor bytes); perplexity on the text (llama-perplexity's
method, see `perplexity`) and its difference to the base's; KL divergence of the model's next-token
distribution from the base's (mean, median, 99th percentile, maximum), how often the two agree on the most
likely token ("same top p") and the RMS difference of the probability given to the text's next token (Δp),
each with llama-perplexity --kl-divergence's standard errors; prefill and decode tokens/s on the device.

KL divergence needs both whole distributions at the same position, and they are never written out: every
model stays loaded, and each batch of chunks runs through the base and then through each candidate, so the
base runs once and its logits live only as long as their batch. That gives the exact divergence over the
whole vocabulary. Caching the base's top-64 log-probs instead would hold one model in memory at a time, but
it only bounds the divergence from below (the rest of the vocabulary as one bucket), and not tightly: on
SmolLM2 over prose the top 64 tokens hold 92 % of the mass on average, and the bound falls 11-13 % short of
the exact KLD of Q6_K and Q4_0 against Q8_0, more than what separates neighbouring quantizations. The price
of exactness is memory for every model at once (on a GPU, their quantized bytes).

Prefill speed is the scoring passes' own: n_ctx - 1 tokens of each chunk, as many chunks a pass as the batch
size allows, over the seconds those passes took (llama-perplexity's timing; no prompt is run twice). Decode
speed is one sequence generating `decode_tokens` tokens after a one-token prompt (llama-bench's tg), through
the engine's own steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ggtriton.gguf import GGUFFile, Tokenizer
from ggtriton.gguf.types import file_type_name

from ..config import ModelConfig
from ..engine.kv_cache import KVCacheLayout
from ..llm import LLM
from ..sampling_params import SamplingParams
from .cli import _check_device, _device_flags, _int_flag
from .perplexity import first_scored, read_text, row_slices, scored_logits, scoring_flags, tokenize_chunks

OUTPUT_NAME = "quant-bench"  # DIR/quant-bench.md, .json, .png


@dataclass
class ModelFile:
    path: Path
    file_type: str
    size_bytes: int
    bits_per_weight: float

    @classmethod
    def read(cls, path: Path) -> ModelFile:
        """Size and bits per weight from the tensors; the type from `general.file_type`, else the tensor type
        that holds the most weights."""
        with GGUFFile(path) as f:
            tensors = list(f.tensors.values())
            file_type = f.metadata.get("general.file_type")
        if isinstance(file_type, int):
            name = file_type_name(file_type)
        else:
            by_type = Counter()
            for t in tensors:
                by_type[t.ggml_type.name] += t.n_elements
            name = by_type.most_common(1)[0][0] if by_type else "?"
        weights = sum(t.n_elements for t in tensors)
        return cls(path, name, path.stat().st_size, 8 * sum(t.nbytes for t in tensors) / max(weights, 1))


def _mean_and_stderr(total: float, total2: float, count: int) -> tuple[float, float]:
    """llama-perplexity's mean and its standard error from a sum and a sum of squares."""
    if count < 1:
        return 0.0, 0.0
    mean = total / count
    var = total2 / count - mean * mean
    return mean, math.sqrt(var / (count - 1)) if var > 0 and count > 10 else 0.0


class Divergence:
    """Running statistics of one model against the base, over scored positions (llama-perplexity's
    --kl-divergence sums, in float64, plus every position's KLD and Δp for the percentiles)."""

    def __init__(self) -> None:
        self.sums = dict.fromkeys(("nll", "nll2", "base", "base2", "cross", "kld", "kld2", "dp", "dp2", "dp4"), 0.0)
        self.same_top = 0
        self.count = 0
        self.kld: list[np.ndarray] = []
        self.dp: list[np.ndarray] = []

    def add(self, base_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        same = logits is base_logits  # the base against itself: one log-softmax
        for s in row_slices(logits):
            logp = torch.log_softmax(base_logits[s].double(), -1)
            logq = logp if same else torch.log_softmax(logits[s].double(), -1)
            t = targets[s, None]
            nll_base, nll = -logp.gather(1, t)[:, 0], -logq.gather(1, t)[:, 0]
            kld = (logp.exp() * (logp - logq)).sum(-1)
            dp = (-nll).exp() - (-nll_base).exp()
            for key, v in (("nll", nll), ("nll2", nll**2), ("base", nll_base), ("base2", nll_base**2),
                           ("cross", nll * nll_base), ("kld", kld), ("kld2", kld**2), ("dp", dp), ("dp2", dp**2),
                           ("dp4", dp**4)):
                self.sums[key] += v.sum().item()
            self.same_top += (logp.argmax(-1) == logq.argmax(-1)).sum().item()
            self.count += len(kld)
            self.kld.append(kld.cpu().numpy())
            self.dp.append(dp.cpu().numpy())

    def summary(self) -> dict[str, float]:
        s, n = self.sums, self.count
        log_ppl, log_ppl_unc = _mean_and_stderr(s["nll"], s["nll2"], n)
        log_base, log_base_unc = _mean_and_stderr(s["base"], s["base2"], n)
        cov = (s["cross"] / n - s["nll"] / n * (s["base"] / n)) / (n - 1) if n >= 10 else 0.0
        ppl, ppl_base = math.exp(log_ppl), math.exp(log_base)
        ppl_unc, base_unc = ppl * log_ppl_unc, ppl_base * log_base_unc
        kld_mean, kld_unc = _mean_and_stderr(s["kld"], s["kld2"], n)
        mse, mse_unc = _mean_and_stderr(s["dp2"], s["dp4"], n)
        rms = math.sqrt(mse)
        same = self.same_top / n
        kld = np.concatenate(self.kld)
        return {
            "ppl": ppl, "ppl_stderr": ppl_unc,
            "delta_ppl": ppl - ppl_base,
            "delta_ppl_stderr": math.sqrt(max(ppl_unc**2 + base_unc**2 - 2 * ppl * ppl_base * cov, 0.0)),
            "kld_mean": kld_mean, "kld_stderr": kld_unc,
            # llama.cpp's percentiles interpolate linearly between order statistics, as numpy's default does
            "kld_median": float(np.median(kld)), "kld_p99": float(np.percentile(kld, 99)), "kld_max": float(kld.max()),
            "same_top": same, "same_top_stderr": math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0,
            "rms_dp": rms, "rms_dp_stderr": 0.5 / rms * mse_unc if rms > 0 else 0.0,
        }


def check_vocabularies(base: Path, candidates: Sequence[Path]) -> None:
    """Every candidate must share the base's vocabulary: KL divergence compares distributions token by token."""
    def tokens(path: Path) -> Any:
        with GGUFFile(path) as f:
            return f.metadata.get("tokenizer.ggml.tokens")

    reference = tokens(base)
    for path in candidates:
        if tokens(path) != reference:
            raise ValueError(f"{path}: its vocabulary differs from the base's ({base}); "
                             "KL divergence needs the same one")


def check_output_dir(out: Path) -> None:
    """Make DIR and prove it writable, before any work."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def load(path: Path, n_ctx: int, args: argparse.Namespace) -> LLM:
    """A model for the bench: one sequence at a time in its engine, a KV cache just large enough for it (its
    pages sized for float32, the widest K/V type)."""
    with GGUFFile(path) as f:
        config = ModelConfig.from_gguf(f)
    layout = KVCacheLayout(config.n_layers, config.n_kv_heads, config.head_dim, num_blocks=1, dtype=torch.float32)
    pages = -(-n_ctx // layout.block_size) + 1
    return LLM(path, device=args.device, backend=args.backend, max_model_len=n_ctx, max_num_seqs=1,
               max_num_batched_tokens=args.batch_size, kv_cache_bytes=layout.block_bytes * pages,
               block_size=layout.block_size, cache_dir=args.cache_dir)


def decode_speed(llm: LLM, token: int, decode_tokens: int) -> float:
    """Tokens/s of `decode_tokens` tokens generated after the one-token prompt [token]."""
    out = llm.generate([[token]], SamplingParams(max_tokens=decode_tokens, temperature=0, ignore_eos=True),
                       use_tqdm=False)[0]
    m = out.metrics
    return (len(out.token_ids) - 1) / max(m["last_token"] - m["first_token"], 1e-9)


def timed(items: Iterable, device: torch.device, seconds: list[float], k: int) -> Iterator:
    """`items`, adding to seconds[k] the time each took to produce (the device synchronized before the clock is
    read, so that the time is the work's, not its launch's)."""
    it = iter(items)
    while True:
        start = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds[k] += time.perf_counter() - start
        yield item


def bench(llms: Sequence[LLM], inputs: list[list[int]], targets: list[list[int]],
          progress: Callable[[int], None] = lambda n: None) -> tuple[list[Divergence], list[float]]:
    """Statistics of every model (the first is the base) against the base, chunk batch by chunk batch, and the
    seconds each model's scoring passes took."""
    n_ctx = len(inputs[0])
    first = first_scored(n_ctx)
    stats = [Divergence() for _ in llms]
    seconds = [0.0] * len(llms)
    group = max(1, llms[0].scheduler_config.max_num_batched_tokens // n_ctx)
    for g in range(0, len(inputs), group):
        chunks = inputs[g : g + group]
        base: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(chunks))}
        for i, _, logits in timed(scored_logits(llms[0], chunks), llms[0].device, seconds, 0):
            base[i].append(logits)
        base_rows = [torch.cat(base[i]) for i in range(len(chunks))]
        target = [torch.tensor(targets[g + i][first + 1 :], device=llms[0].device) for i in range(len(chunks))]
        every_row = torch.cat(base_rows)
        stats[0].add(every_row, every_row, torch.cat(target))
        progress(len(chunks))
        for k, (llm, st) in enumerate(zip(llms[1:], stats[1:]), 1):
            for i, pos, logits in timed(scored_logits(llm, chunks), llm.device, seconds, k):
                rows = slice(pos - first, pos - first + len(logits))
                st.add(base_rows[i][rows], logits, target[i][rows])
            progress(len(chunks))
    return stats, seconds


def _fmt(value: float, err: float | None = None, digits: int = 4) -> str:
    return f"{value:.{digits}f}" + (f" ± {err:.{digits}f}" if err is not None else "")


def format_table(rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table, the base first."""
    head = ["model", "type", "size MiB", "BPW", "PPL", "ΔPPL", "KLD mean", "KLD median", "KLD p99", "KLD max",
            "same top p %", "RMS Δp %", "prefill t/s", "decode t/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["model"], r["file_type"], f"{r['size_bytes'] / 2**20:.1f}", f"{r['bits_per_weight']:.2f}",
                 _fmt(r["ppl"], r["ppl_stderr"]), _fmt(r["delta_ppl"], r["delta_ppl_stderr"]),
                 _fmt(r["kld_mean"], r["kld_stderr"], 5), _fmt(r["kld_median"], digits=5),
                 _fmt(r["kld_p99"], digits=5), _fmt(r["kld_max"], digits=5),
                 _fmt(100 * r["same_top"], 100 * r["same_top_stderr"], 2),
                 _fmt(100 * r["rms_dp"], 100 * r["rms_dp_stderr"], 2),
                 f"{r['prefill_tokens_per_s']:.1f}", f"{r['decode_tokens_per_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """KLD (log scale) and PPL against bits per weight; marker area follows decode speed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["models"]
    fastest = max(r["decode_tokens_per_s"] for r in rows) or 1.0
    fig, (ax_kld, ax_ppl) = plt.subplots(1, 2, figsize=(12, 5))
    for n, r in enumerate(rows):
        size, color = 30 + 270 * r["decode_tokens_per_s"] / fastest, f"C{n % 10}"
        x = r["bits_per_weight"]
        if n:  # the base has no divergence from itself
            ax_kld.errorbar(x, r["kld_mean"], yerr=r["kld_stderr"], fmt="none", ecolor="gray", zorder=1)
            ax_kld.scatter(x, r["kld_mean"], s=size, color=color, zorder=2)
            ax_kld.annotate(r["file_type"], (x, r["kld_mean"]), textcoords="offset points", xytext=(6, 6))
        ax_ppl.errorbar(x, r["ppl"], yerr=r["ppl_stderr"], fmt="none", ecolor="gray", zorder=1)
        ax_ppl.scatter(x, r["ppl"], s=size, color=color, zorder=2)
        ax_ppl.annotate(r["file_type"], (x, r["ppl"]), textcoords="offset points", xytext=(6, 6))
    ax_kld.set_yscale("log")
    ax_kld.set(xlabel="bits per weight", ylabel=f"mean KL divergence from {rows[0]['file_type']}",
               title="KL divergence")
    ax_ppl.set(xlabel="bits per weight", ylabel="perplexity", title="Perplexity")
    fig.suptitle(f"{report['n_ctx']}-token chunks x {report['chunks']}, {report['tokens_scored']} tokens scored; "
                 f"marker area: decode tokens/s ({report['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_command(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    p = command("quant-bench", "quantizations of a model against a base: size, PPL, KL divergence, top-1 "
                               "agreement, speed; a markdown table, JSON and a plot")
    p.add_argument("base", help="the reference GGUF (e.g. F16 or Q8_0)")
    p.add_argument("candidates", nargs="+", metavar="candidate", help="GGUF files of the same model, same vocabulary")
    scoring_flags(p)
    p.add_argument("--decode-tokens", type=_int_flag(lambda n: n >= 2, "2 or more"), default=128,
                   help="tokens generated to time decoding (at most -c - 1)")
    p.add_argument("--out", type=Path, help=f"folder for {OUTPUT_NAME}.md, .json and .png (checked before any work)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG (the plot needs matplotlib: ggtriton[plot])")
    _device_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """The `ggtriton quant-bench` command: every check that can fail comes before the models load."""
    paths = [Path(args.base), *map(Path, args.candidates)]
    make_plot = args.out is not None and not args.no_plot
    if make_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("the plot needs matplotlib: pip install 'ggtriton[plot]' (or give --no-plot)") from None
    if args.out is not None:
        check_output_dir(args.out)
    if args.device:
        _check_device(args.device)
    text = read_text(args.file)
    files = [ModelFile.read(p) for p in paths]
    check_vocabularies(paths[0], paths[1:])
    n_ctx = args.ctx_size
    inputs, targets = tokenize_chunks(Tokenizer.from_gguf(paths[0]), text, n_ctx, args.chunks)
    decode_tokens = min(args.decode_tokens, n_ctx - 1)

    llms = []
    for p in tqdm(paths, desc="loading", unit="model", file=sys.stderr, disable=None):
        llm = load(p, n_ctx, args)
        if n_ctx > llm.config.context_length:
            raise ValueError(f"-c {n_ctx} is above the context of {p} ({llm.config.context_length} tokens)")
        llms.append(llm)
    with tqdm(total=len(inputs) * len(llms), desc="scoring", unit="chunk", file=sys.stderr, disable=None) as bar:
        stats, seconds = bench(llms, inputs, targets, bar.update)
    decode = [decode_speed(llm, inputs[0][0], decode_tokens)
              for llm in tqdm(llms, desc="timing", unit="model", file=sys.stderr, disable=None)]
    prefill_tokens = len(inputs) * (n_ctx - 1)

    rows = []
    for f, st, scoring_s, decode_rate in zip(files, stats, seconds, decode):
        rows.append({"model": f.path.name, "path": str(f.path), "file_type": f.file_type, "size_bytes": f.size_bytes,
                     "bits_per_weight": f.bits_per_weight} | st.summary()
                    | {"prefill_tokens_per_s": prefill_tokens / max(scoring_s, 1e-9),
                       "decode_tokens_per_s": decode_rate})
    report = {"text": str(args.file), "n_ctx": n_ctx, "chunks": len(inputs), "tokens_scored": stats[0].count,
              "device": str(llms[0].device), "backend": llms[0].backend, "prefill_tokens": prefill_tokens,
              "decode_tokens": decode_tokens, "models": rows}
    table = format_table(rows)
    print(table)
    if args.out is not None:
        (args.out / f"{OUTPUT_NAME}.md").write_text(table + "\n", encoding="utf-8")
        (args.out / f"{OUTPUT_NAME}.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        if make_plot:
            plot(report, args.out / f"{OUTPUT_NAME}.png")
        print(f"results in {args.out}{os.sep}{OUTPUT_NAME}.{{md,json{',png' if make_plot else ''}}}", file=sys.stderr)
    return 0
