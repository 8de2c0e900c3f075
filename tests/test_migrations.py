"""index.db's versioned schema (daemon/migrations.py): old files upgrade and lose nothing, new ones get it all.

No model: the databases are made here with the DDL the unversioned releases left in
index.db (copied below as fixtures, as sqlite-utils and ALTER TABLE wrote it), filled
with rows by plain SQL, then opened with today's Store and JobQueue.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from pathlib import Path

import pytest

from pocketembed.daemon import lexical, migrations
from pocketembed.daemon.jobs import QUEUE_ROW_BYTES, JobQueue
from pocketembed.daemon.migrations import SchemaTooNew
from pocketembed.daemon.store import Store, connect

# The schema of an index.db made by the last unversioned release (user_version 0), as sqlite_master holds it.
UNVERSIONED_DDL = [
    '''CREATE TABLE "collections" (
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
)''',
    '''CREATE TABLE "items" (
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
)''',
    '''CREATE INDEX "idx_items_collection_origin_seen"
    ON "items" ("collection", "origin", "seen")''',
    '''CREATE INDEX "idx_items_collection_ver"
    ON "items" ("collection", "ver")''',
    '''CREATE INDEX "idx_items_text_hash"
    ON "items" ("text_hash")''',
    '''CREATE TABLE "tombstones" (
   "collection" TEXT,
   "row" INTEGER,
   "ver" INTEGER
)''',
    '''CREATE INDEX "idx_tombstones_collection_ver"
    ON "tombstones" ("collection", "ver")''',
    '''CREATE TRIGGER items_deleted AFTER DELETE ON items BEGIN INSERT INTO tombstones (collection, row, ver) '''
    '''SELECT old.collection, old.rowid, version FROM collections WHERE name = old.collection; END''',
    '''CREATE TABLE lex_collections (
    cid INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, salt BLOB NOT NULL,
    n INTEGER NOT NULL DEFAULT 0, total_len INTEGER NOT NULL DEFAULT 0)''',
    '''CREATE TABLE lex_terms (
    tid INTEGER PRIMARY KEY, cid INTEGER NOT NULL, h INTEGER NOT NULL, df INTEGER NOT NULL)''',
    '''CREATE UNIQUE INDEX lex_terms_h ON lex_terms (cid, h)''',
    '''CREATE TABLE lex_docs (
    row INTEGER PRIMARY KEY, cid INTEGER NOT NULL, length INTEGER NOT NULL, hash TEXT, tids TEXT NOT NULL)''',
    '''CREATE TABLE lex_postings (
    tid INTEGER NOT NULL, row INTEGER NOT NULL, tf INTEGER NOT NULL, dl INTEGER NOT NULL,
    PRIMARY KEY (tid, row)) WITHOUT ROWID''',
    '''CREATE TRIGGER lex_docs_deleted AFTER DELETE ON lex_docs
WHEN EXISTS (SELECT 1 FROM lex_collections WHERE cid = old.cid) BEGIN
    DELETE FROM lex_postings WHERE tid IN (SELECT value FROM json_each(old.tids)) AND row = old.row;
    UPDATE lex_terms SET df = df - 1 WHERE tid IN (SELECT value FROM json_each(old.tids));
    DELETE FROM lex_terms WHERE tid IN (SELECT value FROM json_each(old.tids)) AND df <= 0;
    UPDATE lex_collections SET n = n - 1, total_len = total_len - old.length WHERE cid = old.cid;
END''',
    '''CREATE TRIGGER items_lex_deleted AFTER DELETE ON items BEGIN
    DELETE FROM lex_docs WHERE row = old.rowid;
END''',
    '''CREATE TABLE schema_migrations (name TEXT PRIMARY KEY, applied REAL NOT NULL)''',
    '''CREATE TABLE "jobs" (
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
   "deleted" INTEGER DEFAULT 0
, "kind" TEXT NOT NULL DEFAULT 'table', "queue_rows" INTEGER NOT NULL DEFAULT 0, "queue_bytes" INTEGER NOT NULL DEFAULT 0)''',
    '''CREATE TABLE "job_errors" (
   "job" INTEGER REFERENCES "jobs"("id"),
   "row_id" BLOB,
   "code" TEXT,
   "message" TEXT,
   "at" REAL,
   PRIMARY KEY ("job", "row_id")
)''',
    '''CREATE TABLE "queue_items" (
   "seq" INTEGER PRIMARY KEY,
   "job" INTEGER REFERENCES "jobs"("id"),
   "id" BLOB,
   "op" TEXT,
   "text" TEXT,
   "metadata" TEXT
, "bytes" INTEGER NOT NULL DEFAULT 0)''',
    '''CREATE INDEX "idx_queue_items_job_seq"
    ON "queue_items" ("job", "seq")''',
]

LEXICAL_MIGRATION = "lexical-1: index stored texts"


def _without(ddl: list[str], *, tables: tuple[str, ...] = (), columns: tuple[str, ...] = ()) -> list[str]:
    """An older release's DDL: these tables (with their indexes and triggers) and these columns never made."""
    out = []
    for stmt in ddl:
        on = re.search(r'(?:TABLE|ON) "?(\w+)"?', stmt).group(1)
        if on in tables or re.match(r"CREATE TRIGGER (items_lex_deleted|lex_)", stmt) and "lex_docs" in tables:
            continue
        for col in columns:
            stmt, n = re.subn(rf',?\s*"{col}" [A-Z]+( NOT NULL)?( DEFAULT \S+?)?(?=[,\n)])', "", stmt)
            assert n <= 1, (col, stmt)
        out.append(stmt.replace("(\n,", "(\n"))
    return out


LEXICAL_TABLES = ("lex_collections", "lex_terms", "lex_docs", "lex_postings", "schema_migrations")
BEFORE_LEXICAL_AND_QUEUE_SIZES = _without(UNVERSIONED_DDL, tables=LEXICAL_TABLES,
                                          columns=("queue_rows", "queue_bytes", "bytes"))
"""An index.db from before the lexical index and the queue's size accounting."""
OLDEST = _without(UNVERSIONED_DDL, tables=(*LEXICAL_TABLES, "queue_items"),
                  columns=("store_text", "uid", "text", "kind", "queue_rows", "queue_bytes"))
"""An index.db from before stored texts, collection uids and index.enqueue's queue."""


def make_db(path: Path, ddl: list[str]) -> sqlite3.Connection:
    conn = connect(path)
    for stmt in ddl:
        conn.execute(stmt)
    return conn


def insert(conn: sqlite3.Connection, table: str, **values) -> None:
    have = {r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')}
    values = {k: v for k, v in values.items() if k in have}  # an older table lacks the newer columns
    conn.execute(f'INSERT INTO "{table}" ({", ".join(values)}) VALUES ({", ".join("?" * len(values))})',
                 tuple(values.values()))


def fill(conn: sqlite3.Connection) -> None:
    """Rows in every table the database has, as the old code wrote them."""
    insert(conn, "collections", name="notes", model="m:q8_0", dims=8, created=1.5, float_vectors=0, store_text=1,
           uid="u1", version=3, calib_version=0)
    texts = {1: "call the dentist at 0905 551 2233", 2: "dinner with Ann tonight", "x": "parcel code QX-88"}
    for n, (i, text) in enumerate(texts.items()):
        insert(conn, "items", collection="notes", id=i, chunk=0, text_hash=f"h{n}", bin=b"\xaa", i8=bytes(8),
               metadata='{"n": %d}' % n, origin="o" if n else None, seen=n, ver=n + 1, text=text)
    insert(conn, "tombstones", collection="notes", row=99, ver=2)
    insert(conn, "jobs", id=1, state="done", db="/d/sms.db", table_name="messages", id_column="id", text_column="body",
           collection="notes", model="m:q8_0", truncate=1, created=1.0, total=3, scanned=3, embedded=3, kind="table")
    insert(conn, "job_errors", job=1, row_id=7, code="empty_text", message="empty", at=2.0)
    have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "queue_items" in have:
        insert(conn, "jobs", id=2, state="waiting", db="", table_name="", id_column="id", text_column="text",
               collection="notes", model="m:q8_0", truncate=1, created=3.0, kind="queue", queue_rows=2,
               queue_bytes=2 * QUEUE_ROW_BYTES + 8 + 5 + 8)
        insert(conn, "queue_items", seq=1, job=2, id=10, op="put", text="hello", metadata=None,
               bytes=QUEUE_ROW_BYTES + 8 + 5)
        insert(conn, "queue_items", seq=2, job=2, id=11, op="delete", text=None, metadata=None, bytes=QUEUE_ROW_BYTES + 8)
    if "lex_docs" in have:  # the old code indexed what it stored, and recorded the one data migration
        rows = conn.execute("SELECT rowid, text_hash, text FROM items WHERE text IS NOT NULL").fetchall()
        lexical.index_docs(conn, "notes", rows)
        conn.execute("INSERT INTO schema_migrations (name, applied) VALUES (?, 1.0)", (LEXICAL_MIGRATION,))


def dump(conn: sqlite3.Connection) -> dict[str, list[tuple]]:
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    return {t: conn.execute(f'SELECT * FROM "{t}" ORDER BY 1, 2').fetchall() for t in tables}


def schema(conn: sqlite3.Connection) -> dict[str, object]:
    """Every table's columns (name, type, not null, default, pk) and every index and trigger, by name."""
    out: dict[str, object] = {}
    for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
        out[t] = [tuple(r) for r in conn.execute(f'PRAGMA table_xinfo("{t}")')]
    out["indexes and triggers"] = sorted(conn.execute("SELECT type, name, tbl_name FROM sqlite_master "
                                                      "WHERE type IN ('index', 'trigger')").fetchall())
    return out


def open_new(path: Path) -> sqlite3.Connection:
    conn = connect(path)
    Store(conn)
    JobQueue(conn)
    return conn


def test_the_fixtures_are_the_unversioned_schema_and_its_older_variants(tmp_path):
    conn = make_db(tmp_path / "index.db", UNVERSIONED_DDL)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
    older = make_db(tmp_path / "older.db", BEFORE_LEXICAL_AND_QUEUE_SIZES)
    assert "queue_bytes" not in {r[1] for r in older.execute("PRAGMA table_info(jobs)")}
    assert not older.execute("SELECT 1 FROM sqlite_master WHERE name LIKE 'lex%'").fetchone()
    oldest = make_db(tmp_path / "oldest.db", OLDEST)
    assert not {"uid", "store_text"} & {r[1] for r in oldest.execute("PRAGMA table_info(collections)")}
    assert "text" not in {r[1] for r in oldest.execute("PRAGMA table_info(items)")}
    assert {r[1] for r in oldest.execute("PRAGMA table_info(jobs)")} >= {"state", "deleted"}


def test_a_new_database_gets_the_whole_schema(tmp_path):
    conn = open_new(tmp_path / "index.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == migrations.VERSION
    reference = make_db(tmp_path / "reference.db", [s for s in UNVERSIONED_DDL if "schema_migrations" not in s])
    assert schema(conn) == schema(reference)


def test_the_last_unversioned_database_upgrades_and_loses_nothing(tmp_path):
    path = tmp_path / "index.db"
    conn = make_db(path, UNVERSIONED_DDL)
    fill(conn)
    before = dump(conn)
    sql_before = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE name != 'schema_migrations' "
                                   "AND name NOT LIKE 'sqlite_autoindex_schema%'").fetchall())
    conn.close()
    conn = open_new(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == migrations.VERSION
    after = dump(conn)
    assert before.pop("schema_migrations") == [(LEXICAL_MIGRATION, 1.0)] and "schema_migrations" not in after
    assert after == before  # every row of every table, the lexical index's included
    assert dict(conn.execute("SELECT name, sql FROM sqlite_master").fetchall()) == sql_before  # nothing rebuilt
    store = Store(conn)
    assert [r[0] for r in store.lexical_search("notes", "0905", 3)] == [1]  # rowids: the first item's
    assert {j["id"] for j in JobQueue(conn).list()} == {1, 2}


def test_a_database_from_before_the_lexical_index_and_queue_sizes_is_completed(tmp_path):
    path = tmp_path / "index.db"
    conn = make_db(path, BEFORE_LEXICAL_AND_QUEUE_SIZES)
    fill(conn)
    before = dump(conn)
    conn.close()
    conn = open_new(path)
    after = dump(conn)
    for table, rows in before.items():  # the old columns' values, untouched
        n = len(rows[0]) if rows else 0
        assert [r[:n] for r in after[table]] == rows, table
    # The queue's sizes, measured once (the unversioned release's measure: an integer id by its digits).
    assert conn.execute("SELECT seq, bytes FROM queue_items ORDER BY seq").fetchall() == [
        (1, QUEUE_ROW_BYTES + len("10") + len("hello")), (2, QUEUE_ROW_BYTES + len("11"))]
    assert conn.execute("SELECT queue_rows, queue_bytes FROM jobs WHERE id = 2").fetchone() == (
        2, 2 * QUEUE_ROW_BYTES + 4 + 5)
    assert conn.execute("SELECT queue_rows, queue_bytes FROM jobs WHERE id = 1").fetchone() == (0, 0)
    # The stored texts got their lexical index.
    store = Store(conn)
    assert store.lexical_state("notes") == "ready"
    assert [r[0] for r in store.lexical_search("notes", "parcel", 3)] == [3]  # the third item's rowid
    assert conn.execute("SELECT COUNT(*) FROM lex_docs").fetchone()[0] == 3
    assert schema(conn).keys() == schema(open_new(tmp_path / "fresh.db")).keys()


def test_the_oldest_database_gains_the_later_columns_with_their_defaults(tmp_path):
    path = tmp_path / "index.db"
    conn = make_db(path, OLDEST)
    fill(conn)
    before = dump(conn)
    conn.close()
    conn = open_new(path)
    after = dump(conn)
    for table, rows in before.items():
        n = len(rows[0]) if rows else 0
        assert [r[:n] for r in after[table]] == rows, table
    assert conn.execute("SELECT store_text, uid FROM collections").fetchall() == [(0, "")]
    assert conn.execute("SELECT COUNT(*) FROM items WHERE text IS NULL").fetchone()[0] == 3
    assert conn.execute("SELECT kind, queue_rows, queue_bytes FROM jobs").fetchall() == [("table", 0, 0)]
    assert conn.execute("SELECT COUNT(*) FROM queue_items").fetchone()[0] == 0
    assert Store(conn).lexical_state("notes") == "missing"  # no texts to index: they come back from the app or source
    fresh = schema(open_new(tmp_path / "fresh.db"))
    upgraded = schema(conn)
    assert upgraded.keys() == fresh.keys() and upgraded["indexes and triggers"] == fresh["indexes and triggers"]
    for table in fresh:  # the same columns (an added one comes last)
        assert sorted(c[1] for c in upgraded[table]) == sorted(c[1] for c in fresh[table]), table


def test_an_up_to_date_database_gets_no_ddl_and_opens_read_only(tmp_path):
    path = tmp_path / "index.db"
    writer = open_new(path)
    writer.execute("INSERT INTO collections (name, model, dims, uid) VALUES ('c', 'm', 8, 'u')")
    conn = connect(path)
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    Store(conn)
    JobQueue(conn)
    conn.set_trace_callback(None)
    assert seen and not [s for s in seen if re.match(r"\s*(CREATE|ALTER|DROP|INSERT|UPDATE|DELETE|BEGIN|SAVEPOINT)",
                                                     s, re.I) or re.search(r"user_version\s*=", s)], seen
    ro = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    assert Store(ro).info("c").dims == 8
    assert JobQueue(ro).list() == []
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        ro.execute("INSERT INTO tombstones VALUES ('c', 1, 1)")


def test_a_database_from_a_newer_release_is_refused_before_anything_is_written(tmp_path):
    path = tmp_path / "index.db"
    conn = open_new(path)
    conn.execute(f"PRAGMA user_version = {migrations.VERSION + 1}")
    conn.execute("DROP TABLE tombstones")  # the newer release's schema: not this one's
    before = conn.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall()
    for make in (Store, JobQueue):
        with pytest.raises(SchemaTooNew, match=rf"schema version {migrations.VERSION + 1}, newer than this "
                                               rf"pocketembed's {migrations.VERSION}"):
            make(connect(path))
    assert issubclass(SchemaTooNew, sqlite3.DatabaseError)  # the daemon reports the store unavailable, embeds on
    assert conn.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall() == before
    assert conn.execute("PRAGMA user_version").fetchone()[0] == migrations.VERSION + 1


def test_connections_opening_a_new_database_at_once_run_each_migration_once(tmp_path, monkeypatch):
    runs = []
    real = migrations.MIGRATIONS

    def counted(m):
        def apply(conn):
            runs.append(m.name)
            m.apply(conn)
        return migrations.Migration(m.name, apply)

    monkeypatch.setattr(migrations, "MIGRATIONS", [counted(m) for m in real])
    path = tmp_path / "index.db"
    connect(path).close()
    start = threading.Barrier(4)
    errors = []

    def open_one():
        try:
            conn = connect(path)
            start.wait()
            Store(conn)
            JobQueue(conn)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and runs == [m.name for m in real]
    assert connect(path).execute("PRAGMA user_version").fetchone()[0] == migrations.VERSION


def test_a_failing_migration_leaves_the_database_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "index.db"
    conn = open_new(path)

    def broken(conn):
        conn.execute("CREATE TABLE half_done (x)")
        conn.execute("ALTER TABLE collections ADD COLUMN half INTEGER")
        raise RuntimeError("the migration fails midway")

    monkeypatch.setattr(migrations, "MIGRATIONS", [*migrations.MIGRATIONS, migrations.Migration("broken", broken)])
    with pytest.raises(RuntimeError, match="midway"):
        Store(connect(path))
    assert conn.execute("PRAGMA user_version").fetchone()[0] == migrations.VERSION
    assert not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'half_done'").fetchone()
    assert "half" not in {r[1] for r in conn.execute("PRAGMA table_info(collections)")}
