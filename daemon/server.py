"""The daemon's server loop: one ROUTER socket, one I/O thread, executors behind it.

The I/O thread owns the ROUTER socket (ZeroMQ sockets are not thread-safe). It
decodes each request against the op table (ipc/ops.py: the argument schema,
the executor, the permission), answers the inline ops itself (``ping``,
``models.list``) and hands every other op to the executor the table names:
the scheduler for ``embed``, the index service's search and write threads,
the control thread (model loads), the aux thread (stats, jobs) and the source
thread (``jobs.submit`` reads a caller's SQLite file). Each executor's queue is
bounded: a full one answers ``busy``.

Authentication: requests on the TCP endpoint (which every app on a phone can
reach) must carry a client token whose permissions cover the op (the op
table's ``permission``; ``pocketembed/clients.py``); the token is checked
before the arguments are even decoded. The Unix socket is private to the
daemon's user, whose requests are admin unless ``require_auth_unix`` is set.
TCP has its own ROUTER socket, so the transport of a request is never a guess.

The I/O thread holds every request it handed off, under a serial number, until
its reply comes back through an inproc PUSH/PULL pair; so every request gets
exactly one reply, and if an executor's thread dies anyway the I/O thread
answers everything it still holds and the daemon exits non-zero (70) for its
supervisor to restart it, instead of living on half-alive.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import socket
import sqlite3
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import zmq

from pocketembed import __version__
from pocketembed.clients import ClientStore, Forbidden, Unauthorized, allows
from pocketembed.errors import Busy, PocketEmbedError, UnknownJob
from pocketembed.gguf_models import manifest
from pocketembed.gguf_models.catalog import DEFAULT_MODEL, all_specs
from pocketembed.ipc import ops
from pocketembed.ipc import protocol as P

from . import store
from .executors import Executor, StorageError
from .calibration import ModelRanges
from .engine import scale_scores
from .index import IndexService
from .settings import ServeConfig
from .jobs import JobQueue, JobRunner, JobSpec, SourceTable, check_source_allowed
from .models import ModelRegistry, parse_keep_alive
from .power import PowerMonitor, sources
from .scheduler import INTERACTIVE, EmbedTask, Scheduler, embed_sync

log = logging.getLogger("pocketembed.server")

FRAME_CAP = 16 * 1024 * 1024
"""ZeroMQ drops a peer whose frame is larger than this; up to it, an over-size request gets ``too_large``."""
MAX_INFLIGHT_PER_CLIENT = 256
"""Requests one connection may have waiting for replies; beyond it: ``busy``."""
REPLY_HWM = 8
"""Replies ZeroMQ queues for one connection (its send high-water mark). Past it the daemon keeps the
connection's replies in a backlog of its own, bounded in bytes (below), and sends them as the
connection reads; so a burst is delayed, never lost, and a connection that does not read costs at
most REPLY_HWM replies in ZeroMQ plus BACKLOG_BYTES_PER_CONNECTION."""
BACKLOG_BYTES_PER_CONNECTION = 16 * 1024 * 1024
"""Replies waiting in one connection's backlog; past it its new requests are answered ``busy`` unrun,
and a reply that does not fit is dropped (``stats.replies_dropped``): that client is not reading."""
BACKLOG_BYTES = 64 * 1024 * 1024
"""Replies waiting in all connections' backlogs together."""
BACKLOG_RETRY_S = 0.002
"""While some backlog waits, the I/O loop retries it this often (ZeroMQ does not say which peer can take
more); with no backlog it sleeps until an event."""
BACKLOG_EXPIRY_S = 60.0
"""A backlog that has not moved for this long is dropped: its client is gone or never reads."""
MAX_REPLY_BYTES = 16 * 1024 * 1024
"""A larger reply is answered ``too_large`` instead (ask for fewer hits or texts)."""
MAX_TCP_CONNECTIONS = 64
"""Open TCP connections; a new one beyond them is closed as soon as it is accepted."""
HANDSHAKE_S = 5
"""A TCP connection that has not finished ZeroMQ's handshake by then is closed (it holds a connection slot)."""
EXIT_THREAD_DIED = 70
BAD_TOKENS_BEFORE_BLOCK = 10
"""Bad tokens a connection may send before it is refused outright for BLOCK_S."""
BLOCK_S = 60.0
_WAKE = 0
"""The serial number of an inproc message that only wakes the I/O loop (a signal, a thread that died)."""


class DaemonRunning(PocketEmbedError):
    code = "daemon_running"


@dataclass
class _Backlog:
    """One connection's replies that ZeroMQ could not take yet, oldest first."""

    sock: zmq.Socket
    identity: list[bytes]
    moved: float
    """When a reply of it last went out (or it was made)."""
    replies: deque[bytes] = field(default_factory=deque)
    nbytes: int = 0
    full: bool = False
    """A reply did not fit: new requests are answered busy unrun until half of the backlog is read."""


@dataclass
class _Held:
    """A request handed to an executor, until its reply goes out."""

    sock: zmq.Socket
    identity: list[bytes]
    req_id: Any
    op: str
    started: float


class _Stats:
    """Counters and a latency window for the ``stats`` op."""

    def __init__(self) -> None:
        self.started = time.time()
        self.requests = 0
        self.errors = 0
        self.by_op: dict[str, int] = {}
        self.latency_ms: deque[float] = deque(maxlen=2048)
        self.counters: dict[str, int] = {"internal_errors": 0, "replies_dropped": 0, "connections_refused": 0}
        self.auth = {"unauthorized": 0, "forbidden": 0, "blocked": 0}
        """Refusals: no or unknown token, a token without the op's permission, a connection blocked for bad tokens."""
        """Shared with the executors: ``internal_errors`` counts bugs answered ``internal``."""
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


def check_socket_free(path: Path) -> None:
    """Take over a stale socket file; refuse when a live daemon answers on it."""
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise DaemonRunning(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            log.info("removing stale socket %s left by a crashed daemon", path)
            path.unlink(missing_ok=True)
            return
        raise
    finally:
        probe.close()
    raise DaemonRunning(f"another pocketembed daemon is serving on {path}; stop it first or use --socket")


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
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.stats = _Stats()
        self.lock = DataDirLock(config.home)
        self.models = ModelRegistry(config.home, threads=config.threads, contexts=config.scheduler.workers,
                                    on_demand=config.on_demand, keep_alive=config.keep_alive,
                                    budget_bytes=config.memory_budget_bytes, settings=config.model_settings,
                                    on_death=self._died)
        self.scheduler = Scheduler(self.models, config.scheduler, on_death=self._died)
        self.power = PowerMonitor(config.power_policy, sources(config.power_source, config.power_procfs),
                                  last_interactive=self.scheduler.last_interactive)
        self.ctx = zmq.Context()
        """The inproc reply sockets' context (PUSH per worker thread, PULL on the I/O thread)."""
        self.net_ctx = zmq.Context()
        """The ROUTER's own context: terminating it flushes the replies queued on it, alone."""
        self._stop = threading.Event()
        self._fatal: str | None = None
        self._held: dict[int, _Held] = {}
        self._per_client: dict[bytes, int] = {}
        self._serials = iter(range(1, 1 << 62))
        self._reply_addr = f"inproc://replies-{id(self)}"
        self._tls = threading.local()
        self._push_socks: list[zmq.Socket] = []
        self._push_lock = threading.Lock()
        self._pull: zmq.Socket | None = None
        self._push_spare: zmq.Socket | None = None
        """A PUSH socket for a thread that cannot make its own (out of file descriptors), under _push_lock."""
        self.router: zmq.Socket | None = None
        self.tcp_router: zmq.Socket | None = None
        self._bound_path: Path | None = None
        self.clients = ClientStore(config.home)
        self._bad_tokens: dict[bytes, tuple[int, float]] = {}
        """Connection → (bad tokens in a row, blocked until). On TCP the connection is its file descriptor in
        the daemon (ZeroMQ's SRCFD), which no client can choose; the entry goes when the connection closes
        (the ROUTER's monitor), so a later connection on the same fd starts clean. A ZMTP 2.0 peer's
        messages carry no fd: it is keyed by its routing id, apart from the fd keys, so it can lock out
        only another such peer. On the Unix socket, whose only peer is the owner, its routing id."""
        self._tcp_monitor: zmq.Socket | None = None
        self._tcp_fds: set[int] = set()
        """Open TCP connections (their fds, from the ROUTER's monitor), capped at MAX_TCP_CONNECTIONS."""
        self._backlog: dict[bytes, _Backlog] = {}
        """Routing id → replies ZeroMQ could not take yet (its queue for that peer at REPLY_HWM), in order."""
        self._backlog_bytes = 0

        counters = self.stats.counters
        self.executors = {
            "control": Executor("control", self._control_op, self._reply, max_queue=16, on_death=self._died, counters=counters),
            "aux": Executor("aux", self._aux_op, self._reply, max_queue=64, on_death=self._died, counters=counters),
            "source": Executor("source", self._source_op, self._reply, max_queue=8, on_death=self._died, counters=counters),
        }
        self.store_error: str | None = None
        self._db: sqlite3.Connection | None = None
        self._source: tuple[store.Store, JobQueue] | None = None
        """The source thread's own store and job queue (made on that thread's first job; a connection
        is never shared by two threads)."""
        self.index: IndexService | None = None
        self.runner: JobRunner | None = None
        db = store.db_path(config.home)
        try:
            self._db = store.connect(db)
            self.store = store.Store(self._db)
            self.jobs = JobQueue(self._db)
        except sqlite3.Error as e:  # a corrupt or unreadable index.db: report it, keep embedding
            self.store_error = f"{db}: {e}"
            log.error("the index store is unavailable (%s); embedding still works, index and job ops fail "
                      "with storage_error until it is repaired or removed", self.store_error)
            if self._db is not None:
                self._db.close()
                self._db = None
            return
        self.model_ranges = ModelRanges(lambda texts, model: embed_sync(self.scheduler, texts, model, truncate=True,
                                                                        max_tokens=self.models.max_tokens(model)))
        self.runner = JobRunner(db, self.scheduler, self.power, prefix=lambda m: self.models.prefix(m, "document"),
                                dims=lambda m: self.models.spec(m).dims, chunk_rows=config.job_chunk_rows,
                                source_budget_s=config.source_budget_s, on_death=self._died,
                                allowed_source=self._check_source, ranges=self.model_ranges.get)
        self.index = IndexService(db, self.scheduler, self.models, reply=self._reply, on_death=self._died,
                                  counters=counters, max_collections=config.max_collections,
                                  kick_jobs=self.runner.kick, ranges=self.model_ranges.get,
                                  allowed_source=self._check_source, source_budget_s=config.source_budget_s)

    # -- lifecycle --------------------------------------------------------------------

    def bind(self) -> None:
        """Lock the data directory, bind the Unix socket (and TCP, if asked); on failure nothing is left behind."""
        tcp_host, tcp_port = _check_tcp(self.config.tcp, self.config.allow_remote) if self.config.tcp else (None, None)
        self.lock.acquire()
        try:
            self._bind(tcp_host, tcp_port)
        except BaseException:
            self._close_sockets()
            self.lock.release()
            raise

    def _bind(self, tcp_host: str | None, tcp_port: str | None) -> None:
        path = self.config.socket_path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path.parent, 0o700)
        check_socket_free(path)
        self.router = self._router()
        old = os.umask(0o177)
        try:
            self.router.bind(f"ipc://{path}")
        finally:
            os.umask(old)
        self._bound_path = path
        os.chmod(path, 0o600)
        if tcp_host is not None:
            # Not ZeroMQ's ZAP (it refuses ZMTP 2.0 peers such as JeroMQ 0.3): the monitor tells each
            # connection's fd as it opens and closes, on the I/O thread.
            self.tcp_router = self._router()
            self.tcp_router.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_S * 1000)
            self._tcp_monitor = self.tcp_router.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
            self.tcp_router.bind(f"tcp://{tcp_host}:{tcp_port}")
        self._pull = self.ctx.socket(zmq.PULL)
        self._pull.bind(self._reply_addr)
        self._push_spare = self.ctx.socket(zmq.PUSH)
        self._push_spare.connect(self._reply_addr)
        self._push_socks.append(self._push_spare)

    def _router(self) -> zmq.Socket:
        sock = self.net_ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, FRAME_CAP)
        sock.setsockopt(zmq.SNDHWM, REPLY_HWM)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full reply queue raises EAGAIN instead of dropping unseen
        return sock

    def load_preloaded(self) -> None:
        """Load the start-up models; one that cannot load is logged, not fatal."""
        for name in self.config.preload:
            try:
                self.models.load(name)
            except PocketEmbedError as e:
                log.error("cannot load %s at start: error[%s] %s", name, e.code, e.message)

    def serve_forever(self) -> int:
        """Run the I/O loop until SIGTERM/SIGINT; then drain, reply and clean up. Returns the exit status."""
        self.scheduler.start()
        self.models.start()
        for ex in self.executors.values():
            ex.start()
        if self.runner is not None:
            self.runner.start()
        if self.index is not None:
            self.index.start()
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        if self.tcp_router is not None:
            poller.register(self.tcp_router, zmq.POLLIN)
        poller.register(self._pull, zmq.POLLIN)
        if self._tcp_monitor is not None:
            poller.register(self._tcp_monitor, zmq.POLLIN)
        # A signal may land on any thread; Python runs its handler on this one only once it is
        # awake. The wake-up fd makes a signal wake the poll, so it needs no timeout.
        signal_r, signal_w = socket.socketpair()
        signal_r.setblocking(False)
        signal_w.setblocking(False)
        previous_fd = signal.set_wakeup_fd(signal_w.fileno(), warn_on_full_buffer=False)
        poller.register(signal_r, zmq.POLLIN)
        log.info("serving on ipc://%s%s (pid %d)", self.config.socket_path,
                 f" and tcp://{self.config.tcp}" if self.config.tcp else "", os.getpid())
        try:
            while not (self._stop.is_set() and not self._held and not self._backlog):
                # No timeout: the loop wakes for a request, a reply, a signal, or a thread's wake-up message.
                events = dict(poller.poll(BACKLOG_RETRY_S * 1000 if self._backlog else None))
                if self._backlog:
                    self._flush_backlog()
                if signal_r.fileno() in events:
                    _drain_fd(signal_r)
                if self._pull in events:
                    self._drain_replies()
                if self._fatal is not None:
                    return self._die()
                if self._tcp_monitor is not None:
                    self._track_connections()  # before the requests: a closed fd's block is gone first
                for sock in (self.router, self.tcp_router):
                    if sock is not None and sock in events:
                        self._read_requests(sock)
        finally:
            signal.set_wakeup_fd(previous_fd)
            signal_r.close()
            signal_w.close()
            if self._fatal is None:
                self._shutdown()
        return 0

    def request_stop(self, *_: object) -> None:
        if not self._stop.is_set():
            log.info("stopping: finishing %d in-flight request(s)", len(self._held))
        self._stop.set()
        self._wake()

    def _wake(self) -> None:
        """Make the I/O loop look at its state now (from a signal handler or another thread)."""
        try:
            self._push_frames([struct.pack("<Q", _WAKE), b""])
        except zmq.ZMQError:  # the sockets are already closed
            pass

    def _shutdown(self) -> None:
        if self.runner is not None:
            self.runner.stop()  # commits the chunks in flight, so the scheduler must still run
        if self.index is not None:
            self.index.stop()
        for ex in self.executors.values():
            ex.stop(timeout=30)
        self.scheduler.stop()
        self._drain_replies()
        self.models.close()
        for conn in (self._db, self._source[0].conn if self._source else None):
            if conn is not None:
                conn.close()
        self._close_sockets()
        self.lock.release()
        log.info("stopped")

    def _died(self, name: str) -> None:
        """From a thread that is ending unexpectedly: the I/O thread answers what it holds and exits."""
        self._fatal = name
        self._wake()

    def _die(self) -> int:
        """A thread died: answer every request held, then exit at once for the supervisor to restart us."""
        log.critical("the daemon's %s thread died; answering %d held request(s) and exiting with status %d",
                     self._fatal, len(self._held), EXIT_THREAD_DIED)
        message = f"the daemon's {self._fatal} thread failed; the daemon is restarting, retry shortly"
        for held in list(self._held.values()):
            self._send(held.sock, held.identity, P.error_reply(held.req_id, P.INTERNAL, message))
        self._held.clear()
        self.router.close(linger=2000)
        if self.tcp_router is not None:
            self.tcp_router.close(linger=2000)
        self.net_ctx.term()  # returns once those replies are sent (or 2 s passed)
        if self._bound_path is not None:
            self._bound_path.unlink(missing_ok=True)
        logging.shutdown()
        os._exit(EXIT_THREAD_DIED)  # wedged threads cannot be joined; the kernel frees the data directory's lock

    def _close_sockets(self) -> None:
        if self._tcp_monitor is not None:
            self._tcp_monitor.close(linger=0)
        with self._push_lock:
            for sock in self._push_socks:
                sock.close(linger=1000)
            self._push_socks.clear()
        for sock in (self.router, self.tcp_router):
            if sock is not None:
                sock.close(linger=1000)
        self.net_ctx.term()
        if self._pull is not None:
            self._pull.close(linger=0)
        self.ctx.term()
        if self._bound_path is not None:  # only a socket file this daemon created
            self._bound_path.unlink(missing_ok=True)

    # -- I/O thread -------------------------------------------------------------------

    def _read_requests(self, sock: zmq.Socket) -> None:
        if sock is self.tcp_router:
            for parts in _pending(sock, copy=False):
                frames = [p.bytes for p in parts]
                try:
                    conn = b"fd:%d" % parts[-1].get(zmq.SRCFD)  # the daemon's own fd of the connection: unspoofable
                except zmq.ZMQError:  # a ZMTP 2.0 peer (JeroMQ 0.3) carries no fd: its routing id, as before
                    conn = b"id:" + frames[0]
                self._route(sock, frames, conn)
        else:
            for frames in _pending(sock):
                self._route(sock, frames, frames[0])

    def _track_connections(self) -> None:
        """Open TCP connections, from the ROUTER's monitor; one beyond MAX_TCP_CONNECTIONS is shut at once."""
        for frames in _pending(self._tcp_monitor):
            event, fd = struct.unpack("=Hi", frames[0][:6])
            self._bad_tokens.pop(b"fd:%d" % fd, None)  # a new connection, or the end of one: no block carries over
            if event != zmq.EVENT_ACCEPTED:
                self._tcp_fds.discard(fd)
            elif len(self._tcp_fds) >= MAX_TCP_CONNECTIONS:
                self.stats.count("connections_refused")
                _shut(fd)  # ZeroMQ sees the connection fail and closes it (its monitor says so)
            else:
                self._tcp_fds.add(fd)

    def _route(self, sock: zmq.Socket, frames: list[bytes], conn: bytes) -> None:
        started = time.perf_counter()
        identity, payload = _split_envelope(frames)
        waiting = self._backlog.get(identity[0]) if identity else None
        if waiting is not None and waiting.full:
            # It has not read its last replies: nothing more is run for it until they get through.
            self._send(sock, identity, P.error_reply(None, P.BUSY, "this connection is not reading its replies; "
                                                     "read them before sending more", retry_after_ms=1000))
            self.stats.record("?", False, started)
            return
        if payload is None:
            # Wrong frame count: answer on the identity we have, if any.
            if identity:
                self._send(sock, identity, P.error_reply(None, P.BAD_FRAME, "expected one payload frame after the routing envelope"))
                self.stats.record("?", False, started)
            return
        req_id = None
        try:
            # Authenticate, then authorise, then validate: a refusal says nothing about what was refused.
            req = ops.decode_envelope(payload)
            req_id = req.id
            granted = self._authenticate(sock, conn, req)
            ops.known_op(req)
            if not req.op.allowed_before_args(granted, req.raw_args):
                raise self._forbidden(req.op)
            ops.decode_args(req)
            if not allows(granted, req.op.needs(req.args)):
                raise self._forbidden(req.op)
            if self._stop.is_set():
                raise P.ProtocolError(P.SHUTTING_DOWN, "the daemon is shutting down")
            for model in (getattr(req.args, "model", None), getattr(req.args, "rerank", None)):
                if model is not None:
                    self.models.spec(model)  # unknown_model now, before anything is queued
            executor = req.op.executor
            if executor == "inline":
                self._send(sock, identity, P.ok_reply(req.id, self._inline(req.op.name)))
                self.stats.record(req.op.name, True, started)
                return
            if self.index is None and (executor == "index" or req.op.name.startswith("jobs.")):
                raise StorageError(f"the index store is unavailable: {self.store_error}")
            if self._per_client.get(identity[0], 0) >= MAX_INFLIGHT_PER_CLIENT:
                raise Busy(f"this connection has {MAX_INFLIGHT_PER_CLIENT} requests waiting for replies; "
                           "wait for some before sending more", retry_after_ms=200)
            serial = self._hold(sock, identity, req, started)
            try:
                self._hand_off(serial, req, granted)
            except BaseException:
                self._release(serial)
                raise
        except P.ProtocolError as e:
            extra = {k: v for k, v in e.extra.items() if k != "id"}
            self._send(sock, identity, P.error_reply(e.extra.get("id", req_id), e.code, e.message, **extra))
            self.stats.record("?", False, started)
        except PocketEmbedError as e:
            retry = getattr(e, "retry_after_ms", None)  # busy, and a connection blocked for bad tokens
            extra = {"retry_after_ms": retry} if retry is not None else {}
            self._send(sock, identity, P.error_reply(req_id, e.code, e.message, **extra))
            self.stats.record("?", False, started)

    def _forbidden(self, op: ops.Op) -> Forbidden:
        self.stats.auth["forbidden"] += 1
        return Forbidden(f"this client may not {op.name}" + ("" if "{" in (op.permission or "") else f" (needs {op.permission})"))

    def _authenticate(self, sock: zmq.Socket, conn: bytes, req: ops.Request) -> tuple[str, ...]:
        """The permissions this request carries; Unauthorized without a known token where one is needed.

        Never logs the token. A connection that sent BAD_TOKENS_BEFORE_BLOCK bad
        tokens in a row is refused without a check for BLOCK_S: a flood of
        guesses costs the daemon a dict lookup each.
        """
        if req.op is not None and req.op.permission is None:
            return ()
        if sock is self.router and not self.config.require_auth_unix:
            return ("admin",)  # the Unix socket is 0600 in a 0700 directory: the peer is the owner
        bad, until = self._bad_tokens.get(conn, (0, 0.0))
        now = time.monotonic()
        if until > now:
            self.stats.auth["blocked"] += 1
            blocked = Unauthorized(f"too many bad tokens from this connection; refused for {until - now:.0f} s")
            blocked.retry_after_ms = int((until - now) * 1000) + 1
            raise blocked
        client = self.clients.authenticate(req.auth) if req.auth else None
        if client is None:
            self.stats.auth["unauthorized"] += 1
            if req.auth:
                bad += 1
                if len(self._bad_tokens) > 10_000:
                    self._bad_tokens.clear()
                self._bad_tokens[conn] = (bad, now + BLOCK_S if bad >= BAD_TOKENS_BEFORE_BLOCK else 0.0)
            raise Unauthorized("this endpoint needs a client token in the request's auth"
                               + (" (this one is unknown or revoked)" if req.auth else "")
                               + "; the phone's owner creates one with `pocketembed clients add`")
        self._bad_tokens.pop(conn, None)
        return client.allow

    def _hand_off(self, serial: int, req: ops.Request, granted: tuple[str, ...]) -> None:
        name, args = req.op.name, req.args
        if name == "rerank":
            self._submit_rerank(serial, args)
        elif req.op.executor == "scheduler":
            self._submit_embed(serial, args)
        elif req.op.executor == "index":
            self.index.submit(name, args, serial)
        elif req.op.by_executor:  # its permission depends on stored state: the executor checks it
            self.executors[req.op.executor].submit(name, (args, granted), serial)
        else:
            self.executors[req.op.executor].submit(name, args, serial)

    def _hold(self, sock: zmq.Socket, identity: list[bytes], req: ops.Request, started: float) -> int:
        serial = next(self._serials)
        self._held[serial] = _Held(sock, identity, req.id, req.op.name, started)
        self._per_client[identity[0]] = self._per_client.get(identity[0], 0) + 1
        return serial

    def _release(self, serial: int) -> _Held | None:
        held = self._held.pop(serial, None)
        if held is not None:
            left = self._per_client[held.identity[0]] - 1
            if left:
                self._per_client[held.identity[0]] = left
            else:
                del self._per_client[held.identity[0]]
        return held

    def _submit_embed(self, serial: int, a: ops.EmbedArgs) -> None:
        spec = self.models.spec(a.model, "embed")
        texts = a.texts
        prefix = self.models.prefix(spec.name, a.input_type)
        if prefix:
            texts = [prefix + t for t in texts]
        task = EmbedTask(
            texts=texts, model=spec.name, keep_alive=_keep_alive(a.keep_alive), on_done=self._embed_done,
            lane=a.priority or INTERACTIVE, normalize=a.normalize, dims=a.dims, truncate=a.truncate,
            deadline=time.monotonic() + a.timeout_ms / 1000 if a.timeout_ms is not None else None,
            context=(serial, a.dtype),
        )
        self.scheduler.submit(task, max_tokens=self.models.max_tokens(spec.name))

    def _submit_rerank(self, serial: int, a: ops.RerankArgs) -> None:
        spec = self.models.spec(a.model, "rerank")
        task = EmbedTask(
            texts=a.documents, query=a.query, model=spec.name, keep_alive=_keep_alive(a.keep_alive),
            on_done=self._rerank_done, lane=a.priority or INTERACTIVE, truncate=a.truncate,
            deadline=time.monotonic() + a.timeout_ms / 1000 if a.timeout_ms is not None else None,
            context=(serial, spec.score),
        )
        self.scheduler.submit(task, max_tokens=self.models.max_tokens(spec.name))

    def _rerank_done(self, task: EmbedTask, scores: np.ndarray | None, error: PocketEmbedError | None) -> None:
        serial, scale = task.context
        if error is None:
            self._reply(serial, rerank_result(scores, scale, task.model), None)
        else:
            self._reply(serial, None, error)

    def _drain_replies(self) -> None:
        for serial_frame, reply in _pending(self._pull):
            serial = struct.unpack("<Q", serial_frame)[0]
            if serial == _WAKE:
                continue  # a wake-up: the loop looks at _fatal and _stop next
            held = self._release(serial)
            if held is not None:
                self._send(held.sock, held.identity, reply)

    def _send(self, sock: zmq.Socket, identity: list[bytes], reply: bytes) -> None:
        """Send a reply now, or after the connection's earlier replies if it has a backlog (order is kept)."""
        backlog = self._backlog.get(identity[0])
        if backlog is None:
            try:
                sock.send_multipart([*identity, reply], zmq.NOBLOCK)
                return
            except zmq.Again:  # REPLY_HWM replies wait in ZeroMQ for this peer: keep it for later
                pass
            except zmq.ZMQError as e:  # the peer is gone
                log.debug("reply dropped: %s", e)
                return
        if (backlog is not None and backlog.nbytes + len(reply) > BACKLOG_BYTES_PER_CONNECTION) or \
                self._backlog_bytes + len(reply) > BACKLOG_BYTES:
            self.stats.count("replies_dropped")  # a client that does not read: bounded, not kept
            if backlog is not None:
                backlog.full = True  # its next requests are refused unrun until half of it is read
            return
        if backlog is None:
            backlog = self._backlog[identity[0]] = _Backlog(sock, identity, time.monotonic())
        backlog.replies.append(reply)
        backlog.nbytes += len(reply)
        self._backlog_bytes += len(reply)

    def _flush_backlog(self) -> None:
        """Send what each backlog's connection can take now; drop backlogs of gone or long-silent clients."""
        now = time.monotonic()
        for key, backlog in list(self._backlog.items()):
            while backlog.replies:
                try:
                    backlog.sock.send_multipart([*backlog.identity, backlog.replies[0]], zmq.NOBLOCK)
                except zmq.Again:
                    break
                except zmq.ZMQError:  # the peer is gone: nothing of it can be delivered
                    backlog.moved = -BACKLOG_EXPIRY_S
                    break
                sent = backlog.replies.popleft()
                backlog.nbytes -= len(sent)
                self._backlog_bytes -= len(sent)
                backlog.moved = now
                backlog.full = backlog.full and backlog.nbytes > BACKLOG_BYTES_PER_CONNECTION // 2
            expiry = 2.0 if self._stop.is_set() else BACKLOG_EXPIRY_S  # stopping: a last chance, not a minute
            if not backlog.replies or now - backlog.moved > expiry:
                if backlog.replies:
                    self.stats.count("replies_dropped", len(backlog.replies))
                self._backlog_bytes -= backlog.nbytes
                del self._backlog[key]

    def _push_frames(self, frames: list[bytes]) -> None:
        """From any thread: hand frames to the I/O thread over this thread's own PUSH socket."""
        sock = getattr(self._tls, "push", None)
        if sock is None:
            try:
                sock = self.ctx.socket(zmq.PUSH)
            except zmq.ZMQError:  # no file descriptor left for a socket: the shared one, made at bind
                with self._push_lock:
                    self._push_spare.send_multipart(frames)
                return
            sock.connect(self._reply_addr)
            self._tls.push = sock
            with self._push_lock:
                self._push_socks.append(sock)
        sock.send_multipart(frames)

    def _reply(self, serial: int, result: Any, error: PocketEmbedError | None) -> None:
        """From an executor: the reply to the request held under ``serial``."""
        held = self._held.get(serial)
        req_id, op, started = (held.req_id, held.op, held.started) if held else (None, "?", time.perf_counter())
        if error is None:
            reply = P.ok_reply(req_id, result)
            if len(reply) > MAX_REPLY_BYTES:
                error = PocketEmbedError(f"the reply would be {len(reply):,} bytes, over the limit of {MAX_REPLY_BYTES:,}; "
                                         "ask for fewer hits, texts or dims", code=P.TOO_LARGE)
        if error is not None:
            extra = {"retry_after_ms": error.retry_after_ms} if isinstance(error, Busy) else {}
            reply = P.error_reply(req_id, error.code, error.message, **extra)
        self.stats.record(op, error is None, started)
        self._push_frames([struct.pack("<Q", serial), reply])

    def _embed_done(self, task: EmbedTask, vecs: np.ndarray | None, error: PocketEmbedError | None) -> None:
        """Called by a decode worker when a request is finished or failed."""
        serial, dtype = task.context
        if error is None:
            out = P.encode_vectors(vecs, dtype)
            out["model"] = task.model
            self._reply(serial, out, None)
        else:
            self._reply(serial, None, error)

    def _inline(self, op: str) -> Any:
        if op == "ping":
            return {"pong": True, "version": __version__, "protocol": P.VERSION}
        return self._models_list()

    # -- executors' handlers ----------------------------------------------------------

    def _control_op(self, op: str, a: Any, _serial: int) -> Any:
        name = self.models.spec(a.model).name
        if op == "models.load":
            newly = self.models.load(name, keep_alive=_keep_alive(a.keep_alive))
            return {"model": name, "loaded": True, "newly_loaded": newly, **self.models.describe().get(name, {})}
        self.models.unload(name)
        return {"model": name, "loaded": False}

    def _aux_op(self, op: str, a: Any, _serial: int) -> Any:
        if op == "stats":
            return self._stats()
        if op == "jobs.list":
            return self.jobs.list(limit=a.limit)
        if op == "jobs.status":
            a, granted = a
            try:
                job = self.jobs.get(a.job)
            except UnknownJob:
                job = None
            if job is None or not allows(granted, f"index:{job['collection']}"):
                # A job of another collection and no job at all get the same answer: nothing to learn.
                if job is not None:
                    self.stats.auth["forbidden"] += 1
                raise UnknownJob(f"no job {a.job}" + ("" if "admin" in granted else " that this client may read"))
            return {**job, "errors": self.jobs.errors(a.job)}
        job = self.jobs.control(a.job, op.split(".", 1)[1])
        self.runner.kick()
        return job

    def _source_op(self, op: str, a: ops.JobSubmitArgs, _serial: int) -> Any:
        """``jobs.submit``: check the caller's source under a time budget, then queue the job."""
        self._check_source(a.db)
        spec = JobSpec(db=a.db, table=a.table, id_column=a.id_column, text_column=a.text_column,
                       where=a.where or None, collection=a.collection or a.table, model=self.models.spec(a.model, "embed").name,
                       truncate=a.truncate)
        source = SourceTable(spec, budget_s=self.config.source_budget_s, allow=self._check_source)
        try:
            source.check_unique()
        finally:
            source.close()
        if self._source is None:
            conn = store.connect(store.db_path(self.config.home))
            self._source = (store.Store(conn, self.store.cache), JobQueue(conn))
        source_store, jobs = self._source
        with store.transaction(source_store.conn):
            source_store.ensure_collection(source_store.conn, spec.collection, spec.model, self.models.spec(spec.model).dims)
        job, created = jobs.submit(spec)
        self.runner.kick()
        return {**job, "new_job": created}

    def _check_source(self, db: str) -> None:
        """Forbidden unless ``db`` lies under a configured job source directory (never the daemon's own)."""
        check_source_allowed(db, self.config.job_sources, self.config.home)

    def _stats(self) -> dict[str, Any]:
        snap = self.stats.snapshot()
        sched = self.scheduler.stats()
        snap["loaded_models"] = self.models.loaded()
        snap["models"] = self.models.describe()
        snap["memory"] = self.models.memory()
        try:
            snap["rss_bytes"] = psutil.Process().memory_info().rss
        except Exception:  # a restricted /proc
            snap["rss_bytes"] = None
        snap["threads"] = [{"name": t.name, "native_id": t.native_id} for t in threading.enumerate()]
        snap["queue_depth"] = {lane: s["queued_requests"] for lane, s in sched["lanes"].items()}
        snap["scheduler"] = sched
        snap["executors"] = {name: {"queued": ex.queued, "alive": ex.alive} for name, ex in self.executors.items()}
        snap["power"] = self.power.status()
        snap["reply_backlog"] = {"connections": len(self._backlog), "bytes": self._backlog_bytes}  # an I/O-thread read: a glance
        snap["store"] = {"ok": self.store_error is None, "error": self.store_error}
        if self.index is not None:
            snap["index"] = self.index.stats()
            # Collections whose lexical index lacks items (texts never given to the daemon): see docs/search.md.
            snap["index"]["lexical_incomplete"] = {name: self.store.lexical_state(name) for name in
                                                   self.store.collection_names() if self.store.lexical_state(name) != "ready"}
            snap["executors"].update(self.index.executor_stats())
            snap["jobs"] = [j for j in self.jobs.list(limit=20) if j["state"] not in ("done", "failed", "cancelled")]
        return snap

    def _models_list(self) -> list[dict[str, Any]]:
        data = manifest.load(self.config.home)
        loaded = self.models.describe()
        return [
            {"name": s.name, "kind": s.kind, "dims": s.dims, "pooling": s.pooling, "quantization": s.quantization,
             "imported": s.imported, "loaded": s.name in loaded,
             "prepared": s.name in data["models"] and manifest.model_path(self.config.home, s).exists(),
             "default": s.name == DEFAULT_MODEL, "max_tokens": self.models.max_tokens(s.name),
             **({"score": s.score} if s.kind == "rerank" else {}),
             **({"memory_bytes": loaded[s.name]["bytes"], "keep_alive_s": loaded[s.name]["keep_alive_s"],
                 "expires_in_s": loaded[s.name]["expires_in_s"]} if s.name in loaded else {})}
            for s in all_specs(self.config.home).values()
        ]


def _keep_alive(value: Any) -> float | None:
    return None if value is None else parse_keep_alive(value)


def _shut(fd: int) -> None:
    """End the TCP connection on ``fd`` (a descriptor ZeroMQ owns): shutdown() acts on the connection,
    and closing our duplicate leaves ZeroMQ's descriptor to ZeroMQ."""
    try:
        dup = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        dup.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        dup.close()


def _drain_fd(sock: socket.socket) -> None:
    try:
        while sock.recv(512):
            pass
    except BlockingIOError:
        pass


def _pending(sock: zmq.Socket, copy: bool = True) -> Iterator[list[Any]]:
    """Every message already queued on ``sock``, without blocking (``copy=False``: as zmq.Frames)."""
    while True:
        try:
            yield sock.recv_multipart(zmq.NOBLOCK, copy=copy)
        except zmq.Again:
            return


def _check_tcp(tcp: str, allow_remote: bool) -> tuple[str, str]:
    host, sep, port = tcp.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise PocketEmbedError(f"--tcp must be HOST:PORT, got {tcp!r}", code="invalid_config")
    if host not in ("127.0.0.1", "localhost", "::1") and not allow_remote:
        raise PocketEmbedError(f"refusing to listen on {host}: TCP is loopback-only unless --allow-remote", code="invalid_config")
    return host, port


def _split_envelope(frames: list[bytes]) -> tuple[list[bytes], bytes | None]:
    """[identity, payload] (DEALER) or [identity, b"", payload] (REQ)."""
    if len(frames) == 2:
        return frames[:1], frames[1]
    if len(frames) == 3 and frames[1] == b"":
        return frames[:2], frames[2]
    return frames[:1], None


def rerank_result(logits: np.ndarray, scale: str, model: str) -> dict[str, Any]:
    """A rerank reply: the scores in the model's own scale, and the raw logits."""
    return {"model": model, "scores": scale_scores(logits, scale).tolist(),
            "logits": scale_scores(logits, "raw").tolist(), "scale": scale}


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
        server._shutdown()
        raise
    if on_ready:
        on_ready()
    return server.serve_forever()
