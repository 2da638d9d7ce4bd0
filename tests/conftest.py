"""Shared fixtures: the real test models (required: a missing one fails, never skips), output poisoning."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter, on CPU tensors.
if "TRITON_INTERPRET" not in os.environ:
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

from ggtriton.gguf import bundled


def _require(locate) -> Path:
    try:
        return locate()
    except bundled.ModelNotInstalledError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return _require(bundled.smollm2_path)


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    return _require(bundled.gemma3_path)


@pytest.fixture(scope="session", params=["smollm2", "gemma3"])
def real_model_path(request) -> Path:
    return _require(bundled.smollm2_path if request.param == "smollm2" else bundled.gemma3_path)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every float tensor made with torch.empty starts as NaN, so an unwritten output element fails."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
