"""The real models against llama.cpp: next-token distributions at every position of two long texts.

The fixtures (tests/fixtures/make_logit_fixtures.py) hold llama.cpp's top-64 log-probabilities per
position. llama.cpp rounds activations to 8 bits inside its quantized matmuls, so an exact float32
implementation agrees on the top-1 token at >= 95 % of positions with mean KL divergence <= 5e-3.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ggtriton.runtime.llm import LLM

FIXTURES = Path(__file__).with_name("fixtures")


def agreement(logits: torch.Tensor, top_ids: np.ndarray, top_logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position: our top-1 equals llama.cpp's, and KL(llama.cpp || ours).

    With only llama.cpp's top-64 known, the KL is taken over those 64 tokens plus one bucket for the
    rest of the vocabulary: a lower bound of the full KL that misses only the tail's shape.
    """
    top1, kl = [], []
    step = max(1, (1 << 20) // logits.shape[1])  # rows of 4 MB at most: temporaries that stay in the caches
    for start in range(0, len(logits), step):
        rows = logits[start : start + step]
        ids = torch.from_numpy(top_ids[start : start + step]).long()
        # the log-sum-exp in float32 (exact to about 1e-7), then the 64 log-probs needed in float64
        q = rows.gather(1, ids).double() - torch.logsumexp(rows, -1).double()[:, None]
        logp = torch.from_numpy(top_logprobs[start : start + step]).double()
        p = logp.exp()
        rest_p = (1 - p.sum(-1)).clamp_min(1e-12)
        rest_q = (1 - q.exp().sum(-1)).clamp_min(1e-12)
        kl.append((p * (logp - q)).sum(-1) + rest_p * (rest_p.log() - rest_q.log()))
        top1.append(rows.argmax(-1) == ids[:, 0])
    return torch.cat(top1).numpy(), torch.cat(kl).numpy()


@pytest.mark.parametrize("model, backend", [("smollm2", None), ("gemma3", None), ("smollm2", "cpu"),
                                          ("gemma3", "cpu")])
def test_logits_agree_with_llamacpp(model, backend, request, device):
    """backend None: the device's float32 path (on CPU the exact reference ops, on a GPU the Triton kernels);
    "cpu": the fast CPU path, the default on CPU (packed int4 and bfloat16 weights, runtime/models/cpu_weights.py,
    on the CPU whatever the device), which must hold the same bounds."""
    path = request.getfixturevalue(f"{model}_path")
    fixture = np.load(FIXTURES / f"logits_{model}.npz")
    if backend is None:
        backend = "torch" if device.type == "cpu" else "triton"
    llm = LLM(path, device="cpu" if backend == "cpu" else device, backend=backend, dtype=torch.float32, warm_up=False)
    all_top1, all_kl = [], []
    for i in (0, 1):
        tokens = fixture[f"tokens{i}"].tolist()
        assert len(tokens) >= 1000
        top1, kl = agreement(llm.logits(tokens), fixture[f"top_ids{i}"], fixture[f"top_logprobs{i}"])
        print(f"{model} text {i}: {len(tokens)} positions, top-1 {top1.mean():.4f}, mean KL {kl.mean():.2e}")
        all_top1.append(top1)
        all_kl.append(kl)
    top1, kl = np.concatenate(all_top1), np.concatenate(all_kl)
    print(f"{model}: {len(top1)} positions, top-1 {top1.mean():.4f}, mean KL {kl.mean():.2e}")
    assert top1.mean() >= 0.95
    assert kl.mean() <= 5e-3
