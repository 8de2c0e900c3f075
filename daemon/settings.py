"""The daemon's configuration, as ``pocketembed serve`` hands it to the server."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pocketembed.errors import PocketEmbedError
from pocketembed.gguf_models.catalog import DEFAULT_MODEL, get

from .models import ModelSettings, parse_keep_alive
from .power import PowerPolicy
from .scheduler import LaneConfig, SchedulerConfig


@dataclass
class ServeConfig:
    socket_path: Path
    home: Path
    tcp: str | None = None
    allow_remote: bool = False
    preload: list[str] = field(default_factory=lambda: [DEFAULT_MODEL])
    threads: int | None = None
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    on_demand: bool = True
    """Load a prepared model on its first request (else: model_not_loaded)."""
    keep_alive: float = 300.0
    """Seconds an idle model stays loaded (negative: forever)."""
    memory_budget_bytes: int | None = None
    """None: a quarter of the memory available at start."""
    model_settings: dict[str, ModelSettings] = field(default_factory=dict)
    power_source: str = "auto"
    """auto (termux → sysfs → psutil), one of those, or file:PATH (injected readings)."""
    power_policy: PowerPolicy = field(default_factory=PowerPolicy)
    power_procfs: str | None = None
    """psutil's /proc (``psutil.PROCFS_PATH``); None: the real one."""
    job_chunk_rows: int = 128
    max_collections: int = 64
    source_budget_s: float = 5.0
    """Time a caller's SQL (a job's ``where``, its source reads) may take per statement."""
    job_sources: list[Path] = field(default_factory=list)
    """Directories whose SQLite files jobs may read (empty: no job can be submitted)."""
    require_auth_unix: bool = False
    """Also require client tokens on the Unix socket (else its peer, the owner, is admin)."""



def scheduler_config(settings: dict[str, Any]) -> SchedulerConfig:
    """The scheduler's settings from the daemon config (missing keys keep the defaults)."""
    base = SchedulerConfig()
    for key in ("workers", "queue_texts", "queue_tokens", "background_queue_texts", "background_queue_tokens",
                "background_batch_tokens"):
        v = settings.get(key)
        if v is not None and v < 1:
            raise PocketEmbedError(f"{key} must be at least 1, got {v}", code="invalid_config")
    i, b = base.interactive, base.background
    return SchedulerConfig(
        workers=settings.get("workers") or base.workers,
        max_seqs=base.max_seqs,
        interactive=LaneConfig(i.batch_tokens, settings.get("queue_texts") or i.max_texts,
                               settings.get("queue_tokens") or i.max_tokens),
        background=LaneConfig(settings.get("background_batch_tokens") or b.batch_tokens,
                              settings.get("background_queue_texts") or b.max_texts,
                              settings.get("background_queue_tokens") or b.max_tokens),
        solo_tokens=base.solo_tokens,
        interactive_grace_s=base.interactive_grace_s,
    )



def model_settings(tables: dict[str, dict[str, Any]], home: Path | None = None) -> dict[str, ModelSettings]:
    """Per-model settings from the config's ``[model."NAME"]`` tables, keyed by model name."""
    out = {}
    for name, table in tables.items():
        values = dict(table)
        if "keep_alive" in values:
            values["keep_alive"] = parse_keep_alive(values["keep_alive"])
        out[get(name, home).name] = ModelSettings(**values)
    return out
