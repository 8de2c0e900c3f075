"""The lexical side of the store: an inverted index of each collection's items, BM25-ranked.

People search their messages for a number, a short code, a price or a name as often as
for a meaning, and a bi-encoder ranks those poorly (issue 29: "09050000327" found none of
the messages holding it). This module keeps, in the store's own database (index.db) and
inside the **same transactions** as the vectors, which terms occur in which item, and ranks
items for a query with BM25. Search fuses it with the vectors (daemon/index.py).

Why not FTS5
------------
The obvious tool is SQLite's FTS5, built in. It does not fit the store's promises on the
SQLite this daemon runs on (3.40.1 in the desktop Python; the phone's Termux SQLite may well
be newer, but one code path everywhere is worth more than a second one tested less):

* ``store_text`` is off by default (the text is the user's private data), so the index must
  work without the text. A *contentless* FTS5 table cannot delete a row without being handed
  the original text again (``contentless_delete=1`` arrived in 3.43);
* an external-content FTS5 table's ``'delete'`` command only adds a delete marker: the terms
  of a deleted message stay in older segments until a full ``'optimize'`` merges them away
  (the ``secure-delete`` option that removes them at once arrived in 3.42). "Deleted means
  gone" (DESIGN.md) would then cost an optimize of the whole index per delete.

So the index is three ordinary tables, and a delete is a plain row delete that
``PRAGMA secure_delete=ON`` (set in :func:`daemon.store.connect`) zeroes in the file, the
WAL emptied by a ``wal_checkpoint(TRUNCATE)`` once the delete has committed
(:func:`daemon.store.checkpoint_deleted`):

``lex_collections(cid INTEGER PRIMARY KEY AUTOINCREMENT, name UNIQUE, n, total_len)``
    per collection: its documents and their total length, for BM25's N and average length.
    ``cid`` is never reused, so nothing of a dropped collection can be mistaken for a new one's.
``lex_docs(row INTEGER PRIMARY KEY, cid, length, hash, terms)``
    one per item, keyed by the rowid of the item's first row in ``items`` (chunk 0, or chunk 1
    of a chunked item: its text is indexed once); ``terms`` is the JSON array of its distinct
    terms, *sorted* (not in text order), which is what lets a delete find its postings without
    the text.
``lex_postings(cid, term, row, tf, dl) PRIMARY KEY (cid, term, row) WITHOUT ROWID``
    the inverted lists: one B-tree, so a term's postings are one range read, and a digit
    prefix (``term >= ? AND term < ?``) is a range of terms.
``lex_terms(cid, term, df) PRIMARY KEY (cid, term) WITHOUT ROWID``
    document frequencies: a query knows each term's rarity before it reads any posting.

Triggers keep them exact on every path that removes an item: a delete from ``items``
(``index.delete``, queued deletions, a job's sweep, the chunks a ``put`` drops) deletes its
``lex_docs`` row, whose trigger deletes its postings, decrements ``df`` and the collection's
N and length. A write puts the new postings in the writer's transaction; a kill -9 therefore
leaves the lexical index and the vectors holding exactly the same items.

What the index reveals without the text
---------------------------------------
With ``store_text`` off no text is stored, but the index is a *bag of words* per item:
which terms (lower-cased, diacritics folded; numbers whole) occur in which item, and how
often (``tf``), and the item's length in terms. Word order is not kept (no positions; the
per-item term list is sorted), but someone holding index.db learns, e.g., which messages
contain a given phone number or name. That is the price of lexical search; a collection
that must not reveal it can be searched by vectors alone (the vectors reveal meaning too).

Tokenizer (decided on the bundled 5,574 SMS, see :func:`tokenize`)
------------------------------------------------------------------
Lower-case (casefold), NFKD with combining marks stripped (``ü`` → ``u``; 173 ``ü``/``Ü``
in the corpus, "ü" for "you"), apostrophes inside words dropped (``don't`` → ``dont``, as
SMS often spells it; the corpus also has cp1252's ``\\x92`` for it, 39 times). A term is a
run of letters and digits. Then, because numbers are what people look for:

* a run mixing letters and digits also yields its digit parts of >= 3 digits and its letter
  parts of >= 2 letters: ``call09050000327`` → ``call09050000327``, ``call``,
  ``09050000327``; ``POBox36504`` → ``pobox``, ``36504``; ``150p`` → ``150``; 39 distinct
  such glued forms in the corpus. ``2nite``, ``b4``, ``u``, ``txt`` stay as they are
  (``2nite`` also gives ``nite``); no stop words, no stemming: the short words of txt-speak
  are what people type, and a stemmer made for English prose would fold names and codes;
  meaning-level matching is the vectors' job.
* a phone number written in groups (starting with ``0`` or ``+``, groups of >= 2 digits
  separated by a space, ``-`` or ``.``, 7–15 digits in all) is also joined:
  ``0800 169 6031`` → ``08001696031`` (14 such numbers in the corpus).
* thousands separators and decimals: ``2,000`` → ``2000``, ``1.50`` → ``1.50``;
  a price keeps its currency: ``£1000`` → ``£1000`` and ``1000``; ``£1.50`` → ``£1.50``,
  ``1.50`` (329 ``£`` in the corpus; ``$`` and ``€`` alike).
* a query's digit term of >= 4 digits also matches the terms it is a prefix of (a B-tree
  range over ``lex_terms``), so ``0905000`` finds ``09050000327``, and a number glued to
  what follows it (``0871277810910p``) is found by the number alone. A prefix-only match
  counts :data:`PREFIX_WEIGHT` of an exact one.

Query syntax: none. Quotes, ``*``, ``-``, ``:``, ``^``, ``NEAR``, ``AND``/``OR``/``NOT`` and
unbalanced quotes are plain text (``near`` is a word); the SQL is parameterised only. A
quoted phrase is reported (:class:`Query.phrases`) so that a caller can boost items whose
``matched_terms`` cover it; positions are not stored, so "exact phrase" means "all its terms".

API (used by daemon/store.py; the store's own API is in its docstring)
----------------------------------------------------------------------
``tokenize(text) -> list[str]``
``parse_query(text) -> Query``
``create_schema(conn)``
``index_docs(conn, collection, docs: list[tuple[row, text_hash, text]]) -> int``
``remove_rows(conn, rows)`` / ``drop(conn, collection)``
``search(conn, collection, query, n, allowed) -> list[tuple[int, float, list[str]]]``
``stats(conn, collection) -> (docs, total_len)``
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

K1 = 1.2
B = 0.75
PREFIX_MIN = 4
"""A query's digit term this long or longer also matches the longer terms it begins (partial numbers)."""
PREFIX_WEIGHT = 0.8
"""A prefix-only match counts this share of an exact one: "87239" ranks the message with 87239 first."""
PREFIX_EXPANSIONS = 64
"""At most this many terms one prefix stands for (the most frequent), so a short prefix stays cheap."""
MAX_QUERY_TERMS = 32
MAX_TERM_CHARS = 64
"""Longer runs (a URL's token, base64) are cut to this: a term is a key, not a payload."""
FULL_BUDGET = 5_000
"""Postings read in full per query (the rarest term's always). A term whose postings would take the
candidates past this (a word in every other message, like "u" or "to") only scores the candidates
its rarer terms found, looked up one by one when they are few (:data:`LOOKUP_CAP`), else not at all:
its IDF is low, it would reorder little."""
LOOKUP_CAP = 2_000
FIRST_CAP = 50_000
"""A query of common words only reads at most this many postings of its rarest term (the oldest rows)."""
ROW_BATCH = 500

_APOSTROPHES = re.compile(r"(?<=[^\W_])['\u2019\u2018\x92\x91`](?=[^\W_])")
_RUN = re.compile(r"[^\W_]+")
_PARTS = re.compile(r"\d+|[^\W\d_]+")
_GROUPED_PHONE = re.compile(r"(?<![\w+])(\+?\d{2,6}(?:[ .\-]\d{2,}){1,5})(?![\w])")
_THOUSANDS = re.compile(r"(?<![\w.,])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d])")
_DECIMAL = re.compile(r"(?<![\w.])\d+\.\d+(?![\d])")
_PRICE = re.compile(r"([£$€])\s?(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)")
_QUOTED = re.compile(r'"([^"]*)"')


def fold(text: str) -> str:
    """Casefolded, NFKD with combining marks removed (ü → u, é → e), word-internal apostrophes dropped."""
    text = text.casefold()
    if not text.isascii():
        text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return _APOSTROPHES.sub("", text)


def tokenize(text: str) -> list[str]:
    """The terms of a text, repeats kept (their count is the term frequency). See the module docstring."""
    t = fold(text)
    out: list[str] = []
    for m in _RUN.finditer(t):
        run = m.group()
        out.append(run[:MAX_TERM_CHARS])
        if not run.isalpha() and not run.isdigit():
            for part in _PARTS.findall(run):
                if (len(part) >= 3 if part[0].isdigit() else len(part) >= 2):
                    out.append(part[:MAX_TERM_CHARS])
    if any(c.isdigit() for c in t):
        for m in _GROUPED_PHONE.finditer(t):
            s = m.group(1)
            digits = re.sub(r"\D", "", s)
            if (s[0] == "+" or s[0] == "0") and 7 <= len(digits) <= 15:
                out.append(digits)
        for m in _THOUSANDS.finditer(t):
            out.append(m.group().replace(",", ""))
        for m in _DECIMAL.finditer(t):
            out.append(m.group())
        for m in _PRICE.finditer(t):
            out.append(m.group(1) + m.group(2).replace(",", ""))
    return out


@dataclass
class Query:
    """A parsed query: its distinct terms in order, and the terms of each quoted phrase."""

    terms: list[str]
    phrases: list[list[str]] = field(default_factory=list)
    """Terms of each balanced "quoted phrase" (an unbalanced quote is just text)."""

    def prefix(self, term: str) -> bool:
        """Whether this term also matches as a number prefix."""
        return term.isdigit() and term.isascii() and len(term) >= PREFIX_MIN


def parse_query(text: str) -> Query:
    """Terms of a query; any syntax character is text (there is no query syntax), so nothing is an error."""
    phrases = [p for p in (_dedupe(tokenize(q)) for q in _QUOTED.findall(text)) if len(p) > 1]
    return Query(_dedupe(tokenize(text))[:MAX_QUERY_TERMS], phrases)


def _dedupe(terms: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(terms))


# -- schema ---------------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS lex_collections (
    cid INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE,
    n INTEGER NOT NULL DEFAULT 0, total_len INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS lex_docs (
    row INTEGER PRIMARY KEY, cid INTEGER NOT NULL, length INTEGER NOT NULL, hash TEXT, terms TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS lex_postings (
    cid INTEGER NOT NULL, term TEXT NOT NULL, row INTEGER NOT NULL, tf INTEGER NOT NULL, dl INTEGER NOT NULL,
    PRIMARY KEY (cid, term, row)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS lex_terms (
    cid INTEGER NOT NULL, term TEXT NOT NULL, df INTEGER NOT NULL, PRIMARY KEY (cid, term)) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS lex_docs_deleted AFTER DELETE ON lex_docs
WHEN EXISTS (SELECT 1 FROM lex_collections WHERE cid = old.cid) BEGIN
    DELETE FROM lex_postings WHERE cid = old.cid AND term IN (SELECT value FROM json_each(old.terms)) AND row = old.row;
    UPDATE lex_terms SET df = df - 1 WHERE cid = old.cid AND term IN (SELECT value FROM json_each(old.terms));
    DELETE FROM lex_terms WHERE cid = old.cid AND term IN (SELECT value FROM json_each(old.terms)) AND df <= 0;
    UPDATE lex_collections SET n = n - 1, total_len = total_len - old.length WHERE cid = old.cid;
END;
CREATE TRIGGER IF NOT EXISTS items_lex_deleted AFTER DELETE ON items BEGIN
    DELETE FROM lex_docs WHERE row = old.rowid;
END;
"""
LEX_TABLES = ("lex_collections", "lex_docs", "lex_postings", "lex_terms")


def create_schema(conn: sqlite3.Connection) -> None:
    """The lexical tables and triggers, idempotently (after the ``items`` table exists)."""
    for stmt in SCHEMA.split(";\nCREATE"):
        stmt = stmt.strip()
        if stmt:
            conn.execute(stmt if stmt.startswith("CREATE") else "CREATE " + stmt)


def _cid(conn: sqlite3.Connection, collection: str, create: bool = False) -> int | None:
    row = conn.execute("SELECT cid FROM lex_collections WHERE name = ?", (collection,)).fetchone()
    if row is None and create:
        return conn.execute("INSERT INTO lex_collections (name) VALUES (?)", (collection,)).lastrowid
    return row[0] if row else None


# -- writes (inside the caller's transaction) -----------------------------------------------

def index_docs(conn: sqlite3.Connection, collection: str, docs: Sequence[tuple[int, str | None, str]]) -> int:
    """Index (or re-index) items: (rowid of the item's first row, its text hash, its text).

    A row already indexed with the same hash keeps its postings; another hash replaces them.
    Returns how many were (re)indexed.
    """
    if not docs:
        return 0
    cid = _cid(conn, collection, create=True)
    have: dict[int, str | None] = {}
    rows = [d[0] for d in docs]
    for i in range(0, len(rows), ROW_BATCH):
        part = rows[i:i + ROW_BATCH]
        have.update(conn.execute(f"SELECT row, hash FROM lex_docs WHERE row IN ({','.join('?' * len(part))})", part))
    todo = {}
    for row, h, text in docs:  # the last text for a row wins
        todo[row] = (h, text)
    todo = {r: v for r, v in todo.items() if not (r in have and have[r] == v[0] and v[0] is not None)}
    if not todo:
        return 0
    remove_rows(conn, [r for r in todo if r in have])
    postings, doc_rows, df = [], [], Counter()
    total = 0
    for row, (h, text) in todo.items():
        tf = Counter(tokenize(text))
        dl = sum(tf.values())
        total += dl
        terms = sorted(tf)
        doc_rows.append((row, cid, dl, h, json.dumps(terms, ensure_ascii=False)))
        postings += [(cid, term, row, c, dl) for term, c in tf.items()]
        df.update(terms)
    conn.executemany("INSERT INTO lex_docs (row, cid, length, hash, terms) VALUES (?, ?, ?, ?, ?)", doc_rows)
    conn.executemany("INSERT INTO lex_postings (cid, term, row, tf, dl) VALUES (?, ?, ?, ?, ?)", postings)
    conn.executemany("INSERT INTO lex_terms (cid, term, df) VALUES (?, ?, ?) "
                     "ON CONFLICT (cid, term) DO UPDATE SET df = df + excluded.df",
                     [(cid, term, c) for term, c in df.items()])
    conn.execute("UPDATE lex_collections SET n = n + ?, total_len = total_len + ? WHERE cid = ?",
                 (len(doc_rows), total, cid))
    return len(doc_rows)


def remove_rows(conn: sqlite3.Connection, rows: Sequence[int]) -> None:
    """Forget these items' postings (the trigger on lex_docs does the rest)."""
    for i in range(0, len(rows), ROW_BATCH):
        part = list(rows[i:i + ROW_BATCH])
        conn.execute(f"DELETE FROM lex_docs WHERE row IN ({','.join('?' * len(part))})", part)


def drop(conn: sqlite3.Connection, collection: str) -> None:
    """Everything of a collection, in bulk (its stats row first, so the per-row trigger stays idle)."""
    cid = _cid(conn, collection)
    if cid is None:
        return
    conn.execute("DELETE FROM lex_collections WHERE cid = ?", (cid,))
    conn.execute("DELETE FROM lex_postings WHERE cid = ?", (cid,))
    conn.execute("DELETE FROM lex_terms WHERE cid = ?", (cid,))
    conn.execute("DELETE FROM lex_docs WHERE row IN (SELECT rowid FROM items WHERE collection = ?)", (collection,))
    conn.execute("DELETE FROM lex_docs WHERE cid = ?", (cid,))  # any left (not expected): a scan, rare


def indexed_rows(conn: sqlite3.Connection, rows: Sequence[int]) -> dict[int, str | None]:
    """rowid → text hash of the rows that have postings."""
    out: dict[int, str | None] = {}
    for i in range(0, len(rows), ROW_BATCH):
        part = list(rows[i:i + ROW_BATCH])
        out.update(conn.execute(f"SELECT row, hash FROM lex_docs WHERE row IN ({','.join('?' * len(part))})", part))
    return out


def stats(conn: sqlite3.Connection, collection: str) -> tuple[int, int]:
    """(documents, total length in terms) of a collection's lexical index."""
    row = conn.execute("SELECT n, total_len FROM lex_collections WHERE name = ?", (collection,)).fetchone()
    return (row[0], row[1]) if row else (0, 0)


# -- reads ------------------------------------------------------------------------------------

def document_frequencies(conn: sqlite3.Connection, collection: str, terms: Sequence[str]) -> dict[str, int]:
    """How many items of the collection hold each term (absent terms are left out)."""
    row = conn.execute("SELECT cid FROM lex_collections WHERE name = ?", (collection,)).fetchone()
    if row is None or not terms:
        return {}
    return dict(conn.execute(f"SELECT term, df FROM lex_terms WHERE cid = ? AND term IN ({','.join('?' * len(terms))})",
                             (row[0], *terms)).fetchall())


def _prefix_end(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def search(conn: sqlite3.Connection, collection: str, query: str | Query, n: int = 10,
           allowed: np.ndarray | None = None) -> list[tuple[int, float, list[str]]]:
    """The n best items for a query by BM25: (rowid, score, the query's terms it matched), best first.

    ``allowed`` (rowids) restricts the result (a metadata filter). Terms are read rarest
    first; a term whose postings would take the candidates past :data:`FULL_BUDGET` only
    scores the candidates rarer terms found (it would add little: its IDF is low), so a
    query with "u" or "the" in it reads a few postings, not a fifth of the collection.
    """
    q = query if isinstance(query, Query) else parse_query(query)
    if not q.terms or n <= 0:
        return []
    row = conn.execute("SELECT cid, n, total_len FROM lex_collections WHERE name = ?", (collection,)).fetchone()
    if row is None or not row[1]:
        return []
    cid, N, total = row
    avgdl = max(total / N, 1e-9)
    # (query term index, index term, df, weight): each query term and, for numbers, the terms it begins.
    plan: list[tuple[int, str, int, float]] = []
    for qi, term in enumerate(q.terms):
        if q.prefix(term):
            for t, df in conn.execute("SELECT term, df FROM lex_terms WHERE cid = ? AND term >= ? AND term < ? "
                                      "ORDER BY df DESC LIMIT ?", (cid, term, _prefix_end(term), PREFIX_EXPANSIONS)):
                plan.append((qi, t, df, 1.0 if t == term else PREFIX_WEIGHT))
        else:
            hit = conn.execute("SELECT df FROM lex_terms WHERE cid = ? AND term = ?", (cid, term)).fetchone()
            if hit:
                plan.append((qi, term, hit[0], 1.0))
    if not plan:
        return []
    plan.sort(key=lambda p: p[2])
    rows_l, contrib_l, qbits_l = [], [], []
    candidates: np.ndarray | None = None
    seen = 0
    for qi, term, df, weight in plan:
        idf = math.log(1.0 + (N - df + 0.5) / (df + 0.5))
        if candidates is None or seen + df <= FULL_BUDGET:
            got = conn.execute("SELECT row, tf, dl FROM lex_postings WHERE cid = ? AND term = ? LIMIT ?",
                               (cid, term, FIRST_CAP)).fetchall()
            seen += len(got)
        else:
            cand = np.unique(candidates)
            if not len(cand) or len(cand) > LOOKUP_CAP:
                continue
            got = conn.execute("SELECT row, tf, dl FROM lex_postings WHERE cid = ? AND term = ? AND row IN "
                               "(SELECT value FROM json_each(?))", (cid, term, json.dumps(cand.tolist()))).fetchall()
        if not got:
            continue
        arr = np.array(got, np.int64)
        tf, dl = arr[:, 1].astype(np.float64), arr[:, 2].astype(np.float64)
        rows_l.append(arr[:, 0])
        contrib_l.append(weight * idf * tf * (K1 + 1) / (tf + K1 * (1 - B + B * dl / avgdl)))
        qbits_l.append(np.full(len(arr), 1 << qi, np.int64))
        candidates = arr[:, 0] if candidates is None else np.concatenate([candidates, arr[:, 0]])
    if not rows_l:
        return []
    rows, contrib, qbits = np.concatenate(rows_l), np.concatenate(contrib_l), np.concatenate(qbits_l)
    if allowed is not None:
        keep = np.isin(rows, np.asarray(allowed, np.int64))
        rows, contrib, qbits = rows[keep], contrib[keep], qbits[keep]
        if not len(rows):
            return []
    uniq, inv = np.unique(rows, return_inverse=True)
    scores = np.bincount(inv, weights=contrib, minlength=len(uniq))
    bits = np.zeros(len(uniq), np.int64)
    np.bitwise_or.at(bits, inv, qbits)
    k = min(n, len(uniq))
    top = np.argpartition(-scores, k - 1)[:k] if k < len(uniq) else np.arange(len(uniq))
    top = top[np.lexsort((uniq[top], -scores[top]))]  # score, then the older row: a stable order
    return [(int(uniq[i]), round(float(scores[i]), 6),
             [t for qi, t in enumerate(q.terms) if int(bits[i]) >> qi & 1]) for i in top]
