"""Python clients of the daemon: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Both use a DEALER socket, so several requests can be in flight on one
connection; replies are matched to requests by id. Server errors are raised as
``DaemonError`` subclasses carrying the server's stable code.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from pocketembed import paths
from pocketembed.clients import ENV_TOKEN

from . import protocol as P


class DaemonError(Exception):
    """An error reply from the daemon; ``code`` is the stable protocol code."""

    code = "error"

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.details = details or {}


class InvalidRequest(DaemonError):
    """Bad input: the request can be fixed by the caller."""


class ModelError(DaemonError):
    """The model named cannot be used (unknown, not prepared, corrupt, not loaded)."""


class Busy(DaemonError):
    """The daemon's queue is full; retry after ``details['retry_after_ms']``."""


class DaemonTimeout(DaemonError):
    """No reply in time (client side) or the request's deadline passed (server side)."""


class StorageFailed(DaemonError):
    """The daemon's index store could not be written or read (disk full, I/O error); nothing was stored."""


class Unavailable(DaemonError):
    """The daemon is shutting down; retry against its next start."""


class AccessDenied(DaemonError):
    """``unauthorized`` (no or unknown token) or ``forbidden`` (the token does not allow this)."""


_BY_KIND: dict[str, type[DaemonError]] = {
    "request": InvalidRequest, "model": ModelError, "busy": Busy, "timeout": DaemonTimeout,
    "storage": StorageFailed, "unavailable": Unavailable, "access": AccessDenied, "internal": DaemonError,
}
"""The exception class of each kind of error code (protocol.KINDS)."""

_BY_CODE: dict[str, type[DaemonError]] = {e.code: _BY_KIND[e.kind] for e in P.ERRORS.values()}
"""Every error code of the registry → the exception class raised for it; an unknown code is a DaemonError."""


def _raise_for(reply: dict[str, Any]) -> Any:
    if reply.get("ok"):
        return reply.get("result")
    err = reply.get("error") or {}
    code = err.get("code", P.INTERNAL)
    details = {k: v for k, v in err.items() if k not in ("code", "message")}
    raise _BY_CODE.get(code, DaemonError)(code, err.get("message", "unknown error"), details)


def _embed_args(texts: Any, model: str | None, dims: int | None, dtype: str, normalize: bool, truncate: bool,
                priority: str | None, timeout: float, keep_alive: Any = None, input_type: str | None = None) -> dict:
    if isinstance(texts, str):
        texts = [texts]
    # The daemon drops the request unrun once the caller has stopped waiting for it.
    args: dict[str, Any] = {"texts": list(texts), "dtype": dtype, "normalize": normalize, "truncate": truncate,
                            "timeout_ms": max(1, int(timeout * 1000))}
    if model is not None:
        args["model"] = model
    if dims is not None:
        args["dims"] = dims
    if priority is not None:
        args["priority"] = priority
    if keep_alive is not None:
        args["keep_alive"] = keep_alive
    if input_type is not None:
        args["input_type"] = input_type
    return args


def _item(key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda result: result[key]


def _rerank_args(query: str, documents: list[str], model: str, truncate: bool, priority: str | None,
                 timeout: float) -> dict[str, Any]:
    args: dict[str, Any] = {"query": query, "documents": list(documents), "model": model, "truncate": truncate,
                            "timeout_ms": max(1, int(timeout * 1000))}
    if priority is not None:
        args["priority"] = priority
    return args


class _Ops:
    """A method per op of the protocol (ops.OPS), shared by ``Client`` and ``AsyncClient``.

    Each method builds the op's args and hands them to ``_call``, which sends the
    request and applies ``then`` to the result: blocking in Client, a coroutine in
    AsyncClient (whose methods are therefore awaited). tests/test_coverage.py
    fails when an op of OPS has no method here.
    """

    timeout: float

    def _call(self, op: str, args: dict[str, Any] | None = None, *, timeout: float | None = None,
              then: Callable[[Any], Any] | None = None) -> Any:
        raise NotImplementedError

    def ping(self, timeout: float | None = None) -> dict[str, Any]:
        return self._call("ping", timeout=timeout)

    def stats(self) -> dict[str, Any]:
        return self._call("stats")

    def models(self) -> list[dict[str, Any]]:
        return self._call("models.list")

    def load(self, name: str, keep_alive: Any = None) -> dict[str, Any]:
        """Load a model; ``keep_alive`` as Ollama's: seconds or "5m", 0 = unload when idle, negative = forever."""
        args: dict[str, Any] = {"model": name}
        if keep_alive is not None:
            args["keep_alive"] = keep_alive
        return self._call("models.load", args, timeout=max(self.timeout, 120))

    def unload(self, name: str) -> dict[str, Any]:
        return self._call("models.unload", {"model": name}, timeout=max(self.timeout, 120))

    def embed(self, texts: Any, model: str | None = None, dims: int | None = None, dtype: str = "float32",
              normalize: bool = True, truncate: bool = False, *, priority: str | None = None,
              timeout: float | None = None, keep_alive: Any = None, input_type: str | None = None) -> np.ndarray:
        """Vectors of ``texts``: float32 (n, dims), int8 (n, dims) or packed binary (n, dims/8).

        ``priority="background"`` queues bulk work behind interactive requests.
        ``timeout`` (default the client's) is also sent as the request's deadline.
        ``keep_alive`` sets how long the model stays loaded after this request;
        ``input_type`` ("query" / "document") adds the model's prefix for it.
        """
        timeout = self.timeout if timeout is None else timeout
        args = _embed_args(texts, model, dims, dtype, normalize, truncate, priority, timeout, keep_alive, input_type)
        return self._call("embed", args, timeout=timeout, then=P.decode_vectors)

    def index_add(self, collection: str, items: list[dict[str, Any]], *, model: str | None = None,
                  dims: int | None = None, chunk: bool = False, truncate: bool = False,
                  priority: str | None = None, store_text: bool | None = None) -> dict[str, Any]:
        """Embed and store ``items`` (``{"id", "text", "metadata"?}``) in ``collection``, upserting by id.

        A new collection is bound to ``model`` (default: the catalog default) and
        ``dims``. Texts the store already holds are not embedded again.
        ``chunk=True`` splits long texts into overlapping token windows (an item
        then scores as its best window); else over-long texts fail unless ``truncate``.
        ``store_text=True`` makes a new collection keep the texts, so that
        searches can return them (off by default: they are the user's data).
        """
        args: dict[str, Any] = {"collection": collection, "items": items, "chunk": chunk, "truncate": truncate}
        for key, value in (("model", model), ("dims", dims), ("priority", priority), ("store_text", store_text)):
            if value is not None:
                args[key] = value
        return self._call("index.add", args, timeout=max(self.timeout, 120))

    def index_enqueue(self, collection: str, items: list[dict[str, Any]], *, delete: list[Any] | None = None,
                      model: str | None = None, dims: int | None = None, truncate: bool = True,
                      store_text: bool | None = None) -> dict[str, Any]:
        """Queue ``items`` (``{"id", "text", "metadata"?}``) and deletions for background embedding; returns the job.

        Returns as soon as they are committed to the daemon's queue: they are
        embedded in the background lane while the power policy allows (the
        charger), each exactly once across restarts; follow with :meth:`job`.
        An item whose text the collection already holds costs no embedding.
        """
        args: dict[str, Any] = {"collection": collection, "items": items, "truncate": truncate}
        for key, value in (("delete", delete), ("model", model), ("dims", dims), ("store_text", store_text)):
            if value is not None:
                args[key] = list(value) if key == "delete" else value
        return self._call("index.enqueue", args)

    def index_delete(self, collection: str, ids: list[Any]) -> int:
        """Delete items by id; returns how many stored vectors went."""
        return self._call("index.delete", {"collection": collection, "ids": list(ids)}, then=_item("deleted"))

    def search(self, collection: str, query: str, k: int = 10, rescore_multiplier: int | None = None,
               filter: dict[str, Any] | None = None, with_text: bool = False, *, rerank: str | None = None,
               rerank_top: int | None = None, mode: str | None = None) -> list[dict[str, Any]]:
        """The ``k`` items that best match ``query``, best first: ``[{"id", "score", "metadata", "matched"}, ...]``.

        ``mode``: ``"hybrid"`` (the daemon's default: the words, numbers and names of
        the query matched exactly, fused with the vectors' meaning), ``"vector"`` or
        ``"lexical"``; each hit's ``matched`` says which side found it.

        Binary (Hamming) search takes ``k × rescore_multiplier`` candidates (default
        ×10), rescored against their int8 vectors. ``filter`` keeps items whose
        metadata has all these key/values. ``with_text`` adds each hit's ``text``
        (kept by a ``store_text`` collection, or read back from the table a job
        indexed; None when neither has it). ``rerank`` names a cross-encoder that
        rescores the ``rerank_top`` best candidates (default max(k, 20)) with the
        query; the hits then come in its order, each with its ``rerank_score``.
        """
        args: dict[str, Any] = {"collection": collection, "query": query, "k": k}
        if with_text:
            args["with_text"] = True
        for key, value in (("rescore_multiplier", rescore_multiplier), ("filter", filter), ("rerank", rerank),
                           ("rerank_top", rerank_top), ("mode", mode)):
            if value is not None:
                args[key] = value
        return self._call("search", args, then=_item("hits"))

    def rerank(self, query: str, documents: list[str], model: str, *, truncate: bool = True,
               priority: str | None = None, timeout: float | None = None) -> list[float]:
        """A cross-encoder's score of each document against ``query``, in input order.

        Scores are in the model's own scale (a sigmoid of its logit for a
        single-output cross-encoder, unless it was imported with ``--score raw``);
        :meth:`rerank_full` also returns the raw logits.
        """
        timeout = self.timeout if timeout is None else timeout
        return self._call("rerank", _rerank_args(query, documents, model, truncate, priority, timeout), timeout=timeout,
                          then=_item("scores"))

    def rerank_full(self, query: str, documents: list[str], model: str, *, truncate: bool = True,
                    priority: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        """The whole ``rerank`` reply: ``{"model", "scores", "logits", "scale"}``."""
        timeout = self.timeout if timeout is None else timeout
        return self._call("rerank", _rerank_args(query, documents, model, truncate, priority, timeout), timeout=timeout)

    def collections(self) -> list[dict[str, Any]]:
        return self._call("collections.list")

    def drop_collection(self, collection: str) -> dict[str, Any]:
        return self._call("collections.drop", {"collection": collection})

    def collection_stats(self, collection: str) -> dict[str, Any]:
        """One collection's ``collections.list`` entry and ``queued`` items; needs ``search:COLLECTION``."""
        return self._call("collections.stats", {"collection": collection})

    def index_table(self, db: str, table: str, id_column: str, text_column: str, *, where: str | None = None,
                    collection: str | None = None, model: str | None = None, truncate: bool = True) -> dict[str, Any]:
        """Queue a background job embedding every row of ``table`` in the SQLite file ``db``.

        ``collection`` defaults to the table's name. Returns the job (its ``id``
        for :meth:`job`); an identical active job is returned instead of a new one.
        """
        args: dict[str, Any] = {"db": os.path.abspath(db), "table": table, "id_column": id_column,
                                "text_column": text_column, "truncate": truncate}
        for key, value in (("where", where), ("collection", collection), ("model", model)):
            if value is not None:
                args[key] = value
        return self._call("jobs.submit", args)

    def jobs(self, limit: int = 50) -> list[dict[str, Any]]:
        """Jobs, newest first."""
        return self._call("jobs.list", {"limit": limit})

    def job(self, job_id: int) -> dict[str, Any]:
        """One job's state and progress (rows done/total, rate, ETA) and its first row errors."""
        return self._call("jobs.status", {"job": job_id})

    def job_pause(self, job_id: int) -> dict[str, Any]:
        return self._call("jobs.pause", {"job": job_id})

    def job_resume(self, job_id: int) -> dict[str, Any]:
        return self._call("jobs.resume", {"job": job_id})

    def job_cancel(self, job_id: int) -> dict[str, Any]:
        return self._call("jobs.cancel", {"job": job_id})


class Client(_Ops):
    """Blocking client. ``Client().embed(["hello"])`` returns a float32 numpy array.

    ``endpoint`` is a ZeroMQ endpoint (``ipc:///path/pe.sock``, ``tcp://127.0.0.1:5555``)
    or a socket path; default ``$POCKETEMBED_SOCKET`` or the daemon's default socket.
    ``token`` (default ``$POCKETEMBED_TOKEN``) is the client token a TCP endpoint
    requires (``pocketembed clients add``). Not thread-safe: use one Client per
    thread (or the AsyncClient).
    """

    def __init__(self, endpoint: str | None = None, *, timeout: float = 30.0, context: zmq.Context | None = None,
                 token: str | None = None) -> None:
        self.endpoint = paths.endpoint(endpoint)
        self.timeout = timeout
        self.token = token if token is not None else os.environ.get(ENV_TOKEN) or None
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.endpoint)
        self._ids = itertools.count(1)

    def call(self, op: str, args: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        """Send one request and wait for its reply (the protocol's raw form)."""
        req_id = next(self._ids)
        self._sock.send(P.request(req_id, op, args, self.token))
        deadline = timeout if timeout is not None else self.timeout
        remaining_ms = int(deadline * 1000)
        while True:
            if not self._sock.poll(remaining_ms, zmq.POLLIN):
                # The socket may hold a late reply now; a fresh socket keeps the stream in step.
                self._reconnect()
                raise DaemonTimeout(P.TIMEOUT, f"no reply to {op!r} from {self.endpoint} within {deadline:g}s")
            reply = P.unpack(self._sock.recv())
            if reply.get("id") == req_id:
                return _raise_for(reply)
            # A stale reply to an earlier, timed-out request: skip it.

    def _reconnect(self) -> None:
        self._sock.close(linger=0)
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.endpoint)

    def _call(self, op: str, args: dict[str, Any] | None = None, *, timeout: float | None = None,
              then: Callable[[Any], Any] | None = None) -> Any:
        result = self.call(op, args, timeout=timeout)
        return then(result) if then is not None else result

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Ops):
    """asyncio client: many requests in flight on one connection, each with a timeout.

    It has Client's methods, one per op, each returning an awaitable:
    ``await AsyncClient().embed(["hello"])``.
    """

    def __init__(self, endpoint: str | None = None, *, timeout: float = 30.0, token: str | None = None) -> None:
        self.endpoint = paths.endpoint(endpoint)
        self.timeout = timeout
        self.token = token if token is not None else os.environ.get(ENV_TOKEN) or None
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.endpoint)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None

    async def _read(self) -> None:
        while True:
            reply = P.unpack(await self._sock.recv())
            fut = self._pending.pop(reply.get("id"), None)
            if fut is not None and not fut.done():
                fut.set_result(reply)

    async def call(self, op: str, args: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())
        req_id = next(self._ids)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        await self._sock.send(P.request(req_id, op, args, self.token))
        deadline = timeout if timeout is not None else self.timeout
        try:
            reply = await asyncio.wait_for(fut, deadline)
        except asyncio.TimeoutError:
            raise DaemonTimeout(P.TIMEOUT, f"no reply to {op!r} from {self.endpoint} within {deadline:g}s") from None
        finally:
            self._pending.pop(req_id, None)
        return _raise_for(reply)

    async def _call(self, op: str, args: dict[str, Any] | None = None, *, timeout: float | None = None,
                    then: Callable[[Any], Any] | None = None) -> Any:
        result = await self.call(op, args, timeout=timeout)
        return then(result) if then is not None else result

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        self._sock.close(linger=0)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
