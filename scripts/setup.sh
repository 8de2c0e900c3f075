#!/usr/bin/env bash
# Set up pocketembed from a fresh checkout: a virtualenv in .venv with the package
# (editable) and its extras, the prepared models, and a smoke test that a quantized
# model really embeds with the installed llama.cpp build.
#
#   bash scripts/setup.sh            # honours PYTHON, VENV, CMAKE_ARGS, PIP_FIND_LINKS
#
# llama-cpp-python is built from source unless pip finds a wheel (PIP_FIND_LINKS).
# On x86 the build is not "native": GCC 12 miscompiles ggml's AMX matmul and a
# native build on an AMX Xeon dies with SIGSEGV on the first q8_0/q4_0 embed
# (llama.cpp #20824). We enable the SIMD the CPU has, AMX excluded. If the smoke
# test still fails (a wheel for another CPU: SIGILL), we rebuild from source.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
LLAMA_VERSION=0.3.36
TORCH_VERSION=2.13.0

say() { printf '==> %s\n' "$*"; }

cmake_args_for_this_cpu() {
    case "$(uname -m)" in
    x86_64 | amd64)
        local flags args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF"
        flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
        local pair
        for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
            avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
            if [[ $flags == *" ${pair%%:*} "* ]]; then args+=" -DGGML_${pair##*:}=ON"; else args+=" -DGGML_${pair##*:}=OFF"; fi
        done
        echo "$args"
        ;;
    *) echo "-DLLAVA_BUILD=OFF" ;; # ARM: llama.cpp's own feature detection is right there
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
print("smoke test passed: q8_0 and q4_0 embed")
EOF
}

if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip

export CMAKE_ARGS=${CMAKE_ARGS:-$(cmake_args_for_this_cpu)}
say "installing torch $TORCH_VERSION first (so no other torch build is pulled in)"
"$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
say "installing pocketembed with extras (llama-cpp-python: wheel if one is on PIP_FIND_LINKS, else a source build, ~7-12 min)"
"$VENV/bin/pip" install -q "llama-cpp-python==$LLAMA_VERSION"
"$VENV/bin/pip" install -q -e ".[prepare,reference,test]"

say "preparing models into ${POCKETEMBED_HOME:-the default data directory}"
"$VENV/bin/pocketembed" models prepare

if ! smoke_test; then
    say "smoke test failed with this llama-cpp-python; rebuilding it from source with CMAKE_ARGS=$CMAKE_ARGS"
    PIP_FIND_LINKS="" "$VENV/bin/pip" install -q --force-reinstall --no-deps --no-cache-dir \
        --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_VERSION"
    smoke_test
fi
say "done: run '$VENV/bin/pocketembed --help'"
