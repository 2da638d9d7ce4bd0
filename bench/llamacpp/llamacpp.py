"""llama.cpp's CUDA benchmarks, run from the bundle that bench/llamacpp/build.sh makes.

    python bench/llamacpp/llamacpp.py MODEL [--json] [--bundle DIR] [--allow-cpu] [--quick]

Runs `llama-bench` (pp512, tg128, flash attention, all layers on the GPU) and `llama-batched-bench`
(128 prompt + 128 generated tokens for 1, 16, 64 and 256 parallel sequences) and returns their figures
as dicts. The CUDA backend is a module that llama.cpp skips silently when it cannot load it, and the CPU
backend then runs instead; a figure from that fallback would inflate every ratio against it, so a run
that is not on a CUDA device raises `BackendError` and reports nothing, unless `allow_cpu` is given
(the check on a machine without a GPU).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

BUNDLE_DIR = Path(__file__).resolve().parent / "bundle"
ARCHIVE = "llamacpp-cuda.tar.xz"
EXES = ("llama-bench", "llama-batched-bench")
BATCHED_NPL = (1, 16, 64, 256)


class BackendError(RuntimeError):
    """llama.cpp did not run on a CUDA device."""


def locate(bundle: str | Path | None = None) -> Path:
    """The folder that holds the executables and libraries, unpacking the archive once if needed.

    `bundle` (else $LLAMACPP_BUNDLE, else bench/llamacpp/bundle) is either such a folder or build.sh's
    output (the archive and manifest.json). The archive is unpacked outside the bundle folder, so the
    folder stays small enough to be carried to a GPU machine.
    """
    root = Path(bundle or os.environ.get("LLAMACPP_BUNDLE") or BUNDLE_DIR)
    if (root / "llama-bench").is_file():
        return root
    archive = root / ARCHIVE
    if not archive.is_file():
        raise FileNotFoundError(f"no llama.cpp bundle at {root}: build it with `bash bench/llamacpp/build.sh`")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:16]
    dest = Path(tempfile.gettempdir()) / f"ggtriton-llamacpp-{digest}"
    if not all((dest / exe).is_file() for exe in EXES):
        # Unpack beside the destination and rename, so an interrupted unpack is never taken for a bundle.
        tmp = Path(tempfile.mkdtemp(prefix=dest.name + "-", dir=dest.parent))
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="tar")  # keeps the symlinks between library sonames
        try:
            tmp.rename(dest)
        except OSError:  # another process unpacked it first
            shutil.rmtree(tmp, ignore_errors=True)
            if not all((dest / exe).is_file() for exe in EXES):
                raise
    return dest


def manifest(bundle: str | Path | None = None) -> dict:
    """build.sh's manifest (llama.cpp commit, flags, nvcc version), or {} for a bare folder."""
    path = Path(bundle or os.environ.get("LLAMACPP_BUNDLE") or BUNDLE_DIR) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def cuda_lib_dirs() -> list[Path]:
    """Folders of libcublas.so.13 and libcudart.so.13 in this Python's `nvidia` packages (torch's CUDA 13
    wheels), then the CUDA toolkit's: the bundle carries neither (cuBLAS is hundreds of MB)."""
    dirs: list[Path] = []
    spec = importlib.util.find_spec("nvidia")
    for base in spec.submodule_search_locations if spec and spec.submodule_search_locations else []:
        for lib in ("libcublas.so.13", "libcudart.so.13"):
            dirs += sorted({p.parent for p in Path(base).glob(f"*/lib/{lib}")} - set(dirs))
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    dirs += [p for p in (Path(cuda_home) / "lib64", Path(cuda_home) / "lib") if p.is_dir()]
    return dirs


def environment(bin_dir: Path) -> dict[str, str]:
    """os.environ with the bundle and cuBLAS on LD_LIBRARY_PATH."""
    env = dict(os.environ)
    paths = [str(bin_dir), *map(str, cuda_lib_dirs())]
    if env.get("LD_LIBRARY_PATH"):
        paths.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(paths)
    return env


def cuda_load_error(bin_dir: Path) -> str | None:
    """Why libggml-cuda.so does not load here (llama.cpp's release build skips it without a word)."""
    lib = bin_dir / "libggml-cuda.so"
    code = f"import ctypes; ctypes.CDLL({str(lib)!r})"
    r = subprocess.run([sys.executable, "-c", code], env=environment(bin_dir), capture_output=True, text=True)
    if r.returncode == 0:
        return None
    lines = r.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {r.returncode}"


def _run(cmd: list[str], bin_dir: Path, timeout: float | None) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=environment(bin_dir), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {r.returncode}:\n{r.stderr[-3000:]}")
    return r


# llama-bench


def parse_llama_bench(text: str) -> list[dict]:
    """The records of `llama-bench -o json` (a JSON array, one object per test)."""
    records = json.loads(text[text.find("["):])  # after any log lines
    if not isinstance(records, list) or not all(isinstance(r, dict) and "avg_ts" in r for r in records):
        raise ValueError("not llama-bench -o json output: expected a list of records with avg_ts")
    return records


def check_backend(records: list[dict], *, allow_cpu: bool = False) -> str:
    """Returns "CUDA" when every test ran on a CUDA device, else raises BackendError ("CPU" with `allow_cpu`).
    `backends` names every backend that registered; `gpu_info` and `n_gpu_layers` show that a GPU was
    found and the layers went to it (the CUDA module can register with no device visible)."""
    if not records:
        raise ValueError("llama-bench gave no records")
    for r in records:
        if not ("CUDA" in str(r.get("backends", "")).split(",") and r.get("gpu_info")
                and int(r.get("n_gpu_layers", 0)) > 0):
            if allow_cpu:
                return "CPU"
            raise BackendError(
                f"llama-bench did not run on CUDA (backends={r.get('backends')!r}, gpu_info={r.get('gpu_info')!r}, "
                f"n_gpu_layers={r.get('n_gpu_layers')}): a CPU fallback is no baseline; no llama.cpp figures reported")
    return "CUDA"


def llama_bench_figures(records: list[dict], *, allow_cpu: bool = False) -> dict:
    """{"pp512": t/s, "tg128": t/s, ...} plus the backend, GPU and model of the run."""
    out: dict = {"backend": check_backend(records, allow_cpu=allow_cpu)}
    first = records[0]
    out |= {k: first.get(k) for k in ("gpu_info", "cpu_info", "build_commit", "model_type", "n_threads", "flash_attn")}
    for r in records:
        npp, ntg, depth = int(r["n_prompt"]), int(r["n_gen"]), int(r.get("n_depth", 0))
        name = f"pp{npp}" if ntg == 0 else f"tg{ntg}" if npp == 0 else f"pp{npp}+tg{ntg}"
        name += f"@d{depth}" if depth else ""
        out[name] = float(r["avg_ts"])
        out[name + "_std"] = float(r["stddev_ts"])
    return out


def run_llama_bench(model: str | Path, *, bin_dir: Path | None = None, n_prompt: int = 512, n_gen: int = 128,
                    reps: int = 3, threads: int | None = None, allow_cpu: bool = False,
                    timeout: float | None = 600) -> dict:
    bin_dir = bin_dir or locate()
    cmd = [str(bin_dir / "llama-bench"), "-m", str(model), "-p", str(n_prompt), "-n", str(n_gen),
           "-fa", "1", "-ngl", "99", "-r", str(reps), "-o", "json"]
    cmd += ["-t", str(threads)] if threads else []
    r = _run(cmd, bin_dir, timeout)
    try:
        return llama_bench_figures(parse_llama_bench(r.stdout), allow_cpu=allow_cpu)
    except BackendError as e:
        why = cuda_load_error(bin_dir)
        raise BackendError(f"{e}\n  libggml-cuda.so: {why or 'loads, but llama.cpp found no CUDA device'}") from None


# llama-batched-bench

_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|" + r"\s*([\d.]+)\s*\|" * 6 + r"\s*$")
_MD_KEYS = ("pp", "tg", "pl", "n_kv", "t_pp", "speed_pp", "t_tg", "speed_tg", "t", "speed")


def parse_batched_bench(text: str) -> list[dict]:
    """The result rows of llama-batched-bench, from its markdown table or its `--output-format jsonl`
    lines: pp, tg, pl (parallel sequences), n_kv, t_pp, speed_pp, t_tg, speed_tg, t, speed (t/s)."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            rows.append(json.loads(line))
        elif m := _ROW.match(line):
            rows.append({k: (int(v) if i < 4 else float(v)) for i, (k, v) in enumerate(zip(_MD_KEYS, m.groups()))})
    if not rows:
        raise ValueError("no llama-batched-bench results found")
    return rows


def batched_backend(log: str, *, allow_cpu: bool = False) -> str:
    """The device batched-bench's model went to, read from llama.cpp's load log ("using device CUDA0")."""
    if m := re.search(r"using device (CUDA\d+)", log):
        if re.search(r"offloaded [1-9]\d*/\d+ layers to GPU", log):
            return m.group(1)
    if allow_cpu:
        return "CPU"
    raise BackendError("llama-batched-bench did not load the model onto a CUDA device: no llama.cpp figures reported")


def batched_figures(rows: list[dict], backend: str) -> dict:
    """{"backend", "pp", "tg", "by_parallel": {pl: {"pp_tps", "tg_tps", "total_tps"}}}."""
    return {"backend": backend, "pp": rows[0]["pp"], "tg": rows[0]["tg"],
            "by_parallel": {int(r["pl"]): {"pp_tps": float(r["speed_pp"]), "tg_tps": float(r["speed_tg"]),
                                           "total_tps": float(r["speed"])} for r in rows}}


def batched_context(npp: int, ntg: int, npl: tuple[int, ...]) -> int:
    # Without a unified KV cache each sequence gets n_ctx / n_seq_max cells, padded to 256 by llama.cpp.
    return max(npl) * -(-(npp + ntg) // 256) * 256


def run_batched_bench(model: str | Path, *, bin_dir: Path | None = None, npp: int = 128, ntg: int = 128,
                      npl: tuple[int, ...] = BATCHED_NPL, threads: int | None = None, allow_cpu: bool = False,
                      timeout: float | None = 600) -> dict:
    bin_dir = bin_dir or locate()
    # n_seq_max follows the largest -npl; -c must hold every sequence's prompt and generated tokens.
    cmd = [str(bin_dir / "llama-batched-bench"), "-m", str(model), "-c", str(batched_context(npp, ntg, npl)),
           "-b", "2048", "-ub", "512", "-npp", str(npp), "-ntg", str(ntg), "-npl", ",".join(map(str, npl)),
           "-fa", "on", "-ngl", "99", "--output-format", "jsonl",
           "-lv", "4"]  # llama.cpp's info log (verbosity 4 here), where the devices it loads onto are named
    cmd += ["-t", str(threads), "-tb", str(threads)] if threads else []
    r = _run(cmd, bin_dir, timeout)
    backend = batched_backend(r.stdout + r.stderr, allow_cpu=allow_cpu)
    rows = parse_batched_bench(r.stdout + "\n" + r.stderr)
    if missing := set(npl) - {int(row["pl"]) for row in rows}:
        raise RuntimeError(f"llama-batched-bench skipped parallel counts {sorted(missing)} (context too small?)")
    return batched_figures(rows, backend)


def run_all(model: str | Path, *, bundle: str | Path | None = None, allow_cpu: bool = False,
            quick: bool = False, threads: int | None = None) -> dict:
    """Both benchmarks on one model; llama-bench first, so a CPU fallback stops the run before the long
    batched one. `quick`: small sizes for a check without a GPU."""
    bin_dir = locate(bundle)
    sizes = dict(n_prompt=64, n_gen=16, reps=1) if quick else {}
    batched = dict(npp=32, ntg=16, npl=(1, 4, 16)) if quick else {}
    bench = run_llama_bench(model, bin_dir=bin_dir, allow_cpu=allow_cpu, threads=threads, **sizes)
    batch = run_batched_bench(model, bin_dir=bin_dir, allow_cpu=allow_cpu, threads=threads, **batched)
    return {"llama_bench": bench, "batched_bench": batch, "manifest": manifest(bundle)}


def format_table(res: dict) -> str:
    b, bb = res["llama_bench"], res["batched_bench"]
    lines = [f"llama.cpp {res['manifest'].get('llama_cpp_commit', '?')} on {b['backend']} "
             f"({b.get('gpu_info') or b.get('cpu_info')}), {b.get('model_type')}"]
    lines += [f"  {k:>12} {v:10.1f} t/s" for k, v in b.items() if re.fullmatch(r"(pp|tg)\d+\S*", k) and "_std" not in k]
    lines.append(f"  batched pp{bb['pp']}+tg{bb['tg']} ({bb['backend']}):   B   prompt t/s   gen t/s   total t/s")
    lines += [f"  {'':34}{pl:4d} {f['pp_tps']:12.1f} {f['tg_tps']:9.1f} {f['total_tps']:11.1f}"
              for pl, f in bb["by_parallel"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--bundle", help="bundle folder (default $LLAMACPP_BUNDLE or bench/llamacpp/bundle)")
    ap.add_argument("--allow-cpu", action="store_true", help="accept the CPU fallback (a check without a GPU)")
    ap.add_argument("--quick", action="store_true", help="pp64/tg16 and a small batched run")
    ap.add_argument("-t", "--threads", type=int)
    args = ap.parse_args(argv)
    try:
        res = run_all(args.model, bundle=args.bundle, allow_cpu=args.allow_cpu, quick=args.quick,
                      threads=args.threads)
    except BackendError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1) if args.json else format_table(res), flush=True)
    if res["llama_bench"]["backend"] != "CUDA":
        print("note: CPU fallback (no CUDA device here); not a baseline for GPU figures", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
