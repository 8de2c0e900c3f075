"""SQL functions that call the daemon from a ``sqlite3`` connection.

    import json
import sqlite3
    from pocketembed.ipc import sqlite as pe_sqlite
    conn = sqlite3.connect("sms.db")
    pe_sqlite.register(conn)
    conn.execute("SELECT id, pe_cosine(pe_embed(body), pe_embed(?)) AS s FROM messages ORDER BY s DESC", ["dinner?"])
    # search a collection the daemon indexed (e.g. by `pocketembed index`), best first:
    conn.execute("SELECT value ->> 'id', value ->> 'score' FROM json_each(pe_search('sms', ?, 10))", ["dinner?"])

Vectors are BLOBs of little-endian float32, the protocol's raw form, so a
vector stored by one side is read unchanged by the other.
"""

from __future__ import annotations

import json
import sqlite3

import numpy as np

from .client import Client, DaemonError


class SQLFunctions:
    """What ``register`` installed: the client it uses and the last daemon error.

    Python's sqlite3 turns any exception raised in a SQL function into a generic
    "user-defined function raised exception", so the daemon's error code is kept
    here for the caller to inspect after a failed statement.
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self.last_error: DaemonError | None = None


def register(conn: sqlite3.Connection, client: Client | None = None, *, model: str | None = None,
             endpoint: str | None = None, token: str | None = None) -> SQLFunctions:
    """Add ``pe_embed(text [, model])``, ``pe_cosine(blob, blob)`` and ``pe_search(collection, query, k [, mode])``.

    ``pe_search`` returns the hits as JSON text, a list of ``{"id", "score",
    "metadata"}`` best first, for ``json_each``.

    A daemon error makes the statement fail (sqlite3.OperationalError) and is kept
    in the returned object's ``last_error``; NULL text gives NULL. Without a
    ``client``, one is made for ``endpoint`` with ``token`` (a TCP endpoint needs one).
    """
    funcs = SQLFunctions(client or Client(endpoint, token=token))

    def pe_embed(text: str | None, name: str | None = None) -> bytes | None:
        if text is None:
            return None
        try:
            vec = funcs.client.embed([text], model=name or model)
        except DaemonError as e:
            funcs.last_error = e
            raise
        return vec[0].astype("<f4").tobytes()

    def pe_cosine(a: bytes | None, b: bytes | None) -> float | None:
        if a is None or b is None:
            return None
        va, vb = np.frombuffer(a, dtype="<f4"), np.frombuffer(b, dtype="<f4")
        if va.shape != vb.shape or va.size == 0:
            raise sqlite3.OperationalError(f"pe_cosine: vectors of {va.size} and {vb.size} dims")
        denom = float(np.linalg.norm(va) * np.linalg.norm(vb))
        return float(va @ vb) / denom if denom else 0.0

    def pe_search(collection: str | None, query: str | None, k: int = 10, mode: str | None = None) -> str | None:
        if collection is None or query is None:
            return None
        try:
            hits = funcs.client.search(collection, query, k=int(k), mode=mode)
        except DaemonError as e:
            funcs.last_error = e
            raise
        return json.dumps(hits, ensure_ascii=False)

    conn.create_function("pe_search", 2, pe_search)
    conn.create_function("pe_search", 3, pe_search)
    conn.create_function("pe_search", 4, pe_search)
    conn.create_function("pe_embed", 1, pe_embed)
    conn.create_function("pe_embed", 2, pe_embed)
    conn.create_function("pe_cosine", 2, pe_cosine, deterministic=True)
    return funcs
