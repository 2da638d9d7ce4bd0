#!/usr/bin/env bash
# llama.cpp's CUDA figures for one GGUF: llama-bench pp512/tg128 and llama-batched-bench at 1-256 parallel
# sequences, from the bundle of bench/llamacpp/build.sh. Fails, with no figures, unless llama.cpp ran on CUDA.
#   bench/llamacpp/run.sh MODEL [--json] [--bundle DIR] [--allow-cpu] [--quick] [-t THREADS]
exec python3 "$(dirname "$0")/llamacpp.py" "$@"
