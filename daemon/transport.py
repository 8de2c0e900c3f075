"""The daemon's transport: ZeroMQ ROUTER sockets, the I/O thread, and the way replies get back to callers.

The I/O thread owns the ROUTER sockets (ZeroMQ sockets are not thread-safe):
one on the Unix socket (its peer is the daemon's user) and, if asked, one on
loopback TCP (every app on the phone can reach it), so the transport of a
request is never a guess. For each request it only decodes the envelope,
authenticates (auth.py), checks the op's permission, decodes the arguments
(ipc/ops.py, one msgspec step) and hands the request to the dispatcher
(dispatch.py), which returns a future of its result. A future done at once
(inline ops, refusals) is answered at once; any other is held under a serial
number, and its done-callback, on whatever thread finishes it, encodes the
reply and passes it to the I/O thread over an inproc PUSH/PULL pair. So every
request gets exactly one reply. If a thread of the daemon dies anyway, the I/O
thread answers everything it still holds and the daemon exits non-zero (70)
for its supervisor to restart it, instead of living on half-alive.

Replies to a connection that does not read wait in a bounded backlog of its
own (order kept), TCP connections are capped, and a slow handshake is cut.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from pocketembed.clients import allows
from pocketembed.errors import Busy, PocketEmbedError
from pocketembed.ipc import ops
from pocketembed.ipc import protocol as P

from .auth import Authenticator
from .executors import as_error
from .metrics import Metrics

log = logging.getLogger("pocketembed.transport")

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


class Transport:
    """The sockets and the I/O loop; ``dispatch(request, permissions)`` → a future of the result."""

    def __init__(self, socket_path: Path, tcp: str | None, allow_remote: bool, auth: Authenticator,
                 dispatch: Callable[[ops.Request, tuple[str, ...]], Future], metrics: Metrics) -> None:
        self.socket_path = socket_path
        self.tcp = tcp
        self.allow_remote = allow_remote
        self.auth = auth
        self.dispatch = dispatch
        self.metrics = metrics
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
        self._tcp_monitor: zmq.Socket | None = None
        self._tcp_fds: set[int] = set()
        """Open TCP connections (their fds, from the ROUTER's monitor), capped at MAX_TCP_CONNECTIONS."""
        self._backlog: dict[bytes, _Backlog] = {}
        """Routing id → replies ZeroMQ could not take yet (its queue for that peer at REPLY_HWM), in order."""
        self._backlog_bytes = 0

    # -- lifecycle --------------------------------------------------------------------

    def bind(self) -> None:
        """Bind the Unix socket (and TCP, if asked); on failure nothing is left behind."""
        tcp_host, tcp_port = check_address(self.tcp, self.allow_remote) if self.tcp else (None, None)
        try:
            self._bind(tcp_host, tcp_port)
        except BaseException:
            self.close()
            raise

    def _bind(self, tcp_host: str | None, tcp_port: str | None) -> None:
        path = self.socket_path
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

    def serve(self) -> bool:
        """Run the I/O loop until ``request_stop`` and every held request is answered (True), or until a
        thread died (False: the caller exits at once through ``die``)."""
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
        log.info("serving on ipc://%s%s (pid %d)", self.socket_path, f" and tcp://{self.tcp}" if self.tcp else "",
                 os.getpid())
        try:
            while not (self._stop.is_set() and not self._held and not self._backlog):
                # No timeout: the loop wakes for a request, a reply, a signal, or a thread's wake-up message.
                events = dict(poller.poll(BACKLOG_RETRY_S * 1000 if self._backlog else None))
                if self._backlog:
                    self._flush_backlog()
                if signal_r.fileno() in events:
                    _drain_fd(signal_r)
                if self._pull in events:
                    self.drain_replies()
                if self._fatal is not None:
                    return False
                if self._tcp_monitor is not None:
                    self._track_connections()  # before the requests: a closed fd's block is gone first
                for sock in (self.router, self.tcp_router):
                    if sock is not None and sock in events:
                        self._read_requests(sock)
        finally:
            signal.set_wakeup_fd(previous_fd)
            signal_r.close()
            signal_w.close()
        return True

    @property
    def held(self) -> int:
        return len(self._held)

    def request_stop(self) -> None:
        """Refuse new requests (``shutting_down``); the loop ends once those held are answered."""
        self._stop.set()
        self._wake()

    def thread_died(self, name: str) -> None:
        """From a thread that is ending unexpectedly: the I/O thread answers what it holds and exits."""
        self._fatal = name
        self._wake()

    def _wake(self) -> None:
        """Make the I/O loop look at its state now (from a signal handler or another thread)."""
        try:
            self._push_frames([struct.pack("<Q", _WAKE), b""])
        except zmq.ZMQError:  # the sockets are already closed
            pass

    def die(self) -> None:
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

    def close(self) -> None:
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

    def stats(self) -> dict[str, Any]:
        """The reply backlog, for ``stats`` (an I/O-thread read from another thread: a glance)."""
        return {"reply_backlog": {"connections": len(self._backlog), "bytes": self._backlog_bytes}}

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
            self.auth.forget(b"fd:%d" % fd)  # a new connection, or the end of one: no block carries over
            if event != zmq.EVENT_ACCEPTED:
                self._tcp_fds.discard(fd)
            elif len(self._tcp_fds) >= MAX_TCP_CONNECTIONS:
                self.metrics.count("connections_refused")
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
            self.metrics.record("?", False, started)
            return
        if payload is None:
            # Wrong frame count: answer on the identity we have, if any.
            if identity:
                self._send(sock, identity, P.error_reply(None, P.BAD_FRAME, "expected one payload frame after the routing envelope"))
                self.metrics.record("?", False, started)
            return
        req_id = None
        try:
            # Authenticate, then authorise, then validate: a refusal says nothing about what was refused.
            req = ops.decode_envelope(payload)
            req_id = req.id
            granted = self.auth.authenticate(req, conn, unix=sock is self.router)
            ops.known_op(req)
            if not req.op.allowed_before_args(granted, req.raw_args):
                raise self.auth.forbidden(req.op)
            ops.decode_args(req)
            if not req.op.by_stored_state and not allows(granted, req.op.needs(req.args)):
                raise self.auth.forbidden(req.op)
            if self._stop.is_set():
                raise P.ProtocolError(P.SHUTTING_DOWN, "the daemon is shutting down")
            if self._per_client.get(identity[0], 0) >= MAX_INFLIGHT_PER_CLIENT:
                raise Busy(f"this connection has {MAX_INFLIGHT_PER_CLIENT} requests waiting for replies; "
                           "wait for some before sending more", retry_after_ms=200)
            future = self.dispatch(req, granted)
        except P.ProtocolError as e:
            extra = {k: v for k, v in e.extra.items() if k != "id"}
            self._send(sock, identity, P.error_reply(e.extra.get("id", req_id), e.code, e.message, **extra))
            self.metrics.record("?", False, started)
            return
        except PocketEmbedError as e:
            retry = getattr(e, "retry_after_ms", None)  # busy, and a connection blocked for bad tokens
            extra = {"retry_after_ms": retry} if retry is not None else {}
            self._send(sock, identity, P.error_reply(req_id, e.code, e.message, **extra))
            self.metrics.record("?", False, started)
            return
        if future.done():  # inline ops, and refusals on the way in: answered now, on this thread
            self._send(sock, identity, self._encode(req.id, req.op.name, started, future))
            return
        serial = self._hold(sock, identity, req, started)
        future.add_done_callback(lambda f: self._push_frames(
            [struct.pack("<Q", serial), self._encode(req.id, req.op.name, started, f)]))

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

    def _encode(self, req_id: Any, op: str, started: float, future: Future) -> bytes:
        """A finished request's reply frame (on the thread that finished it)."""
        error = future.exception()
        if error is None:
            reply = P.ok_reply(req_id, future.result())
            if len(reply) > MAX_REPLY_BYTES:
                error = PocketEmbedError(f"the reply would be {len(reply):,} bytes, over the limit of {MAX_REPLY_BYTES:,}; "
                                         "ask for fewer hits, texts or dims", code=P.TOO_LARGE)
        if error is not None:
            if not isinstance(error, PocketEmbedError):  # raised off the executors (a source reader): a bug, counted
                error = as_error(error, op)
                if error.code == "internal":
                    self.metrics.count("internal_errors")
            extra = {"retry_after_ms": error.retry_after_ms} if isinstance(error, Busy) else {}
            reply = P.error_reply(req_id, error.code, error.message, **extra)
        self.metrics.record(op, error is None, started)
        return reply

    def drain_replies(self) -> None:
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
            self.metrics.count("replies_dropped")  # a client that does not read: bounded, not kept
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
                    self.metrics.count("replies_dropped", len(backlog.replies))
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


def check_address(address: str, allow_remote: bool, flag: str = "--tcp") -> tuple[str, str]:
    """HOST:PORT of a listener (``[::1]:PORT`` for IPv6), refused off loopback unless ``allow_remote``."""
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise PocketEmbedError(f"{flag} must be HOST:PORT, got {address!r}", code="invalid_config")
    if host not in ("127.0.0.1", "localhost", "::1") and not allow_remote:
        raise PocketEmbedError(f"refusing to listen on {host}: {flag} is loopback-only unless --allow-remote",
                               code="invalid_config")
    return host, port


def _split_envelope(frames: list[bytes]) -> tuple[list[bytes], bytes | None]:
    """[identity, payload] (DEALER) or [identity, b"", payload] (REQ)."""
    if len(frames) == 2:
        return frames[:1], frames[1]
    if len(frames) == 3 and frames[1] == b"":
        return frames[:2], frames[2]
    return frames[:1], None
