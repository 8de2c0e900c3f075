"""Guest instructions per SMS on ARM, under qemu-aarch64: pocketembed's engine against ONNX Runtime.

    python scripts/bench_arm.py                       # the table (all builds, q8_0 and q4_0, ORT fp32 / int8)
    python scripts/bench_arm.py --builds dotprod --engines q8_0,ort-fp32,ort-int8
    python scripts/bench_arm.py --breakdown           # + per symbol and per ggml op: a 24-token SMS, a bulk decode
    python scripts/bench_arm.py --plugin-only         # build the counter and check it on a known program

Wall-clock time under emulation says nothing about a phone; the instructions a
program executes do, and unlike time on a shared VM they do not move from one
run to the next. Every row runs the first ``--texts`` bundled SMS in the arm64
Debian root of ``scripts/arm_verify.sh`` (python3 and numpy of Debian bookworm)
under ``qemu-aarch64 -cpu MODEL -plugin insn_count.so`` with 2 threads:

* pocketembed's Engine as ``scripts/arm_embed.py`` runs it (``Engine.embed``,
  tokenization included), LLAMA_CPP_LIB_PATH pointing at one cross-built llama.cpp
  ($WORK/lib-BUILD, made by ``scripts/arm_verify.sh --build-only`` and
  ``--bench-builds``), with q8_0 and q4_0;
* ONNX Runtime 1.17.3's aarch64 wheel (1.28's segfaults at import under qemu 7.2),
  fp32 and dynamic int8, on the ONNX files ``scripts/bench_peers.py`` exports, fed the
  token ids the ``tokenizers`` library gives on x86 (so its tokenization is not
  counted), one text per run and length-sorted batches of 32; with its intra-op
  spinning off (``--ort-spin on`` for its default). Spinning, its pool's idle thread
  polls for work, and how long it polls depends on how fast qemu runs the other
  thread, not on the ARM code: 4 SMS took 720 / 451 M instructions each (single /
  bulk) with it, 135 / 259 M without.

The counter is a TCG plugin of this project (``scripts/arm/insn_count.c``), built
here against qemu 7.2's ``include/qemu/qemu-plugin.h`` taken from Debian's qemu
source package. It counts every executed translation block of every guest thread
(one counter per vCPU, so none of the two threads' counts are lost) and, per
block start address, how many instructions ran there. The guest marks its phases
with a do-nothing system call, so one process gives: load, warm-up (one embed,
not counted), **single** (each SMS in an embed call of its own), **bulk** (all in
one call), and with ``--breakdown`` a probe (one 24-token SMS, embedded
``--probe-reps`` times). Per SMS = the phase's instructions / texts: nothing
outside the phase's own calls is in it, and the load is measured once, apart.

The block counts are mapped to symbols through the guest's /proc/self/maps and
``aarch64-linux-gnu-nm``, and the symbols to ggml's ops (the op table below);
the "waiting" column is the share in ggml's spin-waits (ggml_barrier: a thread
done with its half of an op polls until the other is), which depends on how evenly
qemu ran the two threads and so is the one part of a count that moves between
runs. ONNX Runtime's library exports no internal symbols, so its own waits cannot
be told apart (with spinning off, little of it is waiting).

What the proxy cannot see: memory and cache stalls (a q8_0 weight read costs the
same as an add here), the instructions' latencies and widths (qemu's NEON is 128
bits; a core's SIMD throughput, sdot/smmla pipes), frequency, big.LITTLE
placement (which core a helper lands on), thermal limits. It ranks code paths on
the same instruction set; it does not give milliseconds.
"""

from __future__ import annotations

import argparse
import bisect
import functools
import hashlib
import json
import lzma
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

WORK = Path(os.environ.get("POCKETEMBED_ARM_DIR", Path.home() / ".cache/pocketembed/arm"))
QEMU = os.environ.get("QEMU_AARCH64", "qemu-aarch64")
"""The dynamic qemu-user (Debian's qemu-user): the static build cannot load plugins."""
QEMU_SOURCE = "http://deb.debian.org/debian/pool/main/q/qemu/qemu_7.2+dfsg.orig.tar.xz"
PLUGIN_HEADER = "qemu-7.2.0/include/qemu/qemu-plugin.h"
ORT_VERSION = "1.17.3"
"""The newest aarch64 ONNX Runtime wheel seen to run under qemu 7.2 (1.28's segfaults at import)."""
ORT_DEPS = ("coloredlogs", "flatbuffers", "packaging", "protobuf", "sympy", "humanfriendly", "mpmath")
THREADS = 2
ORT_BATCH = 32
PROBE_TOKENS = 24

MAX = "max,sme=off,pauth-impdef=on"
"""qemu's "max" without SME (which KleidiAI would take over a phone's kernels for; phones with i8mm
mostly have none) and with its cheap pointer-auth hash (only emulation speed changes, not counts)."""


@dataclass(frozen=True)
class Build:
    name: str
    march: str
    cpu: str
    """The qemu -cpu model: the oldest that has what the build was compiled for."""
    note: str


BUILDS = {
    "armv8a": Build("armv8a", "armv8-a", "cortex-a72",
                    "Raspberry Pi 4 class; on cortex-a72 an sdot would fault, so none runs"),
    "dotprod": Build("dotprod", "armv8.2-a+dotprod", "cortex-a76", "the phone build"),
    "i8mm": Build("i8mm", "armv8.2-a+dotprod+i8mm", MAX, "phones with i8mm (Cortex-X2/A710 and later)"),
    "dotprod-kleidiai": Build("dotprod-kleidiai", "armv8.2-a+dotprod", "cortex-a76", "GGML_CPU_KLEIDIAI=ON"),
    "i8mm-kleidiai": Build("i8mm-kleidiai", "armv8.2-a+dotprod+i8mm", MAX, "GGML_CPU_KLEIDIAI=ON"),
}
QUANTS = ("q8_0", "q4_0")
ORTS = ("ort-fp32", "ort-int8")
MARK_PHASES = {"load": (0, 1), "warm": (1, 2), "single": (2, 3), "bulk": (3, 4), "probe": (4, 5)}


# -- the counter ---------------------------------------------------------------------------


def bench_dir() -> Path:
    d = WORK / "bench"
    d.mkdir(parents=True, exist_ok=True)
    return d


def say(msg: str) -> None:
    print(f"bench_arm: {msg}", file=sys.stderr, flush=True)


def plugin_header() -> Path:
    """qemu 7.2's plugin API header, from Debian's source tarball (downloaded once, only the header kept)."""
    dest = bench_dir() / "qemu-7.2" / "qemu-plugin.h"
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tarball = WORK / "dl" / Path(QEMU_SOURCE).name
    if not tarball.exists():
        tarball.parent.mkdir(parents=True, exist_ok=True)
        say(f"downloading {QEMU_SOURCE} (23 MB) for its include/qemu/qemu-plugin.h")
        part = tarball.with_suffix(".part")
        with urllib.request.urlopen(QEMU_SOURCE, timeout=120) as r, open(part, "wb") as f:
            shutil.copyfileobj(r, f)
        part.replace(tarball)
    with lzma.open(tarball) as xz, tarfile.open(fileobj=xz, mode="r|") as tar:
        for member in tar:
            if member.name == PLUGIN_HEADER:
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                break
        else:
            raise SystemExit(f"bench_arm: {PLUGIN_HEADER} is not in {tarball}")
    dest.write_bytes(data)
    return dest


def build_plugin() -> Path:
    """scripts/arm/insn_count.c built against the header, cached under a hash of both."""
    src = REPO / "scripts" / "arm" / "insn_count.c"
    header = plugin_header()
    key = hashlib.sha256(src.read_bytes() + header.read_bytes()).hexdigest()[:12]
    so = bench_dir() / f"insn_count-{key}.so"
    if so.exists():
        return so
    glib = subprocess.run(["pkg-config", "--cflags", "--libs", "glib-2.0"], capture_output=True, text=True)
    if glib.returncode != 0:
        raise SystemExit("bench_arm: pkg-config finds no glib-2.0 (Debian: libglib2.0-dev)")
    cmd = ["gcc", "-O2", "-shared", "-fPIC", "-Wall", "-I", str(header.parent), str(src), "-o", str(so),
           *glib.stdout.split()]
    subprocess.run(cmd, check=True)
    return so


def qemu_version() -> str:
    try:
        out = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return ""
    m = re.search(r"version (\S+)", out)
    return m.group(1) if m else ""


@dataclass
class Counts:
    marks: dict[int, int]
    """Instructions executed by all threads up to each mark (the phase numbers of bench_guest.py; -1: at exit)."""
    blocks: dict[int, dict[int, int]]
    """Per mark: block start address → instructions executed there up to the mark."""

    def phase(self, name: str) -> int:
        a, b = MARK_PHASES[name]
        return self.marks[b] - self.marks[a]

    def phase_blocks(self, name: str) -> dict[int, int]:
        a, b = MARK_PHASES[name]
        before, after = self.blocks.get(a, {}), self.blocks.get(b, {})
        return {addr: n - before.get(addr, 0) for addr, n in after.items() if n - before.get(addr, 0)}


def read_counts(path: Path) -> Counts:
    """The plugin's output: marks, and each mark's per-block cumulative counts (summed over retranslations)."""
    marks: dict[int, int] = {}
    blocks: dict[int, dict[int, int]] = {}
    with open(path) as f:
        for line in f:
            if line.startswith("mark "):
                _, phase, total = line.split()
                marks[int(phase)] = int(total)
            elif line.startswith("end "):
                marks[-1] = int(line.split()[1])
            elif line.startswith("tb "):
                _, phase, n = line.split()
                table: dict[int, int] = defaultdict(int)
                for _ in range(int(n)):
                    addr, c = next(f).split()
                    table[int(addr, 16)] += int(c)
                blocks[-1 if phase == "end" else int(phase)] = dict(table)
    return Counts(marks, blocks)


def probe_binary() -> Path:
    """scripts/arm/probe.S assembled (a program whose count between its marks is 3008 + 3000 x (argc - 1))."""
    out = bench_dir() / "probe"
    src = REPO / "scripts" / "arm" / "probe.S"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["aarch64-linux-gnu-gcc", "-nostdlib", "-static", "-o", str(out), str(src)], check=True)
    return out


def check_plugin(plugin: Path) -> list[int]:
    """The counts between the probe's marks for 1, 2 and 1 arguments: exact means [3008, 6008, 3008]."""
    probe = probe_binary()
    got = []
    with tempfile.TemporaryDirectory() as tmp:
        for args in ([], ["x"], []):
            out = Path(tmp) / "counts"
            subprocess.run([QEMU, "-cpu", "cortex-a72", "-plugin", f"{plugin},out={out}", str(probe), *args], check=True)
            c = read_counts(out)
            got.append(c.marks[2] - c.marks[1])
    return got


# -- the inputs ----------------------------------------------------------------------------


def texts(n: int) -> list[str]:
    from pocketembed.sms import load_sms

    return load_sms()[:n]


def hf_token_ids(items: Sequence[str]) -> list[list[int]]:
    """Token ids as scripts/bench_peers.py's ort_runner makes them (tokenizers, truncated at 256)."""
    from bench_peers import MAX_TOKENS, source_dir
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(source_dir() / "tokenizer.json"))
    tok.enable_truncation(MAX_TOKENS)
    tok.no_padding()
    return [e.ids for e in tok.encode_batch(list(items))]


def reference(items: Sequence[str]) -> np.ndarray:
    """sentence-transformers fp32 vectors of the texts on x86 (as scripts/make_reference.py makes them), cached."""
    key = hashlib.sha256("\x00".join(items).encode()).hexdigest()[:12]
    path = bench_dir() / f"st-fp32-{key}.npy"
    if path.exists():
        return np.load(path)
    import torch
    from sentence_transformers import SentenceTransformer

    from pocketembed.gguf_models.catalog import get
    from pocketembed.gguf_models.prepare import source_model_dir

    torch.set_num_threads(THREADS)
    st = SentenceTransformer(str(source_model_dir(get("all-minilm-l6-v2:f16").source, progress=lambda m: None)),
                             device="cpu")
    vecs = st.encode(list(items), batch_size=32, normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)
    np.save(path, vecs)
    return vecs


def gguf(quant: str) -> Path:
    from pocketembed import paths
    from pocketembed.gguf_models import manifest
    from pocketembed.gguf_models.catalog import get

    return manifest.model_path(paths.home(), get(f"all-minilm-l6-v2:{quant}"))


def ort_site() -> Path:
    """ONNX Runtime's aarch64 wheel and its pure-Python dependencies, unpacked for the guest's python3.11.

    numpy is the arm64 root's own (Debian's 1.24: the 1.17.3 wheel is built against numpy 1.x)."""
    site = WORK / f"ort-{ORT_VERSION}"
    if (site / "onnxruntime" / "__init__.py").exists():
        return site
    wheels = WORK / "ort-wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    plat = ["--platform", "manylinux2014_aarch64", "--platform", "manylinux_2_28_aarch64", "--python-version", "3.11",
            "--implementation", "cp", "--only-binary=:all:"]
    pip = [sys.executable, "-m", "pip", "-q"]
    if not list(wheels.glob(f"onnxruntime-{ORT_VERSION}-*.whl")):
        say(f"downloading onnxruntime {ORT_VERSION} for aarch64 (cp311 manylinux wheel)")
        subprocess.run([*pip, "download", "--no-deps", *plat, "-d", str(wheels), f"onnxruntime=={ORT_VERSION}", *ORT_DEPS],
                       check=True)
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--find-links", str(wheels), *plat, "--target",
                    str(site), f"onnxruntime=={ORT_VERSION}", *ORT_DEPS], check=True)
    return site


def staged() -> Path:
    """pocketembed and llama_cpp's bindings laid out for the guest (arm_compare.py's stage), once per run."""
    import atexit

    from arm_compare import stage

    dest = bench_dir() / f"stage-{os.getpid()}"
    shutil.rmtree(dest, ignore_errors=True)
    atexit.register(shutil.rmtree, dest, True)
    src = sorted(WORK.glob("llama_cpp_python-*/"))[-1]
    return stage(dest, src)


# -- symbols -------------------------------------------------------------------------------


@dataclass
class Mapping:
    start: int
    end: int
    offset: int
    path: str


def read_maps(path: Path) -> list[Mapping]:
    out = []
    for line in path.read_text().splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and "x" in parts[1] and parts[5].startswith("/"):
            a, b = (int(x, 16) for x in parts[0].split("-"))
            out.append(Mapping(a, b, int(parts[2], 16), parts[5]))
    return sorted(out, key=lambda m: m.start)


@functools.lru_cache(maxsize=None)
def _load_segments(path: str) -> list[tuple[int, int, int]]:
    """(file offset, size, vaddr) of an ELF64's PT_LOAD segments: file offsets to nm's addresses."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            return []
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    segs = []
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from("<IIQQQQ", table, i * phentsize)
        if p_type == 1:
            segs.append((p_offset, p_filesz, p_vaddr))
    return segs


@functools.lru_cache(maxsize=None)
def symbols(path: str) -> tuple[list[int], list[tuple[int, str]]]:
    """Function symbols of a shared object (static table, else the dynamic one): sorted starts, (end, name)."""
    nm = shutil.which("aarch64-linux-gnu-nm") or "nm"
    rows: dict[int, tuple[int, str]] = {}
    for flags in (["-S", "-C", "--defined-only"], ["-D", "-S", "-C", "--defined-only"]):
        r = subprocess.run([nm, *flags, path], capture_output=True, text=True)
        for line in r.stdout.splitlines():
            parts = line.split(None, 3)
            if len(parts) == 4 and parts[2] in "tTwWi":
                addr, size = int(parts[0], 16), int(parts[1], 16)
                if size and addr not in rows:
                    rows[addr] = (addr + size, parts[3])
    starts = sorted(rows)
    return starts, [rows[a] for a in starts]


def symbolize(blocks: dict[int, int], maps: list[Mapping]) -> dict[tuple[str, str], int]:
    """Instructions per (shared object, function); unmapped code is "[unknown]"."""
    starts = [m.start for m in maps]
    out: dict[tuple[str, str], int] = defaultdict(int)
    for addr, n in blocks.items():
        i = bisect.bisect_right(starts, addr) - 1
        if i < 0 or addr >= maps[i].end:
            out[("[unknown]", "")] += n
            continue
        m = maps[i]
        off = addr - m.start + m.offset
        vaddr = next((off - o + v for o, s, v in _load_segments(m.path) if o <= off < o + s), off)
        syms, ends = symbols(m.path)
        j = bisect.bisect_right(syms, vaddr) - 1
        dso = os.path.basename(m.path)
        name = ends[j][1] if j >= 0 and vaddr < ends[j][0] else ""
        out[(dso, name)] += n
    return dict(out)


# Which ggml op (or part of the run) a function's instructions belong to. Functions are the
# leaves qemu ran (inlined helpers count as their caller), matched in order; ONNX Runtime's
# library exports few symbols, so most of its time shows as the library's own line.
OPS: list[tuple[str, str]] = [
    ("wait: barrier / spin", r"ggml_barrier|compute_check_for_work|poll_for_work|ggml_thread_cpu_relax|"
                             r"ThreadPoolTempl|SpinPause|sched_yield"),
    ("matmul: quantize activations", r"quantize_row_q8|quantize_mat_q8|ggml_quantize_mat|kai_run_lhs|lhs_quant|"
                                     r"QuantizeLinear|MlasQuantize"),
    ("matmul", r"vec_dot_q|ggml_gemm_|ggml_gemv_|tinyBLAS|sgemm|mul_mat|kai_|Gemm|Sgemm|MatMul"),
    ("attention (flash_attn, softmax)", r"flash_attn|vec_dot_f16|vec_mad_f16|vec_mad1_f16|vec_scale_f16|soft_max|"
                                        r"[Ss]oftmax|Attention|ggml_v_expf|expf"),
    ("GELU (ggml's unary op)", r"gelu|Gelu|erf|forward_unary"),
    ("layer norm", r"norm|LayerNorm|vec_cvar"),
    ("add / mul / scale", r"forward_add|forward_mul\b|ggml_vec_add|ggml_vec_mul|forward_scale|binary_op|"
                          r"apply_binary|vec_binary"),
    ("get_rows / cpy / cont", r"get_rows|forward_cpy|forward_dup|forward_cont|fp16_to_fp32|fp32_to_fp16"),
    ("tokenize", r"llama_vocab|tokeniz|unicode_|llm_tokenizer"),
    ("ggml / llama other", r"ggml|llama|gguf"),
]


def op_of(dso: str, name: str) -> str:
    """The op table above for llama.cpp's, KleidiAI's and ONNX Runtime's code; the library otherwise."""
    if re.search(r"libggml|libllama|onnxruntime", dso):
        for op, pattern in OPS:
            if re.search(pattern, name):
                return op
        return "onnxruntime (no symbol)" if "onnxruntime" in dso and not name else f"{dso} other"
    if re.match(r"python3|libpython", dso):
        return "Python interpreter"
    if re.search(r"multiarray|umath|numpy|blas|lapack", dso):
        return "numpy"
    if re.match(r"libm\.so", dso) and re.search(r"expf", name):
        return "attention (flash_attn, softmax)"  # the scalar expf of ggml's one-row flash attention
    if re.match(r"libc\.so|libm\.so|ld-linux", dso):
        return "libc: memcpy / memset" if re.search(r"mem(cpy|set|move)", name) else "libc / libm other"
    if dso.startswith("libstdc++"):
        return "libstdc++"
    return dso


# -- the runs ------------------------------------------------------------------------------


@dataclass
class Row:
    engine: str
    build: str
    march: str
    cpu: str
    texts: int
    single: float | None = None
    """Million instructions per SMS, one SMS per call."""
    bulk: float | None = None
    """Million instructions per SMS, all in one call."""
    probe: float | None = None
    load: float | None = None
    """Million instructions of the import and load (once)."""
    wait_single: float | None = None
    wait_bulk: float | None = None
    """Shares (0-1) of the phase in spin-waits."""
    cos_mean: float | None = None
    cos_min: float | None = None
    cos_single_mean: float | None = None
    seconds: float = 0.0
    features: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    skipped: str = ""
    breakdown: dict = field(default_factory=dict)
    spread: dict | None = None
    """Largest relative difference between repeats (with --repeat): single, single excluding waits, bulk."""


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def run_guest(cmd_args: list[str], cpu: str, env: dict[str, str], plugin: Path, counts: Path, timeout: float) -> dict:
    """bench_guest.py in the arm64 root under qemu with the counter; its JSON line."""
    root = WORK / "root"
    cmd = [QEMU, "-cpu", cpu, "-plugin", f"{plugin},out={counts},tb=on", "-L", str(root), str(root / "usr/bin/python3"),
           str(REPO / "scripts" / "arm" / "bench_guest.py"), *cmd_args]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "LLAMA_CPP"))}
    full_env.update(env, PYTHONDONTWRITEBYTECODE="1", PYTHONNOUSERSITE="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"guest run failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure(engine: str, build: Build | None, cpu: str, items: list[str], ids: list[list[int]], ref: np.ndarray,
            probe: tuple[str, list[int]] | None, probe_reps: int, plugin: Path, stage: Path, timeout: float,
            threads: int = THREADS, ort_spin: bool = False, modes: Sequence[str] = ("single", "bulk")) -> Row:
    """One row: one guest process, its phases counted, its vectors compared with sentence-transformers."""
    row = Row(engine=engine, build=build.name if build else "-", march=build.march if build else "-", cpu=cpu,
              texts=len(items))
    with tempfile.TemporaryDirectory(dir=bench_dir()) as tmp_s:
        tmp = Path(tmp_s)
        inputs, probe_file = tmp / "inputs.json", tmp / "probe.json"
        if engine.startswith("ort"):
            fp32, int8 = onnx_models()
            model = fp32 if engine == "ort-fp32" else int8
            inputs.write_text(json.dumps(ids))
            probe_file.write_text(json.dumps(probe[1] if probe else []))
            env = {"PYTHONPATH": f"{ort_site()}"}
            kind = "ort"
        else:
            assert build is not None
            model = gguf(engine)
            inputs.write_text(json.dumps(items))
            probe_file.write_text(json.dumps(probe[0] if probe else ""))
            env = {"PYTHONPATH": str(stage), "LLAMA_CPP_LIB_PATH": str(WORK / f"lib-{build.name}")}
            kind = "pocketembed"
        args = ["--engine", kind, "--model", str(model), "--inputs", str(inputs), "--threads", str(threads),
                "--batch", str(ORT_BATCH), "--ort-spin", "on" if ort_spin else "off", "--modes", ",".join(modes),
                "--out", str(tmp / "vecs.npz"), "--maps", str(tmp / "maps")]
        if probe and probe_reps:
            args += ["--probe", str(probe_file), "--probe-reps", str(probe_reps)]
        t = time.perf_counter()
        info = run_guest(args, cpu, env, plugin, tmp / "counts", timeout)
        row.seconds = round(time.perf_counter() - t, 1)
        counts = read_counts(tmp / "counts")
        maps = read_maps(tmp / "maps")
        vecs = np.load(tmp / "vecs.npz")
        n = len(items)
        row.single = counts.phase("single") / n / 1e6 if "single" in modes else None
        row.bulk = counts.phase("bulk") / n / 1e6 if "bulk" in modes else None
        row.load = counts.phase("load") / 1e6
        if probe and probe_reps:
            row.probe = counts.phase("probe") / probe_reps / 1e6
        for phase in ("single", "bulk", "probe"):
            if (phase == "probe" and not (probe and probe_reps)) or (phase != "probe" and phase not in modes):
                continue
            per_fn = symbolize(counts.phase_blocks(phase), maps)
            total = sum(per_fn.values()) or 1
            ops: dict[str, int] = defaultdict(int)
            for (dso, name), c in per_fn.items():
                ops[op_of(dso, name)] += c
            top = sorted(per_fn.items(), key=lambda kv: -kv[1])[:25]
            reps = probe_reps if phase == "probe" else n
            row.breakdown[phase] = {
                "total_m": total / reps / 1e6,
                "ops": {k: v / total for k, v in sorted(ops.items(), key=lambda kv: -kv[1])},
                "top": [[dso, name, c / reps / 1e6, c / total] for (dso, name), c in top],
            }
            wait = None if engine.startswith("ort") else ops.get("wait: barrier / spin", 0) / total
            if phase == "single":
                row.wait_single = wait
            elif phase == "bulk":
                row.wait_bulk = wait
        if "bulk" in vecs:
            bulk_cos = cosines(vecs["bulk"], ref)
            row.cos_mean, row.cos_min = float(bulk_cos.mean()), float(bulk_cos.min())
        if "single" in vecs:
            row.cos_single_mean = float(cosines(vecs["single"], ref).mean())
        row.features = info.get("cpu_features", [])
        row.info = {k: v for k, v in info.items() if k not in ("out",)}
    return row


@functools.lru_cache(maxsize=None)
def onnx_models() -> tuple[Path, Path]:
    """bench_peers.py's ONNX exports (torch.onnx on x86, quantize_dynamic for int8), made once and cached."""
    from bench_peers import onnx_files

    return onnx_files()


def build_missing(build: Build) -> str | None:
    """Why a build cannot be measured (not built, or KleidiAI unavailable), or None."""
    lib = WORK / f"lib-{build.name}"
    reason_file = WORK / f"lib-{build.name}.unavailable"
    if (lib / "libllama.so").exists():
        return None
    if reason_file.exists():
        return reason_file.read_text().strip()
    flag = "--build-only" if build.name in ("dotprod", "i8mm") else "--bench-builds"
    return f"not built: run scripts/arm_verify.sh {flag}"


def pick_probe() -> tuple[str, list[int]] | None:
    """The first bundled SMS of PROBE_TOKENS tokens ([CLS] and [SEP] included): the breakdown's short text."""
    from pocketembed.sms import load_sms

    sms = load_sms()
    for text, tid in zip(sms, hf_token_ids(sms)):
        if len(tid) == PROBE_TOKENS:
            return text, tid
    return None


def host_cpu() -> str:
    from bench_peers import cpu_model

    return cpu_model()


# -- output --------------------------------------------------------------------------------


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.0f}%"


def excl_waits(r: Row, mode: str) -> float | None:
    """A phase's count per SMS without ggml_barrier's spin-waits (ONNX Runtime's: all, its waits are not seen)."""
    v = getattr(r, mode)
    if mode == "probe":
        w = (r.breakdown.get("probe") or {}).get("ops", {}).get("wait: barrier / spin")
    else:
        w = getattr(r, f"wait_{mode}")
    return None if v is None else v * (1 - (w or 0))


def table(rows: list[Row]) -> str:
    """The markdown table: M instructions per SMS, ratios to ONNX Runtime on the same -cpu, cosine."""
    # Per mode, the last ONNX Runtime row on that -cpu with a figure for it (a rerun of one mode wins).
    ort = {(r.engine, r.cpu, mode): excl_waits(r, mode) for mode in ("single", "probe", "bulk")
           for r in rows if r.engine.startswith("ort") and not r.skipped and excl_waits(r, mode) is not None}
    lines = ["| engine | build (-march) | qemu -cpu | single M/SMS | of which waits | single excl. waits | "
             f"{PROBE_TOKENS}-token SMS excl. waits | bulk M/SMS | single excl. waits × ORT fp32 / int8 | "
             f"{PROBE_TOKENS}-token × ORT fp32 / int8 | bulk × ORT fp32 / int8 | cos vs ST fp32 mean / min |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        engine = {"q8_0": "pocketembed q8_0", "q4_0": "pocketembed q4_0", "ort-fp32": f"ONNX Runtime {ORT_VERSION} fp32",
                  "ort-int8": f"ONNX Runtime {ORT_VERSION} dynamic int8"}[r.engine]
        build = "-" if r.build == "-" else f"{r.build} ({r.march})"
        if r.skipped:
            lines.append(f"| {engine} | {build} | {r.cpu} | not measured: {r.skipped} | | | | | | | | |")
            continue
        ratios = []
        for mode in ("single", "probe", "bulk"):
            pair = []
            for peer in ORTS:
                mine, theirs = excl_waits(r, mode), ort.get((peer, r.cpu, mode))
                pair.append(f"{mine / theirs:.2f}×" if mine and theirs and not r.engine.startswith("ort") else "—")
            ratios.append(" / ".join(pair))
        sp = {k: f" (±{v * 50:.2f}%)" for k, v in (r.spread or {}).items()}
        lines.append(f"| {engine} | {build} | {r.cpu} | {fmt(r.single)}{sp.get('single', '')} | {pct(r.wait_single)} | "
                     f"{fmt(excl_waits(r, 'single'))}{sp.get('single_excl_waits', '')} | {fmt(excl_waits(r, 'probe'))} | "
                     f"{fmt(r.bulk)}{sp.get('bulk', '')} | "
                     f"{ratios[0]} | {ratios[1]} | {ratios[2]} | "
                     f"{fmt(r.cos_mean, '.5f')} / {fmt(r.cos_min, '.4f')} |")
    return "\n".join(lines)


def breakdown_text(r: Row, phases: Iterable[str] = ("probe", "bulk"), top: int = 12) -> str:
    label = {"probe": f"one {PROBE_TOKENS}-token SMS", "bulk": f"bulk, per SMS of {r.texts}", "single": "single, per SMS"}
    out = []
    for phase in phases:
        b = r.breakdown.get(phase)
        if not b:
            continue
        out.append(f"\n{r.engine} on {r.build} (-cpu {r.cpu}), {label[phase]}: {b['total_m']:.1f} M instructions")
        out.append("  by op:   " + ", ".join(f"{k} {v * 100:.1f}%" for k, v in b["ops"].items() if v >= 0.005))
        out.append("  top functions:")
        for dso, name, m, share in b["top"][:top]:
            shown = name if len(name) <= 70 else name[:67] + "..."
            out.append(f"    {share * 100:5.1f}%  {m:7.2f} M  {shown or '?'}  [{dso}]")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=200, help="the first N bundled SMS (default 200)")
    ap.add_argument("--builds", default=",".join(BUILDS), help=f"of {','.join(BUILDS)}")
    ap.add_argument("--engines", default=",".join(QUANTS + ORTS), help=f"of {','.join(QUANTS + ORTS)}")
    ap.add_argument("--ort-cpus", help="qemu -cpu models for the ONNX Runtime rows (default: those of the builds)")
    ap.add_argument("--breakdown", action="store_true", help=f"also embed one {PROBE_TOKENS}-token SMS --probe-reps "
                    "times and print per-op and per-function splits of it and of the bulk decode")
    ap.add_argument("--probe-reps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=1, help="run each row N times and show the bulk count's spread")
    ap.add_argument("--modes", default="single,bulk", help="single, bulk or both (single, 2 threads: the slow part)")
    ap.add_argument("--threads", type=int, default=THREADS, help="threads per engine (default 2; 1 has no waits)")
    ap.add_argument("--ort-spin", choices=("on", "off"), default="off",
                    help="ONNX Runtime's intra-op spinning (default off: see above)")
    ap.add_argument("--timeout", type=float, default=7200)
    ap.add_argument("--json", type=Path, help="also write the rows (with their breakdowns) to this file")
    ap.add_argument("--plugin-only", action="store_true", help="build the counter, check it on scripts/arm/probe.S")
    ap.add_argument("--load", type=Path, nargs="+", help="print the table (and breakdowns) of --json files, run nothing")
    args = ap.parse_args()

    if args.load:
        rows = [Row(**r) for f in args.load for r in json.loads(f.read_text())]
        report(rows, args, qemu_version(), rows[0].texts if rows else 0)
        return 0

    version = qemu_version()
    if not version:
        say(f"{QEMU} not found (Debian: qemu-user)")
        return 3
    if not version.startswith("7.2"):
        say(f"warning: qemu {version}; the counter is built against qemu 7.2's plugin API")
    plugin = build_plugin()
    got = check_plugin(plugin)
    exact = got[0] == got[2] and got[1] - got[0] == 3000
    say(f"counter {plugin.name}: probe counts {got} ({'exact' if exact else 'NOT EXACT'})")
    if args.plugin_only or not exact:
        return 0 if exact else 1
    if not (WORK / "root" / ".unpacked").exists():
        say(f"no arm64 root in {WORK}: run scripts/arm_verify.sh --build-only")
        return 3

    items = texts(args.texts)
    ids = hf_token_ids(items)
    ref = reference(items)
    probe = pick_probe() if args.breakdown else None
    builds = [BUILDS[b] for b in args.builds.split(",") if b]
    engines = [e for e in args.engines.split(",") if e]
    ort_cpus = args.ort_cpus.split(";") if args.ort_cpus else list(dict.fromkeys(b.cpu for b in builds))
    stage = staged()
    jobs: list[tuple[str, Build | None, str]] = []
    for cpu in ort_cpus:
        jobs += [(e, None, cpu) for e in engines if e in ORTS]
    for b in builds:
        jobs += [(e, b, b.cpu) for e in engines if e in QUANTS]
    rows: list[Row] = []
    for engine, build, cpu in jobs:
        why = build_missing(build) if build else None
        if why:
            rows.append(Row(engine, build.name, build.march, cpu, len(items), skipped=why))  # type: ignore[union-attr]
            say(f"{engine} {build.name}: not measured: {why}")  # type: ignore[union-attr]
            continue
        runs = []
        for _ in range(max(1, args.repeat)):
            runs.append(measure(engine, build, cpu, items, ids, ref, probe, args.probe_reps if args.breakdown else 0,
                                plugin, stage, args.timeout, args.threads, args.ort_spin == "on",
                                args.modes.split(",")))
            r = runs[-1]
            say(f"{engine} {r.build} -cpu {cpu}: single {fmt(r.single)} M/SMS, bulk {fmt(r.bulk)} M/SMS, "
                f"probe {fmt(r.probe)} M, load {r.load:.0f} M, cos {fmt(r.cos_mean, '.5f')}, {r.seconds:.0f} s")
        row = runs[0]
        if len(runs) > 1:
            row.spread = {mode: (max(v) - min(v)) / statistics.mean(v) for mode, v in
                          (("single", [x.single for x in runs]), ("single_excl_waits", [excl_waits(x, "single") for x in runs]),
                           ("bulk", [x.bulk for x in runs])) if None not in v}
        rows.append(row)
        if args.json:  # after every row: a long run interrupted keeps what it measured
            args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    report(rows, args, version, len(items))
    return 0


def report(rows: list[Row], args: argparse.Namespace, version: str, n_texts: int) -> None:
    """The table, the -cpu models' features, the breakdowns (with --breakdown) and what the proxy cannot see."""

    print(f"Guest instructions per SMS under qemu-aarch64 {version} user-mode emulation (TCG plugin "
          f"scripts/arm/insn_count.c), the first {n_texts} bundled SMS, {args.threads} threads; host {host_cpu()}")
    print("single: each SMS in an embed call of its own; bulk: all in one call (ONNX Runtime: length-sorted "
          f"batches of {ORT_BATCH}); the counts between the guest's phase marks / SMS. Ratios: against ONNX "
          "Runtime on the same qemu -cpu model. waits: ggml_barrier's spin-waits (the bulk's two contexts run one "
          f"thread each and have none). ONNX Runtime: intra-op spinning {args.ort_spin}, its waits not seen.\n")
    print(table(rows))
    feats = {r.cpu: " ".join(r.features) for r in rows if r.features}
    print("\nqemu -cpu models (features the guest's auxv reports):", *(f"{k}: {v}" for k, v in feats.items()), sep="\n  ")
    print("builds ($POCKETEMBED_ARM_DIR/lib-NAME, scripts/arm_verify.sh):")
    for name in dict.fromkeys(r.build for r in rows if r.build != "-"):
        b = BUILDS[name]
        src = WORK / f"lib-{name}" / "kleidiai-source.txt"
        extra = f"; {src.read_text().strip()}" if src.exists() else ""
        print(f"  {name}: -march={b.march}, run on -cpu {b.cpu}: {b.note}{extra}")
    if args.breakdown:
        for r in rows:
            if r.breakdown:
                print(breakdown_text(r))
    print("\nNot visible to this proxy: memory and cache stalls, instruction latencies and SIMD width of real cores "
          "(qemu's NEON is 128-bit), frequency, big.LITTLE placement, thermal limits.")


if __name__ == "__main__":
    sys.exit(main())
