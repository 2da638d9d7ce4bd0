"""The command line as a user meets it: one BOS in chat prompts, Ctrl-C, chat input, flags, built-in chat
templates, progress, clean errors and the batch command, through `main` or a subprocess (a pty where the
terminal matters), on tiny synthetic models."""

from __future__ import annotations

import io
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ggtriton.gguf import GGUFFile, Tokenizer
from ggtriton.gguf.tokenizer import CHAT_TEMPLATES, builtin_chat_template, render_chat_template
from ggtriton.runtime.entrypoints import cli, openai_batch
from ggtriton.runtime.entrypoints.cli import main
from ggtriton.runtime.llm import LLM, Progress
from ggtriton.runtime.sampling_params import SamplingParams
from ggtriton.runtime.synthetic import SyntheticModel, write_synthetic_model

REPO = Path(__file__).resolve().parents[1]
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A llama with a Llama-3-style template that writes its own BOS, and a tokenizer that adds one."""
    path = tmp_path_factory.mktemp("cli") / "tiny.gguf"
    write_synthetic_model(path, SyntheticModel("llama", vocab=300, seed=5, metadata={
        "tokenizer.chat_template": CHAT_TEMPLATES["llama3"], "tokenizer.ggml.add_bos_token": True}))
    return path


@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> Path:
    """A model whose file has no chat template (its vocabulary has ChatML's turn tokens)."""
    path = tmp_path_factory.mktemp("cli") / "bare.gguf"
    write_synthetic_model(path, SyntheticModel("llama", vocab=300, seed=6, metadata={"tokenizer.chat_template": ""}))
    return path


@pytest.fixture(scope="module")
def tok(tiny) -> Tokenizer:
    return Tokenizer.from_gguf(tiny)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def prompt_tokens(err: str) -> list[int]:
    return [int(n) for n in re.findall(r"\[prompt: (\d+) tokens", err)]


# --- one BOS ---------------------------------------------------------------------------------------------


def test_chat_prompts_carry_one_bos(tiny, tok, capsys):
    bos = tok.bos_token_id
    expected = tok.encode_chat(tok.apply_chat_template(HI))
    assert expected[0] == bos and expected.count(bos) == 1
    llm = LLM(tiny, device="cpu", kv_cache_bytes=1 << 22, warm_up=False)
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    out = llm.chat(HI, params, use_tqdm=False)[0]
    assert out.prompt_token_ids == expected and out.prompt == tok.apply_chat_template(HI)
    assert llm.generate("hi", params, use_tqdm=False)[0].prompt_token_ids[0] == bos  # plain text: BOS added
    line = json.dumps({"url": "/v1/chat/completions", "body": {"messages": HI, "max_tokens": 2}})
    assert openai_batch.run_batch(llm, [line], "tiny")[0]["response"]["body"]["usage"]["prompt_tokens"] == len(expected)
    code, _, err = run(capsys, "generate", "-m", tiny, "--chat", "-p", "hi", "-n", 2, "--temp", 0)
    assert code == 0 and prompt_tokens(err) == [len(expected)]


def test_smollm2_chat_prompt_is_the_rendered_text_without_added_specials(smollm2_path):
    tok = Tokenizer.from_gguf(smollm2_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_end|> there"}]
    plain = tok.encode(tok.apply_chat_template(messages), add_special=False, parse_special=True)
    llm = SimpleNamespace(tokenizer=tok)
    assert cli._chat_prompt(llm, messages) == plain
    assert openai_batch._prompt(llm, "/v1/chat/completions", {"messages": messages}) == plain


# --- Ctrl-C, through a pty ---------------------------------------------------------------------------------


def spawn(*argv) -> tuple[subprocess.Popen, int]:
    master, slave = os.openpty()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"TERM": "dumb"}
    proc = subprocess.Popen([sys.executable, "-m", "ggtriton.runtime", *map(str, argv)], stdin=slave,
                            stdout=slave, stderr=slave, env=env, cwd=REPO / "tests")
    os.close(slave)
    return proc, master


def read_until(master: int, seen: bytearray, done, timeout: float = 60.0) -> None:
    """Read the pty into `seen` until `done(seen)`."""
    deadline = time.monotonic() + timeout
    while not done(seen):
        ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"timed out; the terminal shows {bytes(seen[-400:])!r}"
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the process has closed the terminal
            chunk = b""
        assert chunk, f"the process ended early; the terminal shows {bytes(seen[-400:])!r}"
        seen += chunk


def finish(proc: subprocess.Popen, master: int, seen: bytearray) -> int:
    try:
        while True:  # drain, so the process never blocks on a full terminal
            ready, _, _ = select.select([master], [], [], 30)
            chunk = os.read(master, 4096) if ready else b""
            if not chunk:
                break
            seen += chunk
    except OSError:
        pass
    finally:
        os.close(master)
    try:
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_ctrl_c_stops_generate_quietly(tiny):
    proc, master = spawn("generate", "-m", tiny, "-p", "hi", "-n", -1, "--temp", 0, "--ignore-eos")
    seen = bytearray()
    read_until(master, seen, lambda s: len(s) >= 20)  # generating
    proc.send_signal(signal.SIGINT)
    assert finish(proc, master, seen) == cli.INTERRUPTED
    assert b"Traceback" not in seen and b"error" not in seen


def test_ctrl_c_in_chat_stops_the_answer_and_returns_to_the_prompt(tiny):
    proc, master = spawn("chat", "-m", tiny, "-n", -1, "--temp", 0, "--ignore-eos")
    seen = bytearray()
    read_until(master, seen, lambda s: s.endswith(b"> "))
    os.write(master, b"hi\n")
    start = len(seen)
    read_until(master, seen, lambda s: len(s) - start >= 40)  # answering
    proc.send_signal(signal.SIGINT)
    read_until(master, seen, lambda s: s.endswith(b"\n> "))  # the prompt again
    os.write(master, b"/exit\n")
    assert finish(proc, master, seen) == 0
    assert b"Traceback" not in seen


# --- chat input -------------------------------------------------------------------------------------------


def test_chat_joins_continued_lines_skips_empty_ones_and_ends_at_exit(tiny, tok, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("one \\\ntwo\n\n   \n/exit\nnever read\n"))
    code, _, err = run(capsys, "chat", "-m", tiny, "-n", 2, "--temp", 0, "--ignore-eos")
    expected = tok.encode_chat(tok.apply_chat_template([{"role": "user", "content": "one \ntwo"}]))
    assert code == 0 and prompt_tokens(err) == [len(expected)]
    monkeypatch.setattr("sys.stdin", io.StringIO("one\n\ntwo\n"))  # Ctrl-D ends too
    code, _, err = run(capsys, "chat", "-m", tiny, "-n", 2, "--temp", 0, "--ignore-eos")
    assert code == 0 and len(prompt_tokens(err)) == 2


# --- flags ------------------------------------------------------------------------------------------------


def test_version_and_defaults_in_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and re.fullmatch(r"ggtriton \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for expected in ("temperature (0: greedy) (default: 0.8)", "(default: 128)", "(default: 256)"):
        assert expected in help_text
    assert "default: None" not in help_text and "default: False" not in help_text


def test_prompt_from_file_and_stdin(tiny, tok, tmp_path, capsys, monkeypatch):
    args = ("generate", "-m", tiny, "-n", 2, "--temp", 0, "--ignore-eos")
    code, out, err = run(capsys, *args, "-p", "two\nlines")
    assert code == 0 and prompt_tokens(err) == [len(tok.encode("two\nlines"))]
    (tmp_path / "prompt.txt").write_text("two\nlines\n")
    code, out_f, err = run(capsys, *args, "-f", tmp_path / "prompt.txt")
    assert code == 0 and out_f == out and prompt_tokens(err) == [len(tok.encode("two\nlines"))]
    monkeypatch.setattr("sys.stdin", io.StringIO("two\nlines\n"))
    code, out_p, err = run(capsys, *args, "-p", "-")
    assert code == 0 and out_p == out and prompt_tokens(err) == [len(tok.encode("two\nlines"))]


def test_context_flags(tiny, capsys):
    code, _, err = run(capsys, "generate", "-m", tiny, "-p", "hi", "-n", -1, "-c", 16, "--temp", 0, "--ignore-eos")
    (n_prompt,) = prompt_tokens(err)
    assert code == 0 and f"generation: {16 - n_prompt} tokens" in err and "| length]" in err
    code, _, err = run(capsys, "generate", "-m", tiny, "-p", "hi", "-n", 1, "-c", 99999)
    assert code == 0 and "warning: -c 99999 is above the model's context of 4096 tokens; capped at 4096" in err
    code, _, err = run(capsys, "generate", "-m", tiny, "-p", "hi", "-n", 1, "-c", 0)
    assert code == 0 and "context: 4096 tokens, the model's" in err
    for bad in (["-n", "0"], ["-n", "-2"], ["-c", "-1"], ["-n", "x"]):
        with pytest.raises(SystemExit) as e:
            main(["generate", "-p", "hi", *bad])
        assert e.value.code == 2


# --- chat templates ---------------------------------------------------------------------------------------

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
RENDERED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
              "Hello.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
    "gemma": "<bos><start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
             "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n",
    "llama2": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi! [/INST] Hello. </s><s>[INST] 2+2? [/INST]",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
              "<|end_header_id|>\n\nHi!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant"
              "<|end_header_id|>\n\n",
    "mistral": "<s>[INST] Be brief.\n\nHi! [/INST]Hello.</s>[INST] 2+2? [/INST]",
    "phi3": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi!<|end|>\n<|assistant|>\nHello.<|end|>\n<|user|>\n2+2?<|end|>\n"
            "<|assistant|>\n",
}


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_builtin_templates_render_their_family_format(name):
    bos = "<bos>" if name == "gemma" else "<s>"
    assert render_chat_template(CHAT_TEMPLATES[name], CONVERSATION, bos_token=bos, eos_token="</s>") == RENDERED[name]


def test_builtin_template_of_the_real_gemma3(gemma3_path):
    f = GGUFFile(gemma3_path)
    assert "tokenizer.chat_template" not in f.metadata and builtin_chat_template(f.metadata) == "gemma"
    tok = Tokenizer(f.metadata)
    tok.chat_template = CHAT_TEMPLATES["gemma"]
    ids = tok.encode_chat(tok.apply_chat_template(HI))
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids) == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.parametrize(("metadata", "name"), [
    ({"general.architecture": "gemma2"}, "gemma"),
    ({"general.architecture": "llama", "tokenizer.ggml.tokens": ["<|start_header_id|>", "<|im_start|>"]}, "llama3"),
    ({"general.architecture": "llama", "tokenizer.ggml.tokens": ["[INST]"]}, "mistral"),
    ({"general.architecture": "phi3"}, "phi3"),
    ({"general.architecture": "llama", "tokenizer.ggml.model": "llama"}, "llama2"),
    ({"general.architecture": "llama", "tokenizer.ggml.model": "llama", "general.name": "Mistral 7B"}, "mistral"),
    ({"general.architecture": "qwen2", "tokenizer.ggml.model": "gpt2"}, "chatml"),
])
def test_builtin_template_by_vocabulary_then_architecture(metadata, name):
    assert builtin_chat_template(metadata) == name


def test_chat_without_a_template_falls_back_and_chat_template_overrides(bare, tmp_path, capsys):
    args = ("generate", "-m", bare, "--chat", "-p", "hi", "-n", 1)
    code, _, err = run(capsys, *args)
    assert code == 0 and "bare.gguf has no chat template: using the built-in 'chatml' one" in err
    tok = Tokenizer.from_gguf(bare)
    tok.chat_template = CHAT_TEMPLATES["llama3"]
    code, _, err = run(capsys, *args, "--chat-template", "llama3")
    assert code == 0 and "built-in" not in err
    assert prompt_tokens(err) == [len(tok.encode_chat(tok.apply_chat_template(HI)))]
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    code, _, err = run(capsys, *args, "--chat-template", tmp_path / "t.jinja")
    assert code == 0 and prompt_tokens(err) == [len(tok.encode("hi", add_special=False))]
    (tmp_path / "escape.jinja").write_text("{{ ''.__class__.__mro__ }}")
    code, _, err = run(capsys, *args, "--chat-template", tmp_path / "escape.jinja")
    assert code == 1 and "sandbox" in err
    code, _, err = run(capsys, *args, "--chat-template", "nope")
    assert code == 1 and "--chat-template nope: neither a file nor a built-in template (chatml, gemma" in err


# --- progress ---------------------------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


BENCH = ("bench", "--num-prompts", 2, "--input-len", 4, "--output-len", 6)


def test_bench_progress_plain_lines_off_a_terminal(tiny, capsys, monkeypatch):
    monkeypatch.setattr(Progress, "plain_every", 0.0)
    code, _, err = run(capsys, *BENCH, "-m", tiny)
    lines = [line for line in err.splitlines() if line.startswith("bench: ")]
    assert code == 0 and "\r" not in err and len(lines) >= 3
    assert lines[-1].startswith("bench: 100%, 12/12 output tokens")


def test_bench_progress_bar_on_a_terminal(tiny, capsys, monkeypatch):
    monkeypatch.setattr(Progress, "tty_every", 0.0)
    monkeypatch.setattr("sys.stderr", Terminal())
    assert main([str(a) for a in (*BENCH, "-m", tiny)]) == 0
    err = sys.stderr.getvalue()
    assert err.count("\rbench [") >= 3 and "\rbench [" + "#" * Progress.width + "] 100% 12/12 output tokens" in err


def test_generate_progress_has_no_carriage_returns_off_a_terminal(tiny, capsys):
    llm = LLM(tiny, device="cpu", kv_cache_bytes=1 << 22, warm_up=False)
    llm.generate(["a", "b"], SamplingParams(max_tokens=3, ignore_eos=True))
    err = capsys.readouterr().err
    assert "\r" not in err and err.startswith("generating: 100%, 2/2 requests, ") and err.count("\n") == 1


# --- errors -----------------------------------------------------------------------------------------------


def test_cuda_without_a_gpu_is_one_line(tiny, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run(capsys, "generate", "-m", tiny, "-p", "hi", "--device", "cuda")
    assert code == 1 and err.startswith("ggtriton: error: --device cuda: no GPU available to torch")
    assert err.count("\n") == 1
    code, _, err = run(capsys, "generate", "-m", tiny, "-p", "hi", "--device", "gpu")
    assert code == 1 and err.startswith("ggtriton: error: --device gpu: ") and err.count("\n") == 1


def test_broken_pipe_exits_quietly(tiny):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen([sys.executable, "-m", "ggtriton.runtime", "inspect", str(tiny), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO / "tests")
    proc.stdout.close()  # as `head` does once it has its lines
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 0 and err == b""


# --- batch ------------------------------------------------------------------------------------------------


def test_batch_checks_its_output_before_loading_the_model(tiny, tmp_path, capsys, monkeypatch):
    (tmp_path / "in.jsonl").write_text(json.dumps({"url": "/v1/completions", "body": {"prompt": "hi"}}) + "\n")
    monkeypatch.setattr(cli, "_llm", lambda args: pytest.fail("the model was loaded"))
    code, _, err = run(capsys, "batch", "-m", tiny, tmp_path / "in.jsonl", tmp_path / "missing" / "out.jsonl")
    assert code == 1 and "missing/out.jsonl" in err


def test_batch_lines(tiny, tmp_path, capsys):
    lines = [
        {"custom_id": "typed", "url": "/v1/completions", "body": {"prompt": "hi", "max_tokens": "5"}},
        "{not json",
        {"custom_id": "n3", "url": "/v1/completions", "body": {"prompt": "hi", "max_tokens": 3, "n": 3, "seed": 1}},
        {"custom_id": "chat", "url": "/v1/chat/completions", "body": {"messages": HI, "max_tokens": 2, "n": 2}},
        {"custom_id": "long", "url": "/v1/completions", "body": {"prompt": "x" * 5000, "max_tokens": 2}},
        {"custom_id": "n0", "url": "/v1/completions", "body": {"prompt": "hi", "n": 0}},
        {"custom_id": "stop", "url": "/v1/completions", "body": {"prompt": "hi", "stop": [1]}},
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    code, _, err = run(capsys, "batch", "-m", tiny, tmp_path / "in.jsonl", tmp_path / "out.jsonl")
    assert code == 0 and "2 requests done, 5 failed" in err
    typed, bad_json, n3, chat, long, n0, stop = map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())
    assert typed["error"]["message"] == "line 1: body.max_tokens must be an integer, got '5'"
    assert bad_json["error"]["message"].startswith("line 2: invalid JSON: ")
    assert bad_json["error"]["message"].count("line") == 1
    assert long["error"]["message"].startswith("line 5: ") and "context" in long["error"]["message"]
    assert n0["error"]["message"] == "line 6: body.n must be at least 1, got 0"
    assert stop["error"]["message"].startswith("line 7: body.stop must be")
    body = n3["response"]["body"]
    assert body["id"].startswith("cmpl-") and [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert 0 < body["usage"]["completion_tokens"] <= 9
    assert len({c["text"] for c in body["choices"]}) > 1  # seeds 1, 2, 3
    body = chat["response"]["body"]
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion" and len(body["choices"]) == 2
