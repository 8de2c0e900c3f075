"""Daemon settings from a TOML file, then environment variables, then flags.

Each layer overrides the one before it, so a flag always wins. The file is
``--config FILE``, else ``$POCKETEMBED_CONFIG``, else ``<home>/config.toml`` if
present. Keys (all optional)::

    socket = "/path/pe.sock"      # POCKETEMBED_SOCKET
    tcp = "127.0.0.1:5555"        # POCKETEMBED_TCP
    allow_remote = false          # POCKETEMBED_ALLOW_REMOTE=1
    models = ["all-minilm-l6-v2:q8_0"]   # loaded at start; POCKETEMBED_MODELS=a,b
    threads = 2                   # POCKETEMBED_THREADS
    workers = 2                   # decode workers (llama contexts); POCKETEMBED_WORKERS
    queue_texts = 2048            # interactive lane bound, texts; POCKETEMBED_QUEUE_TEXTS
    queue_tokens = 262144         # interactive lane bound, tokens; POCKETEMBED_QUEUE_TOKENS
    background_queue_texts = 8192        # POCKETEMBED_BACKGROUND_QUEUE_TEXTS
    background_queue_tokens = 1048576    # POCKETEMBED_BACKGROUND_QUEUE_TOKENS
    background_batch_tokens = 256        # decode size of bulk work; POCKETEMBED_BACKGROUND_BATCH_TOKENS
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pocketembed.errors import PocketEmbedError

KEYS = {"socket": str, "tcp": str, "allow_remote": bool, "models": list, "threads": int, "workers": int,
        "queue_texts": int, "queue_tokens": int, "background_queue_texts": int, "background_queue_tokens": int,
        "background_batch_tokens": int}
ENV = {key: f"POCKETEMBED_{key.upper()}" for key in KEYS}


class ConfigError(PocketEmbedError):
    code = "invalid_config"


def load(home: Path, path: str | None = None, flags: dict[str, Any] | None = None) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    file = Path(path) if path else Path(os.environ["POCKETEMBED_CONFIG"]) if os.environ.get("POCKETEMBED_CONFIG") else home / "config.toml"
    if path or file.exists():
        try:
            data = tomllib.loads(file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read config file {file}: {e}") from None
        for key, value in data.items():
            if key not in KEYS:
                raise ConfigError(f"{file}: unknown setting {key!r}; known: {', '.join(KEYS)}")
            if not isinstance(value, KEYS[key]) or (KEYS[key] is int and isinstance(value, bool)):
                raise ConfigError(f"{file}: {key} must be a {KEYS[key].__name__}")
            settings[key] = value
    for key, var in ENV.items():
        raw = os.environ.get(var)
        if not raw:
            continue
        if KEYS[key] is bool:
            settings[key] = raw.lower() in ("1", "true", "yes")
        elif KEYS[key] is list:
            settings[key] = [m.strip() for m in raw.split(",") if m.strip()]
        elif KEYS[key] is int:
            try:
                settings[key] = int(raw)
            except ValueError:
                raise ConfigError(f"{var} must be an integer, got {raw!r}") from None
        else:
            settings[key] = raw
    settings.update({k: v for k, v in (flags or {}).items() if v is not None})
    return settings
