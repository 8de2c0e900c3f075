"""The ARM side of scripts/arm_verify.sh: run pocketembed's Engine on a cross-built llama.cpp.

Started by arm_compare.py under qemu-aarch64 with the arm64 root's python3,
LLAMA_CPP_LIB_PATH pointing at the aarch64 libraries. Prints one JSON line:
the CPU features llama.cpp reports, the load log lines about buffers and
repacking, and where the vectors were saved.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time

import numpy as np


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--texts", required=True, help="JSON file with a list of texts")
    ap.add_argument("--out", required=True, help=".npy file for the vectors")
    args = ap.parse_args()

    lines = _Lines()
    llama_log = logging.getLogger("pocketembed.llama")
    llama_log.setLevel(logging.DEBUG)
    llama_log.addHandler(lines)
    from pocketembed.daemon import llama_runtime as rt
    from pocketembed.daemon.engine import Engine, EngineConfig

    texts = json.load(open(args.texts, encoding="utf-8"))
    t = time.perf_counter()
    engine = Engine(args.model, EngineConfig(threads=2))
    loaded = time.perf_counter() - t
    t = time.perf_counter()
    vecs = engine.embed(texts)
    seconds = time.perf_counter() - t
    engine.close()
    np.save(args.out, vecs)
    print(json.dumps({
        "machine": platform.machine(),
        "features": {k: v for k, v in rt.cpu_features().items() if v},
        "system_info": rt.llama.llama_print_system_info().decode(),
        "load_log": [x for x in lines.lines if "REPACK" in x.upper() or "buffer size" in x or "CPU" in x][:20],
        "load_s": round(loaded, 2),
        "embed_s": round(seconds, 2),
        "out": args.out,
    }))


if __name__ == "__main__":
    main()
