"""The power/idle monitor: may background work run now, and why (not)?

Readings come from sources tried in order: Termux's ``termux-battery-status``,
the kernel's ``/sys/class/power_supply``, then psutil. The first source that
can be read decides; a machine where none sees a battery counts as on mains.
CPU load comes from psutil, with the daemon's own CPU time taken out, so its
own inference never makes the phone look busy.

Every source implements the same two-method interface (``battery``,
``cpu_busy_percent``); :class:`FileSource` implements it over a JSON file so that
tests (and a phone owner trying a policy) can inject readings.

Readings never raise out of the monitor. Android denies apps ``/proc/stat``
(psutil then raises), Termux:API calls can hang, SELinux hides sysfs: a source
that fails for any reason is reported as unavailable (``status`` says why) and
the policy decides on what it has: the charger and the battery alone when the
CPU load cannot be read.

The policy (:class:`PowerPolicy`) runs background work when charging, or on
battery above a threshold with the CPU idle for a while; never below a floor;
never right after interactive traffic. Thresholds have hysteresis bands and a
new "allowed" must hold ``settle_s`` before it takes effect, so a noisy reading
does not flap the job runner.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil

from pocketembed.config import Settings, validate
from pocketembed.errors import PocketEmbedError

log = logging.getLogger("pocketembed.power")


class SourceUnavailable(Exception):
    """This source cannot be read here (command missing, no permission, ...)."""


@dataclass(frozen=True)
class Battery:
    percent: float
    plugged: bool
    status: str = ""
    """The source's own words, e.g. CHARGING, Discharging, FULL."""


class PowerSource(Protocol):
    """What a source of readings provides. psutil's is the reference."""

    name: str

    def battery(self) -> Battery | None:
        """The battery now; None when this source sees no battery. Raises SourceUnavailable."""
        ...

    def cpu_busy_percent(self) -> float | None:
        """CPU busy % of the whole machine since the last call, without this process; None on the first call."""
        ...


class _OwnCpu:
    """System CPU busy time minus this process's, as a share of all cores, between calls."""

    def __init__(self) -> None:
        self._proc: psutil.Process | None = None  # made on first use: even that reads /proc
        self._last: tuple[float, float, float] | None = None

    def busy_percent(self) -> float | None:
        try:
            t = psutil.cpu_times()
            self._proc = self._proc or psutil.Process()
            own = sum(self._proc.cpu_times()[:2])
        except Exception as e:  # no /proc/stat on Android (PermissionError), a missing procfs, ...
            raise SourceUnavailable(f"CPU load cannot be read ({type(e).__name__}: {e})") from None
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)
        now = time.monotonic()
        last, self._last = self._last, (now, busy, own)
        if last is None or now - last[0] < 0.05:
            return None
        elapsed = (now - last[0]) * (psutil.cpu_count() or 1)
        return max(0.0, min(100.0, 100.0 * ((busy - last[1]) - (own - last[2])) / elapsed))


class PsutilSource:
    name = "psutil"

    def __init__(self) -> None:
        self._cpu = _OwnCpu()

    def battery(self) -> Battery | None:
        try:
            b = psutil.sensors_battery()
        except (AttributeError, NotImplementedError, OSError) as e:
            raise SourceUnavailable(f"psutil.sensors_battery: {e}") from None
        if b is None:
            return None
        plugged = bool(b.power_plugged) if b.power_plugged is not None else False
        return Battery(float(b.percent), plugged, "charging" if plugged else "discharging")

    def cpu_busy_percent(self) -> float | None:
        return self._cpu.busy_percent()


class TermuxSource(PsutilSource):
    """``termux-battery-status`` (Termux:API); CPU from psutil."""

    name = "termux"

    HANG_BACKOFF_S = 600.0
    """After a call that hung, the command is not tried again for this long."""

    def __init__(self, command: str = "termux-battery-status", timeout: float = 3.0) -> None:
        super().__init__()
        self.command = command
        self.timeout = timeout
        self._hung_until = 0.0

    def battery(self) -> Battery | None:
        if time.monotonic() < self._hung_until:
            raise SourceUnavailable(f"{self.command} hung (over {self.timeout:g} s) at its last call; "
                                    f"not tried again for {self._hung_until - time.monotonic():.0f} s")
        exe = shutil.which(self.command)
        if exe is None:
            raise SourceUnavailable(f"{self.command} not found (install termux-api and the Termux:API app)")
        try:
            out = subprocess.run([exe], capture_output=True, text=True, timeout=self.timeout, check=True).stdout
        except subprocess.TimeoutExpired:
            self._hung_until = time.monotonic() + self.HANG_BACKOFF_S
            raise SourceUnavailable(f"{self.command} did not answer within {self.timeout:g} s "
                                    "(is the Termux:API app installed and allowed to run?)") from None
        try:
            data = json.loads(out)
            percent = float(data["percentage"])
        except (subprocess.SubprocessError, OSError, ValueError, KeyError, TypeError) as e:
            raise SourceUnavailable(f"{self.command}: {e}") from None
        status = str(data.get("status", ""))
        plugged = str(data.get("plugged", "UNPLUGGED")).upper() != "UNPLUGGED" or status.upper() in ("CHARGING", "FULL")
        return Battery(percent, plugged, status)


class SysfsSource(PsutilSource):
    """Android/Linux ``/sys/class/power_supply``; CPU from psutil."""

    name = "sysfs"

    def __init__(self, root: str | os.PathLike[str] = "/sys/class/power_supply") -> None:
        super().__init__()
        self.root = Path(root)

    def battery(self) -> Battery | None:
        try:
            supplies = sorted(self.root.iterdir())
        except OSError as e:
            raise SourceUnavailable(f"{self.root}: {e.strerror or e}") from None
        battery: Battery | None = None
        external = False
        kinds = {d: _read(d / "type") for d in supplies}
        if supplies and all(k is None for k in kinds.values()):
            # Listed but unreadable (Android's SELinux does this): that is not "no battery".
            raise SourceUnavailable(f"{self.root}: supplies listed but not readable")
        for d in supplies:
            kind = kinds[d]
            if kind == "Battery" and battery is None and _read(d / "present") != "0":
                cap = _read(d / "capacity")
                if cap is None:
                    continue
                status = _read(d / "status") or ""
                battery = Battery(float(cap), status in ("Charging", "Full"), status)
            elif kind not in (None, "Battery") and _read(d / "online") == "1":
                external = True
        if battery is not None and external and not battery.plugged:
            battery = Battery(battery.percent, True, battery.status)
        return battery


class FileSource:
    """Readings from a JSON file, re-read on every call: the injection point.

    ``{"battery": {"percent": 15, "plugged": false}, "cpu_percent": 3}``;
    ``"battery": null`` means no battery. Missing file: unavailable.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = f"file:{self.path}"

    def _data(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise SourceUnavailable(f"{self.path}: {e}") from None
        if not isinstance(data, dict):
            raise SourceUnavailable(f"{self.path}: expected a JSON object")
        return data

    def battery(self) -> Battery | None:
        b = self._data().get("battery")
        if b is None:
            return None
        try:
            return Battery(float(b["percent"]), bool(b.get("plugged", False)), str(b.get("status", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise SourceUnavailable(f"{self.path}: bad battery reading: {e}") from None

    def cpu_busy_percent(self) -> float | None:
        v = self._data().get("cpu_percent", 0.0)
        return float(v) if isinstance(v, (int, float)) else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def sources(spec: str = "auto", procfs: str | None = None) -> list[PowerSource]:
    """The sources named by a config value: auto, termux, sysfs, psutil or file:PATH.

    ``procfs`` moves psutil's /proc (``psutil.PROCFS_PATH``: a chroot, or a test's fake one).
    """
    if procfs:
        psutil.PROCFS_PATH = procfs
    if spec.startswith("file:"):
        return [FileSource(spec[len("file:"):])]
    named = {"termux": TermuxSource, "sysfs": SysfsSource, "psutil": PsutilSource}
    if spec == "auto":
        return [TermuxSource(), SysfsSource(), PsutilSource()]
    if spec in named:
        return [named[spec]()]
    raise PocketEmbedError(f"power_source must be auto, termux, sysfs, psutil or file:PATH, not {spec!r}",
                           code="invalid_config")


@dataclass(frozen=True)
class PowerPolicy:
    """When background work may run. Percentages are 0–100."""

    on_charger: bool = True
    """Run whenever plugged in (above the floor), busy CPU or not."""
    battery_min: float = 80.0
    """On battery, run only at or above this charge ..."""
    idle_cpu_percent: float = 25.0
    """... and with other processes' CPU load below this ..."""
    idle_s: float = 60.0
    """... for this long."""
    battery_floor: float = 20.0
    """Never run below this charge, even on the charger."""
    battery_hysteresis: float = 5.0
    """Once running, stop only when the charge falls this far under a threshold."""
    busy_cpu_percent: float = 60.0
    """Once running on battery, stop only when the CPU load goes over this."""
    settle_s: float = 5.0
    """A change to "allowed" must hold this long (a change to "not allowed" acts at once)."""
    interactive_pause_s: float = 2.0
    """Pause background work this long after interactive traffic."""
    poll_s: float = 30.0
    """Readings older than this are taken again when a decision is asked for; a waiting job re-asks this often."""


@dataclass
class Decision:
    allowed: bool
    reason: str
    since: float = field(default_factory=time.time)


@dataclass
class Reading:
    source: str
    battery_percent: float | None
    plugged: bool
    battery_status: str
    cpu_busy_percent: float | None
    at: float
    tried: dict[str, str]
    """Sources that could not be read, with why."""


class PowerMonitor:
    """Samples the sources when asked (at most every ``poll_s``) and applies the policy.

    It has no thread of its own: the job runner asks between chunks, ``status``
    asks when a client wants to know, and nothing wakes the phone otherwise.
    """

    def __init__(self, policy: PowerPolicy | None = None, source_list: list[PowerSource] | None = None,
                 last_interactive: Callable[[], float] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy or PowerPolicy()
        self._clock = clock
        """Where settle, idle and poll times are read from (seconds, monotonic; ``last_interactive`` is on
        the same clock). A test passes a fake one to step past ``idle_s`` instead of sleeping and racing it."""
        self.sources = source_list if source_list is not None else sources("auto")
        self._cpu_source: PowerSource = self.sources[-1]
        self._last_interactive = last_interactive or (lambda: float("-inf"))
        self._lock = threading.Lock()
        self._reading: Reading | None = None
        self._power_ok = False
        self._power_reason = "no reading yet"
        self._pending_since: float | None = None
        self._idle_since: float | None = None
        self._cpu_unreadable = False
        self._changed = time.time()

    def decide(self, force: bool = False) -> Decision:
        """Whether background work may run now, with the reason. Never raises."""
        with self._lock:
            now = self._clock()
            settled = self._pending_since is not None and now - self._pending_since >= self.policy.settle_s
            if force or settled or self._reading is None or now - self._reading.at >= self.policy.poll_s:
                try:
                    self._sample(now)
                except Exception as e:  # a bug in a source or the policy: no background work, and say why
                    log.exception("power readings failed")
                    self._power_ok, self._power_reason = False, f"power readings failed ({type(e).__name__}: {e})"
                    self._reading = Reading("none", None, False, "", None, now, {"monitor": str(e)})
            since_interactive = now - self._last_interactive()
            if self._power_ok and since_interactive < self.policy.interactive_pause_s:
                return Decision(False, f"interactive traffic {since_interactive:.1f} s ago", time.time())
            return Decision(self._power_ok, self._power_reason, self._changed)

    def next_check_s(self) -> float:
        """How long a job waiting for the policy should sleep before asking again.

        The end of an interactive pause when that is the reason, else ``poll_s``
        (while waiting for the charger the daemon wakes this rarely).
        """
        since = self._clock() - self._last_interactive()
        if since < self.policy.interactive_pause_s:
            return max(0.05, self.policy.interactive_pause_s - since)
        pending = self._pending_since
        if pending is not None:  # settling towards "allowed": look again when it has held long enough
            return max(0.05, min(self.policy.poll_s, self.policy.settle_s - (self._clock() - pending)))
        return max(0.05, self.policy.poll_s)

    def status(self) -> dict[str, Any]:
        """Readings and the current decision, for ``stats``/``pocketembed status``."""
        d = self.decide()
        with self._lock:
            r = self._reading
            return {
                "allowed": d.allowed,
                "reason": d.reason,
                "since": round(d.since, 3),
                "source": r.source if r else None,
                "battery_percent": r.battery_percent if r else None,
                "plugged": r.plugged if r else None,
                "battery_status": r.battery_status if r else None,
                "cpu_busy_percent": None if r is None or r.cpu_busy_percent is None else round(r.cpu_busy_percent, 1),
                "unavailable_sources": r.tried if r else {},
                "policy": asdict(self.policy),
            }

    # -- under the lock ------------------------------------------------------------------

    def _sample(self, now: float) -> None:
        tried: dict[str, str] = {}
        battery: Battery | None = None
        source = "none"
        for s in self.sources:
            try:
                battery = s.battery()
            except Exception as e:  # SourceUnavailable, or anything a broken source raises
                tried[s.name] = str(e) if isinstance(e, SourceUnavailable) else f"{type(e).__name__}: {e}"
                continue
            source = s.name
            self._cpu_source = s
            break
        try:
            cpu = self._cpu_source.cpu_busy_percent()
        except Exception as e:
            tried[f"{self._cpu_source.name} (cpu)"] = str(e) if isinstance(e, SourceUnavailable) else f"{type(e).__name__}: {e}"
            cpu = None
        self._cpu_unreadable = f"{self._cpu_source.name} (cpu)" in tried
        previous = self._reading
        if battery is None:
            source = f"{source}: no battery (mains)" if source != "none" else "none: no battery (mains)"
        self._reading = Reading(source, battery.percent if battery else None, battery.plugged if battery else True,
                                battery.status if battery else "mains", cpu, now, tried)
        # Idle since the previous sample when the load over the time between (psutil
        # averages it) was under the threshold.
        if cpu is None or cpu >= self.policy.idle_cpu_percent:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = previous.at if previous is not None else now
        ok, reason = self._evaluate(battery, cpu, now)
        self._apply(ok, reason, now, first=previous is None)

    def _evaluate(self, battery: Battery | None, cpu: float | None, now: float) -> tuple[bool, str]:
        p = self.policy
        running = self._power_ok
        if battery is None:
            return True, "no battery: on mains power"
        pct = battery.percent
        floor = p.battery_floor - (p.battery_hysteresis if running else 0)
        if pct < floor:
            return False, f"battery {pct:.0f}% is below the floor of {p.battery_floor:.0f}%"
        if battery.plugged and p.on_charger:
            return True, f"charging ({pct:.0f}%)"
        need = p.battery_min - (p.battery_hysteresis if running else 0)
        if pct < need:
            return False, f"on battery at {pct:.0f}% (needs {p.battery_min:.0f}% or the charger)"
        if cpu is None:
            if self._cpu_unreadable:
                return False, f"on battery at {pct:.0f}% and the CPU load cannot be read: waiting for the charger"
            return False, f"on battery at {pct:.0f}%: measuring CPU load"
        if running and cpu <= p.busy_cpu_percent:
            return True, f"on battery at {pct:.0f}%, CPU {cpu:.0f}% (under {p.busy_cpu_percent:.0f}%)"
        idle_for = now - self._idle_since if self._idle_since is not None else 0.0
        if self._idle_since is None or idle_for < p.idle_s:
            return False, (f"on battery at {pct:.0f}%, CPU {cpu:.0f}% "
                           f"(needs under {p.idle_cpu_percent:.0f}% for {p.idle_s:g} s; idle {idle_for:.0f} s)")
        return True, f"on battery at {pct:.0f}%, CPU idle for {idle_for:.0f} s"

    def _apply(self, ok: bool, reason: str, now: float, first: bool = False) -> None:
        if ok and not self._power_ok and not first:
            if self._pending_since is None:
                self._pending_since = now
            waited = now - self._pending_since
            if waited < self.policy.settle_s:
                self._power_reason = f"{reason}; settling ({waited:.0f}/{self.policy.settle_s:.0f} s)"
                return
        self._pending_since = None
        if ok != self._power_ok:
            log.info("background work %s: %s", "allowed" if ok else "paused", reason)
            self._changed = time.time()
        self._power_ok = ok
        self._power_reason = reason


def policy_from_settings(settings: Settings | dict[str, Any]) -> PowerPolicy:
    """The policy of the ``power_*`` settings (the field names with the prefix), checked by ``Settings``.

    ``settings`` is a ``pocketembed.config.Settings``, or a dict of some of its keys (the rest: defaults).
    """
    if not isinstance(settings, Settings):
        settings = validate(settings)
    return PowerPolicy(**{key: getattr(settings, f"power_{key}") for key in asdict(PowerPolicy())})
