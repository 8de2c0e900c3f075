"""The daemon's configuration, as ``pocketembed serve`` hands it to the server.

The settings themselves are declared once, in ``pocketembed.config.Settings``
(types, defaults, bounds); ``ServeConfig.from_settings`` is the one translation
into what the server reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from pocketembed import paths
from pocketembed.config import Settings
from pocketembed.gguf_models.catalog import DEFAULT_MODEL, get

from .models import ModelSettings
from .power import PowerPolicy, policy_from_settings
from .scheduler import LaneConfig, SchedulerConfig


@dataclass
class ServeConfig:
    socket_path: Path
    home: Path
    tcp: str | None = None
    http: str | None = None
    """HOST:PORT of the HTTP endpoints (http_server.py), or None."""
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

    @classmethod
    def from_settings(cls, s: Settings, home: Path) -> ServeConfig:
        """The server's view of validated settings (``pocketembed.config.read``) for the data directory ``home``."""
        return cls(
            socket_path=paths.socket_path(s.socket),
            home=home,
            tcp=s.tcp,
            http=s.http,
            allow_remote=s.allow_remote,
            preload=[m for m in (s.models if s.models is not None else [DEFAULT_MODEL]) if m != "none"],
            threads=s.threads,
            scheduler=scheduler_config(s),
            on_demand=s.on_demand,
            keep_alive=float(s.keep_alive),
            memory_budget_bytes=s.memory_budget_mb << 20 if s.memory_budget_mb else None,
            model_settings={get(name, home).name: ModelSettings(**msgspec.structs.asdict(table))
                            for name, table in s.model.items()},
            power_source=s.power_source,
            power_policy=policy_from_settings(s),
            power_procfs=s.power_procfs,
            job_chunk_rows=s.job_chunk_rows,
            max_collections=s.max_collections,
            source_budget_s=s.source_budget_s,
            job_sources=[Path(d).expanduser() for d in s.job_sources],
            require_auth_unix=s.require_auth_unix,
        )


def scheduler_config(s: Settings) -> SchedulerConfig:
    """The scheduler's settings: the lanes' bounds and the workers from ``s``, the rest the scheduler's own."""
    base = SchedulerConfig()
    return SchedulerConfig(
        workers=s.workers,
        max_seqs=base.max_seqs,
        interactive=LaneConfig(base.interactive.batch_tokens, s.queue_texts, s.queue_tokens),
        background=LaneConfig(s.background_batch_tokens, s.background_queue_texts, s.background_queue_tokens),
        solo_tokens=base.solo_tokens,
        interactive_grace_s=base.interactive_grace_s,
    )
