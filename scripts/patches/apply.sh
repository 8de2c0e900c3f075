#!/usr/bin/env bash
# Apply pocketembed's llama.cpp patches (scripts/patches/N-*.patch, in number order) to an unpacked
# llama-cpp-python sdist of the version scripts/llama.lock pins.
#
#   bash scripts/patches/apply.sh SRC_TREE           apply them (idempotent: applied ones are skipped)
#   bash scripts/patches/apply.sh --check SRC_TREE   only check that they apply; SRC_TREE is not touched
#   bash scripts/patches/apply.sh --list             print the selected patches' paths, one a line
#   bash scripts/patches/apply.sh --verify-sdist F   check sdist F's sha256 against scripts/llama.lock
#   bash scripts/patches/apply.sh --check-sdist F    that, then --check on F unpacked in a temp dir
#
# POCKETEMBED_LLAMA_PATCHES chooses them: unset, empty or "all" = every patch; "none" = stock
# llama.cpp; a comma list of numbers ("1,2,6") = those patches only, still in number order.
# For each patch: if it reverse-applies it is already applied and skipped; else if it applies it is
# applied; else this fails naming the patch (exit 1). --check does the same on a scratch copy of
# the files the patches touch, so later patches are checked on top of the earlier ones.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PIN="$HERE/../llama.lock"
say() { printf 'apply.sh: %s\n' "$*"; }
die() { printf 'apply.sh: %s\n' "$*" >&2; exit 1; }
pin() { sed -n "s/^$1=//p" "$PIN" | head -n1; }

selected_patches() {
    local choice=${POCKETEMBED_LLAMA_PATCHES:-all} p n found
    case $choice in
    all) for p in "$HERE"/[0-9]*-*.patch; do [ -e "$p" ] && printf '%s\n' "$p"; done | sort -t- -k1,1n ;;
    none) ;;
    *)
        [[ $choice =~ ^[0-9]+(,[0-9]+)*$ ]] ||
            die "POCKETEMBED_LLAMA_PATCHES=$choice: use all, none or patch numbers like 1,2,6"
        for n in $(tr ',' '\n' <<<"$choice" | sort -nu); do
            found=
            for p in "$HERE/$n"-*.patch; do [ -e "$p" ] && found=$p; done
            [ -n "$found" ] || die "POCKETEMBED_LLAMA_PATCHES=$choice: there is no patch $n in $HERE"
            printf '%s\n' "$found"
        done
        ;;
    esac
}

copy_touched() {
    # The files the patches (array PATCHES) touch, from tree $1 into $2 (a few hundred kB, not 300 MB).
    local f
    rm -rf "$2"
    mkdir -p "$2"
    while IFS= read -r f; do
        [ -f "$1/$f" ] || continue
        mkdir -p "$2/$(dirname "$f")"
        cp "$1/$f" "$2/$f"
    done < <(sed -n 's#^\(---\|+++\) [ab]/\([^[:space:]]*\).*#\2#p' "${PATCHES[@]}" | sort -u)
}

applied_prefix() {
    # How many of PATCHES (in order) tree $1 already has: the largest k for which patches k..1
    # reverse-apply one after the other on a copy. Patches touching the same lines (1 and 2 share
    # vec.h) cannot be checked one by one: patch 1 stops reverse-applying once 2 is on top of it.
    local k i probe=$2
    for ((k = ${#PATCHES[@]}; k > 0; k--)); do
        copy_touched "$1" "$probe"
        for ((i = k - 1; i >= 0; i--)); do
            git -C "$probe" apply -p1 --reverse "${PATCHES[i]}" >/dev/null 2>&1 || break
        done
        if [ "$i" -lt 0 ]; then
            echo "$k"
            return
        fi
    done
    echo 0
}

apply_all() {
    # $1: the tree to patch (check mode: a scratch copy of it), $2: apply or check, $3: a scratch dir.
    local tree=$1 mode=$2 have i name why
    have=$(applied_prefix "$tree" "$3/probe")
    for ((i = 0; i < ${#PATCHES[@]}; i++)); do
        name=$(basename "${PATCHES[i]}")
        if [ "$i" -lt "$have" ]; then
            say "$name: already applied"
        elif why=$(git -C "$tree" apply -p1 --check "${PATCHES[i]}" 2>&1); then
            git -C "$tree" apply -p1 "${PATCHES[i]}"
            if [ "$mode" = check ]; then say "$name: applies"; else say "$name: applied"; fi
        else
            printf '%s\n' "$why" >&2
            die "$name no longer applies to llama-cpp-python $(pin LLAMA_CPP_PYTHON_VERSION) (llama.cpp $(pin LLAMA_CPP_COMMIT | cut -c1-9)), the version scripts/llama.lock pins. Regenerate it against that version (scripts/patches/README.md: 'Regenerating a patch'), or build without it: POCKETEMBED_LLAMA_PATCHES=none or a list of the others. (A tree patched with another selection of patches is not one this can finish: start from a fresh sdist.)"
        fi
    done
}

verify_sdist() {
    local want got
    want=$(pin LLAMA_CPP_PYTHON_SHA256)
    [ -f "$1" ] || die "$1: no such file (the sdist $(pin LLAMA_CPP_PYTHON_SDIST))"
    got=$(sha256sum "$1" | cut -d' ' -f1)
    [ "$got" = "$want" ] ||
        die "$(basename "$1"): sha256 mismatch: expected $want (scripts/llama.lock, llama-cpp-python $(pin LLAMA_CPP_PYTHON_VERSION)), got $got"
    say "$(basename "$1"): sha256 $got as pinned"
}

case ${1:-} in
--list) selected_patches; exit 0 ;;
--verify-sdist)
    [ $# -eq 2 ] || die "usage: apply.sh --verify-sdist SDIST.tar.gz"
    verify_sdist "$2"
    exit 0
    ;;
--check-sdist)
    [ $# -eq 2 ] || die "usage: apply.sh --check-sdist SDIST.tar.gz"
    verify_sdist "$2"
    unpacked=$(mktemp -d)
    # shellcheck disable=SC2064  # expanded now
    trap "rm -rf '$unpacked'" EXIT
    tar xzf "$2" -C "$unpacked"
    set -- --check "$unpacked/$(basename "$2" .tar.gz)"
    [ -d "$2" ] || die "$2: the sdist did not unpack to $(basename "$2")"
    # The trap above is replaced by --check's own; keep both directories' removal.
    keep_unpacked=$unpacked
    mode=check
    shift
    ;;
--check) mode=check; shift ;;
-*) die "unknown option $1 (use --check, --list, --verify-sdist or --check-sdist)" ;;
*) mode=apply ;;
esac
[ $# -eq 1 ] || die "usage: apply.sh [--check] SRC_TREE | apply.sh --list"
tree=$1
[ -d "$tree" ] || die "$tree is not a directory (an unpacked llama-cpp-python sdist)"
patches=$(selected_patches)
if [ -z "$patches" ]; then
    say "no patches selected (POCKETEMBED_LLAMA_PATCHES=${POCKETEMBED_LLAMA_PATCHES:-}): stock llama.cpp"
    exit 0
fi

mapfile -t PATCHES <<<"$patches"
scratch=$(mktemp -d)
# shellcheck disable=SC2064  # expanded now
trap "rm -rf '$scratch' ${keep_unpacked:+'$keep_unpacked'}" EXIT
if [ "$mode" = check ]; then
    # --check patches a copy of the files the patches touch, so each is checked on the earlier ones.
    copy_touched "$tree" "$scratch/tree"
    tree=$scratch/tree
fi
apply_all "$tree" "$mode" "$scratch"
