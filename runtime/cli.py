"""The `ggtriton` command line (also `python -m ggtriton.runtime`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ggtriton.gguf import GGUFError, GGUFFile
from ggtriton.gguf.bundled import ModelNotInstalledError, default_model_path
from ggtriton.gguf.describe import format_summary, summarize, to_json


def _model_path(path: str | None) -> Path:
    """The model named on the command line, else the bundled default."""
    return Path(path) if path else default_model_path()


def cmd_inspect(args: argparse.Namespace) -> int:
    with GGUFFile(_model_path(args.file or args.model)) as f:
        if args.json:
            json.dump(to_json(f), sys.stdout, indent=1, ensure_ascii=False)
            sys.stdout.write("\n")
        else:
            print(format_summary(f, summarize(f)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ggtriton", description="GPU-first LLM inference on GGUF files.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="summarize a GGUF file: architecture, types, hyper-parameters, tokenizer")
    p.add_argument("file", nargs="?", help="GGUF file (the first part of a split model); default: bundled SmolLM2")
    p.add_argument("-m", "--model", help="same as FILE")
    p.add_argument("--json", action="store_true", help="print version, metadata and tensor table as JSON")
    p.set_defaults(run=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (GGUFError, ModelNotInstalledError) as e:
        print(f"ggtriton: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # Output piped into `head` and friends: stop quietly.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
