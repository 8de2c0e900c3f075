"""The power/idle policy, fed through the sources' own interface.

Readings are injected only as sensor values: a JSON file read by FileSource,
and a sysfs tree laid out as the kernel lays it out. The real sources run on
this machine in the last test.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil
import pytest

from pocketembed.daemon.power import (
    FileSource, PowerMonitor, PowerPolicy, PsutilSource, SourceUnavailable, SysfsSource, TermuxSource, policy_from_settings,
    sources,
)
from pocketembed.errors import PocketEmbedError

FAST = dict(poll_s=0.0, settle_s=0.0, interactive_pause_s=0.0)


class Sensors:
    def __init__(self, path: Path) -> None:
        self.path = path

    def set(self, percent: float | None = 50, plugged: bool = False, cpu: float = 5) -> None:
        battery = None if percent is None else {"percent": percent, "plugged": plugged}
        self.path.write_text(json.dumps({"battery": battery, "cpu_percent": cpu}))


@pytest.fixture
def sensors(tmp_path) -> Sensors:
    s = Sensors(tmp_path / "sensors.json")
    s.set()
    return s


class Clock:
    """The monitor's monotonic clock, moved by the test: "idle for 0.3 s" is then a clock reading,
    not a bet that this process is not held up between two calls."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def monitor(sensors: Sensors, clock: Clock | None = None, **policy) -> PowerMonitor:
    return PowerMonitor(PowerPolicy(**{**FAST, **policy}), [FileSource(sensors.path)], clock=clock or Clock())


def test_charging_runs_and_battery_needs_a_threshold_and_idle_cpu(sensors):
    clock = Clock()
    m = monitor(sensors, clock, battery_min=80, idle_s=0.3, idle_cpu_percent=20)
    sensors.set(50, plugged=True, cpu=95)
    d = m.decide()
    assert d.allowed and d.reason == "charging (50%)"  # on the charger a busy CPU does not matter
    sensors.set(50, plugged=False)
    d = m.decide()
    assert not d.allowed and "on battery at 50% (needs 80% or the charger)" in d.reason
    sensors.set(90, plugged=False, cpu=5)
    assert not m.decide().allowed  # idle only just now
    clock.advance(0.29)
    assert not m.decide().allowed  # idle 0.29 s of 0.3 s
    clock.advance(0.06)
    d = m.decide()
    assert d.allowed and "CPU idle for" in d.reason
    sensors.set(None)
    assert m.decide().reason == "no battery: on mains power"


def test_floor_holds_even_on_the_charger(sensors):
    m = monitor(sensors, battery_floor=20)
    sensors.set(12, plugged=True)
    d = m.decide()
    assert not d.allowed and "below the floor of 20%" in d.reason


def test_hysteresis_keeps_running_inside_the_band(sensors):
    m = monitor(sensors, battery_min=80, battery_hysteresis=5, idle_s=0, busy_cpu_percent=60, idle_cpu_percent=20)
    sensors.set(81, cpu=5)
    m.decide()
    assert m.decide().allowed
    sensors.set(77, cpu=50)  # under the threshold, and busier than "idle": still inside both bands
    assert m.decide().allowed
    sensors.set(74, cpu=50)
    d = m.decide()
    assert not d.allowed and "needs 80%" in d.reason
    sensors.set(77, cpu=5)  # back inside the band, but starting again needs the full threshold
    assert not m.decide().allowed
    sensors.set(81, cpu=70)
    assert not m.decide().allowed  # not idle
    sensors.set(81, cpu=5)
    assert m.decide().allowed
    sensors.set(81, cpu=70)  # over busy_cpu_percent: stop
    assert not m.decide().allowed


def test_settle_time_before_starting_and_stop_at_once(sensors):
    clock = Clock()
    m = monitor(sensors, clock, settle_s=0.4)
    sensors.set(50, plugged=False)
    assert not m.decide().allowed
    sensors.set(50, plugged=True)
    d = m.decide()
    assert not d.allowed and "settling" in d.reason
    clock.advance(0.39)
    assert not m.decide().allowed  # 0.39 s of 0.4 s
    clock.advance(0.02)
    assert m.decide().allowed
    sensors.set(50, plugged=False)
    assert not m.decide().allowed  # unplugged: at once


def test_interactive_traffic_pauses_background_work(sensors):
    clock = Clock()
    last = [clock()]
    m = PowerMonitor(PowerPolicy(**{**FAST, "interactive_pause_s": 0.3}), [FileSource(sensors.path)],
                     last_interactive=lambda: last[0], clock=clock)
    sensors.set(50, plugged=True)
    d = m.decide()
    assert not d.allowed and d.reason.startswith("interactive traffic")
    clock.advance(0.29)
    assert not m.decide().allowed
    assert 0.0 < m.next_check_s() <= 0.05  # a waiting job looks again when the pause ends
    clock.advance(0.02)
    assert m.decide().allowed


def test_sources_in_order_first_readable_wins(sensors, tmp_path):
    missing = FileSource(tmp_path / "absent.json")
    sensors.set(64, plugged=False, cpu=3)
    m = PowerMonitor(PowerPolicy(**FAST), [missing, FileSource(sensors.path)])
    s = m.status()
    assert s["source"] == f"file:{sensors.path}" and s["battery_percent"] == 64 and s["cpu_busy_percent"] == 3
    assert str(missing.path) in s["unavailable_sources"][missing.name]


def test_sysfs_battery_and_charger(tmp_path):
    root = tmp_path / "power_supply"
    for name, files in {"battery": {"type": "Battery", "present": "1", "capacity": "57", "status": "Discharging"},
                        "ac": {"type": "Mains", "online": "0"}, "usb": {"type": "USB", "online": "0"}}.items():
        (root / name).mkdir(parents=True)
        for f, v in files.items():
            (root / name / f).write_text(v + "\n")
    src = SysfsSource(root)
    assert src.battery() == SysfsSource(root).battery() and src.battery().percent == 57 and not src.battery().plugged
    (root / "usb" / "online").write_text("1\n")
    assert src.battery().plugged  # a live charger counts even before the battery says Charging
    (root / "battery" / "capacity").unlink()
    (root / "battery" / "type").unlink()
    (root / "ac" / "type").unlink()
    (root / "usb" / "type").unlink()
    with pytest.raises(SourceUnavailable):  # listed but unreadable is not "no battery"
        src.battery()
    with pytest.raises(SourceUnavailable):
        SysfsSource(tmp_path / "nope").battery()


def test_termux_source_reads_the_commands_json(tmp_path, monkeypatch):
    exe = tmp_path / "termux-battery-status"
    exe.write_text('#!/bin/sh\necho \'{"health":"GOOD","percentage":83,"plugged":"PLUGGED_USB","status":"CHARGING"}\'\n')
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    b = TermuxSource().battery()
    assert (b.percent, b.plugged, b.status) == (83, True, "CHARGING")
    with pytest.raises(SourceUnavailable, match="not found"):
        TermuxSource("no-such-termux-command").battery()


def test_the_real_sources_on_this_machine():
    m = PowerMonitor(PowerPolicy(poll_s=0.0), sources("auto"))
    first = m.status()
    time.sleep(0.2)
    s = m.status()
    assert s["cpu_busy_percent"] is not None and 0 <= s["cpu_busy_percent"] <= 100
    assert first["source"] is not None
    if psutil.sensors_battery() is None and not any(
            (p / "type").exists() and (p / "type").read_text().strip() == "Battery"
            for p in Path("/sys/class/power_supply").glob("*")):
        assert s["source"].endswith("no battery (mains)") and s["plugged"] is True
        assert s["allowed"] and s["reason"] == "no battery: on mains power"
    assert PsutilSource().cpu_busy_percent() is None  # the first call has nothing to compare with


def test_policy_settings_are_checked():
    p = policy_from_settings({"power_battery_min": 60, "power_on_charger": False})
    assert p.battery_min == 60 and p.on_charger is False
    with pytest.raises(PocketEmbedError, match="power_idle_s"):
        policy_from_settings({"power_idle_s": -1})
    with pytest.raises(PocketEmbedError, match="power_source"):
        sources("battery-please")


def fake_procfs(root: Path, stat: str) -> Path:
    """A /proc as Android shows it to an app: no readable /proc/stat (missing, or not a file)."""
    root.mkdir()
    for name in ("meminfo", "cpuinfo", "self"):
        (root / name).symlink_to(Path("/proc") / name)
    if stat == "directory":
        (root / "stat").mkdir()
    return root


class BatteryFromFile(PsutilSource):
    """Battery readings from a JSON file, CPU load from psutil: what a phone's sources give."""

    name = "battery-file + psutil"

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._file = FileSource(path)

    def battery(self):
        return self._file.battery()


@pytest.mark.parametrize("stat", ["missing", "directory"])
def test_unreadable_proc_stat_never_raises_and_the_policy_uses_the_battery(sensors, tmp_path, monkeypatch, stat):
    monkeypatch.setattr(psutil, "PROCFS_PATH", str(fake_procfs(tmp_path / "proc", stat)))
    with pytest.raises(SourceUnavailable, match="CPU load cannot be read"):
        PsutilSource().cpu_busy_percent()
    m = PowerMonitor(PowerPolicy(**FAST), [BatteryFromFile(sensors.path)])
    sensors.set(90, plugged=False)
    d = m.decide()
    assert not d.allowed and "CPU load cannot be read" in d.reason
    status = m.status()
    assert status["cpu_busy_percent"] is None and "battery-file + psutil (cpu)" in status["unavailable_sources"]
    sensors.set(40, plugged=True)
    assert m.decide().allowed  # charging: the battery alone decides


def test_a_hanging_battery_command_is_cut_short_and_skipped(tmp_path, monkeypatch):
    exe = tmp_path / "termux-battery-status"
    exe.write_text("#!/bin/sh\nsleep 60\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    source = TermuxSource(timeout=0.5)
    t = time.monotonic()
    with pytest.raises(SourceUnavailable, match="did not answer within"):
        source.battery()
    assert time.monotonic() - t < 30  # cut short: a wedge guard, far below the command's 60 s
    with pytest.raises(SourceUnavailable, match="hung"):  # not waited for again: the backoff's answer, not a new run's
        source.battery()


@pytest.mark.parametrize("stat", ["missing", "directory"])
def test_the_daemons_status_answers_without_proc_stat_and_with_a_hanging_battery_command(home, tmp_path, stat):
    from conftest import fresh_home, run_cli
    from daemon_proc import DaemonProcess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "termux-battery-status").write_text("#!/bin/sh\nsleep 120\n")
    (bin_dir / "termux-battery-status").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "POCKETEMBED_POWER_PROCFS": str(fake_procfs(tmp_path / "proc", stat))}
    d = DaemonProcess(fresh_home(home), tmp_path / "pe.sock", "--model", "none", env=env).wait_ready()
    try:
        for _ in range(2):
            t = time.monotonic()
            r = run_cli("status", "--json", "--socket", str(d.socket_path), env=env)
            assert r.returncode == 0, r.stderr
            assert time.monotonic() - t < 60  # answered: a wedge guard, far below the command's 120 s
        power = json.loads(r.stdout)["power"]
        unavailable = power["unavailable_sources"]
        assert "did not answer" in unavailable["termux"] or "hung" in unavailable["termux"]
        assert any("CPU load cannot be read" in why for src, why in unavailable.items() if src.endswith("(cpu)"))
        assert power["cpu_busy_percent"] is None and isinstance(power["allowed"], bool) and power["reason"]
    finally:
        assert d.stop() == 0
