"""Recall@10 of the store's quantized search against exact float32 search, on the SMS corpus.

    python scripts/eval_search.py [--queries 500] [--model all-minilm-l6-v2:q8_0] [--no-daemon]

Part 1, through the daemon (a real `pocketembed serve` per row, a fresh data
directory each): the collection is written as an app writes it, 1, 8 or 500
items per `index.add` request, or by an index job over a SQLite table;
recall@10 at x10 rescoring is measured once the first 1,000 SMS are in and again
with all 5,574, 100 queries each (the query itself counts as its own neighbour).
The codes must not depend on the order and batch size of the writes.

Part 2, in-process:
All 5,574 SMS are embedded (each distinct text once: the store is an embedding
cache, so duplicate messages share one vector) and written to a real store in
chunks of 128, as an index job writes them. 500 of them are queries against all
(self excluded). A result counts as correct when its exact float32 score ties or
beats the 10th exact score. Rows: the store's codes (centred, ITQ-rotated bits +
int8 ranges) with binary alone, binary + int8 rescoring at ×1…×20, int8 alone;
then the binary codes tried on the way (plain sign, centred sign), rescored the
same way, for comparison.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import asyncio
import os
import sqlite3
import subprocess
import sys

from pocketembed import paths
from pocketembed.daemon.calibration import calibration_texts, ranges_of
from pocketembed.daemon.models import open_engine
from pocketembed.daemon.quantize import Calibration, hamming, smallest, words
from pocketembed.daemon.store import Item, Store, connect, text_hash, transaction
from pocketembed.ipc import AsyncClient, Client
from pocketembed.sms import load_sms

K = 10
MULTIPLIERS = (1, 2, 4, 10, 20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--model", default="all-minilm-l6-v2:q8_0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-daemon", action="store_true", help="skip part 1 (the write patterns through the daemon)")
    args = ap.parse_args()

    texts = load_sms()
    spec, engine = open_engine(args.model)
    unique = sorted(set(texts))
    t0 = time.perf_counter()
    with engine:
        uvec = engine.embed(unique)
    pos = {t: i for i, t in enumerate(unique)}
    vec = uvec[[pos[t] for t in texts]]
    print(f"embedded {len(unique)} distinct of {len(texts)} SMS with {spec.name} in {time.perf_counter() - t0:.0f} s")
    if not args.no_daemon:
        write_patterns(texts, vec, spec.name)
    with open_engine(args.model)[1] as engine:
        model_ranges = ranges_of(engine.embed(calibration_texts()), vec.shape[1])

    with tempfile.TemporaryDirectory() as tmp:
        conn = connect(Path(tmp) / "index.db")
        store = Store(conn)
        with transaction(conn):
            store.ensure_collection(conn, "sms", spec.name, vec.shape[1])
        for s in range(0, len(texts), 128):
            with transaction(conn):
                store.put(conn, "sms", [Item(i, text_hash(texts[i]), vec[i]) for i in range(s, min(len(texts), s + 128))], model_ranges)
        info = store.info("sms")
        rng = np.random.default_rng(args.seed)
        queries = rng.choice(len(texts), args.queries, replace=False)
        exact = vec[queries] @ vec.T
        exact[np.arange(len(queries)), queries] = -np.inf
        kth = -np.partition(-exact, K - 1, axis=1)[:, K - 1]

        def recall(results: list[list[int]]) -> float:
            good = sum(int(np.sum(exact[i, r] >= kth[i] - 1e-6)) for i, r in enumerate(results))
            return good / (len(results) * K)

        def store_run(**kw) -> float:
            return recall([[h["id"] for h in store.search("sms", vec[q], k=K, exclude=[int(q)], **kw)] for q in queries])

        rows = [("store codes: binary alone", store_run(rescore=False))]
        for m in MULTIPLIERS:
            rows.append((f"store codes: binary + int8 rescoring ×{m}", store_run(rescore_multiplier=m)))
        rows.append(("store codes: int8 alone (rescore all)", store_run(rescore_multiplier=len(texts))))

        # The binary codes tried on the way, on the same int8 rescoring.
        cal = info.calibration
        i8 = cal.dequantize(cal.int8(vec))
        for name, mean in (("plain sign", np.zeros_like(cal.mean)), ("centred sign", cal.mean)):
            alt = Calibration(cal.lo, cal.hi, mean, None, cal.count)
            codes = words(alt.bits(i8))
            for m in (None, 10):
                res = []
                for q in queries:
                    d = hamming(codes, words(alt.bits(vec[q][None]))[:, 0])
                    d[q] = np.iinfo(np.uint16).max
                    cand = smallest(d, K if m is None else K * m)
                    if m is not None:
                        cand = cand[np.argsort(-(i8[cand] @ vec[q]), kind="stable")[:K]]
                    res.append(cand.tolist())
                rows.append((f"{name}: {'binary alone' if m is None else 'binary + int8 rescoring ×10'}", recall(res)))
        conn.close()

    print(f"\nrecall@{K} vs exact float32, {len(queries)} SMS queries against {len(texts)} (self excluded), "
          f"ties with the 10th exact score count")
    print(f"{'search':<48} recall@{K}")
    for name, r in rows:
        print(f"{name:<48} {r:.3f}")
    print(f"\nstore calibration: {info.calibration.count} vectors, ITQ rotation "
          f"{'yes' if info.calibration.rotation is not None else 'no'}; goals: binary+int8 ≥ 0.95 at ×≤10, int8 alone ≥ 0.99")


def write_patterns(texts: list[str], vec: np.ndarray, model: str, queries_n: int = 100) -> None:
    """Part 1: the same SMS written 1 / 8 / 500 per request and by a job; recall at 1,000 and 5,574 items."""
    rng = np.random.default_rng(5)
    sizes = (1000, len(texts))
    queries = {n: rng.choice(n, queries_n, replace=False) for n in sizes}
    rows = []
    for mode in ("1 per request", "8 per request", "500 per request", "index job"):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            home = tmp / "home"
            home.mkdir()
            (home / "models").symlink_to(paths.models_dir(paths.home()))
            sock = tmp / "pe.sock"
            env = dict(os.environ, POCKETEMBED_HOME=str(home), POCKETEMBED_JOB_SOURCES=str(tmp),
                       POCKETEMBED_POWER_SOURCE="psutil")
            proc = subprocess.Popen([sys.executable, "-m", "pocketembed.cli", "serve", "--socket", str(sock), "--model",
                                     model], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                while not sock.exists():
                    time.sleep(0.1)
                t = time.perf_counter()
                got = []
                done = 0
                for n in sizes:
                    write(mode, sock, tmp, texts, done, n)
                    done = n
                    with Client(f"ipc://{sock}", timeout=300) as c:
                        good = 0
                        for q in queries[n]:
                            hits = c.search("sms", texts[q], k=K, rescore_multiplier=10, mode="vector")
                            exact = vec[:n] @ vec[q]
                            tenth = np.sort(exact)[-K]
                            good += sum(exact[h["id"] - 1] >= tenth - 1e-6 for h in hits)
                        got.append(good / (K * len(queries[n])))
                rows.append((mode, *got, time.perf_counter() - t))
            finally:
                proc.terminate()
                proc.wait(60)
        print(f"  {mode}: {', '.join(f'{r:.3f}' for r in rows[-1][1:3])}", file=sys.stderr, flush=True)
    print(f"\nrecall@{K} at x10 rescoring through the daemon, by write pattern ({queries_n} queries, the query "
          "itself included)")
    print(f"{'how the items were written':<20}{'at 1,000 items':>16}{f'at {len(texts):,} items':>16}{'time s':>9}")
    for mode, r1, r2, secs in rows:
        print(f"{mode:<20}{r1:>16.3f}{r2:>16.3f}{secs:>9.0f}")


def write(mode: str, sock: Path, tmp: Path, texts: list[str], start: int, end: int) -> None:
    """Items start..end-1 (ids from 1) into collection sms, as ``mode`` says."""
    if mode == "index job":
        db = tmp / "sms.db"
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS m (id INTEGER PRIMARY KEY, body TEXT)")
            conn.executemany("INSERT INTO m VALUES (?, ?)", [(i + 1, texts[i]) for i in range(start, end)])
        with Client(f"ipc://{sock}", timeout=300) as c:
            job = c.index_table(str(db), "m", "id", "body", collection="sms")
            while c.job(job["id"])["state"] != "done":
                time.sleep(0.2)
        return
    per = int(mode.split()[0])

    async def go() -> None:
        async with AsyncClient(f"ipc://{sock}", timeout=300) as c:
            batches = [[{"id": i + 1, "text": texts[i]} for i in range(at, min(end, at + per))]
                       for at in range(start, end, per)]
            for s in range(0, len(batches), 8):
                await asyncio.gather(*[c.call("index.add", {"collection": "sms", "items": b}, timeout=300)
                                       for b in batches[s:s + 8]])

    asyncio.run(go())


if __name__ == "__main__":
    main()
