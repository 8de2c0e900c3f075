"""Reads of a caller's SQLite file (a job's source) against a real daemon: safe and bounded.

A job's source is read again after ``jobs.submit`` accepted it: by every chunk
of the job, and by every ``search(with_text=True)`` that reads its hits' texts
back. Each read must be checked against ``job_sources`` as the submit was (a
path swapped for a symbolic link, a directory above it swapped, a ``-wal``
file planted beside it, a hard link to the daemon's own index), must stay
within ``source_budget_s`` whatever the ``where`` computes or the file holds,
and must never hold up another collection's search.

One daemon serves the module; each test writes its own files and collections.
Nothing here waits on the clock to decide a result: a lock is held by this
process for as long as an assertion needs it, and replies are told apart by
order, not by timing.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import zmq

from conftest import fresh_home
from daemon_proc import DaemonProcess
from pocketembed.clients import Forbidden
from pocketembed.daemon import sources
from pocketembed.errors import SourceError
from pocketembed.ipc import DaemonError
from pocketembed.ipc import protocol as P

Q8 = "all-minilm-l6-v2:q8_0"
BUDGET_S = 8
"""The daemon's ``source_budget_s``: long enough that a search held by a locked source is still waiting
when another collection's search has been answered, even on a loaded CPU."""
PUBLIC = {f"k{i}": f"dinner plans number {i} at the usual place" for i in range(6)}
SECRET = {k: f"SECRET bank pin {i:04d}" for i, k in enumerate(PUBLIC)}


@pytest.fixture(scope="module")
def env(home, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("sources")
    allowed, outside = tmp / "allowed", tmp / "outside"
    allowed.mkdir()
    outside.mkdir()
    daemon_home = fresh_home(home, tmp / "home")
    d = DaemonProcess(daemon_home, tmp / "pe.sock", "--model", Q8,
                      env={"POCKETEMBED_JOB_SOURCES": str(allowed),
                           "POCKETEMBED_SOURCE_BUDGET_S": str(BUDGET_S)}).wait_ready()
    yield {"daemon": d, "allowed": allowed, "outside": outside, "home": daemon_home}
    assert d.stop() == 0


def notes_db(path: Path, texts: dict[str, str], wal: bool = False) -> Path:
    """An app's database: notes(key TEXT PRIMARY KEY, body)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as conn:
        if wal:
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE notes (key TEXT PRIMARY KEY, body)")
        conn.executemany("INSERT INTO notes VALUES (?, ?)", list(texts.items()))
    conn.close()
    return path


def run_job(c, db: Path, collection: str, **kw) -> dict:
    job = c.index_table(str(db), "notes", "key", "body", collection=collection, **kw)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = c.job(job["id"])
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job never finished: {job}")


def search(c, collection: str, **kw) -> dict:
    return c.call("search", {"collection": collection, "query": "dinner plans", "k": 10, "with_text": True, **kw},
                  timeout=60)


def texts_of(result: dict) -> dict:
    return {h["id"]: h["text"] for h in result["hits"]}


def swap_for_symlink(path: Path, target: Path) -> None:
    """Replace ``path`` (file or directory) by a symbolic link to ``target``, atomically for a file."""
    link = path.with_name(path.name + ".link")
    link.symlink_to(target)
    if path.is_dir() and not path.is_symlink():
        path.rename(path.with_name(path.name + ".old"))
    os.replace(link, path)


def test_with_text_never_reads_a_source_swapped_for_a_symlink_outside_job_sources(env):
    d, allowed, outside = env["daemon"], env["allowed"], env["outside"]
    db = notes_db(allowed / "swap.db", PUBLIC)
    nested = notes_db(allowed / "dir" / "nested.db", PUBLIC)
    notes_db(outside / "secret.db", SECRET)
    notes_db(outside / "dir" / "nested.db", SECRET)
    with d.client(timeout=60) as c:
        assert run_job(c, db, "swapped")["state"] == "done"
        assert run_job(c, nested, "nested")["state"] == "done"
        assert texts_of(search(c, "swapped")) == PUBLIC
        assert texts_of(search(c, "nested")) == PUBLIC

        swap_for_symlink(db, outside / "secret.db")  # the file itself
        swap_for_symlink(allowed / "dir", outside / "dir")  # a directory above it
        for name in ("swapped", "nested"):
            result = search(c, name)
            assert set(texts_of(result)) == set(PUBLIC), result  # the hits are the index's, as before
            assert all(t is None for t in texts_of(result).values()), result
            assert "job_sources" in " ".join(result["notes"]), result
            assert str(outside) not in " ".join(result["notes"])  # says nothing of where the link leads
        with pytest.raises(DaemonError) as e:  # as jobs.submit of the same path is refused
            c.index_table(str(db), "notes", "key", "body", collection="swapped")
        assert e.value.code == P.FORBIDDEN


def test_a_wal_file_planted_beside_a_source_is_never_read(env):
    """``app.db-wal`` linked to another database's WAL would lay that database's pages over the source's."""
    d, allowed, outside = env["daemon"], env["allowed"], env["outside"]
    db = notes_db(allowed / "wal.db", PUBLIC, wal=True)
    shutil.copy(db, outside / "wal.db")
    writer = sqlite3.connect(outside / "wal.db", isolation_level=None)  # kept open: its WAL stays un-checkpointed
    try:
        writer.execute("PRAGMA wal_autocheckpoint=0")
        writer.executemany("UPDATE notes SET body = ? WHERE key = ?", [(v, k) for k, v in SECRET.items()])
        assert (outside / "wal.db-wal").stat().st_size > 0
        with d.client(timeout=60) as c:
            assert run_job(c, db, "wal")["state"] == "done"
            assert texts_of(search(c, "wal")) == PUBLIC
            for name in ("wal.db-wal", "wal.db-shm"):
                (allowed / name).unlink(missing_ok=True)
            (allowed / "wal.db-wal").symlink_to(outside / "wal.db-wal")

            result = search(c, "wal")
            assert not set(SECRET.values()) & set(texts_of(result).values()), result
            assert all(t is None for t in texts_of(result).values()) and result["notes"], result
            with pytest.raises(DaemonError) as e:
                run_job(c, db, "wal-again")
            assert e.value.code == P.BAD_SOURCE and "wal.db-wal" in e.value.message, e.value.message
    finally:
        writer.close()


def test_a_hard_link_to_the_daemons_own_index_is_refused(env):
    """A path inside job_sources that is the daemon's index.db under another name: refused by its inode."""
    d, allowed, home = env["daemon"], env["allowed"], env["home"]
    own = allowed / "own.db"
    os.link(home / "index.db", own)
    with d.client(timeout=60) as c:
        with pytest.raises(DaemonError) as e:
            c.index_table(str(own), "collections", "name", "model", collection="own")
        assert e.value.code == P.FORBIDDEN and "data directory" in e.value.message


def test_submit_path_errors_have_their_own_codes(env):
    d, allowed = env["daemon"], env["allowed"]
    notes_db(allowed / "plain.db", PUBLIC)
    (allowed / "loop.db").symlink_to(allowed / "loop.db")
    (allowed / "a-dir.db").mkdir()
    os.mkfifo(allowed / "fifo.db")
    cases = {
        str(allowed / "nul\x00.db"): (P.INVALID_ARGS, "nul"),
        str(allowed / ("n" * 300 + ".db")): (P.BAD_SOURCE, "name too long"),
        str(allowed / "loop.db"): (P.BAD_SOURCE, "symbolic links"),
        str(allowed / "plain.db" / "x.db"): (P.BAD_SOURCE, "not a directory"),
        str(allowed / "a-dir.db"): (P.BAD_SOURCE, "not a regular file"),
        str(allowed / "fifo.db"): (P.BAD_SOURCE, "not a regular file"),
        str(allowed / "missing.db"): (P.BAD_SOURCE, "no database file"),
    }
    with d.client(timeout=60) as c:
        for db, (code, needle) in cases.items():
            with pytest.raises(DaemonError) as e:
                c.call("jobs.submit", {"db": db, "table": "notes", "id_column": "key", "text_column": "body"})
            assert e.value.code == code and needle in e.value.message.lower(), (db[:80], e.value.code, e.value.message)
        for db in ("/nonexistent-dir/x.db", "/" + "n" * 300 + ".db"):  # outside: refused before any look at it
            with pytest.raises(DaemonError) as e:
                c.call("jobs.submit", {"db": db, "table": "notes", "id_column": "key", "text_column": "body"})
            assert e.value.code == P.FORBIDDEN, e.value.message
        assert c.ping()["pong"]


def test_a_where_that_builds_huge_values_fails_on_the_value_limit(env):
    d, allowed = env["daemon"], env["allowed"]
    db = notes_db(allowed / "blob.db", {f"k{i}": f"text {i}" for i in range(60)})
    with d.client(timeout=60) as c:
        t0 = time.monotonic()
        with pytest.raises(DaemonError) as e:
            c.index_table(str(db), "notes", "key", "body", collection="blob",
                          where="length(randomblob(50000000)) > 0")
        print(f"\n50 MB randomblob where cut after {time.monotonic() - t0:.2f} s (budget {BUDGET_S} s)")
        assert e.value.code == P.BAD_SOURCE and "larger than" in e.value.message, e.value.message


def test_an_oversized_stored_text_is_one_row_error_and_texts_come_back_bounded(env):
    d, allowed = env["daemon"], env["allowed"]
    long_text = "word " * 40_000  # 200,000 characters: read, embedded from its start
    db = notes_db(allowed / "big.db", {"a": "dinner plans at eight", "huge": "x" * 3_000_000, "long": long_text})
    with d.client(timeout=60) as c:
        job = run_job(c, db, "big")
        assert job["state"] == "done", job
        assert (job["scanned"], job["embedded"], job["failed"]) == (3, 2, 1), job
        assert {e["id"]: e["code"] for e in c.job(job["id"])["errors"]} == {"huge": "too_large"}
        texts = texts_of(search(c, "big"))
        assert texts["a"] == "dinner plans at eight"
        assert texts["long"] == long_text[:65_536]


def test_a_locked_source_holds_neither_another_collections_search_nor_its_own_past_the_budget(env):
    d, allowed = env["daemon"], env["allowed"]
    db = notes_db(allowed / "locked.db", PUBLIC)  # rollback journal: an exclusive lock keeps readers out
    with d.client(timeout=60) as c:
        assert run_job(c, db, "locked")["state"] == "done"
        c.index_add("free", [{"id": k, "text": v} for k, v in PUBLIC.items()], store_text=True)
        for name in ("locked", "free"):  # the query's vector is cached: both searches run on the search thread
            search(c, name)

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(d.endpoint)
    app = sqlite3.connect(db, isolation_level=None)
    try:
        app.execute("BEGIN EXCLUSIVE")
        args = {"query": "dinner plans", "k": 10, "with_text": True}
        t0 = time.monotonic()
        sock.send(P.request("locked", "search", {"collection": "locked", **args}))
        sock.send(P.request("free", "search", {"collection": "free", **args}))
        assert sock.poll(30_000), "no reply"
        first = P.unpack(sock.recv())
        assert first["id"] == "free", first  # answered while the locked source's read still waits
        assert texts_of(first["result"]) == PUBLIC
        assert sock.poll(30_000), "the search of the locked source never came back while the lock was held"
        held = P.unpack(sock.recv())
        elapsed = time.monotonic() - t0
        print(f"\nwith_text search on a locked source answered after {elapsed:.2f} s (budget {BUDGET_S} s)")
        assert held["id"] == "locked" and held["ok"], held
        assert all(t is None for t in texts_of(held["result"]).values()), held
        assert "locked" in " ".join(held["result"]["notes"]), held
    finally:
        app.rollback()
        app.close()
        sock.close()
    with d.client(timeout=60) as c:
        result = search(c, "locked")
        assert texts_of(result) == PUBLIC and "notes" not in result


def test_a_source_flipped_between_inside_and_outside_never_yields_outside_rows(env):
    """Each read checks the path and then reads the file it checked, whatever the path says meanwhile.

    The source path flips between a regular file inside job_sources (a hard link to
    one there) and a symbolic link to a file outside: a read that checks one and
    lets SQLite open the other would return the outside rows.
    """
    d, allowed, outside = env["daemon"], env["allowed"], env["outside"]
    inside = notes_db(allowed / "real.db", PUBLIC)
    secret = notes_db(outside / "flip-secret.db", SECRET)
    db = allowed / "flip.db"
    os.link(inside, db)
    with d.client(timeout=60) as c:
        assert run_job(c, db, "flip")["state"] == "done"
        stop = threading.Event()

        def flip() -> None:
            k = 0
            while not stop.is_set():
                tmp = allowed / "flip.tmp"
                tmp.unlink(missing_ok=True)
                if k % 2:
                    tmp.symlink_to(secret)
                else:
                    os.link(inside, tmp)
                os.replace(tmp, db)
                k += 1

        flipper = threading.Thread(target=flip)
        flipper.start()
        try:
            seen: list = []
            reasons: dict[str, int] = {}
            for _ in range(60):
                result = search(c, "flip")
                seen += texts_of(result).values()
                for note in result.get("notes", []):
                    reason = note.replace(str(db), "DB").split(": ", 1)[-1][-70:]
                    reasons[reason] = reasons.get(reason, 0) + 1
            print("\nreads refused while the path flipped:", reasons)
        finally:
            stop.set()
            flipper.join()
        assert not set(SECRET.values()) & set(seen), sorted(set(seen) & set(SECRET.values()))
        tmp = allowed / "flip.tmp"
        tmp.unlink(missing_ok=True)
        os.link(inside, tmp)
        os.replace(tmp, db)  # left inside: read as before
        assert texts_of(search(c, "flip")) == PUBLIC


def test_a_job_whose_source_is_swapped_outside_between_chunks_fails_forbidden(home, tmp_path):
    """Every chunk checks the path again: the job opened the file, waited for the charger, and meanwhile the
    path was swapped for a link to a file outside job_sources."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    db = notes_db(allowed / "chunks.db", PUBLIC)
    notes_db(outside / "secret.db", SECRET)
    sensors = tmp_path / "sensors.json"

    def plug(plugged: bool) -> None:
        tmp = sensors.with_suffix(".tmp")
        tmp.write_text(json.dumps({"battery": {"percent": 40, "plugged": plugged}, "cpu_percent": 5}))
        tmp.replace(sensors)

    plug(False)
    env = {"POCKETEMBED_POWER_POLL_S": "0.1", "POCKETEMBED_POWER_SETTLE_S": "0.3", "POCKETEMBED_POWER_BATTERY_MIN": "50",
           "POCKETEMBED_JOB_SOURCES": str(allowed)}
    d = DaemonProcess(fresh_home(home, tmp_path / "home"), tmp_path / "pe.sock", "--model", Q8,
                      "--power-source", f"file:{sensors}", env=env).wait_ready()
    try:
        with d.client(timeout=60) as c:
            job_id = c.index_table(str(db), "notes", "key", "body", collection="chunks")["id"]
            deadline = time.monotonic() + 30
            while c.job(job_id)["state"] != "waiting":  # the source is open; the policy holds the first chunk
                assert time.monotonic() < deadline, c.job(job_id)
                time.sleep(0.05)
            swap_for_symlink(db, outside / "secret.db")
            plug(True)
            deadline = time.monotonic() + 60
            while (job := c.job(job_id))["state"] not in ("done", "failed"):
                assert time.monotonic() < deadline, job
                time.sleep(0.05)
            assert job["state"] == "failed" and "error[forbidden]" in job["error"], job
            assert job["embedded"] == 0
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("introspection", [True, False], ids=["sqlite-fd", "second-walk"])
@pytest.mark.parametrize("swapped", ["file", "directory"])
def test_a_swap_between_the_check_and_sqlites_own_open_is_refused(tmp_path, monkeypatch, swapped, introspection):
    """In-process, deterministic: the path is swapped just before SQLite opens it (the window a racing
    writer aims at); the descriptor SQLite holds is not the checked file, so nothing is read."""
    allowed, outside, own = tmp_path / "allowed", tmp_path / "outside", tmp_path / "home"
    own.mkdir()
    db = notes_db(allowed / "dir" / "s.db", PUBLIC)
    notes_db(outside / "dir" / "s.db", SECRET)
    real_connect = sqlite3.connect

    def swap_then_connect(*args, **kwargs):
        if swapped == "file":
            swap_for_symlink(db, outside / "dir" / "s.db")
        else:
            swap_for_symlink(allowed / "dir", outside / "dir")
        return real_connect(*args, **kwargs)

    if not introspection:
        monkeypatch.setattr(sources, "_FILES", type("NoFds", (), {"ok": False})())
    else:
        assert sources._files().ok  # this build's SQLite descriptors can be read
    monkeypatch.setattr(sources.sqlite3, "connect", swap_then_connect)
    with pytest.raises((SourceError, Forbidden)) as e:
        sources.SourceTable(sources.JobSpec(str(db), "notes", "key", "body"),
                            allow=lambda p: sources.check_source_allowed(p, [allowed], own))
    assert "changed while" in e.value.message or e.value.code == "forbidden", e.value.message


def test_a_source_the_daemon_may_not_open_is_bad_source(tmp_path, monkeypatch):
    """EACCES (a file or directory the daemon's user cannot read) is ``bad_source`` with the reason. In-process,
    with os.open refusing as the kernel would: these tests run as root, whom permissions do not stop."""
    allowed, own = tmp_path / "allowed", tmp_path / "home"
    own.mkdir()
    db = notes_db(allowed / "private.db", PUBLIC)
    real_open = os.open

    def refusing(path, flags, *args, **kwargs):
        if path == "private.db" and kwargs.get("dir_fd") is not None:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(sources.os, "open", refusing)
    with pytest.raises(SourceError) as e:
        sources.SourceTable(sources.JobSpec(str(db), "notes", "key", "body"),
                            allow=lambda p: sources.check_source_allowed(p, [allowed], own))
    assert e.value.code == "bad_source" and "permission denied" in e.value.message.lower(), e.value.message


def test_the_linear_forms_of_quadratic_functions_give_sqlites_results_and_stay_fast():
    """instr / replace / trim(X, Y) on a source connection: SQLite's built-in answers, in linear time."""
    builtin = sqlite3.connect(":memory:")
    values = [None, "", "a", "abcabc", "héllo wörld", "  padded  ", "xxhixx", 42, -7, 1.5, b"ab\x00c", "日本語テキスト"]
    for name, nargs, fn in sources._linear_functions():
        for x in values:
            for y in values:
                for z in (values if nargs == 3 else [None]):
                    args = (x, y, z)[:nargs]
                    want = builtin.execute(f"SELECT {name}({', '.join('?' * nargs)})", args).fetchone()[0]
                    assert fn(*args) == want, (name, args, fn(*args), want)
    big, needle = "b" * (sources.MAX_VALUE_BYTES - 10), "c" * 20_000 + "b"
    t0 = time.process_time()
    fns = {name: fn for name, _, fn in sources._linear_functions()}
    assert fns["trim"](big, needle) == "" and fns["instr"](big, needle) == 0
    assert fns["replace"](big, needle, "x") == big
    assert time.process_time() - t0 < 1.0  # SQLite's own: trim 13 s, instr 0.35 s on this machine
