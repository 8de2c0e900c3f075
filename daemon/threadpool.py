"""ggml's own thread pool, made once per llama context instead of once per decode.

Without one, llama.cpp (built without OpenMP, as scripts/setup.sh builds it)
creates and joins its helper threads inside every decode. After the daemon has
idled for a few milliseconds (as it does between requests) the new helper often
lands on the caller's own CPU, and the two then spin in ggml's barriers on one
core: measured on 2 vCPUs, a 20-token SMS took 17-22 ms after 20-100 ms of
idleness against 5.5 ms back to back. A persistent pool whose helpers sleep on a
condition variable between decodes (poll = 0: no spinning, no wake-ups while
idle) and are each bound to a CPU of their own took 7 ms whatever the idleness.

For the length of a multi-thread decode the decoding thread itself is bound to
the CPU after the helpers' (``pin_caller``), so that it never shares a core
with one of them.

Binding is for machines whose cores are alike (x86 servers and desktops). A
phone's cores are not: bound to "the second CPU" a helper would sit on a little
core and every barrier would wait for it, so on ARM the helpers float.

llama-cpp-python does not bind these functions, so they are declared here; the
parameter struct's layout is checked against the library before any use, and
anything unexpected means no pool (llama.cpp's per-decode threads, as before).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
from pathlib import Path

from . import llama_runtime as rt

log = logging.getLogger("pocketembed.threadpool")

_MAX_THREADS = 512  # GGML_MAX_N_THREADS: the size of the struct's cpumask


class _Params(ctypes.Structure):
    _fields_ = [
        ("cpumask", ctypes.c_bool * _MAX_THREADS),
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


def _mapped(stem: str) -> str | None:
    """The file of the library ``stem`` that llama.cpp already loaded.

    A wheel holds each library several times over (libggml-cpu.so, .so.0, .so.0.x:
    copies, not links), so opening one by name could load a second copy beside
    the one libllama uses, with its own globals. The mapped file is the one.
    """
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and Path(parts[5].strip()).name.startswith(stem + ".so"):
                    return parts[5].strip()
    except OSError:
        pass
    return None


def _load() -> tuple[ctypes.CDLL, ctypes.CDLL] | None:
    """ggml's base and CPU libraries beside libllama, with the pool functions declared; None if absent."""
    llama_lib = getattr(rt.llama.llama_cpp, "_lib", None)
    if llama_lib is None or not hasattr(llama_lib, "llama_attach_threadpool"):
        return None
    base_path, cpu_path = _mapped("libggml-base"), _mapped("libggml-cpu")
    if base_path is None or cpu_path is None:
        log.info("ggml's libraries are not among this process's mappings; llama.cpp makes its threads per decode")
        return None
    try:
        base, cpu = ctypes.CDLL(base_path), ctypes.CDLL(cpu_path)
        base.ggml_threadpool_params_init.argtypes = [ctypes.c_void_p, ctypes.c_int]
        base.ggml_threadpool_params_init.restype = None
        cpu.ggml_threadpool_new.argtypes = [ctypes.POINTER(_Params)]
        cpu.ggml_threadpool_new.restype = ctypes.c_void_p
        cpu.ggml_threadpool_free.argtypes = [ctypes.c_void_p]
        cpu.ggml_threadpool_free.restype = None
    except (OSError, AttributeError) as e:
        log.info("no ggml thread pool functions (%s); llama.cpp makes its threads per decode", e)
        return None
    llama_lib.llama_attach_threadpool.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    llama_lib.llama_attach_threadpool.restype = None
    # The struct must be laid out as this library's: let it fill an oversized, marked
    # buffer and look for its defaults where _Params puts them.
    probe = ctypes.create_string_buffer(b"\xa5" * 4096)
    base.ggml_threadpool_params_init(probe, 7)
    seen = _Params.from_buffer_copy(probe)
    if (seen.n_threads, seen.prio, seen.poll, seen.strict_cpu, seen.paused) != (7, 0, 50, False, False) \
            or any(seen.cpumask) or probe.raw[ctypes.sizeof(_Params)] != 0xA5:
        log.warning("ggml_threadpool_params has another layout in this llama.cpp build; not using thread pools")
        return None
    return base, cpu


@functools.cache
def _libraries() -> tuple[ctypes.CDLL, ctypes.CDLL] | None:
    return _load()


def default_binding() -> bool:
    """Bind helpers to CPUs where cores are alike: x86, not big.LITTLE ARM."""
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


class ThreadPool:
    """A ggml thread pool of ``n_threads`` (the caller's thread counts as the first)."""

    def __init__(self, n_threads: int, *, bind: bool) -> None:
        libs = _libraries()
        if libs is None:
            raise OSError("this llama.cpp build offers no thread pools")
        base, self._cpu = libs
        params = _Params()
        base.ggml_threadpool_params_init(ctypes.byref(params), n_threads)
        params.poll = 0  # helpers sleep as soon as a decode ends: no spinning, no idle wake-ups
        allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        if bind and len(allowed) >= n_threads:
            # Strict placement: helper i takes the i-th allowed CPU.
            for c in allowed:
                if c < _MAX_THREADS:
                    params.cpumask[c] = True
            params.strict_cpu = True
        try:
            self.handle = self._cpu.ggml_threadpool_new(ctypes.byref(params))
        finally:
            if params.strict_cpu:
                # ggml also binds the thread that makes the pool (to the next CPU in the mask),
                # and every thread it starts later would inherit that: unbind it.
                os.sched_setaffinity(0, allowed)
        if not self.handle:
            raise OSError("ggml_threadpool_new failed")
        self.n_threads = n_threads
        self.bound = bool(params.strict_cpu)
        self._allowed = allowed
        self._caller_cpu = {sorted(allowed)[n_threads - 1]} if self.bound else None

    def pin_caller(self) -> bool:
        """Bind the calling thread, for one decode, to the CPU after the helpers' (x86 pools only).

        A daemon's decode thread is woken by another thread after idling, and the
        kernel often wakes it on the CPU a helper is bound to; the two then share one
        core until it migrates. Measured through the daemon, single SMS each after
        20 ms of idleness: p50 16.5-17.4 ms unbound, 9.1-9.2 ms bound (back to back
        8.3-9.6 ms either way). Returns whether it bound the thread.
        """
        if self._caller_cpu is None:
            return False
        try:
            os.sched_setaffinity(0, self._caller_cpu)
        except OSError:  # the CPU left this process's cpuset since the pool was made
            return False
        return True

    def unpin_caller(self) -> None:
        """Give the calling thread back every CPU it had."""
        try:
            os.sched_setaffinity(0, self._allowed)
        except OSError:
            os.sched_setaffinity(0, range(os.cpu_count() or 1))

    def attach(self, ctx: object) -> None:
        """Run every decode of the llama context ``ctx`` on this pool."""
        rt.llama.llama_cpp._lib.llama_attach_threadpool(ctypes.cast(ctx, ctypes.c_void_p), self.handle, self.handle)

    def free(self) -> None:
        """Join the helpers. Only after the context using the pool is freed."""
        if self.handle:
            self._cpu.ggml_threadpool_free(self.handle)
            self.handle = None


def make_pool(n_threads: int, bind: bool | None) -> ThreadPool | None:
    """A pool for a context decoding on ``n_threads``, or None (one thread, or no pool support)."""
    if n_threads < 2:
        return None
    try:
        return ThreadPool(n_threads, bind=default_binding() if bind is None else bind)
    except OSError as e:
        log.info("no ggml thread pool: %s", e)
        return None
