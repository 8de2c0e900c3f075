"""Executors: one thread each, a bounded queue, and nothing that can end the thread silently.

Every op the I/O thread hands off runs on the executor the op table names
(ipc/ops.py). ``submit`` returns a future, the daemon's one way back for a
result: the work's return value, or a future it returned (work that waits on
the scheduler, the source readers or another executor; ``then`` chains it),
completes the request's future. An executor:

* bounds its queue: a full queue answers ``busy`` at once instead of growing;
* turns whatever the work raises into the error its future holds: the
  project's errors with their codes, SQLite errors as ``storage_full`` /
  ``storage_error``, anything else as ``internal`` (logged with its traceback,
  counted in ``stats``), then goes on;
* if its thread ends anyway (a failure in the executor itself), calls
  ``on_death``: the server then answers every request it holds and exits
  non-zero, so the supervisor restarts it; never a half-alive daemon.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from pocketembed.errors import Busy, PocketEmbedError

from . import faults

log = logging.getLogger("pocketembed.executors")



class StorageError(PocketEmbedError):
    """The daemon's SQLite store failed: disk full, read-only, corrupt, I/O error."""

    code = "storage_error"

    @classmethod
    def from_sqlite(cls, e: sqlite3.Error) -> StorageError:
        text = str(e)
        if "full" in text or "disk I/O" in text:
            err = cls(f"the daemon's storage cannot be written ({text}): is the disk full? "
                      "Nothing of this request was stored")
            err.code = "storage_full" if "full" in text else "storage_error"
            return err
        return cls(f"the daemon's storage failed ({text}); nothing of this request was stored")


def as_error(e: BaseException, what: str) -> PocketEmbedError:
    """Any exception a handler raised, as the error its reply carries."""
    if isinstance(e, PocketEmbedError):
        return e
    code = getattr(e, "code", None)
    if isinstance(code, str) and hasattr(e, "message"):  # the protocol's own errors
        return PocketEmbedError(e.message, code=code)
    if isinstance(e, sqlite3.Error):
        return StorageError.from_sqlite(e)
    log.error("%s failed", what, exc_info=e)
    return PocketEmbedError(f"internal error in {what}: {type(e).__name__}: {e}", code="internal")


def resolve(out: Future, value: Any) -> None:
    """Complete ``out`` with ``value``, or, if ``value`` is itself a future, with its outcome once it has one."""
    if isinstance(value, Future):
        value.add_done_callback(lambda f: _copy(f, out))
    else:
        out.set_result(value)


def _copy(src: Future, dst: Future) -> None:
    error = src.exception()
    if error is not None:
        dst.set_exception(error)
    else:
        dst.set_result(src.result())


def failed(error: BaseException) -> Future:
    """A future that already holds ``error``."""
    out: Future = Future()
    out.set_exception(error)
    return out


def then(src: Future, fn: Callable[[Any], Any], on: Executor | None = None, what: str = "") -> Future:
    """A future of ``fn(src's result)``: run on executor ``on`` (a continuation: never refused ``busy``), or
    where ``src`` completes; ``src``'s error passes straight through. ``fn`` may return a future in turn."""
    out: Future = Future()

    def step(f: Future) -> None:
        error = f.exception()
        if error is not None:
            out.set_exception(error)
        elif on is not None:
            _copy_later(on.submit(lambda: fn(f.result()), what, force=True), out)
        else:
            try:
                resolve(out, fn(f.result()))
            except Exception as e:
                out.set_exception(as_error(e, what or "a continuation"))

    src.add_done_callback(step)
    return out


def _copy_later(src: Future, dst: Future) -> None:
    src.add_done_callback(lambda f: _copy(f, dst))


class Executor:
    """A thread that runs handed-off work one at a time, in order."""

    def __init__(self, name: str, *, max_queue: int = 64, on_death: Callable[[str], None] | None = None,
                 counters: dict[str, int] | None = None) -> None:
        self.name = name
        self.max_queue = max_queue
        self.on_death = on_death
        self.counters = counters if counters is not None else {}
        self._q: queue.Queue[tuple[Callable[[], Any], str, Future] | None] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"pe-{self.name}", daemon=True)
        self._thread.start()

    def submit(self, work: Callable[[], Any], what: str, *, force: bool = False) -> Future:
        """Queue ``work`` (``what`` names it in errors and failpoints); Busy when the queue is full.

        ``force``: a continuation of work already accepted, never refused.
        """
        with self._lock:
            if not force and self._pending >= self.max_queue:
                raise Busy(f"the {self.name} executor has {self._pending} requests queued", retry_after_ms=500)
            self._pending += 1
        out: Future = Future()
        self._q.put((work, what, out))
        return out

    def stop(self, timeout: float = 60) -> None:
        """Finish what is queued, then end the thread."""
        self._stopping = True
        self._q.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queued(self) -> int:
        return self._pending

    def _run(self) -> None:
        try:
            while (job := self._q.get()) is not None:
                with self._lock:
                    self._pending -= 1
                self._one(*job)
        finally:
            if not self._stopping:
                log.critical("the %s executor's thread ended unexpectedly", self.name)
                if self.on_death is not None:
                    self.on_death(self.name)

    def _one(self, work: Callable[[], Any], what: str, out: Future) -> None:
        try:
            faults.check(self.name, what)
            value = work()
        except Exception as e:
            error = as_error(e, f"{what} on the {self.name} executor")
            if error.code == "internal":
                self.counters["internal_errors"] = self.counters.get("internal_errors", 0) + 1
            out.set_exception(error)
            return
        try:
            resolve(out, value)
        except Exception:  # a done-callback failed (the reply path): log it, keep the thread
            self.counters["internal_errors"] = self.counters.get("internal_errors", 0) + 1
            log.exception("replying to %s failed", what)
