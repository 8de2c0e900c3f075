"""Start `pocketembed serve` as a real separate process on a temporary socket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pocketembed.ipc import Client, DaemonError


class DaemonProcess:
    def __init__(self, home: Path, socket_path: Path, *extra: str, env: dict[str, str] | None = None,
                 preexec_fn=None, python: list[str] | None = None) -> None:
        """``python``: the interpreter's command line (default this one; an emulated aarch64 one in test_arm_daemon)."""
        self.home = home
        self.socket_path = socket_path
        self.endpoint = f"ipc://{socket_path}"
        env = dict(os.environ, POCKETEMBED_HOME=str(home), **(env or {}))
        env.pop("POCKETEMBED_SOCKET", None)
        # Its output goes to a file, not a pipe: a pipe nobody reads fills at 64 KiB and then
        # blocks the daemon's next log line, wedging it mid-test.
        fd, log = tempfile.mkstemp(prefix="pe-daemon-", suffix=".log")
        self.log_path = Path(log)
        with os.fdopen(fd, "w") as out:
            self.proc = subprocess.Popen(
                [*(python or [sys.executable]), "-m", "pocketembed.cli", "serve", "--socket", str(socket_path), *extra],
                stdout=out, stderr=subprocess.STDOUT, env=env, text=True, preexec_fn=preexec_fn,
            )

    def log(self) -> str:
        """What the daemon has written to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> DaemonProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.log()}")
            if self.socket_path.exists():
                try:
                    with Client(self.endpoint, timeout=2) as c:
                        c.ping()
                    return self
                except DaemonError:
                    pass
            time.sleep(0.05)
        raise TimeoutError("daemon did not become ready")

    def client(self, **kw) -> Client:
        return Client(self.endpoint, **kw)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class DecodeGate:
    """Holds the daemon's decode workers until the test lets them through.

    The daemon's ``scheduler:decode=hold`` failpoint (daemon/faults.py) reads this
    FIFO before every decode: ``allow(n)`` lets n decodes through, ``release()``
    opens the gate for good. A test that needs requests queued, a deadline past or
    a job midway at some moment holds the decodes there instead of betting on how
    fast this machine embeds. Pass ``env`` to the DaemonProcess; one gate per daemon.
    """

    def __init__(self, path: Path, lane: str | None = None) -> None:
        """``lane="background"`` holds only background decodes (a job's work); interactive requests run."""
        os.mkfifo(path)
        self.path = path
        self.point = "scheduler:decode" + (f":{lane}" if lane else "")
        # Held open read-write: writes neither block nor fail before the daemon opens its end.
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)

    @property
    def env(self) -> dict[str, str]:
        return {"POCKETEMBED_FAILPOINTS": f"{self.point}=hold", "POCKETEMBED_FAILPOINT_GATE": str(self.path)}

    def allow(self, n: int = 1) -> None:
        os.write(self._fd, b"." * n)

    def release(self) -> None:
        os.write(self._fd, b"R")

    def close(self) -> None:
        os.close(self._fd)


def wait_until(predicate, what: str, timeout: float = 120, interval: float = 0.02):
    """Poll ``predicate()`` until it returns something truthy, and return that.

    ``timeout`` only guards against a wedged daemon: what is awaited normally comes
    in milliseconds, so the bound is far beyond any machine's speed.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout} s")
        time.sleep(interval)


def write_battery(path: Path, percent: float, plugged: bool) -> None:
    """The sensor file that ``--power-source file:PATH`` reads, replaced whole (the daemon never sees half)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"battery": {"percent": percent, "plugged": plugged}, "cpu_percent": 3}))
    tmp.replace(path)


def scheduler_stats(client) -> dict:
    return client.stats()["scheduler"]


def step_until(client, gate: DecodeGate, done, what: str, max_decodes: int = 2000):
    """Let decodes through one at a time until ``done()`` is truthy; the workers are held again after.

    Progress is then a count of decodes, not of seconds: a job stopped this way is
    midway on any machine.
    """
    for _ in range(max_decodes):
        value = done()
        if value:
            return value
        before = scheduler_stats(client)["decodes"]
        gate.allow(1)
        wait_until(lambda: scheduler_stats(client)["decodes"] > before, f"a decode let through ({what})")
    raise AssertionError(f"{what}: not reached after {max_decodes} decodes")
