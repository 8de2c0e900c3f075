"""The llama.cpp build pocketembed makes: the pin (scripts/llama.lock), the patch script, what a daemon reports.

scripts/patches/apply.sh is run for real (git apply) on small trees made here: it
applies in number order, skips what is applied, and names the patch that no longer
fits. The real pinned sdist is checked when it can be had cheaply (the file in
$POCKETEMBED_LLAMA_SDIST, else one `pip download`; skipped offline). A daemon's
`stats` shows each loaded model's kernels, and `pocketembed status` prints them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, fresh_home, run_cli
from daemon_proc import DaemonProcess

APPLY = REPO / "scripts" / "patches" / "apply.sh"
LOCK = REPO / "scripts" / "llama.lock"
Q8 = "all-minilm-l6-v2:q8_0"


def read_lock(path: Path = LOCK) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#"))


def run_apply(script: Path, *args: str, patches: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "POCKETEMBED_LLAMA_PATCHES"}
    if patches is not None:
        env["POCKETEMBED_LLAMA_PATCHES"] = patches
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env, timeout=300)


SOURCE = "".join(f"int v{i} = {i};\n" for i in range(1, 13))
PATCH_1 = """Header: what the patch does and its measurements.
--- a/vendor/llama.cpp/ggml/x.c
+++ b/vendor/llama.cpp/ggml/x.c
@@ -1,5 +1,5 @@
 int v1 = 1;
-int v2 = 2;
+int v2 = 20;
 int v3 = 3;
 int v4 = 4;
 int v5 = 5;
"""
PATCH_2 = """Its first hunk has patch 1's line as context (as patches 1 and 2 share vec.h): order matters,
and patch 1 no longer reverse-applies once this is on top of it.
--- a/vendor/llama.cpp/ggml/x.c
+++ b/vendor/llama.cpp/ggml/x.c
@@ -1,7 +1,7 @@
 int v1 = 1;
 int v2 = 20;
 int v3 = 3;
-int v4 = 4;
+int v4 = 40;
 int v5 = 5;
 int v6 = 6;
 int v7 = 7;
@@ -8,5 +8,5 @@
 int v8 = 8;
 int v9 = 9;
 int v10 = 10;
-int v11 = 11;
+int v11 = 110;
 int v12 = 12;
--- /dev/null
+++ b/vendor/llama.cpp/ggml/new.h
@@ -0,0 +1 @@
+#define NEW 1
"""
PATCHED = SOURCE.replace("v2 = 2;", "v2 = 20;").replace("v4 = 4;", "v4 = 40;").replace("v11 = 11;", "v11 = 110;")


@pytest.fixture
def fake(tmp_path):
    """A copy of apply.sh with two patches of its own and a lock, and a tiny tree they fit."""
    patches = tmp_path / "scripts" / "patches"
    patches.mkdir(parents=True)
    shutil.copy(APPLY, patches / "apply.sh")
    (patches / "1-first.patch").write_text(PATCH_1)
    (patches / "2-second.patch").write_text(PATCH_2)
    (tmp_path / "scripts" / "llama.lock").write_text("LLAMA_CPP_PYTHON_VERSION=9.9.9\nLLAMA_CPP_COMMIT=0123456789abcdef\n")
    tree = tmp_path / "tree"
    (tree / "vendor" / "llama.cpp" / "ggml").mkdir(parents=True)
    (tree / "vendor" / "llama.cpp" / "ggml" / "x.c").write_text(SOURCE)
    return patches / "apply.sh", tree


def x_c(tree: Path) -> str:
    return (tree / "vendor" / "llama.cpp" / "ggml" / "x.c").read_text()


def test_apply_script_applies_in_order_and_is_idempotent(fake):
    script, tree = fake
    r = run_apply(script, str(tree))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["apply.sh: 1-first.patch: applied", "apply.sh: 2-second.patch: applied"]
    patched = x_c(tree)
    assert patched == PATCHED
    assert (tree / "vendor" / "llama.cpp" / "ggml" / "new.h").read_text() == "#define NEW 1\n"

    again = run_apply(script, str(tree))
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == ["apply.sh: 1-first.patch: already applied", "apply.sh: 2-second.patch: already applied"]
    assert x_c(tree) == patched
    assert run_apply(script, "--check", str(tree)).returncode == 0  # an applied tree passes the check too


def test_check_mode_checks_each_patch_on_top_of_the_earlier_ones_and_leaves_the_tree(fake):
    script, tree = fake
    r = run_apply(script, "--check", str(tree))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["apply.sh: 1-first.patch: applies", "apply.sh: 2-second.patch: applies"]
    assert x_c(tree) == SOURCE and not (tree / "vendor" / "llama.cpp" / "ggml" / "new.h").exists()


@pytest.mark.parametrize("check", [False, True])
def test_a_patch_that_no_longer_fits_is_named_with_the_pinned_version(fake, check):
    script, tree = fake
    (tree / "vendor" / "llama.cpp" / "ggml" / "x.c").write_text(SOURCE.replace("int v9 = 9;", "int v9 = 9; /* upstream moved on */"))
    r = run_apply(script, *(["--check"] if check else []), str(tree))
    assert r.returncode == 1
    assert "1-first.patch: " + ("applies" if check else "applied") in r.stdout
    assert "2-second.patch no longer applies to llama-cpp-python 9.9.9 (llama.cpp 012345678)" in r.stderr, r.stderr
    assert "scripts/patches/README.md" in r.stderr and "POCKETEMBED_LLAMA_PATCHES=none" in r.stderr


def test_patches_can_be_switched_off_or_chosen(fake):
    script, tree = fake
    r = run_apply(script, str(tree), patches="none")
    assert r.returncode == 0 and "stock llama.cpp" in r.stdout and x_c(tree) == SOURCE
    assert run_apply(script, "--list", patches="none").stdout == ""
    assert [Path(p).name for p in run_apply(script, "--list").stdout.split()] == ["1-first.patch", "2-second.patch"]
    assert [Path(p).name for p in run_apply(script, "--list", patches="2,1").stdout.split()] == ["1-first.patch", "2-second.patch"]
    r = run_apply(script, str(tree), patches="1")
    assert r.returncode == 0 and r.stdout.splitlines() == ["apply.sh: 1-first.patch: applied"]
    assert x_c(tree) == SOURCE.replace("v2 = 2;", "v2 = 20;")
    r = run_apply(script, str(tree))  # then all: 1 is kept, 2 goes on top
    assert r.stdout.splitlines() == ["apply.sh: 1-first.patch: already applied", "apply.sh: 2-second.patch: applied"]
    assert x_c(tree) == PATCHED
    bad = run_apply(script, "--list", patches="3")
    assert bad.returncode == 1 and "there is no patch 3" in bad.stderr
    assert run_apply(script, "--list", patches="six").returncode == 1


def test_lock_is_complete_and_the_only_place_the_version_is_written():
    pin = read_lock()
    assert re.fullmatch(r"\d+\.\d+\.\d+", pin["LLAMA_CPP_PYTHON_VERSION"])
    assert pin["LLAMA_CPP_PYTHON_SDIST"] == f"llama_cpp_python-{pin['LLAMA_CPP_PYTHON_VERSION']}.tar.gz"
    assert pin["LLAMA_CPP_PYTHON_URL"].endswith("/" + pin["LLAMA_CPP_PYTHON_SDIST"])
    assert re.fullmatch(r"[0-9a-f]{64}", pin["LLAMA_CPP_PYTHON_SHA256"])
    assert re.fullmatch(r"[0-9a-f]{40}", pin["LLAMA_CPP_COMMIT"])
    for script in ("scripts/setup.sh", "android/termux/install.sh"):
        text = (REPO / script).read_text()
        assert "llama.lock" in text and pin["LLAMA_CPP_PYTHON_VERSION"] not in text, script


def test_a_sdist_of_another_sha256_is_refused_naming_both(tmp_path):
    fake_sdist = tmp_path / read_lock()["LLAMA_CPP_PYTHON_SDIST"]
    fake_sdist.write_bytes(b"not the pinned release")
    r = run_apply(APPLY, "--check-sdist", str(fake_sdist))
    assert r.returncode == 1
    assert f"sha256 mismatch: expected {read_lock()['LLAMA_CPP_PYTHON_SHA256']}" in r.stderr
    assert "got " + subprocess.run(["sha256sum", str(fake_sdist)], capture_output=True, text=True).stdout.split()[0] in r.stderr


def pinned_sdist(tmp_path: Path) -> Path:
    """The pinned sdist: $POCKETEMBED_LLAMA_SDIST, else downloaded once by pip (skip when offline)."""
    if os.environ.get("POCKETEMBED_LLAMA_SDIST"):
        return Path(os.environ["POCKETEMBED_LLAMA_SDIST"])
    pin = read_lock()
    try:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            "--no-cache-dir", "-d", str(tmp_path), f"llama-cpp-python=={pin['LLAMA_CPP_PYTHON_VERSION']}"],
                           capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip("pip download of the pinned sdist timed out")
    if r.returncode != 0:
        pytest.skip(f"cannot download the pinned sdist (offline?): {r.stderr.strip()[-300:]}")
    return tmp_path / pin["LLAMA_CPP_PYTHON_SDIST"]


def test_every_patch_applies_to_the_pinned_sdist(tmp_path):
    r = run_apply(APPLY, "--check-sdist", str(pinned_sdist(tmp_path)))
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in APPLY.parent.glob("[0-9]*-*.patch"))
    assert len(names) >= 6
    assert [line.split(": ")[1] for line in r.stdout.splitlines()[1:]] == sorted(names, key=lambda n: int(n.split("-")[0]))
    assert all(line.endswith(": applies") for line in r.stdout.splitlines()[1:]), r.stdout


# -- what a running daemon says about its kernels ------------------------------------------


@pytest.fixture(scope="module")
def daemon(home, tmp_path_factory):
    d = DaemonProcess(fresh_home(home), tmp_path_factory.mktemp("run") / "sock" / "pe.sock").wait_ready()
    yield d
    assert d.stop() == 0


def test_stats_shows_each_loaded_models_kernels_and_status_prints_them(daemon):
    import llama_cpp

    with daemon.client() as c:
        c.embed(["a loaded model"])
        models = c.stats()["models"]
    kern = models[Q8]["kernels"]
    build, weights = kern["build"], kern["weights"]
    assert build["llama_cpp_python"] == llama_cpp.__version__
    assert isinstance(kern["cpu"], list) and kern["cpu"], kern  # llama_print_system_info's features that are on
    assert weights["tensors"] > 0 and weights["buffers_mib"], weights  # llama.cpp's load log was seen
    assert weights["repacked"] == (weights["buffers_mib"].get("CPU_REPACK", 0) > 0)
    if build["patched"] != "unknown":  # built by scripts/setup.sh: the record in the wheel
        assert build["llama_cpp_python"] == read_lock()["LLAMA_CPP_PYTHON_VERSION"]
        assert build["llama_cpp_commit"] == read_lock()["LLAMA_CPP_COMMIT"]
        vnni = "AVX512_VNNI" in kern["cpu"]
        if build["patched"] is False and "AVX2" in kern["cpu"]:
            assert not weights["repacked"], weights  # stock llama.cpp has no x86 q8_0 repack
        if any(p.startswith("6-") for p in build["patches"]) and vnni:
            assert weights["repacked"] and weights["repacked_tensors"] > 0, weights  # patch 6's q8_0 VNNI layout

    status = run_cli("status", "--socket", str(daemon.socket_path), home=daemon.home)
    assert status.returncode == 0, status.stderr
    line = next(ln for ln in status.stdout.splitlines() if ln.strip().startswith(Q8 + ":"))
    assert f"llama-cpp-python {llama_cpp.__version__}" in line and "weights " in line and "CPU " in line, line
    as_json = json.loads(run_cli("status", "--json", "--socket", str(daemon.socket_path), home=daemon.home).stdout)
    assert as_json["models"][Q8]["kernels"]["weights"] == weights


def test_the_phone_builds_what_the_arm_benchmark_measured(tmp_path):
    """install.sh and arm_verify.sh take the ARM flags and each CPU class's -march from the lock."""
    pin = read_lock()
    assert "-DGGML_CPU_REPACK=ON" in pin["LLAMA_ARM_CMAKE_ARGS"] and "KLEIDIAI" not in pin["LLAMA_ARM_CMAKE_ARGS"]
    for script in ("android/termux/install.sh", "scripts/arm_verify.sh"):
        text = (REPO / script).read_text()
        assert "LLAMA_ARM_CMAKE_ARGS" in text and "armv8.2-a" not in text.split("set -euo pipefail", 1)[1], script
    install = (REPO / "android/termux/install.sh").read_text()
    march = install[install.index("march_flags() {"):install.index("\n}\n", install.index("march_flags() {")) + 3]
    cases = {"fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid": "LLAMA_ARM_MARCH_BASE",  # Cortex-A72
             "fp asimd atomics fphp asimdhp asimdrdm lrcpc dcpop asimddp": "LLAMA_ARM_MARCH_DOTPROD",
             "fp asimd asimdhp asimddp sha512 sve i8mm bf16 sve2": "LLAMA_ARM_MARCH_I8MM",
             "fp asimd i8mm bf16 asimddp": "LLAMA_ARM_MARCH_I8MM"}
    for features, key in cases.items():
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nFeatures\t: {features}\n")
        script = (f'LLAMA_LOCK={REPO / "scripts/llama.lock"}\n'
                  'lock() { sed -n "s/^$1=//p" "$LLAMA_LOCK" | head -n1; }\n' + march + "march_flags\n")
        r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env={**os.environ, "POCKETEMBED_CPUINFO": str(cpuinfo)})
        assert r.returncode == 0 and r.stdout.strip() == pin[key], (features, r.stdout, r.stderr)
