"""Start `pocketembed serve` as a real separate process on a temporary socket."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from pocketembed.ipc import Client, DaemonError


class DaemonProcess:
    def __init__(self, home: Path, socket_path: Path, *extra: str, env: dict[str, str] | None = None,
                 preexec_fn=None) -> None:
        self.home = home
        self.socket_path = socket_path
        self.endpoint = f"ipc://{socket_path}"
        env = dict(os.environ, POCKETEMBED_HOME=str(home), **(env or {}))
        env.pop("POCKETEMBED_SOCKET", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pocketembed.cli", "serve", "--socket", str(socket_path), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, preexec_fn=preexec_fn,
        )

    def wait_ready(self, timeout: float = 60) -> DaemonProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.proc.stderr.read()}")
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
