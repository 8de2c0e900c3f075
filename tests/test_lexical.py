"""The lexical index (daemon/lexical.py) beside the vectors: tokenizer, BM25, exactness, deleted-means-gone.

Most tests use a real SQLite file and the store alone, with random unit vectors (no model):
what they check is the lexical side and its transactions, not the embeddings. Two run the
real daemon: the delete test that scans index.db and its WAL for the deleted bytes, and a
kill -9 during a job's writes.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from conftest import fresh_home
from daemon_proc import DaemonProcess
from pocketembed.daemon import lexical, migrations
from pocketembed.daemon.lexical import parse_query, tokenize
from pocketembed.daemon.store import Item, Store, checkpoint_deleted, connect, db_path, text_hash, transaction
from pocketembed.sms import load_sms
from sms_db import make_sms_db, sms_rows
from test_enqueue import battery

Q8 = "all-minilm-l6-v2:q8_0"
DIMS = 16


# -- tokenizer, on real SMS ----------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    # a number glued to a word (the corpus: "To claim, call09050000327")
    ("To claim, call09050000327", {"call09050000327", "call", "09050000327"}),
    ("POBox36504 W45WQ", {"pobox36504", "pobox", "36504"}),
    ("08452810075over18's", {"08452810075", "over"}),
    # prices keep their currency, and the amount alone; thousands separators joined
    ("Win a £1000 cash prize", {"£1000", "1000"}),
    ("a £2,000 prize! £1.50/wk", {"£2000", "2000", "£1.50", "1.50"}),
    ("costs $5 or €10.99", {"$5", "5", "€10.99", "10.99"}),
    # short codes, and phone numbers written in groups also joined
    ("txt STOP to 87239", {"txt", "stop", "to", "87239"}),
    ("Call 0800 169 6031 now", {"0800", "169", "6031", "08001696031"}),
    ("ring 0844-861-85-85", {"08448618585"}),
    ("+44 7700 900123", {"447700900123"}),
    # txt-speak kept as typed, no stemming
    ("U dun say so early hor... 2nite b4 ur txts", {"u", "dun", "2nite", "nite", "b4", "ur", "txts"}),
    # case, diacritics (the corpus's ü for "you"), apostrophes (also cp1252's \x92)
    ("Ü r CAFÉ naïve", {"u", "r", "cafe", "naive"}),
    ("I\x92m don't won’t", {"im", "dont", "wont"}),
])
def test_tokenizer_on_sms_forms(text, expected):
    got = set(tokenize(text))
    assert expected <= got, (text, got)


def test_tokenizer_keeps_no_punctuation_and_counts_repeats():
    assert tokenize("ok... ok!! OK?") == ["ok", "ok", "ok"]
    assert tokenize("1.50") == ["1", "50", "1.50"]
    assert tokenize("") == [] and tokenize("...!?") == []
    assert "u" in tokenize("ü") and "u" in tokenize("Ü")
    assert max(map(len, tokenize("x" * 500))) == lexical.MAX_TERM_CHARS


def test_query_syntax_is_plain_text():
    assert parse_query('"free ringtone" NEAR txt*').terms == ["free", "ringtone", "near", "txt"]
    assert parse_query('"free ringtone" NEAR txt*').phrases == [["free", "ringtone"]]
    assert parse_query('"unbalanced quote').phrases == []
    assert parse_query('a:b ^c -d "e').terms == ["a", "b", "c", "d", "e"]
    assert parse_query("'; DROP TABLE items; --").terms == ["drop", "table", "items"]
    assert parse_query('*"^:-').terms == []


# -- a store of the bundled SMS, model-free ----------------------------------------------------

def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIMS)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def open_store(path: Path) -> Store:
    return Store(connect(path))


def put_texts(store: Store, collection: str, texts: dict, store_text: bool = False, origin: str | None = None,
              seen: int | None = None) -> None:
    vecs = unit_vectors(len(texts), seed=len(texts))
    with transaction(store.conn):
        store.ensure_collection(store.conn, collection, "m", DIMS, store_text=store_text)
        store.put(store.conn, collection, [Item(i, text_hash(t), vecs[k], text=t, lexical_text=t, origin=origin, seen=seen)
                                           for k, (i, t) in enumerate(texts.items())])


@pytest.fixture(scope="module")
def sms_store(tmp_path_factory):
    store = open_store(tmp_path_factory.mktemp("lex") / "index.db")
    texts = dict(enumerate(load_sms()))
    put_texts(store, "sms", texts)
    yield store, texts
    store.conn.close()


def top_texts(store: Store, texts: dict, collection: str, query: str, n: int = 5) -> list[str]:
    rows = store.lexical_search(collection, query, n)
    return [texts[h["id"]] for h in store.rows_to_hits(collection, [r for r, _, _ in rows])]


def test_bm25_ranks_the_messages_with_the_number_first(sms_store):
    store, texts = sms_store
    holding = [t for t in texts.values() if "09050000327" in t]
    assert holding
    top = top_texts(store, texts, "sms", "09050000327", n=len(holding))
    assert all("09050000327" in t for t in top)
    assert "87239" in top_texts(store, texts, "sms", "txt STOP to 87239", 1)[0]
    assert "£1000" in top_texts(store, texts, "sms", "£1000", 1)[0]
    rows = store.lexical_search("sms", "£1000 cash", 3)
    assert all({"£1000", "1000"} <= set(matched) for _, _, matched in rows)
    scores = [s for _, s, _ in rows]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0


def test_partial_numbers_match_by_prefix(sms_store):
    store, texts = sms_store
    top = top_texts(store, texts, "sms", "0905000", 3)
    assert top and all("0905000" in t.replace(" ", "") for t in top)
    assert store.lexical_search("sms", "0905000", 3)[0][2] == ["0905000"]
    # an exact short code outranks the longer numbers it begins
    assert "87239" in top_texts(store, texts, "sms", "87239", 1)[0]
    # three digits are not a prefix: "090" matches only the term "090"
    assert all("090" in tokenize(t) for t in top_texts(store, texts, "sms", "090", 10))


def test_syntax_characters_are_text_never_errors(sms_store):
    store, texts = sms_store
    plain = store.lexical_search("sms", "free ringtone", 5)
    for q in ['"free ringtone"', 'free* ringtone', '"free ringtone', 'free -ringtone', 'free: ^ringtone',
              'free NEAR ringtone', "free'); DROP TABLE items; -- ringtone", 'free " ringtone " "']:
        got = store.lexical_search("sms", q, 5)
        assert got, q
        assert {r for r, _, _ in got} & {r for r, _, _ in plain}, q
    for q in ['"', '*', '-', ':', '^', 'NEAR', '""', '\x00', "'"]:
        store.lexical_search("sms", q, 5)  # no error
    assert store.conn.execute("SELECT COUNT(*) FROM items").fetchone()[0] == len(texts)


def test_filter_restricts_to_allowed_rows(sms_store):
    store, texts = sms_store
    rows = [r for r, _, _ in store.lexical_search("sms", "free", 50)]
    allowed = np.array(rows[10:20], np.int64)
    got = store.lexical_search("sms", "free", 50, allowed=allowed)
    assert {r for r, _, _ in got} == set(allowed.tolist())


def test_common_words_do_not_read_every_posting(sms_store, monkeypatch):
    store, texts = sms_store
    monkeypatch.setattr(lexical, "FULL_BUDGET", 50)  # "u" and "to" are in far more messages than that
    rows = store.lexical_search("sms", "u to 87239", 3)
    assert "87239" in rows[0][2] and "to" in rows[0][2]  # the common term still scores the candidates


# -- postings stay exact -------------------------------------------------------------------------

def expected_index(conn: sqlite3.Connection, collection: str, texts: dict) -> tuple[set, Counter, tuple]:
    """What the lexical tables should hold for these id → text: (postings, df, (N, total length))."""
    postings, df, total = set(), Counter(), 0
    parsed = {i: lexical.doc_terms(t) for i, t in texts.items()}
    tids = lexical.term_ids(conn, collection, sorted({t for tf, _ in parsed.values() for t in tf}))
    for item_id, (tf, dl) in parsed.items():
        row = conn.execute("SELECT rowid FROM items WHERE collection = ? AND id = ? AND chunk IN (0, 1)",
                           (collection, item_id)).fetchone()[0]
        total += dl
        postings |= {(tids[t][0] if t in tids else t, row, c, dl) for t, c in tf.items()}
        df.update(tids[t][0] if t in tids else t for t in tf)
    return postings, df, (len(texts), total)


def actual_index(conn: sqlite3.Connection, collection: str) -> tuple[set, Counter, tuple]:
    cid = conn.execute("SELECT cid FROM lex_collections WHERE name = ?", (collection,)).fetchone()
    if cid is None:
        return set(), Counter(), (0, 0)
    postings = set(conn.execute("SELECT p.tid, row, tf, dl FROM lex_postings p JOIN lex_terms t ON t.tid = p.tid "
                                "WHERE t.cid = ?", cid))
    df = Counter(dict(conn.execute("SELECT tid, df FROM lex_terms WHERE cid = ?", cid)))
    return postings, df, tuple(conn.execute("SELECT n, total_len FROM lex_collections WHERE cid = ?", cid).fetchone())


def assert_exact(store: Store, collection: str, texts: dict) -> None:
    assert actual_index(store.conn, collection) == expected_index(store.conn, collection, texts)
    assert store.conn.execute("SELECT COUNT(*) FROM lex_docs WHERE row NOT IN (SELECT rowid FROM items)").fetchone()[0] == 0


def test_updates_deletes_sweeps_and_drops_keep_postings_exact(tmp_path):
    store = open_store(tmp_path / "index.db")
    texts = {i: t for i, t in enumerate(load_sms()[:300])}
    put_texts(store, "c", texts, origin="src", seen=1)
    assert_exact(store, "c", texts)
    # a changed text replaces its postings; an unchanged one keeps its row and postings
    before = dict(store.conn.execute("SELECT row, hash FROM lex_docs"))
    changed = {3: "call me on 07700900123 tonite", 4: "£250 cash for u", 5: texts[5]}
    put_texts(store, "c", changed, origin="src", seen=1)
    texts.update(changed)
    assert_exact(store, "c", texts)
    after = dict(store.conn.execute("SELECT row, hash FROM lex_docs"))
    assert {r for r in before if before[r] != after.get(r)} == {r for r in after if r in before} - \
        {r for r in before if before[r] == after[r]}
    assert lexical.document_frequencies(store.conn, "c", ["07700900123"]) == {"07700900123": 1}
    assert store.lexical_search("c", "07700900123", 1)
    # deletes
    with transaction(store.conn):
        store.delete(store.conn, "c", [0, 1, 3, 999])
    for i in (0, 1, 3):
        texts.pop(i)
    assert_exact(store, "c", texts)
    assert not store.lexical_search("c", "07700900123", 1)
    # a job's sweep of the rows its run did not see
    with transaction(store.conn):
        store.mark_seen(store.conn, "c", list(texts)[:200], 2)
        store.sweep(store.conn, "c", "src", 2)
    texts = {i: t for i, t in texts.items() if i in list(texts)[:200]}
    assert_exact(store, "c", texts)
    # a put without any text for a changed item forgets its postings (they would be the old text's)
    vec = unit_vectors(1)[0]
    first = next(iter(texts))
    with transaction(store.conn):
        store.put(store.conn, "c", [Item(first, text_hash("other"), vec)])
    assert store.lexical_state("c") == "partial"
    texts.pop(first)
    assert actual_index(store.conn, "c") == expected_index(store.conn, "c", texts)
    # chunked: one text per item, on its first window; switching to whole moves it
    with transaction(store.conn):
        store.put(store.conn, "c", [Item("long", "h:c", vec, chunk=c, lexical_text="chunked text 0800123456")
                                    for c in (1, 2, 3)])
    texts["long"] = "chunked text 0800123456"
    assert_exact(store, "c", {i: t for i, t in texts.items() if i != first})
    with transaction(store.conn):
        store.put(store.conn, "c", [Item("long", "h2", vec, chunk=0, lexical_text="whole now")])
    texts["long"] = "whole now"
    assert_exact(store, "c", texts)
    assert store.conn.execute("SELECT COUNT(*) FROM items WHERE id = 'long'").fetchone()[0] == 1
    # drop, and a new collection of the name starts empty
    put_texts(store, "other", {1: "keep me 87239"})
    with transaction(store.conn):
        store.drop(store.conn, "c")
    assert actual_index(store.conn, "c") == (set(), Counter(), (0, 0))
    cid_other = store.conn.execute("SELECT cid FROM lex_collections WHERE name = 'other'").fetchone()[0]
    assert {r[0] for r in store.conn.execute("SELECT DISTINCT cid FROM lex_terms")} == {cid_other}
    assert store.conn.execute("SELECT COUNT(*) FROM lex_postings WHERE tid NOT IN (SELECT tid FROM lex_terms)"
                              ).fetchone()[0] == 0
    assert store.conn.execute("SELECT COUNT(*) FROM lex_docs").fetchone()[0] == 1
    put_texts(store, "c", {1: "fresh start"})
    assert_exact(store, "c", {1: "fresh start"})
    assert store.collection("c")["lexical"] == "ready"


def test_a_failed_transaction_leaves_vectors_and_postings_together(tmp_path):
    store = open_store(tmp_path / "index.db")
    put_texts(store, "c", {1: "first 87239"})
    with pytest.raises(RuntimeError), transaction(store.conn):
        store.put(store.conn, "c", [Item(2, text_hash("second"), unit_vectors(1)[0], lexical_text="second 0800")])
        store.delete(store.conn, "c", [1])
        raise RuntimeError("the writer's transaction fails")
    assert_exact(store, "c", {1: "first 87239"})


def test_older_index_db_gets_its_lexical_index_where_texts_can_be_had(tmp_path):
    path = tmp_path / "index.db"
    store = open_store(path)
    kept = {i: t for i, t in enumerate(load_sms()[:50])}
    private = {i: t for i, t in enumerate(load_sms()[50:80])}
    put_texts(store, "kept", kept, store_text=True)
    put_texts(store, "private", private, store_text=False)
    # As an index.db made before the lexical index: no lexical tables, no schema version.
    for t in ("lex_collections", "lex_docs", "lex_postings", "lex_terms"):  # (and its index)
        store.conn.execute(f"DROP TABLE {t}")
    store.conn.execute("DROP TRIGGER items_lex_deleted")
    store.conn.execute("PRAGMA user_version = 0")
    store.conn.close()
    store = open_store(path)
    assert_exact(store, "kept", kept)
    info = {c["name"]: c for c in store.collections()}
    assert (info["kept"]["lexical"], info["private"]["lexical"]) == ("ready", "missing")
    assert info["kept"]["lexical_items"] == 50 and info["kept"]["lexical_bytes_per_item"] > 0
    assert store.lexical_search("private", private[0], 1) == []
    # The app re-sends some of its messages (unchanged texts: nothing re-embedded): they are indexed.
    with transaction(store.conn):
        assert store.index_texts(store.conn, "private", list(private.items())[:10]) == 10
        assert store.index_texts(store.conn, "private", [(11, "not its text")]) == 0
    assert store.lexical_state("private") == "partial"
    with transaction(store.conn):
        store.index_texts(store.conn, "private", list(private.items()))
    assert store.lexical_state("private") == "ready"
    assert_exact(store, "private", private)
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == migrations.VERSION
    docs = store.conn.execute("SELECT COUNT(*) FROM lex_docs").fetchone()[0]
    open_store(path).conn.close()  # runs nothing twice
    assert store.conn.execute("SELECT COUNT(*) FROM lex_docs").fetchone()[0] == docs


def test_job_items_are_backfilled_from_their_source(tmp_path):
    store = open_store(tmp_path / "index.db")
    texts = {i: t for i, t in enumerate(load_sms()[:40])}
    put_texts(store, "job", texts, origin="o")
    with transaction(store.conn):
        lexical.drop(store.conn, "job")
    assert store.lexical_state("job") == "missing"
    changed = {**texts, 5: "changed since it was embedded"}
    assert store.lexical_backfill(lambda origin, ids: {i: changed[i] for i in ids}) == 39
    assert store.lexical_state("job") == "partial"  # item 5 waits for the job's next run


# -- deleted means gone ------------------------------------------------------------------------

def file_bytes(home: Path) -> bytes:
    out = b""
    for name in ("index.db", "index.db-wal"):
        p = home / name
        if p.exists():
            out += p.read_bytes()
    return out


def test_deleted_bytes_leave_the_file_and_wal_model_free(tmp_path):
    store = open_store(tmp_path / "index.db")
    put_texts(store, "c", {i: t for i, t in enumerate(load_sms()[:500])}, store_text=True)
    secret = {1000: "zyxwvq secret plumbing appointment 07999123456", 1001: "qqjjxx another secret"}
    put_texts(store, "c", secret, store_text=True)
    codes = store.conn.execute("SELECT i8, bin FROM items WHERE id IN (1000, 1001)").fetchall()
    assert b"zyxwvq" in file_bytes(tmp_path) and b"07999123456" in file_bytes(tmp_path)
    with transaction(store.conn):
        store.delete(store.conn, "c", [1000, 1001])
    checkpoint_deleted(store.conn)
    data = file_bytes(tmp_path)
    # The 2-byte binary codes of 16 dims occur in any file by chance (the daemon test checks 48-byte ones).
    for needle in (b"zyxwvq", b"qqjjxx", b"07999123456", *[c for pair in codes for c in pair if len(c) >= 8]):
        assert needle not in data, needle


def rows_bytes(home: Path, collection: str) -> list[bytes]:
    with closing(sqlite3.connect(db_path(home))) as conn:
        return [b for row in conn.execute("SELECT i8, bin, f32 FROM items WHERE collection = ?", (collection,))
                for b in row if b]


def wait_done(client, job_id: int, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.job(job_id)
        assert job["state"] not in ("failed", "cancelled"), job
        if job["state"] == "done":
            return job
        time.sleep(0.1)
    raise AssertionError(f"job not done: {job}")


def test_deleted_means_gone_through_the_daemon(home, tmp_path):
    """Distinctive texts written by index.add and index.enqueue (store_text on and off, float vectors too), then
    deleted by index.delete, queued deletions and collections.drop: none of their text or vector bytes stays."""
    root = fresh_home(home, tmp_path / "home")
    sensors = tmp_path / "battery.json"
    battery(sensors, 80, plugged=True)
    d = DaemonProcess(root, tmp_path / "pe.sock", "--model", Q8, "--power-source", f"file:{sensors}",
                      env={"POCKETEMBED_POWER_POLL_S": "0.2", "POCKETEMBED_POWER_SETTLE_S": "0.2",
                           "POCKETEMBED_POWER_INTERACTIVE_PAUSE_S": "0"}).wait_ready()
    filler = [{"id": 100 + i, "text": t} for i, t in enumerate(load_sms()[:200])]
    gone: dict[str, list[str]] = {}

    def secret(tag: str, n: int = 3) -> list[dict]:
        words = [f"{tag}{k}qx{random.randrange(10**6):06d}" for k in range(n)]
        gone.setdefault(tag, []).extend(words)
        return [{"id": f"{tag}-{k}", "text": f"Meet at {w} call07{random.randrange(10**9):09d} £{k}777"}
                for k, w in enumerate(words)]

    try:
        with d.client() as c:
            vectors: list[bytes] = []
            for name, store_text in (("kept", True), ("private", False)):
                items = secret(f"add{name}")
                c.call("index.add", {"collection": name, "items": filler + items, "store_text": store_text,
                                     "float_vectors": name == "kept"})
                with closing(sqlite3.connect(db_path(root))) as conn:
                    vectors += [b for r in conn.execute("SELECT i8, bin, f32 FROM items WHERE collection = ? AND "
                                                        "id LIKE 'add%'", (name,)) for b in r if b]
                    word = gone[f"add{name}"][0]
                    assert lexical.document_frequencies(conn, name, [word]) == {word: 1}
                assert c.index_delete(name, [it["id"] for it in items]) == len(items)
            # queued: written, then deleted in the next request; a secret enqueued and deleted in one go
            for name, store_text in (("qkept", True), ("qprivate", False)):
                items = secret(f"enq{name}")
                job = c.index_enqueue(name, filler + items, store_text=store_text)
                wait_done(c, job["id"])
                with closing(sqlite3.connect(db_path(root))) as conn:
                    vectors += [b for r in conn.execute("SELECT i8, bin FROM items WHERE collection = ? AND "
                                                        "id LIKE 'enq%'", (name,)) for b in r if b]
                job = c.index_enqueue(name, [], delete=[it["id"] for it in items])
                wait_done(c, job["id"])
            # dropped: a whole collection of secrets
            items = secret("drop", 20)
            c.index_add("doomed", items, store_text=True)
            vectors += rows_bytes(root, "doomed")
            c.drop_collection("doomed")
            assert {x["name"] for x in c.collections()} == {"kept", "private", "qkept", "qprivate"}
            # what remains is intact, and searchable both ways
            assert len(c.search("kept", "free ringtone", k=3)) == 3
        data = file_bytes(root)
        assert len(data) > 100_000 and filler[0]["text"].split()[0].encode() in data
        leaks = [w for words in gone.values() for w in words if w.encode() in data]
        assert not leaks, leaks
        assert len(vectors) > 40
        leaked_vectors = [k for k, v in enumerate(vectors) if v in data]
        assert not leaked_vectors, leaked_vectors
    finally:
        assert d.stop() == 0, d.log()[-3000:]


def test_sigkill_during_a_job_leaves_the_lexical_index_and_the_vectors_in_step(home, tmp_path):
    root = fresh_home(home, tmp_path / "home")
    db = make_sms_db(tmp_path / "sms.db", limit=2500)
    sock = tmp_path / "pe.sock"
    env = {"POCKETEMBED_JOB_SOURCES": str(tmp_path)}
    d = DaemonProcess(root, sock, "--model", Q8, env=env).wait_ready()
    with d.client() as c:
        job_id = c.index_table(str(db), "messages", "id", "body", collection="sms")["id"]
        deadline = time.monotonic() + 120
        while c.job(job_id)["scanned"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    time.sleep(random.uniform(0.2, 1.5))
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    conn = sqlite3.connect(db_path(root))
    try:
        n_items = conn.execute("SELECT COUNT(*) FROM items WHERE collection = 'sms'").fetchone()[0]
        docs = conn.execute("SELECT COUNT(*) FROM lex_docs").fetchone()[0]
        assert 0 < n_items < 2500 and docs == n_items  # the last commit's items, each with its postings
    finally:
        conn.close()
    d = DaemonProcess(root, sock, "--model", Q8, env=env).wait_ready()
    try:
        with d.client() as c:
            wait_done(c, job_id)
            hits = c.search("sms", "call09050000327", k=1)  # the daemon serves it
            assert hits
    finally:
        assert d.stop() == 0
    store = open_store(db_path(root))
    try:
        bodies = {r["id"]: r["body"] for r in sms_rows()[:2500]}
        ids = [r[0] for r in store.conn.execute("SELECT id FROM items WHERE collection = 'sms'")]
        assert sorted(ids) == sorted(bodies)
        assert_exact(store, "sms", bodies)
        assert store.collection("sms")["lexical"] == "ready"
    finally:
        store.conn.close()
