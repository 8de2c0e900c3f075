"""ARM vs x86 vectors: the comparison step of scripts/arm_verify.sh.

    python scripts/arm_compare.py [--work DIR] [--texts 64] [--json]

Embeds SMS with q8_0 and q4_0 in-process (x86), then with each aarch64 build
(armv8.2-a+dotprod; +i8mm) under qemu-aarch64 user-mode emulation, and prints
build × quantization: mean/min cosine ARM vs x86, and the ARM CPU features
llama.cpp reports at load. Exit status 1 when a mean cosine is under 0.999.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from pocketembed.sms import load_sms

from pocketembed import paths  # noqa: E402
from pocketembed.daemon.models import open_engine  # noqa: E402
from pocketembed.gguf_models import manifest  # noqa: E402
from pocketembed.gguf_models.catalog import get  # noqa: E402

BUILDS = {"dotprod": "armv8.2-a+dotprod", "i8mm": "armv8.2-a+dotprod+i8mm"}
QUANTS = ("q8_0", "q4_0")
GOAL = 0.999
ARM_FEATURES = ("NEON", "ARM_FMA", "FP16_VA", "DOTPROD", "MATMUL_INT8", "SVE", "REPACK")


REPO = Path(__file__).resolve().parents[1]


def stage(dest: Path, llama_src: Path) -> Path:
    """pocketembed laid out as installed (its package-dir mapping) plus llama_cpp's Python bindings."""
    shutil.copytree(REPO / "pocketembed", dest / "pocketembed", ignore=shutil.ignore_patterns("__pycache__"))
    for pkg in ("daemon", "ipc", "gguf_models"):
        shutil.copytree(REPO / pkg, dest / "pocketembed" / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(llama_src / "llama_cpp", dest / "llama_cpp", ignore=shutil.ignore_patterns("__pycache__", "lib"))
    return dest


def run_arm(work: Path, build: str, model: Path, texts_file: Path, out: Path, timeout: float, staged: Path) -> dict:
    root = work / "root"
    env = dict(os.environ, PYTHONPATH=str(staged), LLAMA_CPP_LIB_PATH=str(work / f"lib-{build}"),
               PYTHONDONTWRITEBYTECODE="1", QEMU_CPU="max")
    env.pop("PYTHONHOME", None)
    cmd = ["qemu-aarch64-static", "-L", str(root), str(root / "usr/bin/python3"),
           str(Path(__file__).resolve().parent / "arm_embed.py"), "--model", str(model), "--texts", str(texts_file),
           "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"ARM run ({build}) failed with {r.returncode}:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=os.environ.get("POCKETEMBED_ARM_DIR", str(Path.home() / ".cache/pocketembed/arm")))
    ap.add_argument("--texts", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json", action="store_true", help="print the results as JSON (for the test)")
    ap.add_argument("--llama-src", help="the unpacked llama-cpp-python sdist (default: the one in --work)")
    args = ap.parse_args()
    work = Path(args.work)
    sms = load_sms()
    step = max(1, len(sms) // args.texts)
    texts = sms[::step][: args.texts]
    home = paths.home()
    results = []
    llama_src = Path(args.llama_src) if args.llama_src else sorted(work.glob("llama_cpp_python-*/"))[-1]
    with tempfile.TemporaryDirectory() as tmp:
        staged = stage(Path(tmp) / "stage", llama_src)
        texts_file = Path(tmp) / "texts.json"
        texts_file.write_text(json.dumps(texts))
        for q in QUANTS:
            spec = get(f"all-minilm-l6-v2:{q}")
            model = manifest.model_path(home, spec)
            _, engine = open_engine(spec.name, home)
            with engine:
                x86 = engine.embed(texts)
            for build in BUILDS:
                info = run_arm(work, build, model, texts_file, Path(tmp) / f"{build}-{q}.npy", args.timeout, staged)
                arm = np.load(info["out"])
                cos = np.sum(arm * x86, axis=1) / (np.linalg.norm(arm, axis=1) * np.linalg.norm(x86, axis=1))
                results.append({"build": build, "march": BUILDS[build], "quantization": q, "texts": len(texts),
                                "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
                                "machine": info["machine"],
                                "features": [f for f in ARM_FEATURES if info["features"].get(f)],
                                "load_log": info["load_log"], "embed_s": info["embed_s"]})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"ARM (qemu-aarch64, cross-built llama.cpp) vs x86 vectors of {len(texts)} SMS")
        print(f"{'build (-march)':<26} {'quant':<6} {'mean cos':>9} {'min cos':>9} {'embed s':>8}  features reported by llama.cpp")
        for r in results:
            print(f"{r['march']:<26} {r['quantization']:<6} {r['mean_cosine']:>9.6f} {r['min_cosine']:>9.6f} "
                  f"{r['embed_s']:>8.1f}  {' '.join(r['features'])}")
        repack = sorted({line for r in results for line in r["load_log"] if "REPACK" in line.upper()})
        if repack:
            print("load log:", *repack[:4], sep="\n  ")
    return 0 if all(r["mean_cosine"] >= GOAL for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
