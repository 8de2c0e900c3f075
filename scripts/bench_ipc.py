"""IPC overhead: ping round-trip and single-SMS embed latency, daemon vs in-process.

Starts `pocketembed serve` on a temporary socket with the q8_0 model, then in
one run: ping round-trips on the idle daemon, and then, alternating text by
text (so machine noise hits both alike), an `embed` of one SMS through the
daemon and the same embed in this process with the same engine settings. Prints p50/p99 of each and the daemon's extra
cost at p50. Goal: daemon p50 <= in-process p50 + 0.3 ms.

    python scripts/bench_ipc.py [--samples 1000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sms import load_sms  # noqa: E402

from pocketembed.daemon.models import open_engine  # noqa: E402
from pocketembed.ipc import Client, DaemonError  # noqa: E402


def start_daemon(sock: Path, *extra: str) -> subprocess.Popen:
    """`pocketembed serve` on ``sock`` (plus ``extra`` flags), once it answers a ping."""
    proc = subprocess.Popen([sys.executable, "-m", "pocketembed.cli", "serve", "--socket", str(sock), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with Client(f"ipc://{sock}", timeout=1) as c:
                c.ping()
            return proc
        except DaemonError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("daemon did not start")


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1000)
    args = ap.parse_args()

    texts = load_sms()
    rng = np.random.default_rng(0)
    picks = [texts[i] for i in rng.integers(0, len(texts), args.samples)]
    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "pe.sock"
        proc = start_daemon(sock)
        try:
            _, engine = open_engine(None)
            client = Client(f"ipc://{sock}")
            for t in picks[:50]:  # warm-up both paths
                client.embed([t], truncate=True)
                engine.embed([t], truncate=True)
            ping, daemon, local = [], [], []
            for _ in range(args.samples):  # transport alone, daemon idle
                a = time.perf_counter(); client.ping(); ping.append((time.perf_counter() - a) * 1000)
            for i, t in enumerate(picks):  # the same text both ways; which goes first alternates
                for way in ((0, 1) if i % 2 else (1, 0)):
                    a = time.perf_counter()
                    (client if way == 0 else engine).embed([t], truncate=True)
                    (daemon if way == 0 else local).append((time.perf_counter() - a) * 1000)
            client.close()
            engine.close()
        finally:
            proc.terminate()
            proc.wait(30)

    print(f"{args.samples} random SMS, q8_0, interleaved, pid {os.getpid()}")
    print(f"{'measurement':44s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for name, xs in (("ping round-trip (idle daemon)", ping), ("embed 1 SMS through the daemon", daemon),
                     ("embed 1 SMS in-process (same engine)", local)):
        print(f"{name:44s} {pct(xs, 50):8.3f} {pct(xs, 99):8.3f}")
    extra = pct(daemon, 50) - pct(local, 50)
    print(f"\ndaemon p50 - in-process p50 = {extra:+.3f} ms (goal <= +0.3 ms): {'met' if extra <= 0.3 else 'NOT met'}")


if __name__ == "__main__":
    main()
