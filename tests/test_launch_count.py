"""Kernel launches per decode step: each Triton launch of one decode step of a synthetic model counted,
on `device`. A llama layer on the Triton backend launches q/k/v, rope_kv_store, attention, attn_output (+ residual
+ ffn_norm, left pending), gate/up (+ act) and ffn_down (+ residual + the next attn_norm): 6, where separate
norms and activation took 9; a step adds the embedding, the first and the final norm and the output product. The
counts are exact: more launches fail here."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from ggtriton.gguf import GGMLType
from ggtriton.runtime.engine.batch import ForwardBatch
from ggtriton.runtime.llm import LLM
from ggtriton.runtime.synthetic import SyntheticModel, write_synthetic_model

LAYERS = 2
LLAMA = {"_dequant_words_kernel": 1, "_rmsnorm_kernel": 2, "_qgemv_kernel": 4 * LAYERS + 1,
         "_rope_kv_store_kernel": LAYERS, "_paged_decode_kernel": LAYERS}
# (model, sequences decoded at once, launches by kernel)
CASES = {
    "llama-q4_k": (SyntheticModel("llama", n_layers=LAYERS, hidden=256, n_heads=8, n_kv_heads=2, head_dim=32,
                                  ffn=256, weight_type=GGMLType.Q4_K), 1, LLAMA),
    # three rows of x: the tensor-core GEMV
    "llama-q8_0-batch": (SyntheticModel("llama", n_layers=LAYERS, hidden=128, ffn=192, weight_type=GGMLType.Q8_0),
                         3, LLAMA),
    # post-norms keep the separate norms (4 per layer); the activation is still fused
    "gemma2-q8_0": (SyntheticModel("gemma2", n_layers=LAYERS, sliding_window=8, ffn=128,
                                   weight_type=GGMLType.Q8_0), 1,
                    {"_dequant_words_kernel": 1, "_rmsnorm_kernel": 4 * LAYERS + 1, "_qgemv_kernel": 4 * LAYERS + 1,
                     "_rope_kv_store_kernel": LAYERS, "_paged_decode_kernel": LAYERS}),
}


@pytest.fixture
def launches(monkeypatch) -> Counter:
    """Launches by kernel name from now on (the interpreter's, or compiled ones on a GPU)."""
    counts = Counter()
    for cls in (InterpretedFunction, JITFunction):
        def counted(fn, *args, grid, warmup, run=cls.run, **kwargs):
            if not warmup:
                counts[fn.fn.__name__] += 1
            return run(fn, *args, grid=grid, warmup=warmup, **kwargs)
        monkeypatch.setattr(cls, "run", counted)
    return counts


@pytest.mark.parametrize("name", CASES)
def test_launches_per_decode_step(name, launches, tmp_path, device):
    model, seqs, expected = CASES[name]
    write_synthetic_model(tmp_path / "m.gguf", model)
    llm = LLM(tmp_path / "m.gguf", device=device, dtype=torch.float32, warm_up=False, backend="triton")
    bs = llm.block_size
    kv = llm.runner.kv_layout(2 * seqs).allocate(llm.device)
    tables = [[2 * s, 2 * s + 1] for s in range(seqs)]
    # a decode step after 3 cached positions (whatever the cache holds: only launches are counted)
    step = ForwardBatch.build([[7]] * seqs, [3] * seqs, tables, bs, llm.device)
    assert step.is_decode
    llm.model.logits(llm.model.forward(step, kv))  # on a GPU, autotuning launches configs: count a tuned step
    launches.clear()
    llm.model.logits(llm.model.forward(step, kv))
    assert dict(launches) == expected
