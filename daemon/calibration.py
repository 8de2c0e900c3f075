"""int8 ranges per model, measured once: a collection's codes never depend on its own data.

A collection's int8 code maps each dimension linearly from [lo_j, hi_j] to 256
levels. When those ranges came from the collection's first vectors, a
collection filled one SMS at a time got its ranges from a single vector, clipped
everything after it, and each recalibration re-encoded from already-clipped
codes: recall@10 fell from 0.954 (batches of 500) to 0.859 (one per request).

Here the ranges belong to the model (and the Matryoshka dims): the model's own
vectors of a fixed calibration set (256 bundled SMS), widened by half their span
on each side so that nothing real clips, measured the first time a collection of
that model is written and stored with the collection. So an item's int8 code is the
same whether it arrived alone, in a batch or from a job, a reused code is the
code a fresh embedding would get, and a collection's codes never change as it
grows; only the binary code's centring and rotation are refitted (from those
accurate int8 vectors) as the collection doubles.
"""

from __future__ import annotations

import numpy as np

from pocketembed.sms import load_sms

CALIBRATION_TEXTS = 256
MARGIN = 0.5
"""Each side of the measured range is widened by this share of its span."""

def calibration_texts() -> list[str]:
    """A fixed spread of the bundled corpus: every 20th message, the first CALIBRATION_TEXTS of them."""
    return load_sms()[::20][:CALIBRATION_TEXTS]


def ranges_of(vectors: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """lo/hi per dimension of unit vectors truncated to ``dims`` and renormalized, widened by MARGIN."""
    v = vectors[:, :dims]
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    lo, hi = v.min(axis=0), v.max(axis=0)
    span = np.maximum(hi - lo, 1e-6)
    return (lo - MARGIN * span).astype(np.float32), (hi + MARGIN * span).astype(np.float32)
