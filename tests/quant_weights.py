"""Random GGUF weights for the kernel tests (imported by them: conftest puts this folder on the path)."""

from __future__ import annotations

import numpy as np
import torch

from ggtriton.gguf import TYPE_TRAITS, GGMLType
from ggtriton.gguf.quantize import random_blocks

FLOAT_WEIGHTS = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}


def weight(ggml_type: GGMLType, n: int, k: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Raw bytes of an (n, k) weight of ordinary values: random valid blocks with scales of N(0, 2^-7)."""
    if ggml_type in FLOAT_WEIGHTS:
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(FLOAT_WEIGHTS[ggml_type])
        return w.view(torch.uint8).reshape(-1).to(device)
    rng = np.random.default_rng(seed)
    blocks = random_blocks(ggml_type, n * k // TYPE_TRAITS[ggml_type].block_elements, rng)
    if ggml_type == GGMLType.MXFP4:  # E8M0 scales 2^-9..2^0 instead of up to 2^127, which overflow
        blocks[:, 0] = rng.integers(119, 129, len(blocks))
    return torch.from_numpy(blocks.reshape(-1)).to(device)
