"""What a GPU run depends on, shown without one where the CPU can show it: one device name for every
tensor and generator, decode graphs only over kernels that never sync, split-K sized on the device,
float32 logits, a warm start that covers every step shape, a KV cache sized for everything else that
lives beside it, a bounded draft catch-up, and the per-GPU kernel cache."""

from __future__ import annotations

import importlib
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import triton

from ggtriton import kernels
from ggtriton.gguf import TYPE_TRAITS, GGMLType
from ggtriton.gguf.quantize import random_blocks
from ggtriton.gguf.quants import dequantize
from ggtriton.kernels.cache import device_cache_dir, use_cache_dir
from ggtriton.kernels.qmatmul import PATHS, _choose_path, path_takes, qmatmul
from ggtriton.runtime.engine import model_runner
from ggtriton.runtime.engine.model_runner import ModelRunner
from ggtriton.runtime.entrypoints.cli import build_parser
from ggtriton.runtime.llm import LLM, resolve_device
from ggtriton.runtime.models.ops import Ops
from ggtriton.runtime.sampling_params import SamplingParams
from ggtriton.runtime.synthetic import SyntheticModel, write_synthetic_model

paged_decode_module = importlib.import_module("ggtriton.kernels.paged_decode")  # the module, not the function


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_synthetic_model(path, SyntheticModel("llama", n_layers=2, hidden=64, vocab=300, seed=5,
                                               weight_type=GGMLType.Q8_0))
    return path


def test_cuda_without_index_resolves_to_the_current_gpu(monkeypatch):
    """A seeded request's generator is made on the engine's device and compared with the logits' device:
    both must say cuda:N, never a bare "cuda"."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device(None) == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("backend, graphs", [("triton", True), ("torch", False)])
def test_decode_graphs_only_over_the_triton_kernels(backend, graphs):
    """The torch reference ops read lengths back to the host (a sync capture forbids): they run eagerly."""
    model = SimpleNamespace(ops=Ops(backend, torch.bfloat16))
    config = SimpleNamespace(vocab_size=1000, hidden=64)
    runner = ModelRunner(model, config, torch.device("cuda", 0), 16, 4096, cuda_graphs=True, graph_tokens=3)
    assert runner.cuda_graphs is graphs
    assert runner.graph_sizes(100) == ([1, 2, 4, 8, 16, 32, 64, 128] if graphs else [])
    # buckets 1, 2, 4 for 1, 2 and 3 tokens per sequence: bfloat16 hidden states of 7 * (1 + 2 + 3) rows
    assert runner.graph_keys(3) == ([(b, q) for q in (1, 2, 3) for b in (1, 2, 4)] if graphs else [])
    assert runner.graph_output_bytes(3) == (7 * 6 * 64 * 2 if graphs else 0)
    assert not ModelRunner(model, config, torch.device("cpu"), 16, 4096, cuda_graphs=True).cuda_graphs


def test_torch_backend_dequantizes_each_weight_once(tiny, monkeypatch):
    """No step of the reference path dequantizes: every weight is kept dense from load on, on any device."""
    llm = LLM(tiny, device="cpu", backend="torch", kv_cache_bytes=1 << 22)
    calls = []
    dequantize_weight = Ops.dequantize
    monkeypatch.setattr(Ops, "dequantize", lambda self, *a, **k: calls.append(a) or dequantize_weight(self, *a, **k))
    llm.generate(["hello", "a longer prompt"], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    llm.logits([1, 2, 3])
    assert calls == []


def _split_partials(monkeypatch) -> list[torch.Tensor]:
    """Spy on the split decode kernel: the per-split log-sum-exps its last programs combined."""
    seen = []
    kernel = paged_decode_module._paged_decode_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(q, k_cache, v_cache, o, lse, *args, **kwargs):
                kernel[grid](q, k_cache, v_cache, o, lse, *args, **kwargs)
                seen.append(lse.clone())
            return launch

    monkeypatch.setattr(paged_decode_module, "_paged_decode_kernel", Spy())
    return seen


@pytest.mark.usefixtures("poisoned_outputs")
def test_decode_splits_follow_each_sequence_length(monkeypatch):
    """The split count is fixed by the launch, each sequence cuts its own keys into as many of them as its
    length fills (at least min_split_keys each): a short context next to a long one, or under a graph
    captured for the model's whole context, still spreads over several splits, and empty splits are
    skipped when the splits are combined. Interpreter only: the spy needs the launch to run on CPU tensors."""
    if torch.cuda.is_available():
        pytest.skip("inspects the interpreter's split sizes (16 keys at least per split)")
    lse_seen = _split_partials(monkeypatch)
    g = torch.Generator().manual_seed(0)
    lens = [40, 256, 1, 0]  # 3 splits of 16 keys, all 8 of 32, 1, none (a padding row)
    pages = 16
    k_cache = torch.randn(len(lens) * pages, 16, 2, 64, generator=g)
    v_cache = torch.randn(len(lens) * pages, 16, 2, 64, generator=g)
    tables = torch.arange(len(lens) * pages, dtype=torch.int32).reshape(len(lens), pages)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(len(lens), 4, 64, generator=g)
    out = kernels.paged_decode(q, k_cache, v_cache, tables, context_lens, scale=0.125, num_splits=8)
    ref = paged_decode_module.paged_decode_ref(q, k_cache, v_cache, tables, context_lens, scale=0.125)
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5
    assert torch.equal(out[3], torch.zeros_like(out[3]))
    (lse,) = lse_seen
    used = torch.isfinite(lse).sum(dim=2)  # [seq, head]: splits that held keys
    assert used[:, 0].tolist() == [3, 8, 1, 0]


# every path with the types it takes (the word decoders' types: gemv, gemm, dequant; Q4_1: the element decoders')
@pytest.mark.parametrize(("ggml_type", "path"), [(t, p) for t in (GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q4_1)
                                                 for p in PATHS if path_takes(p, t, 5)], ids=str)
def test_float32_output_from_16_bit_activations(device, ggml_type, path):
    """Logits keep float32 precision: qmatmul stores its float32 sums as float32 when asked, and in x's
    dtype they are those sums rounded."""
    n, k, m = 48, 512, 5
    blocks = n * k // TYPE_TRAITS[ggml_type].block_elements
    raw = torch.from_numpy(random_blocks(ggml_type, blocks, np.random.default_rng(1)).reshape(-1)).to(device)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(m, k, generator=g).to(device, torch.bfloat16)
    w = dequantize(raw.cpu(), ggml_type, (n, k)).double()
    ref = x.cpu().double() @ w.t()
    wide = qmatmul(x, raw, ggml_type, (n, k), path=path, out_dtype=torch.float32)
    narrow = qmatmul(x, raw, ggml_type, (n, k), path=path)
    assert wide.dtype == torch.float32 and narrow.dtype == torch.bfloat16
    tol = 1e-5 if device.type == "cpu" else 1e-2  # a GPU tensor core takes the weights as bfloat16
    assert ((wide.cpu().double() - ref).norm() / ref.norm()).item() <= tol
    assert ((narrow.cpu().double() - ref).norm() / ref.norm()).item() <= 1e-2


def test_logits_are_float32_not_rounded_bfloat16(tiny, device):
    llm = LLM(tiny, device=device, backend="triton", dtype=torch.bfloat16, kv_cache_bytes=1 << 22,
              warm_up=False)
    logits = llm.logits([5, 9, 77, 3])
    assert logits.dtype == torch.float32
    rounded = logits.to(torch.bfloat16).float()
    assert (rounded != logits).float().mean() > 0.5, "logits carry only bfloat16 precision"


def _spy_qmatmul(monkeypatch) -> set[tuple]:
    """The compile keys of every qmatmul launch: path, M's tuning bucket, N, K, type, dtypes."""
    keys = set()
    real = kernels.qmatmul

    def spy(x, raw, ggml_type, shape, **kwargs):
        m = x.shape[0]
        keys.add((_choose_path(GGMLType(ggml_type), m, shape[0], shape[1], x.device),
                  min(triton.next_power_of_2(m), 1024), *shape, int(ggml_type), x.dtype, kwargs.get("out_dtype")))
        return real(x, raw, ggml_type, shape, **kwargs)

    monkeypatch.setattr(kernels, "qmatmul", spy)
    return keys


def test_warm_up_compiles_every_shape_requests_use(tmp_path, device, monkeypatch, capsys):
    """Every qmatmul key a mixed workload launches (prefill chunks beside decodes, several batch sizes,
    scoring) was launched by the warm-up first: no request pays for a compile."""
    path = tmp_path / "one-layer.gguf"
    write_synthetic_model(path, SyntheticModel("llama", n_layers=1, hidden=64, vocab=300, seed=6,
                                               weight_type=GGMLType.Q8_0))
    keys = _spy_qmatmul(monkeypatch)
    llm = LLM(path, device=device, backend="triton", max_num_batched_tokens=12, max_num_seqs=3,
              kv_cache_bytes=1 << 22, warm_up=True)
    assert "warm-up: kernels compiled and tuned for 7 prefill sizes" in capsys.readouterr().err
    warmed = set(keys)
    keys.clear()
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (3, 5, 2)]
    llm.generate(["hello there", "a", "xy z w"], params, use_tqdm=False)
    llm.logits(list(range(17)))
    assert keys and keys <= warmed, f"compiled during requests: {sorted(keys - warmed, key=str)}"


def test_warm_up_sizes_the_cache_around_everything_else(tiny, monkeypatch):
    """The KV budget leaves room for the largest of the step, decode and sampler peaks, plus what step
    graphs keep: their hidden states and a pool as large as their largest step (per model)."""
    llm = LLM(tiny, device="cpu", kv_cache_bytes=1 << 22, max_num_seqs=3)
    peaks = iter([7000, 500])  # the prefill steps, the decode step
    monkeypatch.setattr(model_runner, "peak_bytes", lambda device, fn: (fn(), next(peaks))[1])
    monkeypatch.setattr(ModelRunner, "sampling_peak", lambda self, rows: 100)
    llm.runner.cuda_graphs = True
    graphs = (1 + 2 + 4) * llm.config.hidden * llm.ops.dtype.itemsize
    assert llm.runner.graph_output_bytes(3) == graphs
    assert llm._warm_up(every_shape=False) == 7000 + graphs + 500


def test_draft_catch_up_stays_within_the_step_budget(tiny, monkeypatch):
    """Prompts that finish prefill in one step are caught up by the draft in forwards of at most
    max_num_batched_tokens tokens, with the same output as one unbounded forward would give."""
    prompts = [" ".join(["word"] * n) for n in (30, 9, 21, 14)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    opts = dict(device="cpu", kv_cache_bytes=1 << 22)
    alone = LLM(tiny, **opts).generate(prompts, params, use_tqdm=False)
    spec = LLM(tiny, **opts, draft_model=tiny, num_speculative_tokens=3, max_num_batched_tokens=32,
               adaptive_speculation=False)
    forwards = []
    run = ModelRunner.run
    monkeypatch.setattr(ModelRunner, "run", lambda self, chunks, *rest: forwards.append(
        (self is spec.draft_runner, sum(len(c.tokens) for c in chunks))) or run(self, chunks, *rest))
    outputs = spec.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in alone]
    draft = [n for is_draft, n in forwards if is_draft]
    assert max(draft) <= 32 and sum(draft) >= sum(len(o.prompt_token_ids) for o in outputs)


def test_kernel_cache_is_kept_per_gpu_model(tmp_path, monkeypatch):
    """Compiled kernels and autotune timings go to <cache_dir>/<device name>/triton."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200 (141 GB)")
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setattr(triton.knobs.cache, "dir", triton.knobs.cache.dir)  # restored after the test
    path = use_cache_dir(tmp_path, torch.device("cuda", 0))
    assert path == tmp_path / "NVIDIA-H200-141-GB" / "triton" and path.is_dir()
    assert os.environ["TRITON_CACHE_DIR"] == str(path) and triton.knobs.cache.dir == str(path)
    monkeypatch.setenv("GGTRITON_CACHE_DIR", str(tmp_path / "env"))
    assert device_cache_dir(None, torch.device("cuda", 0)).parent.parent == tmp_path / "env"
    args = build_parser().parse_args(["generate", "-p", "x", "--cache-dir", str(tmp_path)])
    assert args.cache_dir == str(tmp_path)
