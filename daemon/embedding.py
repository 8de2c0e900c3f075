"""The one way into the scheduler: every caller's texts, embedded or scored, as a future.

The server's ``embed`` and ``rerank``, a search's query, ``index.add``'s items
and a job's chunks all come through ``Embedder``, which:

* resolves the model and applies its query or document prefix (catalog or
  config) for the input type, so no caller prefixes texts itself;
* gives the scheduler the model's sequence limit;
* names a failing text by its caller's index (``texts[3]``, ``documents[0]``);
* for the daemon's own bulk work, waits out ``busy`` and a model being
  unloaded instead of failing (``embed_wait(..., retry=True)``);
* measures the int8 ranges of a (model, dims) the store needs for a new
  collection (``ranges``), so the store is handed values and never calls up
  into inference.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, NamedTuple

import numpy as np

from pocketembed.errors import Busy, ModelUnloading, PocketEmbedError, ShuttingDown

from .calibration import calibration_texts, ranges_of
from .executors import then
from .models import ModelRegistry
from .scheduler import INTERACTIVE, EmbedTask, Scheduler

Label = Callable[[int], str]
"""A failing text's name in its caller's terms, from its index: ``texts[3]``."""


def _label(name: str) -> Label:
    return lambda i: f"{name}[{i}]"


class Embedded(NamedTuple):
    """A request's vectors (or raw scores) with what they cost, for replies that report usage."""

    values: np.ndarray
    tokens: int
    """Tokens decoded, special tokens and prefixes included."""
    load_ms: float
    """Time spent waiting for the model (a load on demand, else ~0)."""


class Embedder:
    """Texts to vectors (or cross-encoder scores) through the scheduler, for every part of the daemon."""

    def __init__(self, scheduler: Scheduler, models: ModelRegistry, stop: threading.Event | None = None) -> None:
        self.scheduler = scheduler
        self.models = models
        self.stop = stop or threading.Event()
        """Set when the daemon stops: a retrying wait gives up (ShuttingDown)."""
        self._ranges_lock = threading.Lock()
        self._calibration: dict[str, np.ndarray] = {}

    def embed(self, texts: Sequence[str], model: str | None, *, input_type: str | None = None,
              lane: str = INTERACTIVE, dims: int | None = None, normalize: bool = True, truncate: bool = False,
              deadline: float | None = None, keep_alive: float | None = None,
              label: Label | None = _label("texts"), counted: bool = False) -> Future:
        """A future of the texts' vectors (float32, one row per text); refused at once when the lane is full.

        ``counted``: an ``Embedded`` instead, the vectors with their token count and model wait.
        """
        spec = self.models.spec(model, "embed")
        prefix = self.models.prefix(spec.name, input_type)
        task = EmbedTask(texts=[prefix + t for t in texts] if prefix else list(texts), model=spec.name, lane=lane,
                         normalize=normalize, dims=dims, truncate=truncate, deadline=deadline, keep_alive=keep_alive)
        return self._submit(task, spec.name, label, counted)

    def rerank(self, query: str, documents: Sequence[str], model: str | None, *, lane: str = INTERACTIVE,
               truncate: bool = False, deadline: float | None = None, keep_alive: float | None = None,
               counted: bool = False) -> Future:
        """A future of a cross-encoder's raw scores of each (query, document) pair (``counted``: an ``Embedded``)."""
        spec = self.models.spec(model, "rerank")
        task = EmbedTask(texts=list(documents), query=query, model=spec.name, lane=lane, truncate=truncate,
                         deadline=deadline, keep_alive=keep_alive)
        return self._submit(task, spec.name, _label("documents"), counted)

    def _submit(self, task: EmbedTask, model: str, label: Label | None, counted: bool) -> Future:
        out = _named(self.scheduler.submit(task, max_tokens=self.models.max_tokens(model)), label)
        if counted:
            return then(out, lambda values: Embedded(values, task.n_tokens, task.load_ms), what="usage")
        return out

    def embed_wait(self, texts: Sequence[str], model: str | None, *, retry: bool = False, **kw: Any) -> np.ndarray:
        """``embed`` and wait, on a thread that needs the vectors to go on (writes, jobs, calibration).

        ``retry``: the daemon's own bulk work waits while the lane is full (``busy``)
        or its model is being unloaded (the unload waits only for work already
        queued; then the model loads again on demand), until the daemon stops.
        """
        return self.submit_retrying(lambda: self.embed(texts, model, **kw), retry).result()

    def submit_retrying(self, submit: Callable[[], Future], retry: bool, stop: threading.Event | None = None) -> Future:
        """``submit()``, retried while it is refused ``busy`` or for an unloading model when ``retry``,
        until ``stop`` (default: the daemon's) is set."""
        stop = stop or self.stop
        unloading_wait = 0.05
        while True:
            try:
                return submit()
            except Busy as e:
                if not retry:
                    raise
                if stop.wait(e.retry_after_ms / 1000):
                    raise ShuttingDown("the daemon is shutting down") from None
            except ModelUnloading:
                if not retry:
                    raise
                if stop.wait(unloading_wait):
                    raise ShuttingDown("the daemon is shutting down") from None
                unloading_wait = min(2 * unloading_wait, 1.0)

    def ranges(self, model: str, dims: int) -> tuple[np.ndarray, np.ndarray]:
        """The int8 ranges of (model, dims): the model's vectors of the calibration texts (calibration.py).

        Measured on first use per model and daemon run (256 texts, background
        lane), then kept; called before a write's transaction, never inside one.
        """
        with self._ranges_lock:
            vectors = self._calibration.get(model)
            if vectors is None:
                vectors = self.embed_wait(calibration_texts(), model, retry=True, truncate=True, label=None)
                self._calibration[model] = vectors
        return ranges_of(vectors, dims)


def _named(future: Future, label: Label | None) -> Future:
    """The scheduler's future, its error naming the failing text as the caller counts them."""
    if label is None:
        return future
    out: Future = Future()

    def done(f: Future) -> None:
        error = f.exception()
        if error is None:
            out.set_result(f.result())
            return
        index = getattr(error, "index", None)
        if isinstance(error, PocketEmbedError) and index is not None:
            renamed = copy.copy(error)
            renamed.args = (f"{label(index)}: {error.message}",)
            renamed.index = None
            error = renamed
        out.set_exception(error)

    future.add_done_callback(done)
    return out
