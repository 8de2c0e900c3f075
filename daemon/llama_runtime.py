"""Process-wide llama.cpp state: import, backend init, logging, build checks.

Kept apart from the engine because it is global: llama.cpp has one log callback
and one backend per process, whatever number of models are loaded.
"""

from __future__ import annotations

import contextlib
import ctypes
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
