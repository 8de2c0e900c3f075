"""Process-wide llama.cpp state: import, backend init, logging, build checks.

Kept apart from the engine because it is global: llama.cpp has one log callback
and one backend per process, whatever number of models are loaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import re
import threading
from collections.abc import Iterator

from pocketembed.errors import UnsupportedBuild

log = logging.getLogger("pocketembed.llama")

# scripts/setup.sh builds llama.cpp with neither OpenMP nor a BLAS backend: ggml's own
# threads spin in barriers only during a decode and exit after it. The settings below
# are for a llama-cpp-python built another way (a stock wheel, a distribution's
# package), and must be set before the library loads:
# - OpenMP's idle threads sleep instead of spinning after each decode: a spinning pool
#   burns a phone's battery and steals the next request's CPU (p99 of a single-SMS
#   embed 344 -> 78 ms with PASSIVE, though every barrier then costs a futex wake-up);
# - idle OpenBLAS threads sleep at once instead of spinning 2^28 cycles after every
#   call (measured: 2.5 s of CPU burnt per 4 s of idling); their number is set to one
#   in daemon/__init__.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

try:
    import llama_cpp as llama  # noqa: F401  (re-exported for the engine)
except ImportError as e:  # exercised on a client-only install (tests/test_package.py)
    raise ModuleNotFoundError(
        "pocketembed's daemon needs llama-cpp-python: pip install 'pocketembed[daemon]'", name="llama_cpp"
    ) from e

ALLOW_AMX_ENV = "POCKETEMBED_ALLOW_AMX"

_init_lock = threading.Lock()
_initialized = False
_capture = threading.local()
_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}


class _Captured:
    def __init__(self) -> None:
        self.lines: list[tuple[int, str]] = []

    def last_error(self) -> str | None:
        errors = [t for lvl, t in self.lines if lvl >= logging.WARNING]
        return errors[-1] if errors else None

    def text(self) -> str:
        return "".join(t + "\n" for _, t in self.lines)


@llama.llama_log_callback
def _on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    msg = text.decode("utf-8", "replace").rstrip("\n")
    if not msg:
        return
    pylevel = _LEVELS.get(level, logging.DEBUG)
    if "load" in msg or "buffer type" in msg:
        _note_load(msg)
    sink = getattr(_capture, "sink", None)
    if sink is not None:
        sink.lines.append((pylevel, msg))
    # llama.cpp is chatty at load time; its errors are surfaced through our own exceptions.
    log.log(logging.DEBUG if pylevel < logging.ERROR else logging.WARNING, "%s", msg)


def ensure_backend() -> None:
    """Initialise llama.cpp once and route its log lines into Python logging."""
    global _initialized
    with _init_lock:
        if _initialized:
            return
        llama.llama_log_set(_on_log, ctypes.c_void_p(0))
        llama.llama_backend_init()
        _initialized = True


@contextlib.contextmanager
def capture_log() -> Iterator[_Captured]:
    """Collect llama.cpp's log lines of this thread, to explain a failed load."""
    sink = _Captured()
    prev = getattr(_capture, "sink", None)
    _capture.sink = sink
    try:
        yield sink
    finally:
        _capture.sink = prev


def system_info() -> str:
    return llama.llama_print_system_info().decode("utf-8", "replace").strip()


def cpu_features() -> dict[str, bool]:
    """The CPU features llama.cpp was built with and found at run time ("AVX2": True, ...)."""
    feats: dict[str, bool] = {}
    for name, val in re.findall(r"([A-Z0-9_]+) = (\d)", system_info()):
        feats[name] = val == "1"
    return feats


BUILD_RECORD = "pocketembed_build.json"
"""The file scripts/setup.sh puts into the llama_cpp package it builds (see build_record)."""

_LOAD_START = re.compile(r"loaded meta data with \d+ key-value pairs and (\d+) tensors from (.+) \(version ")
_LOAD_BUFFER = re.compile(r"load_tensors: +(\S+) model buffer size = +([\d.]+) MiB")
_LOAD_FALLBACK = re.compile(r"tensor '[^']*' \(\w+\) (?:\(and (\d+) others\) )?cannot be used with preferred buffer type (\S+),")
_loads_lock = threading.Lock()
_loads: dict[str, dict] = {}
"""Per model file, what llama.cpp logged about its weights' buffers at its last load (see model_kernels)."""


def _note_load(msg: str) -> None:
    """Keep the lines of a model load that say where its weights went (called from the log callback).

    A load runs on one thread from its "loaded meta data ... from PATH" line to its "model buffer
    size" lines, so the thread's current file tells which model they belong to.
    """
    if m := _LOAD_START.search(msg):
        _capture.loading = m.group(2)
        with _loads_lock:
            _loads[m.group(2)] = {"tensors": int(m.group(1)), "buffers_mib": {}, "not_repacked_tensors": 0}
        return
    path = getattr(_capture, "loading", None)
    if path is None:
        return
    with _loads_lock:
        entry = _loads.get(path)
        if entry is None:
            return
        if m := _LOAD_BUFFER.search(msg):
            entry["buffers_mib"][m.group(1)] = float(m.group(2))
        elif (m := _LOAD_FALLBACK.search(msg)) and m.group(2).endswith("REPACK"):
            entry["not_repacked_tensors"] += 1 + int(m.group(1) or 0)


@functools.lru_cache(maxsize=1)
def build_record() -> dict:
    """What this llama-cpp-python was built from: scripts/setup.sh's record in the package, or "unknown".

    The record (llama-cpp-python version, llama.cpp commit, patches applied, CMAKE_ARGS) is put in
    the wheel before it is built, so it goes and comes with that wheel; a wheel built any other way
    (PyPI, a distribution, pip without setup.sh) has none.
    """
    path = os.path.join(os.path.dirname(llama.__file__), BUILD_RECORD)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {"llama_cpp_python": getattr(llama, "__version__", None), "patched": "unknown",
                "note": "no build record: this llama-cpp-python was not built by scripts/setup.sh"}
    record["patched"] = bool(record.get("patches"))
    return record


@functools.lru_cache(maxsize=1)
def _cpu_features_cached() -> dict[str, bool]:
    return cpu_features()


def model_kernels(path: str | os.PathLike[str]) -> dict:
    """Which kernels a loaded model runs on: the CPU features, where its weights went, the build.

    - ``cpu``: the features llama.cpp's CPU backend was compiled with and uses
      (``llama_print_system_info``; "REPACK" = the build can repack weights at load);
    - ``weights``: llama.cpp's own report at the model's load, from its log: the MiB of each
      buffer type ("CPU_Mapped": the file's pages used as they are; "CPU_REPACK": weights copied
      into an interleaved layout for the repacked GEMM kernels) and how many tensors it could not
      repack. ``repacked`` is true when any weight was. On x86, stock llama.cpp repacks q4_0 (AVX2)
      but not q8_0; our patch 6 repacks q8_0 on AVX512-VNNI, so a q8_0 model shows "CPU_REPACK"
      only with it. None when the load's lines were not seen (a load before ``ensure_backend``);
    - ``build``: ``build_record()``, patched or stock.
    """
    with _loads_lock:
        entry = _loads.get(os.fspath(path))
        entry = None if entry is None else {**entry, "buffers_mib": dict(entry["buffers_mib"])}
    if entry is not None:
        repacked_mib = sum(v for k, v in entry["buffers_mib"].items() if k.endswith("REPACK"))
        entry["repacked"] = repacked_mib > 0
        entry["repacked_tensors"] = entry["tensors"] - entry["not_repacked_tensors"] if entry["repacked"] else 0
    return {"cpu": sorted(k for k, v in _cpu_features_cached().items() if v), "weights": entry,
            "build": build_record()}


def check_build_supports_quantized(quantized: bool) -> None:
    """Refuse the one configuration known to crash instead of dying with SIGSEGV.

    GCC 12 miscompiles ggml's AMX matmul: a build with AMX enabled segfaults on the
    first q8_0/q4 embed on Sapphire Rapids Xeons (llama.cpp issue #20824). Our
    install script builds without AMX; this catches a build made some other way.
    """
    if not quantized or os.environ.get(ALLOW_AMX_ENV) == "1":
        return
    feats = cpu_features()
    if feats.get("AMX_INT8"):
        raise UnsupportedBuild(
            "this llama-cpp-python build uses AMX, whose GCC-12 build crashes on quantized models "
            "(llama.cpp #20824); reinstall it with scripts/install.sh (GGML_NATIVE=OFF, no AMX) "
            f"or set {ALLOW_AMX_ENV}=1 if your build is known good"
        )
