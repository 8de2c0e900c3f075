"""Safe, bounded reads of a caller's SQLite file: the one place the daemon opens a job's source.

Split out of ``jobs.py`` so that every read of a source (a job's chunks, the
texts a ``with_text`` search reads back) goes through the same checks and the
same limits; ``jobs.py`` re-exports these names.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import sqlite_utils

from pocketembed.clients import Forbidden
from pocketembed.errors import SourceError

log = logging.getLogger("pocketembed.sources")


@dataclass(frozen=True)
class JobSpec:
    db: str
    table: str
    id_column: str
    text_column: str
    where: str | None = None
    collection: str | None = None
    model: str | None = None
    truncate: bool = True

    @property
    def origin(self) -> str:
        """Names the source rows a sweep may delete: same db, table, id and text columns."""
        return f"{self.db}|{self.table}|{self.id_column}|{self.text_column}"


def check_source_allowed(db: str, allowed: list[Path], home: Path) -> None:
    """Forbidden unless ``db`` (symlinks resolved) lies under one of ``allowed``, and never in ``home``.

    The refusal says nothing of what the file holds: a client that may submit
    jobs must not learn the tables of files it was not given.
    """
    path = Path(db).resolve()
    own = home.resolve()
    if path == own or own in path.parents:
        raise Forbidden("jobs cannot read the daemon's own data directory")
    if not any(path.is_relative_to(Path(d).resolve()) for d in allowed):
        raise Forbidden("db is not under a configured job source directory (job_sources); "
                        + ("none is configured" if not allowed else "the daemon's owner chooses them"))


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class SourceTable:
    """The caller's table, read-only, in keyset chunks.

    Every statement runs under a time budget (SQLite's progress handler): the
    ``where`` is the caller's SQL, and one that never ends (a recursive CTE)
    fails with ``bad_source`` instead of holding a daemon thread forever.
    """

    def __init__(self, spec: JobSpec, budget_s: float = 5.0) -> None:
        self.spec = spec
        self.budget_s = budget_s
        self._deadline = float("inf")
        path = Path(spec.db)
        if not path.is_absolute():
            raise SourceError(f"db must be an absolute path, got {spec.db!r}")
        if not path.is_file():
            raise SourceError(f"no database file at {spec.db}")
        try:
            self.conn = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=10,
                                        isolation_level=None, check_same_thread=False)
            tables = set(sqlite_utils.Database(self.conn).table_names()) | set(sqlite_utils.Database(self.conn).view_names())
        except sqlite3.Error as e:
            raise SourceError(f"cannot read {spec.db} as SQLite: {e}") from None
        self.conn.set_progress_handler(lambda: time.monotonic() > self._deadline, 1000)
        if spec.table not in tables:
            raise SourceError(f"{spec.db} has no table {spec.table!r}; it has: {', '.join(sorted(tables)) or 'none'}")
        cols = {c.name for c in sqlite_utils.Database(self.conn)[spec.table].columns}
        for col in (spec.id_column, spec.text_column):
            if col not in cols and col != "rowid":
                raise SourceError(f"table {spec.table!r} has no column {col!r}; it has: {', '.join(sorted(cols))}")
        self._from = f"FROM {_q(spec.table)} WHERE {_q(spec.id_column)} IS NOT NULL" + (f" AND ({spec.where})" if spec.where else "")
        try:
            self._execute(f"SELECT 1 {self._from} LIMIT 0")
        except SourceError as e:
            raise SourceError(f"bad --where {spec.where!r}: {e.message}") from None

    def _execute(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        """The rows of one statement on the source, fully read within the time budget."""
        self._deadline = time.monotonic() + self.budget_s
        try:
            return self.conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as e:
            if str(e) == "interrupted":
                raise SourceError(f"a statement on {self.spec.table!r} took longer than {self.budget_s:g} s "
                                  "(source_budget_s); simplify the where or add an index") from None
            raise SourceError(f"reading {self.spec.table!r} from {self.spec.db}: {e}") from None
        except sqlite3.Error as e:
            raise SourceError(f"reading {self.spec.table!r} from {self.spec.db}: {e}") from None
        finally:
            self._deadline = float("inf")

    def check_unique(self) -> None:
        n, distinct = self._one(f"SELECT COUNT(*), COUNT(DISTINCT {_q(self.spec.id_column)}) {self._from}")
        if n != distinct:
            raise SourceError(f"column {self.spec.id_column!r} is not unique in {self.spec.table!r} "
                              f"({n - distinct} duplicate ids); index by a primary key")

    def count(self) -> int:
        return self._one(f"SELECT COUNT(*) {self._from}")[0]

    def after(self, cursor: Any, limit: int) -> list[tuple[Any, Any]]:
        """Up to ``limit`` (id, text) rows with id > cursor, in id order; one short read."""
        i, t = _q(self.spec.id_column), _q(self.spec.text_column)
        sql = f"SELECT {i}, {t} {self._from}" + (f" AND {i} > ?" if cursor is not None else "") + f" ORDER BY {i} LIMIT ?"
        return self._execute(sql, (cursor, limit) if cursor is not None else (limit,))

    def texts(self, ids: list[Any]) -> dict[Any, str]:
        """id → text of these rows (search results ask for them back)."""
        i, t = _q(self.spec.id_column), _q(self.spec.text_column)
        out: dict[Any, str] = {}
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            sql = f"SELECT {i}, {t} FROM {_q(self.spec.table)} WHERE {i} IN ({','.join('?' * len(part))})"
            out.update((row_id, text) for row_id, text in self._execute(sql, part) if isinstance(text, str))
        return out

    def _one(self, sql: str) -> tuple[Any, ...]:
        return self._execute(sql)[0]

    def close(self) -> None:
        self.conn.close()


def source_texts(conn: sqlite3.Connection, origin: str, ids: list[Any]) -> dict[Any, str]:
    """Texts of items a job wrote, read back from its source table ({} when it cannot be read now).

    ``origin`` is the job's ``JobSpec.origin``; the store keeps it per item
    instead of a copy of the text, which stays in the caller's database.
    """
    row = conn.execute("SELECT db, table_name, id_column, text_column FROM jobs WHERE "
                       "db || '|' || table_name || '|' || id_column || '|' || text_column = ? ORDER BY id DESC LIMIT 1",
                       (origin,)).fetchone()
    if row is None:
        return {}
    try:
        source = SourceTable(JobSpec(*row))
    except SourceError as e:
        log.warning("cannot read search results' texts back: %s", e.message)
        return {}
    try:
        return source.texts(ids)
    except SourceError as e:
        log.warning("cannot read search results' texts back: %s", e.message)
        return {}
    finally:
        source.close()
