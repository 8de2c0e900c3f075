"""The scheduler: one queue per lane, batches merged across requests, decode workers.

``submit`` (never blocks on inference) returns a future that a decode worker
completes with the request's vectors or its error: the one way a result comes
back, for the server and the daemon's own threads alike (embedding.py wraps it
with the model's prefixes and retries). In between, the scheduler:

* keeps two FIFO lanes, **interactive** (default) and **background** (bulk,
  re-index jobs). A free worker always takes interactive work first;
* merges texts of many requests into one llama.cpp decode under a token budget
  and a sequence cap, and splits the vectors back per request;
* runs one decode per worker, each worker on its own llama context of the
  model (they share the weights). A lone decode gets every thread; concurrent
  decodes share them;
* bounds each lane in texts and (estimated) tokens: a request that does not fit
  is refused at once with ``Busy`` and a retry hint, so memory stays bounded;
* drops requests whose deadline passed before any of their texts ran.

Background batches are smaller than interactive ones and, while interactive
traffic is recent, background work runs on all workers but one: so an
interactive request finds a free worker, or waits for at most one background
decode (see ``SchedulerConfig``). Each of these decisions is a pure function in
batching.py; this module holds the lanes, the lock and the workers.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from pocketembed.errors import Busy, Expired, InvalidInput, PocketEmbedError, ShuttingDown, TooLarge

from . import batching, faults
from .engine import Engine, postprocess
from .executors import as_error

log = logging.getLogger("pocketembed.scheduler")

INTERACTIVE = "interactive"
BACKGROUND = "background"
LANES = (INTERACTIVE, BACKGROUND)


class EngineSource(Protocol):
    """Where workers get engines: the model registry.

    ``hold`` when a request is queued and ``unhold`` once it is answered keep its
    model from being evicted meanwhile; ``acquire``/``release`` bracket each use.
    """

    def hold(self, name: str) -> None: ...

    def unhold(self, name: str, keep_alive: float | None = None) -> None: ...

    def acquire(self, name: str) -> Engine: ...

    def release(self, name: str) -> None: ...


@dataclass(frozen=True)
class LaneConfig:
    batch_tokens: int
    """Token budget of one decode in this lane."""
    max_texts: int
    """Most texts queued (not yet finished) in the lane; beyond it: busy."""
    max_tokens: int
    """Most estimated tokens queued in the lane; beyond it: busy."""


@dataclass(frozen=True)
class SchedulerConfig:
    workers: int = 2
    """Decode workers, each on its own llama context (the engine's contexts)."""
    max_seqs: int = 32
    interactive: LaneConfig = LaneConfig(batch_tokens=512, max_texts=2048, max_tokens=262_144)
    # 256 tokens is ~125 ms on one thread of this class of CPU (vs 254 ms for 512) at
    # 98% of the throughput: an interactive request behind it waits at most that long.
    background: LaneConfig = LaneConfig(batch_tokens=256, max_texts=8192, max_tokens=1_048_576)
    solo_tokens: int = 64
    """A decode this small on an otherwise idle daemon gets every thread."""
    interactive_grace_s: float = 1.0
    """After interactive traffic, keep one worker free of background work this long."""


@dataclass
class EmbedTask:
    """One ``embed`` (or ``rerank``) request as the scheduler sees it."""

    texts: list[str]
    model: str
    lane: str = INTERACTIVE
    normalize: bool = True
    dims: int | None = None
    truncate: bool = False
    deadline: float | None = None
    """time.monotonic() after which the request is not worth computing."""
    keep_alive: float | None = None
    """The request's keep_alive for its model, in seconds (None: the model's own)."""
    received: float = field(default_factory=time.monotonic)
    query: str | None = None
    """Set for a ``rerank``: ``texts`` are documents, each decoded as one (query, document)
    pair by a cross-encoder, and the result is its raw scores (no normalization)."""

    # Filled in by the scheduler.
    future: Future = field(default_factory=Future)
    """Completed by a decode worker: the vectors (rerank: the raw scores), or the request's error."""
    est_tokens: int = 0
    tokens: list[list[int]] | None = None
    n_tokens: int = 0
    """Tokens of all its texts, special tokens included (what the decode costs): the reply's usage."""
    load_ms: float = 0.0
    """Time its tokenizer waited for the model (a load on demand, or ~0 when loaded): Ollama's load_duration."""
    state: str = "new"  # new → tokenizing → ready → done
    taken: int = 0
    finished: int = 0
    pooled: np.ndarray | None = None
    out_dims: int = 0
    limits: tuple[int, int] = (1 << 30, 1 << 30)
    """The engine's own tokens and sequences per decode (a model's batch_tokens may be below the lane's)."""


class _LaneState:
    def __init__(self, name: str, cfg: LaneConfig) -> None:
        self.name = name
        self.cfg = cfg
        self.tasks: deque[EmbedTask] = deque()
        self.texts = 0
        self.tokens = 0
        self.completed = 0
        self.failed = 0
        self.rejected_busy = 0
        self.expired = 0
        self.latency_ms: deque[float] = deque(maxlen=2048)


class Scheduler:
    """Batches embed requests from every client over a pool of decode workers."""

    def __init__(self, engines: EngineSource, config: SchedulerConfig | None = None,
                 on_death: Callable[[str], None] | None = None) -> None:
        self.engines = engines
        self.config = config or SchedulerConfig()
        self.on_death = on_death
        self._cv = threading.Condition()
        self._lanes = {INTERACTIVE: _LaneState(INTERACTIVE, self.config.interactive),
                       BACKGROUND: _LaneState(BACKGROUND, self.config.background)}
        self._busy_workers = 0
        self._background_running = 0
        self._last_interactive = -math.inf
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._decodes = 0
        self._decoded_texts = 0
        self._decoded_tokens = 0
        self._recent: deque[tuple[float, float, int, int]] = deque(maxlen=256)  # start, end, texts, tokens
        self._batch_texts: deque[int] = deque(maxlen=1024)

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> None:
        for i in range(max(1, self.config.workers)):
            t = threading.Thread(target=self._worker, args=(i,), name=f"pe-decode-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 60) -> None:
        """Finish everything accepted, then stop the workers."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    # -- the I/O thread's side ---------------------------------------------------------

    def submit(self, task: EmbedTask, max_tokens: int = 512) -> Future:
        """Queue a request, or refuse it at once (Busy, TooLarge, ShuttingDown); returns ``task.future``.

        ``max_tokens`` is the model's sequence limit: with truncation a text costs
        at most that (batching.estimate_tokens bounds a request before it is tokenized).
        """
        lane = self._lanes.get(task.lane)
        if lane is None:
            raise InvalidInput(f"priority must be one of {', '.join(LANES)}, not {task.lane!r}")
        est = task.est_tokens = batching.estimate_tokens(task.texts, task.query, max_tokens, task.truncate)
        cfg = lane.cfg
        if len(task.texts) > cfg.max_texts or est > cfg.max_tokens:
            raise TooLarge(f"request of {len(task.texts)} texts / ~{est} tokens exceeds the {lane.name} lane's "
                           f"capacity ({cfg.max_texts} texts / {cfg.max_tokens} tokens); split it")
        with self._cv:
            if self._stopping:
                raise ShuttingDown("the daemon is shutting down")
            if lane.texts + len(task.texts) > cfg.max_texts or lane.tokens + est > cfg.max_tokens:
                lane.rejected_busy += 1
                raise Busy(f"the {lane.name} queue is full ({lane.texts} texts / ~{lane.tokens} tokens waiting)",
                           self._retry_after_ms(lane))
            self.engines.hold(task.model)  # may refuse: the model is being unloaded on purpose
            lane.texts += len(task.texts)
            lane.tokens += est
            lane.tasks.append(task)
            if task.lane == INTERACTIVE:
                self._last_interactive = time.monotonic()
            self._cv.notify()
        return task.future

    def last_interactive(self) -> float:
        """time.monotonic() of the last interactive request (the power policy pauses jobs after it)."""
        return self._last_interactive

    def _retry_after_ms(self, lane: _LaneState) -> int:
        rate = self._tokens_per_s() or 2000.0
        return int(min(30_000, max(50, 1000 * lane.tokens / rate)))

    # -- workers -----------------------------------------------------------------------

    def _worker(self, index: int) -> None:
        try:
            self._work(index)
        finally:
            if not self._stopping:
                log.critical("decode worker %d ended unexpectedly", index)
                if self.on_death is not None:
                    self.on_death(f"decode-{index}")

    def _work(self, index: int) -> None:
        while True:
            with self._cv:
                job = self._next_job()
                while job is None:
                    if self._stopping and not any(s.tasks for s in self._lanes.values()):
                        self._cv.notify_all()
                        return
                    self._cv.wait(self._wait_timeout())
                    job = self._next_job()
                # Wake one more worker only when there is more than this one takes:
                # every needless wake-up costs a GIL hand-off on the latency path.
                if self._has_runnable():
                    self._cv.notify()
            kind, lane, payload = job
            if kind == "expire":
                self._reply_expired(lane, payload)
            elif kind == "tokenize":
                self._tokenize(lane, payload)
            else:
                self._decode(index, lane, payload)

    def _wait_timeout(self) -> float | None:
        """How long an idle worker may sleep: background work held back by the interactive grace
        period becomes runnable when it ends; anything else that frees work notifies the workers."""
        if self._lanes[BACKGROUND].tasks:
            return batching.grace_left(time.monotonic() - self._last_interactive, self.config.interactive_grace_s)
        return None

    def _next_job(self) -> tuple[str, _LaneState, Any] | None:
        """Under the lock: the next thing this worker should do, or None to wait."""
        now = time.monotonic()
        for lane in self._lanes.values():
            task = batching.first_expired(lane.tasks, now)
            if task is not None:
                self._drop(lane, task)
                return "expire", lane, task
        for lane in self._lanes.values():
            if not lane.tasks:
                continue
            if lane.name == BACKGROUND and not self._background_allowed(now):
                continue
            new = self._claim_new(lane)
            if new:
                return "tokenize", lane, new
            batch = self._form_batch(lane)
            if batch:
                self._busy_workers += 1
                if lane.name == BACKGROUND:
                    self._background_running += 1
                return "decode", lane, batch
        return None

    def _has_runnable(self) -> bool:
        now = time.monotonic()
        for lane in self._lanes.values():
            if lane.name == BACKGROUND and not self._background_allowed(now):
                continue
            if any(t.state == "new" or (t.state == "ready" and t.taken < len(t.texts)) for t in lane.tasks):
                return True
        return False

    def _background_allowed(self, now: float) -> bool:
        limit = batching.background_limit(self.config.workers, now - self._last_interactive, self.config.interactive_grace_s)
        return self._background_running < limit

    def _claim_new(self, lane: _LaneState) -> list[EmbedTask]:
        """Under the lock: new tasks at the head of the lane to tokenize (batching.claim_new), marked so."""
        claimed = batching.claim_new(lane.tasks, lane.cfg.batch_tokens)
        for task in claimed:
            task.state = "tokenizing"
        return claimed

    def _form_batch(self, lane: _LaneState) -> list[tuple[EmbedTask, int, int]] | None:
        """Under the lock: the next decode of the lane (batching.form_batch), its texts marked taken."""
        parts = batching.form_batch(lane.tasks, lane.cfg.batch_tokens, self.config.max_seqs)
        for task, _, end in parts:
            task.taken = end
        return parts or None

    def _tokenize(self, lane: _LaneState, tasks: list[EmbedTask]) -> None:
        name = tasks[0].model
        try:
            faults.check("scheduler", "tokenize")
            asked = time.perf_counter()
            engine = self.engines.acquire(name)
            load_ms = (time.perf_counter() - asked) * 1000
        except Exception as e:  # e.g. an OSError loading the model on demand: these requests fail, the worker goes on
            for t in tasks:
                self._fail(lane, t, as_error(e, f"loading {name}"))
            return
        try:
            for t in tasks:
                try:
                    t.out_dims = engine.check_dims(t.dims)
                    if t.query is None:
                        t.tokens = [self._tok(engine, i, s, t.truncate) for i, s in enumerate(t.texts)]
                    else:
                        t.tokens = [self._pair(engine, i, t.query, s, t.truncate) for i, s in enumerate(t.texts)]
                    t.n_tokens = sum(map(len, t.tokens))
                    t.load_ms = load_ms
                    t.pooled = np.empty((len(t.texts), engine.dims), dtype=np.float32)
                    t.limits = (engine.batch_tokens, engine.max_seqs)
                except Exception as e:
                    self._fail(lane, t, as_error(e, "tokenizing"))
                    continue
                with self._cv:
                    t.state = "ready"
        finally:
            self.engines.release(name)

    @staticmethod
    def _tok(engine: Engine, i: int, text: str, truncate: bool) -> list[int]:
        try:
            return engine.tokenize(text, truncate=truncate)
        except InvalidInput as e:
            e.index = i  # the caller names it (embedding.Embedder): texts[i], documents[i]
            raise

    @staticmethod
    def _pair(engine: Engine, i: int, query: str, text: str, truncate: bool) -> list[int]:
        try:
            return engine.tokenize_pair(query, text, truncate=truncate)
        except InvalidInput as e:
            e.index = i
            raise

    def _decode(self, index: int, lane: _LaneState, parts: list[tuple[EmbedTask, int, int]]) -> None:
        name = parts[0][0].model
        token_lists = [tok for task, a, b in parts for tok in task.tokens[a:b]]
        order = batching.longest_first([len(t) for t in token_lists])
        n_tokens = sum(len(t) for t in token_lists)
        started = time.monotonic()
        error: PocketEmbedError | None = None
        vecs = None
        try:
            faults.check("scheduler", "decode")
            faults.check("scheduler", f"decode:{lane.name}")  # a test may hold one lane only (a job's work)
            engine = self.engines.acquire(name)
            try:
                with self._cv:
                    others = self._busy_workers - 1
                # Every thread for a short decode on an idle daemon (latency); one share
                # otherwise, so that concurrent decodes never oversubscribe the cores.
                # Measured (scripts/bench_scheduler.py): always-all-threads cost 10% of
                # throughput with 8 clients; always-one-share cost 2.5 ms of idle p50.
                solo = others == 0 and n_tokens <= self.config.solo_tokens
                threads = engine.threads if solo else max(1, engine.threads // max(1, self.config.workers))
                sorted_vecs = engine.encode_on(index, [token_lists[i] for i in order], threads)
                vecs = np.empty_like(sorted_vecs)
                vecs[order] = sorted_vecs
            finally:
                self.engines.release(name)
        except PocketEmbedError as e:
            error = e
        except Exception as e:  # a llama.cpp failure: fail these requests, keep serving
            log.exception("decode of %d texts failed", len(token_lists))
            error = PocketEmbedError(f"decode failed: {type(e).__name__}: {e}", code="internal")
        ended = time.monotonic()
        done: list[EmbedTask] = []
        with self._cv:
            self._busy_workers -= 1
            if lane.name == BACKGROUND:
                self._background_running -= 1
                self._cv.notify()  # background work held back for this decode may run now
            if error is None:
                self._decodes += 1
                self._decoded_texts += len(token_lists)
                self._decoded_tokens += n_tokens
                self._batch_texts.append(len(token_lists))
                self._recent.append((started, ended, len(token_lists), n_tokens))
            at = 0
            for task, a, b in parts:
                if task.state == "done":
                    at += b - a
                    continue
                if error is None:
                    task.pooled[a:b] = vecs[at : at + b - a]
                at += b - a
                task.finished += b - a
                if error is not None or task.finished == len(task.texts):
                    done.append(task)
        for task in done:
            if error is not None:
                self._fail(lane, task, error)
            else:
                self._complete(lane, task)

    # -- finishing ---------------------------------------------------------------------

    def _drop(self, lane: _LaneState, task: EmbedTask) -> None:
        """Under the lock: take a task out of its lane and give back its capacity."""
        if task.state == "done":
            return
        task.state = "done"
        try:
            lane.tasks.remove(task)
        except ValueError:
            pass
        lane.texts -= len(task.texts)
        lane.tokens -= task.est_tokens

    def _complete(self, lane: _LaneState, task: EmbedTask) -> None:
        with self._cv:
            if task.state == "done":
                return
            self._drop(lane, task)
            lane.completed += 1
            lane.latency_ms.append((time.monotonic() - task.received) * 1000)
        vecs = task.pooled if task.query is not None else postprocess(task.pooled, normalize=task.normalize, dims=task.out_dims)
        task.pooled = None
        task.tokens = None
        try:
            task.future.set_result(vecs)
        finally:
            self.engines.unhold(task.model, task.keep_alive)

    def _fail(self, lane: _LaneState, task: EmbedTask, error: PocketEmbedError) -> None:
        with self._cv:
            if task.state == "done":
                return
            self._drop(lane, task)
            if isinstance(error, Expired):
                lane.expired += 1
            else:
                lane.failed += 1
        task.pooled = None
        task.tokens = None
        try:
            task.future.set_exception(error)
        finally:
            self.engines.unhold(task.model)

    def _reply_expired(self, lane: _LaneState, task: EmbedTask) -> None:
        """Answer a task ``_next_job`` already dropped because its deadline passed."""
        with self._cv:
            lane.expired += 1
        try:
            task.future.set_exception(Expired("the request's deadline passed before it was run"))
        finally:
            self.engines.unhold(task.model)

    # -- stats -------------------------------------------------------------------------

    def _tokens_per_s(self, window: float = 30.0) -> float:
        now = time.monotonic()
        recent = [r for r in self._recent if now - r[1] <= window]
        if not recent:
            return 0.0
        span = max(r[1] for r in recent) - min(r[0] for r in recent)
        return sum(r[3] for r in recent) / span if span > 0 else 0.0

    def stats(self) -> dict[str, Any]:
        with self._cv:
            lanes = {}
            for lane in self._lanes.values():
                lat = np.array(lane.latency_ms) if lane.latency_ms else None
                lanes[lane.name] = {
                    "queued_requests": len(lane.tasks),
                    "queued_texts": lane.texts,
                    "queued_tokens_est": lane.tokens,
                    "completed": lane.completed,
                    "failed": lane.failed,
                    "expired": lane.expired,
                    "rejected_busy": lane.rejected_busy,
                    "latency_ms": _percentiles(lat),
                    "batch_tokens": lane.cfg.batch_tokens,
                }
            sizes = np.array(self._batch_texts) if self._batch_texts else None
            now = time.monotonic()
            recent = [r for r in self._recent if now - r[1] <= 30.0]
            span = (max(r[1] for r in recent) - min(r[0] for r in recent)) if recent else 0.0
            return {
                "lanes": lanes,
                "workers": max(1, self.config.workers),
                "busy_workers": self._busy_workers,
                "decodes": self._decodes,
                "decoded_texts": self._decoded_texts,
                "decoded_tokens": self._decoded_tokens,
                "batch_texts": {"mean": round(float(sizes.mean()), 2), "max": int(sizes.max()),
                                **_percentiles(sizes)} if sizes is not None else None,
                "decode_ms": _percentiles(np.array([(r[1] - r[0]) * 1000 for r in self._recent])),
                "tokens_per_s": round(sum(r[3] for r in recent) / span, 1) if span > 0 else 0.0,
                "texts_per_s": round(sum(r[2] for r in recent) / span, 1) if span > 0 else 0.0,
            }


def _percentiles(values: np.ndarray | None, qs: Sequence[int] = (50, 90, 99)) -> dict[str, float]:
    if values is None or not len(values):
        return {}
    return {f"p{q}": round(float(np.percentile(values, q)), 3) for q in qs}
