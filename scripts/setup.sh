#!/usr/bin/env bash
# Set up pocketembed from a fresh checkout: a virtualenv in .venv with the package
# (editable) and its extras, the prepared models, and a smoke test that a quantized
# model really embeds with the installed llama.cpp build.
#
#   bash scripts/setup.sh            # honours PYTHON, VENV, CMAKE_ARGS
#
# llama-cpp-python is built from source with ggml's own thread pool instead of
# OpenMP, and without a BLAS backend (GGML_OPENMP=OFF, GGML_BLAS=OFF): measured
# with scripts/bench_peers.py and perf, OpenMP's passive barriers (one futex
# sleep per graph node) doubled a single SMS's latency on 2 threads, and the BLAS
# backend dequantized every weight to f32 on every decode of 32+ tokens, slower
# than ggml's q8_0 kernels up to whole 512-token batches. The phone build
# (android/termux/install.sh) uses the same two flags. The built wheel is cached
# (~/.cache/pocketembed/wheels, keyed by the build flags and the patches), so a second setup
# does not rebuild.
# The sources are patched first (scripts/patches/*.patch, in name order): on AVX-512, ggml
# ran the attention of 32-wide heads (MiniLM, bge-small, e5-small) and GELU element by
# element; packed batches' attention read its mask one element at a time; on VNNI its q8_0
# matmul spent two sign steps per block pair; a short text's attention called expf and
# converted an f16 accumulator per key; and the q8_0 matmul split its tiles between threads
# in fixed halves, so one delayed thread held the other at every barrier; and q8_0 had no
# repacked x86 layout, so its matmuls ran at a third of VNNI's rate. Each patch's header has
# the measurements.
# On x86 the build is not "native": GCC 12 miscompiles ggml's AMX matmul and a
# native build on an AMX Xeon dies with SIGSEGV on the first q8_0/q4_0 embed
# (llama.cpp #20824). We enable the SIMD the CPU has, AMX excluded. If the smoke
# test still fails, we rebuild from source without the wheel cache.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
LLAMA_VERSION=0.3.36
LLAMA_PATCHES=(scripts/patches/*.patch)
TORCH_VERSION=2.13.0

say() { printf '==> %s\n' "$*"; }

cmake_args_for_this_cpu() {
    case "$(uname -m)" in
    x86_64 | amd64)
        local flags args="-DGGML_OPENMP=OFF -DGGML_BLAS=OFF -DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF"
        flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
        local pair
        for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
            avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
            if [[ $flags == *" ${pair%%:*} "* ]]; then args+=" -DGGML_${pair##*:}=ON"; else args+=" -DGGML_${pair##*:}=OFF"; fi
        done
        echo "$args"
        ;;
    *) echo "-DGGML_OPENMP=OFF -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF" ;; # ARM: llama.cpp's own feature detection is right there
    esac
}

smoke_test() {
    # In a child process: a crash (SIGSEGV/SIGILL) must not take this script down.
    "$VENV/bin/python" - <<'EOF'
from pocketembed.daemon.models import open_engine
for name in ("all-minilm-l6-v2:q8_0", "all-minilm-l6-v2:q4_0"):
    spec, engine = open_engine(name)
    v = engine.embed(["smoke test of the installed llama.cpp build"])
    assert v.shape == (1, 384) and abs(float((v * v).sum()) - 1) < 1e-3, v.shape
    engine.close()
import os
from pocketembed.daemon.llama_runtime import cpu_features
if os.environ.get("POCKETEMBED_EXPECT_OPENMP") == "0" and cpu_features().get("OPENMP"):
    raise SystemExit("this llama-cpp-python build uses OpenMP, not the build asked for (GGML_OPENMP=OFF)")
print("smoke test passed: q8_0 and q4_0 embed")
EOF
}

wheel_cache() {
    # One cached wheel per llama-cpp-python version, build flags and source patches.
    printf '%s/pocketembed/wheels/%s' "${XDG_CACHE_HOME:-$HOME/.cache}" \
        "$({ printf '%s %s\n' "$LLAMA_VERSION" "$CMAKE_ARGS"; cat "${LLAMA_PATCHES[@]}"; } | sha256sum | cut -c1-12)"
}

build_llama_wheel() {
    # The sdist, patched, built into the wheel cache $1.
    local src tree
    src=$(mktemp -d)
    # The sources and the build tree take ~0.5 GB: gone even if a step below fails.
    # shellcheck disable=SC2064  # expanded now: $src is local
    trap "rm -rf '$src'" EXIT
    tree="$src/llama_cpp_python-$LLAMA_VERSION"
    "$VENV/bin/pip" download -q --no-deps --no-binary :all: --no-cache-dir -d "$src" "llama-cpp-python==$LLAMA_VERSION"
    tar xzf "$tree.tar.gz" -C "$src"
    local patch
    for patch in "${LLAMA_PATCHES[@]}"; do git -C "$tree" apply -p1 "$PWD/$patch"; done
    mkdir -p "$1"
    # --no-cache-dir: pip's own wheel cache ignores CMAKE_ARGS and would hand back an older build.
    CMAKE_ARGS="$CMAKE_ARGS" "$VENV/bin/pip" wheel -q --no-deps --no-cache-dir --wheel-dir "$1" "$tree"
    rm -rf "$src"
    trap - EXIT
}

install_llama() {
    local cache
    cache=$(wheel_cache)
    if ! ls "$cache"/llama_cpp_python-*.whl >/dev/null 2>&1; then
        say "building llama-cpp-python $LLAMA_VERSION from source with ${LLAMA_PATCHES[*]} (5-8 min on 2 cores)"
        build_llama_wheel "$cache"
    else
        say "reusing the llama-cpp-python wheel built earlier ($cache)"
    fi
    "$VENV/bin/pip" install -q --force-reinstall --no-deps "$cache"/llama_cpp_python-*.whl
}

install_java_libs() {
    # The Android-side Java client is tested against the daemon with Debian's JeroMQ and msgpack-java.
    [ -f /usr/share/java/jeromq.jar ] && [ -f /usr/share/java/msgpack-core.jar ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing libjeromq-java and libmsgpack-java (for the Java client's test)"
        apt-get install -y -qq libjeromq-java libmsgpack-java >/dev/null 2>&1 ||
            { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libjeromq-java libmsgpack-java >/dev/null 2>&1; } ||
            say "could not install the Java libraries; the Java client test will fail"
    fi
}

install_shellcheck() {
    # tests/test_android.py checks the Termux scripts with shellcheck.
    command -v shellcheck >/dev/null && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing shellcheck (for the Termux scripts' test)"
        apt-get install -y -qq shellcheck >/dev/null 2>&1 ||
            { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq shellcheck >/dev/null 2>&1; } ||
            say "could not install shellcheck; its test will skip"
    fi
}

install_java_libs
install_shellcheck
if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip

export CMAKE_ARGS=${CMAKE_ARGS:-$(cmake_args_for_this_cpu)}
if [[ " $CMAKE_ARGS " == *" -DGGML_OPENMP=OFF "* ]]; then export POCKETEMBED_EXPECT_OPENMP=0; fi
say "installing torch $TORCH_VERSION (CPU build) first, so no other torch build is pulled in"
if ! "$VENV/bin/pip" install -q "torch==$TORCH_VERSION+cpu" 2>/dev/null; then
    say "no torch $TORCH_VERSION+cpu file found; trying torch==$TORCH_VERSION"
    "$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
fi
install_llama
say "installing pocketembed with its extras"
"$VENV/bin/pip" install -q -e ".[daemon,prepare,reference,test]"

say "preparing models into ${POCKETEMBED_HOME:-the default data directory}"
"$VENV/bin/pocketembed" models prepare

if ! smoke_test; then
    say "smoke test failed with this llama-cpp-python; dropping its cached wheel and rebuilding it with CMAKE_ARGS=$CMAKE_ARGS"
    rm -rf "$(wheel_cache)"
    install_llama
    smoke_test
fi
say "done: run '$VENV/bin/pocketembed --help'"
