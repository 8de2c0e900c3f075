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
