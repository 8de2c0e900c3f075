"""The ARM benchmark's instruction counter (scripts/arm/insn_count.c) counts exactly.

scripts/bench_arm.py's figures are only as good as its counter, so the counter is
checked on a program whose count is known (scripts/arm/probe.S: a 3-instruction
loop run 1000 × argc times between two phase marks): the same run twice gives the
same count, one more argument exactly 3000 more, and the per-block counts add up
to the total. Takes a few seconds; skipped where qemu-user (with plugin support),
the aarch64 assembler or glib's headers are missing, or where the qemu 7.2 plugin
header has not been fetched yet (``scripts/bench_arm.py --plugin-only`` does it).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import bench_arm  # noqa: E402


def _missing() -> str | None:
    for tool, pkg in (("qemu-aarch64", "qemu-user"), ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
                      ("gcc", "gcc"), ("pkg-config", "pkg-config")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: {pkg})"
    if subprocess.run(["pkg-config", "--exists", "glib-2.0"]).returncode != 0:
        return "glib's headers are not installed (Debian: libglib2.0-dev)"
    if not bench_arm.qemu_version().startswith("7.2"):
        return f"qemu-aarch64 is {bench_arm.qemu_version()}; the counter is built for qemu 7.2's plugin API"
    if not (bench_arm.bench_dir() / "qemu-7.2" / "qemu-plugin.h").exists():
        return "qemu 7.2's plugin header is not fetched: run scripts/bench_arm.py --plugin-only"
    return None


needs_tools = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


@needs_tools
def test_counter_is_exact_and_repeatable():
    plugin = bench_arm.build_plugin()
    assert bench_arm.check_plugin(plugin) == [3008, 6008, 3008]


@needs_tools
def test_block_counts_add_up_to_the_total(tmp_path):
    plugin = bench_arm.build_plugin()
    out = tmp_path / "counts"
    subprocess.run([bench_arm.QEMU, "-plugin", f"{plugin},out={out},tb=on", str(bench_arm.probe_binary()), "x"],
                   check=True)
    counts = bench_arm.read_counts(out)
    for phase, blocks in counts.blocks.items():
        assert sum(blocks.values()) == counts.marks[phase]
    assert counts.marks[2] - counts.marks[1] == 6008


def test_ops_of_llama_cpp_functions():
    cases = {
        ("libggml-cpu.so", "ggml_vec_dot_q8_0_q8_0"): "matmul",
        ("libggml-cpu.so", "ggml_gemm_q4_0_4x8_q8_0"): "matmul",
        ("libggml-cpu.so", "quantize_row_q8_0"): "matmul: quantize activations",
        ("libggml-cpu.so", "ggml_barrier"): "wait: barrier / spin",
        ("libggml-cpu.so", "ggml_compute_forward_flash_attn_ext_f16"): "attention (flash_attn, softmax)",
        ("libggml-cpu.so", "ggml_vec_gelu_f32"): "GELU (ggml's unary op)",
        ("libggml-cpu.so", "ggml_compute_forward_unary"): "GELU (ggml's unary op)",
        ("libggml-cpu.so", "ggml_compute_forward_norm_f32"): "layer norm",
        ("libllama.so", "llama_vocab::impl::tokenize(std::string const&, bool, bool) const"): "tokenize",
        ("libc.so.6", "memcpy"): "libc: memcpy / memset",
        ("python3.11", "_PyEval_EvalFrameDefault"): "Python interpreter",
    }
    for (dso, name), op in cases.items():
        assert bench_arm.op_of(dso, name) == op, (dso, name)
