"""The GPU check: one command turns a bare GPU machine into verdicts and numbers, within a time budget.

    python bench/gpu_check.py [--out DIR] [--cache-dir DIR] [--work-dir DIR] [--budget-s 300]
                              [--stages env,correctness,speed,e2e,llamacpp] [--llamacpp DIR] [--smoke]

Stages, most valuable first, each in processes of its own (bench/gpu_stages.py) under its own time limit,
so that a CUDA fault or a hang costs one stage; each records its checks as it makes them, so a stage
stopped at its limit keeps what it reached (verdict TIMEOUT):
  env          device, driver, versions; the ceilings: copy bandwidth and bf16 matmul TFLOP/s
  correctness  every kernel on the GPU against its torch reference (bf16: relative error <= 1e-2):
               dequant bit-exact for every type; qmatmul on each path and each of its autotune configs,
               8 types at 8B shapes; flash attention and paged decode at head dims 64/128/256, with window
               and soft-cap; rmsnorm, rope, activations; a random model, Triton path against torch path
               (top-1, KLD); CUDA-graph decode against eager. Run in parallel processes, so that their
               hundreds of compiles share the CPU cores; the later stages find them in the kernel cache
  speed        qmatmul GB/s at M = 1/16/8 per type on 8B shapes against the copy bandwidth; flash prefill
               against SDPA; paged decode GB/s; M = 512/2048 against cuBLAS; every path over M from 1 to
               2048, the crossovers printed beside the dispatch thresholds; dequant GB/s
  e2e          an 8B-shaped random Q4_K GGUF (written to --work-dir): start-up, batch-1 decode against the
               bandwidth limit, prefill, kernels per decode step, throughput at 1/16/64/256 requests,
               verify-pass cost and speculative speed-up
  llamacpp     llama-bench (pp512, tg128) on the same file, beside ours; skipped without --llamacpp
A stage's limit is its share of what is left of --budget-s (shares: env 15, correctness 90, speed 90,
e2e 80, llamacpp 25 of 300), so time one stage leaves over goes to the next ones. Prints one summary
table last; exit status 1 when a check failed or a stage ran out of time.

Writes DIR/gpu_check.json (every check, with its numbers), DIR/RESULTS.md (the table, headed with device,
date and versions, for bench/RESULTS.md) and DIR/gpu_check.log (the stages' output), each under 16 MiB.
Compiled kernels and autotuning results go to --cache-dir (default DIR/cache; it can grow to hundreds of
MB: carry it back only if small). A later run on the same GPU model given the same cache dir skips the
compiling and tuning. GGUFs go to --work-dir, never to DIR.

--smoke: the CI form, on CPU with the Triton interpreter and tiny shapes; what needs CUDA (timing, CUDA
graphs, copy bandwidth) reports SKIP and why.

Its only install is `pip install -e . --no-deps --no-build-isolation`, done here when ggtriton is not
importable.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES_PY = Path(__file__).with_name("gpu_stages.py")
SHARES = {"env": 15, "correctness": 90, "speed": 90, "e2e": 80, "llamacpp": 25}
LOG_LIMIT = 512 << 10  # bytes kept of each process's output in gpu_check.log (the end: errors come last)


@dataclass
class Run:
    """The run's checks and stages so far, written out after every stage."""

    out: Path
    budget_s: float
    smoke: bool
    info: dict = field(default_factory=dict)
    stages: list[dict] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    start: float = field(default_factory=time.monotonic)

    def save(self) -> None:
        elapsed = time.monotonic() - self.start
        data = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), smoke=self.smoke,
                    budget_s=self.budget_s, elapsed_s=round(elapsed, 1), info=self.info, stages=self.stages,
                    checks=self.checks)
        (self.out / "gpu_check.json").write_text(json.dumps(data, indent=1))
        info = self.info
        lines = [
            f"## GPU check ({datetime.date.today()}, {info.get('device', 'device unknown')}, "
            f"torch {info.get('torch', '?')}, triton {info.get('triton', '?')})",
            "",
            f"`python bench/gpu_check.py{' --smoke' if self.smoke else ''}`: {elapsed:.0f} s of a {self.budget_s:.0f} s "
            f"budget; driver {info.get('driver') or '-'}, CUDA {info.get('cuda') or '-'}, Python {info.get('python', '?')}. "
            "Stages: " + ", ".join(f"{s['name']} {s['status']} in {s['wall_s']:.0f} s" for s in self.stages) + ".",
            "",
            "| stage | check | verdict | figure | ratio |",
            "|---|---|---|---|---|",
            *(f"| {c['stage']} | {c['check']} | {c['verdict']} | {cell(c)} | {c['ratio'] or ''} |" for c in self.checks),
        ]
        (self.out / "RESULTS.md").write_text("\n".join(lines) + "\n")


def cell(check: dict) -> str:
    """The figure, with the reason for a verdict beside it."""
    return " ".join(x for x in (check["figure"], check["why"] and f"({check['why']})") if x).replace("|", "/")


def ensure_installed() -> None:
    if importlib.util.find_spec("ggtriton.kernels") is None:
        print("ggtriton is not installed: pip install -e . --no-deps --no-build-isolation", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", str(REPO), "--no-deps",
                        "--no-build-isolation"], check=True)


def shard_count(stage: str) -> int:
    """Correctness compiles hundreds of kernels, each on one core: processes for three cores in four (at
    least 2, at most 12) compile them side by side."""
    if stage != "correctness":
        return 1
    return min(12, max(2, (os.cpu_count() or 2) * 3 // 4))


def run_stage(run: Run, name: str, limit: float, args: argparse.Namespace, env: dict) -> None:
    work = args.work_dir / "stages"
    work.mkdir(parents=True, exist_ok=True)
    n = shard_count(name)
    fault = (args.inject_failure or "").split(":")
    procs = []
    for i in range(n):
        result, log = work / f"{name}.{i}.json", work / f"{name}.{i}.log"
        result.unlink(missing_ok=True)
        cmd = [sys.executable, str(STAGES_PY), name, "--result", str(result), "--shard", f"{i}/{n}",
               "--prior", str(run.out / "gpu_check.json"), "--cache-dir", str(args.cache_dir),
               "--work-dir", str(args.work_dir)]
        cmd += ["--smoke"] * args.smoke + (["--llamacpp", str(args.llamacpp)] if args.llamacpp else [])
        if fault[0] == name and i == 0:
            cmd += ["--fault", fault[1] if len(fault) > 1 else "crash"]
        with log.open("w") as f:  # the child holds its own copy of the descriptor
            # A session of its own: at the limit, its whole process group is stopped.
            procs.append((subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                           start_new_session=True), result, log))
    start = time.monotonic()
    seen: set[tuple[int, int]] = set()

    def report() -> list[dict]:
        """Every check the shards have recorded, printing the new ones."""
        checks = []
        for i, (_, result, _) in enumerate(procs):
            try:
                data = json.loads(result.read_text())
            except (OSError, ValueError):  # not written yet
                continue
            run.info = data["info"] | run.info
            for j, c in enumerate(data["checks"]):
                if (i, j) not in seen:
                    seen.add((i, j))
                    print(f"[{time.monotonic() - run.start:5.0f} s] {name:11} {c['verdict']:7} {c['check']}: "
                          f"{cell(c)} {c['ratio'] or ''}", flush=True)
            checks += data["checks"]
        return checks

    while any(p.poll() is None for p, _, _ in procs) and time.monotonic() - start < limit:
        time.sleep(0.5)
        report()
    timed_out = [p for p, _, _ in procs if p.poll() is None]
    for p in timed_out:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    checks = sorted(report(), key=lambda c: c["order"])  # the shards' checks back in the stage's order
    for i, (p, _, log) in enumerate(procs):
        text = log.read_bytes()[-LOG_LIMIT:].decode(errors="replace")
        with (run.out / "gpu_check.log").open("a") as f:
            f.write(f"\n===== {name} {i + 1}/{n}: exit {p.returncode} =====\n{text}")
        shard = f" (process {i + 1}/{n})" if n > 1 else ""
        if p in timed_out:
            checks.append(dict(stage=name, check=f"time limit{shard}", verdict="TIMEOUT", figure="",
                               ratio="", why=f"stopped after {limit:.0f} s; the checks above are what it reached",
                               value=None, order=0))
        elif p.returncode:
            last = text.strip().splitlines()[-1:] or ["no output"]
            checks.append(dict(stage=name, check=f"process{shard}", verdict="FAIL", figure="", ratio="",
                               why=f"exited with status {p.returncode}: {last[0][:300]}", value=None, order=0))
    for c in checks[len(seen):]:
        print(f"[{time.monotonic() - run.start:5.0f} s] {name:11} {c['verdict']:7} {c['check']}: {cell(c)}",
              flush=True)
    status = "timeout" if timed_out else "failed" if any(p.returncode for p, _, _ in procs) else "done"
    run.stages.append(dict(name=name, status=status, wall_s=round(time.monotonic() - start, 1),
                           limit_s=round(limit, 1), processes=n))
    run.checks += checks


def summary(run: Run, cache_dir: Path) -> str:
    rows = [("stage", "check", "verdict", "figure", "ratio")]
    rows += [(c["stage"], c["check"], c["verdict"], cell(c), c["ratio"] or "") for c in run.checks]
    widths = [min(max(len(r[i]) for r in rows), cap) for i, cap in enumerate((11, 44, 7, 70, 200))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    counts = {v: sum(c["verdict"] == v for c in run.checks) for v in ("PASS", "FAIL", "SKIP", "TIMEOUT")}
    cache_bytes = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file()) if cache_dir.exists() else 0
    lines += ["", ", ".join(f"{n} {v}" for v, n in counts.items()) + f" in {time.monotonic() - run.start:.0f} s; "
              f"kernel cache {cache_dir}: {cache_bytes / 2**20:.0f} MiB; results in {run.out}"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu-check"), help="results folder (default ./gpu-check)")
    parser.add_argument("--cache-dir", type=Path, help="compiled kernels and tuning (default DIR/cache; "
                        "hundreds of MB at most: carry it back only if small)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/ggtriton-gpu-check"),
                        help="GGUFs (several GB) and the stages' scratch files")
    parser.add_argument("--budget-s", type=float, default=300.0, help="seconds for all stages (default 300)")
    parser.add_argument("--stages", default=",".join(SHARES), help="comma-separated, of " + ", ".join(SHARES))
    parser.add_argument("--llamacpp", type=Path, help="folder holding llama-bench and its libraries")
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes (CI)")
    parser.add_argument("--inject-failure", help=argparse.SUPPRESS)  # STAGE[:hang]: tests the failure capture
    args = parser.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    if unknown := set(stages) - set(SHARES):
        parser.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(SHARES)}")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.cache_dir = (args.cache_dir or args.out / "cache").resolve()
    args.work_dir = args.work_dir.resolve()
    (args.out / "gpu_check.log").write_text("")
    ensure_installed()

    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    if args.smoke:
        env |= {"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = Run(args.out, args.budget_s, args.smoke)
    run.save()  # the stages read the figures of the ones before from it: none of an earlier run's
    order = [s for s in SHARES if s in stages]
    for i, name in enumerate(order):
        if name == "llamacpp" and not args.llamacpp:
            run.checks.append(dict(stage=name, check="llama-bench", verdict="SKIP", figure="", ratio="",
                                   why="skipped: no bundle (--llamacpp DIR)", value=None, order=0))
            run.stages.append(dict(name=name, status="skipped", wall_s=0.0, limit_s=0.0, processes=0))
            continue
        later = [s for s in order[i:] if s != "llamacpp" or args.llamacpp]
        left = args.budget_s - (time.monotonic() - run.start)
        limit = left * SHARES[name] / sum(SHARES[s] for s in later)
        print(f"[{time.monotonic() - run.start:5.0f} s] {name}: up to {limit:.0f} s", flush=True)
        run_stage(run, name, limit, args, env)
        run.save()
    run.save()
    print("\n" + summary(run, args.cache_dir))
    return int(any(c["verdict"] in ("FAIL", "TIMEOUT") for c in run.checks))


if __name__ == "__main__":
    sys.exit(main())
