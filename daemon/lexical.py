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

So the index is ordinary tables, and a delete is a plain row delete that
``PRAGMA secure_delete=ON`` (set in :func:`daemon.store.connect`) zeroes in the file, the
WAL emptied by a ``wal_checkpoint(TRUNCATE)`` once the delete has committed
(:func:`daemon.store.checkpoint_deleted`).

No term is stored as text, anywhere. A B-tree keyed by a value keeps copies of some keys in its
*interior* pages as dividers, and a delete does not rewrite them (``secure_delete`` zeroes the leaf
cell only): a first version keyed postings by ``(collection, term, row)`` and the daemon delete test
found a deleted message's word in index.db. So every key is an integer: a term is filed under a
64-bit keyed hash (BLAKE2b, a random 16-byte key per collection) and a small term id:

``lex_collections(cid INTEGER PRIMARY KEY AUTOINCREMENT, name UNIQUE, salt, n, total_len)``
    per collection: the hash key, its documents and their total length (BM25's N and average
    length). ``cid`` is never reused; a drop zeroes the key with the row.
``lex_terms(tid INTEGER PRIMARY KEY, cid, h, df)``, index ``lex_terms_h(cid, h)``
    one row per distinct term of a collection: its hash and document frequency, so a query
    knows each term's rarity before it reads any posting. Removed when its df reaches 0.
``lex_postings(tid, row, tf, dl) PRIMARY KEY (tid, row) WITHOUT ROWID``
    the inverted lists: a term's postings are one range read; ``dl`` (the item's length) is
    kept with each so that BM25 needs no second lookup.
``lex_docs(row INTEGER PRIMARY KEY, cid, length, hash, tids)``
    one per item, keyed by the rowid of the item's first row in ``items`` (chunk 0, or chunk 1
    of a chunked item: its text is indexed once); ``tids`` is the JSON array of its term ids,
    sorted, which is what lets a delete find its postings without the text.

Triggers keep them exact on every path that removes an item: a delete from ``items``
(``index.delete``, queued deletions, a job's sweep, the chunks a ``put`` drops) deletes its
``lex_docs`` row, whose trigger deletes its postings, decrements ``df`` and the collection's
N and length. A write puts the new postings in the writer's transaction; a kill -9 therefore
leaves the lexical index and the vectors holding exactly the same items.

What the index reveals without the text
---------------------------------------
With ``store_text`` off no text is stored and no term either, but the index is still a *bag of
words* per item: which (hashed) terms occur in which item, how often (``tf``), and the item's
length in terms. The hash key lives in the same file, so someone holding index.db can test a
guess: "which messages contain 07700900123 / this name?" (not read the messages: no word order,
no positions, and a term's text is never stored). A deleted item's postings are gone; a hash of
one of its terms may survive as a divider in ``lex_terms_h``'s interior pages while its collection
lives (confirming a guess that the term was once in it), and becomes meaningless when the
collection is dropped (its key is zeroed). That is the price of lexical search over private
texts; a collection that must not reveal it can be searched by vectors alone (which reveal
meaning too).

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
* partial numbers match: an indexed digit term of more than 4 digits also files its prefixes
  of 4 digits and more (as marked terms), so a query's digit term of >= 4 digits finds the
  longer numbers it begins: ``0905000`` finds ``09050000327``, and a number glued to what
  follows it (``0871277810910p``) is found by the number alone. A prefix-only match counts
  :data:`PREFIX_WEIGHT` of an exact one, so ``87239`` ranks the message holding 87239 first.
  (Hashed terms have no order, so a B-tree range over terms is not available; the prefixes
  cost ~7 extra postings per phone number, few in SMS. Infixes — the last digits — are not
  matched.)

Query syntax: none. Quotes, ``*``, ``-``, ``:``, ``^``, ``NEAR``, ``AND``/``OR``/``NOT`` and
unbalanced quotes are plain text (``near`` is a word); the SQL is parameterised only. A
quoted phrase is reported (:class:`Query.phrases`) so that a caller can boost items whose
``matched_terms`` cover it; positions are not stored, so "exact phrase" means "all its terms".

API (used by daemon/store.py; the store's own API is in its docstring)
----------------------------------------------------------------------
``tokenize(text) -> list[str]``
``parse_query(text) -> Query``
``doc_terms(text) -> (Counter, length)``
``document_frequencies(conn, collection, terms) -> dict[str, int]``
``index_docs(conn, collection, docs: list[tuple[row, text_hash, text]]) -> int``
``remove_rows(conn, rows)`` / ``drop(conn, collection)``
``search(conn, collection, query, n, allowed) -> list[tuple[int, float, list[str]]]``
``stats(conn, collection) -> (docs, total_len)``
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
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
MAX_QUERY_TERMS = 32
MAX_TERM_CHARS = 64
"""Longer runs (a URL's token, base64) are cut to this: a term is a key, not a payload."""
FULL_BUDGET = 5_000
"""Postings read in full per query (the rarest term's always). A term whose postings would take the
candidates past this (a word in every other message, like "u" or "to") only scores the candidates
its rarer terms found, looked up one by one when they are few (:data:`LOOKUP_CAP`), else not at all:
its IDF is low, it would reorder little."""
LOOKUP_CAP = 2_000
FIRST_CAP = 10_000
"""A query of common words only ("you", "and") reads at most this many postings of its rarest term, the
newest rows' (a phone's recent messages): BM25 over a word in a third of the collection ranks little
that matters, and reading them all cost 35-45 ms at 100,000 items against 2 ms for a typical query."""
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
# The tables (lex_collections, lex_terms, lex_docs, lex_postings) and their triggers are made by
# daemon/migrations.py, with the rest of index.db.

LEX_BTREES = ("lex_collections", "sqlite_autoindex_lex_collections_1", "lex_terms", "lex_terms_h", "lex_docs",
              "lex_postings")
"""The lexical side's B-trees (dbstat names): what its size on disk is summed over."""
PREFIX_MARK = "\x01"
"""Marks an indexed digit prefix ("\x010905000"): never equal to a term the tokenizer makes."""


def doc_terms(text: str) -> tuple[Counter, int]:
    """An item's indexed terms with their counts, and its length (the tokenizer's terms; prefixes not counted).

    A digit term of more than :data:`PREFIX_MIN` digits also files its prefixes of
    :data:`PREFIX_MIN` digits and more (marked), so a partial number is an exact lookup.
    """
    tf = Counter(tokenize(text))
    dl = sum(tf.values())
    for term in [t for t in tf if len(t) > PREFIX_MIN and t.isdigit() and t.isascii()]:
        for k in range(PREFIX_MIN, len(term)):
            tf[PREFIX_MARK + term[:k]] += 1
    return tf, dl


def _term_hash(salt: bytes, term: str) -> int:
    return int.from_bytes(hashlib.blake2b(term.encode("utf-8", "surrogatepass"), key=salt, digest_size=8).digest(),
                          "little", signed=True)


def _collection(conn: sqlite3.Connection, collection: str, create: bool = False) -> tuple[int, bytes] | None:
    row = conn.execute("SELECT cid, salt FROM lex_collections WHERE name = ?", (collection,)).fetchone()
    if row is None and create:
        salt = secrets.token_bytes(16)
        return conn.execute("INSERT INTO lex_collections (name, salt) VALUES (?, ?)", (collection, salt)).lastrowid, salt
    return (row[0], row[1]) if row else None


def term_ids(conn: sqlite3.Connection, collection: str, terms: Sequence[str]) -> dict[str, tuple[int, int]]:
    """term → (its id, df) for the terms the collection's items hold."""
    coll = _collection(conn, collection)
    if coll is None or not terms:
        return {}
    cid, salt = coll
    by_hash = {_term_hash(salt, t): t for t in terms}
    out: dict[str, tuple[int, int]] = {}
    hashes = list(by_hash)
    for i in range(0, len(hashes), ROW_BATCH):
        part = hashes[i:i + ROW_BATCH]
        for h, tid, df in conn.execute(f"SELECT h, tid, df FROM lex_terms WHERE cid = ? AND h IN ({','.join('?' * len(part))})",
                                       (cid, *part)):
            out[by_hash[h]] = (tid, df)
    return out


# -- writes (inside the caller's transaction) -----------------------------------------------

def index_docs(conn: sqlite3.Connection, collection: str, docs: Sequence[tuple[int, str | None, str]]) -> int:
    """Index (or re-index) items: (rowid of the item's first row, its text hash, its text).

    A row already indexed with the same hash keeps its postings; another hash replaces them.
    Returns how many were (re)indexed.
    """
    if not docs:
        return 0
    cid, salt = _collection(conn, collection, create=True)
    todo: dict[int, tuple[str | None, str]] = {}
    for row, h, text in docs:  # the last text for a row wins
        todo[row] = (h, text)
    have = indexed_rows(conn, list(todo))
    todo = {r: v for r, v in todo.items() if not (r in have and have[r] == v[0] and v[0] is not None)}
    if not todo:
        return 0
    remove_rows(conn, [r for r in todo if r in have])
    parsed = {row: doc_terms(text) for row, (_, text) in todo.items()}
    vocab = sorted({t for tf, _ in parsed.values() for t in tf})
    tid_of = {t: v[0] for t, v in term_ids(conn, collection, vocab).items()}
    for t in vocab:
        if t not in tid_of:
            tid_of[t] = conn.execute("INSERT INTO lex_terms (cid, h, df) VALUES (?, ?, 0)",
                                     (cid, _term_hash(salt, t))).lastrowid
    postings, doc_rows, df = [], [], Counter()
    total = 0
    for row, (tf, dl) in parsed.items():
        total += dl
        tids = sorted(tid_of[t] for t in tf)
        doc_rows.append((row, cid, dl, todo[row][0], json.dumps(tids)))
        postings += [(tid_of[t], row, c, dl) for t, c in tf.items()]
        df.update(tids)
    conn.executemany("INSERT INTO lex_docs (row, cid, length, hash, tids) VALUES (?, ?, ?, ?, ?)", doc_rows)
    conn.executemany("INSERT INTO lex_postings (tid, row, tf, dl) VALUES (?, ?, ?, ?)", postings)
    conn.executemany("UPDATE lex_terms SET df = df + ? WHERE tid = ?", [(c, tid) for tid, c in df.items()])
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
    coll = _collection(conn, collection)
    if coll is None:
        return
    cid = coll[0]
    conn.execute("DELETE FROM lex_collections WHERE cid = ?", (cid,))
    conn.execute("DELETE FROM lex_postings WHERE tid IN (SELECT tid FROM lex_terms WHERE cid = ?)", (cid,))
    conn.execute("DELETE FROM lex_terms WHERE cid = ?", (cid,))
    conn.execute("DELETE FROM lex_docs WHERE row IN (SELECT rowid FROM items WHERE collection = ?)", (collection,))
    conn.execute("DELETE FROM lex_docs WHERE cid = ?", (cid,))  # any left (not expected)


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

def idf(n_docs: int, df: int) -> float:
    """BM25's IDF of a term in df of n_docs documents (a term in none: the rarest possible)."""
    return math.log(1.0 + (n_docs - df + 0.5) / (df + 0.5))


def document_frequencies(conn: sqlite3.Connection, collection: str, terms: Sequence[str]) -> dict[str, int]:
    """How many items of the collection hold each term (absent terms are left out)."""
    return {t: df for t, (_, df) in term_ids(conn, collection, list(terms)).items()}


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
    row = conn.execute("SELECT n, total_len FROM lex_collections WHERE name = ?", (collection,)).fetchone()
    if row is None or not row[0]:
        return []
    N, total = row
    avgdl = max(total / N, 1e-9)
    # (query term index, term id, df, weight): each query term and, for a number, the longer numbers it begins.
    wanted = {t: (qi, 1.0) for qi, t in enumerate(q.terms)}
    wanted.update({PREFIX_MARK + t: (qi, PREFIX_WEIGHT) for qi, t in enumerate(q.terms) if q.prefix(t)})
    plan = [(wanted[t][0], tid, df, wanted[t][1]) for t, (tid, df) in term_ids(conn, collection, list(wanted)).items()]
    if not plan:
        return []
    plan.sort(key=lambda p: p[2])
    rows_l, contrib_l, qbits_l = [], [], []
    candidates: np.ndarray | None = None
    seen = 0
    for qi, tid, df, weight in plan:
        term_idf = idf(N, df)
        if candidates is None or seen + df <= FULL_BUDGET:
            got = conn.execute("SELECT row, tf, dl FROM lex_postings WHERE tid = ? ORDER BY row DESC LIMIT ?",
                               (tid, FIRST_CAP)).fetchall()
            seen += len(got)
        else:
            cand = np.unique(candidates)
            if not len(cand) or len(cand) > LOOKUP_CAP:
                continue
            got = conn.execute("SELECT row, tf, dl FROM lex_postings WHERE tid = ? AND row IN "
                               "(SELECT value FROM json_each(?))", (tid, json.dumps(cand.tolist()))).fetchall()
        if not got:
            continue
        arr = np.array(got, np.int64)
        tf, dl = arr[:, 1].astype(np.float64), arr[:, 2].astype(np.float64)
        rows_l.append(arr[:, 0])
        contrib_l.append(weight * term_idf * tf * (K1 + 1) / (tf + K1 * (1 - B + B * dl / avgdl)))
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
