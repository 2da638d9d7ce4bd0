"""Shared fixtures: the device kernel and model tests run on, the real test models (required: a missing one
fails, never skips), output poisoning."""

from __future__ import annotations

import math
import os
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter, on CPU tensors.
if "TRITON_INTERPRET" not in os.environ:
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, str(Path(__file__).parent))  # the tests' helper modules (quant_weights)

from ggtriton.gguf import bundled
from ggtriton.runtime.engine.scheduler import Scheduler
from ggtriton.runtime.engine.sequence import SequenceStatus
from interpreter_patching import patch_languages_once_per_launch

patch_languages_once_per_launch()

# Under pytest-xdist (`-n auto`, pyproject.toml) each worker takes an equal share of the cores: most tests run
# the Triton interpreter on one core, and torch's own threads would otherwise oversubscribe the machine.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


# The files that take longest, longest first; the rest follow in collection order. Each worker takes the next
# file when it runs short (`--dist loadfile --no-loadscope-reorder`, pyproject.toml): a long file started last
# would leave one worker running it alone at the end.
LONGEST_FIRST = ("test_compile.py", "test_quant_bench.py", "test_model_llamacpp.py", "test_qgemv.py",
                 "test_gpu_check.py", "test_spec_decode.py", "test_gpt_oss.py", "test_server.py",
                 "test_moe_kernel.py", "test_sass.py", "test_ray_batch.py", "test_engine.py", "test_qmatmul.py",
                 "test_model_architectures.py", "test_perplexity.py", "test_dequant_kernel.py",
                 "test_tensor_parallel.py", "test_attention.py", "test_generation.py", "test_gguf_fuzz.py",
                 "test_launch_count.py", "test_device_path.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests stay in order


def pytest_xdist_auto_num_workers(config) -> int:
    """One worker per core on CPU (the interpreter is single-threaded); one in all with a GPU, which every
    test would share."""
    return 1 if torch.cuda.is_available() else max(1, os.cpu_count() or 1)


def _require(locate) -> Path:
    try:
        return locate()
    except bundled.ModelNotInstalledError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where kernel and model tests run: the GPU when there is one, else the CPU, where the Triton kernels
    run in the interpreter (TRITON_INTERPRET=1, set above)."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return torch.device("cuda" if torch.cuda.is_available() and not interpret else "cpu")


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
    """Every float tensor made with torch.empty, on any device, starts as NaN, so an unwritten output element
    fails."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)


def check_invariants(sched: Scheduler) -> None:
    """The books of a scheduler and its block manager balance (see `check_books`)."""
    bm = sched.block_manager
    live = list(sched.running)
    refs = Counter(b for seq in live for b in seq.block_table)
    for seq in live:
        assert len(set(seq.block_table)) == len(seq.block_table), f"{seq!r} holds a page twice"
        assert seq.status is SequenceStatus.RUNNING
        assert len(seq.block_table) >= bm.blocks_for(seq.num_computed_tokens)
        assert seq.num_computed_tokens <= seq.num_tokens
    for seq in sched.waiting:
        assert seq.block_table == [] and seq.num_computed_tokens == 0 and seq.status is SequenceStatus.WAITING
    for block in bm.blocks:
        assert block.ref_count == refs[block.block_id], f"block {block.block_id}: refs {block.ref_count}"
        assert (block.block_id in bm.free) == (block.ref_count == 0)
    assert len(bm.free) == len(bm.blocks) - len(refs)
    for h, block_id in bm.cached.items():
        assert bm.blocks[block_id].hash == h
    assert len(sched.running) <= sched.config.max_num_seqs


@pytest.fixture(scope="session")
def check_books():
    """Checks that no page is leaked or held twice, that reference counts equal the block tables holding
    each page, and that the prefix-cache index points at pages carrying that hash."""
    return check_invariants
