"""Scheduler benchmark: many clients at once, and interactive latency under bulk load.

In one run, on the 5,574 SMS with the q8_0 model and a daemon started here:

1. Throughput. 8 clients, each sending requests of 1-8 texts (sizes drawn at
   random, seeded) one after another until the corpus is done, vs this
   process's engine embedding the whole corpus in one call (its tuned batch:
   512 tokens / 32 texts per decode over 2 contexts), alternating, median of
   --rounds. Goal: daemon >= 0.9x.
2. Latency. One interactive client embeds single SMS (50 ms apart, like a
   user typing queries) with the daemon idle, then again while a background
   client pushes the whole corpus with ``priority="background"``.
   Goal: p99 under load <= 2x idle p99.

    python scripts/bench_scheduler.py [--latency-samples 300]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ipc import start_daemon  # noqa: E402
from pocketembed.sms import load_sms  # noqa: E402

from pocketembed.daemon.models import open_engine  # noqa: E402
from pocketembed.ipc import AsyncClient, Client  # noqa: E402


def in_process(engine, texts: list[str]) -> float:
    t = time.perf_counter()
    engine.embed(texts, truncate=True)
    return len(texts) / (time.perf_counter() - t)


async def daemon_throughput(endpoint: str, texts: list[str], clients: int, seed: int) -> tuple[float, dict]:
    rng = np.random.default_rng(seed)
    chunks, at = [], 0
    while at < len(texts):
        n = int(rng.integers(1, 9))
        chunks.append(texts[at:at + n])
        at += n
    queue: asyncio.Queue[list[str]] = asyncio.Queue()
    for c in chunks:
        queue.put_nowait(c)

    async def client_loop(c: AsyncClient) -> int:
        done = 0
        while not queue.empty():
            batch = queue.get_nowait()
            await c.embed(batch, truncate=True)
            done += len(batch)
        return done

    conns = [AsyncClient(endpoint, timeout=600) for _ in range(clients)]
    try:
        await conns[0].embed(texts[:50], truncate=True)  # warm-up
        t = time.perf_counter()
        counts = await asyncio.gather(*(client_loop(c) for c in conns))
        elapsed = time.perf_counter() - t
        stats = await conns[0].stats()
    finally:
        for c in conns:
            await c.close()
    assert sum(counts) == len(texts)
    return len(texts) / elapsed, stats


def interactive_latency(endpoint: str, picks: list[str], gap: float) -> list[float]:
    out = []
    with Client(endpoint, timeout=120) as c:
        for t in picks:
            a = time.perf_counter()
            c.embed([t], truncate=True)
            out.append((time.perf_counter() - a) * 1000)
            time.sleep(gap)
    return out


async def latency_under_load(endpoint: str, texts: list[str], picks: list[str], gap: float) -> tuple[list[float], float, int]:
    """Interactive samples while a background client streams the corpus (4 requests of 64 in flight)."""
    chunks = [texts[i:i + 64] for i in range(0, len(texts), 64)]
    done_texts = 0
    async with AsyncClient(endpoint, timeout=900) as bulk:
        sem = asyncio.Semaphore(4)

        async def push(batch: list[str]) -> None:
            nonlocal done_texts
            async with sem:
                await bulk.embed(batch, truncate=True, priority="background")
                done_texts += len(batch)

        t = time.perf_counter()
        pushing = asyncio.gather(*(push(b) for b in chunks))
        await asyncio.sleep(1.0)  # let the background queue fill
        samples = await asyncio.to_thread(interactive_latency, endpoint, picks, gap)
        during = done_texts
        await pushing
        bg_rate = len(texts) / (time.perf_counter() - t)
    return samples, bg_rate, during


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--latency-samples", type=int, default=300)
    ap.add_argument("--gap-ms", type=float, default=50.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3, help="throughput rounds (medians are reported)")
    args = ap.parse_args()

    texts = load_sms()
    rng = np.random.default_rng(args.seed)
    picks = [texts[i] for i in rng.integers(0, len(texts), args.latency_samples)]
    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "pe.sock"
        proc: subprocess.Popen = start_daemon(sock)
        endpoint = f"ipc://{sock}"
        _, engine = open_engine(None)
        try:
            engine.embed(texts[:200], truncate=True)  # warm-up
            local, remote = [], []
            for r in range(args.rounds):  # alternate which goes first: the machine's noise hits both
                for way in ((0, 1) if r % 2 else (1, 0)):
                    if way == 0:
                        local.append(in_process(engine, texts))
                    else:
                        rate, stats = asyncio.run(daemon_throughput(endpoint, texts, args.clients, args.seed + r))
                        remote.append(rate)
            engine.close()
            local_rate, daemon_rate = float(np.median(local)), float(np.median(remote))
            interactive_latency(endpoint, picks[:30], 0)  # warm-up
            idle = interactive_latency(endpoint, picks, args.gap_ms / 1000)
            loaded, bg_rate, bg_during = asyncio.run(latency_under_load(endpoint, texts, picks, args.gap_ms / 1000))
        finally:
            proc.terminate()
            proc.wait(60)

    sched = stats["scheduler"]
    print(f"{len(texts)} SMS, q8_0, {args.clients} clients x 1-8 texts/request, median of {args.rounds} rounds")
    print(f"  in-process rounds: {', '.join(f'{x:.1f}' for x in local)}; daemon rounds: {', '.join(f'{x:.1f}' for x in remote)}")
    print(f"{'throughput':52s} {'texts/s':>9s} {'vs peer':>8s}")
    print(f"{'in-process engine, whole corpus, tuned batch':52s} {local_rate:9.1f} {1.0:7.2f}x")
    ratio = daemon_rate / local_rate
    print(f"{'daemon, 8 concurrent clients':52s} {daemon_rate:9.1f} {ratio:7.2f}x")
    print(f"  daemon stats after the last round: {sched['decodes']} decodes, texts per decode {sched['batch_texts']}")
    print(f"\n{'interactive single-SMS latency':52s} {'p50 ms':>9s} {'p99 ms':>8s}")
    print(f"{'daemon idle':52s} {pct(idle, 50):9.2f} {pct(idle, 99):8.2f}")
    print(f"{'while a background client pushes the corpus':52s} {pct(loaded, 50):9.2f} {pct(loaded, 99):8.2f}")
    print(f"  background: {bg_rate:.1f} texts/s overall, {bg_during} texts done during the interactive samples")
    lat_ratio = pct(loaded, 99) / pct(idle, 99)
    print(f"\ngoal daemon >= 0.9x in-process: {ratio:.2f}x {'met' if ratio >= 0.9 else 'NOT met'}")
    print(f"goal p99 under load <= 2x idle p99: {lat_ratio:.2f}x {'met' if lat_ratio <= 2 else 'NOT met'}")


if __name__ == "__main__":
    main()
