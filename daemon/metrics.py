"""The daemon's request counters and latencies, as ``stats`` reports them."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import numpy as np


class Metrics:
    """Counters and a latency window for the ``stats`` op."""

    def __init__(self) -> None:
        self.started = time.time()
        self.requests = 0
        self.errors = 0
        self.by_op: dict[str, int] = {}
        self.latency_ms: deque[float] = deque(maxlen=2048)
        self.counters: dict[str, int] = {"internal_errors": 0, "replies_dropped": 0, "connections_refused": 0}
        """Shared with the executors: ``internal_errors`` counts bugs answered ``internal``."""
        self.auth = {"unauthorized": 0, "forbidden": 0, "blocked": 0}
        """Refusals: no or unknown token, a token without the op's permission, a connection blocked for bad tokens."""
        self.lock = threading.Lock()

    def count(self, counter: str, n: int = 1) -> None:
        with self.lock:
            self.counters[counter] += n

    def record(self, op: str, ok: bool, started: float) -> None:
        with self.lock:
            self.requests += 1
            self.errors += 0 if ok else 1
            self.by_op[op] = self.by_op.get(op, 0) + 1
            self.latency_ms.append((time.perf_counter() - started) * 1000)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            lat = np.array(self.latency_ms) if self.latency_ms else np.zeros(1)
            return {
                "uptime_s": round(time.time() - self.started, 3),
                "requests": self.requests,
                "errors": self.errors,
                "internal_errors": self.counters["internal_errors"],
                "replies_dropped": self.counters["replies_dropped"],
                "connections_refused": self.counters["connections_refused"],
                "auth": dict(self.auth),
                "by_op": dict(self.by_op),
                "latency_ms": {f"p{q}": round(float(np.percentile(lat, q)), 3) for q in (50, 90, 99)},
            }
