#!/data/data/com.termux/files/usr/bin/bash
# Install pocketembed on an Android phone under Termux (from F-Droid or GitHub, not the Play Store).
#
#   bash android/termux/install.sh [SOURCE]     SOURCE: a pocketembed checkout or sdist (default: this checkout)
#
# What it does:
#   1. installs Termux packages: python and its numpy, a C/C++ toolchain, cmake, ZeroMQ, termux-api
#      (battery readings) and termux-services (runit);
#   2. builds llama-cpp-python from source for this phone's CPU, the version scripts/llama.lock pins
#      (the sdist's sha256 checked; the x86 patches of scripts/patches are not applied) with the
#      flags the lock names for ARM, the ones docs/arm.md measured: GGML_NATIVE=OFF with the -march
#      of the ARM features /proc/cpuinfo reports (asimddp → dotprod, + i8mm; else armv8-a),
#      keeping llama.cpp's load-time repacking of q4_0/q8_0 weights (GGML_CPU_REPACK) that lets the
#      dotprod/i8mm kernels run on interleaved blocks;
#   3. installs pocketembed, prepares the default model, and installs the service and boot scripts.
# Re-running it is safe: pip skips what is installed, `models prepare` what is prepared.
set -euo pipefail

PREFIX=${PREFIX:-/data/data/com.termux/files/usr}
SRC=${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
say() { printf 'pocketembed-install: %s\n' "$*"; }
# The llama-cpp-python release the desktop build pins too, read from this script's own checkout.
LLAMA_LOCK="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/scripts/llama.lock"
lock() { sed -n "s/^$1=//p" "$LLAMA_LOCK" | head -n1; }
[ -f "$LLAMA_LOCK" ] || { say "$LLAMA_LOCK is missing: run this script from a pocketembed checkout"; exit 1; }
LLAMA_VERSION=$(lock LLAMA_CPP_PYTHON_VERSION)
LLAMA_SDIST=$(lock LLAMA_CPP_PYTHON_SDIST)
LLAMA_SHA256=$(lock LLAMA_CPP_PYTHON_SHA256)

# Android's own termux package names (Termux main repository).
if [ "${POCKETEMBED_SKIP_PKG:-0}" != 1 ]; then
    pkg update -y
    pkg install -y python python-numpy python-pip clang cmake ninja make binutils git libzmq \
        termux-api termux-services termux-tools
fi

march_flags() {
    # The -march of the build docs/arm.md measured for this CPU's ARM features (scripts/llama.lock).
    local feats
    feats=$(grep -m1 -i '^Features' "${POCKETEMBED_CPUINFO:-/proc/cpuinfo}" || true)
    case " $feats " in
        *" asimddp "*" i8mm "*|*" i8mm "*" asimddp "*) lock LLAMA_ARM_MARCH_I8MM ;;
        *" asimddp "*) lock LLAMA_ARM_MARCH_DOTPROD ;;
        *) lock LLAMA_ARM_MARCH_BASE ;;
    esac
}

ARCH=$(uname -m)
if [ "$ARCH" = aarch64 ]; then
    MARCH=$(march_flags)
    say "building llama.cpp for $MARCH"
    CMAKE_ARGS="$(lock LLAMA_ARM_CMAKE_ARGS) -DGGML_CPU_ARM_ARCH=$MARCH -DLLAVA_BUILD=OFF"
    export CMAKE_ARGS
else
    say "not an aarch64 phone ($ARCH): letting llama.cpp detect the CPU"
    export CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF"
fi
# pyzmq links Termux's libzmq instead of building its bundled copy.
export ZMQ_PREFIX="$PREFIX"

if python -m pip show llama-cpp-python 2>/dev/null | grep -qx "Version: $LLAMA_VERSION"; then
    say "llama-cpp-python $LLAMA_VERSION is installed"
else
    sdist_dir=$(mktemp -d "${TMPDIR:-$PREFIX/tmp}/pe-llama.XXXXXX")
    python -m pip download -q --no-deps --no-binary :all: --no-cache-dir -d "$sdist_dir" "llama-cpp-python==$LLAMA_VERSION"
    got=$(sha256sum "$sdist_dir/$LLAMA_SDIST" | cut -d' ' -f1)
    if [ "$got" != "$LLAMA_SHA256" ]; then
        say "$LLAMA_SDIST: sha256 mismatch: expected $LLAMA_SHA256 (scripts/llama.lock), got $got"
        rm -rf "$sdist_dir"
        exit 1
    fi
    say "building llama-cpp-python $LLAMA_VERSION (sha256 checked)"
    python -m pip install --no-cache-dir "$sdist_dir/$LLAMA_SDIST"
    rm -rf "$sdist_dir"
fi
python -m pip install "${SRC}[daemon,http]"
if ! pocketembed models list >/dev/null 2>&1 || ! pocketembed models prepare all-minilm-l6-v2:q8_0; then
    say "model preparation needs pip's 'prepare' extra (torch); prepare the models on a computer with"
    say "'pocketembed models prepare' and copy \$POCKETEMBED_HOME/models to the phone instead"
fi

# The service (termux-services / runit) and the boot script (Termux:Boot).
mkdir -p "$PREFIX/var/service/pocketembed/log" "$HOME/.termux/boot"
install -m 755 "$SRC/android/termux/service/pocketembed/run" "$PREFIX/var/service/pocketembed/run"
install -m 755 "$SRC/android/termux/service/pocketembed/log/run" "$PREFIX/var/service/pocketembed/log/run"
install -m 755 "$SRC/android/termux/boot/start-pocketembed" "$HOME/.termux/boot/start-pocketembed"
touch "$PREFIX/var/service/pocketembed/down"   # not started until `sv-enable pocketembed`
say "installed. Start it: sv-enable pocketembed; check: pocketembed status"
