"""The `ggtriton` command line (also `python -m ggtriton.runtime`)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from contextlib import closing
from importlib.metadata import version
from pathlib import Path

from ggtriton.gguf import GGUFError, GGUFFile
from ggtriton.gguf.bundled import ModelNotInstalledError, default_model_path
from ggtriton.gguf.describe import format_summary, summarize, to_json
from ggtriton.gguf.tokenizer import CHAT_TEMPLATES, ChatTemplateError, builtin_chat_template

# Exit status after Ctrl-C, as a shell gives a command killed by SIGINT.
INTERRUPTED = 130


def _note(line: str) -> None:
    print(f"ggtriton: {line}", file=sys.stderr)


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


def _check_device(device: str) -> None:
    """A device torch cannot give is one line, not the assertion torch raises deep inside."""
    import torch

    try:
        d = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device}: {e}") from None
    if d.type != "cuda":
        return
    if not torch.cuda.is_available():
        build = "" if torch.version.cuda or torch.version.hip else ", a build for CPU only"
        raise ValueError(f"--device {device}: no GPU available to torch {torch.__version__}{build}")
    if d.index is not None and d.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: torch sees {torch.cuda.device_count()} GPU(s)")


def _llm_kwargs(args: argparse.Namespace) -> dict:
    """The LLM's keyword arguments from the engine flags (the model path aside)."""
    return dict(device=args.device, backend=args.backend, max_model_len=args.ctx_size or None,
                max_num_seqs=args.parallel, seed=args.seed, draft_model=args.draft_model,
                num_speculative_tokens=args.draft_max, draft_min=args.draft_min, draft_p_min=args.draft_p_min,
                adaptive_speculation=not args.draft_fixed, tensor_parallel_size=args.tensor_parallel_size,
                cache_dir=args.cache_dir)


def _llm(args: argparse.Namespace):
    from ggtriton.runtime.llm import LLM

    if args.device:
        _check_device(args.device)
    llm = LLM(_model_path(args.model), **_llm_kwargs(args))
    context = llm.config.context_length
    if args.ctx_size == 0:
        _note(f"context: {context} tokens, the model's")
    elif args.ctx_size and args.ctx_size > context:
        _note(f"warning: -c {args.ctx_size} is above the model's context of {context} tokens; capped at {context}")
    return llm


def _params(args: argparse.Namespace, llm):
    from ggtriton.runtime.sampling_params import SamplingParams

    # -n -1: no limit of its own; the engine stops at the end of the context
    max_tokens = llm.scheduler_config.max_model_len if args.n_predict == -1 else args.n_predict
    return SamplingParams(max_tokens=max_tokens, temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                          min_p=args.min_p, repetition_penalty=args.repeat_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.seed, stop=args.stop or [], ignore_eos=args.ignore_eos)


def _template_text(choice: str | None) -> str | None:
    """The template --chat-template names: a built-in one or a file (read before the model loads)."""
    if choice is None:
        return None
    if choice in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[choice]
    if not Path(choice).is_file():
        raise ValueError(f"--chat-template {choice}: neither a file nor a built-in template "
                         f"({', '.join(CHAT_TEMPLATES)})")
    return Path(choice).read_text(encoding="utf-8")


def _use_chat_template(llm, template: str | None) -> None:
    """Chat with `template` (--chat-template), else the file's own, else the built-in one of the model's
    family, said on stderr. Any of them renders in the tokenizer's jinja2 sandbox."""
    tok = llm.tokenizer
    if template is not None:
        tok.chat_template = template
    elif not tok.chat_template:
        name = builtin_chat_template(llm.gguf.metadata)
        tok.chat_template = CHAT_TEMPLATES[name]
        _note(f"{llm.path.name} has no chat template: using the built-in {name!r} one (--chat-template to choose)")


def _chat_prompt(llm, messages: list[dict[str, str]]) -> list[int]:
    return llm.tokenizer.encode_chat(llm.tokenizer.apply_chat_template(messages))


class _CtrlC:
    """Ctrl-C while an answer streams: the first press ends the answer after the engine step under way,
    which leaves the engine in order for the next request; a second one interrupts at once."""

    def __enter__(self) -> _CtrlC:
        self.pressed = False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.pressed = True
        signal.signal(signal.SIGINT, self._previous)

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)


def _stream(llm, prompt: str | list[int], params) -> tuple[str, bool]:
    """Stream the answer to stdout, then a timing line to stderr. Returns the text, and whether it is
    complete (False: Ctrl-C stopped it)."""
    text = []
    with _CtrlC() as ctrl_c, closing(llm.stream(prompt, params)) as deltas:
        for delta in deltas:
            text.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
            if ctrl_c.pressed:
                break
    if ctrl_c.pressed:
        print()
        return "".join(text), False
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
    return "".join(text), True


def _read_prompt(args: argparse.Namespace) -> str:
    """-p TEXT, -p - (stdin) or -f FILE; one trailing newline dropped, as an editor or `echo` adds it."""
    if args.file:
        text = Path(args.file).read_text(encoding="utf-8")
    elif args.prompt == "-":
        text = sys.stdin.read()
    else:
        return args.prompt
    return text.removesuffix("\n")


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = _read_prompt(args)
    template = _template_text(args.chat_template)
    llm = _llm(args)
    if args.chat or template is not None:
        _use_chat_template(llm, template)
        prompt = _chat_prompt(llm, [{"role": "user", "content": prompt}])
    _, complete = _stream(llm, prompt, _params(args, llm))
    return 0 if complete else INTERRUPTED


def _read_message() -> str | None:
    """The user's next message: a line, or lines joined while each ends with a backslash; None at the end
    of input (Ctrl-D)."""
    lines = []
    while True:
        try:
            line = input("... " if lines else "> ")
        except EOFError:
            if sys.stdin.isatty():
                print()
            return None
        if not line.endswith("\\"):
            return "\n".join(lines + [line])
        lines.append(line[:-1])


def cmd_chat(args: argparse.Namespace) -> int:
    template = _template_text(args.chat_template)
    llm = _llm(args)
    _use_chat_template(llm, template)
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 - input() gains line editing and history
        except ImportError:
            pass
    messages = [{"role": "system", "content": args.system}] if args.system else []
    params = _params(args, llm)
    print("ggtriton chat: end a line with \\ to continue the message; /exit or Ctrl-D quits; Ctrl-C stops an "
          "answer.", file=sys.stderr)
    while (message := _read_message()) is not None and message.strip() != "/exit":
        if not message.strip():
            continue
        messages.append({"role": "user", "content": message})
        # An answer Ctrl-C stopped stays in the conversation as far as it got.
        answer, _ = _stream(llm, _chat_prompt(llm, messages), params)
        messages.append({"role": "assistant", "content": answer})
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from ggtriton.runtime.entrypoints.bench import format_report, jsonl_requests, random_requests, run_bench

    if args.url:
        return _bench_url(args)
    llm = _llm(args)
    requests = (jsonl_requests(args.dataset, args.output_len) if args.dataset
                else random_requests(llm, args.num_prompts, args.input_len, args.output_len, args.seed or 0))
    report = run_bench(llm, requests, seed=args.seed or 0, progress=True)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def _bench_url(args: argparse.Namespace) -> int:
    import asyncio

    from ggtriton.runtime.entrypoints.bench import jsonl_requests
    from ggtriton.runtime.entrypoints.serving_bench import (format_serving_report, random_text_requests,
                                                            run_serving_bench)

    requests = (jsonl_requests(args.dataset, args.output_len) if args.dataset
                else random_text_requests(args.num_prompts, args.input_len, args.output_len, args.seed or 0))
    report = asyncio.run(run_serving_bench(args.url, requests, request_rate=args.request_rate,
                                           max_concurrency=args.max_concurrency, model=args.served_model_name,
                                           api_key=args.api_key, seed=args.seed or 0, progress=True))
    print(json.dumps(report, indent=1) if args.json else format_serving_report(report))
    return 0 if report["completed"] else 1


def cmd_batch(args: argparse.Namespace) -> int:
    from ggtriton.runtime.entrypoints.openai_batch import run_batch

    template = _template_text(args.chat_template)
    if args.ray:
        return _ray_batch(args, template)
    with open(args.input, encoding="utf-8") as f:
        lines = f.readlines()
    # Opened before the model loads: an output that cannot be written fails now, not after the batch.
    with open(args.output, "w", encoding="utf-8") as out:
        llm = _llm(args)
        _use_chat_template(llm, template)
        results = run_batch(llm, lines, llm.path.name)
        for r in results:
            out.write(json.dumps(r, ensure_ascii=False) + "\n")
    failed = sum(r["error"] is not None for r in results)
    print(f"{len(results) - failed} requests done, {failed} failed -> {args.output}", file=sys.stderr)
    return 0


def _ray_batch(args: argparse.Namespace, template: str | None) -> int:
    try:
        from ggtriton.runtime.entrypoints.ray_batch import run_ray_batch
    except ImportError as e:
        raise ValueError(f"--ray needs Ray: pip install 'ggtriton[ray]' ({e})") from None
    kwargs = _llm_kwargs(args)
    tp = kwargs.pop("tensor_parallel_size")
    written, failed, skipped = run_ray_batch(args.input, args.output, _model_path(args.model),
                                             num_replicas=args.num_replicas, tensor_parallel_size=tp,
                                             use_gpus=None if args.device is None else args.device != "cpu",
                                             chat_template=template, **kwargs)
    print(f"{written - failed} requests done, {failed} failed, {skipped} already in the output -> {args.output}",
          file=sys.stderr)
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in --help, except where there is none to show (no value, an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _int_flag(valid, expected: str):
    """An argparse type: an integer that `valid` accepts, else a usage error saying what is `expected`."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = None
        if n is None or not valid(n):
            raise argparse.ArgumentTypeError(f"{text!r}: give {expected}")
        return n
    return parse


def _device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu... (default: the GPU if there is one)")
    p.add_argument("--backend", choices=["triton", "torch", "cpu"], default=None,
                   help="kernels: triton (default on a GPU), cpu (default on CPU: packed int4 / bfloat16 weights) or "
                        "torch (the float32 reference ops)")
    p.add_argument("--cache-dir", default=None,
                   help="compiled kernels and tuning results, per GPU model (default: $GGTRITON_CACHE_DIR or "
                        "~/.cache/ggtriton)")


def _engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", help="GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("-c", "--ctx-size", type=_int_flag(lambda n: n >= 0, "0 (the model's context) or more"),
                   default=None,
                   help="context length; 0 or none given: the model's; more than the model's is capped")
    p.add_argument("-np", "--parallel", type=int, default=256, help="most sequences decoded together")
    p.add_argument("-s", "--seed", type=int, default=None, help="random seed")
    _device_flags(p)
    p.add_argument("-tp", "--tensor-parallel-size", type=_int_flag(lambda n: n >= 1, "1 or more"), default=1,
                   help="split the model over this many GPUs (or CPU processes), torch.distributed")
    p.add_argument("-md", "--draft-model", help="draft GGUF for speculative decoding (same vocabulary)")
    p.add_argument("--draft-max", type=int, default=4, help="draft tokens proposed per step at most")
    p.add_argument("--draft-min", type=int, default=1, help="fewer drafts than this are not verified")
    p.add_argument("--draft-p-min", type=float, default=0.0,
                   help="stop drafting when the draft's top probability falls below this")
    p.add_argument("--draft-fixed", action="store_true",
                   help="always draft --draft-max tokens (default: as many as pay at each sequence's acceptance)")


def _sampling_flags(p: argparse.ArgumentParser, n_predict: int) -> None:
    p.add_argument("-n", "--n-predict", default=n_predict,
                   type=_int_flag(lambda n: n == -1 or n >= 1, "-1 (until end of sequence or context) or 1 or more"),
                   help="tokens to generate at most; -1: until end of sequence or the context is full")
    p.add_argument("--temp", type=float, default=0.8, help="temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=40, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=0.95, help="... that make up this much probability (1: all)")
    p.add_argument("--min-p", type=float, default=0.05, help="... at least this share of the top one's (0: all)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="penalty on tokens already seen (1: off)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="subtracted once from each output token")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="... and this times its count")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")


def _template_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chat-template", metavar="NAME|FILE",
                   help="chat template instead of the model's: a jinja file or a built-in one "
                        f"({', '.join(CHAT_TEMPLATES)}); a model without one gets its family's built-in one")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ggtriton", description="GPU-first LLM inference on GGUF files.")
    parser.add_argument("--version", action="version", version=f"ggtriton {version('ggtriton')}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=summary, formatter_class=_HelpFormatter)

    p = command("inspect", "summarize a GGUF file: architecture, types, hyper-parameters, tokenizer")
    p.add_argument("file", nargs="?", help="GGUF file (the first part of a split model); default: bundled SmolLM2")
    p.add_argument("-m", "--model", help="same as FILE")
    p.add_argument("--json", action="store_true", help="print version, metadata and tensor table as JSON")
    p.set_defaults(run=cmd_inspect)

    p = command("generate", "generate text from a prompt, streamed, with a timing line; Ctrl-C stops it "
                            f"(exit status {INTERRUPTED})")
    _engine_flags(p)
    _sampling_flags(p, n_predict=128)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("-p", "--prompt", help="the prompt; -: read it from stdin")
    source.add_argument("-f", "--file", help="read the prompt from this file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _template_flag(p)
    p.set_defaults(run=cmd_generate)

    p = command("chat", "interactive chat with the model's chat template; Ctrl-C stops an answer")
    _engine_flags(p)
    _sampling_flags(p, n_predict=512)
    p.add_argument("--system", help="system message")
    _template_flag(p)
    p.set_defaults(run=cmd_chat)

    p = command("bench", "throughput and latency (requests/s, tokens/s, TTFT, ITL): offline, or of a server (--url)")
    _engine_flags(p)
    p.add_argument("--url", help="measure the OpenAI-compatible server at this address instead (http://HOST:PORT); "
                                 "the model flags are then unused")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="with --url: Poisson arrivals at this many requests/s (inf: all at once)")
    p.add_argument("--max-concurrency", type=_int_flag(lambda n: n >= 1, "1 or more"), default=None,
                   help="with --url: requests in flight at most")
    p.add_argument("--served-model-name", help="with --url: the model to ask for (default: the server's first)")
    p.add_argument("--api-key", help="with --url: sent as 'Authorization: Bearer KEY'")
    p.add_argument("--num-prompts", type=int, default=64, help="random prompts")
    p.add_argument("--input-len", type=int, default=128, help="mean prompt length of the random prompts")
    p.add_argument("--output-len", type=int, default=128, help="tokens generated per request")
    p.add_argument("--dataset", help='JSONL of {"prompt": ..., "max_tokens"?: ...} instead of random prompts')
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=cmd_bench)

    p = command("batch", "run an OpenAI-format batch file (JSONL in, JSONL out)")
    _engine_flags(p)
    p.add_argument("input", help="request lines")
    p.add_argument("output", help="response lines, in the same order")
    _template_flag(p)
    p.add_argument("--ray", action="store_true",
                   help="run on a Ray cluster (RAY_ADDRESS, else a local one), one engine per actor; resumes: "
                        "custom_ids already in OUTPUT are skipped, the rest appended")
    p.add_argument("--num-replicas", type=_int_flag(lambda n: n >= 1, "1 or more"), default=None,
                   help="with --ray: engines (actors); default: the cluster's GPUs / --tensor-parallel-size, or 1")
    p.set_defaults(run=cmd_batch)

    from . import quantize

    quantize.add_command(command)

    from . import perplexity, quant_bench, serve  # they import this module's helpers

    perplexity.add_command(command)
    quant_bench.add_command(command)
    serve.add_command(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return code
    except KeyboardInterrupt:  # Ctrl-C outside an answer: loading, at the chat prompt
        print(file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        # Python flushes stdout once more on exit, which would fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (GGUFError, ModelNotInstalledError, ChatTemplateError, ValueError, OSError) as e:
        print(f"ggtriton: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
