"""The daemon's settings, declared once: the ``Settings`` struct below.

Each field carries its type, default, constraints and description. From it come
the TOML file's keys, the ``POCKETEMBED_<KEY>`` environment variables, the
flags of ``pocketembed serve`` and the reference page docs/configuration.md
(``python -m pocketembed.config --markdown`` writes it). The layers are read in
this order, each overriding the one before (flag > environment > file >
default), then validated in one step by msgspec; a bad value is named with its
key and where it came from.

This module is imported by the client side too: it needs no daemon module.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import msgspec.inspect
import msgspec.toml
from msgspec import Meta

from pocketembed.errors import InvalidInput, PocketEmbedError

FOREVER = -1.0

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


class Duration(float):
    """Seconds, written in the file or a flag as 300, "90s", "5m", "1h30m", 0 or -1 (forever)."""


PositiveInt = Annotated[int, Meta(ge=1)]
Percent = Annotated[float, Meta(ge=0, le=100)]
Seconds = Annotated[float, Meta(ge=0)]


def _about(description: str, **extra: Any) -> Meta:
    """A field's description, and how the generated flags and docs treat it.

    ``extra`` keys: ``section`` (a heading starting here, in the docs and ``serve --help``),
    ``flag`` (its name, or None for no flag; default ``--field-name``), ``metavar``,
    ``unset`` (what a default of None means), ``sep`` (a list's separator in its variable).
    """
    return Meta(description=description, extra=extra or None)


class ModelTable(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One ``[model."NAME"]`` table of the file: settings of one model, all optional."""

    threads: Annotated[PositiveInt | None, _about("llama.cpp threads for this model", unset="the daemon's threads")] = None
    batch_tokens: Annotated[PositiveInt | None, _about(
        "tokens per decode (the context size; at least max_tokens)", unset="256")] = None
    max_tokens: Annotated[PositiveInt | None, _about("longest text in tokens, [CLS] and [SEP] included",
                                                     unset="the catalog's")] = None
    pooling: Annotated[Literal["mean", "cls", "last", "rank"] | None, _about(
        "override of the GGUF's pooling type", unset="the GGUF's")] = None
    query_prefix: Annotated[str | None, _about('put before texts sent with input_type="query"',
                                               unset="the catalog's")] = None
    document_prefix: Annotated[str | None, _about('put before texts sent with input_type="document"',
                                                  unset="the catalog's")] = None
    keep_alive: Annotated[Duration | None, _about("idle time before this model unloads",
                                                  unset="the daemon's keep_alive")] = None


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The daemon's settings (and the CLI's client token)."""

    socket: Annotated[str | None, _about(
        "Unix socket path", section="Daemon", metavar="PATH", unset="a private runtime dir")] = None
    tcp: Annotated[str | None, _about(
        "also listen on TCP at HOST:PORT (loopback only unless allow_remote); clients there need tokens",
        metavar="HOST:PORT", unset="no TCP")] = None
    http: Annotated[str | None, _about(
        "also serve HTTP at HOST:PORT: OpenAI-, Ollama- and TEI-compatible endpoints and /v1/search "
        "(loopback only unless allow_remote); the same client tokens as TCP, as Bearer tokens",
        metavar="HOST:PORT", unset="no HTTP")] = None
    allow_remote: Annotated[bool, _about("allow a non-loopback tcp or http address")] = False
    models: Annotated[list[str] | None, _about(
        "models to load at start; 'none' for none", flag="--model", metavar="NAME",
        unset="the catalog default")] = None
    threads: Annotated[PositiveInt | None, _about("llama.cpp threads per model", unset="physical cores")] = None
    on_demand: Annotated[bool, _about(
        "load a prepared model on its first request (else it must be loaded with `models load`)")] = True
    keep_alive: Annotated[Duration, _about("idle time before a model unloads (0: at once, -1: never)")] = Duration(300.0)
    memory_budget_mb: Annotated[PositiveInt | None, _about(
        "memory for loaded models, MiB", metavar="MB", unset="a quarter of the memory available at start")] = None
    max_collections: Annotated[PositiveInt, _about("collections the index store may hold")] = 64
    require_auth_unix: Annotated[bool, _about(
        "require client tokens on the Unix socket too (TCP always requires them)")] = False
    token: Annotated[str | None, _about(
        "the CLI's own client token, for a daemon that requires one (no flag: a command line is visible "
        "to other processes)", flag=None, unset="none")] = None

    workers: Annotated[PositiveInt, _about("decode workers, each on its own llama context", section="Scheduler")] = 2
    queue_texts: Annotated[PositiveInt, _about("most texts queued in the interactive lane (beyond: busy)")] = 2048
    queue_tokens: Annotated[PositiveInt, _about("most tokens queued in the interactive lane")] = 262_144
    background_queue_texts: Annotated[PositiveInt, _about("most texts queued in the background lane")] = 8192
    background_queue_tokens: Annotated[PositiveInt, _about("most tokens queued in the background lane")] = 1_048_576
    background_batch_tokens: Annotated[PositiveInt, _about("tokens per decode of background (bulk) work")] = 256

    job_sources: Annotated[list[str], _about(
        "directories whose SQLite files index jobs may read (none: no job can be submitted)", section="Jobs",
        flag="--job-source", metavar="DIR", sep=os.pathsep)] = []
    job_chunk_rows: Annotated[PositiveInt, _about("rows per committed chunk of an index job")] = 128
    source_budget_s: Annotated[Annotated[float, Meta(gt=0)], _about(
        "seconds one statement on a job's source (its where, its reads) may take")] = 5.0

    power_source: Annotated[str, _about(
        "battery and CPU readings: auto (termux, then sysfs, then psutil), one of those, or file:PATH "
        "(JSON readings)", section="Power policy for background jobs")] = "auto"
    power_procfs: Annotated[str | None, _about("psutil's procfs (psutil.PROCFS_PATH), e.g. in a chroot",
                                               metavar="DIR", unset="/proc")] = None
    power_on_charger: Annotated[bool, _about("run whenever plugged in (above battery_floor), busy CPU or not")] = True
    power_battery_floor: Annotated[Percent, _about("never run below this charge, %, even on the charger")] = 20.0
    power_battery_min: Annotated[Percent, _about("on battery, run only at or above this charge, % ...")] = 80.0
    power_idle_cpu_percent: Annotated[Percent, _about("... and with other processes' CPU load under this, % ...")] = 25.0
    power_idle_s: Annotated[Seconds, _about("... for this many seconds")] = 60.0
    power_battery_hysteresis: Annotated[Percent, _about(
        "once running, stop only when the charge falls this far (points) under a threshold")] = 5.0
    power_busy_cpu_percent: Annotated[Percent, _about("once running on battery, stop above this CPU load, %")] = 60.0
    power_settle_s: Annotated[Seconds, _about(
        'a change to "allowed" must hold this many seconds (a change to "not allowed" acts at once)')] = 5.0
    power_interactive_pause_s: Annotated[Seconds, _about("pause background work this long after interactive traffic")] = 2.0
    power_poll_s: Annotated[Seconds, _about(
        "re-read the sensors at most this often, seconds (a waiting job wakes this often)")] = 30.0

    model: Annotated[dict[str, ModelTable], _about(
        'per-model tables, [model."NAME"] in the file (see below)', flag=None, section="Per-model settings")] = {}


class Field(msgspec.Struct, frozen=True):
    """What the flags, the environment and the docs need to know of one field."""

    name: str
    kind: str
    """bool, int, float, str, list, duration, choice or table."""
    default: Any
    description: str
    extra: dict[str, Any]
    bounds: str = ""
    choices: tuple[str, ...] = ()

    @property
    def env(self) -> str | None:
        return None if self.kind == "table" else f"POCKETEMBED_{self.name.upper()}"

    @property
    def flag(self) -> str | None:
        return self.extra.get("flag", "--" + self.name.replace("_", "-"))

    @property
    def default_text(self) -> str:
        if self.default is None:
            return self.extra.get("unset", "none")
        if self.kind == "duration":
            return _duration_text(self.default)
        if self.kind == "list":
            return ", ".join(self.default) or "none"
        if isinstance(self.default, bool):
            return str(self.default).lower()
        if isinstance(self.default, float) and self.default.is_integer():
            return str(int(self.default))
        return "{}" if self.kind == "table" else str(self.default)


def fields(struct: type[msgspec.Struct] = Settings) -> list[Field]:
    """The fields of ``struct``, in their declared order."""
    out = []
    for f in msgspec.inspect.type_info(struct).fields:
        t, description, extra, bounds = f.type, "", {}, []
        while isinstance(t, msgspec.inspect.Metadata):
            description = (t.extra_json_schema or {}).get("description", description)
            extra = {**(t.extra or {}), **extra}
            t = t.type
        if isinstance(t, msgspec.inspect.UnionType):  # X | None
            t = next(u for u in t.types if not isinstance(u, msgspec.inspect.NoneType))
        for op, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if getattr(t, op, None) is not None:
                bounds.append(f"{sym} {getattr(t, op):g}")
        kind = {msgspec.inspect.BoolType: "bool", msgspec.inspect.IntType: "int", msgspec.inspect.FloatType: "float",
                msgspec.inspect.StrType: "str", msgspec.inspect.ListType: "list",
                msgspec.inspect.LiteralType: "choice", msgspec.inspect.DictType: "table"}.get(type(t), "duration")
        default = f.default_factory() if f.default_factory is not msgspec.NODEFAULT else f.default
        out.append(Field(f.name, kind, default, description, extra, " and ".join(bounds),
                         tuple(t.values) if kind == "choice" else ()))
    return out


ENV = {f.name: f.env for f in fields() if f.env}
"""Setting → its environment variable."""


def _duration_text(seconds: float) -> str:
    if seconds < 0:
        return "-1 (forever)"
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _dec_hook(typ: type, value: Any) -> Any:
    if typ is Duration:
        try:
            return Duration(parse_duration(value))
        except InvalidInput as e:
            raise ValueError(e.message) from None
    raise NotImplementedError(typ)


def config_file(home: Path, path: str | None = None) -> Path:
    """``--config FILE``, else ``$POCKETEMBED_CONFIG``, else ``<home>/config.toml``."""
    return Path(path) if path else Path(os.environ["POCKETEMBED_CONFIG"]) if os.environ.get("POCKETEMBED_CONFIG") \
        else home / "config.toml"


def read(home: Path, path: str | None = None, flags: Mapping[str, Any] | None = None,
         environ: Mapping[str, str] | None = None) -> Settings:
    """The settings from the file (if any), then the environment, then ``flags`` (field → value; None: unset)."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    origin: dict[str, str] = {}
    file = config_file(home, path)
    if path or file.exists():
        try:
            data = msgspec.toml.decode(file.read_bytes())
        except (OSError, msgspec.DecodeError) as e:
            raise ConfigError(f"cannot read config file {file}: {e}") from None
        raw.update(data)
        origin.update((key, f"config file {file}") for key in data)
    by_name = {f.name: f for f in fields()}
    for name, var in ENV.items():
        value = environ.get(var)
        if value:
            raw[name] = _from_env(by_name[name], value)
            origin[name] = f"environment variable {var}"
    for name, value in (flags or {}).items():
        if value is not None:
            raw[name] = value
            f = by_name.get(name)
            origin[name] = f"flag {f.flag}" if f and f.flag else "flags"
    return validate(raw, origin)


def load(home: Path, path: str | None = None, flags: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``read`` as a dict of every setting (for a caller that wants one or two keys)."""
    return msgspec.structs.asdict(read(home, path, flags))


def _from_env(f: Field, value: str) -> Any:
    if f.kind == "list":
        return [v.strip() for v in value.split(f.extra.get("sep", ",")) if v.strip()]
    if f.kind == "bool":
        return {"yes": True, "on": True, "no": False, "off": False}.get(value.strip().lower(), value.strip())
    return value


def validate(raw: Mapping[str, Any], origin: Mapping[str, str] | None = None) -> Settings:
    """``raw`` (setting → value) checked against ``Settings`` in one step.

    Strings are converted where the type asks for a number or a bool (the
    environment and flags give strings). ``origin`` (setting → where it came
    from) names the source in the error.
    """
    try:
        return msgspec.convert(dict(raw), Settings, strict=False, dec_hook=_dec_hook)
    except msgspec.ValidationError as e:
        raise ConfigError(_explain(e, raw, origin or {})) from None


def _explain(e: msgspec.ValidationError, raw: Mapping[str, Any], origin: Mapping[str, str]) -> str:
    reason, _, path = str(e).partition(" - at `")
    path = path.rstrip("`") or "$"
    unknown = re.fullmatch(r"Object contains unknown field `(.*)`", reason)
    if path == "$" and unknown:
        key = unknown.group(1)
        return (f"unknown setting {key!r} (from {origin.get(key, 'settings')}); "
                f"known: {', '.join(f.name for f in fields())}")
    key = re.match(r"\$\.(\w+)", path)
    key = key.group(1) if key else "?"
    where = origin.get(key, "settings")
    if key == "model" and path.startswith("$.model[...]"):
        for name, table in (raw.get("model") or {}).items():
            try:
                msgspec.convert(table, ModelTable, strict=False, dec_hook=_dec_hook)
            except msgspec.ValidationError as inner:
                reason, _, sub = str(inner).partition(" - at `")
                sub = sub.rstrip("`")[2:]
                unknown = re.fullmatch(r"Object contains unknown field `(.*)`", reason)
                if unknown:
                    return (f'model."{name}" (from {where}): unknown setting {unknown.group(1)!r}; '
                            f"known: {', '.join(f.name for f in fields(ModelTable))}")
                value = table.get(sub) if isinstance(table, dict) and sub else table
                return (f'model."{name}"{"." + sub if sub else ""} = {_short(value)} (from {where}): '
                        f"{_tidy(reason, sub, ModelTable)}")
    return f"{key} = {_short(raw.get(key))} (from {where}): {_tidy(reason, key)}"


def _tidy(reason: str, key: str, struct: type[msgspec.Struct] = Settings) -> str:
    reason = reason.replace("`", "").replace(" | null", " or none").replace("array", "list").replace("object", "table")
    choices = next((f.choices for f in fields(struct) if f.name == key), ())
    if choices:
        reason += f"; use one of {', '.join(choices)}"
    return reason[:1].lower() + reason[1:]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- serve's flags --------------------------------------------------------------------------------------------------

def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag of ``pocketembed serve`` per setting that has one, in argument groups by section."""
    group: Any = parser
    for f in _sections_of(fields()):
        if isinstance(f, str):
            group = parser.add_argument_group(f.lower())
            continue
        if not f.flag:
            continue
        text = f"{f.description} (default: {f.default_text}; ${f.env})".replace("%", "%%")
        if f.kind == "bool":
            group.add_argument(f.flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif f.kind == "list":
            group.add_argument(f.flag, dest=f.name, action="append", metavar=f.extra.get("metavar", "VALUE"),
                               help=text.replace("(default", "(repeatable; default", 1))
        else:
            metavar = f.extra.get("metavar") or ("{" + ",".join(f.choices) + "}" if f.choices else
                                                 {"int": "N", "float": "X", "duration": "DURATION"}.get(f.kind, "VALUE"))
            group.add_argument(f.flag, dest=f.name, metavar=metavar, help=text)


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (None: not given)."""
    return {f.name: getattr(args, f.name, None) for f in fields() if f.flag}


def _sections_of(items: list[Field]) -> Iterator[Field | str]:
    for f in items:
        if "section" in f.extra:
            yield f.extra["section"]
        yield f


# -- the reference page ---------------------------------------------------------------------------------------------

_INTRO = """\
# Configuration

<!-- Generated by `python -m pocketembed.config --markdown` from pocketembed/config.py's Settings; do not edit. -->

`pocketembed serve` reads its settings from three places, each overriding the one before:

1. the TOML file: `--config FILE`, else `$POCKETEMBED_CONFIG`, else `<home>/config.toml` if present
   (`<home>` is `--home`, else `$POCKETEMBED_HOME`);
2. the environment: `POCKETEMBED_<KEY>`, the key in capitals (an empty variable counts as unset);
3. the flags of `pocketembed serve`.

A flag wins over a variable, which wins over the file, which wins over the default. All of them are
checked together before the daemon starts: a value of the wrong type or out of its range stops it with
an `invalid_config` error naming the key and where the value came from (the file, the variable or the
flag). A key the file does not know is refused the same way, in the top level and in `[model."NAME"]`
tables.

In the environment and in flags, numbers and booleans are written as text: a boolean is `1`, `true`,
`yes` or `on` (or `0`, `false`, `no`, `off`); a boolean flag `--x` has its opposite `--no-x`. A list
is comma-separated in its variable (`job_sources`: separated by `:`, as paths may hold commas) and a
repeated flag. A duration is seconds or `90s`, `5m`, `1h30m`; `0` is at once and `-1` is never.

```toml
socket = "/data/data/com.termux/files/usr/tmp/pe.sock"
models = ["all-minilm-l6-v2:q8_0"]
keep_alive = "10m"
job_sources = ["/data/data/com.termux/files/home/sms"]
power_battery_min = 60

[model."all-minilm-l6-v2:q4_0"]
threads = 2
query_prefix = "query: "
```
"""


def _type_text(f: Field) -> str:
    if f.kind == "choice":
        return " or ".join(f"`{c}`" for c in f.choices)
    text = {"list": "list of str", "int": "integer", "float": "number", "table": "tables"}.get(f.kind, f.kind)
    return f"{text} ({f.bounds})" if f.bounds else text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown() -> str:
    """docs/configuration.md."""
    lines = [_INTRO.rstrip("\n")]
    header = False
    for f in _sections_of(fields()):
        if isinstance(f, str):
            lines += ["", f"## {f}", ""]
            header = False
        elif f.kind == "table":
            lines += [f'Each model may have a table of its own, `[{f.name}."NAME"]` keyed by its name '
                      f'(e.g. `[{f.name}."all-minilm-l6-v2:q4_0"]`); these tables exist only in the file. '
                      "Their keys, all optional:", "",
                      "| Key | Type | Default | Description |", "|---|---|---|---|"]
            lines += [_row(m.name, _type_text(m), m.default_text, m.description) for m in fields(ModelTable)]
        else:
            if not header:
                lines += ["| Key | Type | Default | Environment | Flag | Description |", "|---|---|---|---|---|---|"]
                header = True
            lines.append(_row(f.name, _type_text(f), f.default_text, f"`{f.env}`", _flag_text(f),
                              f.description))
    return "\n".join(lines) + "\n"


def _flag_text(f: Field) -> str:
    if not f.flag:
        return "—"
    return f"`{f.flag}`, `--no-{f.flag[2:]}`" if f.kind == "bool" else f"`{f.flag}`"


def _row(name: str, *cells: str) -> str:
    return "| " + " | ".join(_cell(c) for c in (f"`{name}`", *cells)) + " |"


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m pocketembed.config --markdown   (prints docs/configuration.md)")
    sys.stdout.write(markdown())
