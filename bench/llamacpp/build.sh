#!/usr/bin/env bash
# Builds llama.cpp's llama-bench and llama-batched-bench with the CUDA backend for sm_90, on a machine that
# has nvcc but no GPU, into a bundle a GPU machine can carry:
#
#   bash bench/llamacpp/build.sh [OUT_DIR]      # OUT_DIR defaults to bench/llamacpp/bundle (git-ignored)
#   nohup nice -n 19 bash bench/llamacpp/build.sh >build.log 2>&1 &      # in the background
#
# OUT_DIR gets llamacpp-cuda.tar.xz (stripped binaries and shared libraries, one folder) and manifest.json.
# Sources, cuBLAS and the build tree are cached in $LLAMACPP_WORK (default ~/.cache/ggtriton/llamacpp); a
# rerun resumes where the last one stopped (each step is skipped once done, ninja picks up its own work).
# The compile is ~290 steps, most of them CUDA template instances: 17 minutes on 2 idle cores, over an hour
# on 2 busy ones at nice 19; JOBS sets ninja's parallelism.
#
# Without a package index (a GPU machine), give what the downloads would bring: LLAMACPP_SRC, an unpacked
# llama.cpp tree (the sdist's vendor/llama.cpp less models/ and docs/ is 7 MB as tar.xz), and CUBLAS_ROOT,
# a folder with include/cublas_v2.h and lib/libcublas.so.13 (the torch environment's nvidia/cu13):
#   LLAMACPP_SRC=/tmp/llama.cpp CUBLAS_ROOT=$(python3 -c "import nvidia; print(nvidia.__path__[0])")/cu13 \
#       JOBS=16 bash bench/llamacpp/build.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(mkdir -p "${1:-$here/bundle}" && cd "${1:-$here/bundle}" && pwd)
work=${LLAMACPP_WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/ggtriton/llamacpp}
py_version=0.3.36        # llama-cpp-python: its sdist vendors the llama.cpp tree we build
cublas_version=13.1.1.3  # nvidia-cublas (CUDA 13): headers and the libcublas.so.13 we link against
jobs=${JOBS:-$(nproc)}
mkdir -p "$work"
log() { echo "[build $(date +%H:%M:%S)] $*"; }

# 1. llama.cpp source, from the llama-cpp-python sdist (the pinned version decides the commit).
src=${LLAMACPP_SRC:-$work/llama_cpp_python-$py_version/vendor/llama.cpp}
if [ -z "${LLAMACPP_SRC:-}" ] && [ ! -f "$work/.src-$py_version" ]; then
    log "downloading llama-cpp-python==$py_version sdist"
    python3 -m pip download -q --no-binary :all: --no-deps -d "$work/dl" "llama-cpp-python==$py_version"
    tar -xzf "$work/dl/llama_cpp_python-$py_version.tar.gz" -C "$work"
    touch "$work/.src-$py_version"
fi
[ -f "$src/CMakeLists.txt" ] || { echo "no llama.cpp tree at $src" >&2; exit 1; }

# 2. cuBLAS: the CUDA toolkit here has none; the PyPI wheel carries headers and libraries.
cublas=${CUBLAS_ROOT:-$work/cublas-$cublas_version/nvidia/cu13}
cublas_lib=$cublas/lib
if [ -n "${CUBLAS_ROOT:-}" ]; then  # the linker's plain names, made beside the build, not in site-packages
    cublas_lib=$work/cublas-link
    mkdir -p "$cublas_lib"
    ln -sf "$cublas/lib/libcublas.so.13" "$cublas_lib/libcublas.so"
    ln -sf "$cublas/lib/libcublasLt.so.13" "$cublas_lib/libcublasLt.so"
elif [ ! -f "$work/.cublas-$cublas_version" ]; then
    log "downloading nvidia-cublas==$cublas_version"
    python3 -m pip download -q --no-deps --only-binary :all: -d "$work/dl" "nvidia-cublas==$cublas_version"
    python3 -m zipfile -e "$work"/dl/nvidia_cublas-"$cublas_version"-*.whl "$work/cublas-$cublas_version"
    # The wheel ships only the versioned sonames; the linker looks for the plain names.
    ln -sf libcublas.so.13 "$cublas/lib/libcublas.so"
    ln -sf libcublasLt.so.13 "$cublas/lib/libcublasLt.so"
    touch "$work/.cublas-$cublas_version"
fi

# 3. libcuda: ggml-cuda links the driver API, and there is no driver here. An empty library with the
#    driver's soname satisfies the linker; the GPU machine's real libcuda.so.1 is loaded at run time.
stub=$work/cuda-stub
if [ ! -f "$stub/libcuda.so" ]; then
    mkdir -p "$stub"
    echo 'void ggtriton_cuda_stub(void) {}' >"$stub/empty.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub/libcuda.so" "$stub/empty.c"
fi

# 4. Configure. GGML_BACKEND_DL makes CUDA a module (libggml-cuda.so) that is skipped where no driver
#    loads, so the same binaries fall back to the CPU backend here.
build=$work/build-$py_version
flags=(-DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF
    -DGGML_BACKEND_DL=ON -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
    "-DCUDA_cublas_LIBRARY=$cublas_lib/libcublas.so" "-DCUDA_cublasLt_LIBRARY=$cublas_lib/libcublasLt.so"
    "-DCUDA_cuda_driver_LIBRARY=$stub/libcuda.so"
    "-DCMAKE_CUDA_FLAGS=-I$cublas/include" "-DCMAKE_CXX_FLAGS=-I$cublas/include"
    # RUNPATH $ORIGIN, not this machine's folders: the bundle's libraries find each other wherever it is
    # unpacked, and the linker's stub libcuda is never found in place of the real driver.
    -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON '-DCMAKE_INSTALL_RPATH=$ORIGIN'
    # The empty stub defines no symbol, so --as-needed (gcc's default here) would drop it, and the CUDA
    # module would then fail to load on the GPU machine with "undefined symbol: cuMemCreate".
    -DCMAKE_MODULE_LINKER_FLAGS=-Wl,--no-as-needed)
if [ ! -f "$build/build.ninja" ] || [ "$(cat "$build/.flags" 2>/dev/null)" != "${flags[*]}" ]; then
    log "configuring $build"
    cmake -S "$src" -B "$build" -G Ninja "${flags[@]}" >"$work/cmake.log" 2>&1 \
        || { tail -30 "$work/cmake.log"; exit 1; }
    echo "${flags[*]}" >"$build/.flags"
fi

# 5. Compile only the two benchmarks and the backend modules they load (~290 steps, mostly CUDA templates).
targets=(bin/llama-bench bin/llama-batched-bench bin/libggml-cuda.so bin/libggml-cpu.so)
log "compiling with $jobs jobs (ninja prints [done/total])"
t0=$SECONDS
ninja -C "$build" -j "$jobs" "${targets[@]}"
# Compile time summed over the runs that finished (an interrupted run's share is not counted).
echo $(($(cat "$build/.compile_seconds" 2>/dev/null || echo 0) + SECONDS - t0)) >"$build/.compile_seconds"

# 6. Stage: every executable and shared library the benchmarks need, in one folder, stripped.
stage=$work/stage
rm -rf "$stage" && mkdir -p "$stage"
cp "$build"/bin/llama-bench "$build"/bin/llama-batched-bench "$stage"/
cp -P "$build"/bin/*.so* "$stage"/
strip --strip-unneeded "$stage"/*
# Fail here, not on the GPU machine, if a library is missing (but the driver, which only it has).
for f in llama-bench llama-batched-bench libggml-cuda.so libggml-cpu.so; do
    if LD_LIBRARY_PATH=$stage:$cublas/lib ldd "$stage/$f" | grep 'not found' | grep -v libcuda.so.1; then
        exit 1
    fi
done
readelf -d "$stage/libggml-cuda.so" | grep -q 'NEEDED.*libcuda.so.1' \
    || { echo "libggml-cuda.so does not name libcuda.so.1: it would not load on a GPU" >&2; exit 1; }
# The sdist has no git history; its changelog names the llama.cpp commit of each release.
commit=$(grep -A3 "^## \[$py_version\]" "$src/../../CHANGELOG.md" | grep -o -m1 'llama.cpp@[0-9a-f]*' \
    | cut -d@ -f2 || true)
nvcc_version=$(nvcc --version | tail -1)
log "packing $out/llamacpp-cuda.tar.xz"
tar -C "$stage" -cf - . | xz -9 -T"$jobs" >"$out/llamacpp-cuda.tar.xz.part"
mv "$out/llamacpp-cuda.tar.xz.part" "$out/llamacpp-cuda.tar.xz"
size=$(stat -c %s "$out/llamacpp-cuda.tar.xz")
python3 - "$out/manifest.json" <<EOF
import json, sys
json.dump({
    "archive": "llamacpp-cuda.tar.xz", "archive_bytes": $size,
    "llama_cpp_python": "$py_version", "llama_cpp_commit": "$commit",
    "nvcc": "$nvcc_version", "cuda_architectures": "90", "nvidia_cublas": "$cublas_version",
    "cmake_flags": [f for f in """${flags[*]}""".split() if "$work" not in f],
    "files": sorted("""$(cd "$stage" && ls)""".split()),
    "compile_seconds": $(cat "$build/.compile_seconds"), "jobs": $jobs,
}, open(sys.argv[1], "w"), indent=1)
EOF
log "bundle: $out ($(awk "BEGIN {printf \"%.1f\", $size / 1048576}") MiB, llama.cpp $commit)"
[ "$size" -le $((40 * 1048576)) ] || { echo "bundle over 40 MiB" >&2; exit 1; }

# 7. Check on this machine: the binaries start, skip the CUDA module where no driver loads, read GGUF.
if model=$(python3 -c "from ggtriton.gguf.bundled import smollm2_path; print(smollm2_path())" 2>/dev/null); then
    log "CPU-fallback check on $model"
    # One thread: llama.cpp's threads spin at their barriers, which collapses on a busy 2-core machine.
    python3 "$here/llamacpp.py" "$model" --bundle "$out" --allow-cpu --quick --threads 1
else
    log "ggtriton's bundled SmolLM2 not importable: skipping the CPU-fallback check"
fi
