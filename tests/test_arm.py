"""pocketembed's engine on ARM kernels: cross-built llama.cpp under qemu-aarch64 vs x86.

The builds and the arm64 root come from `scripts/arm_verify.sh --build-only`
(CI runs it before the tests when it can install the toolchain); this test runs
the comparison: real SMS embedded with q8_0 and q4_0 on armv8.2-a+dotprod and
armv8.2-a+dotprod+i8mm builds, mean cosine to x86 ≥ 0.999 each.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("POCKETEMBED_ARM_DIR", Path.home() / ".cache/pocketembed/arm"))


def _missing() -> str | None:
    if shutil.which("qemu-aarch64-static") is None:
        return "qemu-aarch64-static is not installed (Debian: qemu-user-static)"
    for need in ("lib-dotprod/libllama.so", "lib-i8mm/libllama.so", "root/.unpacked"):
        if not (WORK / need).exists():
            return (f"no ARM build in {WORK} ({need}): run scripts/arm_verify.sh --build-only "
                    "(needs g++-aarch64-linux-gnu, qemu-user-static, debootstrap; CI does this)")
    return None


@pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
def test_arm_builds_agree_with_x86(home):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "arm_compare.py"), "--work", str(WORK), "--texts", "16",
                        "--json"], capture_output=True, text=True, timeout=1500)
    assert r.returncode in (0, 1), r.stderr[-3000:]
    results = json.loads(r.stdout)
    assert {(x["build"], x["quantization"]) for x in results} == {(b, q) for b in ("dotprod", "i8mm") for q in ("q8_0", "q4_0")}
    for x in results:
        assert x["machine"] == "aarch64"
        assert x["mean_cosine"] >= 0.999, x
        assert {"NEON", "DOTPROD"} <= set(x["features"]), x
        if x["build"] == "i8mm":
            assert "MATMUL_INT8" in x["features"], x
        else:
            assert "MATMUL_INT8" not in x["features"], x
    q4 = [x for x in results if x["quantization"] == "q4_0"]
    assert all(any("REPACK" in line.upper() for line in x["load_log"]) for x in q4), q4[0]["load_log"]
