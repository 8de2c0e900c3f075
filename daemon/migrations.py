"""index.db's schema: an ordered list of migrations, applied once each.

``PRAGMA user_version`` (a number in the file's header) is how many of
:data:`MIGRATIONS` the database has had. :func:`migrate` brings a database up to
date: each pending migration runs in its own ``BEGIN IMMEDIATE`` transaction
together with the new ``user_version``, so a failed one leaves the database as it
was, and another connection that waited for the lock finds the work done and
skips it (the daemon opens several connections on the same file at start). On an
up-to-date database it reads the header and nothing else: no DDL, no write, so
opening is cheap and works on a read-only connection. A database whose version
is higher than this code knows (written by a newer pocketembed) is refused with
:class:`SchemaTooNew`, an ``sqlite3.DatabaseError`` (the daemon reports it as
the store being unavailable and keeps embedding), before anything is written.

To change the schema, append a migration; never edit one that has shipped (a
database that has it will not run it again). A migration is plain SQL on the
caller's connection, inside the transaction: no helper that commits by itself.

Why not sqlite-utils' ``Migrations`` (4.x): it records applied migrations by name
in a table and skips names it does not know, so a database from a newer release
opens as if current; and it reads which have run before taking the write lock, so
of two connections opening a new database at once the second runs the first
migration again and fails.

Migration 1 is the schema as it was made before there were versions (every open
created missing tables with ``CREATE TABLE IF NOT EXISTS`` and added missing
columns), so it turns any such database, an empty one included, into today's:
it creates what is missing, adds the columns later releases added (existing rows
get their defaults), measures the queue rows an older daemon queued, indexes the
stored texts of a database made before the lexical index, and drops the
``schema_migrations`` table that recorded that last step.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from typing import NamedTuple

from . import lexical

log = logging.getLogger("pocketembed.migrations")


class SchemaTooNew(sqlite3.DatabaseError):
    """The database was written by a newer pocketembed: its schema version is past this code's."""


class Migration(NamedTuple):
    name: str
    apply: Callable[[sqlite3.Connection], None]


# -- 1: the schema as of the first versioned release -----------------------------------------
# The DDL the unversioned releases made with sqlite-utils, verbatim (a new index.db and an upgraded
# one get the same tables). items.id is BLOB-affinity: integers stay integers, text stays text, as
# the caller gave them. Every deleted item leaves a tombstone stamped with its collection's write
# version (trigger items_deleted), so a search cache, in this process or another, can drop it
# without reloading everything; the lexical tables are daemon/lexical.py's.

_TABLES = (
    """CREATE TABLE IF NOT EXISTS "collections" (
   "name" TEXT PRIMARY KEY,
   "model" TEXT NOT NULL,
   "dims" INTEGER NOT NULL,
   "created" REAL,
   "float_vectors" INTEGER DEFAULT 0,
   "store_text" INTEGER DEFAULT 0,
   "uid" TEXT,
   "version" INTEGER DEFAULT 0,
   "calib_version" INTEGER DEFAULT 0,
   "calib_count" INTEGER,
   "lo" BLOB,
   "hi" BLOB,
   "mean" BLOB,
   "rotation" BLOB
)""",
    """CREATE TABLE IF NOT EXISTS "items" (
   "collection" TEXT REFERENCES "collections"("name"),
   "id" BLOB,
   "chunk" INTEGER,
   "text_hash" TEXT NOT NULL,
   "bin" BLOB NOT NULL,
   "i8" BLOB NOT NULL,
   "f32" BLOB,
   "metadata" TEXT,
   "origin" TEXT,
   "seen" INTEGER,
   "ver" INTEGER,
   "text" TEXT,
   PRIMARY KEY ("collection", "id", "chunk")
)""",
    """CREATE TABLE IF NOT EXISTS "tombstones" (
   "collection" TEXT,
   "row" INTEGER,
   "ver" INTEGER
)""",
    """CREATE TABLE IF NOT EXISTS "jobs" (
   "id" INTEGER PRIMARY KEY,
   "state" TEXT NOT NULL,
   "reason" TEXT,
   "error" TEXT,
   "db" TEXT NOT NULL,
   "table_name" TEXT NOT NULL,
   "id_column" TEXT NOT NULL,
   "text_column" TEXT NOT NULL,
   "where_sql" TEXT,
   "collection" TEXT NOT NULL,
   "model" TEXT NOT NULL,
   "truncate" INTEGER,
   "created" REAL,
   "started" REAL,
   "finished" REAL,
   "updated" REAL,
   "total" INTEGER,
   "cursor" BLOB,
   "phase" TEXT DEFAULT 'scan',
   "active_s" REAL DEFAULT 0.0,
   "scanned" INTEGER DEFAULT 0,
   "embedded" INTEGER DEFAULT 0,
   "unchanged" INTEGER DEFAULT 0,
   "skipped" INTEGER DEFAULT 0,
   "failed" INTEGER DEFAULT 0,
   "deleted" INTEGER DEFAULT 0,
   "kind" TEXT NOT NULL DEFAULT 'table',
   "queue_rows" INTEGER NOT NULL DEFAULT 0,
   "queue_bytes" INTEGER NOT NULL DEFAULT 0
)""",
    """CREATE TABLE IF NOT EXISTS "job_errors" (
   "job" INTEGER REFERENCES "jobs"("id"),
   "row_id" BLOB,
   "code" TEXT,
   "message" TEXT,
   "at" REAL,
   PRIMARY KEY ("job", "row_id")
)""",
    """CREATE TABLE IF NOT EXISTS "queue_items" (
   "seq" INTEGER PRIMARY KEY,
   "job" INTEGER REFERENCES "jobs"("id"),
   "id" BLOB,
   "op" TEXT,
   "text" TEXT,
   "metadata" TEXT,
   "bytes" INTEGER NOT NULL DEFAULT 0
)""",
    """CREATE TABLE IF NOT EXISTS lex_collections (
    cid INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, salt BLOB NOT NULL,
    n INTEGER NOT NULL DEFAULT 0, total_len INTEGER NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS lex_terms (
    tid INTEGER PRIMARY KEY, cid INTEGER NOT NULL, h INTEGER NOT NULL, df INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS lex_docs (
    row INTEGER PRIMARY KEY, cid INTEGER NOT NULL, length INTEGER NOT NULL, hash TEXT, tids TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS lex_postings (
    tid INTEGER NOT NULL, row INTEGER NOT NULL, tf INTEGER NOT NULL, dl INTEGER NOT NULL,
    PRIMARY KEY (tid, row)) WITHOUT ROWID""",
)

_ADDED_COLUMNS = {
    # Columns that releases before versioning added to an existing database (ALTER TABLE ... ADD COLUMN).
    # uid tells a collection from an earlier one of the same name (dropped, made again). queue_items holds
    # what index.enqueue handed over and no chunk has applied yet; its bytes, and per job the running sums
    # of its waiting rows (queue_rows, queue_bytes), are kept in every transaction that adds or removes
    # queue rows: index.enqueue checks its caps without scanning the queue.
    "collections": {"store_text": "INTEGER NOT NULL DEFAULT 0", "uid": "TEXT NOT NULL DEFAULT ''"},
    "items": {"text": "TEXT"},
    "jobs": {"kind": "TEXT NOT NULL DEFAULT 'table'", "queue_rows": "INTEGER NOT NULL DEFAULT 0",
             "queue_bytes": "INTEGER NOT NULL DEFAULT 0"},
    "queue_items": {"bytes": "INTEGER NOT NULL DEFAULT 0"},
}

_INDEXES_AND_TRIGGERS = (
    """CREATE INDEX IF NOT EXISTS "idx_items_collection_origin_seen"
    ON "items" ("collection", "origin", "seen")""",
    """CREATE INDEX IF NOT EXISTS "idx_items_collection_ver"
    ON "items" ("collection", "ver")""",
    """CREATE INDEX IF NOT EXISTS "idx_items_text_hash"
    ON "items" ("text_hash")""",
    """CREATE INDEX IF NOT EXISTS "idx_tombstones_collection_ver"
    ON "tombstones" ("collection", "ver")""",
    """CREATE INDEX IF NOT EXISTS "idx_queue_items_job_seq"
    ON "queue_items" ("job", "seq")""",
    """CREATE UNIQUE INDEX IF NOT EXISTS lex_terms_h ON lex_terms (cid, h)""",
    """CREATE TRIGGER IF NOT EXISTS items_deleted AFTER DELETE ON items BEGIN INSERT INTO tombstones (collection, row, ver) SELECT old.collection, old.rowid, version FROM collections WHERE name = old.collection; END""",
    """CREATE TRIGGER IF NOT EXISTS lex_docs_deleted AFTER DELETE ON lex_docs
WHEN EXISTS (SELECT 1 FROM lex_collections WHERE cid = old.cid) BEGIN
    DELETE FROM lex_postings WHERE tid IN (SELECT value FROM json_each(old.tids)) AND row = old.row;
    UPDATE lex_terms SET df = df - 1 WHERE tid IN (SELECT value FROM json_each(old.tids));
    DELETE FROM lex_terms WHERE tid IN (SELECT value FROM json_each(old.tids)) AND df <= 0;
    UPDATE lex_collections SET n = n - 1, total_len = total_len - old.length WHERE cid = old.cid;
END""",
    """CREATE TRIGGER IF NOT EXISTS items_lex_deleted AFTER DELETE ON items BEGIN
    DELETE FROM lex_docs WHERE row = old.rowid;
END""",
)

_LEXICAL_STEP = "lexical-1: index stored texts"
"""The one data migration of the unversioned releases, recorded in their ``schema_migrations`` table."""


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')}


def _baseline(conn: sqlite3.Connection) -> None:
    had_queue_sizes = "queue_bytes" in _columns(conn, "jobs")
    had_jobs = bool(_columns(conn, "jobs"))
    for stmt in _TABLES:
        conn.execute(stmt)
    for table, columns in _ADDED_COLUMNS.items():
        have = _columns(conn, table)
        for name, decl in columns.items():
            if name not in have:
                conn.execute(f'ALTER TABLE "{table}" ADD COLUMN "{name}" {decl}')
    if had_jobs and not had_queue_sizes:  # what an older daemon queued, measured once
        from .jobs import QUEUE_ROW_BYTES

        conn.execute(f"UPDATE queue_items SET bytes = {QUEUE_ROW_BYTES} + length(CAST(id AS BLOB)) "
                     "+ coalesce(length(CAST(text AS BLOB)), 0) + coalesce(length(CAST(metadata AS BLOB)), 0)")
        conn.execute("UPDATE jobs SET queue_rows = (SELECT COUNT(*) FROM queue_items q WHERE q.job = jobs.id), "
                     "queue_bytes = (SELECT coalesce(SUM(bytes), 0) FROM queue_items q WHERE q.job = jobs.id) "
                     "WHERE kind = 'queue'")
    for stmt in _INDEXES_AND_TRIGGERS:
        conn.execute(stmt)
    recorded = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'").fetchone()
    if not (recorded and conn.execute("SELECT 1 FROM schema_migrations WHERE name = ?", (_LEXICAL_STEP,)).fetchone()):
        _lexical_from_stored_text(conn)
    conn.execute("DROP TABLE IF EXISTS schema_migrations")


def _lexical_from_stored_text(conn: sqlite3.Connection) -> None:
    """Build the lexical index of items whose text is stored (store_text collections of an older index.db).

    The others (store_text off) say ``lexical: "missing"`` until their texts come back: a table
    job's source rows (``Store.lexical_backfill``, run by the job runner), or an app
    re-sending its messages (unchanged texts are indexed without being embedded again).
    """
    for (name,) in conn.execute("SELECT name FROM collections").fetchall():
        rows = conn.execute("SELECT rowid, text_hash, text FROM items WHERE collection = ? AND chunk IN (0, 1) "
                            "AND text IS NOT NULL AND rowid NOT IN (SELECT row FROM lex_docs)", (name,)).fetchall()
        lexical.index_docs(conn, name, rows)


MIGRATIONS: list[Migration] = [
    Migration("baseline: the unversioned schema, completed", _baseline),
]
"""Append only: migration i (from 1) takes a database from user_version i-1 to i."""

VERSION = len(MIGRATIONS)


def version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def _check(found: int) -> None:
    if found > len(MIGRATIONS):
        raise SchemaTooNew(f"the index database has schema version {found}, newer than this pocketembed's "
                           f"{len(MIGRATIONS)}: it was written by a newer release; upgrade pocketembed "
                           "(or move index.db aside to start an empty index)")


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the pending migrations (none: a header read, nothing written); returns the version reached.

    ``conn`` must not be inside a transaction (each migration brackets itself). Raises
    :class:`SchemaTooNew` for a database from a newer release.
    """
    from .store import transaction

    found = version(conn)
    _check(found)
    for target in range(found + 1, len(MIGRATIONS) + 1):
        step = MIGRATIONS[target - 1]
        t0 = time.perf_counter()
        with transaction(conn):
            now = version(conn)
            _check(now)
            if now >= target:
                continue  # another connection applied it while this one waited for the lock
            step.apply(conn)
            conn.execute(f"PRAGMA user_version = {target}")
        log.info("index.db migration %d applied (%s) in %.2f s", target, step.name, time.perf_counter() - t0)
    return max(found, len(MIGRATIONS))
