"""Cost of request decoding and validation: this tree's daemon vs a baseline commit's, in one run.

Both daemons run as separate processes with the same model, each on its own
socket and data directory; the baseline is the tree of ``--baseline REV``
(``git archive``), laid out as the installed package. Rounds alternate between
the two; medians are printed. Measured per daemon:

* ping, one request at a time (round-trip bound) and 64 in flight on one
  DEALER (the I/O thread's decode + route cost);
* single-text embed (one short SMS), one at a time and 8 in flight;
* in this process: microseconds for ``ops.decode`` of a ping and of an embed.

    python scripts/bench_protocol.py --baseline f39c9ae
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import zmq

from pocketembed import paths
from pocketembed.ipc import ops
from pocketembed.ipc import protocol as P

REPO = Path(__file__).resolve().parents[1]
SMS = "Ok lar... Joking wif u oni... see you at 7 for dinner?"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def baseline_tree(rev: str, dest: Path) -> Path:
    """The baseline's files arranged as installed: pocketembed/{daemon,ipc,gguf_models}."""
    data = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True).stdout
    src = dest / "src"
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(src, filter="data")
    pkg = dest / "pkg" / "pocketembed"
    pkg.parent.mkdir()
    (src / "pocketembed").rename(pkg)
    for sub in ("daemon", "ipc", "gguf_models"):
        (src / sub).rename(pkg / sub)
    return dest / "pkg"


def start(pythonpath: Path | None, home: Path, sock: Path) -> subprocess.Popen:
    env = dict(os.environ, POCKETEMBED_HOME=str(home))
    env.pop("POCKETEMBED_SOCKET", None)
    cwd = None
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
        cwd = str(pythonpath)
    proc = subprocess.Popen([sys.executable, "-m", "pocketembed.cli", "serve", "--socket", str(sock), "--model",
                             "all-minilm-l6-v2:q8_0"], env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    s = dealer(f"ipc://{sock}")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        s.send(P.request(0, "ping"))
        if s.poll(200):
            s.recv()
            s.close()
            return proc
    raise RuntimeError("daemon did not start")


def dealer(endpoint: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def rate(endpoint: str, op: str, args: dict, n: int, inflight: int) -> float:
    """Requests per second with ``inflight`` requests outstanding on one DEALER."""
    s = dealer(endpoint)
    frames = [P.request(i, op, args) for i in range(n)]
    t = time.perf_counter()
    sent = got = 0
    while got < n:
        while sent < n and sent - got < inflight:
            s.send(frames[sent])
            sent += 1
        reply = P.unpack(s.recv())
        assert reply["ok"], reply
        got += 1
    seconds = time.perf_counter() - t
    s.close()
    return n / seconds


def decode_us(frame: bytes, n: int = 20_000) -> float:
    t = time.perf_counter()
    for _ in range(n):
        ops.decode(frame)
    return (time.perf_counter() - t) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="git revision before the schema change")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    embed_args = {"texts": [SMS]}
    cases = [("ping, 1 in flight", "ping", {}, 2000, 1), ("ping, 64 in flight", "ping", {}, 6000, 64),
             ("embed 1 SMS, 1 in flight", "embed", embed_args, 300, 1),
             ("embed 1 SMS, 8 in flight", "embed", embed_args, 600, 8)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = baseline_tree(args.baseline, tmp / "base")
        procs, endpoints = {}, {}
        for name, pythonpath in (("baseline", base), ("this tree", None)):
            home = tmp / f"home-{name.replace(' ', '-')}"
            home.mkdir()
            (home / "models").symlink_to(paths.models_dir(paths.home()))
            sock = tmp / f"{name.replace(' ', '-')}.sock"
            procs[name] = start(pythonpath, home, sock)
            endpoints[name] = f"ipc://{sock}"
        try:
            results: dict[tuple[str, str], list[float]] = {}
            for r in range(args.rounds):
                for name in (("baseline", "this tree") if r % 2 == 0 else ("this tree", "baseline")):
                    for label, op, a, n, inflight in cases:
                        results.setdefault((name, label), []).append(rate(endpoints[name], op, a, n, inflight))
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        finally:
            for proc in procs.values():
                proc.terminate()
                proc.wait(30)
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); baseline {args.baseline}; "
          f"median of {args.rounds} alternating rounds")
    print(f"{'requests/s':<28}{'baseline':>12}{'this tree':>12}{'ratio':>8}")
    for label, *_ in cases:
        b = statistics.median(results[("baseline", label)])
        t = statistics.median(results[("this tree", label)])
        print(f"{label:<28}{b:>12,.0f}{t:>12,.0f}{t / b:>8.2f}")
    ping = P.request(1, "ping")
    embed = P.request(1, "embed", {"texts": [SMS], "dtype": "float32", "timeout_ms": 30000})
    print(f"ops.decode in-process: ping {decode_us(ping):.1f} µs, embed of 1 SMS {decode_us(embed):.1f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
