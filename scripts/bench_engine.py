"""Engine throughput on the 5,574 SMS, with sentence-transformers as the peer.

Prints one table, every row measured in this run. Configurations are run
round-robin (`--rounds` passes over the corpus each) so machine noise hits them
alike, and the table quotes the median round. The peer is sentence-transformers
fp32 on torch CPU with its own length sorting, batch 32, 2 torch threads.

    python scripts/bench_engine.py [--rounds 3] [--limit N] [--no-peer]

Needs the prepared models (pocketembed models prepare) and, for the peer, the
`reference` extra (sentence-transformers).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

from pocketembed.sms import load_sms

from pocketembed.daemon.models import open_engine  # noqa: E402


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="passes over the corpus per configuration")
    ap.add_argument("--limit", type=int, help="use only the first N messages")
    ap.add_argument("--no-peer", action="store_true", help="skip sentence-transformers")
    ap.add_argument("--latency-samples", type=int, default=300)
    args = ap.parse_args()

    texts = load_sms()[: args.limit] if args.limit else load_sms()
    n = len(texts)
    _, q8 = open_engine("all-minilm-l6-v2:q8_0")
    _, q4 = open_engine("all-minilm-l6-v2:q4_0")
    _, q8_1ctx = open_engine("all-minilm-l6-v2:q8_0", contexts=1)
    configs: dict[str, Callable[[], object]] = {
        "pocketembed q8_0 batched": lambda: q8.embed(texts, truncate=True),
        "pocketembed q4_0 batched": lambda: q4.embed(texts, truncate=True),
        "pocketembed q8_0 batched, 1 context": lambda: q8_1ctx.embed(texts, truncate=True),
        "pocketembed q8_0 one text per decode": lambda: [q8.embed([t], truncate=True) for t in texts],
    }
    if not args.no_peer:
        import torch
        from sentence_transformers import SentenceTransformer

        from pocketembed.gguf_models.catalog import get
        from pocketembed.gguf_models.prepare import source_model_dir

        torch.set_num_threads(2)
        st = SentenceTransformer(str(source_model_dir(get(None).source, progress=lambda m: None)), device="cpu")
        st.encode(texts[:64], batch_size=32)
        configs["sentence-transformers fp32 (torch, batch 32, 2 threads)"] = lambda: st.encode(texts, batch_size=32)

    for e in (q8, q4, q8_1ctx):
        e.embed(texts[:64], truncate=True)  # warm-up: first-touch of weights, graph allocation
    seconds: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(args.rounds):
        for name, fn in configs.items():
            seconds[name].append(timed(fn))
            print(f"  round {r + 1}/{args.rounds}: {name}: {n / seconds[name][-1]:.1f} texts/s", file=sys.stderr, flush=True)

    lat = []
    for t in texts[: args.latency_samples]:
        lat.append(timed(lambda: q8.embed([t], truncate=True)) * 1000)

    rate = {k: n / statistics.median(v) for k, v in seconds.items()}
    peer = rate.get("sentence-transformers fp32 (torch, batch 32, 2 threads)")
    print(f"\n{n} SMS, median of {args.rounds} rounds, {q8.threads} threads, batch {q8.batch_tokens} tokens / {q8.max_seqs} texts")
    print(f"{'configuration':58s} {'texts/s':>9s} {'vs peer':>8s}")
    for name, r in rate.items():
        ratio = f"{r / peer:.2f}x" if peer else "-"
        print(f"{name:58s} {r:9.1f} {ratio:>8s}")
    print(f"\nsingle-text latency, q8_0, median of {len(lat)}: {statistics.median(lat):.2f} ms (p90 {sorted(lat)[int(len(lat) * 0.9)]:.2f} ms)")
    batched, single = rate["pocketembed q8_0 batched"], rate["pocketembed q8_0 one text per decode"]
    print(f"batched / one-at-a-time (q8_0): {batched / single:.2f}x")
    if peer:
        print(f"goal q8_0 batched >= 1.0x sentence-transformers: {batched / peer:.2f}x -> {'met' if batched >= peer else 'NOT met'}")


if __name__ == "__main__":
    main()
