"""Persistent background re-indexing of a caller's SQLite table.

A job says "embed every row of table T in database D into collection C". It
lives in the ``jobs`` table of the daemon's index database, next to the store,
and one runner thread works through the jobs in order:

* it reads the source in keyset chunks (``id > cursor ORDER BY id``) on a
  read-only connection, one short read transaction per chunk, so the app that
  owns the database keeps writing;
* it embeds each chunk in the scheduler's background lane, and only while the
  power monitor allows it;
* it writes the chunk's vectors, marks the rows seen and advances the cursor
  and counters in **one** transaction: a kill -9 at any moment resumes from the
  last commit with no row missing and none done twice;
* a re-run skips rows whose text hash is unchanged, and when the scan is over
  deletes the collection's rows (of this source) that it did not see.

Rows with NULL or empty text are skipped (counted, not failed); a row that
cannot be embedded is recorded in ``job_errors`` and the job goes on.

A **queue** job is the same for data the daemon cannot open: an app hands its
rows over with ``index.enqueue``, which commits them to ``queue_items`` and
returns at once; the runner embeds them in the background lane while the
policy allows, and each chunk's vectors, deletions and the removal of its
queue rows are one transaction, so every item is applied exactly once across
kill -9. One active queue job per collection collects what is enqueued.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


import numpy as np

from pocketembed.clients import Forbidden
from pocketembed.errors import Busy, PocketEmbedError, ShuttingDown, SourceError, TooLarge, UnknownJob

from .power import PowerMonitor
from .embedding import Embedder
from .scheduler import BACKGROUND
from .sources import MAX_TEXT_CHARS, JobSpec, SourceTable, Unreadable, check_source_allowed, source_texts  # noqa: F401 (re-exported)
from .migrations import migrate
from .store import Item, Ranges, Store, checkpoint_deleted, connect, text_hash, transaction

log = logging.getLogger("pocketembed.jobs")

ACTIVE = ("queued", "running", "waiting")
FINISHED = ("done", "failed", "cancelled")
STATES = (*ACTIVE, "paused", *FINISHED)
ROW_ERRORS = {"too_large", "text_too_long", "invalid_input", "empty_text", "invalid_args"}
"""Error codes that belong to one row; any other error stops the job."""
MAX_QUEUED = 200_000
"""Items (and deletions) waiting in one collection's queue: a client cannot fill the disk with index.enqueue."""
MAX_QUEUE_BYTES = 32 << 20
"""Bytes waiting in one collection's queue. At the item limits (16 KiB text, 64 KiB metadata) an item is
~80 kB, so MAX_QUEUED alone lets one queue take 16 GB; 32 MiB holds a first install's 40,000 SMS a few times."""
MAX_QUEUE_BYTES_TOTAL = 128 << 20
"""Bytes waiting in all queues together: what a phone's disk lends to work not done yet."""
QUEUE_ROW_BYTES = 64
"""What a queue row costs besides its values (rowid, job, op, its (job, seq) index entry): deletions count too."""


_COUNTERS = ("scanned", "embedded", "unchanged", "skipped", "failed", "deleted")


def _stored_size(value: Any) -> int:
    """Bytes a queue row's value takes: UTF-8 for text, 8 for an integer id, 0 for NULL."""
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    return 8


class JobQueue:
    """The jobs table: submit, list, control. Runner progress goes through ``commit_chunk``."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._lock = threading.RLock()  # one connection, shared by the threads that hold this queue
        migrate(conn)  # the jobs tables are index.db's (daemon/migrations.py); up to date: no DDL

    def enqueue(self, collection: str, model: str, truncate: bool, items: list[tuple[Any, str, str | None]],
                deletes: list[Any]) -> tuple[dict[str, Any], bool]:
        """Commit items ((id, text, metadata JSON)) and deletions to the collection's active queue job.

        Returns the job and whether it was created. Nothing is embedded here: the
        runner does it when the policy allows. A request that could never fit one
        queue is ``too_large``; one that does not fit now is ``busy``.
        """
        put_rows = [(i, t, m, QUEUE_ROW_BYTES + _stored_size(i) + _stored_size(t) + _stored_size(m)) for i, t, m in items]
        delete_rows = [(i, QUEUE_ROW_BYTES + _stored_size(i)) for i in deletes]
        size = sum(r[3] for r in put_rows) + sum(r[1] for r in delete_rows)
        if size > MAX_QUEUE_BYTES:
            raise TooLarge(f"these items and deletions take {size:,} bytes in a queue, which holds at most "
                           f"{MAX_QUEUE_BYTES:,}; send them in smaller requests")
        with self._lock, transaction(self.conn):
            row = self.conn.execute(
                "SELECT id, queue_rows, queue_bytes FROM jobs WHERE kind = 'queue' AND collection = ? AND model = ? "
                "AND state IN ('queued','running','waiting','paused') ORDER BY id LIMIT 1", (collection, model)).fetchone()
            created = row is None
            if created:
                now = time.time()
                job_id = self.conn.execute(
                    "INSERT INTO jobs (kind, state, db, table_name, id_column, text_column, collection, model, truncate, "
                    "created, updated, total) VALUES ('queue', 'queued', '', '', '', '', ?, ?, ?, ?, ?, 0)",
                    (collection, model, int(truncate), now, now)).lastrowid
            else:
                job_id = row[0]
            waiting, waiting_bytes = (0, 0) if created else row[1:]
            if waiting + len(items) + len(deletes) > MAX_QUEUED:
                raise Busy(f"{waiting} items of collection {collection!r} wait in its queue (at most {MAX_QUEUED}); "
                           "retry once the charger has worked through them", retry_after_ms=60_000)
            if waiting_bytes + size > MAX_QUEUE_BYTES:
                raise Busy(f"{waiting_bytes:,} bytes of collection {collection!r} wait in its queue (at most "
                           f"{MAX_QUEUE_BYTES:,}); retry once the charger has worked through them", retry_after_ms=60_000)
            everywhere = self.conn.execute("SELECT coalesce(SUM(queue_bytes), 0) FROM jobs WHERE queue_bytes > 0").fetchone()[0]
            if everywhere + size > MAX_QUEUE_BYTES_TOTAL:
                raise Busy(f"{everywhere:,} bytes wait in the queues of all collections (at most {MAX_QUEUE_BYTES_TOTAL:,}); "
                           "retry once the charger has worked through them", retry_after_ms=60_000)
            self.conn.executemany("INSERT INTO queue_items (job, id, op, text, metadata, bytes) VALUES (?, ?, 'put', ?, ?, ?)",
                                  [(job_id, *r) for r in put_rows])
            self.conn.executemany("INSERT INTO queue_items (job, id, op, bytes) VALUES (?, ?, 'delete', ?)",
                                  [(job_id, *r) for r in delete_rows])
            self.conn.execute("UPDATE jobs SET total = total + ?, queue_rows = queue_rows + ?, queue_bytes = queue_bytes + ?, "
                              "updated = ?, phase = 'scan', "
                              "state = CASE WHEN state = 'paused' THEN state ELSE 'queued' END WHERE id = ?",
                              (len(items) + len(deletes), len(items) + len(deletes), size, time.time(), job_id))
        return self.get(job_id), created

    def drop_collection(self, conn: sqlite3.Connection, collection: str) -> list[int]:
        """Cancel the collection's queue jobs and delete what waits in them, inside the caller's transaction.

        ``collections.drop`` calls this in the drop's own transaction: what an app queued for a
        collection it deleted goes with it (failed jobs' rows too: a resume would apply them to a
        new collection of the name), and a new collection of that name starts with an empty queue.
        Returns the ids of the jobs it ended.
        """
        with self._lock:
            jobs = [r[0] for r in conn.execute(
                "SELECT id FROM jobs WHERE kind = 'queue' AND collection = ? "
                "AND state IN ('queued','running','waiting','paused','failed')", (collection,))]
            now = time.time()
            conn.executemany("UPDATE jobs SET state = 'cancelled', reason = 'collection dropped', updated = ?, "
                             "finished = ? WHERE id = ?", [(now, now, j) for j in jobs])
            conn.execute("DELETE FROM queue_items WHERE job IN (SELECT id FROM jobs WHERE kind = 'queue' AND collection = ?)",
                         (collection,))
            conn.execute("UPDATE jobs SET queue_rows = 0, queue_bytes = 0 WHERE kind = 'queue' AND collection = ?",
                         (collection,))
        return jobs

    def submit(self, spec: JobSpec) -> tuple[dict[str, Any], bool]:
        """A new queued job, or the active one for the same source and collection (second value False)."""
        with self._lock, transaction(self.conn):
            row = self.conn.execute(
                "SELECT id FROM jobs WHERE state IN ('queued','running','waiting','paused') AND db = ? AND table_name = ? "
                "AND id_column = ? AND text_column = ? AND coalesce(where_sql, '') = ? AND collection = ? AND model = ?",
                (spec.db, spec.table, spec.id_column, spec.text_column, spec.where or "", spec.collection, spec.model),
            ).fetchone()
            if row:
                job_id, created = row[0], False
            else:
                now = time.time()
                job_id = self.conn.execute(
                    "INSERT INTO jobs (state, db, table_name, id_column, text_column, where_sql, collection, model, "
                    "truncate, created, updated) VALUES ('queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (spec.db, spec.table, spec.id_column, spec.text_column, spec.where, spec.collection, spec.model,
                     int(spec.truncate), now, now)).lastrowid
                created = True
        return self.get(job_id), created

    def get(self, job_id: int) -> dict[str, Any]:
        with self._lock:
            cur = self.conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,))
            row = cur.fetchone()
        if row is None:
            raise UnknownJob(f"no job {job_id}")
        return _describe(dict(zip([d[0] for d in cur.description], row)))

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        with self._lock:
            cur = self.conn.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))
            names = [d[0] for d in cur.description]
            rows = cur.fetchall()
        return [_describe(dict(zip(names, r))) for r in rows]

    def errors(self, job_id: int, limit: int = 20) -> list[dict[str, Any]]:
        with self._lock:
            rows = self.conn.execute("SELECT row_id, code, message FROM job_errors WHERE job = ? ORDER BY at LIMIT ?",
                                     (job_id, limit)).fetchall()
        return [{"id": r[0], "code": r[1], "message": r[2]} for r in rows]

    def next_runnable(self) -> dict[str, Any] | None:
        """The job to work on: one already started first (after a restart), else the oldest queued."""
        with self._lock:
            row = self.conn.execute(
                "SELECT id FROM jobs WHERE state IN ('running','waiting','queued') "
                "ORDER BY state = 'queued', id LIMIT 1").fetchone()
        return self.get(row[0]) if row else None

    def control(self, job_id: int, action: str) -> dict[str, Any]:
        """pause / resume / cancel; refused with a clear error when the state does not allow it."""
        allowed = {"pause": (ACTIVE, "paused"), "resume": (("paused", "failed"), "queued"),
                   "cancel": (("paused", *ACTIVE), "cancelled")}
        from_states, to = allowed[action]
        with self._lock, transaction(self.conn):
            row = self.conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise UnknownJob(f"no job {job_id}")
            if row[0] not in from_states:
                raise PocketEmbedError(f"job {job_id} is {row[0]}; cannot {action} it", code="invalid_state")
            now = time.time()
            self.conn.execute("UPDATE jobs SET state = ?, reason = NULL, error = CASE WHEN ? = 'queued' THEN NULL ELSE error END, "
                              "updated = ?, finished = CASE WHEN ? = 'cancelled' THEN ? ELSE finished END WHERE id = ?",
                              (to, to, now, to, now, job_id))
            if to == "cancelled":  # a cancelled job never resumes: what waits in its queue is dead weight
                purged = self.conn.execute("DELETE FROM queue_items WHERE job = ?", (job_id,)).rowcount
                self.conn.execute("UPDATE jobs SET queue_rows = 0, queue_bytes = 0 WHERE id = ?", (job_id,))
            else:
                purged = 0
        if purged:
            checkpoint_deleted(self.conn)  # the queued texts are gone from the WAL too
        return self.get(job_id)

    def set_state(self, job_id: int, state: str, reason: str | None = None, error: str | None = None) -> bool:
        """Runner's state change; only from an active state, so a pause/cancel is never overwritten."""
        now = time.time()
        with self._lock:
            cur = self.conn.execute(
                "UPDATE jobs SET state = ?, reason = ?, error = coalesce(?, error), updated = ?, "
                "started = coalesce(started, CASE WHEN ? = 'running' THEN ? END), "
                "finished = CASE WHEN ? IN ('done','failed') THEN ? ELSE finished END "
                "WHERE id = ? AND state IN ('queued','running','waiting') AND (state != ? OR coalesce(reason, '') != coalesce(?, ''))",
                (state, reason, error, now, state, now, state, now, job_id, state, reason))
        return cur.rowcount > 0

    def cursor(self, job_id: int) -> Any:
        """The id of the last row committed (None before the first chunk)."""
        with self._lock:
            return self.conn.execute("SELECT cursor FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]

    def state(self, job_id: int) -> str:
        with self._lock:
            return self.conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]


def _describe(row: dict[str, Any]) -> dict[str, Any]:
    """A job row as clients see it, with progress, rate and ETA."""
    total, scanned, active = row["total"], row["scanned"], row["active_s"] or 0.0
    rate = scanned / active if active > 0 and scanned else None
    remaining = max(0, (total or 0) - scanned)
    queue = row.get("kind") == "queue"
    return {
        "id": row["id"], "kind": row.get("kind") or "table", "state": row["state"], "reason": row["reason"],
        "error": row["error"],
        **({} if queue else {"db": row["db"], "table": row["table_name"], "id_column": row["id_column"],
                             "text_column": row["text_column"]}),
        **({} if queue else {"where": row["where_sql"]}), "collection": row["collection"], "model": row["model"], "truncate": bool(row["truncate"]),
        "created": row["created"], "started": row["started"], "finished": row["finished"], "updated": row["updated"],
        "phase": row["phase"], "total": total, **{c: row[c] for c in _COUNTERS},
        "progress": (scanned / total if total else (1.0 if row["state"] == "done" else 0.0)),
        "rate_rows_s": round(rate, 2) if rate else None,
        "eta_s": round(remaining / rate, 1) if rate and row["state"] not in FINISHED else None,
    }


@dataclass
class _Chunk:
    rows: int
    cursor: Any
    todo: list[tuple[Any, str, str]]  # id, text, hash: rows to (re)write
    unchanged: list[Any]
    skipped: int
    errors: list[tuple[Any, str, str]]  # id, code, message
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    """hash → vector: known to the store already, or embedded for this chunk."""
    pending: list[str] = field(default_factory=list)
    """Hashes being embedded, one per distinct text."""
    embedded: Future | None = None
    """The pending texts' vectors (None: nothing to embed)."""
    dims: int | None = None
    """A Matryoshka collection's dims, which its vectors are embedded at (None: the model's own)."""
    started: float = field(default_factory=time.monotonic)
    unchanged_texts: dict[Any, str] = field(default_factory=dict)
    """The unchanged rows' texts: their lexical postings are filled in if missing (rows indexed before it existed)."""


class JobRunner:
    """One thread that works through the job queue, a chunk at a time."""

    def __init__(self, db_path: Path, embedder: Embedder, power: PowerMonitor,
                 dims: Callable[[str], int], chunk_rows: int = 128,
                 pipeline: int = 2, source_budget_s: float = 5.0,
                 on_death: Callable[[str], None] | None = None,
                 allowed_source: Callable[[str], None] | None = None) -> None:
        self.db_path = db_path
        self.embedder = embedder
        self.power = power
        self.dims = dims
        self.chunk_rows = chunk_rows
        self.pipeline = pipeline
        self.source_budget_s = source_budget_s
        self.on_death = on_death
        self.allowed_source = allowed_source or (lambda db: None)
        self._kick = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mark = time.monotonic()
        """End of the last committed chunk: a job's active time is counted from here, once."""

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="pe-jobs", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        """Look at the queue again now (a job was submitted or resumed)."""
        self._kick.set()

    def stop(self, timeout: float = 60) -> None:
        """Stop after the chunks in flight are committed."""
        self._stop.set()
        self._kick.set()
        if self._thread:
            self._thread.join(timeout)

    def _sleep(self, seconds: float | None) -> None:
        self._kick.wait(seconds)
        self._kick.clear()

    def _loop(self) -> None:
        try:
            self._work()
        finally:
            if not self._stop.is_set():
                log.critical("the job runner's thread ended unexpectedly")
                if self.on_death is not None:
                    self.on_death("jobs")

    def _work(self) -> None:
        conn = connect(self.db_path)
        queue = JobQueue(conn)
        store = Store(conn)
        try:  # items jobs wrote before the lexical index existed: their texts are in the sources
            added = store.lexical_backfill(lambda origin, ids: source_texts(
                conn, origin, ids, allow=self.allowed_source, budget_s=self.source_budget_s))
            if added:
                log.info("lexical index: %d items indexed from their job sources", added)
        except Exception:  # a source's trouble must not keep the runner from its jobs
            log.exception("lexical backfill from job sources")
        while not self._stop.is_set():
            try:
                job = queue.next_runnable()
                if job is None:
                    self._sleep(None)  # until a job is submitted or resumed (kick): no polling
                    continue
                self._run(queue, store, job)
            except Exception:  # a bug: log it, keep the daemon serving, try again later
                log.exception("job runner")
                self._sleep(5.0)
        conn.close()

    def _wait_for_power(self, queue: JobQueue, job_id: int) -> bool:
        """Block while the policy says no; False when the job left its active state or the daemon stops."""
        while not self._stop.is_set():
            if queue.state(job_id) not in ACTIVE:
                return False
            d = self.power.decide()
            if d.allowed:
                queue.set_state(job_id, "running")
                return True
            queue.set_state(job_id, "waiting", d.reason)
            self._sleep(self.power.next_check_s())
        return False

    def _may_read(self, queue: JobQueue, job_id: int, busy: bool) -> bool:
        """Whether to read another chunk now: the job is still active and the policy allows it.

        With chunks in flight (``busy``) it does not wait: those are finished first.
        With none, it waits for the policy (the job shows ``waiting`` and why).
        """
        while not self._stop.is_set():
            if queue.state(job_id) not in ACTIVE:
                return False
            if self.power.decide().allowed:
                queue.set_state(job_id, "running")
                return True
            if busy or not self._wait_for_power(queue, job_id):
                return False
        return False

    def _run(self, queue: JobQueue, store: Store, job: dict[str, Any]) -> None:
        if job["kind"] == "queue":
            try:
                self._drain(queue, store, job)
            except ShuttingDown:
                pass  # resumes at the next start: the queue rows of uncommitted chunks are still there
            except PocketEmbedError as e:
                log.error("job %d failed: error[%s] %s", job["id"], e.code, e.message)
                queue.set_state(job["id"], "failed", error=f"error[{e.code}]: {e.message}")
            return
        job_id = job["id"]
        spec = JobSpec(job["db"], job["table"], job["id_column"], job["text_column"], job["where"],
                       job["collection"], job["model"], job["truncate"])
        try:
            self.allowed_source(spec.db)  # job_sources may have changed since it was submitted
            source = SourceTable(spec, budget_s=self.source_budget_s, allow=self.allowed_source)  # re-checked per chunk
        except (SourceError, Forbidden) as e:
            queue.set_state(job_id, "failed", error=f"error[{e.code}]: {e.message}")
            return
        try:
            self._scan(queue, store, source, spec, job)
        except ShuttingDown:
            pass  # resumes at the next start from the last committed chunk
        except PocketEmbedError as e:
            log.error("job %d failed: error[%s] %s", job_id, e.code, e.message)
            queue.set_state(job_id, "failed", error=f"error[{e.code}]: {e.message}")
        finally:
            source.close()

    def _scan(self, queue: JobQueue, store: Store, source: SourceTable, spec: JobSpec, job: dict[str, Any]) -> None:
        job_id, spec_collection, model, origin = job["id"], spec.collection, spec.model, spec.origin
        if not self._wait_for_power(queue, job_id):
            return
        with transaction(queue.conn):
            store.ensure_collection(queue.conn, spec_collection, model, self.dims(model))
            queue.conn.execute("UPDATE jobs SET total = ? WHERE id = ?", (source.count(), job_id))
        ranges = self.embedder.ranges(model, self.dims(model))  # measured now if new, not inside a chunk's transaction
        cursor = queue.cursor(job_id)
        inflight: deque[_Chunk] = deque()
        exhausted = job["phase"] != "scan"
        while True:
            # Keep up to `pipeline` chunks in the scheduler so that no worker idles between chunks.
            while not exhausted and len(inflight) < self.pipeline and self._may_read(queue, job_id, bool(inflight)):
                rows = source.after(cursor, self.chunk_rows)
                if not rows:
                    exhausted = True
                    break
                cursor = rows[-1][0]
                inflight.append(self._prepare(store, queue.conn, spec_collection, model, rows, job))
            if not inflight:
                break
            chunk = inflight.popleft()
            self._finish(chunk, model, job)
            self._commit(queue, store, job_id, spec_collection, origin, chunk, ranges)
        if exhausted and queue.state(job_id) in ACTIVE:
            with transaction(queue.conn):
                deleted = store.sweep(queue.conn, spec_collection, origin, job_id)
                queue.conn.execute("UPDATE jobs SET deleted = deleted + ?, phase = 'done' WHERE id = ?", (deleted, job_id))
            if deleted:
                checkpoint_deleted(queue.conn)  # the source's deleted rows are gone from the WAL too
            queue.set_state(job_id, "done")
            final = queue.get(job_id)
            log.info("job %d done: %d rows, %d embedded, %d unchanged, %d skipped, %d failed, %d deleted",
                     job_id, final["scanned"], final["embedded"], final["unchanged"], final["skipped"],
                     final["failed"], final["deleted"])

    def _drain(self, queue: JobQueue, store: Store, job: dict[str, Any]) -> None:
        """Apply a queue job's items chunk by chunk, up to ``pipeline`` chunks in the scheduler at once."""
        job_id, collection, model = job["id"], job["collection"], job["model"]
        conn = queue.conn
        dims = store.info(collection, conn).dims  # index.enqueue made the collection, maybe with Matryoshka dims
        # The policy first: a new model's calibration embeds 256 texts, work that must wait for the charger too.
        if not self._wait_for_power(queue, job_id):
            return
        ranges = self.embedder.ranges(model, dims)  # measured now if new, not inside a chunk's transaction
        last_seq = 0
        inflight: deque[tuple[_Chunk, list[tuple], list[Any], dict[Any, str | None], int]] = deque()
        while True:
            while len(inflight) < self.pipeline and self._may_read(queue, job_id, bool(inflight)):
                rows = conn.execute("SELECT seq, id, op, text, metadata FROM queue_items WHERE job = ? AND seq > ? "
                                    "ORDER BY seq LIMIT ?", (job_id, last_seq, self.chunk_rows)).fetchall()
                if not rows:
                    break
                last_seq = rows[-1][0]
                latest: dict[Any, tuple] = {}  # within a chunk the last operation on an id wins
                for r in rows:
                    latest[r[1]] = r
                puts = [(i, r[3]) for i, r in latest.items() if r[2] == "put"]
                deletes = [i for i, r in latest.items() if r[2] == "delete"]
                metadata = {i: r[4] for i, r in latest.items() if r[2] == "put"}
                chunk = self._prepare(store, conn, collection, model, puts, job, queued=True, dims=dims) if puts else \
                    _Chunk(0, None, [], [], 0, [])
                inflight.append((chunk, rows, deletes, metadata, last_seq))
            if not inflight:
                break
            chunk, rows, deletes, metadata, seq = inflight.popleft()
            self._finish(chunk, model, job)
            if self._commit_queued(queue, store, job_id, collection, chunk, rows, deletes, metadata, seq, ranges):
                checkpoint_deleted(conn)  # its deletions committed: gone from the WAL too
        with transaction(conn):  # done only if nothing arrived meanwhile: enqueue's transaction waits for this one
            left = conn.execute("SELECT COUNT(*) FROM queue_items WHERE job = ?", (job_id,)).fetchone()[0]
            if not left and queue.state(job_id) in ACTIVE:
                conn.execute("UPDATE jobs SET phase = 'done' WHERE id = ?", (job_id,))
                queue.set_state(job_id, "done")

    def _commit_queued(self, queue: JobQueue, store: Store, job_id: int, collection: str, chunk: _Chunk,
                       rows: list[tuple], deletes: list[Any], metadata: dict[Any, str | None], seq: int,
                       ranges: Ranges) -> int:
        """A chunk's vectors, metadata, deletions, errors, counters and the removal of its queue rows: one transaction.

        Returns how many items it deleted.

        Which items are unchanged is decided here, against what is committed: the chunk before this one
        (prepared alongside it) may have deleted an id or given it another text since this one was prepared.
        """
        now = time.monotonic()
        active, self._mark = now - max(chunk.started, self._mark), now
        with transaction(queue.conn) as conn:
            if conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()[0] in FINISHED:
                return 0  # cancelled meanwhile (its collection dropped, perhaps made anew): nothing of it applies
            info = store.info(collection, conn)
            committed = store.hashes(conn, collection, [row_id for row_id, _, _ in chunk.todo])
            unchanged = [row_id for row_id, _, h in chunk.todo if committed.get(row_id) == h]
            items = [Item(row_id, h, chunk.vectors[h], metadata=metadata.get(row_id), text=text if info.store_text else None,
                          lexical_text=text)
                     for row_id, text, h in chunk.todo if committed.get(row_id) != h]
            store.put(conn, collection, items, ranges)
            store.set_metadata(conn, collection, [(i, metadata.get(i)) for i in unchanged])
            texts = {row_id: text for row_id, text, _ in chunk.todo}
            store.index_texts(conn, collection, [(i, texts[i]) for i in unchanged])  # re-sent: fills a gap
            deleted = store.delete(conn, collection, deletes) if deletes else 0
            conn.executemany("INSERT OR REPLACE INTO job_errors (job, row_id, code, message, at) VALUES (?, ?, ?, ?, ?)",
                             [(job_id, i, c, m, time.time()) for i, c, m in chunk.errors])
            gone, freed = conn.execute("SELECT COUNT(*), coalesce(SUM(bytes), 0) FROM queue_items WHERE job = ? AND seq <= ?",
                                       (job_id, seq)).fetchone()
            conn.execute("DELETE FROM queue_items WHERE job = ? AND seq <= ?", (job_id, seq))
            conn.execute(
                "UPDATE jobs SET scanned = scanned + ?, embedded = embedded + ?, unchanged = unchanged + ?, "
                "skipped = skipped + ?, failed = failed + ?, deleted = deleted + ?, active_s = active_s + ?, updated = ?, "
                "queue_rows = queue_rows - ?, queue_bytes = queue_bytes - ? "
                "WHERE id = ?", (len(rows), len(items), len(unchanged), chunk.skipped, len(chunk.errors), deleted,
                                 active, time.time(), gone, freed, job_id))
        return deleted

    def _prepare(self, store: Store, conn: sqlite3.Connection, collection: str, model: str,
                 rows: list[tuple[Any, Any]], job: dict[str, Any], *, queued: bool = False,
                 dims: int | None = None) -> _Chunk:
        """Sort a chunk's rows into skip / unchanged / to write, and queue the texts never embedded.

        A queue chunk (``queued``) leaves "unchanged" to its commit: a queue may write an id again in
        the next chunk, which is prepared before this one commits. Its every text gets a vector here
        (the store's own when it holds the text), so the commit can still write an item that looked
        unchanged now and was deleted or rewritten by then.
        """
        known = {} if queued else store.hashes(conn, collection, [r[0] for r in rows])
        todo, unchanged, errors, skipped = [], [], [], 0
        for row_id, text in rows:
            if text is None or (isinstance(text, str) and not text.strip()):
                skipped += 1
            elif isinstance(text, Unreadable):  # over the size a source's value may have (daemon/sources.py)
                errors.append((row_id, text.code, text.message))
            elif not isinstance(text, str):
                errors.append((row_id, "invalid_input", f"text is {type(text).__name__}, not TEXT"))
            elif len(text) > MAX_TEXT_CHARS and not job["truncate"]:
                errors.append((row_id, "too_large", f"text of {len(text)} characters (limit {MAX_TEXT_CHARS} without truncate)"))
            else:
                h = text_hash(text)
                (unchanged.append(row_id) if known.get(row_id) == h else todo.append((row_id, text, h)))
        chunk = _Chunk(len(rows), rows[-1][0], todo, unchanged, skipped, errors, dims=dims)
        if unchanged:
            wanted = set(unchanged)
            chunk.unchanged_texts = {row_id: text for row_id, text in rows if row_id in wanted}
        # The store is the embedding cache: a text it holds (any id, any collection of the model) is reused.
        chunk.vectors = store.known_vectors(conn, model, dims or self.dims(model), {h for _, _, h in todo})
        texts: dict[str, str] = {}
        for _, text, h in todo:
            if h not in chunk.vectors:
                texts.setdefault(h, text)
        chunk.pending = list(texts)
        if texts:
            chunk.embedded = self._submit(list(texts.values()), model, job["truncate"], dims)
        return chunk

    def _submit(self, texts: list[str], model: str, truncate: bool, dims: int | None) -> Future:
        """A chunk's texts (as documents) in the background lane, waiting while the lane is full or the model unloads.

        ``models.unload`` refuses new requests for its model while it waits for the queued ones;
        once it has closed the model, a request loads it again on demand. A job waits that out
        (briefly: the unload waits only for work already queued) instead of failing for good.
        """
        return self.embedder.submit_retrying(lambda: self.embedder.embed(
            [t[:MAX_TEXT_CHARS] for t in texts], model, input_type="document", lane=BACKGROUND, truncate=truncate,
            dims=dims, label=None), retry=True, stop=self._stop)

    def _finish(self, chunk: _Chunk, model: str, job: dict[str, Any]) -> None:
        """Wait for a chunk; when the whole chunk failed, embed its texts one by one to find the bad ones."""
        if chunk.embedded is None:
            return
        error = chunk.embedded.exception()
        if error is None:
            chunk.vectors.update(zip(chunk.pending, chunk.embedded.result()))
            return
        if getattr(error, "code", None) not in ROW_ERRORS:
            raise error
        text_of = {h: t for _, t, h in chunk.todo}
        singles = {h: self._submit([text_of[h]], model, job["truncate"], chunk.dims) for h in chunk.pending}
        failed: dict[str, PocketEmbedError] = {}
        for h, single in singles.items():
            single_error = single.exception()
            if single_error is None:
                chunk.vectors[h] = single.result()[0]
            elif getattr(single_error, "code", None) in ROW_ERRORS:
                failed[h] = single_error
            else:
                raise single_error
        chunk.errors += [(row_id, failed[h].code, failed[h].message) for row_id, _, h in chunk.todo if h in failed]
        chunk.todo = [r for r in chunk.todo if r[2] not in failed]

    def _commit(self, queue: JobQueue, store: Store, job_id: int, collection: str, origin: str, chunk: _Chunk,
                ranges: Ranges) -> None:
        """Vectors, seen marks, errors, cursor and counters: one transaction."""
        items = [Item(row_id, h, chunk.vectors[h], origin=origin, seen=job_id, lexical_text=text)
                 for row_id, text, h in chunk.todo]
        now = time.monotonic()
        active, self._mark = now - max(chunk.started, self._mark), now
        with transaction(queue.conn) as conn:
            store.put(conn, collection, items, ranges)
            store.mark_seen(conn, collection, chunk.unchanged, job_id)
            store.index_texts(conn, collection, list(chunk.unchanged_texts.items()))  # rows indexed before lexical
            conn.executemany("INSERT OR REPLACE INTO job_errors (job, row_id, code, message, at) VALUES (?, ?, ?, ?, ?)",
                             [(job_id, i, c, m, time.time()) for i, c, m in chunk.errors])
            conn.execute(
                "UPDATE jobs SET cursor = ?, scanned = scanned + ?, embedded = embedded + ?, unchanged = unchanged + ?, "
                "skipped = skipped + ?, failed = failed + ?, active_s = active_s + ?, updated = ? WHERE id = ?",
                (chunk.cursor, chunk.rows, len(items), len(chunk.unchanged), chunk.skipped, len(chunk.errors),
                 active, time.time(), job_id))

