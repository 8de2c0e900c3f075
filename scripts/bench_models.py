"""Load/unload cycles in the running daemon: does memory come back, and how fast is a load?

Starts `pocketembed serve` with no model loaded, then 50 times: `models.load`
of the q8_0 model, one embed of 32 SMS (so the compute buffers are really
allocated), `models.unload`, and the daemon's RSS from `stats`. Prints RSS
after each unload, the drift between the first and the last unload (goal:
within 10%), and the load-time median next to the same load done in this
process (the peer: the engine without the daemon around it).

    python scripts/bench_models.py [--cycles 50] [--model all-minilm-l6-v2:q8_0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ipc import start_daemon  # noqa: E402
from pocketembed.sms import load_sms  # noqa: E402

from pocketembed.daemon.models import open_engine  # noqa: E402
from pocketembed.ipc import Client  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=50)
    ap.add_argument("--model", default="all-minilm-l6-v2:q8_0")
    args = ap.parse_args()
    texts = load_sms()[:32]

    rss, load_ms, wall_ms = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "pe.sock"
        # keep_alive -1: only this script's unloads free the model.
        proc = start_daemon(sock, "--model", "none", "--keep-alive", "-1")
        try:
            with Client(f"ipc://{sock}", timeout=120) as c:
                for i in range(args.cycles):
                    t = time.perf_counter()
                    res = c.load(args.model)
                    wall_ms.append((time.perf_counter() - t) * 1000)
                    load_ms.append(res["load_ms"])
                    c.embed(texts, model=args.model)
                    c.unload(args.model)
                    rss.append(c.stats()["rss_bytes"] / 2**20)
                    print(f"unload {i + 1:3d}: RSS {rss[-1]:7.1f} MiB   (load {load_ms[-1]:6.1f} ms)", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)

    local = []
    for _ in range(10):
        t = time.perf_counter()
        _, engine = open_engine(args.model)
        local.append((time.perf_counter() - t) * 1000)
        engine.close()

    drift = (rss[-1] - rss[0]) / rss[0]
    print(f"\n{args.model}, {args.cycles} load/embed/unload cycles")
    print(f"{'measurement':48s} {'value':>10s}")
    print(f"{'RSS after the 1st unload (MiB)':48s} {rss[0]:10.1f}")
    print(f"{'RSS after the last unload (MiB)':48s} {rss[-1]:10.1f}")
    print(f"{'drift, last vs first':48s} {drift * 100:+9.1f}%")
    print(f"{'load, daemon (models.load, median ms)':48s} {statistics.median(load_ms):10.1f}")
    print(f"{'load, client round trip (median ms)':48s} {statistics.median(wall_ms):10.1f}")
    print(f"{'load, in-process open_engine (peer, median ms)':48s} {statistics.median(local):10.1f}")
    print(f"\ngoal RSS drift within 10%: {'met' if abs(drift) <= 0.10 else 'NOT met'}")


if __name__ == "__main__":
    main()
