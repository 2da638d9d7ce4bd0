"""bench/gpu_check.py in its CI form (--smoke: CPU, Triton interpreter, tiny shapes): every stage runs and
nothing fails, so the script the GPU runs cannot rot; a stage that crashes or hangs is reported without the
others lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STAGES = ("env", "correctness", "speed", "e2e", "llamacpp")
# What the smoke run cannot do without CUDA, and nothing else, may be skipped.
CUDA_ONLY = ("needs CUDA", "need CUDA")

# llama-bench's JSON (the fields read), for a model file that exists.
FAKE_LLAMA_BENCH = """#!/bin/sh
[ "$1" = "-m" ] && [ -f "$2" ] || exit 1
echo '[{"n_prompt": 512, "n_gen": 0, "avg_ts": 900.5, "stddev_ts": 3.1},'
echo ' {"n_prompt": 0, "n_gen": 128, "avg_ts": 95.2, "stddev_ts": 0.4}]'
"""


def gpu_check(tmp_path: Path, *args: str) -> tuple[int, dict, str]:
    bundle = tmp_path / "llamacpp"
    bundle.mkdir(exist_ok=True)
    (bundle / "llama-bench").write_text(FAKE_LLAMA_BENCH)
    (bundle / "llama-bench").chmod(0o755)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--out", str(out), "--work-dir",
                           str(tmp_path / "work"), "--llamacpp", str(bundle), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    print(proc.stdout[-5000:], proc.stderr[-5000:])
    return proc.returncode, json.loads((out / "gpu_check.json").read_text()), (out / "RESULTS.md").read_text()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return gpu_check(tmp_path_factory.mktemp("gpu_check"))


def test_every_stage_runs_and_nothing_fails(smoke):
    rc, report, results = smoke
    assert rc == 0
    assert [s["name"] for s in report["stages"]] == list(STAGES)
    assert all(s["status"] == "done" for s in report["stages"])
    checks = report["checks"]
    assert {c["stage"] for c in checks} == set(STAGES)
    assert [c for c in checks if c["verdict"] not in ("PASS", "SKIP")] == []
    for c in checks:
        if c["verdict"] == "SKIP":
            assert any(reason in c["why"] for reason in CUDA_ONLY), c
    assert sum(c["verdict"] == "PASS" for c in checks) >= 40
    # llama-bench's figures beside ours
    pp = next(c for c in checks if c["check"] == "llama.cpp pp512")
    assert "900.5" in pp["figure"] and "ours" in pp["ratio"]


def test_results_md_has_the_table(smoke):
    _, report, results = smoke
    assert results.startswith("## GPU check (")
    assert "| stage | check | verdict | figure | ratio |" in results
    for stage in STAGES:
        assert f"| {stage} |" in results
    assert "| FAIL |" not in results
    assert len(results.splitlines()) == len(report["checks"]) + 6


def test_a_crashing_stage_fails_and_the_next_runs(tmp_path):
    rc, report, _ = gpu_check(tmp_path, "--stages", "env,llamacpp", "--inject-failure", "env")
    assert rc == 1
    env = [c for c in report["checks"] if c["stage"] == "env"]
    assert env[0]["check"] == "device" and env[0]["verdict"] == "PASS"  # recorded before the crash: kept
    assert env[-1]["verdict"] == "FAIL" and "exited with status 3" in env[-1]["why"]
    assert [s["status"] for s in report["stages"]] == ["failed", "done"]
    assert {c["verdict"] for c in report["checks"] if c["stage"] == "llamacpp"} == {"PASS"}


def test_a_hanging_stage_is_stopped_at_its_limit(tmp_path):
    rc, report, _ = gpu_check(tmp_path, "--stages", "llamacpp", "--budget-s", "12", "--inject-failure",
                              "llamacpp:hang")
    assert rc == 1
    verdicts = [c["verdict"] for c in report["checks"]]
    assert verdicts[0] == "PASS" and verdicts[-1] == "TIMEOUT"
    assert report["stages"][0]["status"] == "timeout" and report["stages"][0]["wall_s"] < 22
