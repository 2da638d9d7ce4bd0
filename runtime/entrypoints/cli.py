"""The `ggtriton` command line (also `python -m ggtriton.runtime`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ggtriton.gguf import GGUFError, GGUFFile
from ggtriton.gguf.bundled import ModelNotInstalledError, default_model_path
from ggtriton.gguf.describe import format_summary, summarize, to_json
from ggtriton.gguf.tokenizer import ChatTemplateError


def _model_path(path: str | None) -> Path:
    """The model named on the command line, else the bundled default."""
    return Path(path) if path else default_model_path()


def cmd_inspect(args: argparse.Namespace) -> int:
    """Summarize a GGUF file."""
    with GGUFFile(_model_path(args.file or args.model)) as f:
        if args.json:
            json.dump(to_json(f), sys.stdout, indent=1, ensure_ascii=False)
            sys.stdout.write("\n")
        else:
            print(format_summary(f, summarize(f)))
    return 0


def _llm(args: argparse.Namespace):
    from ggtriton.runtime.llm import LLM

    return LLM(_model_path(args.model), device=args.device, backend=args.backend, max_model_len=args.ctx_size,
               max_num_seqs=args.parallel, seed=args.seed, draft_model=args.draft_model,
               num_speculative_tokens=args.draft_max, draft_min=args.draft_min, draft_p_min=args.draft_p_min,
               cache_dir=args.cache_dir)


def _params(args: argparse.Namespace):
    from ggtriton.runtime.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.n_predict, temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                          min_p=args.min_p, repetition_penalty=args.repeat_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.seed, stop=args.stop or [], ignore_eos=args.ignore_eos)


def _stream(llm, prompt: str, params) -> None:
    for delta in llm.stream(prompt, params):
        sys.stdout.write(delta)
        sys.stdout.flush()
    out = llm.last_output
    m = out.metrics
    n_prompt, n_out = len(out.prompt_token_ids), len(out.token_ids)
    prefill = m.get("first_token", m["arrival"]) - m["arrival"]
    decode = m.get("last_token", 0.0) - m.get("first_token", 0.0)
    gen_rate = (n_out - 1) / decode if n_out > 1 and decode > 0 else 0.0
    spec = (f" | draft acceptance {m['acceptance_rate']:.0%}, {m['mean_accepted_length']:.2f} accepted per step"
            if "acceptance_rate" in m else "")
    print(f"\n\n[prompt: {n_prompt} tokens, {n_prompt / max(prefill, 1e-9):.1f} tokens/s | generation: {n_out} "
          f"tokens, {gen_rate:.1f} tokens/s | {out.finish_reason}{spec}]", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    llm = _llm(args)
    prompt = args.prompt
    if args.chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    _stream(llm, prompt, _params(args))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    llm = _llm(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    params = _params(args)
    print("ggtriton chat: type a message; an empty line or Ctrl-D ends the conversation.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        prompt = llm.tokenizer.apply_chat_template(messages)
        _stream(llm, prompt, params)
        messages.append({"role": "assistant", "content": llm.last_output.text})
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from ggtriton.runtime.entrypoints.bench import format_report, jsonl_requests, random_requests, run_bench

    llm = _llm(args)
    requests = (jsonl_requests(args.dataset, args.output_len) if args.dataset
                else random_requests(llm, args.num_prompts, args.input_len, args.output_len, args.seed or 0))
    report = run_bench(llm, requests, seed=args.seed or 0)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from ggtriton.runtime.entrypoints.openai_batch import run_batch

    llm = _llm(args)
    with open(args.input, encoding="utf-8") as f:
        results = run_batch(llm, f, llm.path.name)
    with open(args.output, "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    failed = sum(r["error"] is not None for r in results)
    print(f"{len(results) - failed} requests done, {failed} failed -> {args.output}", file=sys.stderr)
    return 0


def _engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", help="GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("-c", "--ctx-size", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("-np", "--parallel", type=int, default=256, help="most sequences decoded together")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu... (default: the GPU if there is one)")
    p.add_argument("--backend", choices=["triton", "torch"], default=None,
                   help="kernels: triton (default on a GPU) or the torch reference ops (default on CPU)")
    p.add_argument("-s", "--seed", type=int, default=None, help="random seed")
    p.add_argument("--cache-dir", default=None,
                   help="compiled kernels and tuning results, per GPU model (default: $GGTRITON_CACHE_DIR or "
                        "~/.cache/ggtriton)")
    p.add_argument("-md", "--draft-model", help="draft GGUF for speculative decoding (same vocabulary)")
    p.add_argument("--draft-max", type=int, default=4, help="draft tokens proposed per step at most")
    p.add_argument("--draft-min", type=int, default=1, help="fewer drafts than this are not verified")
    p.add_argument("--draft-p-min", type=float, default=0.0,
                   help="stop drafting when the draft's top probability falls below this")


def _sampling_flags(p: argparse.ArgumentParser, n_predict: int) -> None:
    p.add_argument("-n", "--n-predict", type=int, default=n_predict, help="tokens to generate at most")
    p.add_argument("--temp", type=float, default=0.8, help="temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ggtriton", description="GPU-first LLM inference on GGUF files.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="summarize a GGUF file: architecture, types, hyper-parameters, tokenizer")
    p.add_argument("file", nargs="?", help="GGUF file (the first part of a split model); default: bundled SmolLM2")
    p.add_argument("-m", "--model", help="same as FILE")
    p.add_argument("--json", action="store_true", help="print version, metadata and tensor table as JSON")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("generate", help="generate text from a prompt, streamed, with a timing line")
    _engine_flags(p)
    _sampling_flags(p, n_predict=128)
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with the model's chat template")
    _engine_flags(p)
    _sampling_flags(p, n_predict=512)
    p.add_argument("--system", help="system message")
    p.set_defaults(run=cmd_chat)

    p = sub.add_parser("bench", help="offline throughput and latency: requests/s, tokens/s, TTFT, ITL")
    _engine_flags(p)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128, help="mean prompt length of the random prompts")
    p.add_argument("--output-len", type=int, default=128, help="tokens generated per request")
    p.add_argument("--dataset", help='JSONL of {"prompt": ..., "max_tokens"?: ...} instead of random prompts')
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("batch", help="run an OpenAI-format batch file (JSONL in, JSONL out)")
    _engine_flags(p)
    p.add_argument("input")
    p.add_argument("output")
    p.set_defaults(run=cmd_batch)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (GGUFError, ModelNotInstalledError, ChatTemplateError, ValueError, OSError) as e:
        print(f"ggtriton: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # Output piped into `head` and friends: stop quietly.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
