#!/usr/bin/env bash
# Verify pocketembed's engine on ARM kernels, on an x86 machine:
#   1. cross-compile llama.cpp's libraries (the sources inside the llama-cpp-python sdist this
#      project uses) for aarch64 twice: -march=armv8.2-a+dotprod, and armv8.2-a+dotprod+i8mm;
#   2. make an arm64 Debian root with debootstrap (python3, numpy, jinja2: what llama_cpp imports);
#   3. run pocketembed's own Engine under qemu-aarch64 user-mode emulation on each build
#      (LLAMA_CPP_LIB_PATH pointing at it), embedding real SMS with q8_0 and q4_0;
#   4. compare with the x86 vectors of the same texts and print the table.
#
# Usage: scripts/arm_verify.sh [--texts N] [--build-only] [--bench-builds]
#   --build-only    the two builds and the root, no comparison (what CI runs before the tests)
#   --bench-builds  the same plus scripts/bench_arm.py's other builds, then stop: plain armv8-a
#                   (lib-armv8a) and KleidiAI's kernels on each phone target (lib-dotprod-kleidiai,
#                   lib-i8mm-kleidiai; -DGGML_CPU_KLEIDIAI=ON). llama.cpp's CMake downloads KleidiAI
#                   from GitHub; where that is unreachable, POCKETEMBED_KLEIDIAI_SRC=DIR names an
#                   unpacked KleidiAI source tree (the release llama.cpp pins, v1.24.0). A KleidiAI
#                   build that cannot be made leaves $WORK/lib-NAME.unavailable with the reason.
# Needs: aarch64-linux-gnu-gcc/g++ (g++-aarch64-linux-gnu), qemu-aarch64-static (qemu-user-static),
# debootstrap, cmake, and network access to a Debian mirror the first time. With --install (as
# root) it installs those Debian packages. Everything is cached in $POCKETEMBED_ARM_DIR
# (default ~/.cache/pocketembed/arm); a second run rebuilds nothing.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${POCKETEMBED_ARM_DIR:-$HOME/.cache/pocketembed/arm}
PY=${PYTHON:-python3}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
TEXTS=64
BUILD_ONLY=0
BENCH_BUILDS=0
INSTALL=0
while [ $# -gt 0 ]; do
    case "$1" in
        --texts) TEXTS=$2; shift 2 ;;
        --build-only) BUILD_ONLY=1; shift ;;
        --bench-builds) BENCH_BUILDS=1; BUILD_ONLY=1; shift ;;
        --install) INSTALL=1; shift ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "arm_verify: unknown argument $1" >&2; exit 2 ;;
    esac
done

say() { printf 'arm_verify: %s\n' "$*" >&2; }

if [ "$INSTALL" = 1 ]; then
    apt-get install -y -q g++-aarch64-linux-gnu qemu-user-static debootstrap cmake >/dev/null
fi
missing=""
for tool in aarch64-linux-gnu-gcc aarch64-linux-gnu-g++ qemu-aarch64-static debootstrap cmake; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
if [ -n "$missing" ]; then
    say "missing:$missing (Debian: g++-aarch64-linux-gnu qemu-user-static debootstrap cmake; or run with --install)"
    exit 3
fi
mkdir -p "$WORK"

# 1. The llama.cpp sources of the llama-cpp-python version this project runs.
VERSION=$("$PY" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))')
SRC="$WORK/llama_cpp_python-$VERSION"
if [ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]; then
    say "fetching the llama-cpp-python $VERSION sdist"
    sdist=$(ls "$WORK"/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || true)
    if [ -z "$sdist" ]; then
        "$PY" -m pip download --no-deps --no-binary :all: "llama_cpp_python==$VERSION" -d "$WORK" -q
        sdist="$WORK/llama_cpp_python-$VERSION.tar.gz"
    fi
    tar -xzf "$sdist" -C "$WORK"
fi

# The phone's ARM flags and -march per CPU class (android/termux/install.sh builds with the same).
lock() { sed -n "s/^$1=//p" "$REPO/scripts/llama.lock" | head -n1; }
read -r -a ARM_ARGS <<<"$(lock LLAMA_ARM_CMAKE_ARGS)"
MARCH_DOTPROD=$(lock LLAMA_ARM_MARCH_DOTPROD)
MARCH_I8MM=$(lock LLAMA_ARM_MARCH_I8MM)
MARCH_BASE=$(lock LLAMA_ARM_MARCH_BASE)

build() {  # build NAME MARCH [EXTRA CMAKE ARGS...]; fails (status 1) leaving the logs, without exiting
    local name=$1 march=$2 out="$WORK/lib-$1"
    shift 2
    if [ -f "$out/libllama.so" ]; then return 0; fi
    say "cross-compiling llama.cpp for aarch64 ($march${*:+ $*})"
    cmake -S "$SRC/vendor/llama.cpp" -B "$WORK/build-$name" -G "Unix Makefiles" \
        -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
        -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ \
        -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
        "${ARM_ARGS[@]}" -DGGML_CPU_ARM_ARCH="$march" \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_COMMON=OFF "$@" >"$WORK/cmake-$name.log" 2>&1 || return 1
    cmake --build "$WORK/build-$name" --target llama -j "$(nproc)" >"$WORK/build-$name.log" 2>&1 || return 1
    mkdir -p "$out"
    find "$WORK/build-$name" -name '*.so*' -exec cp -a {} "$out/" \;
}
build dotprod "$MARCH_DOTPROD" || { say "build failed: see $WORK/cmake-dotprod.log, $WORK/build-dotprod.log"; exit 1; }
build i8mm "$MARCH_I8MM" || { say "build failed: see $WORK/cmake-i8mm.log, $WORK/build-i8mm.log"; exit 1; }

if [ "$BENCH_BUILDS" = 1 ]; then
    build armv8a "$MARCH_BASE" || { say "build failed: see $WORK/cmake-armv8a.log, $WORK/build-armv8a.log"; exit 1; }
    kleidiai=()
    if [ -n "${POCKETEMBED_KLEIDIAI_SRC:-}" ]; then
        # FetchContent takes this tree instead of downloading (and checks no MD5 of it).
        kleidiai=("-DFETCHCONTENT_SOURCE_DIR_KLEIDIAI=$POCKETEMBED_KLEIDIAI_SRC")
        origin="the local tree $POCKETEMBED_KLEIDIAI_SRC (POCKETEMBED_KLEIDIAI_SRC), not downloaded"
    else
        origin="downloaded by llama.cpp's CMake from GitHub (its pinned release)"
    fi
    # GCC 12 (Debian bookworm's cross compiler) stops with an internal compiler error in
    # vect_transform_reduction on KleidiAI's kai_lhs_quant_pack_qai8dxp_bf16_neon.c. A hook run
    # right after KleidiAI's project() adds -fno-tree-loop-vectorize to its directory's C flags
    # only: KleidiAI's kernels are assembly or NEON intrinsics, and ggml's own files keep theirs.
    if [ "$(aarch64-linux-gnu-gcc -dumpversion | cut -d. -f1)" -lt 13 ]; then
        echo 'string(APPEND CMAKE_C_FLAGS " -fno-tree-loop-vectorize")' >"$WORK/kleidiai-gcc12.cmake"
        kleidiai+=("-DCMAKE_PROJECT_KleidiAI_INCLUDE=$WORK/kleidiai-gcc12.cmake")
    fi
    for variant in "dotprod:$MARCH_DOTPROD" "i8mm:$MARCH_I8MM"; do
        name="${variant%%:*}-kleidiai" march="${variant#*:}"
        [ -f "$WORK/lib-$name/libllama.so" ] && continue
        rm -f "$WORK/lib-$name.unavailable"
        say "KleidiAI sources: $origin"
        if build "$name" "$march" -DGGML_CPU_KLEIDIAI=ON "${kleidiai[@]}"; then
            echo "KleidiAI: $origin" >"$WORK/lib-$name/kleidiai-source.txt"
        else
            if grep -qiE "kleidiai.*(download|fetch)|could not resolve|error: downloading" "$WORK/cmake-$name.log" 2>/dev/null; then
                why="KleidiAI's sources could not be downloaded (GitHub unreachable?); set POCKETEMBED_KLEIDIAI_SRC to an unpacked KleidiAI v1.24.0"
            else
                why="the KleidiAI build failed: see $WORK/cmake-$name.log and $WORK/build-$name.log"
            fi
            echo "$why" >"$WORK/lib-$name.unavailable"
            rm -rf "$WORK/build-$name"
            say "lib-$name not built: $why"
        fi
    done
fi

# 2. An arm64 root. Only debootstrap's first stage runs (the second needs binfmt_misc to run arm64
#    programs); every downloaded package is then unpacked by hand, which is all a Python needs.
ROOT="$WORK/root"
if [ ! -f "$ROOT/.unpacked" ]; then
    say "making an arm64 Debian $SUITE root with debootstrap"
    rm -rf "$ROOT"
    debootstrap --arch=arm64 --foreign --variant=minbase \
        --include=python3,python3-numpy,python3-jinja2,python3-typing-extensions,python3-diskcache \
        "$SUITE" "$ROOT" "$MIRROR" >"$WORK/debootstrap.log"
    for deb in "$ROOT"/var/cache/apt/archives/*.deb; do
        dpkg-deb -x "$deb" "$ROOT"
    done
    touch "$ROOT/.unpacked"
fi
# What the skipped maintainer scripts would have done for numpy: the BLAS/LAPACK alternatives.
for lib in "$ROOT"/usr/lib/aarch64-linux-gnu/blas/lib*.so.3 "$ROOT"/usr/lib/aarch64-linux-gnu/lapack/lib*.so.3; do
    [ -e "$lib" ] || continue
    link="$ROOT/usr/lib/aarch64-linux-gnu/$(basename "$lib")"
    # Relative: qemu maps the root's absolute paths, the kernel resolving a symlink does not.
    [ -e "$link" ] || ln -s "$(basename "$(dirname "$lib")")/$(basename "$lib")" "$link"
done

if [ "$BUILD_ONLY" = 1 ]; then
    if [ "$BENCH_BUILDS" = 1 ]; then
        built=""
        for lib in "$WORK"/lib-*/libllama.so; do built="$built $(basename "$(dirname "$lib")")"; done
        say "built:$built; root $ROOT"
    else
        say "built: $WORK/lib-dotprod, $WORK/lib-i8mm, root $ROOT"
    fi
    exit 0
fi

# 3 + 4. Embed under emulation, compare with x86.
"$PY" "$REPO/scripts/arm_compare.py" --work "$WORK" --texts "$TEXTS" --llama-src "$SRC"
