"""Where compiled kernels and autotuning results persist, so that a second start skips both.

Triton keeps compiled binaries, and (for `triton.autotune(..., cache_results=True)`) the timings of every
config, in its cache directory, under keys made of the Triton version, the target, the kernel's source and
the tuning key. We point that directory at `<cache_dir>/<device name>/triton`, so that results measured
on one GPU model are never taken for another that shares its architecture (an H100 and an H200 are both
sm_90 but tune differently). Copying the directory to a fresh machine with the same GPU carries both.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import triton

DEFAULT_CACHE_DIR = Path("~/.cache/ggtriton")


def device_cache_dir(cache_dir: str | os.PathLike | None, device: torch.device) -> Path:
    """`<cache_dir>/<device name>/triton` (cache_dir default: $GGTRITON_CACHE_DIR, else ~/.cache/ggtriton)."""
    root = Path(cache_dir or os.environ.get("GGTRITON_CACHE_DIR") or DEFAULT_CACHE_DIR).expanduser()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return root / (re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "device") / "triton"


def use_cache_dir(cache_dir: str | os.PathLike | None, device: torch.device) -> Path:
    """Make Triton compile into and tune from `device_cache_dir(cache_dir, device)`; returns that folder.

    Call it before the first kernel launch of the process: kernels already loaded stay in memory.
    """
    path = device_cache_dir(cache_dir, device)
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = str(path)
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:  # Triton >= 3.4 reads its settings through knobs, which may already hold a value
        knobs.cache.dir = str(path)
    return path
