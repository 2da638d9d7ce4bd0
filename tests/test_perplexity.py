"""`ggtriton perplexity`: llama-perplexity's method, its numbers on the real models, the batched scoring under
it, and its command line.

The llama.cpp figures come from tests/fixtures/make_perplexity_fixtures.py (llama-cpp-python, logits_all)
on perplexity_text.txt (Python's LICENSE.txt), 4 chunks of 512 tokens.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ggtriton.runtime.entrypoints.cli import main
from ggtriton.runtime.entrypoints.perplexity import perplexity, read_text
from ggtriton.runtime.llm import LLM
from ggtriton.runtime.synthetic import SyntheticModel, write_synthetic_model

FIXTURES = Path(__file__).with_name("fixtures")
TEXT = FIXTURES / "perplexity_text.txt"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A random llama whose vocabulary adds BOS."""
    path = tmp_path_factory.mktemp("ppl") / "tiny.gguf"
    write_synthetic_model(path, SyntheticModel("llama", vocab=300, seed=11,
                                               metadata={"tokenizer.ggml.add_bos_token": True}))
    return path


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_ppl_agrees_with_llamacpp(model, request, device):
    fixture = json.loads((FIXTURES / "perplexity_llamacpp.json").read_text())
    expected = fixture["models"][model]
    llm = LLM(request.getfixturevalue(f"{model}_path"), device=device, dtype=torch.float32, kv_cache_bytes=0,
              warm_up=False)
    text = read_text(FIXTURES / fixture["text"])
    tokens = llm.tokenizer.encode(text)
    assert hashlib.sha256(np.asarray(tokens, "<i4").tobytes()).hexdigest() == expected["tokens_sha256"]
    running = []
    result = perplexity(llm, text, fixture["n_ctx"], fixture["chunks"], lambda i, s: running.append(s.ppl))
    print(f"{model}: PPL {result.ppl:.4f} +/- {result.ppl_stderr:.4f}, llama.cpp {expected['ppl']:.4f} "
          f"+/- {expected['ppl_stderr']:.4f}")
    assert (result.chunks, result.tokens_scored) == (fixture["chunks"], expected["tokens_scored"])
    assert result.ppl == pytest.approx(expected["ppl"], rel=5e-3)
    assert result.ppl_stderr == pytest.approx(expected["ppl_stderr"], rel=2e-2)
    assert running == pytest.approx(expected["running_ppl"], rel=2e-2)  # one chunk alone: 255 tokens


def reference_ppl(llm: LLM, text: str, n_ctx: int, n_chunks: int) -> tuple[float, float, int]:
    """The method written out chunk by chunk over `LLM.logits`: (PPL, its standard error, tokens scored)."""
    tokens = llm.tokenizer.encode(text)
    nll = []
    for i in range(min(n_chunks, len(tokens) // n_ctx)):
        chunk = tokens[i * n_ctx : (i + 1) * n_ctx]
        logp = torch.log_softmax(llm.logits([llm.tokenizer.bos_token_id] + chunk[1:]).double(), -1)
        nll += [-logp[j, chunk[j + 1]].item() for j in range(n_ctx // 2, n_ctx - 1)]
    x = np.array(nll)
    ppl = math.exp(x.mean())
    return ppl, ppl * math.sqrt((np.mean(x**2) - x.mean() ** 2) / (len(x) - 1)), len(x)


@pytest.mark.parametrize("n_ctx, budget", [(64, 100), (63, 2048), (40, 7)])
def test_batched_chunks_follow_the_method(tiny, n_ctx, budget):
    """Chunks packed several to a step, or split across steps, give the PPL of each chunk run on its own."""
    text = read_text(TEXT)[:3000]
    llm = LLM(tiny, device="cpu", max_num_batched_tokens=budget, kv_cache_bytes=0, warm_up=False)
    result = perplexity(llm, text, n_ctx, n_chunks=5)
    ppl, stderr, count = reference_ppl(llm, text, n_ctx, 5)
    assert (result.chunks, result.tokens_scored) == (5, count) and count == 5 * (n_ctx - n_ctx // 2 - 1)
    assert result.ppl == pytest.approx(ppl, rel=1e-5)
    assert result.ppl_stderr == pytest.approx(stderr, rel=1e-4)


def test_score_packs_sequences_like_logits(tiny):
    """`LLM.score` over sequences of mixed lengths, in steps smaller than some of them: every position from
    `first` on once, equal to `LLM.logits` of each sequence alone."""
    llm = LLM(tiny, device="cpu", max_num_batched_tokens=37, kv_cache_bytes=0, warm_up=False)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 300, n).tolist() for n in (5, 90, 1, 33, 60)]
    got = {i: {} for i in range(len(seqs))}
    for i, pos, logits in llm.score(seqs, first=3):
        for k, row in enumerate(logits):
            assert pos + k not in got[i]
            got[i][pos + k] = row
    for i, seq in enumerate(seqs):
        assert sorted(got[i]) == list(range(3, len(seq)))
        if len(seq) > 3:
            alone = llm.logits(seq)[3:]
            torch.testing.assert_close(torch.stack([got[i][p] for p in range(3, len(seq))]), alone,
                                       rtol=1e-5, atol=1e-5)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_like_llama_perplexity(tiny, capsys):
    code, out, err = run(capsys, "perplexity", "-m", tiny, "-f", TEXT, "-c", 128, "--chunks", 3, "--device", "cpu")
    assert code == 0, err
    llm = LLM(tiny, device="cpu", kv_cache_bytes=0, warm_up=False)
    running = []
    result = perplexity(llm, read_text(TEXT), 128, 3, lambda i, s: running.append(s.ppl))
    lines = out.splitlines()
    assert lines[0] == "".join(f"[{i + 1}]{p:.4f}," for i, p in enumerate(running))
    assert lines[1] == f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_stderr:.5f}"
    assert re.search(r"3 chunks of 128 tokens in [\d.]+ s: [\d.]+ tokens/s", err)

    code, out, err = run(capsys, "perplexity", "-m", tiny, "-f", TEXT, "-c", 128, "--chunks", 3, "--json",
                         "--device", "cpu")
    assert code == 0, err
    assert json.loads(out) == {"ppl": pytest.approx(result.ppl), "ppl_stderr": pytest.approx(result.ppl_stderr),
                               "chunks": 3, "tokens_scored": 3 * 63, "n_ctx": 128}
    assert err.startswith("".join(f"[{i + 1}]{p:.4f}," for i, p in enumerate(running)))


def test_cli_bad_input_is_one_line(tiny, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Too short for a chunk.\n")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    cases = [
        (["-f", short], "too short for one chunk of 512"),
        (["-f", latin], "not UTF-8 text"),
        (["-f", tmp_path / "missing.txt"], "missing.txt"),
        (["-f", TEXT, "-c", 8192], "above the model's context"),
    ]
    for args, message in cases:
        code, out, err = run(capsys, "perplexity", "-m", tiny, *args)
        assert code == 1 and out == ""
        assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err, err
