"""Protocol v1: the msgpack envelope, vectors as raw bytes, limits, error codes.

Written down for humans in ipc/PROTOCOL.md; this module is its executable form
and is shared by the server and every Python client (the ops and their
argument schemas are in ops.py). It imports no llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

VERSION = 1

# Limits (also in PROTOCOL.md). A request beyond them gets an error, never a crash.
MAX_FRAME_BYTES = 4 * 1024 * 1024
MAX_TEXT_BYTES = 16 * 1024
MAX_TEXTS = 1024

# -- stable error codes ----------------------------------------------------------------
#
# The one declaration of every code a reply's ``error.code`` may carry. The
# constants below, the Python client's exception classes (client.py), PROTOCOL.md's
# error table (generated: ``python -m pocketembed.ipc.ops``) and the Java client's
# DaemonException are all checked against it (tests/test_coverage.py).


@dataclass(frozen=True)
class ErrorCode:
    code: str
    kind: str
    """The family a client raises it as: one of ``KINDS``."""
    meaning: str
    """When the daemon answers it (markdown, as PROTOCOL.md shows it)."""
    retry: str
    """Whether, and when, the same request may succeed if sent again."""
    http: int
    """The HTTP status the HTTP endpoints answer it with (daemon/http_api.py)."""


KINDS = {
    "request": "the request is wrong; fix it (Python InvalidRequest, Java InvalidRequest)",
    "model": "the model named cannot be used as asked (ModelError)",
    "busy": "a queue is full; retry after retry_after_ms (Busy)",
    "timeout": "the deadline passed before the request ran (DaemonTimeout, Java Timeout)",
    "storage": "the index store cannot be written or read (StorageFailed, Java Storage)",
    "unavailable": "the daemon is going away (Unavailable)",
    "access": "the token does not allow the request (AccessDenied)",
    "internal": "a bug in the daemon (DaemonError, Java DaemonException)",
}

ERRORS: dict[str, ErrorCode] = {}
"""Every error code of protocol v1, in PROTOCOL.md's order."""


def _error(code: str, kind: str, meaning: str, retry: str, http: int) -> str:
    assert kind in KINDS and code not in ERRORS, code
    ERRORS[code] = ErrorCode(code, kind, meaning, retry, http)
    return code


NO = "no: fix the request"
BAD_FRAME = _error("bad_frame", "request", "not msgpack, not a map, bad `id` type, or wrong number of frames", NO, http=400)
BAD_VERSION = _error("bad_version", "request", "`v` is not 1", NO, http=400)
UNKNOWN_OP = _error("unknown_op", "request", "no such op", NO, http=404)
INVALID_ARGS = _error("invalid_input", "request", "an argument is missing, of the wrong type or out of range", NO, http=400)
TOO_LARGE = _error("too_large", "request", "a frame, text, list, string, map or reply over its limit",
                   "no: split the request (or ask for less)", http=413)
EMPTY_TEXT = _error("empty_text", "request", "a text is empty or whitespace only, or has no tokens", NO, http=400)
TEXT_TOO_LONG = _error("text_too_long", "request", "a text is over the model's token limit and `truncate` is false",
                       "with `truncate` (or `chunk`)", http=400)
UNKNOWN_MODEL = _error("unknown_model", "model", "the model name is neither in the catalog nor imported", NO, http=404)
WRONG_MODEL_KIND = _error("wrong_model_kind", "model", "a reranker where vectors are needed (`embed`, `index.*`, "
                          "jobs), or an embedding model given to `rerank` / search's `rerank`", NO, http=400)
MODEL_NOT_PREPARED = _error("model_not_prepared", "model",
                            "the model's file is missing: run `pocketembed models prepare NAME`", "once it is prepared", http=404)
MODEL_CORRUPT = _error("model_corrupt", "model",
                       "the file fails its sha256 / is not GGUF / is not an embedding model",
                       "once it is prepared again (`models prepare --force`)", http=503)
MODEL_NOT_LOADED = _error("model_not_loaded", "model", "`models.unload` of a model that is not loaded; or the model "
                          "is not loaded and on-demand loading is off", "after `models.load`", http=409)
MODEL_UNLOADING = _error("model_unloading", "model",
                         "the model is being unloaded on purpose; load it again or retry later", "yes, later", http=503)
MEMORY_BUDGET = _error("memory_budget", "model", "loading the model would exceed the daemon's memory budget even "
                       "after evicting idle models", "once another model is unloaded or idle", http=503)
UNSUPPORTED_BUILD = _error("unsupported_build", "model",
                           "the daemon's llama.cpp build is known to crash with this model",
                           "no: another model, or another llama.cpp build", http=501)
BUSY = _error("busy", "busy", "the lane's queue is full; the error map has `retry_after_ms`",
              "yes, after `retry_after_ms`", http=429)
TIMEOUT = _error("timeout", "timeout", "the request's `timeout_ms` passed before it ran (not computed)",
                 "yes (a longer `timeout_ms`, or when the daemon is less loaded)", http=504)
LOADING = _error("loading", "unavailable", "the daemon is still loading its start-up models (HTTP only: the "
                 "ZeroMQ sockets take requests once they are loaded)", "yes, after `Retry-After`", http=503)
SHUTTING_DOWN = _error("shutting_down", "unavailable", "the daemon received SIGTERM and takes no new work",
                       "yes, once the daemon is started again", http=503)
UNKNOWN_JOB = _error("unknown_job", "request", "no job with that id (that this client may read)", NO, http=404)
INVALID_STATE = _error("invalid_state", "request",
                       "the job's state does not allow that action (e.g. resume a running job)",
                       "once the job is in a state that allows it", http=409)
BAD_SOURCE = _error("bad_source", "request",
                    "an index job's database, table, columns or `where` cannot be read as asked",
                    "no: fix the source or the request", http=400)
UNKNOWN_COLLECTION = _error("unknown_collection", "request", "no collection with that name", NO, http=404)
COLLECTION_MISMATCH = _error("collection_mismatch", "request", "the collection is bound to another model or dims", NO, http=409)
STORAGE_FULL = _error("storage_full", "storage", "the daemon's index store cannot be written because the disk is "
                      "full; nothing of the request was stored", "once disk space is freed", http=507)
STORAGE_ERROR = _error("storage_error", "storage", "the index store failed (I/O error, read-only, corrupt, or "
                       "unavailable since start: see `stats.store`); nothing of the request was stored",
                       "once the store's cause is fixed (often a daemon restart)", http=503)
UNAUTHORIZED = _error("unauthorized", "access", "no client token, or an unknown or revoked one, where one is needed "
                      "(TCP); or a connection blocked for bad tokens (with `retry_after_ms`)",
                      "with a valid token (a blocked connection: after `retry_after_ms`)", http=401)
FORBIDDEN = _error("forbidden", "access", "the token's permissions do not cover the op or its collection; or a "
                   "job's `db` outside the configured `job_sources`", "no: a token that allows it", http=403)
INTERNAL = _error("internal", "internal", "a bug in the daemon; the message says what failed. The daemon goes on; if "
                  "one of its threads died, every request it held gets `internal` and the daemon exits with status 70 "
                  "for its supervisor to restart it", "perhaps, after the restart", http=500)
del NO

DTYPES = ("float32", "int8", "binary")


class ProtocolError(Exception):
    """A request that cannot be served; becomes an error reply with ``code``."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(frame: bytes) -> Any:
    return msgpack.unpackb(frame, raw=False, strict_map_key=False, max_bin_len=MAX_FRAME_BYTES,
                           max_str_len=MAX_FRAME_BYTES, max_array_len=1 << 20, max_map_len=1 << 16)


def request(req_id: Any, op: str, args: dict[str, Any] | None = None, auth: str | None = None) -> bytes:
    """One request frame; ``auth`` is the client token the TCP endpoint requires."""
    msg = {"v": VERSION, "id": req_id, "op": op, "args": args or {}}
    if auth is not None:
        msg["auth"] = auth
    return pack(msg)


def ok_reply(req_id: Any, result: Any) -> bytes:
    return pack({"v": VERSION, "id": req_id, "ok": True, "result": result})


def error_reply(req_id: Any, code: str, message: str, **extra: Any) -> bytes:
    err = {"code": code, "message": message}
    err.update(extra)
    return pack({"v": VERSION, "id": req_id, "ok": False, "error": err})


# -- vectors -----------------------------------------------------------------------


def encode_vectors(vecs: np.ndarray, dtype: str) -> dict[str, Any]:
    """float32 (n, d) → the wire form: raw little-endian bytes, dtype and shape.

    int8 is symmetric per-vector-free scaling: round(x * 127) of the unit vector,
    so a dot product of two int8 vectors / 127² approximates their cosine.
    binary packs sign bits (x > 0) MSB-first, 8 dims per byte (numpy packbits).
    """
    n, d = vecs.shape
    if dtype == "float32":
        data = np.ascontiguousarray(vecs, dtype="<f4").tobytes()
    elif dtype == "int8":
        data = np.clip(np.rint(vecs * 127.0), -127, 127).astype(np.int8).tobytes()
    elif dtype == "binary":
        data = np.packbits(vecs > 0, axis=1).tobytes()
    else:
        raise ProtocolError(INVALID_ARGS, f"dtype must be one of {', '.join(DTYPES)}")
    return {"dtype": dtype, "shape": [n, d], "data": data}


def decode_vectors(obj: dict[str, Any]) -> np.ndarray:
    """The wire form back to numpy: float32 (n, d), int8 (n, d) or uint8 (n, ceil(d/8))."""
    n, d = obj["shape"]
    data = obj["data"]
    dtype = obj["dtype"]
    if dtype == "float32":
        return np.frombuffer(data, dtype="<f4").reshape(n, d).astype(np.float32, copy=False)
    if dtype == "int8":
        return np.frombuffer(data, dtype=np.int8).reshape(n, d)
    if dtype == "binary":
        return np.frombuffer(data, dtype=np.uint8).reshape(n, (d + 7) // 8)
    raise ValueError(f"unknown vector dtype {dtype!r}")
