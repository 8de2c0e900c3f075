"""On-demand indexing and search: the handlers of the index ops, between the op table and the store.

They run on two executors (daemon/executors.py), so that a search never waits behind a write:

* the **search** executor resolves the collection, takes the query vector from a
  small LRU or has the embedder make it (interactive lane, the model's query
  prefix, batched with everyone else's texts), then runs the store's Hamming
  scan and int8 rescoring. It never blocks on the embedding: the query's future
  continues the search on the search executor (``executors.then``). A search with
  ``rerank`` continues once more: the cross-encoder scores the top candidates'
  texts, and its future reorders them.
* the **write** executor runs ``index.add`` / ``index.delete`` / ``index.enqueue``
  / ``collections.drop`` one at a time, in arrival order, so the last write to an
  id wins. ``index.add`` embeds only texts the store does not hold yet (same
  model, same text hash): the store doubles as the embedding cache.

Each thread has its own connection to the store. Every handler returns its
result or a future of it: the op table's one way back.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pocketembed.errors import CollectionMismatch, InvalidInput, TooLarge, UnknownCollection
from pocketembed.gguf_models.catalog import ModelSpec
from pocketembed.ipc import ops

from . import fusion, lexical
from .embedding import Embedder
from .engine import scale_scores
from .executors import Executor, then
from .jobs import JobQueue
from .models import ModelRegistry
from .scheduler import INTERACTIVE
from .sources import Allow, JobSpec, SourceReads, allow_none, read_texts, source_spec
from .store import CodeCache, Item, Store, checkpoint_deleted, connect, text_hash, transaction

log = logging.getLogger("pocketembed.index")


class EmbeddingLRU:
    """Recently embedded texts → vectors, so a repeated query does not run the model."""

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._data: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> np.ndarray | None:
        with self._lock:
            vec = self._data.get(key)
            if vec is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return vec

    def put(self, key: tuple, vec: np.ndarray) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._data[key] = vec
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            total = self.hits + self.misses
            return {"entries": len(self._data), "capacity": self.capacity, "hits": self.hits, "misses": self.misses,
                    "hit_rate": round(self.hits / total, 4) if total else None}


class IndexService:
    """The index ops' handlers: ``search`` and ``collections.list`` on the search executor, the writes on the write one."""

    def __init__(self, db_path: Path, embedder: Embedder, models: ModelRegistry, search_executor: Executor,
                 cache: CodeCache | None = None, lru_size: int = 1024, *, max_collections: int = 64,
                 max_queue: int = 256, kick_jobs: Callable[[], None] | None = None,
                 allowed_source: Allow | None = None, source_budget_s: float = 5.0) -> None:
        self.db_path = db_path
        self.embedder = embedder
        self.models = models
        self.search_executor = search_executor
        """Where a search continues once its query is embedded (its thread's store connection)."""
        self.cache = cache or CodeCache()
        self.lru = EmbeddingLRU(lru_size)
        self.max_collections = max_collections
        self.kick_jobs = kick_jobs or (lambda: None)
        self.searches = 0
        self._stores: dict[int, Store] = {}
        self._queues: dict[int, JobQueue] = {}
        """The write thread's job queue (its schema checked once, not per index.enqueue)."""
        self.allowed_source = allowed_source or allow_none
        """The job_sources check, applied again at every read of a job's source (search's with_text)."""
        self.source_budget_s = source_budget_s
        self.reads = SourceReads(max_queue=max_queue)
        """Reads of job sources for with_text, off the search thread: a locked source holds no other search."""

    def close(self) -> None:
        """After the executors stopped: end the source readers, close the threads' connections."""
        self.reads.stop()
        for store in self._stores.values():
            store.conn.close()

    def stats(self) -> dict[str, Any]:
        return {"searches": self.searches, "query_cache": self.lru.stats(), "codes_in_memory": self.cache.stats()}

    def _store(self) -> Store:
        """The calling thread's own connection to the store (made on first use, on that thread)."""
        key = threading.get_ident()
        store = self._stores.get(key)
        if store is None:
            store = self._stores[key] = Store(connect(self.db_path), self.cache)
        return store

    # -- search executor ---------------------------------------------------------------

    def collections_list(self, args: ops.NoArgs) -> list[dict[str, Any]]:
        return self._store().collections()

    def collections_stats(self, args: ops.CollectionArgs) -> dict[str, Any]:
        """``collections.list``'s entry of one collection, and the items its queue holds for the runner."""
        store = self._store()
        out = store.collection(args.collection)
        queued = store.conn.execute("SELECT coalesce(SUM(queue_rows), 0) FROM jobs WHERE collection = ? AND kind = 'queue' "
                                    "AND state IN ('queued', 'running', 'waiting', 'paused')", (args.collection,)).fetchone()[0]
        return {**out, "queued": queued}

    def search(self, args: ops.SearchArgs) -> Any:
        """The k nearest items, or a future of them while the query embeds (or its candidates are reranked)."""
        store = self._store()
        if args.rerank is not None:
            self.models.spec(args.rerank, "rerank")
        info = store.info(args.collection)
        if args.model is not None and self.models.spec(args.model).name != info.model:
            raise CollectionMismatch(f"collection {info.name!r} holds {info.model} vectors; a query embedded by "
                                     f"{self.models.spec(args.model).name} cannot search it")
        if args.mode == "lexical":  # exact matches alone: no query embedding
            return self._run_search(store, info, None, args)
        key = (info.model, info.dims, "query", args.query)
        vec = self.lru.get(key)
        if vec is not None:
            return self._run_search(store, info, vec, args)
        embedded = self.embedder.embed([args.query], info.model, input_type="query", dims=info.dims, truncate=True,
                                       label=None)
        # Read while the query embeds: the continuation runs after this on this executor's thread.
        side = self._lexical_side(store, info, args) if args.mode == "hybrid" else None

        def with_vector(vecs: np.ndarray) -> Any:
            self.lru.put(key, vecs[0])
            return self._run_search(self._store(), info, vecs[0], args, side)

        return then(embedded, with_vector, on=self.search_executor, what="search")

    def _run_search(self, store: Store, info: Any, vec: np.ndarray | None, args: ops.SearchArgs,
                    lexical_side: tuple[Any, ...] | None = None) -> Any:
        top = (args.rerank_top or max(args.k, 20)) if args.rerank else args.k  # the schema keeps rerank_top >= k
        wanted: dict[str, list[Any]] = {}

        def later(origin: str, ids: list[Any]) -> dict[Any, str]:
            wanted.setdefault(origin, []).extend(ids)  # texts kept in a job's source: read below, off this thread
            return {}

        with_text = args.with_text or bool(args.rerank)
        if args.mode == "vector":
            hits = store.search(info.name, vec, k=top, rescore_multiplier=args.rescore_multiplier,
                                filter=args.filter, rescore=args.rescore, with_text=with_text, source_text=later)
            for hit in hits:
                hit["matched"] = ["vector"]
        else:
            side = lexical_side or self._lexical_side(store, info, args)
            hits = self._lexical_search(store, info, vec, args, top, with_text, later, side)
        self.searches += 1
        result = {"collection": info.name, "model": info.model, "hits": hits}
        if args.mode != "vector":
            state = store.lexical_state(info.name)
            if state != "ready":  # items whose texts the daemon never had (see docs/search.md)
                result["lexical"] = state
                result.setdefault("notes", []).append(
                    f"the lexical index holds {'none' if state == 'missing' else 'only some'} of this collection's items: "
                    "re-send their texts (index.add or index.enqueue) to make them found by their words")
        if wanted:
            specs = {origin: source_spec(store.conn, origin) for origin in wanted}  # this thread's connection
            return self.reads.submit(lambda: self._read_texts(result, specs, wanted, info, args))
        return self._finish_search(result, info, args)

    def _lexical_side(self, store: Store, info: Any, args: ops.SearchArgs) -> tuple[Any, ...]:
        """The lexical candidates of a ``lexical`` or ``hybrid`` search (store.lexical_candidates), and its parsed query."""
        query = lexical.parse_query(args.query)
        top = (args.rerank_top or max(args.k, 20)) if args.rerank else args.k
        allowed = store.matching_rows(info.name, args.filter) if args.filter else None
        hybrid = args.mode == "hybrid"
        n = max(top, fusion.LEXICAL_CANDIDATES) if hybrid else top
        return (query, *store.lexical_candidates(info.name, query, n, allowed, vectors=hybrid))

    def _lexical_search(self, store: Store, info: Any, vec: np.ndarray | None, args: ops.SearchArgs, top: int,
                        with_text: bool, later: Any, side: tuple[Any, ...]) -> list[dict[str, Any]]:
        """``lexical`` and ``hybrid`` search's hits (daemon/fusion.py): each with ``matched``."""
        query, found, vectors, idfs = side
        if vec is None:
            hits = store.rows_to_hits(info.name, [c[0] for c in found], [c[2] for c in found], with_text, later)
            for hit in hits:
                hit["matched"] = ["lexical"]
            return hits
        near = store.search(info.name, vec, k=max(top, fusion.VECTOR_CANDIDATES), filter=args.filter,
                            rescore_multiplier=args.rescore_multiplier, rescore=args.rescore)
        cosines = dict(zip([c[1] for c in found], (vectors @ vec).tolist())) if vectors is not None else {}
        fused = fusion.fuse({h["id"]: h["score"] for h in near}, {c[1]: c[3] for c in found}, cosines, idfs,
                            fusion.query_weight(query), top)
        row_of = {c[1]: c[0] for c in found}
        by_id = {h["id"]: h for h in near}
        # The winners' hits (metadata, text) read once: the vector side's by its search, the rest by row.
        rows = [row_of[f.id] for f in fused if f.id in row_of]
        vector_only = [f.id for f in fused if f.id not in row_of]
        got = {h["id"]: h for h in store.rows_to_hits(info.name, rows, None, with_text, later)}
        if vector_only and with_text:
            texts = store.search_texts(info.name, vector_only, later)
            for i in vector_only:
                by_id[i]["text"] = texts.get(i)
        hits = []
        for f in fused:
            hit = got.get(f.id) or by_id.get(f.id)
            if hit is not None:
                hits.append({**hit, "score": round(f.score, 6), "matched": list(f.matched)})
        return hits

    def _read_texts(self, result: dict[str, Any], specs: dict[str, JobSpec | None], wanted: dict[str, list[Any]],
                    info: Any, args: ops.SearchArgs) -> Any:
        """On a source-read thread: the hits' texts from their job sources (each read checked and bounded), then
        the rest of the search.

        A source that cannot be read now (locked past the budget, gone, swapped, no
        longer under job_sources) leaves its hits' ``text`` nil and says why in ``notes``.
        """
        missing = {h["id"]: h for h in result["hits"] if h.get("text") is None}
        notes = []
        for origin, ids in wanted.items():
            spec = specs[origin]
            if spec is None:
                continue  # its job is gone from the jobs table: no source known
            texts, note = read_texts(spec, ids, allow=self.allowed_source, budget_s=self.source_budget_s)
            for row_id, text in texts.items():
                if row_id in missing:
                    missing[row_id]["text"] = text
            if note:
                notes.append(note)
        if notes:
            result["notes"] = notes
        return self._finish_search(result, info, args)

    def _finish_search(self, result: dict[str, Any], info: Any, args: ops.SearchArgs) -> Any:
        """The search's result, or a future of it while a reranker scores its candidates."""
        hits = result["hits"]
        if not args.rerank or not hits:
            return result
        missing = sum(1 for h in hits if not h.get("text"))
        if missing:
            raise InvalidInput(f"rerank needs the candidates' texts, and {missing} of {len(hits)} have none: collection "
                               f"{info.name!r} keeps no texts (create it with store_text) and no source row has them")
        reranker = self.models.spec(args.rerank)
        scored = self.embedder.rerank(args.query, [h["text"] for h in hits], reranker.name, truncate=True)
        return then(scored, lambda logits: reranked(result, logits, reranker, args), what="search (rerank)")

    # -- write executor ----------------------------------------------------------------

    def index_add(self, args: ops.IndexAddArgs) -> dict[str, Any]:
        store = self._store()
        return self._add(store, store.conn, args)

    def index_enqueue(self, args: ops.IndexEnqueueArgs) -> dict[str, Any]:
        return self._enqueue(self._store(), args)

    def index_delete(self, args: ops.IndexDeleteArgs) -> dict[str, Any]:
        store = self._store()
        with transaction(store.conn):
            deleted = store.delete(store.conn, args.collection, args.ids)
        if deleted:
            checkpoint_deleted(store.conn)  # before the reply: deleted means gone, from the WAL too
        return {"deleted": deleted}

    def collections_drop(self, args: ops.CollectionArgs) -> dict[str, Any]:
        store = self._store()
        with transaction(store.conn):  # the collection and its queue go together
            dropped = store.drop(store.conn, args.collection)
            ended = self._job_queue(store).drop_collection(store.conn, args.collection)
        checkpoint_deleted(store.conn)
        if ended:
            self.kick_jobs()  # a runner waiting on one of them lets it go now
        return {"collection": args.collection, "dropped": dropped}

    def _job_queue(self, store: Store) -> JobQueue:
        """This thread's job queue, on its connection (its schema checked once, not per op)."""
        key = threading.get_ident()
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = JobQueue(store.conn)
        return queue

    def _target(self, store: Store, name: str, model_name: str | None, dims_asked: int | None) -> tuple[Any, str, int]:
        """The collection's info (None if new), model and dims; a mismatch or a new collection over the limit fails."""
        try:
            info = store.info(name)
        except UnknownCollection:
            info = None
        if info is not None:
            if model_name is not None and self.models.spec(model_name).name != info.model:
                raise CollectionMismatch(f"collection {name!r} holds {info.model} vectors, not {self.models.spec(model_name).name}")
            if dims_asked is not None and dims_asked != info.dims:
                raise CollectionMismatch(f"collection {name!r} holds {info.dims}-dim vectors, not {dims_asked}")
            return info, info.model, info.dims
        spec = self.models.spec(model_name, "embed")
        dims = dims_asked or spec.dims
        if not 1 <= dims <= spec.dims:
            raise InvalidInput(f"dims must be between 1 and {spec.dims} for {spec.name}")
        if store.count_collections() >= self.max_collections:
            raise TooLarge(f"the daemon holds {self.max_collections} collections, its limit (max_collections); "
                           "drop one or raise the limit")
        return None, spec.name, dims

    def _enqueue(self, store: Store, args: ops.IndexEnqueueArgs) -> dict[str, Any]:
        """Commit the items to the collection's queue job and return it; the runner embeds them later."""
        _, model, dims = self._target(store, args.collection, args.model, args.dims)
        with transaction(store.conn):
            store.ensure_collection(store.conn, args.collection, model, dims, store_text=args.store_text)
        items = [(it.id, it.text, None if it.metadata is None else json.dumps(it.metadata, ensure_ascii=False))
                 for it in args.items]
        job, created = self._job_queue(store).enqueue(args.collection, model, args.truncate, items, list(args.delete))
        self.kick_jobs()
        return {**job, "new_job": created, "enqueued": len(items), "deletions": len(args.delete)}

    def _add(self, store: Store, conn: Any, args: ops.IndexAddArgs) -> dict[str, Any]:
        name = args.collection
        items = args.items
        info, model, dims = self._target(store, name, args.model, args.dims)
        chunked = args.chunk
        hashes = [text_hash(it.text) + (":c" if chunked else "") for it in items]
        meta = [None if it.metadata is None else json.dumps(it.metadata, ensure_ascii=False) for it in items]
        stored = store.hashes(conn, name, [it.id for it in items]) if info is not None else {}
        unchanged = [k for k, it in enumerate(items) if stored.get(it.id) == hashes[k]]
        todo = [k for k in range(len(items)) if stored.get(items[k].id) != hashes[k]]

        # Texts to embed: whole texts (reusing the store and the LRU), or the windows of chunked ones.
        texts: list[str] = []
        plan: list[tuple[int, int, int | None]] = []  # item index, chunk number, index into texts (None: reused)
        reused: dict[int, np.ndarray] = {}
        if not chunked:
            known = store.known_vectors(conn, model, dims, {hashes[k] for k in todo})
            for k in todo:
                vec = known.get(hashes[k])
                if vec is None:
                    vec = self.lru.get((model, dims, "document", items[k].text))
                if vec is not None:
                    reused[k] = vec
                    plan.append((k, 0, None))
                else:
                    plan.append((k, 0, len(texts)))
                    texts.append(items[k].text)
        else:
            engine = self.models.acquire(model)
            try:
                for k in todo:
                    for c, window in enumerate(engine.windows(items[k].text), start=1):
                        plan.append((k, c, len(texts)))
                        texts.append(window)
            finally:
                self.models.release(model)
        vecs = self._embed(texts, model, dims, args) if texts else np.zeros((0, dims), np.float32)
        if not chunked:
            for k, _, t in plan:
                if t is not None:
                    self.lru.put((model, dims, "document", texts[t]), vecs[t])
        out = [Item(items[k].id, hashes[k], reused[k] if t is None else vecs[t], metadata=meta[k], chunk=c,
                    text=items[k].text, lexical_text=items[k].text) for k, c, t in plan]
        # The model's int8 ranges, for a collection's first calibration: measured now if new, not inside the transaction.
        ranges = self.embedder.ranges(model, dims) if info is None or info.calibration is None else None
        with transaction(conn):
            store.ensure_collection(conn, name, model, dims, float_vectors=args.float_vectors, store_text=args.store_text)
            store.put(conn, name, out, ranges)
            store.set_metadata(conn, name, [(items[k].id, meta[k]) for k in unchanged])
            store.index_texts(conn, name, [(items[k].id, items[k].text) for k in unchanged])  # re-sent: fills a gap
        return {"collection": name, "model": model, "added": len(todo), "unchanged": len(unchanged),
                "embedded": len(texts), "reused": len(reused), "vectors": len(out)}

    def _embed(self, texts: list[str], model: str, dims: int, args: ops.IndexAddArgs) -> np.ndarray:
        return self.embedder.embed_wait(texts, model, input_type="document", lane=args.priority or INTERACTIVE,
                                        dims=dims, truncate=args.truncate)


def reranked(result: dict[str, Any], logits: np.ndarray, reranker: ModelSpec, args: ops.SearchArgs) -> dict[str, Any]:
    """The search result reordered by the cross-encoder: its k best, each with ``rerank_score``."""
    raw = scale_scores(logits, "raw")
    scores = scale_scores(logits, reranker.score)
    order = np.argsort(-raw, kind="stable")[: args.k]
    hits = []
    for i in order:
        hit = dict(result["hits"][int(i)], rerank_score=float(scores[i]))
        if not args.with_text:
            hit.pop("text", None)
        hits.append(hit)
    return {**result, "hits": hits, "reranked_by": reranker.name}
