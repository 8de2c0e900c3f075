"""The vector store: named collections of embedded items in one SQLite file.

The store and the job queue share one database file (``<home>/index.db``, WAL),
so that a job writes vectors and advances its cursor in one transaction: a
kill -9 at any moment leaves either both or neither. Every write method here
therefore takes the caller's connection and never commits on its own; the
caller brackets it with :func:`transaction`.

sqlite-utils creates the schema; writes are plain SQL because its insert
helpers commit by themselves, which would split the job's transaction.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sqlite_utils

from pocketembed.errors import CollectionMismatch, UnknownCollection


def db_path(home: Path) -> Path:
    return home / "index.db"


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, waiting on locks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def text_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


@dataclass
class Item:
    id: Any
    text_hash: str
    vector: np.ndarray
    metadata: str | None = None
    origin: str | None = None
    """Which job source wrote it (the sweep of deleted rows only touches its own)."""
    seen: int | None = None
    """The job run that last saw it in its source."""


def create_schema(conn: sqlite3.Connection) -> None:
    db = sqlite_utils.Database(conn)
    db["collections"].create({"name": str, "model": str, "dims": int, "created": float},
                             pk="name", not_null={"model", "dims"}, if_not_exists=True)
    # id is BLOB-affinity: integers stay integers, text stays text, as the source had them.
    db["items"].create({"collection": str, "id": bytes, "text_hash": str, "vector": bytes, "metadata": str,
                        "origin": str, "seen": int},
                       pk=("collection", "id"), not_null={"text_hash", "vector"},
                       foreign_keys=[("collection", "collections", "name")], if_not_exists=True)
    db["items"].create_index(["collection", "origin", "seen"], if_not_exists=True)


class Store:
    """Collections bound to a model and dims; items keyed by (collection, id)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        create_schema(conn)

    def ensure_collection(self, conn: sqlite3.Connection, name: str, model: str, dims: int) -> None:
        row = conn.execute("SELECT model, dims FROM collections WHERE name = ?", (name,)).fetchone()
        if row is None:
            conn.execute("INSERT INTO collections (name, model, dims, created) VALUES (?, ?, ?, ?)",
                         (name, model, dims, time.time()))
        elif (row[0], row[1]) != (model, dims):
            raise CollectionMismatch(f"collection {name!r} holds {row[0]} vectors of {row[1]} dims, "
                                     f"not {model} / {dims}; use another collection or drop it")

    def collection(self, name: str) -> dict[str, Any]:
        row = self.conn.execute("SELECT name, model, dims, created FROM collections WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise UnknownCollection(f"no collection named {name!r}")
        count = self.conn.execute("SELECT COUNT(*) FROM items WHERE collection = ?", (name,)).fetchone()[0]
        return {"name": row[0], "model": row[1], "dims": row[2], "created": row[3], "count": count}

    def collections(self) -> list[dict[str, Any]]:
        names = [r[0] for r in self.conn.execute("SELECT name FROM collections ORDER BY name")]
        return [self.collection(n) for n in names]

    def hashes(self, conn: sqlite3.Connection, collection: str, ids: Sequence[Any]) -> dict[Any, str]:
        out: dict[Any, str] = {}
        for i in range(0, len(ids), 500):
            part = list(ids[i : i + 500])
            q = f"SELECT id, text_hash FROM items WHERE collection = ? AND id IN ({','.join('?' * len(part))})"
            out.update(conn.execute(q, [collection, *part]).fetchall())
        return out

    def put(self, conn: sqlite3.Connection, collection: str, items: Sequence[Item]) -> None:
        conn.executemany(
            "INSERT INTO items (collection, id, text_hash, vector, metadata, origin, seen) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (collection, id) DO UPDATE SET text_hash = excluded.text_hash, vector = excluded.vector, "
            "metadata = excluded.metadata, origin = excluded.origin, seen = excluded.seen",
            [(collection, it.id, it.text_hash, np.ascontiguousarray(it.vector, dtype="<f4").tobytes(), it.metadata,
              it.origin, it.seen) for it in items],
        )

    def mark_seen(self, conn: sqlite3.Connection, collection: str, ids: Sequence[Any], seen: int) -> None:
        conn.executemany("UPDATE items SET seen = ? WHERE collection = ? AND id = ?", [(seen, collection, i) for i in ids])

    def sweep(self, conn: sqlite3.Connection, collection: str, origin: str, seen: int) -> int:
        """Delete the items of ``origin`` that the run ``seen`` did not see in its source."""
        cur = conn.execute("DELETE FROM items WHERE collection = ? AND origin = ? AND (seen IS NULL OR seen != ?)",
                           (collection, origin, seen))
        return cur.rowcount

    def ids(self, collection: str) -> list[Any]:
        return [r[0] for r in self.conn.execute("SELECT id FROM items WHERE collection = ? ORDER BY id", (collection,))]

    def vectors(self, collection: str) -> tuple[list[Any], np.ndarray]:
        rows = self.conn.execute("SELECT id, vector FROM items WHERE collection = ? ORDER BY id", (collection,)).fetchall()
        dims = self.collection(collection)["dims"]
        mat = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), dims) if rows else np.zeros((0, dims), np.float32)
        return [r[0] for r in rows], mat
