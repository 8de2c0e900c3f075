"""The Android-side Java client (JeroMQ + msgpack-java) against a live daemon."""

import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import fresh_home
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


def test_java_client_gets_bit_identical_vectors(home, tmp_path):
    missing = [j for j in JARS if not Path(j).exists()]
    assert not missing, f"install Debian's libjeromq-java and libmsgpack-java (scripts/setup.sh does): {missing}"
    classes = tmp_path / "classes"
    cp = ":".join(JARS)
    sources = sorted(str(p) for p in (REPO / "android" / "java").rglob("*.java"))
    subprocess.run(["javac", "-d", str(classes), "-cp", cp, *sources], check=True, capture_output=True)

    port = free_port()
    d = DaemonProcess(fresh_home(home), tmp_path / "s" / "pe.sock", "--tcp", f"127.0.0.1:{port}").wait_ready()
    try:
        java = subprocess.run(["java", "-cp", f"{classes}:{cp}", "org.pocketembed.EmbedMain", f"tcp://127.0.0.1:{port}"],
                              input="\n".join(TEXTS).encode(), capture_output=True, timeout=120)
        assert java.returncode == 0, java.stderr.decode()
        from_java = np.frombuffer(java.stdout, dtype="<f4").reshape(len(TEXTS), 384)
        with d.client() as c:
            from_python = c.embed(TEXTS)
        assert np.array_equal(from_java, from_python)

        bad = subprocess.run(["java", "-cp", f"{classes}:{cp}", "org.pocketembed.EmbedMain", f"tcp://127.0.0.1:{port}", "nope:q1"],
                             input=b"hello", capture_output=True, timeout=120)
        assert bad.returncode == 1 and b"error[unknown_model]" in bad.stderr
    finally:
        assert d.stop() == 0
