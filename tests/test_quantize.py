"""The codes and the Hamming scan, against plain numpy references."""

from __future__ import annotations

import numpy as np

from pocketembed.daemon import quantize as qz


def test_scan_matches_a_plain_popcount_and_smallest_is_exact():
    rng = np.random.default_rng(3)
    packed = rng.integers(0, 256, size=(5000, 48), dtype=np.uint8)
    query = rng.integers(0, 256, size=(1, 48), dtype=np.uint8)
    ref = np.unpackbits(packed ^ query, axis=1).sum(axis=1)
    w = qz.words(packed)
    qw = qz.words(query)[:, 0]
    dist = qz.hamming(w, qw)
    assert np.array_equal(dist, ref) and np.array_equal(qz.hamming_numpy(w, qw), ref)
    for k in (1, 37, 4999, 5000, 6000):
        top = qz.smallest(dist, k)
        assert len(top) == min(k, 5000) and np.array_equal(dist[top], np.sort(ref)[:k])
    big = np.repeat(dist, 40)  # the sampled cut-off path (n ≥ 16384), with many ties
    top = qz.smallest(big, 500)
    assert np.array_equal(big[top], np.sort(big)[:500]) and np.all(np.diff(top[big[top] == big[top][0]]) > 0)


def test_codes_round_trip_and_bits_come_from_the_int8_vector():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1500, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cal = qz.calibrate(x)
    assert cal.rotation is not None and cal.rotation.shape == (64, 64)  # ≥ ITQ_MIN vectors: rotation learned
    assert np.allclose(cal.rotation @ cal.rotation.T, np.eye(64), atol=1e-4)
    codes, bits = cal.encode(x)
    back = cal.dequantize(codes)
    assert np.abs(back - x).max() <= cal.scale.max() / 2 + 1e-6
    assert np.array_equal(bits, cal.bits(back)) and bits.shape == (1500, 8)
    again, again_bits = cal.encode(back)  # re-encoding a dequantized vector changes nothing
    assert np.array_equal(again, codes) and np.array_equal(again_bits, bits)
    blobs = cal.to_blobs()
    same = qz.Calibration.from_blobs(64, blobs["lo"], blobs["hi"], blobs["mean"], blobs["rotation"], blobs["calib_count"])
    assert np.array_equal(same.int8(x), codes)


def test_nearest_fast_path_equals_the_full_scan():
    rng = np.random.default_rng(5)
    packed = rng.integers(0, 256, size=(70_000, 48), dtype=np.uint8)
    w = qz.words(packed)
    query = qz.words(packed[123:124] ^ np.uint8(1))[:, 0]
    ref = qz.hamming_numpy(w, query)
    order = np.lexsort((np.arange(len(ref)), ref))
    for k in (1, 100, 1000):
        idx, dist = qz.nearest(w, query, k)
        assert np.array_equal(idx, order[:k]) and np.array_equal(dist, ref[order[:k]])
    blocked = np.zeros(len(ref), bool)
    blocked[order[:50]] = True  # the 50 nearest are deleted
    idx, _ = qz.nearest(w, query, 100, blocked)
    assert np.array_equal(idx, order[50:150])
    # The first 16,384 codes unlike the rest: the estimated cut-off keeps too few, the exact path answers.
    skewed = packed.copy()
    skewed[:16_384] = packed[123] ^ np.uint8(0xFF)
    ws = qz.words(skewed)
    ref = qz.hamming_numpy(ws, query)
    idx, dist = qz.nearest(ws, query, 100)
    assert np.array_equal(dist, np.sort(ref)[:100]) and np.array_equal(idx, np.lexsort((np.arange(len(ref)), ref))[:100])


def test_a_refit_reads_the_collection_a_slice_at_a_time_and_rewrites_every_code(tmp_path, monkeypatch):
    """The store's refit (each time a collection doubles) pages through the stored vectors, so it
    never holds the collection; it must still see every row: the fit's mean is the mean of the
    stored vectors and the new ones, and every row's binary code is the new calibration's code of
    its vector."""
    import sqlite3

    from pocketembed.daemon import store as st

    monkeypatch.setattr(st, "_REFIT_SLICE", 100)  # many slices, one ending exactly on a boundary
    conn = sqlite3.connect(tmp_path / "index.db", isolation_level=None)
    store = st.Store(conn)
    store.ensure_collection(conn, "c", "m", 32)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2400, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids: list[object] = [*range(1200), *(f"s{i}" for i in range(1200))]  # ints and texts: both key orders
    for start, end in ((0, 600), (600, 1200), (1200, 2400)):  # a refit at each doubling
        conn.execute("BEGIN IMMEDIATE")  # as the daemon's writes: one transaction a request
        store.put(conn, "c", [st.Item(ids[i], f"h{i}", x[i]) for i in range(start, end)])
        conn.execute("COMMIT")
    cal = store.info("c", conn).calibration
    assert cal.count == 2400 and cal.rotation is not None
    stored_first = cal.dequantize(cal.int8(x[:1200]))  # what the refit read back of the first 1,200
    assert np.allclose(cal.mean, np.vstack([stored_first, x[1200:]]).mean(axis=0), atol=1e-6)
    rows = conn.execute("SELECT i8, bin FROM items WHERE collection = 'c'").fetchall()
    assert len(rows) == 2400
    stored = cal.dequantize(np.stack([np.frombuffer(r[0], np.int8) for r in rows]))
    bits = np.stack([np.frombuffer(r[1], np.uint8) for r in rows])
    assert np.array_equal(bits, cal.bits(stored))
