"""Tensor parallelism over gloo on CPU: TP=2 (this process and one worker) against TP=1 on the same file, the
shapes that do not split, and a worker's failure."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal

import pytest
import torch

from ggtriton.gguf import GGMLType, GGUFFile
from ggtriton.runtime.config import ModelConfig, RopeConfig
from ggtriton.runtime.distributed import check_tensor_parallel, check_weights
from ggtriton.runtime.distributed.shard import ShardPlan
from ggtriton.runtime.llm import LLM
from ggtriton.runtime.sampling_params import SamplingParams
from ggtriton.runtime.synthetic import SyntheticModel, write_synthetic_model

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(autouse=True)
def time_limit():
    """Each test ends within 300 s (many times its time on an idle 2-core machine, for a loaded one), whatever
    blocks (the workers end with this process in any case)."""
    def expire(signum, frame):
        raise TimeoutError("the test ran past 300 s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(300)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _no_children() -> None:
    """Every worker process has ended (joined: no zombie, no orphan)."""
    assert multiprocessing.active_children() == []


def _compare(path, prompts: list[list[int]], tol: float) -> float:
    """Max |logits TP=2 - TP=1| over the first prompt; greedy generations of all prompts equal. On the float32
    reference ops: the split sums of the row-parallel products are the only difference."""
    one = LLM(path, device="cpu", backend="torch")
    ref_logits = one.logits(prompts[0])
    ref = [o.token_ids for o in one.generate(prompts, GREEDY, use_tqdm=False)]
    with LLM(path, device="cpu", backend="torch", tensor_parallel_size=2) as two:
        logits = two.logits(prompts[0])
        got = [o.token_ids for o in two.generate(prompts, GREEDY, use_tqdm=False)]
    _no_children()
    diff = (logits - ref_logits).abs().max().item()
    assert diff <= tol * ref_logits.abs().max().item(), diff
    assert got == ref
    return diff


@pytest.mark.parametrize("model", [
    # GQA with a single KV head: it is replicated, each rank's 2 q heads read it; untied lm_head; Q8_0 blocks
    SyntheticModel("llama", hidden=64, n_heads=4, n_kv_heads=1, head_dim=16, ffn=64, vocab=301, seed=11,
                   tie_embeddings=False, weight_type=GGMLType.Q8_0),
    # fused qkv and gate/up (phi3), one KV head per rank, a vocabulary that does not split evenly
    SyntheticModel("phi3", hidden=48, n_heads=6, n_kv_heads=2, head_dim=8, ffn=40, vocab=263, seed=12),
    # qk-norm, biases, a mixture of experts (replicated on every rank)
    SyntheticModel("qwen2moe", hidden=32, n_heads=2, n_kv_heads=2, head_dim=16, ffn=32, vocab=270, seed=13,
                   expert_ffn=16, shared_expert_ffn=24),
], ids=["llama-kv1-q8_0", "phi3-fused", "qwen2moe"])
def test_tp2_matches_tp1(tmp_path, model):
    path = tmp_path / "m.gguf"
    write_synthetic_model(path, model)
    g = torch.Generator().manual_seed(model.seed)
    prompts = [torch.randint(0, model.vocab, (n,), generator=g).tolist() for n in (11, 3, 7)]
    _compare(path, prompts, tol=1e-5)


def test_tp2_gemma3_logits(gemma3_path):
    """The real Gemma-3-270M: 4 q heads on 1 KV head (replicated), Q4_K_M's mix of block types (float32
    reference ops)."""
    ids = [2, 818, 5279, 529, 7001, 563, 9079, 236764, 532, 506]
    one = LLM(gemma3_path, device="cpu", backend="torch", max_model_len=64)
    ref = one.logits(ids)
    del one
    with LLM(gemma3_path, device="cpu", backend="torch", max_model_len=64, tensor_parallel_size=2) as two:
        got = two.logits(ids)
    _no_children()
    diff = (got - ref).abs().max().item()
    print(f"gemma3 TP=2 vs TP=1: max |logit diff| {diff:.3g} (max |logit| {ref.abs().max().item():.3g})")
    assert diff <= 1e-5 * ref.abs().max().item()
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_smollm2_heads_do_not_split(smollm2_path):
    f = GGUFFile(smollm2_path)
    config = ModelConfig.from_gguf(f)
    with pytest.raises(ValueError, match="9 query heads \\(3 KV heads\\).*tensor_parallel_size 2"):
        check_tensor_parallel(config, 2)
    check_tensor_parallel(config, 3)  # 9 q heads and 3 KV heads split 3 ways
    with pytest.raises(ValueError, match="9 query heads"):
        LLM(smollm2_path, device="cpu", tensor_parallel_size=2)  # before any process starts
    _no_children()


def test_unsupported_shapes(tmp_path):
    path = tmp_path / "m.gguf"
    # Q4_K's blocks are 256 wide: attn_output's 2 heads of 64 columns per rank cut them
    write_synthetic_model(path, SyntheticModel("llama", hidden=256, n_heads=4, n_kv_heads=4, head_dim=64, ffn=512,
                                               vocab=300, n_layers=1, weight_type=GGMLType.Q4_K))
    f = GGUFFile(path)
    config = ModelConfig.from_gguf(f)
    with pytest.raises(ValueError, match="'blk.0.attn_output.weight' \\(Q4_K.*128 columns per rank.*256"):
        check_weights(f, config, 2)
    with pytest.raises(ValueError, match="3 KV heads \\(12 query heads\\).*a multiple or a divisor"):
        check_tensor_parallel(dataclasses.replace(config, n_heads=12, n_kv_heads=3), 2)
    with pytest.raises(ValueError, match="positive integer"):
        check_tensor_parallel(config, 0)


def test_kv_heads_replicated_to_their_q_heads():
    """With fewer KV heads than ranks, each rank holds the KV head its q heads are grouped on."""
    cfg = ModelConfig(arch="llama", n_layers=1, hidden=64, n_heads=8, n_kv_heads=2, head_dim=8, v_head_dim=8, ffn=64,
                      vocab_size=100, context_length=64, rms_eps=1e-6, rope=RopeConfig(8, 1e4, False))
    plans = [ShardPlan(cfg, 4, r) for r in range(4)]
    assert [list(p.q_heads) for p in plans] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [list(p.kv_heads) for p in plans] == [[0], [0], [1], [1]]  # q heads 0-3 read KV head 0, 4-7 head 1
    assert [list(ShardPlan(cfg, 2, r).kv_heads) for r in range(2)] == [[0], [1]]


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_synthetic_model(path, SyntheticModel("llama", hidden=32, n_heads=2, n_kv_heads=2, head_dim=16, ffn=32,
                                               vocab=300, seed=3))
    return path


def test_killed_worker_ends_the_job(tiny):
    llm = LLM(tiny, device="cpu", tensor_parallel_size=2)
    (worker,) = llm._workers.procs
    os.kill(worker.pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="worker 1 exited with status -9"):
        llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
    _no_children()
    with pytest.raises(RuntimeError, match="workers have stopped"):
        llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)


def test_failing_worker_reports_its_error(tiny):
    llm = LLM(tiny, device="cpu", tensor_parallel_size=2)
    with llm._workers.step(("no such step",)):  # the worker raises, reports and exits
        pass
    with pytest.raises(RuntimeError, match="(?s)worker 1 failed:.*unknown step message 'no such step'"):
        llm.logits([1, 2, 3])
    _no_children()
