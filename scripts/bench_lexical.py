"""Lexical index benchmark: BM25 query latency, index size per item and the delete checkpoint's cost.

Model-free: the vectors are random unit vectors of the real dims (384), so the store's
sizes and write path are the daemon's own; only the ranking of vectors is meaningless
here (the evaluation of search quality is scripts/eval_search.py).

    python scripts/bench_lexical.py [--items 100000] [--queries 200]

The collection at N > 5,574 is the bundled SMS repeated with variations (a serial
number and a phone-like number spliced in, words dropped), so that the vocabulary
and the numbers grow as a phone's messages do.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from pocketembed.daemon import lexical
from pocketembed.daemon.store import Item, Store, checkpoint_deleted, connect, text_hash, transaction
from pocketembed.sms import load_sms

DIMS = 384
QUERIES_FIXED = ["09050000327", "£1000", "txt STOP to 87239", "0905000", "u still at the library?",
                 "free ringtone", "happy birthday", "\"call me\" NEAR *", "the", "u", "ok lar"]


def corpus(n: int, rng: random.Random) -> list[str]:
    base = load_sms()
    out = list(base[:n])
    k = 0
    while len(out) < n:
        words = base[k % len(base)].split()
        if len(words) > 3:
            del words[rng.randrange(len(words))]
        words.insert(rng.randrange(len(words) + 1), f"#{k}")
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words) + 1), "07" + "".join(rng.choice("0123456789") for _ in range(9)))
        out.append(" ".join(words))
        k += 1
    return out


def queries(texts: list[str], count: int, rng: random.Random) -> list[str]:
    """The fixed ones, then words and numbers picked from random messages (1-3 terms)."""
    out = list(QUERIES_FIXED)
    while len(out) < count:
        words = [w for w in texts[rng.randrange(len(texts))].split() if len(w) > 2]
        if words:
            out.append(" ".join(rng.sample(words, min(len(words), rng.randint(1, 3)))))
    return out


def table_bytes(conn) -> dict[str, int]:
    return dict(conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name").fetchall())


def run(n: int, n_queries: int, store_text: bool) -> dict[str, float]:
    rng = random.Random(1)
    texts = corpus(n, rng)
    home = Path(tempfile.mkdtemp(prefix="pe-bench-lex-"))
    conn = connect(home / "index.db")
    store = Store(conn)
    vecs = np.random.default_rng(0).standard_normal((n, DIMS)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    t0 = time.perf_counter()
    with transaction(conn):
        store.ensure_collection(conn, "c", "m", DIMS, store_text=store_text)
    with transaction(conn):  # one put: the binary code is calibrated once (its SVDs are not what is measured)
        store.put(conn, "c", [Item(k, text_hash(texts[k]), vecs[k], text=texts[k], lexical_text=texts[k])
                              for k in range(n)])
    write_s = time.perf_counter() - t0
    # The lexical share of the write: the same texts indexed again into a second index alone.
    t1 = time.perf_counter()
    with transaction(conn):
        lexical.index_docs(conn, "probe", [(10_000_000 + k, text_hash(t), t) for k, t in enumerate(texts)])
    lex_s = time.perf_counter() - t1
    with transaction(conn):
        lexical.drop(conn, "probe")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("VACUUM")
    sizes = table_bytes(conn)
    lex_bytes = sum(v for k, v in sizes.items() if k.startswith("lex_") or "lex_" in k)
    item_bytes = sum(v for k, v in sizes.items() if k == "items" or k.startswith("sqlite_autoindex_items") or k.startswith("idx_items"))
    qs = queries(texts, n_queries, rng)
    for q in qs[:20]:  # warm the page cache
        store.lexical_search("c", q, 20)
    times = []
    for q in qs:
        t = time.perf_counter()
        store.lexical_search("c", q, 20)
        times.append((time.perf_counter() - t) * 1000)
    slowest = sorted(zip(times, qs))[-3:]
    print(f"{n:,} items, slowest queries: " + "; ".join(f"{q!r} {ms:.1f} ms" for ms, q in slowest))
    allowed = np.arange(1, n + 1, 3, dtype=np.int64)
    ftimes = []
    for q in qs[:50]:
        t = time.perf_counter()
        store.lexical_search("c", q, 20, allowed=allowed)
        ftimes.append((time.perf_counter() - t) * 1000)
    # The checkpoint a delete pays before it replies (deletes of 1 and 100 items).
    cps = {}
    for size in (1, 100):
        cp = []
        for r in range(5):
            ids = list(range(r * size, (r + 1) * size))
            with transaction(conn):
                store.delete(conn, "c", ids)
            cp.append(checkpoint_deleted(conn) * 1000)
        cps[size] = statistics.median(cp)
    conn.close()
    times.sort()
    return {"items": n, "write_items_s": n / write_s, "lexical_index_items_s": n / lex_s,
            "p50_ms": statistics.median(times), "p99_ms": times[int(len(times) * 0.99) - 1],
            "filtered_p50_ms": statistics.median(ftimes),
            "lex_bytes_item": lex_bytes / n, "item_bytes_item": item_bytes / n,
            "lex_postings_item": sizes.get("lex_postings", 0) / n, "lex_docs_item": sizes.get("lex_docs", 0) / n,
            "lex_terms_item": sizes.get("lex_terms", 0) / n, "checkpoint_1_ms": cps[1], "checkpoint_100_ms": cps[100]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, nargs="*", default=[5574, 100_000])
    ap.add_argument("--queries", type=int, default=200)
    a = ap.parse_args()
    rows = [run(n, a.queries, store_text=False) for n in a.items]
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:,.2f}" if isinstance(r[c], float) else f"{r[c]:,}" for c in cols) + " |")


if __name__ == "__main__":
    main()
