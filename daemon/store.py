"""The vector store: named collections of embedded items in one SQLite file.

Each collection is bound to one model and dims. Per item it keeps the id, the
text hash, optional JSON metadata, the **binary** code (1 bit per dim, packed)
and the **int8** code (see quantize.py); float vectors and the text itself only
when the collection asks for them (``float_vectors``, ``store_text``: the text
is the user's private data, so it is kept only on request). Search scans the binary codes, held in memory
(48 B per 384-dim vector) and kept in step with every write, then rescores the
best ``k × rescore_multiplier`` with the float query against their int8 codes,
read from SQLite: a phone holds a large index in little memory.

Beside the vectors, in the same file and the same transactions, a lexical index
(daemon/lexical.py: BM25 over an inverted index in plain tables, and why not
FTS5 on this SQLite) holds each item's terms, so that search can find the
numbers, codes and names people type. Every write path feeds it through
:meth:`Store.put` (``Item.lexical_text``: the text is indexed even when it is not
stored); deletes reach it through a trigger on ``items``.

Deleted means gone: :func:`connect` turns on ``secure_delete`` (freed cells and
pages are zeroed), and a writer that deleted something calls
:func:`checkpoint_deleted` once its transaction has committed and before it
replies, so that the WAL holds no copy of the old pages either.

The lexical API (for search, fusion and the CLI):

``Store.lexical_search(collection: str, query: str, n: int = 10, allowed: np.ndarray | None = None)
-> list[tuple[int, float, list[str]]]``
    (rowid, BM25 score, the query terms it matched), best first; ``allowed``
    restricts to these rowids (e.g. ``Store.matching_rows(collection, filter)``).
    A rowid is the item's first row (chunk 0, or chunk 1 of a chunked item).
``Store.matching_rows(collection: str, filter: dict) -> np.ndarray``
    rowids of the items whose metadata matches (as ``search``'s ``filter``).
``Store.rows_to_hits(collection: str, rows: Sequence[int], scores: Sequence[float] | None = None,
with_text: bool = False, source_text: SourceText | None = None) -> list[dict]``
    hit dicts as ``Store.search`` makes them (``id``, ``score``, ``metadata``, and
    ``text`` when asked), in the rows' order.
``Store.lexical_state(collection: str) -> str``
    "ready" (every item indexed), "partial", or "missing" (none: texts never
    seen, e.g. an index.db made before the lexical index with store_text off);
    ``Store.collection()`` reports it as ``lexical`` with ``lexical_items`` and
    ``lexical_bytes_per_item`` (dbstat, prorated by items).
``Store.index_texts(conn, collection, pairs: Sequence[tuple[id, text]]) -> int``
    index items the store holds whose postings are missing (a re-sent message
    with unchanged text: nothing is re-embedded).

The store and the job queue share one database file (``<home>/index.db``, WAL)
so that a job writes vectors and advances its cursor in one transaction. Write
methods therefore take the caller's connection and never commit on their own;
the caller brackets them with :func:`transaction`. daemon/migrations.py makes
and upgrades the schema (versioned with ``PRAGMA user_version``; an up-to-date
file gets no DDL when a Store or JobQueue is made); writes are plain SQL.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pocketembed.errors import CollectionMismatch, InvalidInput, UnknownCollection
from pocketembed.ipc.ops import MAX_CANDIDATES

from . import lexical, migrations
from .quantize import ITQ_MIN, Calibration, itq_rotation, itq_sample, nearest, words

RECALIBRATE_UNTIL = 65_536
"""The binary code's centring and rotation are refitted each time a collection doubles, up to this size."""
_REFIT_SLICE = 1024
"""Rows decoded and re-encoded at a time by a refit."""

RANGE_MARGIN = 0.5
"""Without a model's ranges (a store used on its own), the first batch's ranges widened by this share a side."""
Ranges = tuple[np.ndarray, np.ndarray]
"""A model's int8 lo/hi per dimension at a collection's dims (embedding.Embedder.ranges: measured once per model)."""
DEFAULT_RESCORE = 10
SourceText = Callable[[str, list[Any]], dict[Any, str]]
"""(origin, ids) → id → text: reads items' texts back from the job source that wrote them."""
log = logging.getLogger("pocketembed.store")


BUSY_TIMEOUT_S = 30
CHECKPOINT_WAIT_MS = 5_000
"""How long the checkpoint after a delete waits for readers of older snapshots (the daemon's own are short)."""


def db_path(home: Path) -> Path:
    return home / "index.db"


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, waiting on locks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    # Deleted means gone: freed cells and pages are overwritten with zeros (text, codes, postings).
    conn.execute("PRAGMA secure_delete=ON")
    return conn


def checkpoint_deleted(conn: sqlite3.Connection) -> float:
    """Copy the WAL into the database and truncate it to 0 bytes; call after a delete has committed.

    ``secure_delete`` zeroes what a delete frees, but in WAL mode the zeroed pages are
    new frames: the old ones, holding the deleted text and vectors, stay in index.db-wal
    (and the old page in index.db) until a checkpoint copies the new pages back, and in
    the WAL file until it is truncated. TRUNCATE waits (busy timeout) for readers of
    older snapshots; the store's reads are short. Returns the seconds it took.
    """
    t0 = time.perf_counter()
    conn.execute(f"PRAGMA busy_timeout={CHECKPOINT_WAIT_MS}")  # a reader outside the daemon must not stall writes 30 s
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
    if busy:
        log.warning("wal_checkpoint(TRUNCATE) after a delete was blocked by a reader for %d ms; the WAL may hold "
                    "deleted pages until the next delete's checkpoint", CHECKPOINT_WAIT_MS)
    return time.perf_counter() - t0


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception, a failed COMMIT included.

    A COMMIT that fails (disk full) leaves SQLite inside the transaction; rolling
    it back here keeps the connection usable and nothing of it half-committed.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def text_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


@dataclass
class Item:
    id: Any
    text_hash: str
    vector: np.ndarray
    """float32, unit length (the engine's output)."""
    metadata: str | None = None
    """JSON text."""
    origin: str | None = None
    """Which job source wrote it (the sweep of deleted rows only touches its own)."""
    seen: int | None = None
    """The job run that last saw it in its source."""
    chunk: int = 0
    """0 for a whole text; 1, 2, ... for the token windows of a chunked one."""
    text: str | None = None
    """The item's text, kept when its collection has ``store_text`` (on its first row only)."""
    lexical_text: str | None = None
    """The text the lexical index gets for this item (its first row), stored or not; None: ``text``.
    A first row written with neither loses its postings (its old text's terms would be wrong)."""


@dataclass
class _Info:
    name: str
    model: str
    dims: int
    float_vectors: bool
    store_text: bool
    version: int
    calib_version: int
    calibration: Calibration | None
    uid: str = ""
    """This collection, not an earlier one of its name (dropped, made again): per-collection caches are filed under it."""


class _Codes:
    """One collection's binary codes in memory: sorted rowids, (words, n) uint64, a validity mask."""

    def __init__(self, version: int, calib_version: int, rowids: np.ndarray, word_rows: np.ndarray,
                 uid: str = "") -> None:
        self.version = version
        self.calib_version = calib_version
        self.uid = uid
        self.rowids = rowids
        self.words = word_rows
        self.valid = np.ones(len(rowids), bool)
        self.all_valid = True
        """No deleted rows among the codes: searches skip the mask."""

    def apply(self, version: int, deleted: np.ndarray, changed_rows: np.ndarray, changed_words: np.ndarray) -> None:
        if len(deleted):
            pos = np.searchsorted(self.rowids, deleted)
            hit = pos < len(self.rowids)
            hit[hit] &= self.rowids[pos[hit]] == deleted[hit]
            self.valid[pos[hit]] = False
        if len(changed_rows):
            pos = np.searchsorted(self.rowids, changed_rows)
            old = pos < len(self.rowids)
            old[old] &= self.rowids[pos[old]] == changed_rows[old]
            self.words[:, pos[old]] = changed_words[:, old]
            self.valid[pos[old]] = True
            new = ~old
            if new.any():
                rowids = np.concatenate([self.rowids, changed_rows[new]])
                word_rows = np.concatenate([self.words, changed_words[:, new]], axis=1)
                valid = np.concatenate([self.valid, np.ones(int(new.sum()), bool)])
                order = np.argsort(rowids, kind="stable")
                self.rowids, self.words, self.valid = rowids[order], np.ascontiguousarray(word_rows[:, order]), valid[order]
        if (~self.valid).sum() > len(self.valid) // 4 + 1024:  # compact
            keep = self.valid
            self.rowids, self.words, self.valid = self.rowids[keep], np.ascontiguousarray(self.words[:, keep]), self.valid[keep]
        self.all_valid = bool(self.valid.all())
        self.version = version

    @property
    def nbytes(self) -> int:
        return self.rowids.nbytes + self.words.nbytes + self.valid.nbytes


class CodeCache:
    """The binary codes of every searched collection, shared by all connections of the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._codes: dict[str, _Codes] = {}
        self._calibrations: dict[str, tuple[str, int, Calibration]] = {}

    def calibration(self, conn: sqlite3.Connection, name: str, dims: int, version: int, uid: str = "") -> Calibration:
        """A collection's calibration, read once per version (the rotation alone is dims² floats).

        Versions count from 0 again in a collection made anew under a dropped one's name, and the
        drop cannot reach the caches of other threads' stores: a hit must also match ``uid``.
        """
        with self._lock:
            hit = self._calibrations.get(name)
            if hit is not None and hit[:2] == (uid, version):
                return hit[2]
        row = conn.execute("SELECT lo, hi, mean, rotation, calib_count, uid, calib_version FROM collections WHERE name = ?",
                           (name,)).fetchone()
        cal = Calibration.from_blobs(dims, *row[:5])
        with self._lock:  # filed under the version read with it: a concurrent recalibration is never mixed in
            self._calibrations[name] = (row[5], row[6], cal)
        return cal

    def get(self, conn: sqlite3.Connection, info: _Info) -> _Codes:
        with self._lock:
            codes = self._codes.get(info.name)
            if codes is None or codes.calib_version != info.calib_version or codes.uid != info.uid:
                rows = conn.execute("SELECT rowid, bin FROM items WHERE collection = ? ORDER BY rowid", (info.name,)).fetchall()
                codes = _Codes(info.version, info.calib_version, np.array([r[0] for r in rows], np.int64),
                               _word_rows([r[1] for r in rows], info.dims), info.uid)
                self._codes[info.name] = codes
            elif codes.version != info.version:
                deleted = np.array([r[0] for r in conn.execute(
                    "SELECT row FROM tombstones WHERE collection = ? AND ver > ?", (info.name, codes.version))], np.int64)
                rows = conn.execute("SELECT rowid, bin FROM items WHERE collection = ? AND ver > ? ORDER BY rowid",
                                    (info.name, codes.version)).fetchall()
                codes.apply(info.version, deleted, np.array([r[0] for r in rows], np.int64),
                            _word_rows([r[1] for r in rows], info.dims))
            return codes

    def drop(self, name: str) -> None:
        with self._lock:
            self._codes.pop(name, None)
            self._calibrations.pop(name, None)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {name: {"vectors": int(c.valid.sum()), "bytes": c.nbytes} for name, c in self._codes.items()}


def _word_rows(blobs: list[bytes], dims: int) -> np.ndarray:
    nbytes = (dims + 7) // 8
    packed = np.frombuffer(b"".join(blobs), np.uint8).reshape(len(blobs), nbytes) if blobs else np.zeros((0, nbytes), np.uint8)
    return words(packed)


class _Slice(NamedTuple):
    rowids: list[int]
    vectors: np.ndarray


def _gather(sample: np.ndarray, picks: np.ndarray, start: int, vectors: np.ndarray) -> None:
    """Copy into ``sample`` the picked positions that fall in ``vectors`` (positions start, start + 1, ...)."""
    hit = np.nonzero((picks >= start) & (picks < start + len(vectors)))[0]
    sample[hit] = vectors[picks[hit] - start]


class Store:
    """Collections bound to a model and dims; items keyed by (collection, id, chunk)."""

    def __init__(self, conn: sqlite3.Connection, cache: CodeCache | None = None) -> None:
        self.conn = conn
        self.cache = cache or CodeCache()
        self._lexical_states: dict[str, tuple[tuple[str, int, int], str]] = {}
        """collection → ((uid, write version, lexical docs), its lexical state): see lexical_state."""
        migrations.migrate(conn)  # an up-to-date index.db: one header read, no DDL

    # -- collections -----------------------------------------------------------------

    def ensure_collection(self, conn: sqlite3.Connection, name: str, model: str, dims: int,
                          float_vectors: bool = False, store_text: bool | None = None) -> None:
        """Create the collection, or check that the existing one matches.

        ``store_text`` is fixed when a collection is created; None accepts either.
        """
        row = conn.execute("SELECT model, dims, store_text FROM collections WHERE name = ?", (name,)).fetchone()
        if row is None:
            conn.execute("INSERT INTO collections (name, model, dims, created, float_vectors, store_text, uid) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)", (name, model, dims, time.time(), int(float_vectors),
                                                          int(bool(store_text)), secrets.token_hex(8)))
        elif (row[0], row[1]) != (model, dims):
            raise CollectionMismatch(f"collection {name!r} holds {row[0]} vectors of {row[1]} dims, "
                                     f"not {model} / {dims}; use another collection or drop it")
        elif store_text is not None and bool(row[2]) != store_text:
            raise CollectionMismatch(f"collection {name!r} was created with store_text={bool(row[2])}; "
                                     "it is fixed at creation (drop the collection to change it)")

    def info(self, name: str, conn: sqlite3.Connection | None = None) -> _Info:
        conn = conn or self.conn
        row = conn.execute("SELECT name, model, dims, float_vectors, store_text, version, calib_version, "
                           "calib_count IS NOT NULL, uid FROM collections WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise UnknownCollection(f"no collection named {name!r}")
        cal = self.cache.calibration(conn, name, row[2], row[6], row[8]) if row[7] else None
        return _Info(row[0], row[1], row[2], bool(row[3]), bool(row[4]), row[5], row[6], cal, row[8])

    def collection(self, name: str) -> dict[str, Any]:
        info = self.info(name)
        count, items = self.conn.execute("SELECT COUNT(*), COUNT(DISTINCT id) FROM items WHERE collection = ?",
                                         (name,)).fetchone()
        created = self.conn.execute("SELECT created FROM collections WHERE name = ?", (name,)).fetchone()[0]
        docs, _ = lexical.stats(self.conn, name)
        return {"name": name, "model": info.model, "dims": info.dims, "created": created, "items": items,
                "vectors": count, "float_vectors": info.float_vectors, "store_text": info.store_text,
                "bytes_per_vector": (info.dims + 7) // 8 + info.dims + (4 * info.dims if info.float_vectors else 0),
                "calibrated_on": info.calibration.count if info.calibration else 0,
                "rotation": info.calibration is not None and info.calibration.rotation is not None,
                "lexical": _lexical_state(items, docs), "lexical_items": docs,
                "lexical_bytes_per_item": self._lexical_bytes_per_item(docs)}

    def lexical_state(self, collection: str) -> str:
        """"ready" | "partial" | "missing": whether lexical search sees every item of the collection."""
        info = self.info(collection)
        docs = lexical.stats(self.conn, collection)[0]
        key = (info.uid, info.version, docs)  # a write bumps the version; a backfill changes docs
        cached = self._lexical_states.get(collection)
        if cached is None or cached[0] != key:
            # Counting the items scans the collection (9 ms at 100,000): once per write, not per search.
            items = self.conn.execute("SELECT COUNT(*) FROM items WHERE collection = ? AND chunk IN (0, 1)",
                                      (collection,)).fetchone()[0]
            cached = self._lexical_states[collection] = (key, _lexical_state(items, docs))
        return cached[1]

    def _lexical_bytes_per_item(self, docs: int) -> float | None:
        """The lexical tables' pages on disk (dbstat), per indexed item of all collections, cached a minute.

        Shared by the collections pro rata: their items are alike (SMS), and one dbstat walk of
        the tables (it reads every page) per minute is what collections.list can afford.
        """
        if not docs:
            return None
        now = time.monotonic()
        cached = getattr(self, "_lex_bytes", None)
        if cached is None or now - cached[0] > 60:
            try:
                size = self.conn.execute(f"SELECT coalesce(SUM(pgsize), 0) FROM dbstat WHERE name IN "
                                         f"({','.join('?' * len(lexical.LEX_BTREES))})", lexical.LEX_BTREES).fetchone()[0]
            except sqlite3.Error:  # no dbstat in this build: estimate from the rows (~14 B a posting)
                size = self.conn.execute("SELECT 14 * COUNT(*) FROM lex_postings").fetchone()[0] + \
                    self.conn.execute("SELECT coalesce(SUM(length(tids) + 16), 0) FROM lex_docs").fetchone()[0]
            total = self.conn.execute("SELECT coalesce(SUM(n), 0) FROM lex_collections").fetchone()[0]
            cached = self._lex_bytes = (now, size / total if total else 0.0)
        return round(cached[1], 1)

    def collection_names(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT name FROM collections ORDER BY name")]

    def count_collections(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM collections").fetchone()[0]

    def collections(self) -> list[dict[str, Any]]:
        names = [r[0] for r in self.conn.execute("SELECT name FROM collections ORDER BY name")]
        return [self.collection(n) for n in names]

    def drop(self, conn: sqlite3.Connection, name: str) -> int:
        self.info(name, conn)
        lexical.drop(conn, name)
        n = conn.execute("DELETE FROM items WHERE collection = ?", (name,)).rowcount
        conn.execute("DELETE FROM tombstones WHERE collection = ?", (name,))
        conn.execute("DELETE FROM collections WHERE name = ?", (name,))
        self.cache.drop(name)
        return n

    # -- reads used by writers ---------------------------------------------------------

    def hashes(self, conn: sqlite3.Connection, collection: str, ids: Sequence[Any]) -> dict[Any, str]:
        out: dict[Any, str] = {}
        for part in _parts(ids):
            q = f"SELECT id, text_hash FROM items WHERE collection = ? AND chunk IN (0, 1) AND id IN ({','.join('?' * len(part))})"
            out.update(conn.execute(q, [collection, *part]).fetchall())
        return out

    def known_vectors(self, conn: sqlite3.Connection, model: str, dims: int, hashes: Iterable[str]) -> dict[str, np.ndarray]:
        """Vectors already stored for these text hashes (whole texts, same model and dims), dequantized.

        The store doubles as the embedding cache: a text embedded once is not embedded again.
        """
        out: dict[str, np.ndarray] = {}
        infos: dict[str, _Info] = {}
        for part in _parts(list(set(hashes))):
            rows = conn.execute(
                "SELECT i.text_hash, i.collection, i.i8, i.f32 FROM items i JOIN collections c ON c.name = i.collection "
                f"WHERE c.model = ? AND c.dims = ? AND i.chunk = 0 AND i.text_hash IN ({','.join('?' * len(part))})",
                [model, dims, *part]).fetchall()
            for h, coll, i8, f32 in rows:
                if h in out:
                    continue
                if f32 is not None:
                    out[h] = np.frombuffer(f32, "<f4").astype(np.float32)
                    continue
                info = infos.get(coll) or infos.setdefault(coll, self.info(coll, conn))
                out[h] = info.calibration.dequantize(np.frombuffer(i8, np.int8)[None, :])[0]
        return out

    # -- writes (inside the caller's transaction) --------------------------------------

    def _bump(self, conn: sqlite3.Connection, collection: str) -> int:
        conn.execute("UPDATE collections SET version = version + 1 WHERE name = ?", (collection,))
        return conn.execute("SELECT version FROM collections WHERE name = ?", (collection,)).fetchone()[0]

    def put(self, conn: sqlite3.Connection, collection: str, items: Sequence[Item], ranges: Ranges | None = None) -> None:
        """Insert or replace items; an id written here loses any chunks it had beyond the new ones.

        ``ranges``: the model's int8 ranges, which a collection's first calibration
        fixes (without them, a store used on its own widens its first batch's).
        """
        if not items:
            return
        info = self.info(collection, conn)
        vecs = np.stack([np.asarray(it.vector, np.float32) for it in items])
        if vecs.shape[1] != info.dims:
            raise CollectionMismatch(f"collection {collection!r} holds {info.dims}-dim vectors, not {vecs.shape[1]}")
        version = self._bump(conn, collection)
        cal = info.calibration
        if cal is None or cal.count < RECALIBRATE_UNTIL:
            count = conn.execute("SELECT COUNT(*) FROM items WHERE collection = ?", (collection,)).fetchone()[0]
            if cal is None or count + len(items) >= 2 * cal.count:
                cal = self._recalibrate(conn, info, vecs, version, ranges, count)
        codes, bits = cal.encode(vecs)
        last_chunk: dict[Any, int] = {}
        for it in items:
            last_chunk[it.id] = max(last_chunk.get(it.id, 0), it.chunk)
        # A chunked item (chunks 1..n) loses its whole-text row 0 too, and a whole one its chunks.
        conn.executemany("DELETE FROM items WHERE collection = ? AND id = ? AND (chunk > ? OR (chunk = 0 AND ? > 0))",
                         [(collection, i, c, c) for i, c in last_chunk.items()])
        conn.executemany(
            "INSERT INTO items (collection, id, chunk, text_hash, bin, i8, f32, metadata, origin, seen, ver, text) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (collection, id, chunk) DO UPDATE SET "
            "text_hash = excluded.text_hash, bin = excluded.bin, i8 = excluded.i8, f32 = excluded.f32, "
            "metadata = excluded.metadata, origin = excluded.origin, seen = excluded.seen, ver = excluded.ver, "
            "text = excluded.text",
            [(collection, it.id, it.chunk, it.text_hash, bits[k].tobytes(), codes[k].tobytes(),
              np.ascontiguousarray(vecs[k], "<f4").tobytes() if info.float_vectors else None,
              it.metadata, it.origin, it.seen, version, it.text if info.store_text and it.chunk <= 1 else None)
             for k, it in enumerate(items)],
        )
        self._put_lexical(conn, collection, items)

    def _put_lexical(self, conn: sqlite3.Connection, collection: str, items: Sequence[Item]) -> None:
        """The written items' postings: each first row indexed with its text (one text per item, chunked or not)."""
        docs: list[tuple[int, str, str]] = []
        unknown: list[tuple[int, str]] = []
        for it in items:
            if it.chunk > 1:
                continue
            row = conn.execute("SELECT rowid FROM items WHERE collection = ? AND id = ? AND chunk = ?",
                               (collection, it.id, it.chunk)).fetchone()[0]
            text = it.lexical_text if it.lexical_text is not None else it.text
            if text is not None:
                docs.append((row, it.text_hash, text))
            else:
                unknown.append((row, it.text_hash))
        if unknown:  # no text given: keep postings only if they are of this very text
            have = lexical.indexed_rows(conn, [r for r, _ in unknown])
            lexical.remove_rows(conn, [r for r, h in unknown if r in have and have[r] != h])
        lexical.index_docs(conn, collection, docs)

    def index_texts(self, conn: sqlite3.Connection, collection: str, pairs: Sequence[tuple[Any, str]]) -> int:
        """Index items already stored (unchanged texts) whose postings are missing; returns how many were added.

        A re-sent message, or a job's re-run over rows written before the lexical index existed,
        fills the index this way without being embedded again. Only a text whose hash is the
        stored item's is indexed (a chunked item's hash carries its ":c").
        """
        if not pairs:
            return 0
        text_of = dict(pairs)
        docs: list[tuple[int, str, str]] = []
        for part in _parts(list(text_of)):
            for row, item_id, h in conn.execute(
                    f"SELECT rowid, id, text_hash FROM items WHERE collection = ? AND chunk IN (0, 1) "
                    f"AND id IN ({','.join('?' * len(part))})", [collection, *part]):
                text = text_of.get(item_id)
                if text is not None and h in (text_hash(text), text_hash(text) + ":c"):
                    docs.append((row, h, text))
        have = lexical.indexed_rows(conn, [d[0] for d in docs])
        return lexical.index_docs(conn, collection, [d for d in docs if have.get(d[0]) != d[1]])

    def lexical_backfill(self, source_text: SourceText) -> int:
        """Index the items a job wrote before the lexical index existed, from their source rows.

        Run by the job runner at its start (in the background: a source may be slow).
        A source row whose text has changed since is left for the job's next run.
        """
        added = 0
        for (name,) in self.conn.execute("SELECT name FROM collections").fetchall():
            rows = self.conn.execute(
                "SELECT id, origin FROM items WHERE collection = ? AND chunk IN (0, 1) AND origin IS NOT NULL "
                "AND rowid NOT IN (SELECT row FROM lex_docs)", (name,)).fetchall()
            by_origin: dict[str, list[Any]] = {}
            for item_id, origin in rows:
                by_origin.setdefault(origin, []).append(item_id)
            for origin, ids in by_origin.items():
                for part in _parts(ids):
                    texts = source_text(origin, part)
                    if texts:
                        with transaction(self.conn):
                            added += self.index_texts(self.conn, name, list(texts.items()))
        return added

    def lexical_search(self, collection: str, query: str, n: int = 10,
                       allowed: np.ndarray | None = None) -> list[tuple[int, float, list[str]]]:
        """BM25 top n of a collection for a query: (rowid, score, matched query terms), best first.

        The query has no syntax (quotes, ``*``, ``-``, ``NEAR``... are text); see daemon/lexical.py.
        An unknown collection raises UnknownCollection; one without a lexical index gives [].
        """
        self.info(collection)
        with _snapshot(self.conn):
            return lexical.search(self.conn, collection, query, n, allowed)

    def lexical_candidates(self, collection: str, query: lexical.Query, n: int, allowed: np.ndarray | None = None,
                           vectors: bool = True) -> tuple[list[tuple[int, Any, float, list[str]]], np.ndarray | None,
                                                          dict[str, float]]:
        """The lexical side of a hybrid search, read in one snapshot.

        Returns the BM25 top ``n`` as (rowid, id, bm25, matched terms); with ``vectors``, the
        rows' dequantized int8 vectors (so a message only the lexical side found is ranked by
        its cosine too, on the vector side's scale, once the query's vector is there); and
        each query term's IDF in this collection (a term no item holds: the rarest possible).
        """
        info = self.info(collection)
        with _snapshot(self.conn):
            found = lexical.search(self.conn, collection, query, n, allowed)
            n_docs = lexical.stats(self.conn, collection)[0]
            dfs = lexical.document_frequencies(self.conn, collection, query.terms)
            idfs = {t: lexical.idf(n_docs, dfs.get(t, 0)) for t in query.terms}
            if not found:
                return [], None, idfs
            rows = np.array([r for r, _, _ in found], np.int64)
            mat = None
            if vectors and info.calibration is not None:
                ids, codes = self._column(rows, "id", "i8")
                mat = info.calibration.dequantize(np.frombuffer(b"".join(codes), np.int8).reshape(len(rows), info.dims))
            else:
                ids = self._column(rows, "id")
        return [(r, i, sc, t) for (r, sc, t), i in zip(found, ids)], mat, idfs

    def matching_rows(self, collection: str, filter: dict[str, Any]) -> np.ndarray:
        """Rowids of the collection's rows whose metadata has these key/values (``search``'s ``filter``)."""
        return self._matching(collection, filter)

    def rows_to_hits(self, collection: str, rows: Sequence[int], scores: Sequence[float] | None = None,
                     with_text: bool = False, source_text: SourceText | None = None) -> list[dict[str, Any]]:
        """Hits for rowids (e.g. :meth:`lexical_search`'s), in their order, shaped as :meth:`search` makes them.

        ``{"id", "score", "metadata"}`` and, with ``with_text``, ``"text"`` (stored, or read from
        the item's job source by ``source_text``). A row deleted meanwhile is left out.
        """
        rows = [int(r) for r in rows]
        found: dict[int, tuple] = {}
        with _snapshot(self.conn):
            for part in _parts(rows):
                for r in self.conn.execute(f"SELECT rowid, id, metadata, text, origin FROM items WHERE +collection = ? "
                                           f"AND rowid IN ({','.join('?' * len(part))})", [collection, *part]):
                    found[r[0]] = r[1:]
        hits = []
        for k, r in enumerate(rows):
            if r not in found:
                continue
            item_id, meta, text, origin = found[r]
            hit = {"id": item_id, "score": None if scores is None else round(float(scores[k]), 6),
                   "metadata": json.loads(meta) if meta else None}
            if with_text:
                hit["text"], hit["_origin"] = text, origin
            hits.append(hit)
        if with_text:
            self._texts_from_sources(hits, source_text)
        return hits

    def _recalibrate(self, conn: sqlite3.Connection, info: _Info, new: np.ndarray, version: int,
                     ranges: Ranges | None, n_old: int) -> Calibration:
        """The binary code's mean and rotation refitted to every vector so far; binary codes rewritten.

        The int8 ranges are fixed when a collection is first calibrated (the
        model's, see calibration.py), so int8 codes never change and the vectors
        the fit reads back from them are as good as the first time: no error of
        an early, small fit is baked in, whatever the order and batch size of
        the writes. The stored vectors are read a slice at a time, twice (the
        mean and the fit's sample, then the new binary codes), so a refit holds
        the ITQ sample and one slice, not the collection: it runs each time a
        collection doubles, up to 65,536 items.
        """
        if info.calibration is not None:
            lo, hi = info.calibration.lo, info.calibration.hi
        elif ranges is not None:
            lo, hi = ranges
        else:
            lo, hi = new.min(axis=0), new.max(axis=0)
            lo, hi = lo - (hi - lo) * RANGE_MARGIN, hi + (hi - lo) * RANGE_MARGIN
        n = n_old + len(new)  # n_old: the collection's stored rows, which the caller has counted
        rng, picks = itq_sample(n) if n >= ITQ_MIN else (None, np.zeros(0, np.int64))
        sample = np.empty((len(picks), info.dims), np.float32)
        total = np.zeros(info.dims, np.float64)
        position = 0
        for part in self._stored_slices(conn, info):
            total += part.vectors.sum(axis=0, dtype=np.float64)
            _gather(sample, picks, position, part.vectors)
            position += len(part.vectors)
        total += new.sum(axis=0, dtype=np.float64)
        _gather(sample, picks, position, np.asarray(new, np.float32))
        mean = (total / n).astype(np.float32)
        rotation = None
        if rng is not None:
            sample -= mean
            rotation = itq_rotation(rng, sample)
        cal = Calibration(np.asarray(lo, np.float32), np.asarray(hi, np.float32), mean, rotation, n)
        for part in self._stored_slices(conn, info):
            _, bits = cal.encode(part.vectors)  # int8 codes are unchanged: the ranges are
            conn.executemany("UPDATE items SET bin = ?, ver = ? WHERE rowid = ?",
                             [(bits[k].tobytes(), version, rowid) for k, rowid in enumerate(part.rowids)])
        blobs = cal.to_blobs()
        conn.execute("UPDATE collections SET lo = ?, hi = ?, mean = ?, rotation = ?, calib_count = ?, "
                     "calib_version = calib_version + 1 WHERE name = ?",
                     (blobs["lo"], blobs["hi"], blobs["mean"], blobs["rotation"], blobs["calib_count"], info.name))
        return cal

    def _stored_slices(self, conn: sqlite3.Connection, info: _Info) -> Iterator[_Slice]:
        """A collection's stored vectors, ``_REFIT_SLICE`` rows at a time in key order (keyset paging
        on the primary key, so updating a slice's codes does not move the next)."""
        after: tuple[Any, int] | None = None
        while True:
            if after is None:
                rows = conn.execute("SELECT rowid, i8, f32, id, chunk FROM items WHERE collection = ? "
                                    "ORDER BY id, chunk LIMIT ?", (info.name, _REFIT_SLICE)).fetchall()
            else:
                rows = conn.execute("SELECT rowid, i8, f32, id, chunk FROM items WHERE collection = ? "
                                    "AND (id, chunk) > (?, ?) ORDER BY id, chunk LIMIT ?",
                                    (info.name, *after, _REFIT_SLICE)).fetchall()
            if not rows:
                return
            after = (rows[-1][3], rows[-1][4])
            if info.float_vectors:
                vectors = np.stack([np.frombuffer(r[2], "<f4") for r in rows]).astype(np.float32)
            else:
                vectors = info.calibration.dequantize(np.stack([np.frombuffer(r[1], np.int8) for r in rows]))
            yield _Slice([r[0] for r in rows], vectors)

    def delete(self, conn: sqlite3.Connection, collection: str, ids: Sequence[Any]) -> int:
        self.info(collection, conn)
        self._bump(conn, collection)
        n = 0
        for part in _parts(ids):
            n += conn.execute(f"DELETE FROM items WHERE collection = ? AND id IN ({','.join('?' * len(part))})",
                              [collection, *part]).rowcount
        return n

    def set_metadata(self, conn: sqlite3.Connection, collection: str, pairs: Sequence[tuple[Any, str | None]]) -> None:
        """New metadata (JSON text) for items whose text is unchanged: no codes change."""
        conn.executemany("UPDATE items SET metadata = ? WHERE collection = ? AND id = ?",
                         [(meta, collection, item_id) for item_id, meta in pairs])

    def mark_seen(self, conn: sqlite3.Connection, collection: str, ids: Sequence[Any], seen: int) -> None:
        conn.executemany("UPDATE items SET seen = ? WHERE collection = ? AND id = ?", [(seen, collection, i) for i in ids])

    def sweep(self, conn: sqlite3.Connection, collection: str, origin: str, seen: int) -> int:
        """Delete the items of ``origin`` that the run ``seen`` did not see in its source."""
        self._bump(conn, collection)
        cur = conn.execute("DELETE FROM items WHERE collection = ? AND origin = ? AND (seen IS NULL OR seen != ?)",
                           (collection, origin, seen))
        return cur.rowcount

    # -- reads -----------------------------------------------------------------------

    def search(self, collection: str, query: np.ndarray, k: int = 10, rescore_multiplier: int | None = None,
               filter: dict[str, Any] | None = None, exclude: Sequence[Any] = (), rescore: bool = True,
               info: _Info | None = None, with_text: bool = False,
               source_text: SourceText | None = None) -> list[dict[str, Any]]:
        """The k items nearest to a unit ``query``: Hamming top k × multiplier, rescored with int8.

        ``rescore=False`` ranks by Hamming distance alone (score: 1 − 2·hamming/dims).
        An item's score is its best chunk's. ``filter`` keeps items whose metadata has
        these key/values; ``exclude`` drops ids (evaluation: a query is not its own neighbour).
        ``with_text`` adds each hit's ``text``: the stored one (``store_text``
        collections), else what ``source_text`` reads from the item's origin (a
        job's source table), else None.
        """
        with _snapshot(self.conn):
            hits = self._search(collection, query, k, rescore_multiplier, filter, exclude, rescore, info, with_text)
        if with_text:
            self._texts_from_sources(hits, source_text)
        return hits

    def _texts_from_sources(self, hits: list[dict[str, Any]], source_text: SourceText | None) -> None:
        """Fill in the texts that live in a job's source table (read after the snapshot: another file)."""
        by_origin: dict[str, list[dict[str, Any]]] = {}
        for hit in hits:
            origin = hit.pop("_origin", None)
            if hit["text"] is None and origin is not None and source_text is not None:
                by_origin.setdefault(origin, []).append(hit)
        for origin, group in by_origin.items():
            texts = source_text(origin, [h["id"] for h in group])
            for hit in group:
                hit["text"] = texts.get(hit["id"])

    def _search(self, collection: str, query: np.ndarray, k: int, rescore_multiplier: int | None,
                filter: dict[str, Any] | None, exclude: Sequence[Any], rescore: bool,
                info: _Info | None, with_text: bool = False) -> list[dict[str, Any]]:
        info = info or self.info(collection)
        q = np.asarray(query, np.float32).reshape(-1)
        if q.shape[0] != info.dims:
            raise CollectionMismatch(f"collection {collection!r} holds {info.dims}-dim vectors, query has {q.shape[0]}")
        if info.calibration is None:
            return []
        codes = self.cache.get(self.conn, info)
        blocked = None
        available = len(codes.rowids)
        if filter or len(exclude) or not codes.all_valid:
            blocked = ~codes.valid
            if filter:
                blocked |= ~np.isin(codes.rowids, self._matching(collection, filter))
            if len(exclude):
                blocked |= np.isin(codes.rowids, self._rowids_of(collection, exclude))
            available -= int(blocked.sum())
        mult = DEFAULT_RESCORE if rescore_multiplier is None else rescore_multiplier
        n_cand = min(available, k * mult if rescore else k * 4, MAX_CANDIDATES)
        if n_cand <= 0:
            return []
        picked, picked_dist = nearest(codes.words, words(info.calibration.bits(q[None, :]))[:, 0], n_cand, blocked)
        rowids = codes.rowids[picked]
        if not rescore:
            scores = 1.0 - 2.0 * picked_dist.astype(np.float32) / info.dims
            ids = self._column(rowids, "id")
        else:
            ids, codes_i8 = self._column(rowids, "id", "i8")
            mat = np.frombuffer(b"".join(codes_i8), np.int8).reshape(len(rowids), info.dims)
            scores = info.calibration.dequantize(mat) @ q
        best: dict[Any, tuple[float, int]] = {}  # per item its best chunk
        for item_id, r, sc in zip(ids, rowids.tolist(), scores.tolist()):
            if item_id not in best or sc > best[item_id][0]:
                best[item_id] = (sc, r)
        ranked = sorted(best.items(), key=lambda kv: -kv[1][0])[:k]
        rows = np.array([r for _, (_, r) in ranked], np.int64)
        meta = dict(zip(rows.tolist(), self._column(rows, "metadata")))
        hits = [{"id": item_id, "score": round(sc, 6), "metadata": json.loads(meta[r]) if meta[r] else None}
                for item_id, (sc, r) in ranked]
        if with_text:
            texts = self._texts(collection, [h["id"] for h in hits])
            for hit in hits:
                hit["text"], hit["_origin"] = texts.get(hit["id"], (None, None))
        return hits

    def search_texts(self, collection: str, ids: Sequence[Any], source_text: SourceText | None = None) -> dict[Any, str | None]:
        """id → text of items, as ``with_text`` gives it (stored, else read by ``source_text`` from the item's source)."""
        with _snapshot(self.conn):
            hits = [{"id": i, "text": t, "_origin": o} for i, (t, o) in self._texts(collection, ids).items()]
        self._texts_from_sources(hits, source_text)
        return {h["id"]: h["text"] for h in hits}

    def _texts(self, collection: str, ids: Sequence[Any]) -> dict[Any, tuple[str | None, str | None]]:
        """id → (stored text, origin) of whole items (a chunked item's text is on its first window)."""
        out: dict[Any, tuple[str | None, str | None]] = {}
        for part in _parts(list(ids)):
            for item_id, text, origin in self.conn.execute(
                    f"SELECT id, text, origin FROM items WHERE collection = ? AND chunk IN (0, 1) "
                    f"AND id IN ({','.join('?' * len(part))})", [collection, *part]):
                out[item_id] = (text, origin)
        return out

    def _column(self, rowids: np.ndarray, *cols: str) -> Any:
        """Columns of the rows with these rowids, in the rowids' order (one list per column)."""
        found: dict[int, tuple] = {}
        for part in _parts(rowids.tolist()):
            sql = f"SELECT rowid, {', '.join(cols)} FROM items WHERE rowid IN ({','.join('?' * len(part))})"
            found.update((row[0], row[1:]) for row in self.conn.execute(sql, part))
        values = [found[r] for r in rowids.tolist()]
        out = [[v[i] for v in values] for i in range(len(cols))]
        return out[0] if len(cols) == 1 else out

    def _matching(self, collection: str, filter: dict[str, Any]) -> np.ndarray:
        where, params = [], [collection]
        for key, value in filter.items():
            if not isinstance(key, str) or isinstance(value, (dict, list)):
                raise InvalidInput("filter must map metadata keys to plain values (str, number, bool, null)")
            path = '$."' + key.replace('"', '\\"') + '"'
            if value is None:
                where.append("json_extract(metadata, ?) IS NULL")
                params.append(path)
            else:
                where.append("json_extract(metadata, ?) = ?")
                params += [path, int(value) if isinstance(value, bool) else value]
        sql = f"SELECT rowid FROM items WHERE collection = ? AND {' AND '.join(where)}"
        return np.array([r[0] for r in self.conn.execute(sql, params)], np.int64)

    def _rowids_of(self, collection: str, ids: Sequence[Any]) -> np.ndarray:
        out: list[int] = []
        for part in _parts(list(ids)):
            out += [r[0] for r in self.conn.execute(
                f"SELECT rowid FROM items WHERE collection = ? AND id IN ({','.join('?' * len(part))})", [collection, *part])]
        return np.array(out, np.int64)


def _lexical_state(items: int, docs: int) -> str:
    if docs >= items:
        return "ready"
    return "missing" if docs == 0 else "partial"


@contextmanager
def _snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """One read transaction: the collection's calibration, codes and rows seen at one instant."""
    if conn.in_transaction:
        yield
        return
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("COMMIT")


def _parts(values: Sequence[Any], size: int = 500) -> Iterator[list[Any]]:
    for i in range(0, len(values), size):
        yield list(values[i : i + size])
