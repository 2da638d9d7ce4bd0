"""Model weights as they sit in the GGUF file: raw blocks plus their type and shape."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from ggtriton.gguf import GGMLType, GGUFFile


@dataclass(eq=False)
class QuantWeight:
    """One tensor's raw GGUF blocks (uint8, on the compute device), `shape` in PyTorch order.

    `planar`: raw holds the blocks in the planar layout of `ggtriton.kernels.planar` (the Triton backend relays
    the 2-byte aligned formats so, see `Ops.preload`). `dense` caches the dequantized tensor: the torch backend
    keeps every weight so (in the activation dtype), and small vectors (norms, biases) are kept in float32 by
    either backend.
    """

    name: str
    raw: torch.Tensor
    ggml_type: GGMLType
    shape: tuple[int, ...]
    dense: torch.Tensor | None = field(default=None, repr=False)
    planar: bool = False

    @property
    def rows(self) -> int:
        return self.shape[0]


def load_weights(f: GGUFFile, device: torch.device) -> dict[str, QuantWeight]:
    """Every tensor of `f`, its blocks copied once onto `device` (a view of the mapping on CPU)."""
    out = {}
    for name, info in f.tensors.items():
        view = f.tensor_bytes(name)
        with warnings.catch_warnings():  # the mapping is read-only and stays so: nothing writes to weights
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(view)
        if device.type != "cpu" or info.offset % 4:
            # Off the CPU, and for CPU views not 4-byte aligned (the kernels load 16/32-bit fields), copy.
            raw = raw.to(device, copy=True)
        out[name] = QuantWeight(name, raw, info.ggml_type, info.shape)
    return out
