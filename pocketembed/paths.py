"""Where pocketembed keeps its files.

One root directory holds everything the daemon owns (models, manifest, later the
job queue and the vector store). ``POCKETEMBED_HOME`` or ``--home`` moves it, which
is how tests and CI keep their files apart from a user's.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_HOME = "POCKETEMBED_HOME"


def home(override: str | os.PathLike[str] | None = None) -> Path:
    """The data root: the override, else ``$POCKETEMBED_HOME``, else the XDG data dir."""
    if override:
        return Path(override).expanduser().resolve()
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "pocketembed"


def models_dir(root: Path) -> Path:
    return root / "models"


def cache_dir(root: Path) -> Path:
    """Downloaded source wheels, kept so a second ``prepare`` needs no network."""
    return root / "cache"


ENV_SOCKET = "POCKETEMBED_SOCKET"


def runtime_dir() -> Path:
    """A private per-user directory for the IPC socket ($XDG_RUNTIME_DIR when set)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "pocketembed"
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"pocketembed-{os.getuid()}"


def socket_path(override: str | os.PathLike[str] | None = None) -> Path:
    """The daemon's socket: the override, else ``$POCKETEMBED_SOCKET``, else the runtime dir."""
    if override:
        return Path(override).expanduser().absolute()
    env = os.environ.get(ENV_SOCKET)
    if env:
        return Path(env).expanduser().absolute()
    return runtime_dir() / "pe.sock"


def endpoint(override: str | None = None) -> str:
    """A ZeroMQ endpoint: passed through if it has a scheme, else ipc:// of a socket path."""
    if override and "://" in override:
        return override
    return f"ipc://{socket_path(override)}"
