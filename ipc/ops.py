"""Protocol v1's ops as one declarative table: argument schema, permission, executor, handler.

The table runs the daemon: its transport decodes and authenticates a request,
then calls the op's handler (daemon/handlers.py, by the name ``Op.handler``) on
the executor ``Op.executor`` names, and that is all it knows of the op. Adding
an op is a row here and a handler there (tests/test_coverage.py then asks for
its PROTOCOL.md entry, client methods and CLI command).

The router decodes each request in two steps with msgspec: the envelope
(``v``, ``id``, ``op``, ``auth``) with ``args`` left as raw bytes, then
``args`` straight into the op's Struct. Types, ranges, lengths and the nesting
depth of JSON-like values (``metadata``, ``filter``) are checked in that one
decode: a value nested deeper than its type allows fails at the first level
too deep, without building it. Limits that carry their own error code
(``too_large``, ``empty_text``) are checked in ``__post_init__``, which msgspec
runs as part of the decode.

Chosen over pydantic: msgspec decodes msgpack itself (pydantic would validate
what the msgpack library already built), and costs a few microseconds per
request (``scripts/bench_protocol.py``). PROTOCOL.md's argument tables are
generated from these Structs (``python -m pocketembed.ipc.ops``);
tests/test_protocol_doc.py checks that they agree.

No llama.cpp here: clients may import this module to check requests early.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import Meta, Struct

from pocketembed.clients import allows
from pocketembed.config import parse_duration
from pocketembed.errors import PocketEmbedError

from . import protocol as P

MAX_IDS = 10_000
MAX_K = 1_000
MAX_RESCORE = 1_000
MAX_CANDIDATES = 10_000
"""k × rescore_multiplier: the rows one search may read back and rescore."""
MAX_RERANK_DOCS = 256
"""Documents one ``rerank`` scores: each is a full cross-encoder pass over query + document."""
MAX_RERANK_TOP = 200
"""Search candidates one ``search(rerank=...)`` rescores with the cross-encoder."""
MAX_METADATA_BYTES = 65_536
"""A metadata map, encoded as JSON."""
MAX_FILTER_KEYS = 16

# -- shared argument types ----------------------------------------------------------

Scalar = Union[str, int, float, bool, None]
Collection = Annotated[str, Meta(min_length=1, max_length=128, description="1–128 characters")]
ModelName = Annotated[str, Meta(min_length=1, max_length=128)]
ItemId = Union[Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)], Annotated[str, Meta(min_length=1, max_length=512)]]
MetaKey = Annotated[str, Meta(max_length=256)]
Metadata = Annotated[
    dict[MetaKey, Union[Scalar, Annotated[list[Scalar], Meta(max_length=256)], Annotated[dict[MetaKey, Scalar], Meta(max_length=256)]]],
    Meta(max_length=256),
]
"""JSON-like, two levels deep at most: a map of scalars, lists of scalars or maps of scalars."""
Filter = Annotated[dict[MetaKey, Scalar], Meta(max_length=MAX_FILTER_KEYS)]
KeepAlive = Union[int, float, Annotated[str, Meta(max_length=32)]]
Lane = Literal["interactive", "background"]
JobId = Annotated[int, Meta(ge=0, le=2**63 - 1)]


def D(typ: Any, description: str) -> Any:
    """A field type with its meaning, which PROTOCOL.md's generated tables show."""
    return Annotated[typ, Meta(description=description)]


def _text(value: str, where: str) -> None:
    """A text the model will read: non-blank and at most MAX_TEXT_BYTES of UTF-8."""
    if len(value) * 4 > P.MAX_TEXT_BYTES and len(value.encode("utf-8", "surrogatepass")) > P.MAX_TEXT_BYTES:
        raise P.ProtocolError(P.TOO_LARGE, f"{where} is over {P.MAX_TEXT_BYTES} bytes")
    if not value.strip():
        raise P.ProtocolError(P.EMPTY_TEXT, f"{where} is empty")


def _keep_alive(value: Any) -> None:
    if value is not None:
        try:
            parse_duration(value)
        except PocketEmbedError as e:
            raise P.ProtocolError(P.INVALID_ARGS, e.message) from None


def _collection(name: str) -> None:
    if not name.strip():
        raise P.ProtocolError(P.INVALID_ARGS, "collection must not be blank")


class Args(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Base of every op's arguments: unknown keys are refused, so a misspelt argument is an error."""


class NoArgs(Args):
    pass


class EmbedArgs(Args):
    texts: D(list[str], "1–1,024 non-empty texts of at most 16 KiB of UTF-8 each")
    model: D(ModelName | None, "catalog name `family:quantization` (a bare family means its q8_0) or an imported model's name; default: the default model") = None
    normalize: D(bool, "L2-normalize (after `dims` truncation)") = True
    dims: D(Annotated[int, Meta(ge=1, le=65_536)] | None, "Matryoshka truncation: keep the first `dims` dimensions (1..model dims), then renormalize") = None
    dtype: D(Literal["float32", "int8", "binary"], "the vectors' wire form (see Vectors)") = "float32"
    truncate: D(bool, "cut over-long texts to `max_tokens` (keeping the closing [SEP]) instead of failing with `text_too_long`") = False
    priority: D(Lane | None, "`interactive` (default) or `background` (bulk work, re-indexing)") = None
    keep_alive: D(KeepAlive | None, "how long the model stays loaded after this request: seconds, or `\"30s\"`, `\"5m\"`, `\"1h\"`; `0` unloads it once idle; negative keeps it forever") = None
    input_type: D(Literal["query", "document"] | None, "put the model's query / document prefix (catalog or config) before each text") = None
    timeout_ms: D(Annotated[float, Meta(gt=0, le=86_400_000)] | None, "the request's deadline in ms from its arrival; if it passes before any of its texts runs, the reply is `timeout` and nothing is computed") = None

    def __post_init__(self) -> None:
        if not self.texts:
            raise P.ProtocolError(P.INVALID_ARGS, "texts must be a non-empty list of strings")
        if len(self.texts) > P.MAX_TEXTS:
            raise P.ProtocolError(P.TOO_LARGE, f"{len(self.texts)} texts, limit {P.MAX_TEXTS} per request")
        for i, t in enumerate(self.texts):
            _text(t, f"texts[{i}]")
        _keep_alive(self.keep_alive)


class ModelArgs(Args):
    model: D(ModelName, "catalog name")
    keep_alive: D(KeepAlive | None, "idle time before it unloads again (as for `embed`)") = None

    def __post_init__(self) -> None:
        _keep_alive(self.keep_alive)


class UnloadArgs(Args):
    model: D(ModelName, "catalog name")


class SearchArgs(Args):
    collection: D(Collection, "the collection to search")
    query: D(str, "non-empty, at most 16 KiB; embedded with the model's query prefix, truncated to `max_tokens`")
    k: D(Annotated[int, Meta(ge=1, le=MAX_K)], "how many hits") = 10
    rescore_multiplier: D(Annotated[int, Meta(ge=1, le=MAX_RESCORE)] | None, f"binary candidates per hit rescored with int8 (default 10); k × multiplier ≤ {MAX_CANDIDATES:,}") = None
    rescore: D(bool, "false: rank by Hamming distance alone") = True
    filter: D(Filter | None, f"up to {MAX_FILTER_KEYS} metadata keys → plain values (str, number, bool, nil); all must match") = None
    model: D(ModelName | None, "if given, must be the collection's model (else `collection_mismatch`)") = None
    with_text: D(bool, "add each hit's `text`: kept by a `store_text` collection, or read back from the source row of the table a job indexed; nil when neither has it") = False
    rerank: D(ModelName | None, "a reranker (cross-encoder) that rescores the top `rerank_top` candidates with the query; hits then carry `rerank_score` and come in its order. Needs the candidates' texts (a `store_text` collection, or a job's source rows)") = None
    rerank_top: D(Annotated[int, Meta(ge=1, le=MAX_RERANK_TOP)] | None, f"candidates rescored by `rerank` (default max(k, 20)); at least k, at most {MAX_RERANK_TOP}") = None
    mode: D(Literal["hybrid", "vector", "lexical"], "`hybrid`: the query's words, numbers and names matched exactly (a lexical index), fused with the vectors' meaning; `vector`: meaning alone; `lexical`: exact matches alone (no query embedding). Each hit's `matched` says which side found it") = "hybrid"

    def __post_init__(self) -> None:
        _collection(self.collection)
        _text(self.query, "query")
        if self.rerank_top is not None and self.rerank is None:
            raise P.ProtocolError(P.INVALID_ARGS, "rerank_top needs rerank (a reranker model)")
        if self.rerank_top is not None and self.rerank_top < self.k:
            raise P.ProtocolError(P.INVALID_ARGS, f"rerank_top ({self.rerank_top}) must be at least k ({self.k})")
        if self.rerank is not None and self.k > MAX_RERANK_TOP:
            raise P.ProtocolError(P.INVALID_ARGS, f"with rerank, k is at most {MAX_RERANK_TOP}")
        if self.k * (self.rescore_multiplier or 10) > MAX_CANDIDATES:
            raise P.ProtocolError(P.INVALID_ARGS, f"k × rescore_multiplier is {self.k * (self.rescore_multiplier or 10)}; "
                                                  f"at most {MAX_CANDIDATES} candidates are rescored per search")


class RerankArgs(Args):
    query: D(str, "non-empty, at most 16 KiB")
    documents: D(list[str], f"1–{MAX_RERANK_DOCS} non-empty documents of at most 16 KiB each, scored against the query")
    model: D(ModelName, "a reranker: an imported cross-encoder (`models.list` shows `kind: rerank`)")
    truncate: D(bool, "cut a pair over the model's `max_tokens` at the end of its document (false: `text_too_long`)") = True
    priority: D(Lane | None, "`interactive` (default) or `background`") = None
    keep_alive: D(KeepAlive | None, "as for `embed`") = None
    timeout_ms: D(Annotated[float, Meta(gt=0, le=86_400_000)] | None, "as for `embed`") = None

    def __post_init__(self) -> None:
        _text(self.query, "query")
        if not self.documents:
            raise P.ProtocolError(P.INVALID_ARGS, "documents must be a non-empty list of strings")
        if len(self.documents) > MAX_RERANK_DOCS:
            raise P.ProtocolError(P.TOO_LARGE, f"{len(self.documents)} documents, limit {MAX_RERANK_DOCS} per request")
        for i, d in enumerate(self.documents):
            _text(d, f"documents[{i}]")
        _keep_alive(self.keep_alive)


class Item(Struct, forbid_unknown_fields=True, omit_defaults=True):
    id: D(ItemId, "int64, or a string of 1–512 characters; unique within the request")
    text: D(str, "non-empty, at most 16 KiB")
    metadata: D(Metadata | None, "JSON-like, two levels deep at most, ≤ 64 KiB as JSON") = None


class IndexAddArgs(Args):
    collection: D(Collection, "created on first use")
    items: D(list[Item], "1–1,024 items `{id, text, metadata?}`")
    model: D(ModelName | None, "the collection's model; a new collection is bound to it (default: the default model)") = None
    dims: D(Annotated[int, Meta(ge=1, le=65_536)] | None, "Matryoshka dims of a new collection") = None
    chunk: D(bool, "split texts over `max_tokens` into overlapping token windows; the item scores as its best window") = False
    truncate: D(bool, "without `chunk`: embed the first `max_tokens` of a long text instead of failing") = False
    priority: D(Lane | None, "lane of the embedding") = None
    float_vectors: D(bool, "a new collection also keeps float32 vectors") = False
    store_text: D(bool | None, "a new collection keeps each item's text so `search` can return it (off by default: it is the user's data); fixed at creation, the other value on an existing collection is `collection_mismatch`") = None

    def __post_init__(self) -> None:
        _collection(self.collection)
        if not self.items:
            raise P.ProtocolError(P.INVALID_ARGS, "items must be a non-empty list of {id, text, metadata?} maps")
        if len(self.items) > P.MAX_TEXTS:
            raise P.ProtocolError(P.TOO_LARGE, f"{len(self.items)} items, limit {P.MAX_TEXTS} per request")
        seen: set[Any] = set()
        for i, it in enumerate(self.items):
            if it.id in seen:
                raise P.ProtocolError(P.INVALID_ARGS, f"items[{i}].id {it.id!r} appears twice")
            seen.add(it.id)
            _text(it.text, f"items[{i}].text")
            if it.metadata is not None and len(msgspec.json.encode(it.metadata)) > MAX_METADATA_BYTES:
                raise P.ProtocolError(P.TOO_LARGE, f"items[{i}].metadata is over {MAX_METADATA_BYTES} bytes as JSON")


class IndexEnqueueArgs(Args):
    collection: D(Collection, "created on first use")
    items: D(Annotated[list[Item], Meta(max_length=P.MAX_TEXTS)], "0–1,024 items `{id, text, metadata?}` to embed and store; `items` and `delete` may not both be empty") = []
    delete: D(Annotated[list[ItemId], Meta(max_length=MAX_IDS)], "ids to delete, in order with the items") = []
    model: D(ModelName | None, "the collection's model; a new collection is bound to it (default: the default model)") = None
    dims: D(Annotated[int, Meta(ge=1, le=65_536)] | None, "Matryoshka dims of a new collection") = None
    truncate: D(bool, "embed the first `max_tokens` of a long text (false: such items are recorded as the job's errors)") = True
    store_text: D(bool | None, "as for `index.add`") = None

    def __post_init__(self) -> None:
        _collection(self.collection)
        if not self.items and not self.delete:
            raise P.ProtocolError(P.INVALID_ARGS, "give items to add or ids to delete (at least one of the two non-empty)")
        for i, it in enumerate(self.items):
            _text(it.text, f"items[{i}].text")
            if it.metadata is not None and len(msgspec.json.encode(it.metadata)) > MAX_METADATA_BYTES:
                raise P.ProtocolError(P.TOO_LARGE, f"items[{i}].metadata is over {MAX_METADATA_BYTES} bytes as JSON")


class IndexDeleteArgs(Args):
    collection: D(Collection, "the collection")
    ids: D(Annotated[list[ItemId], Meta(min_length=1, max_length=MAX_IDS)], "ids to delete; unknown ids are ignored")

    def __post_init__(self) -> None:
        _collection(self.collection)


class CollectionArgs(Args):
    collection: D(Collection, "the collection")

    def __post_init__(self) -> None:
        _collection(self.collection)


NonEmpty = Annotated[str, Meta(min_length=1, max_length=4096)]


class JobSubmitArgs(Args):
    db: D(NonEmpty, "absolute path of the SQLite file; opened read-only, one short read per chunk")
    table: D(Annotated[str, Meta(min_length=1, max_length=256)], "table or view")
    id_column: D(Annotated[str, Meta(min_length=1, max_length=256)], "a unique column (the primary key, best indexed); rows are read in its order")
    text_column: D(Annotated[str, Meta(min_length=1, max_length=256)], "the text; NULL or empty rows are skipped (counted, not failed)")
    where: D(Annotated[str, Meta(max_length=4096)] | None, "an SQL condition selecting the rows; each statement on the source runs under `source_budget_s` (default 5 s), else `bad_source`") = None
    collection: D(Collection | None, "the collection to write (default: the table's name)") = None
    model: D(ModelName | None, "catalog name (default: the default model); its `document_prefix` is applied") = None
    truncate: D(bool, "embed the first `max_tokens` of longer rows; false: such rows are recorded as errors") = True

    def __post_init__(self) -> None:
        if not self.db.startswith("/"):
            raise P.ProtocolError(P.INVALID_ARGS, "db must be an absolute path (the daemon has its own working directory)")
        if self.collection is not None:
            _collection(self.collection)


class JobsListArgs(Args):
    limit: D(Annotated[int, Meta(ge=1, le=1000)], "most jobs returned, newest first") = 50


class JobArgs(Args):
    job: D(JobId, "the job's id")


# -- the table ----------------------------------------------------------------------

EXECUTORS = ("inline", "scheduler", "search", "write", "control", "aux", "source")
"""Where an op runs in the daemon:

* inline: on the I/O thread (cheap, no I/O);
* scheduler: handed straight to the embedding scheduler's lanes and decode workers;
* search: the search thread (a search waits for no write);
* write: the write thread (writes one at a time, in arrival order: the last write to an id wins);
* control: model loads and unloads;
* aux: reads of the daemon's own state (stats, jobs);
* source: work on a caller's SQLite file (``jobs.submit`` checks the source, under a time budget),
  apart so that ``stats`` and ``jobs.*`` never wait behind it.
"""


@dataclass(frozen=True)
class Op:
    name: str
    args: type[Args]
    executor: str
    permission: str | None
    """What a client's token must allow: ``embed``, ``admin``, ``search:{collection}`` or
    ``index:{collection}`` (the request's collection), ``index:{job}`` (the collection of the job
    the request names: a function of stored state, checked on the executor); None for anyone."""
    summary: str
    result: Literal["map", "list"] = "map"
    """The shape of the reply's ``result``."""
    handler: str = ""
    """The daemon's handler of the op (daemon/handlers.py); default: the name with ``_`` for ``.``."""

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ValueError(f"op {self.name}: unknown executor {self.executor!r}")
        if not self.handler:
            object.__setattr__(self, "handler", self.name.replace(".", "_"))

    @property
    def by_stored_state(self) -> bool:
        """Whether the permission depends on stored state (a job's collection): known only on the executor."""
        return self.permission is not None and "{job}" in self.permission

    def allowed_before_args(self, granted: tuple[str, ...], raw_args: bytes) -> bool:
        """Whether ``granted`` may make this request at all, decided before its arguments are validated.

        So a client learns nothing from an op it may not call, not even whether its
        arguments would be valid. For a per-collection permission the collection is
        read leniently from the raw args; if it is missing or not a string, any
        permission of the kind (``search:*`` or ``search:X``) lets the request on to
        validation, which then names what is wrong.
        """
        if self.permission is None:
            return True
        if "{" not in self.permission:
            return allows(granted, self.permission)
        kind = self.permission.partition(":")[0]
        collection = None if self.by_stored_state else _peek_collection(raw_args)
        if isinstance(collection, str):
            return allows(granted, f"{kind}:{collection}")
        return "admin" in granted or any(g.startswith(kind + ":") for g in granted)

    def needs(self, args: Args, job_collection: Callable[[int], str | None] | None = None) -> str | None:
        """The permission this request needs, from its arguments (and, for ``{job}``, the job's collection).

        ``job_collection`` looks a job's collection up (None: no such job); for an op
        whose permission names the job, a missing job needs what no token has
        (``admin`` aside), so that "no job" and "not yours" are one answer.
        """
        if self.permission is None or "{" not in self.permission:
            return self.permission
        kind = self.permission.partition(":")[0]
        if self.by_stored_state:
            collection = job_collection(args.job) if job_collection is not None else None
            return f"{kind}:{collection}" if collection is not None else "admin"
        return f"{kind}:{getattr(args, 'collection', '')}"


OPS: dict[str, Op] = {op.name: op for op in (
    Op("ping", NoArgs, "inline", None, "liveness and version"),
    Op("models.list", NoArgs, "inline", "embed", "the catalog and what is loaded", result="list"),
    Op("embed", EmbedArgs, "scheduler", "embed", "vectors of texts"),
    Op("rerank", RerankArgs, "scheduler", "embed", "a cross-encoder's score of each (query, document) pair"),
    Op("models.load", ModelArgs, "control", "admin", "load a model"),
    Op("models.unload", UnloadArgs, "control", "admin", "unload a model"),
    Op("stats", NoArgs, "aux", "admin", "counters, queues, models, power"),
    Op("search", SearchArgs, "search", "search:{collection}", "the k nearest items of a collection"),
    Op("index.add", IndexAddArgs, "write", "index:{collection}", "embed and store items now"),
    Op("index.delete", IndexDeleteArgs, "write", "index:{collection}", "delete items by id"),
    Op("index.enqueue", IndexEnqueueArgs, "write", "index:{collection}",
       "queue items (and deletions) to embed in the background while the power policy allows"),
    Op("collections.list", NoArgs, "search", "admin", "the collections", result="list"),
    Op("collections.drop", CollectionArgs, "write", "admin", "delete a collection"),
    Op("collections.stats", CollectionArgs, "search", "search:{collection}",
       "one collection's size, codes, lexical index and queued work (an app sees its own)"),
    Op("jobs.submit", JobSubmitArgs, "source", "admin", "queue a job indexing a SQLite table"),
    Op("jobs.list", JobsListArgs, "aux", "admin", "jobs, newest first", result="list"),
    Op("jobs.status", JobArgs, "aux", "index:{job}", "one job with its row errors (an app follows "
       "its queue job)"),
    Op("jobs.pause", JobArgs, "aux", "admin", "pause a job"),
    Op("jobs.resume", JobArgs, "aux", "admin", "resume a job"),
    Op("jobs.cancel", JobArgs, "aux", "admin", "cancel a job"),
)}


# -- decoding -----------------------------------------------------------------------


class Envelope(Struct):
    """The request map with ``args`` undecoded; fields are checked by hand so the id survives bad ones."""

    v: Any = None
    id: Any = None
    op: Any = None
    args: msgspec.Raw = msgspec.Raw(b"\x80")
    auth: Any = None


_ENVELOPE = msgspec.msgpack.Decoder(Envelope)
_DECODERS = {name: msgspec.msgpack.Decoder(op.args) for name, op in OPS.items()}


@dataclass
class Request:
    id: Any
    op: Op | None
    """None for an op name the table does not know: refused (``unknown_op``) only after authentication,
    so a caller without a token does not learn the list of ops."""
    args: Args | None
    """None until ``decode_args``: the daemon authenticates a request before it reads its args."""
    auth: str | None = None
    raw_args: bytes = b"\x80"
    op_name: str = ""


def decode(frame: bytes) -> Request:
    """One request frame → a validated Request, or ProtocolError with a stable code."""
    return decode_args(known_op(decode_envelope(frame)))


def known_op(req: Request) -> Request:
    """``unknown_op`` unless the request names an op of the table."""
    if req.op is None:
        raise P.ProtocolError(P.UNKNOWN_OP, f"unknown op {_short_repr(req.op_name)}; known: {', '.join(sorted(OPS))}",
                              id=req.id)
    return req


def decode_envelope(frame: bytes) -> Request:
    """The envelope only (version, id, op, auth); ``args`` stays raw until ``decode_args``.

    The id is recovered whenever the frame is a map, so even a bad request's
    error reply can be matched by the client. An op name the table does not know
    leaves ``op`` None (see ``known_op``).
    """
    try:
        env = _ENVELOPE.decode(frame)  # args stay raw bytes: cheap even for an over-size frame
    except msgspec.ValidationError:
        raise P.ProtocolError(P.BAD_FRAME, "request must be a msgpack map with v, id, op, args") from None
    except (msgspec.DecodeError, RecursionError) as e:
        raise P.ProtocolError(P.BAD_FRAME, f"frame is not valid msgpack ({_short(e)})") from None
    req_id = env.id
    if not isinstance(req_id, (int, str, type(None))) or isinstance(req_id, bool) or (
            isinstance(req_id, int) and not -(2**63) <= req_id < 2**64) or (isinstance(req_id, str) and len(req_id) > 256):
        raise P.ProtocolError(P.BAD_FRAME, "id must be an integer or a string of at most 256 characters")
    if len(frame) > P.MAX_FRAME_BYTES:
        raise P.ProtocolError(P.TOO_LARGE, f"frame has {len(frame)} bytes, limit {P.MAX_FRAME_BYTES}", id=req_id)
    if env.v != P.VERSION or isinstance(env.v, bool):
        raise P.ProtocolError(P.BAD_VERSION, f"protocol version must be {P.VERSION}, got {_short_repr(env.v)}", id=req_id)
    if env.auth is not None and (not isinstance(env.auth, str) or len(env.auth) > 256):
        raise P.ProtocolError(P.INVALID_ARGS, "auth must be a string (a client token)", id=req_id)
    if not isinstance(env.op, str):
        raise P.ProtocolError(P.INVALID_ARGS, "op must be a string", id=req_id)
    raw = bytes(env.args)
    return Request(req_id, OPS.get(env.op), None, env.auth, b"\x80" if raw == b"\xc0" else raw,  # args: nil, as {}
                   op_name=env.op[:128])


def decode_args(req: Request) -> Request:
    """Decode and validate ``args`` into the op's Struct (in place)."""
    try:
        req.args = _DECODERS[req.op.name].decode(req.raw_args)
    except P.ProtocolError as e:
        e.extra["id"] = req.id
        raise
    except msgspec.ValidationError as e:
        # A list, string or map longer than its limit is over a size limit, as a text or a frame is.
        code = P.TOO_LARGE if _OVER_LENGTH.search(str(e)) else P.INVALID_ARGS
        raise P.ProtocolError(code, f"{req.op.name} args: {e}", id=req.id) from None
    except (msgspec.DecodeError, RecursionError) as e:
        raise P.ProtocolError(P.INVALID_ARGS, f"{req.op.name} args cannot be decoded ({_short(e)})", id=req.id) from None
    return req


_OVER_LENGTH = re.compile(r"^Expected `\w+` of length <= ")


class _Peek(Struct):
    """The ``collection`` of a request's args, read leniently (other keys ignored) to authorise it."""

    collection: Any = None


_PEEK = msgspec.msgpack.Decoder(_Peek)


def _peek_collection(raw_args: bytes) -> Any:
    try:
        return _PEEK.decode(raw_args).collection
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None


def _short(e: BaseException) -> str:
    return "nested too deep" if isinstance(e, RecursionError) else (str(e)[:120] or type(e).__name__)


def _short_repr(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


# -- PROTOCOL.md's argument tables ---------------------------------------------------


def _type_name(t: msgspec.inspect.Type) -> str:
    I = msgspec.inspect  # noqa: E741
    if isinstance(t, I.Metadata):
        return _type_name(t.type)
    if isinstance(t, I.UnionType):
        parts = [_type_name(x) for x in t.types if not isinstance(x, I.NoneType)]
        if "number" in parts:  # an int is a number
            parts = [x for x in parts if x != "int"]
        return " or ".join(dict.fromkeys(parts))
    if isinstance(t, I.IntType):
        return "int" + (f" {t.ge:,}–{t.le:,}" if t.ge is not None and t.le is not None and t.le < 2**62 else "")
    if isinstance(t, I.FloatType):
        return "number" + (f" > {t.gt:g}" if t.gt is not None else "") + (f", ≤ {t.le:,.0f}" if t.le is not None else "")
    if isinstance(t, I.StrType):
        return "string" + (f" ≤ {t.max_length:,} chars" if t.max_length else "")
    if isinstance(t, I.BoolType):
        return "bool"
    if isinstance(t, I.LiteralType):
        return " / ".join(f"`{v}`" for v in t.values)
    if isinstance(t, I.ListType):
        n = f" ({t.min_length or 0:,}–{t.max_length:,})" if t.max_length else ""
        return f"list{n} of {_type_name(t.item_type)}"
    if isinstance(t, I.DictType):
        n = f" (≤ {t.max_length:,} keys)" if t.max_length else ""
        return f"map{n}"
    if isinstance(t, I.StructType):
        return "map {" + ", ".join(f.name + ("" if f.required else "?") for f in t.fields) + "}"
    if isinstance(t, I.AnyType):
        return "any"
    return type(t).__name__.removesuffix("Type").lower()


def args_table(op: Op) -> str:
    """The markdown table of one op's arguments, as PROTOCOL.md shows it."""
    info = msgspec.inspect.type_info(op.args)
    if not info.fields:
        return "No arguments."
    rows = ["| arg | type | default | meaning |", "| --- | --- | --- | --- |"]
    for f in info.fields:
        value = f.default_factory() if f.default is msgspec.NODEFAULT and f.default_factory is not msgspec.NODEFAULT else f.default
        default = "required" if f.required else ("none" if value is None else f"`{msgspec.json.encode(value).decode()}`")
        meaning = (f.type.extra_json_schema or {}).get("description", "") if isinstance(f.type, msgspec.inspect.Metadata) else ""
        rows.append(f"| `{f.name}` | {_type_name(f.type)} | {default} | {meaning} |")
    return "\n".join(rows)


def op_table() -> str:
    """The table of every op: executor and permission."""
    rows = ["| op | runs on | permission | result | what it does |", "| --- | --- | --- | --- | --- |"]
    for op in OPS.values():
        rows.append(f"| `{op.name}` | {op.executor} | {f'`{op.permission}`' if op.permission else 'none'} | {op.result} "
                    f"| {op.summary} |")
    return "\n".join(rows)


def error_table() -> str:
    """The table of every error code of the registry (protocol.ERRORS): what it means, whether a retry can help."""
    rows = ["| code | meaning | retry | HTTP |", "| --- | --- | --- | --- |"]
    for e in P.ERRORS.values():
        rows.append(f"| `{e.code}` | {e.meaning} | {e.retry} | {e.http} |")
    return "\n".join(rows)


def render_tables() -> dict[str, str]:
    """Marker name → generated markdown, for the blocks PROTOCOL.md holds between ``<!-- gen:NAME -->`` markers."""
    return {"ops": op_table(), "errors": error_table(),
            **{f"args:{name}": args_table(op) for name, op in OPS.items()}}


def update_protocol_md(text: str) -> str:
    """PROTOCOL.md with every generated block replaced by its current rendering."""
    tables = render_tables()

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in tables:
            raise KeyError(f"PROTOCOL.md names an unknown generated block {name!r}")
        return f"<!-- gen:{name} -->\n{tables[name]}\n<!-- /gen -->"

    return re.sub(r"<!-- gen:([\w.:]+) -->\n.*?<!-- /gen -->", sub, text, flags=re.S)


if __name__ == "__main__":  # python -m pocketembed.ipc.ops [PROTOCOL.md]: regenerate its tables in place
    from pathlib import Path

    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("PROTOCOL.md"))
    path.write_text(update_protocol_md(path.read_text()))
    print(f"updated the generated tables in {path}")
