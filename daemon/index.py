"""On-demand indexing and search: the ops between the I/O thread and the store.

Two threads, so that a search never waits behind a write:

* the **search** thread resolves the collection, takes the query vector from a
  small LRU or has the scheduler embed it (interactive lane, the model's query
  prefix, batched with everyone else's texts), then runs the store's Hamming
  scan and int8 rescoring. It never blocks on the embedding: the scheduler's
  callback queues the second half.
* the **write** thread runs ``index.add`` / ``index.delete`` /
  ``collections.drop`` one at a time, in arrival order, so the last write to an
  id wins. ``index.add`` embeds only texts the store does not hold yet (same
  model, same text hash): the store doubles as the embedding cache.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pocketembed.errors import CollectionMismatch, InvalidInput, PocketEmbedError, UnknownCollection
from pocketembed.gguf_models.catalog import get

from .jobs import source_texts
from .models import ModelRegistry
from .scheduler import INTERACTIVE, EmbedTask, Scheduler
from .store import CodeCache, Item, Store, connect, text_hash, transaction

log = logging.getLogger("pocketembed.index")

Reply = Callable[[Any, Any, PocketEmbedError | None], None]
"""reply(context, result, error): hands a finished request back to the server."""
LATER = object()
"""What an op returns when a callback will answer it (a search waiting for its query vector)."""


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
    def __init__(self, db_path: Path, scheduler: Scheduler, models: ModelRegistry, reply: Reply,
                 cache: CodeCache | None = None, lru_size: int = 1024) -> None:
        self.db_path = db_path
        self.scheduler = scheduler
        self.models = models
        self.reply = reply
        self.cache = cache or CodeCache()
        self.lru = EmbeddingLRU(lru_size)
        self._search_q: queue.Queue[tuple | None] = queue.Queue()
        self._write_q: queue.Queue[tuple | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self.searches = 0

    def start(self) -> None:
        for target, name in ((self._search_loop, "pe-search"), (self._write_loop, "pe-write")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Finish what is queued, then stop (the scheduler must still be running)."""
        for q, thread in zip((self._search_q, self._write_q), self._threads):
            q.put(None)
            thread.join(60)

    def submit(self, op: str, args: dict[str, Any], context: Any) -> None:
        """From the I/O thread: queue an op (already type-checked)."""
        (self._search_q if op in ("search", "collections.list") else self._write_q).put((op, args, context))

    def stats(self) -> dict[str, Any]:
        return {"searches": self.searches, "query_cache": self.lru.stats(), "codes_in_memory": self.cache.stats()}

    # -- search thread -----------------------------------------------------------------

    def _answer(self, op: str, context: Any, work: Callable[[], Any]) -> None:
        """Run one op; its result or its error is the reply (``LATER``: it answers by itself later)."""
        try:
            result = work()
        except PocketEmbedError as e:
            self.reply(context, None, e)
            return
        except Exception as e:  # a bug: answer it, keep serving
            log.exception("%s failed", op)
            self.reply(context, None, PocketEmbedError(f"internal error: {type(e).__name__}: {e}", code="internal"))
            return
        if result is not LATER:
            self.reply(context, result, None)

    def _search_loop(self) -> None:
        conn = connect(self.db_path)
        store = Store(conn, self.cache)
        while (job := self._search_q.get()) is not None:
            op, args, context = job
            if op == "collections.list":
                self._answer(op, context, store.collections)
            elif op == "search":
                self._answer(op, context, lambda: self._start_search(store, args, context))
            else:  # "search.run": the query vector is ready
                (info, vec), (ctx, request_args) = args, context
                self._answer(op, ctx, lambda: self._run_search(store, info, vec, request_args))
        conn.close()

    def _start_search(self, store: Store, args: dict[str, Any], context: Any) -> Any:
        info = store.info(args["collection"])
        model = args.get("model")
        if model is not None and get(model).name != info.model:
            raise PocketEmbedError(f"collection {info.name!r} holds {info.model} vectors; a query embedded by "
                                   f"{get(model).name} cannot search it", code="collection_mismatch")
        text = self.models.prefix(info.model, "query") + args["query"]
        key = (info.model, info.dims, text)
        vec = self.lru.get(key)
        if vec is not None:
            return self._run_search(store, info, vec, args)

        def embedded(task: EmbedTask, vecs: np.ndarray | None, err: PocketEmbedError | None) -> None:
            if err is not None:
                self.reply(context, None, err)
                return
            self.lru.put(key, vecs[0])
            self._search_q.put(("search.run", (info, vecs[0]), (context, args)))

        self.scheduler.submit(EmbedTask(texts=[text], model=info.model, on_done=embedded, lane=INTERACTIVE,
                                        dims=info.dims, truncate=True),
                              max_tokens=self.models.max_tokens(info.model))
        return LATER

    def _run_search(self, store: Store, info: Any, vec: np.ndarray, args: dict[str, Any]) -> dict[str, Any]:
        hits = store.search(info.name, vec, k=args.get("k", 10), rescore_multiplier=args.get("rescore_multiplier"),
                            filter=args.get("filter"), rescore=args.get("rescore", True),
                            with_text=bool(args.get("with_text", False)),
                            source_text=lambda origin, ids: source_texts(store.conn, origin, ids))
        self.searches += 1
        return {"collection": info.name, "model": info.model, "hits": hits}

    # -- write thread ------------------------------------------------------------------

    def _write_loop(self) -> None:
        conn = connect(self.db_path)
        store = Store(conn, self.cache)
        while (job := self._write_q.get()) is not None:
            op, args, context = job
            self._answer(op, context, lambda: self._write(store, conn, op, args))
        conn.close()

    def _write(self, store: Store, conn: Any, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op == "index.add":
            return self._add(store, conn, args)
        with transaction(conn):
            if op == "index.delete":
                return {"deleted": store.delete(conn, args["collection"], args["ids"])}
            return {"collection": args["collection"], "dropped": store.drop(conn, args["collection"])}

    def _add(self, store: Store, conn: Any, args: dict[str, Any]) -> dict[str, Any]:
        name = args["collection"]
        items = args["items"]
        try:
            info = store.info(name)
        except UnknownCollection:
            info = None
        if info is not None:
            model, dims = info.model, info.dims
            if args.get("model") is not None and get(args["model"]).name != model:
                raise CollectionMismatch(f"collection {name!r} holds {model} vectors, not {get(args['model']).name}")
            if args.get("dims") is not None and args["dims"] != dims:
                raise CollectionMismatch(f"collection {name!r} holds {dims}-dim vectors, not {args['dims']}")
        else:
            spec = get(args.get("model"))
            model, dims = spec.name, args.get("dims") or spec.dims
            if not 1 <= dims <= spec.dims:
                raise InvalidInput(f"dims must be between 1 and {spec.dims} for {model}")
        chunked = bool(args.get("chunk", False))
        hashes = [text_hash(it["text"]) + (":c" if chunked else "") for it in items]
        meta = [None if it.get("metadata") is None else json.dumps(it["metadata"], ensure_ascii=False) for it in items]
        stored = store.hashes(conn, name, [it["id"] for it in items]) if info is not None else {}
        unchanged = [k for k, it in enumerate(items) if stored.get(it["id"]) == hashes[k]]
        todo = [k for k in range(len(items)) if stored.get(items[k]["id"]) != hashes[k]]

        # Texts to embed: whole texts (reusing the store and the LRU), or the windows of chunked ones.
        texts: list[str] = []
        plan: list[tuple[int, int, int | None]] = []  # item index, chunk number, index into texts (None: reused)
        reused: dict[int, np.ndarray] = {}
        prefix = self.models.prefix(model, "document")
        if not chunked:
            known = store.known_vectors(conn, model, dims, {hashes[k] for k in todo})
            for k in todo:
                vec = known.get(hashes[k])
                if vec is None:
                    vec = self.lru.get((model, dims, prefix + items[k]["text"]))
                if vec is not None:
                    reused[k] = vec
                    plan.append((k, 0, None))
                else:
                    plan.append((k, 0, len(texts)))
                    texts.append(prefix + items[k]["text"])
        else:
            engine = self.models.acquire(model)
            try:
                for k in todo:
                    for c, window in enumerate(engine.windows(items[k]["text"]), start=1):
                        plan.append((k, c, len(texts)))
                        texts.append(prefix + window)
            finally:
                self.models.release(model)
        vecs = self._embed(texts, model, dims, args) if texts else np.zeros((0, dims), np.float32)
        if not chunked:
            for k, _, t in plan:
                if t is not None:
                    self.lru.put((model, dims, texts[t]), vecs[t])
        out = [Item(items[k]["id"], hashes[k], reused[k] if t is None else vecs[t], metadata=meta[k], chunk=c,
                    text=items[k]["text"]) for k, c, t in plan]
        with transaction(conn):
            store.ensure_collection(conn, name, model, dims, float_vectors=bool(args.get("float_vectors", False)),
                                    store_text=args.get("store_text"))
            store.put(conn, name, out)
            store.set_metadata(conn, name, [(items[k]["id"], meta[k]) for k in unchanged])
        return {"collection": name, "model": model, "added": len(todo), "unchanged": len(unchanged),
                "embedded": len(texts), "reused": len(reused), "vectors": len(out)}

    def _embed(self, texts: list[str], model: str, dims: int, args: dict[str, Any]) -> np.ndarray:
        done = threading.Event()
        result: list[Any] = [None, None]

        def finished(task: EmbedTask, vecs: np.ndarray | None, err: PocketEmbedError | None) -> None:
            result[0], result[1] = vecs, err
            done.set()

        self.scheduler.submit(EmbedTask(texts=texts, model=model, on_done=finished, lane=args.get("priority") or INTERACTIVE,
                                        dims=dims, truncate=bool(args.get("truncate", False))),
                              max_tokens=self.models.max_tokens(model))
        done.wait()
        if result[1] is not None:
            raise result[1]
        return result[0]

