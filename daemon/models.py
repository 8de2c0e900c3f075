"""Models as engines: name → verified file → Engine, and the daemon's registry of them.

``open_engine`` is the one place that turns a model name into loaded weights,
so the sha256 check cannot be skipped by any caller (CLI, daemon, scripts).
``ModelRegistry`` is what the daemon holds: which models are loaded, for how
long, and within what memory.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from pocketembed import paths
from pocketembed.config import parse_duration
from pocketembed.errors import ModelNotLoaded, ModelUnloading, OverBudget, WrongModelKind
from pocketembed.gguf_models import manifest
from pocketembed.gguf_models.catalog import ModelSpec, get

from . import faults, llama_runtime
from .engine import Engine, EngineConfig

log = logging.getLogger("pocketembed.models")


def engine_config(spec: ModelSpec, **overrides: object) -> EngineConfig:
    """The engine settings for a catalog model, with caller overrides (None = keep)."""
    base: dict[str, object] = {"max_tokens": spec.max_tokens}
    if spec.imported:
        base["pooling"] = spec.pooling  # rank heads carry no pooling type in the file; --pooling may have set it
    base.update({k: v for k, v in overrides.items() if v is not None})
    return EngineConfig(**base)  # type: ignore[arg-type]


def open_engine(name: str | None, root: Path | None = None, **overrides: object) -> tuple[ModelSpec, Engine]:
    """Verify the model file against the manifest and load it."""
    root = root or paths.home()
    spec = get(name, root)
    path = manifest.verify(root, spec)
    return spec, Engine(path, engine_config(spec, **overrides), quantized=spec.quantized)


_WRONG_KIND = {
    "embed": "{name} is a reranker (cross-encoder): it scores (query, document) pairs with rerank, or search's "
             "rerank option, and makes no embeddings",
    "rerank": "{name} is an embedding model; reranking needs a cross-encoder (`models.list` shows each model's kind)",
}

CONTEXT_OVERHEAD = 8 << 20
"""Estimated bytes of one llama context (compute, output and batch buffers at 256 tokens)."""

parse_keep_alive = parse_duration
"""Seconds from an Ollama-style keep_alive (see pocketembed.config.parse_duration)."""
REAP_WAIT_MAX_S = 86_400.0
"""The keep-alive thread wakes at least daily while a model could expire (waits beyond
threading.TIMEOUT_MAX raise OverflowError)."""


@dataclass
class ModelSettings:
    """Per-model settings from the config file (None = the catalog's / engine's default)."""

    threads: int | None = None
    batch_tokens: int | None = None
    max_tokens: int | None = None
    pooling: str | None = None
    query_prefix: str | None = None
    document_prefix: str | None = None
    keep_alive: float | None = None


@dataclass
class _Loaded:
    spec: ModelSpec
    engine: Engine
    bytes: int
    keep_alive: float
    load_ms: float
    users: int = 0
    closing: bool = False
    last_used: float = field(default_factory=time.monotonic)


class ModelRegistry:
    """The daemon's loaded models: on-demand loading, keep-alive, a memory budget.

    Two counts keep a model alive. ``hold`` / ``unhold`` bracket a request from
    the moment it is queued until its reply is made, so a model with queued work
    is never evicted or expired, and an explicit ``unload`` drains that work
    first. ``acquire`` / ``release`` bracket each use of the engine (tokenizing,
    one decode), so an engine is never freed under a running decode.

    Memory is accounted as weights (file size) plus an estimate per llama
    context. Loading past the budget evicts least recently used models that
    have no held requests; if that is not enough the load fails and nothing
    already loaded is touched. The keep-alive thread also hands a model's file
    pages back (``Engine.release_file_pages``) once it has idled a moment after
    a bulk job.
    """

    def __init__(self, home: Path, *, threads: int | None = None, contexts: int | None = None,
                 on_demand: bool = True, keep_alive: float = 300.0, budget_bytes: int | None = None,
                 settings: dict[str, ModelSettings] | None = None, on_death: Callable[[str], None] | None = None,
                 release_after: float = 2.0, release_tokens: int = 20_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.home = home
        self._clock = clock
        """Where idle time is read from (seconds, monotonic). A test passes a fake clock to step past a
        keep_alive instead of sleeping through it and racing the keep-alive thread."""
        self.release_after = release_after
        """Seconds a model must have been idle before its file pages are handed back (see ``_release_pending``)."""
        self.release_tokens = release_tokens
        """...and the tokens it must have decoded since the last time: a bulk job's worth, not a few queries."""
        self.threads = threads
        self.contexts = contexts
        self.on_demand = on_demand
        self.keep_alive = keep_alive
        self.budget_bytes = budget_bytes if budget_bytes is not None else default_budget()
        self.settings = settings or {}
        self.on_death = on_death
        self._models: dict[str, _Loaded] = {}
        self._holds: dict[str, int] = {}
        self._unloading: set[str] = set()
        lock = threading.RLock()
        self._cv = threading.Condition(lock)
        # The keep-alive reaper waits on its own condition (same lock): a release on
        # the request path then wakes nobody unless a model just became due.
        self._reap_cv = threading.Condition(lock)
        self._load_lock = threading.Lock()
        self._stop = False
        self._reaper: threading.Thread | None = None

    def spec(self, name: str | None, kind: str | None = None) -> ModelSpec:
        """What a model name means here: a catalog model, or one imported into this data directory.

        With ``kind`` ("embed" or "rerank"), a model of the other kind is refused: a
        reranker makes no vectors, and an embedding model scores no pairs.
        """
        spec = get(name, self.home)
        if kind is not None and spec.kind != kind:
            raise WrongModelKind(_WRONG_KIND[kind].format(name=spec.name))
        return spec

    # -- requests ----------------------------------------------------------------------

    def hold(self, name: str) -> None:
        """A request for ``name`` was queued. Refused while the model is being unloaded on purpose."""
        with self._cv:
            if name in self._unloading:
                raise ModelUnloading(f"model {name} is being unloaded; load it again with `pocketembed models load {name}`")
            if not self.on_demand and name not in self._models:
                raise ModelNotLoaded(f"model {name} is not loaded and on-demand loading is off; "
                                     f"load it with `pocketembed models load {name}`")
            self._holds[name] = self._holds.get(name, 0) + 1

    def unhold(self, name: str, keep_alive: float | None = None) -> None:
        """The request's reply is made; ``keep_alive`` (seconds) from the request, if it set one."""
        with self._cv:
            self._holds[name] -= 1
            if not self._holds[name]:
                del self._holds[name]
            entry = self._models.get(name)
            if entry is not None:
                entry.last_used = self._clock()
                if keep_alive is not None:
                    entry.keep_alive = keep_alive
                self._idle_check(name, entry)
            self._cv.notify_all()

    def acquire(self, name: str) -> Engine:
        name = self.spec(name).name
        with self._cv:
            while name in self._models and self._models[name].closing:
                self._cv.wait()
            entry = self._models.get(name)
            if entry is not None:
                entry.users += 1
                entry.last_used = self._clock()
                return entry.engine
            if not self.on_demand:
                raise ModelNotLoaded(f"model {name} is not loaded; load it with `pocketembed models load {name}`")
        self.load(name)
        return self.acquire(name)

    def release(self, name: str) -> None:
        name = self.spec(name).name
        with self._cv:
            entry = self._models.get(name)
            if entry is not None:
                entry.users -= 1
                entry.last_used = self._clock()
                self._idle_check(name, entry)
                self._cv.notify_all()

    def _idle_check(self, name: str, entry: _Loaded) -> None:
        """Under the lock: a model that just went idle gives the reaper a new deadline to sleep until."""
        if (entry.keep_alive >= 0 or self._release_pending(entry)) and self._evictable(name, entry):
            self._reap_cv.notify()

    def _release_pending(self, entry: _Loaded) -> bool:
        """Decodes have mapped enough of the model file back in for a release to be worth a wake-up.

        After loading, the engine hands the model file's pages back; a bulk job's decodes
        fault much of it in again (the token-embedding rows of its vocabulary, and with
        large page-cache folios whole runs of the file around what they read). Handing
        them back once the job is over is what brings the RSS back down to the idle
        level. A few interactive queries never reach the token count, so they do not pay
        for re-faulting pages (about 3 ms once).
        """
        return entry.engine.tokens_since_release >= self.release_tokens

    def prefix(self, name: str, input_type: str | None) -> str:
        """The text the model wants before a query or a document ("" for none)."""
        if input_type is None:
            return ""
        spec, cfg = self.spec(name), self.settings.get(name, ModelSettings())
        if input_type == "query":
            return cfg.query_prefix if cfg.query_prefix is not None else spec.query_prefix
        return cfg.document_prefix if cfg.document_prefix is not None else spec.document_prefix

    def max_tokens(self, name: str) -> int:
        cfg = self.settings.get(name)
        return (cfg.max_tokens if cfg and cfg.max_tokens else None) or self.spec(name).max_tokens

    # -- loading -----------------------------------------------------------------------

    def estimate_bytes(self, spec: ModelSpec) -> int:
        path = manifest.model_path(self.home, spec)
        size = path.stat().st_size if path.exists() else 0
        return size + max(1, self.contexts or 2) * CONTEXT_OVERHEAD

    def load(self, name: str, keep_alive: float | None = None) -> bool:
        """Load a model unless it is loaded (True when this call loaded it).

        Verifies the file first; evicts idle models to make room within the budget.
        """
        name = self.spec(name).name
        with self._load_lock:
            with self._cv:
                if name in self._models and not self._models[name].closing:
                    if keep_alive is not None:
                        self._models[name].keep_alive = keep_alive
                        self._reap_cv.notify()
                    return False
            spec = self.spec(name)
            need = self.estimate_bytes(spec)
            cfg = self.settings.get(name, ModelSettings())
            faults.check("models", "load")
            t = time.perf_counter()
            path = manifest.verify(self.home, spec)  # a corrupt file fails here, before anything is evicted
            self._make_room(name, need)
            engine = Engine(path, engine_config(spec, threads=cfg.threads or self.threads, contexts=self.contexts,
                                                batch_tokens=cfg.batch_tokens, max_tokens=cfg.max_tokens,
                                                pooling=cfg.pooling), quantized=spec.quantized)
            load_ms = (time.perf_counter() - t) * 1000
            ka = keep_alive if keep_alive is not None else cfg.keep_alive if cfg.keep_alive is not None else self.keep_alive
            with self._cv:
                self._models[name] = _Loaded(spec, engine, need, ka, load_ms, last_used=self._clock())
                self._cv.notify_all()
                self._reap_cv.notify()
        log.info("loaded %s in %.0f ms (%d threads, ~%.0f MB, keep_alive %s)", name, load_ms, engine.threads,
                 need / 1e6, "forever" if ka < 0 else f"{ka:g}s")
        return True

    def _make_room(self, name: str, need: int) -> None:
        """Evict idle models, least recently used first, until ``need`` fits the budget."""
        with self._cv:
            used = sum(e.bytes for e in self._models.values())
            if used + need <= self.budget_bytes:
                return
            idle = sorted((e for n, e in self._models.items() if self._evictable(n, e)), key=lambda e: e.last_used)
            victims, freed = [], 0
            for e in idle:
                if used - freed + need <= self.budget_bytes:
                    break
                victims.append(e.spec.name)
                freed += e.bytes
            if used - freed + need > self.budget_bytes:
                busy = [n for n, e in self._models.items() if not self._evictable(n, e)]
                raise OverBudget(
                    f"loading {name} needs ~{need / 1e6:.0f} MB; the memory budget is {self.budget_bytes / 1e6:.0f} MB "
                    f"with {used / 1e6:.0f} MB in use" + (f" by models with work queued ({', '.join(busy)})" if busy else "")
                    + "; unload a model or raise memory_budget_mb")
        for victim in victims:
            log.info("evicting %s (least recently used) to make room for %s", victim, name)
            self._close(victim, evicting=True)

    def _evictable(self, name: str, entry: _Loaded) -> bool:
        return not entry.closing and not entry.users and not self._holds.get(name)

    def unload(self, name: str) -> None:
        """Unload on purpose: new requests for it are refused, queued ones finish first."""
        name = self.spec(name).name
        with self._cv:
            entry = self._models.get(name)
            if entry is None or entry.closing or name in self._unloading:
                raise ModelNotLoaded(f"model {name} is not loaded")
            self._unloading.add(name)
            try:
                while self._holds.get(name):
                    self._cv.wait()
            except BaseException:
                self._unloading.discard(name)
                raise
        try:
            self._close(name)
        finally:
            with self._cv:
                self._unloading.discard(name)
                self._cv.notify_all()

    def _close(self, name: str, evicting: bool = False) -> None:
        with self._cv:
            entry = self._models.get(name)
            if entry is None or entry.closing:
                return
            if evicting and not self._evictable(name, entry):
                return
            entry.closing = True
            while entry.users:
                self._cv.wait()
        entry.engine.close()
        with self._cv:
            del self._models[name]
            self._cv.notify_all()
        trim_heap()
        log.info("unloaded %s", name)

    # -- keep-alive --------------------------------------------------------------------

    def start(self) -> None:
        self._reaper = threading.Thread(target=self._reap, name="pe-keepalive", daemon=True)
        self._reaper.start()

    def recheck(self) -> None:
        """Make the keep-alive thread read its clock now.

        Its waits are computed from the clock but slept in real time; when a test
        moves a fake ``clock``, this is what makes the thread see the new time.
        """
        with self._cv:
            self._reap_cv.notify()

    def _reap(self) -> None:
        """Unload models idle for longer than their keep_alive; a failed unload is logged and retried."""
        try:
            self._reap_loop()
        finally:
            if not self._stop:
                log.critical("the keep-alive thread ended unexpectedly")
                if self.on_death is not None:
                    self.on_death("keepalive")

    def _reap_loop(self) -> None:
        while True:
            with self._cv:
                if self._stop:
                    return
                now = self._clock()
                due = [n for n, e in self._models.items()
                       if self._evictable(n, e) and e.keep_alive >= 0 and now - e.last_used >= e.keep_alive]
                pending = [e for n, e in self._models.items()
                           if n not in due and self._evictable(n, e) and self._release_pending(e)]
                releases = [e for e in pending if now - e.last_used >= self.release_after]
                for e in releases:
                    e.users += 1  # pinned: not closed while its pages are dropped
                if not due and not releases:
                    # Sleep until the next idle model is due; with none, until a model goes idle
                    # (``_idle_check``) or is loaded: no wake-ups while nothing can expire.
                    waits = [e.keep_alive - (now - e.last_used) for n, e in self._models.items()
                             if self._evictable(n, e) and e.keep_alive >= 0]
                    waits += [self.release_after - (now - e.last_used) for e in pending]
                    # Bounded below threading.TIMEOUT_MAX whatever a setting says: a longer wait raises.
                    self._reap_cv.wait(min(min(waits), REAP_WAIT_MAX_S) if waits else None)
                    continue
            for e in releases:
                try:
                    dropped = e.engine.release_file_pages()
                    log.debug("%s idle after a bulk job: handed back %.0f MB of its file's pages", e.spec.name, dropped / 2**20)
                except Exception:
                    log.exception("handing back %s's file pages failed", e.spec.name)  # memory only: keep serving
                finally:
                    with self._cv:
                        e.users -= 1
                        self._cv.notify_all()
            for name in due:
                log.info("unloading %s: idle past its keep_alive", name)
                try:
                    self._close(name, evicting=True)
                except Exception:
                    log.exception("unloading %s failed", name)
                    with self._cv:
                        entry = self._models.get(name)
                        if entry is not None:
                            entry.last_used = self._clock()  # try again after another keep_alive

    # -- views -------------------------------------------------------------------------

    def loaded(self) -> list[str]:
        with self._cv:
            return sorted(n for n, e in self._models.items() if not e.closing)

    def describe(self) -> dict[str, dict[str, object]]:
        with self._cv:
            now = self._clock()
            return {n: {"bytes": e.bytes, "load_ms": round(e.load_ms, 1), "queued": self._holds.get(n, 0),
                        "keep_alive_s": e.keep_alive,
                        "expires_in_s": None if e.keep_alive < 0 else round(max(0.0, e.keep_alive - (now - e.last_used)), 1),
                        "idle_s": round(now - e.last_used, 1),
                        "kernels": llama_runtime.model_kernels(e.engine.path)}
                    for n, e in self._models.items() if not e.closing}

    def memory(self) -> dict[str, int]:
        with self._cv:
            return {"budget_bytes": self.budget_bytes, "used_bytes": sum(e.bytes for e in self._models.values())}

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
            self._reap_cv.notify_all()
        if self._reaper is not None:
            self._reaper.join(5)
        for name in self.loaded():
            self._close(name)


def trim_heap() -> None:
    """Give freed heap pages back to the OS after an unload.

    llama.cpp frees a model's buffers with free(); glibc keeps much of that in
    the per-thread arenas of the threads that used it (the decode workers), so
    without a trim RSS stayed ~30 MiB above its first post-unload level
    (scripts/bench_models.py). ``malloc_trim`` is glibc's and bionic's; where
    the C library lacks it this does nothing.
    """
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


def default_budget(fraction: float = 0.25) -> int:
    """A quarter of the memory available now: room for the app that uses us."""
    return int(psutil.virtual_memory().available * fraction)
