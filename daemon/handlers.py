"""One handler per op of the table (ipc/ops.py), by the name ``Op.handler``.

A handler gets the op's decoded, validated arguments, runs on the executor the
table names (dispatch.py puts it there, after the permission check) and
returns the reply's ``result``, or a future of it (work that continues on the
scheduler or another executor). It raises the project's errors for a refusal;
the transport turns them into error replies. Nothing here knows about sockets,
tokens or threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np
import psutil

from pocketembed import __version__
from pocketembed.errors import UnknownJob
from pocketembed.gguf_models import manifest
from pocketembed.gguf_models.catalog import DEFAULT_MODEL, all_specs
from pocketembed.ipc import ops
from pocketembed.ipc import protocol as P

from . import store
from .embedding import Embedded, Embedder
from .engine import scale_scores
from .executors import Executor, StorageError, then
from .index import IndexService
from .jobs import JobQueue, JobRunner, JobSpec, SourceTable, check_source_allowed
from .metrics import Metrics
from .models import ModelRegistry, parse_keep_alive
from .power import PowerMonitor
from .scheduler import INTERACTIVE, Scheduler
from .settings import ServeConfig


class Storage:
    """The daemon's index store, or why it is unavailable (a corrupt or unreadable index.db keeps embedding up)."""

    def __init__(self, index: IndexService | None, jobs: JobQueue | None, runner: JobRunner | None,
                 main: store.Store | None, error: str | None) -> None:
        self.index, self.jobs, self.runner, self.main, self.error = index, jobs, runner, main, error

    def require(self) -> Storage:
        if self.error is not None:
            raise StorageError(f"the index store is unavailable: {self.error}")
        return self


class Handlers:
    """The ops' handlers, with the daemon's parts they need handed in (wiring: server.py)."""

    def __init__(self, config: ServeConfig, models: ModelRegistry, scheduler: Scheduler, embedder: Embedder,
                 power: PowerMonitor, metrics: Metrics, storage: Storage, executors: dict[str, Executor],
                 transport_stats: Callable[[], dict[str, Any]]) -> None:
        self.config = config
        self.models = models
        self.scheduler = scheduler
        self.embedder = embedder
        self.power = power
        self.metrics = metrics
        self.storage = storage
        self.executors = executors
        self.transport_stats = transport_stats
        self._source: tuple[store.Store, JobQueue] | None = None
        """The source thread's own store and job queue (made on its first job: a connection is never shared)."""

    def close(self) -> None:
        if self._source is not None:
            self._source[0].conn.close()

    def job_collection(self, job_id: int) -> str | None:
        """The collection of a job (None: no such job): what ``index:{job}`` permissions are checked against."""
        try:
            return self.storage.require().jobs.get(job_id)["collection"]
        except UnknownJob:
            return None

    def check_source(self, db: str) -> None:
        """Forbidden unless ``db`` lies under a configured job source directory (never the daemon's own)."""
        check_source_allowed(db, self.config.job_sources, self.config.home)

    # -- inline ---------------------------------------------------------------------------

    def ping(self, a: ops.NoArgs) -> dict[str, Any]:
        return {"pong": True, "version": __version__, "protocol": P.VERSION}

    def models_list(self, a: ops.NoArgs) -> list[dict[str, Any]]:
        data = manifest.load(self.config.home)
        loaded = self.models.describe()
        return [
            {"name": s.name, "kind": s.kind, "dims": s.dims, "pooling": s.pooling, "quantization": s.quantization,
             "imported": s.imported, "loaded": s.name in loaded,
             "prepared": s.name in data["models"] and manifest.model_path(self.config.home, s).exists(),
             "default": s.name == DEFAULT_MODEL, "max_tokens": self.models.max_tokens(s.name),
             "matryoshka": s.matryoshka,
             **({"file_bytes": data["models"][s.name].get("size"), "sha256": data["models"][s.name].get("sha256")}
                if s.name in data["models"] else {}),
             **({"score": s.score} if s.kind == "rerank" else {}),
             **({"memory_bytes": loaded[s.name]["bytes"], "keep_alive_s": loaded[s.name]["keep_alive_s"],
                 "expires_in_s": loaded[s.name]["expires_in_s"]} if s.name in loaded else {})}
            for s in all_specs(self.config.home).values()
        ]

    # -- scheduler ------------------------------------------------------------------------

    def embed(self, a: ops.EmbedArgs) -> Future:
        vectors = self.embedder.embed(a.texts, a.model, input_type=a.input_type, lane=a.priority or INTERACTIVE,
                                      dims=a.dims, normalize=a.normalize, truncate=a.truncate,
                                      deadline=_deadline(a.timeout_ms), keep_alive=_keep_alive(a.keep_alive),
                                      counted=True)
        model = self.models.spec(a.model, "embed").name
        return then(vectors, lambda e: {**P.encode_vectors(e.values, a.dtype), "model": model, **_usage(e)},
                    what="embed")

    def rerank(self, a: ops.RerankArgs) -> Future:
        spec = self.models.spec(a.model, "rerank")
        logits = self.embedder.rerank(a.query, a.documents, spec.name, lane=a.priority or INTERACTIVE,
                                      truncate=a.truncate, deadline=_deadline(a.timeout_ms),
                                      keep_alive=_keep_alive(a.keep_alive), counted=True)
        return then(logits, lambda e: {**rerank_result(e.values, spec.score, spec.name), **_usage(e)}, what="rerank")

    # -- control --------------------------------------------------------------------------

    def models_load(self, a: ops.ModelArgs) -> dict[str, Any]:
        name = self.models.spec(a.model).name
        newly = self.models.load(name, keep_alive=_keep_alive(a.keep_alive))
        return {"model": name, "loaded": True, "newly_loaded": newly, **self.models.describe().get(name, {})}

    def models_unload(self, a: ops.UnloadArgs) -> dict[str, Any]:
        name = self.models.spec(a.model).name
        self.models.unload(name)
        return {"model": name, "loaded": False}

    # -- index (search and write executors) -----------------------------------------------

    def search(self, a: ops.SearchArgs) -> Any:
        return self.storage.require().index.search(a)

    def collections_list(self, a: ops.NoArgs) -> list[dict[str, Any]]:
        return self.storage.require().index.collections_list(a)

    def collections_stats(self, a: ops.CollectionArgs) -> dict[str, Any]:
        return self.storage.require().index.collections_stats(a)

    def index_add(self, a: ops.IndexAddArgs) -> dict[str, Any]:
        return self.storage.require().index.index_add(a)

    def index_delete(self, a: ops.IndexDeleteArgs) -> dict[str, Any]:
        return self.storage.require().index.index_delete(a)

    def index_enqueue(self, a: ops.IndexEnqueueArgs) -> dict[str, Any]:
        return self.storage.require().index.index_enqueue(a)

    def collections_drop(self, a: ops.CollectionArgs) -> dict[str, Any]:
        return self.storage.require().index.collections_drop(a)

    # -- jobs (aux and source executors) --------------------------------------------------

    def jobs_submit(self, a: ops.JobSubmitArgs) -> dict[str, Any]:
        """Check the caller's source under a time budget, then queue the job."""
        storage = self.storage.require()
        self.check_source(a.db)
        spec = JobSpec(db=a.db, table=a.table, id_column=a.id_column, text_column=a.text_column,
                       where=a.where or None, collection=a.collection or a.table,
                       model=self.models.spec(a.model, "embed").name, truncate=a.truncate)
        source = SourceTable(spec, budget_s=self.config.source_budget_s, allow=self.check_source)
        try:
            source.check_unique()
        finally:
            source.close()
        if self._source is None:
            conn = store.connect(store.db_path(self.config.home))
            self._source = (store.Store(conn, storage.main.cache), JobQueue(conn))
        source_store, jobs = self._source
        with store.transaction(source_store.conn):
            source_store.ensure_collection(source_store.conn, spec.collection, spec.model, self.models.spec(spec.model).dims)
        job, created = jobs.submit(spec)
        storage.runner.kick()
        return {**job, "new_job": created}

    def jobs_list(self, a: ops.JobsListArgs) -> list[dict[str, Any]]:
        return self.storage.require().jobs.list(limit=a.limit)

    def jobs_status(self, a: ops.JobArgs) -> dict[str, Any]:
        jobs = self.storage.require().jobs
        return {**jobs.get(a.job), "errors": jobs.errors(a.job)}

    def jobs_pause(self, a: ops.JobArgs) -> dict[str, Any]:
        return self._control_job(a.job, "pause")

    def jobs_resume(self, a: ops.JobArgs) -> dict[str, Any]:
        return self._control_job(a.job, "resume")

    def jobs_cancel(self, a: ops.JobArgs) -> dict[str, Any]:
        return self._control_job(a.job, "cancel")

    def _control_job(self, job_id: int, action: str) -> dict[str, Any]:
        storage = self.storage.require()
        job = storage.jobs.control(job_id, action)
        storage.runner.kick()
        return job

    # -- aux ------------------------------------------------------------------------------

    def stats(self, a: ops.NoArgs) -> dict[str, Any]:
        snap = self.metrics.snapshot()
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
        snap.update(self.transport_stats())
        snap["store"] = {"ok": self.storage.error is None, "error": self.storage.error}
        if self.storage.error is None:
            index, main = self.storage.index, self.storage.main
            snap["index"] = index.stats()
            # Collections whose lexical index lacks items (texts never given to the daemon): see docs/search.md.
            snap["index"]["lexical_incomplete"] = {name: main.lexical_state(name) for name in main.collection_names()
                                                   if main.lexical_state(name) != "ready"}
            snap["executors"]["texts"] = {"queued": index.reads.queued, "alive": index.reads.alive}
            snap["jobs"] = [j for j in self.storage.jobs.list(limit=20) if j["state"] not in ("done", "failed", "cancelled")]
        return snap


def rerank_result(logits: np.ndarray, scale: str, model: str) -> dict[str, Any]:
    """A rerank reply: the scores in the model's own scale, and the raw logits."""
    return {"model": model, "scores": scale_scores(logits, scale).tolist(),
            "logits": scale_scores(logits, "raw").tolist(), "scale": scale}


def _usage(e: Embedded) -> dict[str, Any]:
    return {"tokens": e.tokens, "load_ms": round(e.load_ms, 3)}


def _keep_alive(value: Any) -> float | None:
    return None if value is None else parse_keep_alive(value)


def _deadline(timeout_ms: float | None) -> float | None:
    return time.monotonic() + timeout_ms / 1000 if timeout_ms is not None else None
