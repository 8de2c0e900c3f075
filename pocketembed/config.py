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
    on_demand = true              # load a prepared model on its first request; POCKETEMBED_ON_DEMAND
    keep_alive = "5m"             # idle time before a model unloads (0: at once, -1: never); POCKETEMBED_KEEP_ALIVE
    memory_budget_mb = 512        # default: a quarter of the memory available at start; POCKETEMBED_MEMORY_BUDGET_MB
    job_chunk_rows = 128          # rows per committed chunk of an index job; POCKETEMBED_JOB_CHUNK_ROWS
    max_collections = 64          # collections the store may hold; POCKETEMBED_MAX_COLLECTIONS
    job_sources = ["/data/data/com.termux/files/home/sms"]  # dirs whose SQLite files jobs may read (default: none);
                                  # POCKETEMBED_JOB_SOURCES=dir1:dir2
    require_auth_unix = false     # client tokens on the Unix socket too (TCP always needs them)
    token = "pe_..."              # the CLI's own client token, for a daemon that requires one; POCKETEMBED_TOKEN
    source_budget_s = 5           # time one statement on a job's source (its where) may take; POCKETEMBED_SOURCE_BUDGET_S

    # The power policy for background jobs (POCKETEMBED_POWER_SOURCE, POCKETEMBED_POWER_BATTERY_MIN, ...)
    power_source = "auto"         # termux → sysfs → psutil; or one of them; or "file:/path.json" (injected readings)
    power_on_charger = true       # run whenever plugged in ...
    power_battery_floor = 20      # ... but never below this charge
    power_battery_min = 80        # on battery: at least this charge ...
    power_idle_cpu_percent = 25   # ... and other processes' CPU load under this ...
    power_idle_s = 60             # ... for this long
    power_battery_hysteresis = 5  # once running, stop only this far under a threshold
    power_busy_cpu_percent = 60   # once running on battery, stop above this CPU load
    power_settle_s = 5            # a change to "allowed" must hold this long
    power_interactive_pause_s = 2 # pause background work after interactive traffic
    power_poll_s = 30             # re-read the sensors at most this often (a waiting job wakes this often)
    power_procfs = "/proc"        # psutil's procfs (psutil.PROCFS_PATH), e.g. in a chroot; POCKETEMBED_POWER_PROCFS

    [model."all-minilm-l6-v2:q4_0"]      # per-model settings, all optional
    threads = 2
    batch_tokens = 256            # tokens per decode (the context size; default 256, at least max_tokens)
    max_tokens = 256              # longest text, incl. [CLS]/[SEP]
    pooling = "mean"              # override of the GGUF's pooling: mean, cls, last
    query_prefix = ""             # put before texts sent with input_type="query"
    document_prefix = ""          # ... and input_type="document"
    keep_alive = "10m"
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

from pocketembed.errors import InvalidInput, PocketEmbedError

FOREVER = -1.0

KEYS = {"socket": str, "tcp": str, "allow_remote": bool, "models": list, "threads": int, "workers": int,
        "queue_texts": int, "queue_tokens": int, "background_queue_texts": int, "background_queue_tokens": int,
        "background_batch_tokens": int, "on_demand": bool, "keep_alive": (str, int, float),
        "memory_budget_mb": int, "model": dict, "job_chunk_rows": int, "power_source": str,
        "max_collections": int, "source_budget_s": (int, float), "job_sources": list, "require_auth_unix": bool,
        "token": str, "power_procfs": str,
        "power_on_charger": bool,
        **{f"power_{k}": (int, float) for k in ("battery_floor", "battery_min", "idle_cpu_percent", "idle_s",
                                               "battery_hysteresis", "busy_cpu_percent", "settle_s",
                                               "interactive_pause_s", "poll_s")}}
ENV = {key: f"POCKETEMBED_{key.upper()}" for key in KEYS if key != "model"}
MODEL_KEYS = {"threads": int, "batch_tokens": int, "max_tokens": int, "pooling": str, "query_prefix": str,
              "document_prefix": str, "keep_alive": (str, int, float)}


class ConfigError(PocketEmbedError):
    code = "invalid_config"


MAX_DURATION_S = 30 * 86_400.0
"""The longest keep_alive: 30 days. Longer waits overflow the reaper's timed wait and mean "forever",
which is spelt -1."""

_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?")


def parse_duration(value: object) -> float:
    """Seconds from an Ollama-style keep_alive: 300, "5m", "1h30m", "90s", 0, -1 (forever).

    Negative means forever (-1, "-1", "-5m"); anything else must be a finite
    duration of at most MAX_DURATION_S. Shared by the config file and the wire
    protocol (``keep_alive`` args), so it lives here rather than in the daemon:
    the protocol's schemas import it.
    """
    hint = "use e.g. 300, '90s', '5m', '1h', 0 or -1 (forever)"
    if isinstance(value, bool) or value is None:
        raise InvalidInput(f"keep_alive must be a duration like 300, '5m' or -1, not {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
        if seconds != seconds:  # NaN
            raise InvalidInput(f"keep_alive must be a number of seconds or a duration string; {hint}")
    elif isinstance(value, str):
        text = value.strip().lower()
        negative = text.startswith("-")
        body = text[1:] if negative else text
        m = _DURATION.fullmatch(body)
        if not body or m is None:
            raise InvalidInput(f"keep_alive {value[:40]!r} is not a duration; {hint}")
        h, mi, sec = (float(g) if g else 0.0 for g in m.groups())
        seconds = h * 3600 + mi * 60 + sec
        seconds = -seconds if negative and seconds else seconds
    else:
        raise InvalidInput(f"keep_alive must be a duration like 300, '5m' or -1, not {type(value).__name__}")
    if seconds < 0:
        return FOREVER
    if seconds > MAX_DURATION_S:
        raise InvalidInput(f"keep_alive of {seconds:g} s is over the limit of {MAX_DURATION_S:g} s (30 days); "
                           "use -1 to keep a model loaded forever")
    return seconds


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
            _check(f"{file}: {key}", value, KEYS[key])
            settings[key] = value
        for name, table in settings.get("model", {}).items():
            if not isinstance(table, dict):
                raise ConfigError(f"{file}: model.{name} must be a table of settings")
            for key, value in table.items():
                if key not in MODEL_KEYS:
                    raise ConfigError(f"{file}: model.{name}: unknown setting {key!r}; known: {', '.join(MODEL_KEYS)}")
                _check(f"{file}: model.{name}.{key}", value, MODEL_KEYS[key])
    for key, var in ENV.items():
        raw = os.environ.get(var)
        if not raw:
            continue
        if KEYS[key] is bool:
            settings[key] = raw.lower() in ("1", "true", "yes")
        elif KEYS[key] is list:
            sep = os.pathsep if key == "job_sources" else ","  # paths may hold commas
            settings[key] = [m.strip() for m in raw.split(sep) if m.strip()]
        elif KEYS[key] is int:
            try:
                settings[key] = int(raw)
            except ValueError:
                raise ConfigError(f"{var} must be an integer, got {raw!r}") from None
        elif KEYS[key] == (int, float):
            try:
                settings[key] = float(raw)
            except ValueError:
                raise ConfigError(f"{var} must be a number, got {raw!r}") from None
        else:
            settings[key] = raw
    settings.update({k: v for k, v in (flags or {}).items() if v is not None})
    return settings


def _check(where: str, value: Any, typ: type | tuple[type, ...]) -> None:
    types = typ if isinstance(typ, tuple) else (typ,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise ConfigError(f"{where} must be {' or '.join(t.__name__ for t in types)}")
