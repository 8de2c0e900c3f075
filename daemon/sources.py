"""Safe, bounded reads of a caller's SQLite file: the one place the daemon opens a job's source.

A job's source is read long after ``jobs.submit`` accepted its path: by every
chunk of the job, and by every ``search(with_text=True)`` that reads its hits'
texts back. Whoever can write in a ``job_sources`` directory can replace the
file meanwhile, so each opening checks again, and reads what it checked:

* the path's symbolic links are resolved and the resolved path must lie under
  ``job_sources`` and outside the daemon's own data directory
  (:func:`check_source_allowed`, the same check as ``jobs.submit``);
* the resolved path is then walked from ``/`` one component at a time with
  ``O_NOFOLLOW``: a link that appeared since (a directory above the file
  swapped for a link, say) fails the walk; the file must be a regular file,
  and so must its ``-wal`` / ``-shm`` / ``-journal`` companions if present;
* SQLite opens the file by name, so once it has, the descriptor SQLite holds
  is compared (``fstat``) with the checked file's inode, and the WAL's with the
  checked directory's ``-wal``: a swap between the check and SQLite's own
  open is refused instead of read. (SQLite offers no way to open a given
  descriptor, and a ``/proc/self/fd`` path does not help: SQLite resolves the
  link to its target's name itself, and looks for the ``-wal`` by name.)

What a path check cannot see: a **hard link** inside a ``job_sources``
directory to a file elsewhere is that file, indistinguishable from one created
there. Only someone who may already read the file can make one (Linux's
``fs.protected_hardlinks``, on by default and on Android); a hard link to one of
the daemon's own files is refused by its inode all the same. The ``-shm`` file
SQLite opens by name is checked beforehand only.

Reads are bounded in time and size whatever the caller's ``where`` computes or
the file holds. Every statement runs under a deadline: SQLite's progress
handler, checked every ``PROGRESS_STEPS`` VDBE steps, and a busy timeout no
longer than what is left of the deadline (an app's lock cannot stretch it).
The progress handler cannot stop one step, so no step may be long either:

* no value read or computed may exceed ``MAX_VALUE_BYTES``
  (``SQLITE_LIMIT_LENGTH``): a 50 MB ``randomblob`` in a ``where`` fails at
  once instead of running for seconds between two progress checks;
* a LIKE / GLOB pattern is at most ``MAX_PATTERN_BYTES``; its cost is the
  value's length times the pattern's (49 KB patterns took 84 s on 1 MB);
* ``instr``, ``replace`` and two-argument ``trim`` / ``ltrim`` / ``rtrim``,
  whose built-in forms cost the product of their arguments' lengths (13 s for
  one ``trim`` of 256 KiB), are replaced on source connections by linear ones
  (:func:`_linear_functions`);
* texts come back cut to ``MAX_TEXT_CHARS`` (``substr`` in the SELECT, blobs
  are never loaded), so a chunk's memory is bounded too.

Measured with a 5 s budget on 20,000 rows: 50 MB and 100 MB ``randomblob``
wheres fail at once (previously 28 s and 59 s for 2,000 rows); where clauses
built to be slow per row (three 250 KB randomblobs, four instr / two trim /
four LIKE of 130 KB values, a never-ending recursive CTE, an ORDER BY over
millions of made-up rows) are cut after 5.00-5.27 s (instr: 11.5 s before,
trim: not cut within 15 minutes); an exclusively locked source: 5.01 s (10 s).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import sqlite3
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pocketembed.clients import Forbidden
from pocketembed.errors import Busy, InvalidInput, PocketEmbedError, SourceError

log = logging.getLogger("pocketembed.sources")

MAX_TEXT_CHARS = 65_536
"""Texts are read cut to this many characters (+1, so a longer one shows): what a job embeds at most.

More than a request's text may carry (ipc/protocol.py's MAX_TEXT_BYTES, 16 KiB): a job reads rows
it did not choose, so a long one is cut and truncated (``truncate``) or recorded as its error, never
refusing the job; a request's sender can split its own texts."""
MAX_VALUE_BYTES = 4 * MAX_TEXT_CHARS
"""The largest string or blob a statement on a source may read or compute (SQLITE_LIMIT_LENGTH): 256 KiB, what
MAX_TEXT_CHARS characters of any script take in UTF-8. A longer text is one row error (too_large)."""
MAX_PATTERN_BYTES = 1000
"""The longest LIKE / GLOB pattern (SQLITE_LIMIT_LIKE_PATTERN_LENGTH): one match then costs at most ~0.6 s."""
PROGRESS_STEPS = 10
"""VDBE steps between two deadline checks (every 10: ~+60% on a bare scan, a few ms on a 40,000-row table)."""
COMPANIONS = ("-wal", "-shm", "-journal")
"""Files SQLite opens beside a database by name."""

_O_PATH = getattr(os, "O_PATH", os.O_RDONLY)
"""Directories are walked with O_PATH where there is one (Linux, Android): search permission is enough, as for a path."""

Allow = Callable[[str], None]
"""Raises Forbidden unless a (resolved) path may be read: the daemon's job_sources check."""


def allow_none(db: str) -> None:
    """The Allow of a component given no job_sources check: no source may be read."""
    raise Forbidden("no job source directories (job_sources) apply here")


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


class ValueTooLarge(SourceError):
    """A value read or computed on a source over MAX_VALUE_BYTES (``bad_source`` when it fails a request)."""


@dataclass(frozen=True)
class Unreadable:
    """A row whose text cannot be read within the limits; the job records ``code`` for it and goes on."""

    code: str
    message: str


def check_path(db: str) -> None:
    """Refuse what can never name a file: a NUL byte (``invalid_input``) or a relative path."""
    if "\x00" in db:
        raise InvalidInput("db contains a NUL byte, which no file name can hold")
    if not db.startswith("/"):
        raise SourceError(f"db must be an absolute path, got {db!r}")


def check_source_allowed(db: str, allowed: list[Path], home: Path) -> None:
    """Forbidden unless ``db`` (symlinks resolved) lies under one of ``allowed``, and never in ``home``.

    Decided on the path alone, before anything is opened, and never failing on
    what the path holds: a path outside is refused the same whether it exists,
    loops or is too long, and the refusal says nothing of it (a client that may
    submit jobs must not learn about files it was not given). A file inside
    that is one of the daemon's own under another name (a hard link) is
    refused by its inode.
    """
    check_path(db)
    try:
        path = Path(os.path.realpath(db))  # non-strict: a missing, looping or overlong path resolves as far as it can
    except OSError:  # a link that stopped being one between lstat and readlink: someone is swapping it
        raise SourceError(f"{db} changed while it was being checked (a symbolic link on its path was "
                          "replaced); try again") from None
    own = home.resolve()
    if path == own or own in path.parents:
        raise Forbidden("jobs cannot read the daemon's own data directory")
    if not any(path.is_relative_to(Path(d).resolve()) for d in allowed):
        raise Forbidden("db is not under a configured job source directory (job_sources); "
                        + ("none is configured" if not allowed else "the daemon's owner chooses them"))
    try:
        st = os.stat(path)
    except OSError:
        return  # opening it says what is wrong, and may: it is inside job_sources
    if (st.st_dev, st.st_ino) in _own_inodes(own):
        raise Forbidden("jobs cannot read the daemon's own data directory (this file is one of its files "
                        "under another name: a hard link)")


def _own_inodes(home: Path) -> set[tuple[int, int]]:
    """(device, inode) of the files directly in the daemon's data directory: index.db and its WAL, clients, lock."""
    out: set[tuple[int, int]] = set()
    try:
        with os.scandir(home) as entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    out.add((st.st_dev, st.st_ino))
    except OSError:
        pass
    return out


def _os_error(db: str, e: OSError) -> SourceError:
    """A path the daemon cannot open, said plainly (too long, a loop, not a directory, permission)."""
    if e.errno == errno.ENOENT:
        return SourceError(f"no database file at {db}")
    return SourceError(f"cannot open {db}: {e.strerror or e}")


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@dataclass
class _Pinned:
    """The checked file: its resolved path, its inode, and its directory held open."""

    path: str
    st: os.stat_result
    dir_fd: int
    companions: dict[str, os.stat_result]
    """-wal / -shm / -journal present beside it when checked, by suffix."""

    def close(self) -> None:
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


def _pin(db: str, allow: Allow | None) -> _Pinned:
    """Resolve ``db``, check it (``allow``) and open it without following any link, as explained above."""
    try:
        return _pin_checked(db, allow)
    except OSError as e:  # whatever the walk did not foresee is still a source that cannot be opened
        raise _os_error(db, e) from None


def _pin_checked(db: str, allow: Allow | None) -> _Pinned:
    check_path(db)
    if allow is not None:
        allow(db)  # first on the path as given: a path outside is refused before anything is looked at
    try:
        resolved = os.path.realpath(db, strict=True)
    except OSError as e:
        raise _os_error(db, e) from None
    if allow is not None:
        allow(resolved)
    parts = [p for p in resolved.split("/") if p]
    if not parts:
        raise SourceError(f"{db} is not a regular file")
    dir_fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in parts[:-1]:
            try:
                fd = os.open(name, _O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                    raise SourceError(f"{db} changed while it was being opened (a directory on its path was "
                                      "replaced); try again") from None
                raise _os_error(db, e) from None
            os.close(dir_fd)
            dir_fd = fd
        name = parts[-1]
        try:  # O_NONBLOCK: a FIFO planted there must not hang the thread
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise SourceError(f"{db} changed while it was being opened (it became a symbolic link); "
                                  "try again") from None
            raise _os_error(db, e) from None
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SourceError(f"{db} is not a regular file")
        companions: dict[str, os.stat_result] = {}
        for suffix in COMPANIONS:
            try:
                cst = os.stat(name + suffix, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise _os_error(db + suffix, e) from None
            if not stat.S_ISREG(cst.st_mode) or cst.st_nlink > 1:
                what = "a symbolic link" if stat.S_ISLNK(cst.st_mode) else \
                    "a hard link" if stat.S_ISREG(cst.st_mode) else "not a regular file"
                raise SourceError(f"{name}{suffix} beside {db} is {what}; SQLite would read it as that "
                                  "database's own, so the source is refused until it is removed")
            companions[suffix] = cst
        return _Pinned(resolved, st, dir_fd, companions)
    except BaseException:
        os.close(dir_fd)
        raise


# -- the descriptors SQLite holds ---------------------------------------------------------------

_SQLITE_FCNTL_FILE_POINTER = 7
_SQLITE_FCNTL_JOURNAL_POINTER = 28


class _SqliteFiles:
    """Reads the file descriptors of a connection's database and WAL, through sqlite3_file_control.

    Python's sqlite3 does not expose them. The ``sqlite3 *`` is the first field
    after the object header of CPython's connection object, and the unix VFS's
    ``unixFile`` starts with three pointers and then the descriptor; both
    layouts have held for over a decade, and both are checked once, on a probe
    database, before any use: if the probe's descriptor is not the probe file,
    this is off and a second walk after opening stands in (it narrows the
    window of a swap but cannot close it).
    """

    def __init__(self) -> None:
        self.ok = False
        self._fc: Any = None
        if sys.implementation.name != "cpython" or hasattr(sys, "gettotalrefcount"):
            return
        try:
            import _sqlite3

            lib = ctypes.CDLL(_sqlite3.__file__)
            fc, filename = lib.sqlite3_file_control, lib.sqlite3_db_filename
        except (ImportError, OSError, AttributeError):
            return
        fc.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p]
        fc.restype = ctypes.c_int
        filename.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        filename.restype = ctypes.c_char_p
        self._fc = fc
        try:
            with tempfile.TemporaryDirectory(prefix="pe-probe-") as tmp:
                path = os.path.realpath(os.path.join(tmp, "probe.db"))
                sqlite3.connect(path).close()
                conn = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True)
                try:
                    handle = self._handle(conn)
                    if handle and filename(handle, b"main") == path.encode():
                        fd = self.fd(conn, "main")
                        self.ok = fd is not None and _same(os.fstat(fd), os.stat(path))
                finally:
                    conn.close()
        except (OSError, sqlite3.Error, ValueError):
            self.ok = False
        if not self.ok:
            log.warning("cannot read SQLite's file descriptors on this build; a source swapped for a link "
                        "between its check and SQLite's open is caught by a second walk only")

    @staticmethod
    def _handle(conn: sqlite3.Connection) -> int | None:
        return ctypes.c_void_p.from_address(id(conn) + object.__basicsize__).value

    def fd(self, conn: sqlite3.Connection, what: str) -> int | None:
        """SQLite's descriptor of the database (``main``) or of its WAL / journal (``journal``); None if not open."""
        handle = self._handle(conn)
        if not handle:
            return None
        op = _SQLITE_FCNTL_FILE_POINTER if what == "main" else _SQLITE_FCNTL_JOURNAL_POINTER
        ptr = ctypes.c_void_p()
        if self._fc(handle, b"main", op, ctypes.byref(ptr)) != 0 or not ptr.value:
            return None
        if not ctypes.c_void_p.from_address(ptr.value).value:  # pMethods: NULL when the file is not open
            return None
        fd = ctypes.c_int.from_address(ptr.value + 3 * ctypes.sizeof(ctypes.c_void_p)).value
        return fd if fd >= 0 else None


_FILES: _SqliteFiles | None = None


def _files() -> _SqliteFiles:
    global _FILES
    if _FILES is None:
        _FILES = _SqliteFiles()
    return _FILES


_builtins = threading.local()


def _builtin(name: str, args: tuple) -> Any:
    """SQLite's own ``name(*args)``, on this thread's private in-memory connection (for small non-TEXT arguments)."""
    conn = getattr(_builtins, "conn", None)
    if conn is None:
        conn = _builtins.conn = sqlite3.connect(":memory:")
    return conn.execute(f"SELECT {name}({', '.join('?' * len(args))})", args).fetchone()[0]


def _linear(name: str, text: Callable[..., Any]) -> Callable[..., Any]:
    """``name`` in linear time: ``text`` for TEXT, INTEGER or NULL arguments (a where over a text column), SQLite's
    built-in for small other ones (reals, short blobs: the same result), else a refusal."""

    def fn(*original: Any) -> Any:
        if name == "replace" and isinstance(original[0], (str, int, float)) and original[1] in ("", b""):
            return original[0]  # SQLite hands X back as it was (an INTEGER stays one)
        args = tuple(str(a) if isinstance(a, int) else a for a in original)  # as SQLite renders an integer
        if all(a is None or isinstance(a, str) for a in args):
            return text(*args)
        if all(not isinstance(a, (str, bytes)) or len(a) <= 4096 for a in args):
            return _builtin(name, original)
        raise ValueError(f"{name}() of a long BLOB is not allowed in a job source's where")

    return fn


def _strip(x: str | None, chars: str | None, left: bool, right: bool) -> str | None:
    """SQLite's trim(X, Y): drop the characters of Y from X's ends, in O(len X + len Y) (str.strip is O(X*Y))."""
    if x is None or chars is None:
        return None
    drop = set(chars)
    i, j = 0, len(x)
    while left and i < j and x[i] in drop:
        i += 1
    while right and j > i and x[j - 1] in drop:
        j -= 1
    return x[i:j]


def _instr(x: str | None, y: str | None) -> int | None:
    return None if x is None or y is None else x.find(y) + 1


def _replace(x: str | None, y: str | None, z: str | None) -> str | None:
    """SQLite's order: NULL X or Y gives NULL, an empty Y gives X back (even with a NULL Z), then a NULL Z gives NULL."""
    if x is None or y is None:
        return None
    if y == "":
        return x
    return None if z is None else x.replace(y, z)


def _linear_functions() -> list[tuple[str, int, Callable[..., Any]]]:
    """The built-ins whose cost is the product of their arguments' lengths, in linear forms with their results.

    (CPython's str.find and str.replace use a linear two-way search for long needles.)
    """
    return [
        ("instr", 2, _linear("instr", _instr)),
        ("replace", 3, _linear("replace", _replace)),
        ("trim", 2, _linear("trim", lambda x, y: _strip(x, y, True, True))),
        ("ltrim", 2, _linear("ltrim", lambda x, y: _strip(x, y, True, False))),
        ("rtrim", 2, _linear("rtrim", lambda x, y: _strip(x, y, False, True))),
    ]


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class SourceTable:
    """The caller's table, read-only, in keyset chunks; opened and re-checked as the module says.

    Every statement runs under a time budget: the ``where`` is the caller's
    SQL, and one that never ends (a recursive CTE), waits on a lock or builds
    huge values fails with ``bad_source`` instead of holding a daemon thread.
    ``allow`` is the job_sources check (None: none, for callers that checked
    otherwise); it is applied at every opening and before every chunk.
    ``deadline`` (time.monotonic()) bounds the opening as a whole, default one
    budget from now.
    """

    def __init__(self, spec: JobSpec, budget_s: float = 5.0, *, allow: Allow | None = None,
                 deadline: float | None = None) -> None:
        self.spec = spec
        self.budget_s = budget_s
        self.allow = allow
        self._deadline = float("inf")
        self.conn: sqlite3.Connection | None = None
        self.opened_by = time.monotonic() + budget_s if deadline is None else deadline
        """The opening's deadline, which check_unique shares: jobs.submit's checks take one budget together."""
        self._open(self.opened_by)

    def _open(self, deadline: float) -> None:
        spec = self.spec
        pinned = _pin(spec.db, self.allow)
        try:
            try:
                conn = sqlite3.connect(f"file:{quote(pinned.path)}?mode=ro", uri=True,
                                       timeout=max(0.001, deadline - time.monotonic()),
                                       isolation_level=None, check_same_thread=False)
            except sqlite3.Error as e:
                raise SourceError(f"cannot read {spec.db} as SQLite: {e}") from None
            try:
                conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
                conn.setlimit(sqlite3.SQLITE_LIMIT_LIKE_PATTERN_LENGTH, MAX_PATTERN_BYTES)
                for name, nargs, fn in _linear_functions():
                    conn.create_function(name, nargs, fn, deterministic=True)
                conn.set_progress_handler(lambda: time.monotonic() > self._deadline, PROGRESS_STEPS)
                self.conn = conn
                self._verify(pinned, "main")
                try:
                    names = self._execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')",
                                          deadline=deadline)
                except SourceError as e:
                    raise SourceError(f"cannot read {spec.db} as SQLite: {e.message}") from None
                self._verify(pinned, "journal")  # the WAL is opened by the first read
            except BaseException:
                self.conn = None
                conn.close()
                raise
        finally:
            pinned.close()
        self.pinned = (pinned.st.st_dev, pinned.st.st_ino)
        self.resolved = pinned.path
        tables = {n for (n,) in names}
        if spec.table not in tables:
            raise SourceError(f"{spec.db} has no table {spec.table!r}; it has: {', '.join(sorted(tables)) or 'none'}")
        cols = {n for (n,) in self._execute("SELECT name FROM pragma_table_info(?)", (spec.table,), deadline=deadline)}
        for col in (spec.id_column, spec.text_column):
            if col not in cols and col != "rowid":
                raise SourceError(f"table {spec.table!r} has no column {col!r}; it has: {', '.join(sorted(cols))}")
        self._from = f"FROM {_q(spec.table)} WHERE {_q(spec.id_column)} IS NOT NULL" + (f" AND ({spec.where})" if spec.where else "")
        try:
            self._execute(f"SELECT 1 {self._from} LIMIT 0", deadline=deadline)
        except SourceError as e:
            raise SourceError(f"bad --where {spec.where!r}: {e.message}") from None

    def _verify(self, pinned: _Pinned, what: str) -> None:
        """SQLite's descriptor of the database (or of its WAL/journal) is the file that was checked."""
        changed = SourceError(f"{self.spec.db} changed while it was being opened (it was swapped for another "
                              "file); try again")
        files = _files()
        if not files.ok:  # the second walk: the resolved path still leads, link-free, to the checked inode
            again = _pin(self.spec.db, self.allow)
            try:
                if again.path != pinned.path or not _same(again.st, pinned.st):
                    raise changed
            finally:
                again.close()
            return
        fd = files.fd(self.conn, what)
        if fd is None:
            if what == "main":
                raise changed
            return  # no WAL or journal open: nothing else was read
        try:
            st = os.fstat(fd)
        except OSError:
            raise changed from None
        if what == "main":
            if not _same(st, pinned.st):
                raise changed
            return
        name = pinned.path.rsplit("/", 1)[-1]
        for suffix in ("-wal", "-journal"):
            try:
                beside = os.stat(name + suffix, dir_fd=pinned.dir_fd, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(beside.st_mode) and _same(st, beside):
                return
        raise changed

    def _execute(self, sql: str, params: tuple | list = (), *, deadline: float | None = None) -> list[tuple]:
        """The rows of one statement on the source, fully read by ``deadline`` (default: one budget from now)."""
        self._deadline = time.monotonic() + self.budget_s if deadline is None else deadline
        try:
            remaining_ms = int((self._deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                raise sqlite3.OperationalError("interrupted")
            self.conn.execute(f"PRAGMA busy_timeout = {remaining_ms}")  # an app's lock waits no longer than this
            return self.conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as e:
            if str(e) == "interrupted":
                raise SourceError(f"a statement on {self.spec.table!r} took longer than {self.budget_s:g} s "
                                  "(source_budget_s); simplify the where or add an index") from None
            if "locked" in str(e) or "busy" in str(e):
                raise SourceError(f"{self.spec.db} is locked by another connection (its app) for longer than "
                                  f"{self.budget_s:g} s (source_budget_s); try again") from None
            raise SourceError(f"reading {self.spec.table!r} from {self.spec.db}: {e}") from None
        except sqlite3.DataError as e:
            if "too big" in str(e):
                raise ValueTooLarge(f"a value read or computed on {self.spec.table!r} is larger than "
                                  f"{MAX_VALUE_BYTES:,} bytes, the limit on one value of a source") from None
            raise SourceError(f"reading {self.spec.table!r} from {self.spec.db}: {e}") from None
        except sqlite3.Error as e:
            raise SourceError(f"reading {self.spec.table!r} from {self.spec.db}: {e}") from None
        finally:
            self._deadline = float("inf")

    def recheck(self) -> None:
        """Before a chunk: the path still leads, allowed, to the file this connection reads.

        Led outside ``job_sources``: Forbidden (the job fails). Replaced by
        another file that may be read (an app restoring a backup): that one is
        opened instead, with every check of a first opening.
        """
        try:
            pinned = _pin(self.spec.db, self.allow)
        except SourceError as e:
            raise SourceError(f"the job's source cannot be read any more: {e.message}") from None
        try:
            same = (pinned.st.st_dev, pinned.st.st_ino) == self.pinned and pinned.path == self.resolved
        finally:
            pinned.close()
        if not same:
            log.info("%s was replaced by another file since it was opened; reading the new one", self.spec.db)
            self.close()
            self._open(time.monotonic() + self.budget_s)

    def check_unique(self) -> None:
        """Ids are unique; run right after opening, within what is left of the opening's budget."""
        n, distinct = self._execute(f"SELECT COUNT(*), COUNT(DISTINCT {_q(self.spec.id_column)}) {self._from}",
                                    deadline=self.opened_by)[0]
        if n != distinct:
            raise SourceError(f"column {self.spec.id_column!r} is not unique in {self.spec.table!r} "
                              f"({n - distinct} duplicate ids); index by a primary key")

    def count(self) -> int:
        return self._one(f"SELECT COUNT(*) {self._from}")[0]

    def _text(self) -> str:
        """The text column as read: TEXT cut to MAX_TEXT_CHARS + 1, a BLOB as an empty one (never loaded)."""
        t = _q(self.spec.text_column)
        return f"CASE typeof({t}) WHEN 'text' THEN substr({t}, 1, {MAX_TEXT_CHARS + 1}) WHEN 'blob' THEN x'' ELSE {t} END"

    def after(self, cursor: Any, limit: int) -> list[tuple[Any, Any]]:
        """Up to ``limit`` (id, text) rows with id > cursor, in id order; one short read, checked first.

        A text over MAX_VALUE_BYTES fails the statement; then the chunk is read
        again row by row, and such a row comes back as :class:`Unreadable`.
        """
        self.recheck()
        i = _q(self.spec.id_column)
        tail = (f" AND {i} > ?" if cursor is not None else "") + f" ORDER BY {i} LIMIT ?"
        params = (cursor, limit) if cursor is not None else (limit,)
        try:
            return self._execute(f"SELECT {i}, {self._text()} {self._from}{tail}", params)
        except ValueTooLarge:
            pass  # maybe an oversized text: find its row, or fail on the ids alone (then it is the where's)
        deadline = time.monotonic() + self.budget_s
        ids = [r[0] for r in self._execute(f"SELECT {i} {self._from}{tail}", params, deadline=deadline)]
        return list(self._one_by_one(ids, deadline).items())

    def _one_by_one(self, ids: list[Any], deadline: float) -> dict[Any, Any]:
        """id → text read row by row (after a statement failed on a value's size): the oversized ones Unreadable."""
        i = _q(self.spec.id_column)
        out: dict[Any, Any] = {}
        for row_id in ids:
            try:
                found = self._execute(f"SELECT {self._text()} FROM {_q(self.spec.table)} WHERE {i} = ?",
                                      (row_id,), deadline=deadline)
                out[row_id] = found[0][0] if found else None
            except ValueTooLarge:
                out[row_id] = Unreadable("too_large", f"text of more than {MAX_VALUE_BYTES:,} bytes, "
                                         "the limit on one value read from a source")
        return out

    def texts(self, ids: list[Any], deadline: float | None = None) -> dict[Any, str]:
        """id → text of these rows (search results ask for them back), each cut to MAX_TEXT_CHARS."""
        i = _q(self.spec.id_column)
        deadline = time.monotonic() + self.budget_s if deadline is None else deadline
        out: dict[Any, str] = {}
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            sql = f"SELECT {i}, {self._text()} FROM {_q(self.spec.table)} WHERE {i} IN ({','.join('?' * len(part))})"
            try:
                rows = self._execute(sql, part, deadline=deadline)
            except ValueTooLarge:  # an oversized text among them: the others still come back
                rows = list(self._one_by_one(part, deadline).items())
            out.update((row_id, text[:MAX_TEXT_CHARS]) for row_id, text in rows if isinstance(text, str))
        return out

    def _one(self, sql: str) -> tuple[Any, ...]:
        return self._execute(sql)[0]

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def source_spec(conn: sqlite3.Connection, origin: str) -> JobSpec | None:
    """The source of items a job wrote (``origin`` is its ``JobSpec.origin``), from the daemon's jobs table.

    Read on the caller's own connection to the daemon's index (a quick local
    read), so that reading the source itself can happen on another thread.
    """
    row = conn.execute("SELECT db, table_name, id_column, text_column FROM jobs WHERE "
                       "db || '|' || table_name || '|' || id_column || '|' || text_column = ? ORDER BY id DESC LIMIT 1",
                       (origin,)).fetchone()
    return JobSpec(*row) if row else None


def read_texts(spec: JobSpec, ids: list[Any], *, allow: Allow | None,
               budget_s: float) -> tuple[dict[Any, str], str | None]:
    """Texts of these ids from the job's source, within one budget: (id → text, None) or ({}, why not).

    Never raises for the source's sake: a search answers with its hits and
    ``text`` nil, and the reason in a note, when the source is locked, gone,
    swapped or no longer allowed.
    """
    deadline = time.monotonic() + budget_s
    try:
        source = SourceTable(spec, budget_s, allow=allow, deadline=deadline)
    except Forbidden:
        return {}, (f"{len(ids)} hits have no text: their source (table {spec.table!r}) is not under a job source "
                    "directory (job_sources) any more")
    except PocketEmbedError as e:
        return {}, f"{len(ids)} hits have no text: their source (table {spec.table!r}) cannot be read now: {e.message}"
    except OSError as e:  # not foreseen by the checks, still only this search's texts
        log.warning("reading texts from %s: %s", spec.db, e)
        return {}, f"{len(ids)} hits have no text: their source (table {spec.table!r}) cannot be read now: {e}"
    try:
        return source.texts(ids, deadline=deadline), None
    except PocketEmbedError as e:
        return {}, f"{len(ids)} hits have no text: their source (table {spec.table!r}) cannot be read now: {e.message}"
    finally:
        source.close()


def source_texts(conn: sqlite3.Connection, origin: str, ids: list[Any], *, allow: Allow | None,
                 budget_s: float = 5.0) -> dict[Any, str]:
    """Texts of items a job wrote, read back from its source table ({} when it cannot be read now).

    The one-thread form of :func:`source_spec` + :func:`read_texts` (the daemon's
    search reads off its search thread instead).
    """
    spec = source_spec(conn, origin)
    if spec is None:
        return {}
    texts, note = read_texts(spec, ids, allow=allow, budget_s=budget_s)
    if note:
        log.warning("cannot read search results' texts back: %s", note)
    return texts


class SourceReads:
    """A few threads that read sources for searches, so that a slow or locked source never holds the search thread.

    Each read is bounded by its budget; up to ``workers`` run at once, so one
    locked source holds at most the searches that wait on it (and, once they fill
    every worker, those queued behind them, each for one budget). What waits is
    bounded too: past ``max_queue`` a search is answered ``busy``. What a read
    raises goes to its future: nothing it raises ends a thread.
    """

    def __init__(self, workers: int = 4, max_queue: int = 256) -> None:
        self.max_queue = max_queue
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pe-texts")
        self._lock = threading.Lock()
        self._pending = 0
        self._stopped = False

    def submit(self, task: Callable[[], Any]) -> Future:
        """Run ``task`` on a reader thread; its future holds what it returns or raises.

        Busy at once when ``max_queue`` tasks wait already.
        """
        with self._lock:
            if self._pending >= self.max_queue:
                raise Busy(f"{self._pending} searches wait for their sources' texts", retry_after_ms=500)
            self._pending += 1
        try:
            return self._pool.submit(self._run, task)
        except RuntimeError:  # shut down: the daemon is stopping
            with self._lock:
                self._pending -= 1
            raise PocketEmbedError("the daemon is shutting down", code="shutting_down") from None

    def _run(self, task: Callable[[], Any]) -> Any:
        try:
            return task()
        finally:
            with self._lock:
                self._pending -= 1

    @property
    def queued(self) -> int:
        return self._pending

    @property
    def alive(self) -> bool:
        return not self._stopped

    def stop(self) -> None:
        """Finish the reads queued, then end the threads."""
        self._stopped = True
        self._pool.shutdown(wait=True)
