"""Recall@10 of the store's quantized search against exact float32 search, on the SMS corpus.

    python scripts/eval_search.py [--queries 500] [--model all-minilm-l6-v2:q8_0]

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

from pocketembed.sms import load_sms

from pocketembed.daemon.models import open_engine  # noqa: E402
from pocketembed.daemon.quantize import Calibration, hamming, smallest, words  # noqa: E402
from pocketembed.daemon.store import Item, Store, connect, text_hash, transaction  # noqa: E402

K = 10
MULTIPLIERS = (1, 2, 4, 10, 20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--model", default="all-minilm-l6-v2:q8_0")
    ap.add_argument("--seed", type=int, default=0)
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

    with tempfile.TemporaryDirectory() as tmp:
        conn = connect(Path(tmp) / "index.db")
        store = Store(conn)
        with transaction(conn):
            store.ensure_collection(conn, "sms", spec.name, vec.shape[1])
        for s in range(0, len(texts), 128):
            with transaction(conn):
                store.put(conn, "sms", [Item(i, text_hash(texts[i]), vec[i]) for i in range(s, min(len(texts), s + 128))])
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


if __name__ == "__main__":
    main()
