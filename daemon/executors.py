"""Executors: one thread each, a bounded queue, and nothing that can end the thread silently.

Every op the I/O thread hands off runs on an executor named in the op table
(ipc/ops.py). An executor:

* bounds its queue: a full queue answers ``busy`` at once instead of growing;
* answers whatever a job raises: the project's errors with their codes,
  SQLite errors as ``storage_full`` / ``storage_error``, anything else as
  ``internal`` (logged with its traceback, counted in ``stats``), then goes on;
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
from typing import Any

from pocketembed.errors import Busy, PocketEmbedError

from . import faults

log = logging.getLogger("pocketembed.executors")

Reply = Callable[[Any, Any, PocketEmbedError | None], None]
"""reply(context, result, error): hands a finished request back to the server."""
LATER = object()
"""What a handler returns when a callback will answer the request itself."""


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


class Executor:
    """A thread that runs handed-off requests one at a time, in order."""

    def __init__(self, name: str, handle: Callable[[str, Any, Any], Any], reply: Reply, *,
                 max_queue: int = 64, on_death: Callable[[str], None] | None = None,
                 counters: dict[str, int] | None = None) -> None:
        self.name = name
        self.handle = handle
        self.reply = reply
        self.max_queue = max_queue
        self.on_death = on_death
        self.counters = counters if counters is not None else {}
        self._q: queue.Queue[tuple[str, Any, Any] | None] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"pe-{self.name}", daemon=True)
        self._thread.start()

    def submit(self, op: str, args: Any, context: Any, *, force: bool = False) -> None:
        """Queue a request, or raise Busy when the queue is full (``force``: a continuation, never refused)."""
        with self._lock:
            if not force and self._pending >= self.max_queue:
                raise Busy(f"the {self.name} executor has {self._pending} requests queued", retry_after_ms=500)
            self._pending += 1
        self._q.put((op, args, context))

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

    def _one(self, op: str, args: Any, context: Any) -> None:
        try:
            faults.check(self.name, op)
            result, error = self.handle(op, args, context), None
        except Exception as e:
            result, error = None, as_error(e, f"{op} on the {self.name} executor")
            if error.code == "internal":
                self.counters["internal_errors"] = self.counters.get("internal_errors", 0) + 1
        if result is LATER:
            return
        try:
            self.reply(context, result, error)
        except Exception:  # the reply path itself failed: log it, keep the thread
            self.counters["internal_errors"] = self.counters.get("internal_errors", 0) + 1
            log.exception("replying to %s failed", op)
