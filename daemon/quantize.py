"""Binary and int8 codes of embeddings, and the Hamming scan over them.

A collection keeps two codes per vector:

* **int8**, per-dimension ranges: dimension j is mapped linearly from
  [lo_j, hi_j] to 256 levels; the ranges are the model's (calibration.py),
  fixed for the life of a collection. Dequantized codes score a float query within
  ~4e-4 of the float dot product, enough to rescore (int8 alone finds
  recall@10 0.996 on the SMS corpus, scripts/eval_search.py).
* **binary**, 1 bit per dimension after centring on the collection's mean and
  an ITQ rotation (Gong & Lazebnik, "Iterative Quantization"), learned from the
  collection once it has ≥ 1,024 vectors. A plain sign threshold of this model's
  vectors reaches recall@10 0.56 alone and 0.94 after int8 rescoring of ×10
  candidates; centring adds ~0.01, the rotation lifts it to 0.62 / 0.97, because
  it spreads the variance evenly over the bits instead of leaving most bits
  nearly constant.

The binary code is always computed from the dequantized int8 vector, so a
vector re-encoded after recalibration, or copied between items, gets the same
bits as a fresh one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

ITQ_MIN = 1024
"""Vectors needed before a rotation is learned; below it, centring only."""
ITQ_SAMPLE = 4096
ITQ_ITERATIONS = 15


@dataclass
class Calibration:
    lo: np.ndarray
    hi: np.ndarray
    mean: np.ndarray
    rotation: np.ndarray | None
    count: int
    """How many vectors it was computed from."""

    @property
    def scale(self) -> np.ndarray:
        s = (self.hi - self.lo) / 255.0
        return np.where(s > 0, s, 1e-12).astype(np.float32)

    def int8(self, x: np.ndarray) -> np.ndarray:
        """(n, d) float → (n, d) int8 codes (level − 128), clipped to the ranges."""
        levels = np.rint((np.asarray(x, np.float32) - self.lo) / self.scale)
        return (np.clip(levels, 0, 255) - 128).astype(np.int8)

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        return (codes.astype(np.float32) + 128.0) * self.scale + self.lo

    def bits(self, x: np.ndarray) -> np.ndarray:
        """(n, d) float → (n, d/8) packed sign bits of the centred, rotated vectors."""
        y = np.asarray(x, np.float32) - self.mean
        if self.rotation is not None:
            y = y @ self.rotation
        return np.packbits(y > 0, axis=1)

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """int8 codes and the binary code of their dequantized vectors."""
        codes = self.int8(x)
        return codes, self.bits(self.dequantize(codes))

    def to_blobs(self) -> dict[str, bytes | int | None]:
        f = lambda a: np.ascontiguousarray(a, "<f4").tobytes()  # noqa: E731
        return {"lo": f(self.lo), "hi": f(self.hi), "mean": f(self.mean),
                "rotation": None if self.rotation is None else f(self.rotation), "calib_count": self.count}

    @classmethod
    def from_blobs(cls, dims: int, lo: bytes, hi: bytes, mean: bytes, rotation: bytes | None, count: int) -> Calibration:
        f = lambda b: np.frombuffer(b, "<f4").astype(np.float32)  # noqa: E731
        rot = None if rotation is None else f(rotation).reshape(dims, dims)
        return cls(f(lo), f(hi), f(mean), rot, count)


def calibrate(x: np.ndarray, seed: int = 0) -> Calibration:
    """Ranges, mean and (with enough vectors) an ITQ rotation from the vectors ``x``."""
    x = np.asarray(x, np.float32)
    n = len(x)
    mean = x.mean(axis=0)
    rotation = None
    if n >= ITQ_MIN:
        rng, picks = itq_sample(n, seed)
        sample = x[picks]
        sample -= mean
        rotation = itq_rotation(rng, sample)
    return Calibration(x.min(axis=0), x.max(axis=0), mean, rotation, n)


def itq_sample(n: int, seed: int = 0) -> tuple[np.random.Generator, np.ndarray]:
    """The generator and the positions (of ``n`` vectors) an ITQ fit samples.

    Apart from ``itq_rotation`` so that a caller reading its vectors a slice at
    a time (the store's refit) can gather just these rows.
    """
    rng = np.random.default_rng(seed)
    return rng, rng.choice(n, min(n, ITQ_SAMPLE), replace=False)


def itq_rotation(rng: np.random.Generator, sample: np.ndarray) -> np.ndarray:
    """The ITQ rotation of ``sample`` (float32, already centred), continuing ``rng`` from ``itq_sample``."""
    d = sample.shape[1]
    rotation = np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32)
    one, minus_one = np.float32(1.0), np.float32(-1.0)  # the signs in float32: no n x d float64 temporaries
    for _ in range(ITQ_ITERATIONS):
        b = np.where(sample @ rotation > 0, one, minus_one)
        u, _, vt = np.linalg.svd(b.T @ sample)
        rotation = (u @ vt).T.astype(np.float32)
    return rotation


def words(packed: np.ndarray) -> np.ndarray:
    """(n, d/8) packed bits → (d/64, n) uint64, the layout the scan wants (zero-padded)."""
    n, nbytes = packed.shape
    pad = (-nbytes) % 8
    if pad:
        packed = np.hstack([packed, np.zeros((n, pad), np.uint8)])
    return np.ascontiguousarray(packed.view(np.uint64).T) if n else np.zeros((packed.shape[1] // 8, 0), np.uint64)


try:  # the C scan, built by setup.py when a compiler was there (see _hamming.c)
    from . import _hamming
except ImportError:  # pragma: no cover - exercised on installs without a C compiler
    _hamming = None

BLOCK = 32768
SCAN_THREADS = min(2, os.cpu_count() or 1)
"""The C scan is bound by memory bandwidth, which a second core adds to."""


def hamming(word_rows: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Hamming distances of a query's words to every column of ``word_rows`` (uint16).

    The C scan when it was built (two threads: it is bound by memory
    bandwidth), else numpy, blocked so that its temporaries stay in cache.
    """
    w, n = word_rows.shape
    if _hamming is not None and word_rows.flags.c_contiguous and word_rows.dtype == np.uint64:
        out = np.empty(n, np.uint16)
        _hamming.scan(word_rows, w, n, np.ascontiguousarray(query, np.uint64), out, SCAN_THREADS)
        return out
    return hamming_numpy(word_rows, query)


def hamming_numpy(word_rows: np.ndarray, query: np.ndarray) -> np.ndarray:
    w, n = word_rows.shape
    acc = np.empty(n, np.uint16)
    tmp = np.empty(min(n, BLOCK), np.uint64)
    cnt = np.empty(min(n, BLOCK), np.uint8)
    for s in range(0, n, BLOCK):
        e = min(n, s + BLOCK)
        t, c, a = tmp[: e - s], cnt[: e - s], acc[s:e]
        np.bitwise_xor(word_rows[0, s:e], query[0], out=t)
        np.bitwise_count(t, out=c)
        a[:] = c
        for j in range(1, w):
            np.bitwise_xor(word_rows[j, s:e], query[j], out=t)
            np.bitwise_count(t, out=c)
            np.add(a, c, out=a)
    return acc


SAMPLE = 16384
CANDIDATE_CAP = 65536


def nearest(word_rows: np.ndarray, query: np.ndarray, k: int,
            blocked: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k codes nearest to a query (indices and distances, nearest first; ties by index).

    Large collections with the C scan: a cut-off is estimated from the first
    16,384 codes, and one pass keeps only the codes within it, so no distance
    per code is stored or searched (at 1M that was ~1 ms of a 5.5 ms search).
    When the estimate keeps too few or too many, the exact slow path runs.
    ``blocked`` (bool per code) removes codes from the result.
    """
    w, n = word_rows.shape
    q = np.ascontiguousarray(query, np.uint64)
    if (_hamming is not None and w == 6 and n >= 4 * SAMPLE and k <= CANDIDATE_CAP // 8
            and word_rows.flags.c_contiguous and word_rows.dtype == np.uint64):
        head = hamming(np.ascontiguousarray(word_rows[:, :SAMPLE]), q)
        at = min(SAMPLE - 1, int(4 * k * SAMPLE / n) + 2)
        cut = int(np.partition(head, at)[at])
        idx = np.empty(CANDIDATE_CAP, np.int64)
        dist = np.empty(CANDIDATE_CAP, np.uint16)
        count = _hamming.scan_below(word_rows, n, q, cut, idx, dist, SCAN_THREADS)
        if count >= 0:
            idx, dist = idx[:count], dist[:count]
            if blocked is not None:
                keep = ~blocked[idx]
                idx, dist = idx[keep], dist[keep]
            if len(idx) >= k:  # every code within the cut is here, so these k are exact
                order = np.lexsort((idx, dist))[:k]
                return idx[order], dist[order]
    dist = hamming(word_rows, q)
    if blocked is not None:
        dist[blocked] = np.iinfo(np.uint16).max
        k = min(k, int(n - blocked.sum()))
    picked = smallest(dist, k)
    return picked, dist[picked]


def smallest(dist: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k smallest distances, nearest first (ties in index order).

    Exact, without sorting or counting all n: a cut-off estimated from every
    64th distance, raised until at least k rows are at or under it; only those
    are sorted.
    """
    n = len(dist)
    if k >= n:
        return np.argsort(dist, kind="stable")
    step = 64 if n >= 64 * 256 else 1
    sample = dist[::step]
    at = min(len(sample) - 1, int(4 * k / step) + 2)  # ~4k rows under the cut: rarely a second pass
    cut = int(np.partition(sample, at)[at])
    while True:
        idx = np.flatnonzero(dist <= cut)
        if len(idx) >= k:
            return idx[np.argsort(dist[idx], kind="stable")[:k]]
        cut += 1  # distances are small integers: a step of 1 adds the next shell
