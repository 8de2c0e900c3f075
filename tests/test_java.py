"""The Android-side Java client (JeroMQ + msgpack-java) against a live daemon."""

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import fresh_home, run_cli
from daemon_proc import DaemonProcess, DecodeGate, step_until, write_battery
from pocketembed.sms import BUNDLED, load_sms
from sms_db import make_sms_db

REPO = Path(__file__).resolve().parents[1]
JARS = ["/usr/share/java/jeromq.jar", "/usr/share/java/msgpack-core.jar"]
TEXTS = ["Ok lar... Joking wif u oni...", "Free entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005",
         "Even my brother is not like to speak with me. They treat me like aids patent.", "émoji 🎉 ünïcode"]

def compile_java(tmp_path: Path) -> str:
    """The client (android/java) and the test programs (tests/java), compiled; returns the classpath."""
    missing = [j for j in JARS if not Path(j).exists()]
    assert not missing, f"install Debian's libjeromq-java and libmsgpack-java (scripts/setup.sh does): {missing}"
    classes = tmp_path / "classes"
    cp = ":".join(JARS)
    sources = sorted(str(p) for d in ("android/java", "tests/java") for p in (REPO / d).rglob("*.java"))
    r = subprocess.run(["javac", "-d", str(classes), "-cp", cp, *sources], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return f"{classes}:{cp}"


def add_client(home: Path, name: str, *perms: str) -> str:
    r = run_cli("clients", "add", name, *[a for p in perms for a in ("--allow", p)], home=home)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


def java(cp: str, main: str, *args: str, token: str | None = None, stdin: bytes = b"", timeout: float = 300):
    env = {k: v for k, v in os.environ.items() if k != "POCKETEMBED_TOKEN"}
    if token is not None:
        env["POCKETEMBED_TOKEN"] = token
    return subprocess.run(["java", "-cp", cp, main, *args], input=stdin, capture_output=True, timeout=timeout, env=env)


pytestmark = pytest.mark.skipif(not (shutil.which("java") and shutil.which("javac")),
                                reason="java/javac not installed: the Java client cannot be compiled here")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_java_client_with_a_token_embeds_and_searches_and_without_one_is_refused(home, tmp_path):
    cp = compile_java(tmp_path)
    root = fresh_home(home)
    token = add_client(root, "smsapp", "embed", "search:sms")
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    d = DaemonProcess(root, tmp_path / "s" / "pe.sock", "--tcp", f"127.0.0.1:{port}").wait_ready()
    try:
        embedded = java(cp, "org.pocketembed.EmbedMain", endpoint, token=token, stdin="\n".join(TEXTS).encode())
        assert embedded.returncode == 0, embedded.stderr.decode()
        from_java = np.frombuffer(embedded.stdout, dtype="<f4").reshape(len(TEXTS), 384)
        with d.client() as c:  # the owner, on the Unix socket
            from_python = c.embed(TEXTS)
            c.index_add("sms", [{"id": i + 1, "text": t} for i, t in enumerate(TEXTS)], store_text=True)
        assert np.array_equal(from_java, from_python)  # the same request on an idle daemon: the same bits

        found = java(cp, "org.pocketembed.SearchMain", endpoint, "sms", "free tickets to the cup final", "2", token=token)
        assert found.returncode == 0, found.stderr.decode()
        first = found.stdout.decode().splitlines()[0].split("\t")
        assert first[0] == "2" and first[2] == TEXTS[1] and -1 <= float(first[1]) <= 1

        for main, args, stdin in (("EmbedMain", (), b"hello"), ("SearchMain", ("sms", "hello", "1"), b"")):
            refused = java(cp, f"org.pocketembed.{main}", endpoint, *args, stdin=stdin)
            assert refused.returncode == 1 and b"error[unauthorized]" in refused.stderr, refused.stderr
        other = java(cp, "org.pocketembed.SearchMain", endpoint, "work", "hello", "1", token=token)
        assert other.returncode == 1 and b"error[forbidden]" in other.stderr
        bad = java(cp, "org.pocketembed.EmbedMain", endpoint, "nope:q1", token=token, stdin=b"hello")
        assert bad.returncode == 1 and b"error[unknown_model]" in bad.stderr
    finally:
        assert d.stop() == 0


def test_the_java_client_speaks_every_op(home, tmp_path):
    cp = compile_java(tmp_path)
    root = fresh_home(home)
    admin = add_client(root, "tools", "admin")
    limited = add_client(root, "smsapp", "search:sms")
    (tmp_path / "src").mkdir()
    db = make_sms_db(tmp_path / "src" / "sms.db", limit=30)
    port = free_port()
    d = DaemonProcess(root, tmp_path / "pe.sock", "--tcp", f"127.0.0.1:{port}",
                      env={"POCKETEMBED_JOB_SOURCES": str(tmp_path / "src")}).wait_ready()
    try:
        r = java(cp, "ProtocolCheck", f"tcp://127.0.0.1:{port}", admin, limited, str(db))
        assert r.returncode == 0, r.stderr.decode()[-3000:]
        assert r.stdout.decode().startswith("ok ") and int(r.stdout.split()[1]) >= 30
    finally:
        assert d.stop() == 0


def test_the_java_client_raises_every_error_code_as_the_class_of_its_kind(tmp_path):
    from pocketembed.ipc import protocol as P
    from test_coverage import JAVA_CLASS

    cp = compile_java(tmp_path)
    r = java(cp, "org.pocketembed.CodeClasses", *P.ERRORS, "a_code_from_a_newer_daemon")
    assert r.returncode == 0, r.stderr.decode()
    got = dict(line.split("\t") for line in r.stdout.decode().splitlines())
    assert got == {**{c: JAVA_CLASS[e.kind] for c, e in P.ERRORS.items()}, "a_code_from_a_newer_daemon": "DaemonException"}


def test_as_the_phone_runs_it_enqueue_on_battery_embed_on_the_charger_through_a_kill(home, tmp_path):
    """The SMS app (Java, over TCP, with its token) hands the whole inbox over on battery; the charger comes."""
    cp = compile_java(tmp_path)
    root = fresh_home(home)
    token = add_client(root, "smsapp", "index:sms", "search:sms")
    sensors = tmp_path / "battery.json"

    def battery(percent: int, plugged: bool) -> None:
        write_battery(sensors, percent, plugged)

    battery(40, plugged=False)
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    args = (root, tmp_path / "pe.sock", "--model", "all-minilm-l6-v2:q8_0", "--tcp", f"127.0.0.1:{port}",
            "--power-source", f"file:{sensors}")
    env = {"POCKETEMBED_POWER_POLL_S": "0.2", "POCKETEMBED_POWER_SETTLE_S": "0.2", "POCKETEMBED_JOB_CHUNK_ROWS": "64"}
    # The first daemon's job decodes wait at a gate: the test lets them through until 500 messages are
    # in, then kills it midway, on any machine (5,574 could otherwise be done between two polls).
    gate = DecodeGate(tmp_path / "gate", lane="background")
    d = DaemonProcess(*args, env={**env, **gate.env}).wait_ready()

    def status(job: str) -> list[str]:
        r = java(cp, "org.pocketembed.PhoneMain", "status", endpoint, job, token=token)
        assert r.returncode == 0, r.stderr.decode()
        return r.stdout.decode().rstrip("\n").split("\t")

    def until(job: str, ok, timeout: float = 300) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = status(job)
            if ok(s):
                return s
            time.sleep(0.3)
        raise TimeoutError(status(job))

    try:
        r = java(cp, "org.pocketembed.PhoneMain", "enqueue", endpoint, "sms", str(BUNDLED), token=token)
        assert r.returncode == 0, r.stderr.decode()
        job, enqueued = r.stdout.decode().split()
        assert enqueued == "5574"
        state, scanned, total, embedded, reason = until(job, lambda s: s[0] == "waiting")
        assert (scanned, total, embedded) == ("0", "5574", "0") and "on battery at 40%" in reason
        time.sleep(1.0)
        assert status(job)[1] == "0"  # still nothing embedded on battery

        battery(40, plugged=True)
        with d.client() as c:
            step_until(c, gate, lambda: c.job(int(job))["scanned"] >= 500, "500 messages embedded")
        assert 500 <= int(status(job)[1]) < 5000
        d.proc.send_signal(signal.SIGKILL)  # midway, as Android's low-memory killer would
        d.proc.wait()
        d = DaemonProcess(*args, env=env).wait_ready()
        done = until(job, lambda s: s[0] == "done")
        assert done[1] == "5574"
        with sqlite3.connect(root / "index.db") as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM items WHERE collection = 'sms' ORDER BY id")]
        assert ids == list(range(1, 5575))  # every message once: nothing lost, nothing twice

        texts = load_sms()
        for n in (1, 1396, 4743):
            hit = java(cp, "org.pocketembed.PhoneMain", "search", endpoint, "sms", texts[n - 1], "3", token=token)
            assert hit.returncode == 0, hit.stderr.decode()
            first = hit.stdout.decode().splitlines()[0].split("\t", 2)
            assert first[2] == texts[n - 1]  # the message itself (or an identical one) comes first
    finally:
        gate.release()  # were the test to fail with the first daemon's decodes held
        assert d.stop() == 0
        gate.close()
