"""The guest half of scripts/bench_arm.py: one engine's embeds, with the phases marked.

Runs in the arm64 root under qemu-aarch64 with the instruction-counting plugin
(scripts/arm/insn_count.c). Between phases it makes the plugin's marker call,
lseek(-1, MARK | phase, 0), a system call that fails with EBADF and does
nothing else, so that the counts of each phase come from one process: the load
is not run three times, and nothing has to be subtracted between processes
whose Python start-ups differ.

Phases (the marks' numbers):
  0 → 1  the engine's imports and load (model file, or ONNX session)
  1 → 2  warm-up: one embed call of the first text, not counted as an SMS
  2 → 3  single: every text in an embed call of its own
  3 → 4  bulk: all texts in one call (pocketembed: Engine.embed; ONNX Runtime:
         length-sorted batches of 32, as scripts/bench_peers.py runs it)
  4 → 5  probe: --probe-reps embed calls of the one --probe-text (the per-op
         breakdown's short SMS); only with --probe-reps

Prints one JSON line (the CPU features the guest sees, the load log, the
vectors' file) and writes /proc/self/maps of the emulated process (qemu shows
the guest's own mappings) for mapping block addresses to shared objects.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import struct
import sys

MARK = 0x70656D6B << 32
"""The plugin's marker: "pemk" in the high half of lseek's offset (see insn_count.c)."""

HWCAP = {"asimddp": 1 << 20, "asimdhp": 1 << 10, "sve": 1 << 22, "atomics": 1 << 8}
HWCAP2 = {"i8mm": 1 << 13, "bf16": 1 << 14, "sve2": 1 << 1, "sme": 1 << 23}


def mark(phase: int) -> None:
    """Tell the plugin a phase begins: a do-nothing system call it recognises."""
    try:
        os.lseek(-1, MARK | phase, 0)
    except OSError:
        pass


def cpu_features() -> list[str]:
    """The features the kernel (here qemu) reports in the auxiliary vector: what runtime dispatch sees."""
    try:
        raw = open("/proc/self/auxv", "rb").read()
    except OSError:
        return []
    vals = dict(struct.iter_unpack("<QQ", raw))
    hw, hw2 = vals.get(16, 0), vals.get(26, 0)  # AT_HWCAP, AT_HWCAP2
    return [k for k, b in HWCAP.items() if hw & b] + [k for k, b in HWCAP2.items() if hw2 & b]


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def pocketembed_runner(model: str, threads: int):
    """pocketembed's Engine as scripts/arm_embed.py runs it: (embed(texts) -> vectors, info)."""
    lines = _Lines()
    llama_log = logging.getLogger("pocketembed.llama")
    llama_log.setLevel(logging.DEBUG)
    llama_log.addHandler(lines)
    from pocketembed.daemon import llama_runtime as rt
    from pocketembed.daemon.engine import Engine, EngineConfig

    engine = Engine(model, EngineConfig(threads=threads))
    info = {
        "llama_features": sorted(k for k, v in rt.cpu_features().items() if v),
        "system_info": rt.llama.llama_print_system_info().decode(),
        "load_log": [x for x in lines.lines if "REPACK" in x.upper() or "KLEIDI" in x.upper() or "buffer size" in x][:20],
    }
    return (lambda items: engine.embed(items)), info


def ort_runner(model: str, threads: int, batch: int, spin: bool = True):
    """ONNX Runtime as scripts/bench_peers.py's ort_runner runs it, fed token ids instead of texts.

    ``spin=False`` sets session.intra_op.allow_spinning to 0: the pool's threads block
    instead of spinning while they wait for work."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])

    def run_batch(encs: list[list[int]]):
        width = max(len(e) for e in encs)
        ids = np.zeros((len(encs), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, e in enumerate(encs):
            ids[i, : len(e)] = e
            mask[i, : len(e)] = 1
        (hidden,) = sess.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
        m = mask[:, :, None].astype(np.float32)
        v = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def embed(items: list[list[int]]):
        if len(items) == 1:
            return run_batch(items)
        order = sorted(range(len(items)), key=lambda i: len(items[i]))
        out = np.empty((len(items), 384), dtype=np.float32)
        for s in range(0, len(order), batch):
            idx = order[s : s + batch]
            out[idx] = run_batch([items[i] for i in idx])
        return out

    return embed, {"onnxruntime": ort.__version__, "providers": sess.get_providers()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", choices=("pocketembed", "ort"), required=True)
    ap.add_argument("--model", required=True, help="GGUF file (pocketembed) or ONNX file (ort)")
    ap.add_argument("--inputs", required=True, help="JSON: a list of texts (pocketembed) or of token-id lists (ort)")
    ap.add_argument("--probe", help="JSON: one text or token-id list for the probe phase")
    ap.add_argument("--probe-reps", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32, help="ONNX Runtime's bulk batch size")
    ap.add_argument("--ort-spin", choices=("on", "off"), default="on", help="ONNX Runtime's intra-op spinning")
    ap.add_argument("--modes", default="single,bulk")
    ap.add_argument("--out", required=True, help=".npz for the vectors")
    ap.add_argument("--maps", required=True, help="file for /proc/self/maps")
    args = ap.parse_args()

    mark(0)
    import numpy as np

    items = json.load(open(args.inputs, encoding="utf-8"))
    if args.engine == "pocketembed":
        embed, info = pocketembed_runner(args.model, args.threads)
    else:
        embed, info = ort_runner(args.model, args.threads, args.batch, args.ort_spin == "on")
    modes = set(args.modes.split(","))
    mark(1)
    embed(items[:1])
    mark(2)
    vecs: dict[str, np.ndarray] = {}
    if "single" in modes:
        vecs["single"] = np.concatenate([embed([x]) for x in items])
    mark(3)
    if "bulk" in modes:
        vecs["bulk"] = np.asarray(embed(items))
    mark(4)
    if args.probe and args.probe_reps:
        probe = json.load(open(args.probe, encoding="utf-8"))
        for _ in range(args.probe_reps):
            embed([probe])
        mark(5)
    np.savez(args.out, **vecs)
    with open("/proc/self/maps") as src, open(args.maps, "w") as dst:
        dst.write(src.read())
    info.update(machine=platform.machine(), cpu_features=cpu_features(), python=sys.version.split()[0],
                items=len(items), out=args.out)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
