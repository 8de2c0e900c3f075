"""Opening catalog models as engines: name → verified file → Engine.

This is the one place that turns a model name into loaded weights, so the
sha256 check cannot be skipped by any caller (CLI, daemon, scripts).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pocketembed import paths
from pocketembed.errors import PocketEmbedError
from pocketembed.gguf_models import manifest
from pocketembed.gguf_models.catalog import ModelSpec, get

from .engine import Engine, EngineConfig

log = logging.getLogger("pocketembed.models")


def engine_config(spec: ModelSpec, **overrides: object) -> EngineConfig:
    """The engine settings for a catalog model, with caller overrides (None = keep)."""
    base = {"max_tokens": spec.max_tokens}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return EngineConfig(**base)  # type: ignore[arg-type]


def open_engine(name: str | None, root: Path | None = None, **overrides: object) -> tuple[ModelSpec, Engine]:
    """Verify the model file against the manifest and load it."""
    spec = get(name)
    root = root or paths.home()
    path = manifest.verify(root, spec)
    return spec, Engine(path, engine_config(spec, **overrides), quantized=spec.quantized)


class ModelNotLoaded(PocketEmbedError):
    code = "model_not_loaded"


@dataclass
class _Loaded:
    spec: ModelSpec
    engine: Engine
    users: int = 0
    closing: bool = False
    loaded_at: float = field(default_factory=time.monotonic)
    load_ms: float = 0.0


class ModelRegistry:
    """The daemon's loaded models, shared by the decode workers.

    Workers ``acquire`` an engine for each decode and ``release`` it after, so an
    engine is never freed under a running decode: ``unload`` waits for its users.
    A model that is prepared but not loaded is loaded on first use.
    """

    def __init__(self, home: Path, *, threads: int | None = None, contexts: int | None = None,
                 on_demand: bool = True) -> None:
        self.home = home
        self.threads = threads
        self.contexts = contexts
        self.on_demand = on_demand
        self._models: dict[str, _Loaded] = {}
        self._cv = threading.Condition()
        self._load_lock = threading.Lock()

    def acquire(self, name: str) -> Engine:
        name = get(name).name
        with self._cv:
            while name in self._models and self._models[name].closing:
                self._cv.wait()
            entry = self._models.get(name)
            if entry is not None:
                entry.users += 1
                return entry.engine
            if not self.on_demand:
                raise ModelNotLoaded(f"model {name} is not loaded; load it with `pocketembed models load {name}`")
        self.load(name)
        return self.acquire(name)

    def release(self, name: str) -> None:
        with self._cv:
            entry = self._models.get(get(name).name)
            if entry is not None:
                entry.users -= 1
                self._cv.notify_all()

    def load(self, name: str) -> bool:
        """Load a model unless it is loaded; True when this call loaded it."""
        name = get(name).name
        with self._load_lock:
            with self._cv:
                if name in self._models:
                    return False
            t = time.perf_counter()
            spec, engine = open_engine(name, self.home, threads=self.threads, contexts=self.contexts)
            with self._cv:
                self._models[name] = _Loaded(spec, engine, load_ms=(time.perf_counter() - t) * 1000)
                self._cv.notify_all()
        log.info("loaded %s in %.0f ms (%d threads)", name, (time.perf_counter() - t) * 1000, engine.threads)
        return True

    def unload(self, name: str) -> None:
        """Free a model once no decode uses it; ModelNotLoaded if it is not loaded."""
        name = get(name).name
        with self._cv:
            entry = self._models.get(name)
            if entry is None or entry.closing:
                raise ModelNotLoaded(f"model {name} is not loaded")
            entry.closing = True
            while entry.users:
                self._cv.wait()
        entry.engine.close()
        with self._cv:
            del self._models[name]
            self._cv.notify_all()
        log.info("unloaded %s", name)

    def loaded(self) -> list[str]:
        with self._cv:
            return sorted(n for n, e in self._models.items() if not e.closing)

    def max_tokens(self, name: str) -> int:
        return get(name).max_tokens

    def close(self) -> None:
        for name in self.loaded():
            self.unload(name)
