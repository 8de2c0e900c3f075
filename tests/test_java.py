"""The Android-side Java client (JeroMQ + msgpack-java) against a live daemon."""

import os
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import fresh_home, run_cli
from daemon_proc import DaemonProcess

REPO = Path(__file__).resolve().parents[1]
JARS = ["/usr/share/java/jeromq.jar", "/usr/share/java/msgpack-core.jar"]
TEXTS = ["Ok lar... Joking wif u oni...", "Free entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005",
         "Even my brother is not like to speak with me. They treat me like aids patent.", "émoji 🎉 ünïcode"]

pytestmark = pytest.mark.skipif(not (shutil.which("java") and shutil.which("javac")),
                                reason="java/javac not installed: the Java client cannot be compiled here")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_java_client_with_a_token_embeds_and_searches_and_without_one_is_refused(home, tmp_path):
    missing = [j for j in JARS if not Path(j).exists()]
    assert not missing, f"install Debian's libjeromq-java and libmsgpack-java (scripts/setup.sh does): {missing}"
    classes = tmp_path / "classes"
    cp = ":".join(JARS)
    sources = sorted(str(p) for p in (REPO / "android" / "java").rglob("*.java"))
    subprocess.run(["javac", "-d", str(classes), "-cp", cp, *sources], check=True, capture_output=True)

    root = fresh_home(home)
    made = run_cli("clients", "add", "smsapp", "--allow", "embed", "--allow", "search:sms", home=root)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().splitlines()[-1]
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    d = DaemonProcess(root, tmp_path / "s" / "pe.sock", "--tcp", f"127.0.0.1:{port}").wait_ready()

    def java(main: str, *args: str, stdin: bytes = b"", with_token: bool = True) -> subprocess.CompletedProcess:
        env = dict(os.environ, POCKETEMBED_TOKEN=token) if with_token else {k: v for k, v in os.environ.items()
                                                                           if k != "POCKETEMBED_TOKEN"}
        return subprocess.run(["java", "-cp", f"{classes}:{cp}", f"org.pocketembed.{main}", endpoint, *args],
                              input=stdin, capture_output=True, timeout=120, env=env)

    try:
        embedded = java("EmbedMain", stdin="\n".join(TEXTS).encode())
        assert embedded.returncode == 0, embedded.stderr.decode()
        from_java = np.frombuffer(embedded.stdout, dtype="<f4").reshape(len(TEXTS), 384)
        with d.client() as c:  # the owner, on the Unix socket
            from_python = c.embed(TEXTS)
            c.index_add("sms", [{"id": i + 1, "text": t} for i, t in enumerate(TEXTS)], store_text=True)
        assert np.array_equal(from_java, from_python)  # the same request on an idle daemon: the same bits

        found = java("SearchMain", "sms", "free tickets to the cup final", "2")
        assert found.returncode == 0, found.stderr.decode()
        first = found.stdout.decode().splitlines()[0].split("\t")
        assert first[0] == "2" and first[2] == TEXTS[1] and -1 <= float(first[1]) <= 1

        for main, args, stdin in (("EmbedMain", (), b"hello"), ("SearchMain", ("sms", "hello", "1"), b"")):
            refused = java(main, *args, stdin=stdin, with_token=False)
            assert refused.returncode == 1 and b"error[unauthorized]" in refused.stderr, refused.stderr
        other = java("SearchMain", "work", "hello", "1")
        assert other.returncode == 1 and b"error[forbidden]" in other.stderr
        bad = java("EmbedMain", "nope:q1", stdin=b"hello")
        assert bad.returncode == 1 and b"error[unknown_model]" in bad.stderr
    finally:
        assert d.stop() == 0
