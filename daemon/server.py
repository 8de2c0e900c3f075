"""The daemon's server loop: one ROUTER socket, one I/O thread, workers behind it.

The I/O thread owns the ROUTER socket (ZeroMQ sockets are not thread-safe): it
decodes, validates and routes, answers cheap ops itself (ping, stats,
models.list), submits ``embed`` to the scheduler (whose decode workers batch
it with other clients' texts) and hands model loads/unloads to a control
thread. No worker touches the ROUTER; each hands finished replies back through
its own inproc PUSH socket to a PULL socket the I/O thread polls next to the
ROUTER. So a ``ping`` is answered while a long embed runs, and every request
gets exactly one reply.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import signal
import socket
import stat
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
from pocketembed.errors import Busy, PocketEmbedError
from pocketembed.gguf_models import manifest
from pocketembed.gguf_models.catalog import DEFAULT_MODEL, MODELS, get
from pocketembed.ipc import protocol as P

from . import store
from .index import IndexService
from .jobs import JobQueue, JobRunner, JobSpec, SourceTable
from .models import ModelRegistry, ModelSettings, parse_keep_alive
from .power import PowerMonitor, PowerPolicy, sources
from .scheduler import INTERACTIVE, LANES, EmbedTask, LaneConfig, Scheduler, SchedulerConfig

log = logging.getLogger("pocketembed.server")

INLINE_OPS = {"ping", "models.list"}
CONTROL_OPS = {"models.load", "models.unload"}
AUX_OPS = {"stats", "jobs.submit", "jobs.list", "jobs.status", "jobs.cancel", "jobs.pause", "jobs.resume"}
"""Ops that touch SQLite or read sensors: off the I/O thread, on their own thread."""
INDEX_OPS = {"search", "index.add", "index.delete", "collections.list", "collections.drop"}
KNOWN_OPS = INLINE_OPS | CONTROL_OPS | AUX_OPS | INDEX_OPS | {"embed"}
MAX_IDS = 10_000
MAX_K = 1_000


class DaemonRunning(PocketEmbedError):
    code = "daemon_running"


@dataclass
class ServeConfig:
    socket_path: Path
    home: Path
    tcp: str | None = None
    allow_remote: bool = False
    preload: list[str] = field(default_factory=lambda: [DEFAULT_MODEL])
    threads: int | None = None
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    on_demand: bool = True
    """Load a prepared model on its first request (else: model_not_loaded)."""
    keep_alive: float = 300.0
    """Seconds an idle model stays loaded (negative: forever)."""
    memory_budget_bytes: int | None = None
    """None: a quarter of the memory available at start."""
    model_settings: dict[str, ModelSettings] = field(default_factory=dict)
    power_source: str = "auto"
    """auto (termux → sysfs → psutil), one of those, or file:PATH (injected readings)."""
    power_policy: PowerPolicy = field(default_factory=PowerPolicy)
    job_chunk_rows: int = 128


@dataclass
class _Job:
    identity: list[bytes]
    req: P.Request
    received: float


class _Stats:
    """Counters and a latency window for the ``stats`` op."""

    def __init__(self) -> None:
        self.started = time.time()
        self.requests = 0
        self.errors = 0
        self.by_op: dict[str, int] = {}
        self.latency_ms: deque[float] = deque(maxlen=2048)
        self.lock = threading.Lock()

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


class Server:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.stats = _Stats()
        self.models = ModelRegistry(config.home, threads=config.threads, contexts=config.scheduler.workers,
                                    on_demand=config.on_demand, keep_alive=config.keep_alive,
                                    budget_bytes=config.memory_budget_bytes, settings=config.model_settings)
        self.scheduler = Scheduler(self.models, config.scheduler)
        self.power = PowerMonitor(config.power_policy, sources(config.power_source),
                                  last_interactive=self.scheduler.last_interactive)
        db = store.db_path(config.home)
        self._db = store.connect(db)
        self.store = store.Store(self._db)
        self.jobs = JobQueue(self._db)
        self.runner = JobRunner(db, self.scheduler, self.power, prefix=lambda m: self.models.prefix(m, "document"),
                                dims=lambda m: get(m).dims, chunk_rows=config.job_chunk_rows)
        self.index = IndexService(db, self.scheduler, self.models, reply=self._index_done)
        self.ctx = zmq.Context()
        self._control: queue.Queue[_Job | None] = queue.Queue()
        self._aux: queue.Queue[_Job | None] = queue.Queue()
        self._stop = threading.Event()
        self._inflight = 0
        self._reply_addr = f"inproc://replies-{id(self)}"
        self._tls = threading.local()
        self._push_socks: list[zmq.Socket] = []
        self._push_lock = threading.Lock()
        self._controller: threading.Thread | None = None
        self._aux_thread: threading.Thread | None = None
        self._pull: zmq.Socket | None = None
        self.router: zmq.Socket | None = None
        self._bound_path: Path | None = None

    # -- lifecycle --------------------------------------------------------------------

    def bind(self) -> None:
        """Bind the Unix socket (and TCP, if asked); on failure nothing is left behind."""
        tcp_host, tcp_port = _check_tcp(self.config.tcp, self.config.allow_remote) if self.config.tcp else (None, None)
        try:
            self._bind(tcp_host, tcp_port)
        except BaseException:
            self._close_sockets()
            raise

    def _bind(self, tcp_host: str | None, tcp_port: str | None) -> None:
        path = self.config.socket_path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path.parent, 0o700)
        check_socket_free(path)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 1000)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 0)
        self.router.setsockopt(zmq.MAXMSGSIZE, P.MAX_FRAME_BYTES + 1024)
        old = os.umask(0o177)
        try:
            self.router.bind(f"ipc://{path}")
        finally:
            os.umask(old)
        self._bound_path = path
        os.chmod(path, 0o600)
        if tcp_host is not None:
            self.router.bind(f"tcp://{tcp_host}:{tcp_port}")
        self._pull = self.ctx.socket(zmq.PULL)
        self._pull.bind(self._reply_addr)

    def load_preloaded(self) -> None:
        """Load the start-up models; one that cannot load is logged, not fatal."""
        for name in self.config.preload:
            try:
                self.models.load(name)
            except PocketEmbedError as e:
                log.error("cannot load %s at start: error[%s] %s", name, e.code, e.message)

    def serve_forever(self) -> None:
        """Run the I/O loop until SIGTERM/SIGINT; then drain, reply and clean up."""
        self.scheduler.start()
        self.models.start()
        self._controller = threading.Thread(target=self._offload_loop, args=(self._control,), name="pe-control", daemon=True)
        self._controller.start()
        self._aux_thread = threading.Thread(target=self._offload_loop, args=(self._aux,), name="pe-aux", daemon=True)
        self._aux_thread.start()
        self.runner.start()
        self.index.start()
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._pull, zmq.POLLIN)
        log.info("serving on ipc://%s%s (pid %d)", self.config.socket_path,
                 f" and tcp://{self.config.tcp}" if self.config.tcp else "", os.getpid())
        try:
            while True:
                if self._stop.is_set() and self._inflight == 0:
                    break
                events = dict(poller.poll(100))
                if self._pull in events:
                    self._drain_replies()
                if self.router in events:
                    self._read_requests()
        finally:
            self._shutdown()

    def request_stop(self, *_: object) -> None:
        if not self._stop.is_set():
            log.info("stopping: finishing %d in-flight request(s)", self._inflight)
        self._stop.set()

    def _shutdown(self) -> None:
        self.runner.stop()  # commits the chunks in flight, so the scheduler must still run
        self.index.stop()
        self.scheduler.stop()
        for q, t in ((self._control, self._controller), (self._aux, self._aux_thread)):
            q.put(None)
            if t:
                t.join(timeout=30)
        self._drain_replies()
        self.models.close()
        self._db.close()
        self._close_sockets()
        log.info("stopped")

    def _close_sockets(self) -> None:
        with self._push_lock:
            for sock in self._push_socks:
                sock.close(linger=1000)
            self._push_socks.clear()
        if self.router is not None:
            self.router.close(linger=1000)
        if self._pull is not None:
            self._pull.close(linger=0)
        self.ctx.term()
        if self._bound_path is not None:  # only a socket file this daemon created
            self._bound_path.unlink(missing_ok=True)

    # -- I/O thread -------------------------------------------------------------------

    def _read_requests(self) -> None:
        for frames in _pending(self.router):
            self._route(frames)

    def _route(self, frames: list[bytes]) -> None:
        started = time.perf_counter()
        identity, payload = _split_envelope(frames)
        if payload is None:
            # Wrong frame count: answer on the identity we have, if any.
            if identity:
                self._send(identity, P.error_reply(None, P.BAD_FRAME, "expected one payload frame after the routing envelope"))
                self.stats.record("?", False, started)
            return
        req_id = None
        try:
            req = P.parse_request(payload)
            req_id = req.id
            if self._stop.is_set():
                raise P.ProtocolError(P.SHUTTING_DOWN, "the daemon is shutting down")
            if req.op in INLINE_OPS:
                result = self._inline(req)
                self._send(identity, P.ok_reply(req.id, result))
                self.stats.record(req.op, True, started)
            elif req.op == "embed":
                self._validate(req)
                self._submit_embed(identity, req, started)
            elif req.op in INDEX_OPS:
                self._validate(req)
                self._inflight += 1
                self.index.submit(req.op, req.args, (identity, req, started))
            elif req.op in CONTROL_OPS or req.op in AUX_OPS:
                self._validate(req)
                self._inflight += 1
                (self._control if req.op in CONTROL_OPS else self._aux).put(_Job(identity, req, started))
            else:
                raise P.ProtocolError(P.UNKNOWN_OP, f"unknown op {req.op!r}; known: {', '.join(sorted(KNOWN_OPS))}")
        except P.ProtocolError as e:
            extra = {k: v for k, v in e.extra.items() if k != "id"}
            self._send(identity, P.error_reply(e.extra.get("id", req_id), e.code, e.message, **extra))
            self.stats.record("?", False, started)

    def _submit_embed(self, identity: list[bytes], req: P.Request, started: float) -> None:
        a = req.args
        spec = get(a.get("model"))
        timeout_ms = a.get("timeout_ms")
        texts = a["texts"]
        prefix = self.models.prefix(spec.name, a.get("input_type"))
        if prefix:
            texts = [prefix + t for t in texts]
        task = EmbedTask(
            texts=texts, model=spec.name, keep_alive=_keep_alive(a), on_done=self._embed_done, lane=a.get("priority") or INTERACTIVE,
            normalize=a.get("normalize", True), dims=a.get("dims"), truncate=a.get("truncate", False),
            deadline=time.monotonic() + timeout_ms / 1000 if timeout_ms is not None else None,
            context=(identity, req, started),
        )
        try:
            self.scheduler.submit(task, max_tokens=self.models.max_tokens(spec.name))
        except Busy as e:
            raise P.ProtocolError(P.BUSY, e.message, retry_after_ms=e.retry_after_ms) from None
        except PocketEmbedError as e:
            raise P.ProtocolError(e.code, e.message) from None
        self._inflight += 1

    def _drain_replies(self) -> None:
        for *identity, reply in _pending(self._pull):
            self._send(identity, reply)
            self._inflight -= 1

    def _send(self, identity: list[bytes], reply: bytes) -> None:
        try:
            self.router.send_multipart([*identity, reply], zmq.NOBLOCK)
        except zmq.ZMQError as e:  # peer gone or its queue full: nothing else to do
            log.debug("reply dropped: %s", e)

    def _push(self, identity: list[bytes], reply: bytes) -> None:
        """From any worker thread: hand a finished reply to the I/O thread."""
        sock = getattr(self._tls, "push", None)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.connect(self._reply_addr)
            self._tls.push = sock
            with self._push_lock:
                self._push_socks.append(sock)
        sock.send_multipart([*identity, reply])

    def _inline(self, req: P.Request) -> Any:
        if req.op == "ping":
            return {"pong": True, "version": __version__, "protocol": P.VERSION}
        return self._models_list()

    def _stats(self) -> dict[str, Any]:
        snap = self.stats.snapshot()
        sched = self.scheduler.stats()
        snap["loaded_models"] = self.models.loaded()
        snap["models"] = self.models.describe()
        snap["memory"] = self.models.memory()
        snap["rss_bytes"] = psutil.Process().memory_info().rss
        snap["queue_depth"] = {lane: s["queued_requests"] for lane, s in sched["lanes"].items()}
        snap["scheduler"] = sched
        snap["index"] = self.index.stats()
        snap["power"] = self.power.status()
        snap["jobs"] = [j for j in self.jobs.list(limit=20) if j["state"] not in ("done", "failed", "cancelled")]
        return snap

    def _models_list(self) -> list[dict[str, Any]]:
        data = manifest.load(self.config.home)
        loaded = self.models.describe()
        return [
            {"name": s.name, "dims": s.dims, "quantization": s.quantization, "loaded": s.name in loaded,
             "prepared": s.name in data["models"] and manifest.model_path(self.config.home, s).exists(),
             "default": s.name == DEFAULT_MODEL, "max_tokens": self.models.max_tokens(s.name),
             **({"memory_bytes": loaded[s.name]["bytes"], "keep_alive_s": loaded[s.name]["keep_alive_s"],
                 "expires_in_s": loaded[s.name]["expires_in_s"]} if s.name in loaded else {})}
            for s in MODELS.values()
        ]

    def _validate(self, req: P.Request) -> None:
        """Type and size checks that need no model, done before anything is queued."""
        a = req.args
        if req.op == "embed":
            texts = a.get("texts")
            if not isinstance(texts, list) or not texts:
                raise P.ProtocolError(P.INVALID_ARGS, "texts must be a non-empty list of strings")
            if len(texts) > P.MAX_TEXTS:
                raise P.ProtocolError(P.TOO_LARGE, f"{len(texts)} texts, limit {P.MAX_TEXTS} per request")
            for i, t in enumerate(texts):
                if not isinstance(t, str):
                    raise P.ProtocolError(P.INVALID_ARGS, f"texts[{i}] must be a string, not {type(t).__name__}")
                if len(t.encode("utf-8", "surrogatepass")) > P.MAX_TEXT_BYTES:
                    raise P.ProtocolError(P.TOO_LARGE, f"texts[{i}] is over {P.MAX_TEXT_BYTES} bytes")
                if not t.strip():
                    raise P.ProtocolError(P.EMPTY_TEXT, f"texts[{i}] is empty")
            _opt(a, "model", str)
            _opt(a, "dims", int)
            _opt(a, "normalize", bool)
            _opt(a, "truncate", bool)
            _opt(a, "priority", str)
            if a.get("dtype", "float32") not in P.DTYPES:
                raise P.ProtocolError(P.INVALID_ARGS, f"dtype must be one of {', '.join(P.DTYPES)}")
            if a.get("priority") not in (None, *LANES):
                raise P.ProtocolError(P.INVALID_ARGS, f"priority must be one of {', '.join(LANES)}")
            if a.get("input_type") not in (None, "query", "document"):
                raise P.ProtocolError(P.INVALID_ARGS, "input_type must be 'query' or 'document'")
            t = a.get("timeout_ms")
            if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 86_400_000):
                raise P.ProtocolError(P.INVALID_ARGS, "timeout_ms must be a positive number of milliseconds")
        elif req.op in INDEX_OPS:
            _validate_index(req.op, a)
        elif req.op == "jobs.submit":
            for key in ("db", "table", "id_column", "text_column"):
                if not isinstance(a.get(key), str) or not a[key]:
                    raise P.ProtocolError(P.INVALID_ARGS, f"{key} must be a non-empty string")
            if not os.path.isabs(a["db"]):
                raise P.ProtocolError(P.INVALID_ARGS, "db must be an absolute path (the daemon has its own working directory)")
            for key in ("where", "collection", "model"):
                _opt(a, key, str)
            _opt(a, "truncate", bool)
        elif req.op in ("jobs.status", "jobs.cancel", "jobs.pause", "jobs.resume"):
            if isinstance(a.get("job"), bool) or not isinstance(a.get("job"), int):
                raise P.ProtocolError(P.INVALID_ARGS, "job must be an integer job id")
        elif req.op == "jobs.list":
            _opt(a, "limit", int)
        elif req.op in CONTROL_OPS:
            if not isinstance(a.get("model"), str):
                raise P.ProtocolError(P.INVALID_ARGS, "model must be a string")
        _keep_alive(a)
        if "model" in a and a["model"] is not None:
            try:
                get(a["model"])
            except PocketEmbedError as e:
                raise P.ProtocolError(e.code, e.message) from None

    # -- worker threads ---------------------------------------------------------------

    def _embed_done(self, task: EmbedTask, vecs: np.ndarray | None, error: PocketEmbedError | None) -> None:
        """Called by a decode worker when a request is finished or failed."""
        identity, req, started = task.context
        if error is None:
            out = P.encode_vectors(vecs, req.args.get("dtype", "float32"))
            out["model"] = task.model
            reply = P.ok_reply(req.id, out)
        else:
            reply = P.error_reply(req.id, error.code, error.message)
        self.stats.record(req.op, error is None, started)
        self._push(identity, reply)

    def _index_done(self, context: Any, result: Any, error: PocketEmbedError | None) -> None:
        """Called by the index service's threads (or a decode worker) when an index op is finished."""
        identity, req, started = context
        reply = P.ok_reply(req.id, result) if error is None else P.error_reply(req.id, error.code, error.message)
        self.stats.record(req.op, error is None, started)
        self._push(identity, reply)

    def _offload_loop(self, jobs: queue.Queue[_Job | None]) -> None:
        """Ops that may take a while (model loads, SQLite, sensors), one at a time, off the I/O thread."""
        while (job := jobs.get()) is not None:
            ok = True
            try:
                reply = P.ok_reply(job.req.id, self._run_offloaded(job.req))
            except (PocketEmbedError, P.ProtocolError) as e:
                ok = False
                reply = P.error_reply(job.req.id, e.code, e.message)
            except Exception as e:  # a bug: answer it, log it, keep serving
                ok = False
                log.exception("request %r failed", job.req.op)
                reply = P.error_reply(job.req.id, P.INTERNAL, f"internal error: {type(e).__name__}: {e}")
            self.stats.record(job.req.op, ok, job.received)
            self._push(job.identity, reply)

    def _run_offloaded(self, req: P.Request) -> Any:
        a = req.args
        if req.op == "stats":
            return self._stats()
        if req.op == "jobs.submit":
            return self._submit_job(a)
        if req.op == "jobs.list":
            return self.jobs.list(limit=a.get("limit") or 50)
        if req.op == "jobs.status":
            return {**self.jobs.get(a["job"]), "errors": self.jobs.errors(a["job"])}
        if req.op.startswith("jobs."):
            job = self.jobs.control(a["job"], req.op.split(".", 1)[1])
            self.runner.kick()
            return job
        name = get(a["model"]).name
        if req.op == "models.load":
            newly = self.models.load(name, keep_alive=_keep_alive(req.args))
            return {"model": name, "loaded": True, "newly_loaded": newly, **self.models.describe().get(name, {})}
        self.models.unload(name)
        return {"model": name, "loaded": False}


    def _submit_job(self, a: dict[str, Any]) -> dict[str, Any]:
        spec = JobSpec(db=a["db"], table=a["table"], id_column=a["id_column"], text_column=a["text_column"],
                       where=a.get("where") or None, collection=a.get("collection") or a["table"],
                       model=get(a.get("model")).name, truncate=a.get("truncate", True))

        source = SourceTable(spec)
        try:
            source.check_unique()
        finally:
            source.close()
        with store.transaction(self._db):
            self.store.ensure_collection(self._db, spec.collection, spec.model, get(spec.model).dims)
        job, created = self.jobs.submit(spec)
        self.runner.kick()
        return {**job, "created": created}


def _validate_index(op: str, a: dict[str, Any]) -> None:
    """Types and limits of search / index.* / collections.* arguments."""
    if op != "collections.list":
        c = a.get("collection")
        if not isinstance(c, str) or not c.strip() or len(c) > 128:
            raise P.ProtocolError(P.INVALID_ARGS, "collection must be a non-empty string of at most 128 characters")
    _opt(a, "model", str)
    if op == "search":
        q = a.get("query")
        if not isinstance(q, str):
            raise P.ProtocolError(P.INVALID_ARGS, "query must be a string")
        if not q.strip():
            raise P.ProtocolError(P.EMPTY_TEXT, "query is empty")
        if len(q.encode("utf-8", "surrogatepass")) > P.MAX_TEXT_BYTES:
            raise P.ProtocolError(P.TOO_LARGE, f"query is over {P.MAX_TEXT_BYTES} bytes")
        for key, top, default in (("k", MAX_K, 10), ("rescore_multiplier", 1000, 10)):
            v = a.get(key, default)
            if v is None and key == "rescore_multiplier":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
                raise P.ProtocolError(P.INVALID_ARGS, f"{key} must be an integer from 1 to {top}")
        _opt(a, "rescore", bool)
        _opt(a, "with_text", bool)
        f = a.get("filter")
        if f is not None and (not isinstance(f, dict) or len(f) > 16 or any(
                not isinstance(k, str) or not (v is None or isinstance(v, (str, int, float, bool))) for k, v in f.items())):
            raise P.ProtocolError(P.INVALID_ARGS, "filter must map up to 16 metadata keys to plain values (str, number, bool, nil)")
    elif op == "index.add":
        items = a.get("items")
        if not isinstance(items, list) or not items:
            raise P.ProtocolError(P.INVALID_ARGS, "items must be a non-empty list of {id, text, metadata?} maps")
        if len(items) > P.MAX_TEXTS:
            raise P.ProtocolError(P.TOO_LARGE, f"{len(items)} items, limit {P.MAX_TEXTS} per request")
        seen: set = set()
        for i, it in enumerate(items):
            if not isinstance(it, dict):
                raise P.ProtocolError(P.INVALID_ARGS, f"items[{i}] must be a map with id and text")
            _check_id(it.get("id"), f"items[{i}].id")
            if it["id"] in seen:
                raise P.ProtocolError(P.INVALID_ARGS, f"items[{i}].id {it['id']!r} appears twice")
            seen.add(it["id"])
            t = it.get("text")
            if not isinstance(t, str):
                raise P.ProtocolError(P.INVALID_ARGS, f"items[{i}].text must be a string")
            if not t.strip():
                raise P.ProtocolError(P.EMPTY_TEXT, f"items[{i}].text is empty")
            if len(t.encode("utf-8", "surrogatepass")) > P.MAX_TEXT_BYTES:
                raise P.ProtocolError(P.TOO_LARGE, f"items[{i}].text is over {P.MAX_TEXT_BYTES} bytes")
            m = it.get("metadata")
            if m is not None:
                try:
                    ok = isinstance(m, dict) and len(json.dumps(m)) <= 65536
                except (TypeError, ValueError):
                    ok = False
                if not ok:
                    raise P.ProtocolError(P.INVALID_ARGS, f"items[{i}].metadata must be a JSON-like map of at most 64 KiB")
        for key in ("chunk", "truncate", "float_vectors", "store_text"):
            _opt(a, key, bool)
        _opt(a, "dims", int)
        if a.get("priority") not in (None, *LANES):
            raise P.ProtocolError(P.INVALID_ARGS, f"priority must be one of {', '.join(LANES)}")
    elif op == "index.delete":
        ids = a.get("ids")
        if not isinstance(ids, list) or not ids or len(ids) > MAX_IDS:
            raise P.ProtocolError(P.INVALID_ARGS, f"ids must be a non-empty list of at most {MAX_IDS} ids")
        for i, v in enumerate(ids):
            _check_id(v, f"ids[{i}]")


def _check_id(v: Any, where: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (str, int)) or (isinstance(v, int) and not -2**63 <= v < 2**63) \
            or (isinstance(v, str) and (not v or len(v) > 512)):
        raise P.ProtocolError(P.INVALID_ARGS, f"{where} must be a 64-bit integer or a string of 1 to 512 characters")


def _keep_alive(args: dict[str, Any]) -> float | None:
    if args.get("keep_alive") is None:
        return None
    try:
        return parse_keep_alive(args["keep_alive"])
    except PocketEmbedError as e:
        raise P.ProtocolError(P.INVALID_ARGS, e.message) from None


def _opt(args: dict[str, Any], key: str, typ: type) -> None:
    v = args.get(key)
    if v is None:
        return
    if typ is int and isinstance(v, bool) or not isinstance(v, typ):
        raise P.ProtocolError(P.INVALID_ARGS, f"{key} must be {typ.__name__}, not {type(v).__name__}")


def _pending(sock: zmq.Socket) -> Iterator[list[bytes]]:
    """Every message already queued on ``sock``, without blocking."""
    while True:
        try:
            yield sock.recv_multipart(zmq.NOBLOCK)
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


def scheduler_config(settings: dict[str, Any]) -> SchedulerConfig:
    """The scheduler's settings from the daemon config (missing keys keep the defaults)."""
    base = SchedulerConfig()
    for key in ("workers", "queue_texts", "queue_tokens", "background_queue_texts", "background_queue_tokens",
                "background_batch_tokens"):
        v = settings.get(key)
        if v is not None and v < 1:
            raise PocketEmbedError(f"{key} must be at least 1, got {v}", code="invalid_config")
    i, b = base.interactive, base.background
    return SchedulerConfig(
        workers=settings.get("workers") or base.workers,
        max_seqs=base.max_seqs,
        interactive=LaneConfig(i.batch_tokens, settings.get("queue_texts") or i.max_texts,
                               settings.get("queue_tokens") or i.max_tokens),
        background=LaneConfig(settings.get("background_batch_tokens") or b.batch_tokens,
                              settings.get("background_queue_texts") or b.max_texts,
                              settings.get("background_queue_tokens") or b.max_tokens),
        solo_tokens=base.solo_tokens,
        interactive_grace_s=base.interactive_grace_s,
    )


def model_settings(tables: dict[str, dict[str, Any]]) -> dict[str, ModelSettings]:
    """Per-model settings from the config's ``[model."NAME"]`` tables, keyed by catalog name."""
    out = {}
    for name, table in tables.items():
        values = dict(table)
        if "keep_alive" in values:
            values["keep_alive"] = parse_keep_alive(values["keep_alive"])
        out[get(name).name] = ModelSettings(**values)
    return out


def run(config: ServeConfig, on_ready: Callable[[], None] | None = None) -> int:
    """Bind, preload, serve until a signal; the exit status of ``pocketembed serve``."""
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
    server.serve_forever()
    return 0
