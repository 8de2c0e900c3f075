"""The Termux scripts in android/termux: shellcheck, and run here with Termux's paths set by env vars.

The service's run script starts the real daemon (as runit would: in the
foreground, from the service directory), the re-index script submits a job to
it, and SIGTERM (what `sv down` sends) stops it cleanly.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pocketembed.ipc import Client, DaemonError
from sms_db import make_sms_db

ANDROID = Path(__file__).resolve().parents[1] / "android" / "termux"
SCRIPTS = sorted(p for p in ANDROID.rglob("*") if p.is_file() and p.read_bytes().startswith(b"#!"))


def test_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian package shellcheck; CI installs it)")
    assert len(SCRIPTS) >= 5
    r = subprocess.run(["shellcheck", "--shell=sh", *[str(p) for p in SCRIPTS if p.name != "install.sh"]],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    r = subprocess.run(["shellcheck", str(ANDROID / "install.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def wait_socket(sock: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        if sock.exists():
            try:
                with Client(f"ipc://{sock}", timeout=2) as c:
                    c.ping()
                return
            except DaemonError:
                pass
        time.sleep(0.1)
    raise TimeoutError("the service did not start the daemon")


def test_service_run_script_starts_and_stops_the_daemon_and_the_reindex_script_submits(home, tmp_path):
    prefix, termux_home = tmp_path / "usr", tmp_path / "home"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "tmp").mkdir()
    termux_home.mkdir()
    pe = prefix / "bin" / "pocketembed"
    pe.write_text(f"#!/bin/sh\nexec {sys.executable} -m pocketembed.cli \"$@\"\n")
    pe.chmod(0o755)
    service = tmp_path / "service" / "pocketembed"
    shutil.copytree(ANDROID / "service" / "pocketembed", service)
    data = tmp_path / "pehome"
    data.mkdir()
    (data / "models").symlink_to(home / "models")
    sock = tmp_path / "run" / "pe.sock"
    (service / "env").write_text(f"POCKETEMBED_HOME={data}\nPOCKETEMBED_SOCKET={sock}\nPOCKETEMBED_MODELS=all-minilm-l6-v2:q4_0\n"
                                 f"POCKETEMBED_JOB_SOURCES={tmp_path}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("POCKETEMBED_")}
    env.update(PREFIX=str(prefix), HOME=str(termux_home))
    proc = subprocess.Popen(["sh", "./run"], cwd=service, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_socket(sock, proc)
        with Client(f"ipc://{sock}") as c:
            assert c.stats()["loaded_models"] == ["all-minilm-l6-v2:q4_0"]  # the env file was read

        db = make_sms_db(tmp_path / "sms.db", limit=50)
        (data / "reindex.conf").write_text(f"# db table id text collection\n{db} messages id body phone_sms\n")
        job_env = dict(env, POCKETEMBED_HOME=str(data), POCKETEMBED_SOCKET=str(sock))
        r = subprocess.run(["sh", str(ANDROID / "reindex-job.sh")], env=job_env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        with Client(f"ipc://{sock}") as c:
            jobs = c.jobs()
            assert [(j["table"], j["collection"]) for j in jobs] == [("messages", "phone_sms")]
            deadline = time.monotonic() + 120
            while c.job(jobs[0]["id"])["state"] != "done" and time.monotonic() < deadline:
                time.sleep(0.2)
            assert c.job(jobs[0]["id"])["embedded"] == 50

        proc.send_signal(signal.SIGTERM)  # what `sv down pocketembed` sends
        assert proc.wait(60) == 0
        assert not sock.exists()
        out = proc.stdout.read()
        assert "serving on" in out and "stopped" in out  # stderr went to stdout, for the log service
    finally:
        if proc.poll() is None:
            proc.kill()
