"""The daemon, wired: every part made once, handed what it needs, started and stopped in order.

The parts and the one way data flows through them::

    transport.py  (ROUTER sockets, I/O thread, replies)  → auth.py (tokens, permissions)
      → dispatch.py (the op table, bound: each op's handler on its executor)
      → handlers.py (one handler per op) → embedding.py → scheduler.py → engine.py
                                          → index.py / jobs.py → store.py, lexical.py
      ← a future per request, completed where the work finishes, encoded and sent by the transport

This module owns only the wiring and the life cycle: the data directory's
lock, start-up (bind, preload), signals, and the shutdown order (jobs commit
their chunks while the scheduler still runs; executors drain; the scheduler
stops; the sockets close).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pocketembed.clients import ClientStore
from pocketembed.errors import PocketEmbedError
from pocketembed.ipc import ops

from . import store
from .auth import Authenticator
from .dispatch import Dispatcher
from .embedding import Embedder
from .executors import Executor
from .handlers import Handlers, Storage
from .index import IndexService
from .jobs import JobQueue, JobRunner
from .metrics import Metrics
from .models import ModelRegistry
from .power import PowerMonitor, sources
from .scheduler import Scheduler
from .settings import ServeConfig
from .transport import DaemonRunning, Transport

if TYPE_CHECKING:
    from .http_server import HttpTransport

log = logging.getLogger("pocketembed.server")

EXECUTOR_QUEUES = {"control": 16, "aux": 64, "source": 8, "search": 256, "write": 256}
"""Each executor's bound (requests queued); past it: ``busy``. ``source`` runs a caller's SQL: few at once."""

__all__ = ["DaemonRunning", "DataDirLock", "Server", "run"]


class DataDirLock:
    """One daemon per data directory, whatever its socket: an flock held for the process's life.

    Two daemons on one ``index.db`` would both run its jobs. The kernel drops the
    lock when the process dies, so a kill -9 leaves nothing stale behind.
    """

    def __init__(self, home: Path) -> None:
        self.path = home / "daemon.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            if e.errno not in (errno.EROFS, errno.EACCES):
                raise
            # A read-only data directory: nothing can be written, so a second daemon cannot clash.
            log.warning("cannot create %s (%s); the data directory is read-only", self.path, e.strerror)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DaemonRunning(f"another pocketembed daemon (pid {holder}) is using the data directory "
                                f"{self.path.parent}; stop it first or use another --home") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Server:
    """The daemon's parts, made from its config."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.lock = DataDirLock(config.home)
        self.models = ModelRegistry(config.home, threads=config.threads, contexts=config.scheduler.workers,
                                    on_demand=config.on_demand, keep_alive=config.keep_alive,
                                    budget_bytes=config.memory_budget_bytes, settings=config.model_settings,
                                    on_death=self._died)
        self.scheduler = Scheduler(self.models, config.scheduler, on_death=self._died)
        self.power = PowerMonitor(config.power_policy, sources(config.power_source, config.power_procfs),
                                  last_interactive=self.scheduler.last_interactive)
        self.stopping = threading.Event()
        self.embedder = Embedder(self.scheduler, self.models, stop=self.stopping)
        counters = self.metrics.counters
        self.executors = {name: Executor(name, max_queue=size, on_death=self._died, counters=counters)
                          for name, size in EXECUTOR_QUEUES.items()}
        self.storage = self._open_storage()
        self.handlers = Handlers(config, self.models, self.scheduler, self.embedder, self.power, self.metrics,
                                 self.storage, self.executors, transport_stats=self._transport_stats)
        self.auth = Authenticator(ClientStore(config.home), self.metrics, require_auth_unix=config.require_auth_unix)
        self.dispatcher = Dispatcher(self.handlers, self.executors, self.models, self.auth)
        self.transport = Transport(config.socket_path, config.tcp, config.allow_remote, self.auth,
                                   self.dispatcher.dispatch, self.metrics)
        self.http: HttpTransport | None = None
        if config.http:
            from .http_server import HttpTransport  # h11: the `http` extra, imported only when asked for

            self.http = HttpTransport(config.http, config.allow_remote, self.auth, self.dispatcher.dispatch,
                                      self.metrics, spec=self.models.spec,
                                      model_list=lambda: self.handlers.models_list(ops.NoArgs()), on_death=self._died)

    def _transport_stats(self) -> dict:
        return {**self.transport.stats(), **(self.http.stats() if self.http is not None else {})}

    def _open_storage(self) -> Storage:
        """The index store, its job queue, runner and index service; or, if index.db cannot be opened, why not."""
        db = store.db_path(self.config.home)
        conn = None
        try:
            conn = store.connect(db)
            main = store.Store(conn)
            jobs = JobQueue(conn)
        except sqlite3.Error as e:  # a corrupt or unreadable index.db: report it, keep embedding
            error = f"{db}: {e}"
            log.error("the index store is unavailable (%s); embedding still works, index and job ops fail "
                      "with storage_error until it is repaired or removed", error)
            if conn is not None:
                conn.close()
            return Storage(None, None, None, None, error)
        cfg = self.config
        runner = JobRunner(db, self.embedder, self.power, dims=lambda m: self.models.spec(m).dims,
                           chunk_rows=cfg.job_chunk_rows, source_budget_s=cfg.source_budget_s, on_death=self._died,
                           allowed_source=self._check_source)
        index = IndexService(db, self.embedder, self.models, self.executors["search"], cache=main.cache,
                             max_collections=cfg.max_collections, kick_jobs=runner.kick,
                             allowed_source=self._check_source, source_budget_s=cfg.source_budget_s)
        return Storage(index, jobs, runner, main, None)

    def _check_source(self, db: str) -> None:
        self.handlers.check_source(db)

    # -- lifecycle --------------------------------------------------------------------

    def bind(self) -> None:
        """Lock the data directory, bind the sockets; on failure nothing is left behind."""
        self.lock.acquire()
        try:
            self.transport.bind()
            if self.http is not None:
                self.http.bind()
        except BaseException:
            self.transport.close()
            self.lock.release()
            raise
        if self.http is not None:
            self.http.start()  # /health answers 503 while the start-up models load

    def load_preloaded(self) -> None:
        """Load the start-up models; one that cannot load is logged, not fatal."""
        for name in self.config.preload:
            try:
                self.models.load(name)
            except PocketEmbedError as e:
                log.error("cannot load %s at start: error[%s] %s", name, e.code, e.message)

    def serve_forever(self) -> int:
        """Run until SIGTERM/SIGINT; then drain, reply and clean up. Returns the exit status."""
        self.scheduler.start()
        self.models.start()
        for ex in self.executors.values():
            ex.start()
        if self.storage.runner is not None:
            self.storage.runner.start()
        if self.http is not None:
            self.http.set_ready()
        if not self.transport.serve():
            self.transport.die()  # a thread died: does not return
        self.shutdown()
        return 0

    def request_stop(self, *_: object) -> None:
        if not self.stopping.is_set():
            log.info("stopping: finishing %d in-flight request(s)", self.transport.held)
        self.stopping.set()
        self.transport.request_stop()
        if self.http is not None:
            self.http.request_stop()

    def _died(self, name: str) -> None:
        self.transport.thread_died(name)

    def shutdown(self) -> None:
        self.stopping.set()
        if self.storage.runner is not None:
            self.storage.runner.stop()  # commits the chunks in flight, so the scheduler must still run
        for name in ("search", "write", "control", "aux", "source"):
            self.executors[name].stop(timeout=30)
        if self.storage.index is not None:
            self.storage.index.close()  # after the search executor: it hands source reads over until it stops
        self.scheduler.stop()
        self.transport.drain_replies()
        if self.http is not None:
            self.http.close()  # its requests' futures are done: their replies go out
        self.models.close()
        self.handlers.close()
        if self.storage.main is not None:
            self.storage.main.conn.close()
        self.transport.close()
        self.lock.release()
        log.info("stopped")


def run(config: ServeConfig, on_ready: Callable[[], None] | None = None) -> int:
    """Bind, preload, serve until a signal; the exit status of ``pocketembed serve``."""
    # A write past RLIMIT_FSIZE must fail the write (storage_full), not kill the daemon.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    server = Server(config)
    server.bind()
    signal.signal(signal.SIGTERM, server.request_stop)
    signal.signal(signal.SIGINT, server.request_stop)
    try:
        server.load_preloaded()
    except BaseException:
        server.shutdown()
        raise
    if on_ready:
        on_ready()
    return server.serve_forever()
