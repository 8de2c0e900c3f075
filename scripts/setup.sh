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
# the measurements. The sdist is the one scripts/llama.lock pins (its sha256 is checked), the
# patches are applied by scripts/patches/apply.sh, and POCKETEMBED_LLAMA_PATCHES=none builds stock
# llama.cpp (or "1,2,6": those patches only); scripts/patches/README.md has the workflow. The wheel
# carries a build record (llama_cpp/pocketembed_build.json: version, llama.cpp commit, patches,
# CMAKE_ARGS) that the daemon reports in `pocketembed status`.
# On x86 the build is not "native": GCC 12 miscompiles ggml's AMX matmul and a
# native build on an AMX Xeon dies with SIGSEGV on the first q8_0/q4_0 embed
# (llama.cpp #20824). We enable the SIMD the CPU has, AMX excluded. If the smoke
# test still fails, we rebuild from source without the wheel cache.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
LLAMA_LOCK=scripts/llama.lock
lock() { sed -n "s/^$1=//p" "$LLAMA_LOCK" | head -n1; }
LLAMA_VERSION=$(lock LLAMA_CPP_PYTHON_VERSION)
LLAMA_SDIST=$(lock LLAMA_CPP_PYTHON_SDIST)
LLAMA_SHA256=$(lock LLAMA_CPP_PYTHON_SHA256)
if [ -z "$LLAMA_VERSION" ] || [ -z "$LLAMA_SDIST" ] || [ -z "$LLAMA_SHA256" ]; then
    echo "$LLAMA_LOCK lacks LLAMA_CPP_PYTHON_VERSION, _SDIST or _SHA256" >&2
    exit 1
fi
LLAMA_PATCHES=() # the patches POCKETEMBED_LLAMA_PATCHES selects (all by default), in order
LLAMA_PATCH_LIST=$(bash scripts/patches/apply.sh --list)
[ -z "$LLAMA_PATCH_LIST" ] || mapfile -t LLAMA_PATCHES <<<"$LLAMA_PATCH_LIST"
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
    # One cached wheel per pinned sdist, build flags and selected source patches (none: stock).
    printf '%s/pocketembed/wheels/%s' "${XDG_CACHE_HOME:-$HOME/.cache}" \
        "$({
            printf '%s %s %s record-1\n' "$LLAMA_VERSION" "$LLAMA_SHA256" "$CMAKE_ARGS"
            if [ ${#LLAMA_PATCHES[@]} -eq 0 ]; then echo "patches: none"; else cat "${LLAMA_PATCHES[@]}"; fi
        } | sha256sum | cut -c1-12)"
}

download_llama_sdist() {
    # The pinned sdist into directory $1, its sha256 checked against scripts/llama.lock.
    "$VENV/bin/pip" download -q --no-deps --no-binary :all: --no-cache-dir -d "$1" "llama-cpp-python==$LLAMA_VERSION"
    bash scripts/patches/apply.sh --verify-sdist "$1/$LLAMA_SDIST"
}

write_build_record() {
    # What the wheel is built from, into the package itself ($1): the daemon reports it at run time.
    "$VENV/bin/python" - "$1" "$LLAMA_LOCK" "${LLAMA_PATCHES[@]}" <<'PY'
import json, os, sys, time
out, lock, patches = sys.argv[1], sys.argv[2], sys.argv[3:]
pin = dict(line.split("=", 1) for line in open(lock).read().splitlines() if "=" in line and not line.startswith("#"))
record = {"llama_cpp_python": pin["LLAMA_CPP_PYTHON_VERSION"], "sdist_sha256": pin["LLAMA_CPP_PYTHON_SHA256"],
          "llama_cpp_commit": pin.get("LLAMA_CPP_COMMIT"), "llama_cpp_build": pin.get("LLAMA_CPP_BUILD"),
          "patches": [os.path.basename(p) for p in patches],
          "patch_set": os.environ.get("POCKETEMBED_LLAMA_PATCHES") or "all",
          "cmake_args": os.environ.get("CMAKE_ARGS", ""), "built_by": "scripts/setup.sh",
          "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
with open(out, "w") as f:
    json.dump(record, f, indent=1)
PY
}

build_llama_wheel() {
    # The sdist, patched, built into the wheel cache $1.
    local src tree
    src=$(mktemp -d)
    # The sources and the build tree take ~0.5 GB: gone even if a step below fails.
    # shellcheck disable=SC2064  # expanded now: $src is local
    trap "rm -rf '$src'" EXIT
    download_llama_sdist "$src"
    tar xzf "$src/$LLAMA_SDIST" -C "$src"
    tree="$src/${LLAMA_SDIST%.tar.gz}"
    bash scripts/patches/apply.sh "$tree"
    write_build_record "$tree/llama_cpp/pocketembed_build.json"
    mkdir -p "$1"
    cp "$tree/llama_cpp/pocketembed_build.json" "$1/build.json"
    # --no-cache-dir: pip's own wheel cache ignores CMAKE_ARGS and would hand back an older build.
    CMAKE_ARGS="$CMAKE_ARGS" "$VENV/bin/pip" wheel -q --no-deps --no-cache-dir --wheel-dir "$1" "$tree"
    rm -rf "$src"
    trap - EXIT
}

install_llama() {
    local cache
    cache=$(wheel_cache)
    if ! ls "$cache"/llama_cpp_python-*.whl >/dev/null 2>&1; then
        say "building llama-cpp-python $LLAMA_VERSION from source with ${LLAMA_PATCHES[*]:-no patches (stock llama.cpp)} (5-8 min on 2 cores)"
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
"$VENV/bin/pip" install -q -e ".[daemon,http,prepare,reference,test]"

say "preparing models into ${POCKETEMBED_HOME:-the default data directory}"
"$VENV/bin/pocketembed" models prepare

if ! smoke_test; then
    say "smoke test failed with this llama-cpp-python; dropping its cached wheel and rebuilding it with CMAKE_ARGS=$CMAKE_ARGS"
    rm -rf "$(wheel_cache)"
    install_llama
    smoke_test
fi
say "done: run '$VENV/bin/pocketembed --help'"
