"""bench/llamacpp/llamacpp.py: the parsers of llama-bench and llama-batched-bench, on outputs recorded from
the bundle's CPU fallback (tests/fixtures/llamacpp_bench/), and the backend check that keeps a CPU
fallback from passing for CUDA figures. Where the bundle has been built (bench/llamacpp/build.sh), the
last tests run it on the bundled SmolLM2."""

from __future__ import annotations

import copy
import importlib.util
import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "llamacpp_bench"

_spec = importlib.util.spec_from_file_location("llamacpp_bench", REPO / "bench" / "llamacpp" / "llamacpp.py")
llamacpp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(llamacpp)


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# --- llama-bench -o json ------------------------------------------------------------------------------


def test_llama_bench_cpu_output_parses():
    records = llamacpp.parse_llama_bench(fixture("llama-bench-cpu.json"))
    assert [(r["n_prompt"], r["n_gen"]) for r in records] == [(64, 0), (0, 16)]
    figures = llamacpp.llama_bench_figures(records, allow_cpu=True)
    assert figures["backend"] == "CPU"
    assert figures["pp64"] > figures["tg16"] > 0
    assert figures["pp64_std"] >= 0 and figures["gpu_info"] == ""


def test_backend_check_rejects_the_cpu_fallback():
    records = llamacpp.parse_llama_bench(fixture("llama-bench-cpu.json"))
    with pytest.raises(llamacpp.BackendError, match="did not run on CUDA"):
        llamacpp.check_backend(records)
    with pytest.raises(llamacpp.BackendError):
        llamacpp.llama_bench_figures(records)


def test_backend_check_accepts_cuda():
    # Derived from the CPU recording: only backends and gpu_info edited to what a CUDA run reports.
    records = llamacpp.parse_llama_bench(fixture("llama-bench-cuda-derived.json"))
    assert llamacpp.check_backend(records) == "CUDA"
    figures = llamacpp.llama_bench_figures(records)
    assert figures["backend"] == "CUDA" and figures["gpu_info"] == "NVIDIA H200"
    assert figures["pp64"] > figures["tg16"] > 0


def test_backend_check_rejects_cuda_without_a_device():
    # The CUDA module registers even when no device is visible; the model then runs on the CPU.
    records = llamacpp.parse_llama_bench(fixture("llama-bench-cuda-derived.json"))
    no_device = copy.deepcopy(records)
    no_device[1]["gpu_info"] = ""
    with pytest.raises(llamacpp.BackendError):
        llamacpp.check_backend(no_device)
    no_layers = copy.deepcopy(records)
    no_layers[0]["n_gpu_layers"] = 0
    with pytest.raises(llamacpp.BackendError):
        llamacpp.check_backend(no_layers)


def test_backend_check_rejects_a_cuda_module_that_found_no_device():
    # Recorded: the CUDA module loaded (a driver that reports no device), the model ran on the CPU, and
    # llama-bench still names CUDA among its backends. Only gpu_info tells.
    records = llamacpp.parse_llama_bench(fixture("llama-bench-cuda-module-no-device.json"))
    assert {r["backends"] for r in records} == {"CUDA"}
    with pytest.raises(llamacpp.BackendError, match="gpu_info=''"):
        llamacpp.check_backend(records)
    assert llamacpp.check_backend(records, allow_cpu=True) == "CPU"


def test_llama_bench_json_after_log_lines():
    text = "load_backend: loaded CPU backend from ./libggml-cpu.so\n" + fixture("llama-bench-cpu.json")
    assert len(llamacpp.parse_llama_bench(text)) == 2


@pytest.mark.parametrize("text", ["", "not json", "{}", '[{"n_prompt": 1}]'])
def test_llama_bench_bad_output(text):
    with pytest.raises(ValueError):
        llamacpp.parse_llama_bench(text)


# --- llama-batched-bench ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["batched-bench-cpu.md.txt", "batched-bench-cpu.jsonl.txt"])
def test_batched_bench_output_parses(name):
    rows = llamacpp.parse_batched_bench(fixture(name))
    assert [r["pl"] for r in rows] == [1, 4, 16]
    assert all(r["pp"] == 32 and r["tg"] == 16 and r["n_kv"] == r["pl"] * 48 for r in rows)
    figures = llamacpp.batched_figures(rows, "CPU")
    assert set(figures["by_parallel"]) == {1, 4, 16}
    for f in figures["by_parallel"].values():
        assert f["pp_tps"] > 0 and f["tg_tps"] > 0 and f["total_tps"] > 0
    # More parallel sequences, more generated tokens per second: the point of batching.
    assert figures["by_parallel"][16]["tg_tps"] > figures["by_parallel"][1]["tg_tps"]


def test_both_batched_formats_agree():
    md = llamacpp.parse_batched_bench(fixture("batched-bench-cpu.md.txt"))
    jsonl = llamacpp.parse_batched_bench(fixture("batched-bench-cpu.jsonl.txt"))
    key = ("pp", "tg", "pl", "n_kv")
    assert [[r[k] for k in key] for r in md] == [[r[k] for k in key] for r in jsonl]


def test_batched_backend_from_the_load_log():
    cpu_log = fixture("batched-bench-cpu.md.txt")
    with pytest.raises(llamacpp.BackendError):
        llamacpp.batched_backend(cpu_log)
    assert llamacpp.batched_backend(cpu_log, allow_cpu=True) == "CPU"
    # Derived: the two lines llama.cpp logs (at -lv 4) when it loads a model onto a CUDA device.
    cuda_log = cpu_log + (
        "llama_model_load_from_file_impl: using device CUDA0 (NVIDIA H200) (0000:19:00.0) - 142451 MiB free\n"
        "load_tensors: offloaded 31/31 layers to GPU\n")
    assert llamacpp.batched_backend(cuda_log) == "CUDA0"
    with pytest.raises(llamacpp.BackendError):  # a device, but no layers on it
        llamacpp.batched_backend(cuda_log.replace("offloaded 31/31", "offloaded 0/31"))


def test_batched_bench_no_rows():
    with pytest.raises(ValueError):
        llamacpp.parse_batched_bench("main: n_kv_max = 4096\n|    PP |     TG |\n")


def test_batched_context_holds_every_sequence():
    # 256 sequences of 128 + 128 tokens; each sequence's share is padded to 256 cells.
    assert llamacpp.batched_context(128, 128, (1, 16, 64, 256)) == 256 * 256
    assert llamacpp.batched_context(32, 16, (1, 4, 16)) == 16 * 256


# --- the bundle ---------------------------------------------------------------------------------------


def test_locate_without_a_bundle(tmp_path):
    with pytest.raises(FileNotFoundError, match="build.sh"):
        llamacpp.locate(tmp_path)


def test_locate_unpacks_the_archive_once(tmp_path, monkeypatch):
    monkeypatch.setattr(llamacpp.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    with tarfile.open(bundle / llamacpp.ARCHIVE, "w:xz") as tar:
        for name in (*llamacpp.EXES, "libllama.so.0"):
            info = tarfile.TarInfo(f"./{name}")
            info.size, info.mode = 2, 0o755
            tar.addfile(info, io.BytesIO(b"#\n"))
        link = tarfile.TarInfo("./libllama.so")
        link.type, link.linkname = tarfile.SYMTYPE, "libllama.so.0"
        tar.addfile(link)
    bin_dir = llamacpp.locate(bundle)
    assert bin_dir.parent == tmp_path / "tmp" and (bin_dir / "llama-bench").is_file()
    assert (bin_dir / "libllama.so").is_symlink()
    assert llamacpp.locate(bundle) == bin_dir
    assert not (bundle / "llama-bench").exists()  # the carried folder stays small


def test_environment_puts_the_bundle_first(tmp_path, monkeypatch):
    monkeypatch.setenv("LD_LIBRARY_PATH", "/elsewhere")
    paths = llamacpp.environment(tmp_path)["LD_LIBRARY_PATH"].split(os.pathsep)
    assert paths[0] == str(tmp_path) and paths[-1] == "/elsewhere"


# --- the built bundle, where there is one (it is built on demand, never in CI) ------------------------

built = pytest.mark.skipif(not (llamacpp.BUNDLE_DIR / llamacpp.ARCHIVE).is_file(),
                           reason="bench/llamacpp/build.sh has not been run here")


@built
def test_bundle_runs_llama_bench(smollm2_path):
    figures = llamacpp.run_llama_bench(smollm2_path, n_prompt=64, n_gen=16, reps=1, threads=1,
                                        allow_cpu=True)
    assert figures["pp64"] > 0 and figures["tg16"] > 0
    manifest = llamacpp.manifest()
    assert manifest["cuda_architectures"] == "90" and manifest["archive_bytes"] <= 40 * 2**20


@built
def test_bundle_runs_batched_bench(smollm2_path):
    figures = llamacpp.run_batched_bench(smollm2_path, npp=16, ntg=4, npl=(1, 2), threads=1, allow_cpu=True)
    assert figures["backend"] == "CPU" and set(figures["by_parallel"]) == {1, 2}
    assert all(f["tg_tps"] > 0 for f in figures["by_parallel"].values())


@built
@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU is here: no CPU fallback to detect")
def test_bundle_cpu_fallback_is_refused(smollm2_path):
    with pytest.raises(llamacpp.BackendError, match="libggml-cuda.so"):
        llamacpp.run_llama_bench(smollm2_path, n_prompt=16, n_gen=4, reps=1, threads=1)
