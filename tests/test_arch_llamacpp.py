"""Every architecture against llama.cpp itself, on tiny random-weight F32 GGUFs.

tests/fixtures/make_arch_fixtures.py ran llama.cpp (llama-cpp-python) on each case's GGUF; the GGUF is
written again here from the same seeded `SyntheticModel`. With float32 weights and a float32 KV cache both
sides compute the exact float32 forward, so the next-token distributions agree to mean KL divergence
<= 1e-5 (measured: about 1e-7 and below). A case is run at llama.cpp's context size, as `max_model_len`:
for LongRoPE the context picks the rope factors.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from ggtriton.runtime.llm import LLM
from ggtriton.runtime.synthetic import write_synthetic_model

FIXTURES = Path(__file__).with_name("fixtures")


def fixture_script(name: str):
    """The fixture-making script tests/fixtures/`name`.py, as a module (its cases are the tests' too)."""
    spec = importlib.util.spec_from_file_location(name, FIXTURES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CASES = fixture_script("make_arch_fixtures").CASES


@pytest.fixture(scope="module")
def fixture():
    return np.load(FIXTURES / "arch_logits.npz")


def mean_kl(ref: np.ndarray, logits: torch.Tensor) -> float:
    """Mean over positions of KL(llama.cpp || ours), over the whole vocabulary in float64."""
    logp = torch.log_softmax(torch.from_numpy(ref).double(), -1)
    logq = torch.log_softmax(logits.double(), -1)
    return float((logp.exp() * (logp - logq)).sum(-1).mean())


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("reference", [False, True])
def test_logits_agree_with_llamacpp(name, reference, fixture, tmp_path, device):
    """The device's default path, and (`reference`) the float32 reference ops (on CPU both are float32 here: the
    default cpu backend keeps float weights float32)."""
    model, n_ctx = CASES[name]
    assert int(fixture[f"{name}.n_ctx"]) == n_ctx, "stale fixture: run tests/fixtures/make_arch_fixtures.py"
    path = tmp_path / f"{name}.gguf"
    write_synthetic_model(path, model)
    llm = LLM(path, device=device, backend="torch" if reference else None, dtype=torch.float32, warm_up=False,
              max_model_len=n_ctx)
    ref = fixture[f"{name}.logits"]
    kl = mean_kl(ref, llm.logits(fixture[f"{name}.tokens"].tolist()))
    print(f"{name}: mean KL {kl:.2e} (llama-cpp-python {fixture['llama_cpp_python_version']})")
    assert kl <= 1e-5


def test_longrope_context_selects_the_factors(fixture):
    # Guards the LongRoPE cases above: the two context sizes must give different answers in llama.cpp too.
    short, long = fixture["phi3-longrope-short.logits"], fixture["phi3-longrope-long.logits"]
    assert mean_kl(short, torch.from_numpy(long)) > 1e-3


def test_synthetic_files_are_deterministic(tmp_path):
    model, _ = CASES["phi3-longrope-long"]
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write_synthetic_model(a, model)
    write_synthetic_model(b, model)
    assert a.read_bytes() == b.read_bytes()
