"""Protocol v1: the msgpack envelope, vectors as raw bytes, limits, error codes.

Written down for humans in ipc/PROTOCOL.md; this module is its executable form
and is shared by the server and every Python client (the ops and their
argument schemas are in ops.py). It imports no llama.cpp.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

VERSION = 1

# Limits (also in PROTOCOL.md). A request beyond them gets an error, never a crash.
MAX_FRAME_BYTES = 4 * 1024 * 1024
MAX_TEXT_BYTES = 16 * 1024
MAX_TEXTS = 1024

# Stable error codes.
BAD_FRAME = "bad_frame"            # not msgpack, not a map, wrong frame count
BAD_VERSION = "bad_version"
UNKNOWN_OP = "unknown_op"
INVALID_ARGS = "invalid_input"     # missing / wrong-typed / out-of-range argument
TOO_LARGE = "too_large"            # frame, text or text count over its limit
EMPTY_TEXT = "empty_text"
TEXT_TOO_LONG = "text_too_long"    # over the model's max tokens without truncate
UNKNOWN_MODEL = "unknown_model"
MODEL_NOT_PREPARED = "model_not_prepared"
MODEL_CORRUPT = "model_corrupt"
MODEL_NOT_LOADED = "model_not_loaded"
MODEL_UNLOADING = "model_unloading"  # the model is being unloaded on purpose
MEMORY_BUDGET = "memory_budget"      # loading it would exceed the memory budget
WRONG_MODEL_KIND = "wrong_model_kind"  # a reranker where vectors are needed, or an embedder given to rerank
BUSY = "busy"
TIMEOUT = "timeout"
SHUTTING_DOWN = "shutting_down"
STORAGE_FULL = "storage_full"        # the disk is full: nothing of the request was stored
STORAGE_ERROR = "storage_error"      # the index store failed (I/O, read-only, corrupt, unavailable)
UNSUPPORTED_BUILD = "unsupported_build"  # the daemon's llama.cpp build is known to crash with this model
UNKNOWN_JOB = "unknown_job"
INVALID_STATE = "invalid_state"      # e.g. resume a job that is not paused
BAD_SOURCE = "bad_source"            # an index job's database/table/columns/where cannot be read
UNKNOWN_COLLECTION = "unknown_collection"
COLLECTION_MISMATCH = "collection_mismatch"  # a collection is bound to one model and dims
UNAUTHORIZED = "unauthorized"        # no client token, or an unknown or revoked one
FORBIDDEN = "forbidden"              # the token's permissions do not cover the op (or the job's path)
INTERNAL = "internal"

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
