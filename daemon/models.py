"""Opening catalog models as engines: name → verified file → Engine.

This is the one place that turns a model name into loaded weights, so the
sha256 check cannot be skipped by any caller (CLI, daemon, scripts).
"""

from __future__ import annotations

from pathlib import Path

from pocketembed import paths
from pocketembed.gguf_models import manifest
from pocketembed.gguf_models.catalog import ModelSpec, get

from .engine import Engine, EngineConfig


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
