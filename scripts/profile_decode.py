"""A steady load of single-SMS decodes in-process, to profile where a decode's time goes.

Decodes one SMS of about ``--tokens`` tokens at a time (the daemon's latency path:
context 0, ``--threads`` threads) for ``--seconds``, optionally sleeping ``--gap``
seconds before each (as a daemon idles between requests), then prints p50/p90.
Run it under perf for the profile:

    perf record -F 2000 -e cpu-clock -g -o /tmp/decode.perf -- \\
        .venv/bin/python scripts/profile_decode.py --tokens 20 --threads 2
    perf report -i /tmp/decode.perf --no-children --sort dso,symbol

Point ``LLAMA_CPP_LIB_PATH`` at another build's libraries to compare builds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pocketembed.daemon.models import open_engine
from pocketembed.sms import load_sms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="all-minilm-l6-v2:q8_0")
    ap.add_argument("--tokens", type=int, default=20, help="SMS of this many tokens (+-3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--gap", type=float, default=0.0, help="idle seconds before each decode")
    args = ap.parse_args()

    _, engine = open_engine(args.model)
    tokens = [engine.tokenize(t, truncate=True) for t in load_sms()]
    picks = [t for t in tokens if abs(len(t) - args.tokens) <= 3][:100]
    if not picks:
        raise SystemExit(f"no SMS of about {args.tokens} tokens")
    for t in picks[:10]:
        engine.encode_on(0, [t], args.threads)
    took = []
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        if args.gap:
            time.sleep(args.gap)
        t = picks[len(took) % len(picks)]
        a = time.perf_counter()
        engine.encode_on(0, [t], args.threads)
        took.append((time.perf_counter() - a) * 1000)
    print(f"{args.model}, ~{args.tokens} tokens, {args.threads} threads, gap {args.gap}s: {len(took)} decodes, "
          f"p50 {np.percentile(took, 50):.2f} ms, p90 {np.percentile(took, 90):.2f} ms")
    engine.close()


if __name__ == "__main__":
    main()
