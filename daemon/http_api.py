"""The HTTP endpoints: the request shapes OpenAI, Ollama and TEI clients send, each mapped onto one op.

An endpoint is a row of ``ENDPOINTS``: method and path, the op of the table it
runs (so its permission, executor and handler are the op's: HTTP is a second
transport, not a second implementation), the error convention of its family, the
schema of its JSON body, and two pure functions: the body → the op's arguments
(then validated by the op's own Struct, exactly as on ZeroMQ) and the op's
result → the reply. The body is decoded straight into its Struct by msgspec, so
its types, and how deep it may nest, are checked in that one step.

Choices a client meets (docs/http.md says them too):

* token-id input (``input: [[101, 2023, ...]]``) is refused: the ids a client
  sends are another tokenizer's (OpenAI's tiktoken; LangChain's
  ``OpenAIEmbeddings`` sends them unless ``check_embedding_ctx_length=False``),
  and decoding them with this model's vocabulary would embed nonsense silently;
* ``dimensions`` other than the model's own is refused for a model the catalog
  knows was not trained for Matryoshka truncation (all-MiniLM-L6-v2), and passed
  to the op's ``dims`` otherwise;
* usage counts are the model's real tokens, special tokens included.

Nothing here knows about sockets or tokens (http_server.py).
"""

from __future__ import annotations

import base64
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import msgspec
import numpy as np
from msgspec import Meta, Struct

from pocketembed.errors import PocketEmbedError, UnknownModel
from pocketembed.gguf_models.catalog import ModelSpec
from pocketembed.ipc import ops
from pocketembed.ipc import protocol as P

MAX_BODY_BYTES = P.MAX_FRAME_BYTES
"""A request body over this is answered 413 before a byte of it is parsed (the ZeroMQ frame limit)."""

Texts = Annotated[list[str], Meta(max_length=P.MAX_TEXTS)]
TokenIds = Annotated[list[int], Meta(max_length=65_536)]
Dimensions = Annotated[int, Meta(ge=1, le=65_536)]
KeepAlive = Union[int, float, Annotated[str, Meta(max_length=32)]]
InputType = Literal["query", "document"]
Scalar = Union[str, int, float, bool, None]


# -- request bodies -------------------------------------------------------------------


class OpenAIEmbeddingsBody(Struct):
    """``POST /v1/embeddings``, as the openai SDK, LangChain, LlamaIndex and LiteLLM send it."""

    input: Union[str, Annotated[list[Union[str, int, TokenIds]], Meta(max_length=P.MAX_TEXTS)]]
    model: Annotated[str, Meta(max_length=128)] | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Dimensions | None = None
    user: Annotated[str, Meta(max_length=256)] | None = None
    input_type: InputType | None = None
    """Not OpenAI's: the model's query or document prefix, as ``embed``'s ``input_type``."""


class OllamaEmbedBody(Struct):
    """``POST /api/embed``, as Ollama's clients (ollama-python, langchain-ollama) send it."""

    model: Annotated[str, Meta(max_length=128)]
    input: Union[str, Texts]
    truncate: bool = True
    keep_alive: KeepAlive | None = None
    dimensions: Dimensions | None = None
    options: Annotated[dict[str, Scalar], Meta(max_length=64)] | None = None
    """Ollama's model options (num_thread, ...): accepted and ignored, as the daemon sets its own."""
    input_type: InputType | None = None


class TeiEmbedBody(Struct):
    """``POST /embed``, text-embeddings-inference's shape."""

    inputs: Union[str, Texts]
    normalize: bool = True
    truncate: bool = False
    dimensions: Dimensions | None = None
    prompt_name: Literal["query", "document", "passage"] | None = None
    model: Annotated[str, Meta(max_length=128)] | None = None
    """Not TEI's (a TEI server has one model): default, the daemon's default model."""


class RerankDocument(Struct):
    text: str


class RerankBody(Struct):
    """``POST /v1/rerank``: Jina's and llama-server's shape."""

    query: str
    documents: Annotated[list[Union[str, RerankDocument]], Meta(max_length=ops.MAX_RERANK_DOCS)]
    model: Annotated[str, Meta(max_length=128)] | None = None
    top_n: Annotated[int, Meta(ge=1, le=ops.MAX_RERANK_DOCS)] | None = None
    return_documents: bool = False


class TeiRerankBody(Struct):
    """``POST /rerank``: text-embeddings-inference's shape."""

    query: str
    texts: Annotated[list[str], Meta(max_length=ops.MAX_RERANK_DOCS)]
    raw_scores: bool = False
    return_text: bool = False
    truncate: bool = True
    model: Annotated[str, Meta(max_length=128)] | None = None


class SearchBody(ops.SearchArgs):
    """``POST /v1/search``: the ``search`` op's arguments as JSON, with the hits' texts by default."""

    with_text: bool = True


# -- the context a translation may read -----------------------------------------------


@dataclass
class Context:
    """What an endpoint's translation may know besides its body."""

    spec: Callable[[str | None, str | None], ModelSpec]
    """A model name (None: the default) and kind → its spec (UnknownModel, WrongModelKind)."""
    reranker: Callable[[], str]
    """The reranker a request that names none gets (UnknownModel when there is none)."""
    received: float
    """time.perf_counter() when the request had been read."""


# -- translations ---------------------------------------------------------------------


def _invalid(message: str) -> P.ProtocolError:
    return P.ProtocolError(P.INVALID_ARGS, message)


def _texts(value: str | list[Any], name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if any(not isinstance(v, str) for v in value):
        raise _invalid(f"{name}: token ids are not accepted, send the texts themselves (ids made by another "
                       "tokenizer would embed the wrong words; LangChain's OpenAIEmbeddings sends them unless "
                       "check_embedding_ctx_length=False)")
    return value


def _dims(spec: ModelSpec, dimensions: int | None) -> int | None:
    if dimensions is None or dimensions == spec.dims:
        return None
    if spec.matryoshka is False:
        raise _invalid(f"dimensions: {spec.name} was not trained for Matryoshka truncation, so its first "
                       f"{dimensions} dimensions are not an embedding; ask for {spec.dims} or leave it out")
    return dimensions


def _embed_args(ctx: Context, model: str | None, texts: list[str], dimensions: int | None, **kw: Any) -> dict[str, Any]:
    spec = ctx.spec(model, "embed")
    return {"texts": texts, "model": spec.name, "dims": _dims(spec, dimensions),
            **{k: v for k, v in kw.items() if v is not None}}


def openai_embed_args(b: OpenAIEmbeddingsBody, ctx: Context) -> dict[str, Any]:
    return _embed_args(ctx, b.model, _texts(b.input, "input"), b.dimensions, input_type=b.input_type)


def ollama_embed_args(b: OllamaEmbedBody, ctx: Context) -> dict[str, Any]:
    return _embed_args(ctx, b.model, _texts(b.input, "input"), b.dimensions, truncate=b.truncate,
                       keep_alive=b.keep_alive, input_type=b.input_type)


def tei_embed_args(b: TeiEmbedBody, ctx: Context) -> dict[str, Any]:
    input_type = {"passage": "document"}.get(b.prompt_name or "", b.prompt_name)
    return _embed_args(ctx, b.model, _texts(b.inputs, "inputs"), b.dimensions, truncate=b.truncate,
                       normalize=b.normalize, input_type=input_type)


def rerank_args(b: RerankBody, ctx: Context) -> dict[str, Any]:
    docs = [d if isinstance(d, str) else d.text for d in b.documents]
    return {"query": b.query, "documents": docs, "model": b.model or ctx.reranker()}


def tei_rerank_args(b: TeiRerankBody, ctx: Context) -> dict[str, Any]:
    return {"query": b.query, "documents": b.texts, "model": b.model or ctx.reranker(), "truncate": b.truncate}


def search_args(b: SearchBody, ctx: Context) -> dict[str, Any]:
    return msgspec.structs.asdict(b)


def no_args(b: None, ctx: Context) -> dict[str, Any]:
    return {}


# -- replies --------------------------------------------------------------------------


def _matrix(result: dict[str, Any]) -> np.ndarray:
    return P.decode_vectors(result)


def _nanos(ms: float) -> int:
    return int(ms * 1_000_000)


def openai_embed_reply(result: dict[str, Any], b: OpenAIEmbeddingsBody, ctx: Context) -> Any:
    vectors = _matrix(result)
    if b.encoding_format == "base64":  # little-endian float32, as the openai SDK decodes it with numpy
        rows: list[Any] = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    else:
        rows = vectors.tolist()
    return {"object": "list", "model": result["model"],
            "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
            "usage": {"prompt_tokens": result["tokens"], "total_tokens": result["tokens"]}}


def ollama_embed_reply(result: dict[str, Any], b: OllamaEmbedBody, ctx: Context) -> Any:
    return {"model": result["model"], "embeddings": _matrix(result).tolist(),
            "total_duration": _nanos((time.perf_counter() - ctx.received) * 1000),
            "load_duration": _nanos(result["load_ms"]), "prompt_eval_count": result["tokens"]}


def tei_embed_reply(result: dict[str, Any], b: TeiEmbedBody, ctx: Context) -> Any:
    return _matrix(result).tolist()


def _ranked(scores: list[float], top: int | None) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return order[:top] if top else order


def rerank_reply(result: dict[str, Any], b: RerankBody, ctx: Context) -> Any:
    scores = result["scores"]
    docs = [d if isinstance(d, str) else d.text for d in b.documents]
    return {"object": "list", "model": result["model"],
            "results": [{"index": i, "relevance_score": scores[i],
                         **({"document": {"text": docs[i]}} if b.return_documents else {})}
                        for i in _ranked(scores, b.top_n)],
            "usage": {"prompt_tokens": result["tokens"], "total_tokens": result["tokens"]}}


def tei_rerank_reply(result: dict[str, Any], b: TeiRerankBody, ctx: Context) -> Any:
    if b.raw_scores:
        scores = result["logits"]
    elif result["scale"] == "sigmoid":
        scores = result["scores"]
    else:  # TEI's scores are the sigmoid of the logits
        scores = [1 / (1 + math.exp(-x)) if x > -700 else 0.0 for x in result["logits"]]
    return [{"index": i, "score": scores[i], **({"text": b.texts[i]} if b.return_text else {})}
            for i in _ranked(scores, None)]


def search_reply(result: Any, b: SearchBody, ctx: Context) -> Any:
    return result


def openai_models_reply(result: list[dict[str, Any]], b: None, ctx: Context) -> Any:
    return {"object": "list", "data": [
        {"id": m["name"], "object": "model", "created": 0, "owned_by": "pocketembed", "kind": m["kind"],
         "dims": m["dims"], "max_tokens": m["max_tokens"], "loaded": m["loaded"]}
        for m in result if m["prepared"]]}


def ollama_tags_reply(result: list[dict[str, Any]], b: None, ctx: Context) -> Any:
    return {"models": [
        {"name": m["name"], "model": m["name"], "size": m.get("file_bytes") or 0, "digest": m.get("sha256") or "",
         "details": {"format": "gguf", "family": m["name"].partition(":")[0], "families": [m["name"].partition(":")[0]],
                     "parameter_size": "", "quantization_level": m["quantization"].upper()}}
        for m in result if m["prepared"]]}


# -- errors ---------------------------------------------------------------------------

_OPENAI_TYPES = {"request": "invalid_request_error", "model": "invalid_request_error", "busy": "rate_limit_error",
                 "timeout": "timeout_error", "storage": "server_error", "unavailable": "server_error",
                 "access": "authentication_error", "internal": "server_error"}


def error_reply(family: str, code: str, message: str) -> tuple[int, Any]:
    """The HTTP status and JSON body of an error in the convention of the endpoint's family.

    The daemon's stable code is always inside: OpenAI's ``error.code``, Ollama's
    ``code`` beside its ``error`` string, TEI's ``error_type``.
    """
    entry = P.ERRORS.get(code) or P.ERRORS[P.INTERNAL]
    if family == "ollama":
        body: Any = {"error": message, "code": entry.code}
    elif family == "tei":
        body = {"error": message, "error_type": entry.code}
    else:
        kind = "permission_error" if entry.code == P.FORBIDDEN else _OPENAI_TYPES[entry.kind]
        body = {"error": {"message": message, "type": kind, "code": entry.code, "param": None}}
    return entry.http, body


# -- the table ------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    op: str
    """The op of ``ops.OPS`` it runs; empty for ``/health``, which the transport answers itself."""
    family: Literal["openai", "ollama", "tei"]
    body: type[Struct] | None
    args: Callable[[Any, Context], dict[str, Any]]
    reply: Callable[[Any, Any, Context], Any]
    summary: str

    def __post_init__(self) -> None:
        if self.op and self.op not in ops.OPS:
            raise ValueError(f"endpoint {self.path}: unknown op {self.op!r}")

    @property
    def decoder(self) -> msgspec.json.Decoder | None:
        return _DECODERS.get(self.body)


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("GET", "/health", "", "openai", None, no_args, search_reply,
             "200 once the start-up models are loaded, 503 before; no token needed"),
    Endpoint("GET", "/v1/models", "models.list", "openai", None, no_args, openai_models_reply,
             "OpenAI's model list: the prepared models"),
    Endpoint("POST", "/v1/embeddings", "embed", "openai", OpenAIEmbeddingsBody, openai_embed_args, openai_embed_reply,
             "OpenAI's embeddings: `input` a string or a list of them, `encoding_format` float or base64, "
             "`dimensions`, usage in the model's tokens"),
    Endpoint("POST", "/api/embed", "embed", "ollama", OllamaEmbedBody, ollama_embed_args, ollama_embed_reply,
             "Ollama's embed: `truncate`, `keep_alive`, `dimensions`, durations in ns and `prompt_eval_count`"),
    Endpoint("GET", "/api/tags", "models.list", "ollama", None, no_args, ollama_tags_reply,
             "Ollama's model list: the prepared models"),
    Endpoint("POST", "/embed", "embed", "tei", TeiEmbedBody, tei_embed_args, tei_embed_reply,
             "text-embeddings-inference's embed: a list of vectors"),
    Endpoint("POST", "/v1/rerank", "rerank", "openai", RerankBody, rerank_args, rerank_reply,
             "Jina's and llama-server's rerank: `results` by relevance, `top_n`, `return_documents`"),
    Endpoint("POST", "/rerank", "rerank", "tei", TeiRerankBody, tei_rerank_args, tei_rerank_reply,
             "text-embeddings-inference's rerank: `raw_scores`, `return_text`"),
    Endpoint("POST", "/v1/search", "search", "openai", SearchBody, search_args, search_reply,
             "pocketembed's search of a collection: the `search` op's arguments as JSON, hits with their texts"),
)

_DECODERS = {e.body: msgspec.json.Decoder(e.body) for e in ENDPOINTS if e.body is not None}
ROUTES: dict[str, dict[str, Endpoint]] = {}
for _e in ENDPOINTS:
    ROUTES.setdefault(_e.path, {})[_e.method] = _e
del _e


def decode_body(endpoint: Endpoint, body: bytes) -> Any:
    """The body in its endpoint's Struct; ProtocolError (``invalid_input``, ``too_large``) otherwise."""
    if endpoint.decoder is None:
        return None
    try:
        return endpoint.decoder.decode(body)
    except P.ProtocolError:
        raise
    except msgspec.ValidationError as e:
        code = P.TOO_LARGE if ops._OVER_LENGTH.search(str(e)) else P.INVALID_ARGS
        raise P.ProtocolError(code, f"request body: {e}") from None
    except (msgspec.DecodeError, RecursionError) as e:
        what = "nested too deep" if isinstance(e, RecursionError) else (str(e)[:120] or "not JSON")
        raise P.ProtocolError(P.INVALID_ARGS, f"request body is not the JSON this endpoint takes ({what})") from None


class _Peek(Struct):
    collection: Any = None


_PEEK = msgspec.json.Decoder(_Peek)


def peek_collection(body: bytes) -> Any:
    """A body's ``collection``, read leniently, to check a per-collection permission before the arguments."""
    try:
        value = _PEEK.decode(body).collection
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    return value if isinstance(value, str) else None  # e.g. an int past msgpack's range: the args check refuses it


def default_reranker(models: list[dict[str, Any]]) -> str:
    """The reranker for a request that names none: the only one prepared.

    Not "the one loaded": which that is depends on the last caller, and the same
    request must not score with one model now and another after an unload.
    """
    pick = [m for m in models if m["kind"] == "rerank" and m["prepared"]]
    if len(pick) == 1:
        return pick[0]["name"]
    raise UnknownModel("this request names no reranker (`model`) and the daemon has "
                       + (f"{len(pick)}: {', '.join(m['name'] for m in pick)}" if pick else
                          "none: import a cross-encoder with `pocketembed models import`"))


# -- OpenAPI --------------------------------------------------------------------------


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the endpoints (docs/openapi.json), their bodies' schemas from msgspec."""
    bodies = [e.body for e in ENDPOINTS if e.body is not None]
    schemas, components = msgspec.json.schema_components(bodies, ref_template="#/components/schemas/{name}")
    refs = dict(zip(bodies, schemas))
    paths: dict[str, Any] = {}
    for e in ENDPOINTS:
        op = ops.OPS.get(e.op)
        permission = op.permission if op is not None else None
        entry: dict[str, Any] = {
            "summary": e.summary,
            "description": (f"Runs the `{e.op}` op (ipc/PROTOCOL.md). " if e.op else "")
                           + (f"Needs a client token allowing `{permission}` (`Authorization: Bearer TOKEN`)."
                              if permission else "No token needed."),
            "responses": {"200": {"description": "the reply in the family's shape"},
                          "default": {"description": f"an error in {e.family}'s convention, with the daemon's code"}},
        }
        if permission:
            entry["security"] = [{"bearer": []}]
        if e.body is not None:
            entry["requestBody"] = {"required": True, "content": {"application/json": {"schema": refs[e.body]}}}
        paths.setdefault(e.path, {})[e.method.lower()] = entry
    from pocketembed import __version__

    return {"openapi": "3.1.0",
            "info": {"title": "pocketembed HTTP endpoints", "version": __version__,
                     "description": "OpenAI-, Ollama- and TEI-compatible embedding and rerank endpoints, and search, "
                                    "over the daemon's op table (docs/http.md)."},
            "paths": paths,
            "components": {"schemas": components,
                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                          "description": "a token from `pocketembed clients add`"}}}}


def render_openapi() -> str:
    return msgspec.json.format(msgspec.json.encode(openapi()), indent=2).decode() + "\n"


if __name__ == "__main__":  # python -m pocketembed.daemon.http_api [docs/openapi.json]
    import sys
    from pathlib import Path

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/openapi.json")
    out.write_text(render_openapi())
    print(f"wrote {out}")


__all__ = ["ENDPOINTS", "ROUTES", "Context", "Endpoint", "decode_body", "error_reply", "openapi"]
