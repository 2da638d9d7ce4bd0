"""Generation features on a tiny synthetic model: stop strings, streaming, seeds, logprobs, abort, the
OpenAI batch format, `ggtriton bench` and the generate/chat/batch commands."""

from __future__ import annotations

import io
import json

import pytest
import torch

from ggtriton.runtime.entrypoints.bench import random_requests, run_bench
from ggtriton.runtime.entrypoints.cli import main
from ggtriton.runtime.entrypoints.openai_batch import run_batch
from ggtriton.runtime.llm import LLM
from ggtriton.runtime.sampling_params import SamplingParams
from ggtriton.runtime.synthetic import SyntheticModel, write_synthetic_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_synthetic_model(path, SyntheticModel("llama", n_layers=2, hidden=64, vocab=300, seed=3))
    return path


@pytest.fixture(scope="module")
def llm(tiny, device):
    return LLM(tiny, device=device, dtype=torch.float32, kv_cache_bytes=1 << 22, warm_up=False)


GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def test_stop_strings_cut_the_text_and_streaming_adds_up(llm):
    full = llm.generate("hello", GREEDY, use_tqdm=False)[0]
    assert len(full.token_ids) == 24 and full.finish_reason == "length"
    stop = full.text[5:8]
    assert stop and full.text.find(stop) == 5
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop, "\x00never"])
    cut = llm.generate("hello", params, use_tqdm=False)[0]
    assert cut.text == full.text[:5] and cut.finish_reason == "stop"
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)]
    streamed = "".join(llm.stream("hello", params))
    assert streamed == cut.text == llm.last_output.text
    assert "".join(llm.stream("hello", GREEDY)) == full.text


def test_seeded_sampling_reproduces_in_any_batch(llm):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)
    alone = llm.generate("abc", params, use_tqdm=False)[0].token_ids
    others = [SamplingParams(max_tokens=n, temperature=1.0, ignore_eos=True) for n in (3, 20, 7)]
    batch = llm.generate(["xyz", "abc", "hello there", "q"], [others[0], params, others[1], others[2]],
                         use_tqdm=False)
    assert batch[1].token_ids == alone
    assert [len(o.token_ids) for o in batch] == [3, 12, 20, 7]
    other_seed = llm.generate("abc", SamplingParams(max_tokens=12, temperature=1.0, seed=43, ignore_eos=True),
                              use_tqdm=False)[0].token_ids
    assert other_seed != alone


def test_logprobs_and_outputs(llm):
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=5, temperature=0, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0]
    assert out.prompt is None and out.prompt_token_ids == [1, 2, 3]
    assert len(out.logprobs) == 5
    for token, lp in zip(out.token_ids, out.logprobs):
        assert next(iter(lp)) == token and all(v <= 0 for v in lp.values()) and len(lp) in (3, 4)
        assert lp[token] == max(lp.values())  # greedy picks the most likely token


def test_bad_requests_are_clear_errors(llm):
    with pytest.raises(ValueError, match="does not fit the model's context"):
        llm.generate([[5] * 5000], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 300\)"):
        llm.generate([[300]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="2 prompts but 1 sampling params"):
        llm.generate(["a", "b"], [GREEDY], use_tqdm=False)
    assert not llm.engine.has_unfinished() and not llm.engine.requests
    assert llm.generate("ok", SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)[0].token_ids


def test_abort_releases_everything(llm):
    engine = llm.engine
    rid = engine.add_request("hello", SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.abort(rid)
    assert not engine.has_unfinished()
    engine.pop_finished()
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_openai_batch_format(llm):
    lines = [
        json.dumps({"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}}),
        "not json",
        json.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {}}),
        "",
        json.dumps({"custom_id": "cmpl-2", "method": "POST", "url": "/v1/completions",
                    "body": {"prompt": "hello", "max_tokens": 3, "seed": 1}}),
        json.dumps({"custom_id": "bad-params", "url": "/v1/completions", "body": {"prompt": "x", "top_p": 7}}),
    ]
    results = run_batch(llm, lines, "tiny")
    assert [r["custom_id"] for r in results] == ["chat-1", None, "bad-url", "cmpl-2", "bad-params"]
    chat, bad_json, bad_url, cmpl, bad_params = results
    body = chat["response"]["body"]
    assert chat["error"] is None and body["object"] == "chat.completion"
    assert body["usage"]["completion_tokens"] <= 4 and isinstance(body["choices"][0]["message"]["content"], str)
    assert cmpl["response"]["body"]["object"] == "text_completion"
    assert "line 2" in bad_json["error"]["message"] and bad_json["response"] is None
    assert "url must be one of" in bad_url["error"]["message"]
    assert "top_p" in bad_params["error"]["message"]


def test_bench_report(llm):
    requests = random_requests(llm, 6, input_len=10, output_len=5, seed=0)
    report = run_bench(llm, requests)
    assert report["requests"] == 6 and report["output_tokens"] == 30
    assert report["prompt_tokens"] == sum(len(r.prompt) for r in requests)
    assert report["output_tokens_per_s"] > 0 and report["ttft_ms"]["p50"] > 0 and report["itl_ms"]["p99"] > 0


def test_generate_chat_and_batch_commands(tiny, tmp_path, capsys, monkeypatch):
    code = main(["generate", "-m", str(tiny), "-p", "hello", "-n", "6", "--temp", "0", "--ignore-eos"])
    out, err = capsys.readouterr()
    assert code == 0 and out
    assert "[prompt: 5 tokens" in err and "generation: 6 tokens" in err and "tokens/s" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nagain\n\n"))
    assert main(["chat", "-m", str(tiny), "-n", "4", "--temp", "0"]) == 0
    assert capsys.readouterr().err.count("generation:") == 2
    requests = tmp_path / "in.jsonl"
    requests.write_text(json.dumps({"custom_id": "a", "url": "/v1/completions",
                                    "body": {"prompt": "hi", "max_tokens": 2}}) + "\n")
    assert main(["batch", "-m", str(tiny), str(requests), str(tmp_path / "out.jsonl")]) == 0
    assert json.loads((tmp_path / "out.jsonl").read_text())["custom_id"] == "a"
    assert main(["bench", "-m", str(tiny), "--num-prompts", "3", "--input-len", "8", "--output-len", "4",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["output_tokens"] == 12
    assert main(["generate", "-m", str(tiny), "-md", str(tiny), "--draft-max", "3", "--draft-fixed", "-p", "hello",
                 "-n", "9", "--temp", "0", "--ignore-eos"]) == 0
    assert "draft acceptance 100%" in capsys.readouterr().err  # the model drafting for itself
    assert main(["generate", "-m", str(tmp_path / "missing.gguf"), "-p", "x"]) == 1
    assert "cannot open" in capsys.readouterr().err


def test_graph_replay_with_padded_buckets_equals_eager(tiny, monkeypatch):
    """The decode-graph path's static buffers and padding, run on CPU with the capture replaced by
    recording the step function (CUDA graphs themselves need a GPU), over the torch ops (graphs are made only
    over kernels: the cpu backend's step caches key on the step's tensors, which a graph's buffers reuse)."""
    from ggtriton.runtime.engine import model_runner

    def record(self, step):
        out = step()
        return (lambda: out.copy_(step())), out

    monkeypatch.setattr(model_runner.ModelRunner, "_record", record)
    prompts = ["hello", "a longer prompt here", "xyz"]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    eager = LLM(tiny, device="cpu", backend="torch").generate(prompts, params, use_tqdm=False)
    graphed = LLM(tiny, device="cpu", backend="torch")
    graphed.engine.runner.cuda_graphs = True
    outputs = graphed.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in eager]
    assert sorted(graphed.engine.runner._graphs) == [(4, 1)]  # 3 sequences padded to the bucket of 4
    graphed._warm_up(every_shape=True)  # the steps a GPU engine runs at start-up, into throwaway caches
    single = graphed.generate("hello", params, use_tqdm=False)[0]
    assert single.token_ids == eager[0].token_ids and sorted(graphed.engine.runner._graphs) == [(1, 1), (4, 1)]


@pytest.mark.parametrize("backend, temperature", [("torch", 0.0), ("torch", 0.8), ("triton", 0.0)])
def test_verify_and_draft_graphs_equal_eager(tiny, monkeypatch, backend, temperature):
    """Speculative steps through graphs of q tokens per sequence (the target's verify pass, padded to
    1 + the most drafts; the draft's steps and catch-ups): the same tokens as eager, greedy and seeded, on
    the torch ops and on the Triton kernels (the interpreter), whose padding sequences attend to nothing."""
    from ggtriton.runtime.engine import model_runner

    def record(self, step):
        out = step()
        return (lambda: out.copy_(step())), out

    monkeypatch.setattr(model_runner.ModelRunner, "_record", record)
    prompts = ["hello", "a longer prompt here", "xyz"]
    params = [SamplingParams(max_tokens=n, temperature=temperature, seed=5, ignore_eos=True) for n in (9, 12, 7)]
    # the model drafting for itself never pays by the cost model: the lookahead is fixed
    opts = dict(device="cpu", backend=backend, dtype=torch.float32, draft_model=tiny, num_speculative_tokens=3,
                adaptive_speculation=False, kv_cache_bytes=1 << 22)
    eager = LLM(tiny, **opts).generate(prompts, params, use_tqdm=False)
    graphed = LLM(tiny, **opts)
    for runner in graphed._runners:
        runner.cuda_graphs = True
    outputs = graphed.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in eager]
    verify = {q for _, q in graphed.runner._graphs}
    assert max(verify) == 4, verify  # 1 + 3 drafts per sequence
    assert {q for _, q in graphed.draft_runner._graphs} == {1, 2}  # draft steps; catch-ups after all accepted
