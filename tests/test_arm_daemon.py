"""The whole daemon on aarch64: `pocketembed serve` under qemu-aarch64, driven by the Java client as a phone's SMS app.

Everything the daemon loads is aarch64 (scripts/arm_daemon.py stages it in the arm64
root of `scripts/arm_verify.sh --build-only`): CPython 3.11, pyzmq, msgpack, numpy,
msgspec, psutil, SQLite, the store's C Hamming scan and llama.cpp built for
armv8.2-a+dotprod. From this machine, the Java client (android/java) with the app's
token hands a few hundred SMS over with index.enqueue on battery (nothing is embedded,
the job says why), the battery source switches to charging, the job drains, the app's
searches find the texts, and models.unload is refused to the app and done by the
owner's tool. Emulation is 30-100x slower than native, so every wait is on the
daemon's state with a generous deadline, never on the clock.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import fresh_home
from daemon_proc import DaemonProcess, write_battery
from pocketembed.sms import load_sms
from test_java import JARS, compile_java, free_port

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("arm_daemon", REPO / "scripts" / "arm_daemon.py")
arm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(arm)

MESSAGES = 200
"""SMS the app hands over: a few hundred, about 3 minutes under emulation on 2 shared cores (300 took 3:42)."""
MODEL = "all-minilm-l6-v2:q8_0"
DEADLINE_S = 600
"""How long any one wait may take before the daemon counts as wedged: far beyond emulation's speed."""


def _missing() -> str | None:
    if why := arm.missing(arm.WORK):
        return why
    if not (shutil.which("java") and shutil.which("javac")):
        return "java/javac not installed: the Java client cannot be compiled here"
    if lacking := [j for j in JARS if not Path(j).exists()]:
        return f"no Java libraries {lacking} (Debian: libjeromq-java libmsgpack-java)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def emulated(*args: str, home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """A pocketembed command run by the aarch64 interpreter under qemu."""
    env = arm.environment(arm.WORK, base={**os.environ, "POCKETEMBED_HOME": str(home)})
    return subprocess.run(arm.command(*args), capture_output=True, text=True, env=env, timeout=timeout)


class Lines:
    """A child's stdout, line by line, awaited with a deadline (a reader thread: readline alone cannot time out)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.q.put(line.rstrip("\n"))
        self.q.put(None)

    def next(self, kind: str, timeout: float = DEADLINE_S) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no '{kind}' line from the Java flow within {timeout} s") from None
            if line is None:
                raise AssertionError(f"the Java flow ended before '{kind}': {self.proc.wait()} "
                                     f"{self.proc.stderr.read()[-3000:]}")
            fields = line.split("\t")
            if fields[0] == kind:
                return fields[1:]
            raise AssertionError(f"expected '{kind}' from the Java flow, got {line!r}")


def mapped_files(pid: int) -> set[str]:
    """The files the (qemu) process has mapped: the guest's libraries are mmapped from their host paths."""
    return {line.split(maxsplit=5)[5].strip() for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if len(line.split(maxsplit=5)) == 6}


def test_the_phone_flow_against_the_daemon_running_on_aarch64(home, tmp_path, record_property):
    started = time.monotonic()
    at: dict[str, float] = {}  # seconds since the start at each step, printed even when a step fails

    def mark(step: str) -> None:
        at[step] = round(time.monotonic() - started, 1)

    root = fresh_home(home, tmp_path / "home")
    # The owner makes the tokens with the aarch64 CLI, on the daemon's data directory.
    tokens = {}
    for name, perms in (("smsapp", ("index:sms", "search:sms")), ("tools", ("admin",))):
        r = emulated("clients", "add", name, *[a for p in perms for a in ("--allow", p)], home=root)
        assert r.returncode == 0, r.stderr[-3000:]
        tokens[name] = r.stdout.strip().splitlines()[-1]
    mark("tokens")

    sensors = tmp_path / "battery.json"

    def battery(percent: int, plugged: bool) -> None:
        write_battery(sensors, percent, plugged)

    battery(40, plugged=False)
    port = free_port()
    env = {**arm.environment(arm.WORK, base={}), "POCKETEMBED_POWER_POLL_S": "0.2",
           "POCKETEMBED_POWER_SETTLE_S": "0.2", "POCKETEMBED_JOB_CHUNK_ROWS": "64"}
    d = DaemonProcess(root, tmp_path / "pe.sock", "--model", MODEL, "--tcp", f"127.0.0.1:{port}",
                      "--power-source", f"file:{sensors}", env=env, python=arm.interpreter(arm.WORK))
    cp = compile_java(tmp_path)  # on this machine's other core while the emulated daemon starts
    flow = None
    try:
        d.wait_ready(timeout=DEADLINE_S)
        mark("daemon_ready")
        with d.client(timeout=120) as c:
            stats = c.stats()
        kernels = stats["models"][MODEL]["kernels"]
        assert {"NEON", "DOTPROD"} <= set(kernels["cpu"]), kernels  # llama.cpp's ARM kernels, reported by the daemon
        assert "AVX2" not in kernels["cpu"] and "MATMUL_INT8" not in kernels["cpu"], kernels  # the dotprod build

        texts = load_sms()[:MESSAGES]
        assert not any("\n" in t for t in texts)
        inbox = tmp_path / "inbox.tsv"
        inbox.write_text("label\ttext\n" + "".join(f"ham\t{t}\n" for t in texts), encoding="utf-8")
        wanted = (1, MESSAGES // 2, MESSAGES)
        flow_started = time.monotonic()
        flow = subprocess.Popen(["java", "-cp", cp, "PhoneFlow", f"tcp://127.0.0.1:{port}", tokens["smsapp"],
                                 tokens["tools"], str(inbox), MODEL, str(DEADLINE_S), *map(str, wanted)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = Lines(flow)
        job, enqueued, _ = lines.next("enqueued")
        assert int(enqueued) == MESSAGES
        mark("enqueued")
        state, scanned, total, embedded, reason = lines.next("waiting")
        mark("waiting_on_battery")
        assert (scanned, total, embedded) == ("0", str(MESSAGES), "0") and "on battery at 40%" in reason, reason
        with d.client(timeout=120) as c:
            assert c.job(int(job))["scanned"] == 0 and not c.stats()["power"]["allowed"]  # still nothing embedded

        battery(40, plugged=True)
        charged = time.monotonic()
        flow.stdin.write("charging\n")
        flow.stdin.flush()
        scanned, embedded, _ = lines.next("done")
        drain_s = time.monotonic() - charged
        mark("drained")
        assert (scanned, embedded) == (str(MESSAGES), str(MESSAGES))
        for n in wanted:
            hit_id, first, score, text = lines.next("hit")
            assert int(hit_id) == n and text == texts[n - 1], (n, first, text)  # the message itself (or its twin) first
            assert float(score) > 0.9  # hybrid: its own cosine (~1) plus the lexical side's share
        assert lines.next("unload_refused") == ["forbidden"]  # the app's token may not unload models
        model, loaded = lines.next("unloaded")
        assert model == MODEL and MODEL not in loaded.split(",")
        mark("searched_and_unloaded")
        lines.next("flow_ms")
        assert flow.wait(timeout=60) == 0, flow.stderr.read()[-3000:]
        flow_s = time.monotonic() - flow_started

        # The daemon process itself ran the aarch64 code: its (emulated) mappings.
        maps = mapped_files(d.proc.pid)
        site, pkg, lib = arm.WORK / "daemon-site", arm.WORK / "daemon-pkg", arm.WORK / "lib-dotprod"
        assert any(m.startswith(str(pkg)) and "_hamming" in m and m.endswith(arm.EXT_SUFFIX) for m in maps), \
            "the store's C scan is not loaded: the daemon fell back to numpy"
        for native in ("numpy/_core/_multiarray_umath", "zmq/backend/cython", "msgspec/_core", "psutil/_psutil_linux"):
            assert any(m.startswith(str(site)) and native in m for m in maps), (native, sorted(maps))
        for native in ("libllama.so", "libggml-base.so", "libggml-cpu.so"):
            assert any(m.startswith(f"{lib}/{native}") for m in maps), (native, sorted(maps))
        assert not any("x86_64-linux-gnu.so" in m for m in maps)
        with d.client(timeout=120) as c:
            after = c.stats()
        assert after["loaded_models"] == []
        decoded = after["scheduler"]["decoded_texts"]  # the SMS, the model's 256 calibration texts, the 3 queries
        cpu = psutil.Process(d.proc.pid).cpu_times()
        daemon_cpu_s = cpu.user + cpu.system  # what the emulation cost, whatever else this machine ran meanwhile
    finally:
        if flow is not None and flow.poll() is None:
            flow.kill()
        code = d.stop(timeout=120)
        mark("stopped")
        print(f"\naarch64 daemon under qemu, seconds since the test's start: {at}")
    assert code == 0, d.log()[-3000:]
    figures = {"messages": MESSAGES, "texts_embedded": decoded, "steps_s": at, "drain_s": round(drain_s, 1),
               "java_flow_s": round(flow_s, 1), "daemon_cpu_s": round(daemon_cpu_s, 1),
               "test_s": round(time.monotonic() - started, 1), "llama_cpu": kernels["cpu"],
               "qemu_cpu": env["QEMU_CPU"], "load_average": os.getloadavg()[0]}
    for k, v in figures.items():
        record_property(k, v)
    (arm.WORK / "daemon-flow.json").write_text(json.dumps(figures, indent=1))
    print(f"\naarch64 daemon under qemu: {figures}")


def test_the_aarch64_interpreter_loads_the_staged_natives_and_the_c_scan_agrees_with_numpy():
    """scripts/arm_daemon.py check: what the daemon's interpreter imports, and the C scan's distances under emulation."""
    got = arm.check(arm.WORK)
    assert got["machine"] == "aarch64" and got["python"].startswith("3.11.")
    assert got["hamming"] is not None and got["hamming"].endswith(arm.EXT_SUFFIX), got  # not the numpy fallback
    assert got["hamming_agrees"]
    site = str(arm.WORK / "daemon-site")
    assert all(path.startswith(site) for path in got["modules"].values()), got["modules"]
    assert {"NEON", "DOTPROD"} <= set(got["features"]) and "MATMUL_INT8" not in got["features"], got["features"]
