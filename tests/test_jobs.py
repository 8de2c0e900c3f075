"""Background re-indexing jobs through the real daemon, on a real SMS database.

Every test runs its own daemon on its own data directory (the models are
linked from the prepared ones), so jobs and collections never leak between
tests. Sensor readings are injected only through the file source, which
implements the same interface as the psutil one.
"""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import fresh_home, run_cli
from daemon_proc import DaemonProcess, step_until, wait_until
from pocketembed.daemon.store import Store, connect, db_path
from pocketembed.ipc import InvalidRequest
from sms_db import make_sms_db, sms_rows, source_ids

Q8 = "all-minilm-l6-v2:q8_0"


@pytest.fixture
def job_home(home, tmp_path) -> Path:
    root = fresh_home(home, tmp_path / "home")
    return root


def collection_ids(home: Path, name: str) -> list:
    with sqlite3.connect(db_path(home)) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM items WHERE collection = ? ORDER BY id", (name,))]


def stored_vectors(home: Path, name: str, ids: list) -> np.ndarray:
    """The int8 codes of items, dequantized with their collection's calibration."""
    conn = connect(db_path(home))
    try:
        info = Store(conn).info(name)
        codes = [conn.execute("SELECT i8 FROM items WHERE collection = ? AND id = ?", (name, i)).fetchone()[0] for i in ids]
        return info.calibration.dequantize(np.stack([np.frombuffer(c, np.int8) for c in codes]))
    finally:
        conn.close()


def wait_job(client, job_id: int, until, timeout: float = 240, interval: float = 0.1) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.job(job_id)
        if until(job):
            return job
        time.sleep(interval)
    raise AssertionError(f"job never reached the expected state: {job}")


def sources(directory) -> dict[str, str]:
    """The daemon's environment allowing jobs to read SQLite files under ``directory``."""
    return {"POCKETEMBED_JOB_SOURCES": str(directory)}


def done(job: dict) -> bool:
    assert job["state"] not in ("failed", "cancelled"), job
    return job["state"] == "done"


def test_whole_sms_table_then_rerun_picks_up_new_changed_and_deleted_rows(job_home, tmp_path, engines):
    db = make_sms_db(tmp_path / "sms.db")
    d = DaemonProcess(job_home, tmp_path / "pe.sock", "--model", Q8, env=sources(tmp_path)).wait_ready()
    try:
        r = run_cli("index", "--socket", str(d.socket_path), "--db", str(db), "--table", "messages", "--id", "id",
                    "--text", "body", "--collection", "sms", "--wait", home=job_home)
        assert r.returncode == 0, r.stderr
        assert "5574 rows, 5574 embedded" in r.stdout
        ids = collection_ids(job_home, "sms")
        assert ids == sorted(source_ids(db)) and len(ids) == 5574

        # The stored vectors are the engine's (background batches merge texts: not bit-identical).
        rows = {r["id"]: r["body"] for r in sms_rows()}
        sample = [1, 2, 777, 5574]
        stored = stored_vectors(job_home, "sms", sample)
        ref = engines["q8_0"].embed([rows[i] for i in sample])
        assert np.min(np.sum(stored * ref, axis=1) / np.linalg.norm(stored, axis=1)) > 0.999

        with sqlite3.connect(db) as conn:  # the SMS app keeps writing meanwhile
            conn.execute("INSERT INTO messages (id, address, date, body) VALUES (9001, 'x', 1, 'see you at the match tonight')")
            conn.execute("UPDATE messages SET body = 'changed: call me when you land' WHERE id = 5")
            conn.execute("DELETE FROM messages WHERE id IN (7, 8, 9)")
            conn.execute("UPDATE messages SET body = '  ' WHERE id = 10")  # empty now: skipped, and its old vector goes
            conn.execute("INSERT INTO messages (id, address, date, body) VALUES (9002, 'x', 1, NULL)")
        with d.client() as c:
            job = c.index_table(str(db), "messages", "id", "body", collection="sms")
            job = wait_job(c, job["id"], done)
        assert (job["embedded"], job["unchanged"], job["skipped"], job["deleted"]) == (2, 5569, 2, 4)
        assert collection_ids(job_home, "sms") == sorted(source_ids(db, "id NOT IN (10, 9002)"))
        v5 = stored_vectors(job_home, "sms", [5])[0]
        assert float(v5 @ engines["q8_0"].embed(["changed: call me when you land"])[0]) / np.linalg.norm(v5) > 0.999

        r = run_cli("jobs", "--socket", str(d.socket_path), home=job_home)
        assert r.returncode == 0 and "job 2 done" in r.stdout and "job 1 done" in r.stdout
    finally:
        assert d.stop() == 0


def test_sigkill_three_times_during_a_job_loses_nothing_and_repeats_nothing(job_home, tmp_path):
    db = make_sms_db(tmp_path / "sms.db")
    sock = tmp_path / "pe.sock"
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    d = DaemonProcess(job_home, sock, "--model", Q8, env=sources(tmp_path)).wait_ready()
    with d.client() as c:
        job_id = c.index_table(str(db), "messages", "id", "body", collection="sms")["id"]
    kills = [0]
    for k in range(3):
        # Kill once this daemon has committed progress of its own and passed a random row count in
        # its quarter of the table: a random point between commits, with chunks in flight, midway
        # on any machine (a delay in seconds would let a fast one finish first).
        target = rng.randrange(kills[-1] + 1, max(kills[-1] + 2, 5574 * (k + 1) // 4))
        with d.client() as c:
            wait_job(c, job_id, lambda j: j["scanned"] >= target, timeout=240, interval=0.01)
            kills.append(c.job(job_id)["scanned"])
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        assert sock.exists()  # a crashed daemon leaves its socket: the next one takes it over
        d = DaemonProcess(job_home, sock, "--model", Q8, env=sources(tmp_path)).wait_ready()
    try:
        with d.client() as c:
            job = wait_job(c, job_id, done)
    finally:
        assert d.stop() == 0
    assert 0 < kills[1] < kills[2] < kills[3] < 5574, (seed, kills)
    ids = collection_ids(job_home, "sms")
    assert len(ids) == len(set(ids)) == 5574 and set(ids) == source_ids(db), seed
    # Counters are committed with the vectors: each row counted once means each row written once.
    assert (job["scanned"], job["embedded"], job["failed"]) == (5574, 5574, 0), (seed, kills, job)


def test_power_policy_gates_the_job_and_status_says_why(gated_daemon, job_home, tmp_path):
    """Its decodes wait at a gate, let through one at a time: the job is midway, running, when the
    charger goes, however fast this machine would have finished its 1,500 rows."""
    db = make_sms_db(tmp_path / "sms.db", limit=1500)
    sensors = tmp_path / "sensors.json"

    def plug(plugged: bool, percent: float = 40) -> None:
        tmp = sensors.with_suffix(".tmp")
        tmp.write_text(json.dumps({"battery": {"percent": percent, "plugged": plugged}, "cpu_percent": 5}))
        tmp.replace(sensors)

    plug(False)
    env = {"POCKETEMBED_POWER_POLL_S": "0.1", "POCKETEMBED_POWER_SETTLE_S": "0.3", "POCKETEMBED_POWER_BATTERY_MIN": "50",
           "POCKETEMBED_JOB_CHUNK_ROWS": "32", **sources(tmp_path)}
    d, gate = gated_daemon("--model", Q8, "--power-source", f"file:{sensors}", env=env, root=job_home, lane="background")
    try:
        with d.client() as c:
            job_id = c.index_table(str(db), "messages", "id", "body")["id"]
            job = wait_job(c, job_id, lambda j: j["state"] == "waiting", timeout=60)
            time.sleep(1.0)
            job = c.job(job_id)
            assert job["state"] == "waiting" and job["scanned"] == 0 and "battery at 40%" in job["reason"]
            power = c.stats()["power"]
            assert power["allowed"] is False and power["battery_percent"] == 40 and power["plugged"] is False
            assert power["source"] == f"file:{sensors}" and "needs 50%" in power["reason"]
            r = run_cli("status", "--socket", str(d.socket_path), home=job_home)
            assert "background work: paused (on battery at 40%" in r.stdout and f"job {job_id} waiting" in r.stdout

            plug(True)
            job = step_until(c, gate, lambda: (j := c.job(job_id))["scanned"] >= 64 and j, "64 rows committed")
            assert job["state"] == "running" and job["scanned"] < 1500
            assert c.stats()["power"]["reason"].startswith("charging")
            with sqlite3.connect(db, timeout=1.0) as conn:  # the app's writer is never locked out by the job
                conn.execute("UPDATE messages SET address = 'new' WHERE id = 1400")

            plug(False)
            wait_until(lambda: not c.stats()["power"]["allowed"], "the daemon sees the charger gone")
            gate.release()
            # "waiting" is set only once the chunks already in the scheduler are committed: then nothing moves.
            job = wait_job(c, job_id, lambda j: j["state"] == "waiting", timeout=60)
            paused_at = job["scanned"]
            time.sleep(2.0)
            job = c.job(job_id)
            assert job["state"] == "waiting" and job["scanned"] == paused_at < 1500, job
            assert "battery at 40%" in job["reason"]
            assert c.stats()["power"]["allowed"] is False

            # pause/resume by hand, then charge to the end.
            assert c.job_pause(job_id)["state"] == "paused"
            plug(True)
            time.sleep(1.0)
            assert c.job(job_id)["scanned"] == paused_at  # paused by hand: the charger does not start it
            with pytest.raises(InvalidRequest) as e:
                c.job_pause(job_id)
            assert e.value.code == "invalid_state"
            assert c.job_resume(job_id)["state"] == "queued"
            job = wait_job(c, job_id, done, timeout=120)
        assert job["scanned"] == job["embedded"] == 1500
        assert set(collection_ids(job_home, "messages")) == source_ids(db)
    finally:
        gate.release()  # were the test to fail while the decodes are held
        assert d.stop() == 0


def test_bad_rows_are_recorded_and_bad_sources_refused(job_home, tmp_path):
    db = tmp_path / "app.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE notes (key TEXT PRIMARY KEY, body)")
        conn.executemany("INSERT INTO notes VALUES (?, ?)", [
            ("a", "dinner at eight?"), ("b", None), ("c", ""), ("d", b"\x00\x01 a blob"), ("e", "word " * 2000),
            ("f", "running late, sorry"),
        ])
        conn.execute("CREATE TABLE dup (k, t)")
        conn.executemany("INSERT INTO dup VALUES (?, ?)", [(1, "x"), (1, "y")])
    d = DaemonProcess(job_home, tmp_path / "pe.sock", "--model", Q8, env=sources(tmp_path)).wait_ready()
    try:
        with d.client() as c:
            job = c.index_table(str(db), "notes", "key", "body", truncate=False)
            job = wait_job(c, job["id"], done, timeout=60)
            assert (job["scanned"], job["embedded"], job["skipped"], job["failed"]) == (6, 2, 2, 2)
            errors = {e["id"]: e["code"] for e in c.job(job["id"])["errors"]}
            assert errors == {"d": "invalid_input", "e": "text_too_long"}
            assert collection_ids(job_home, "notes") == ["a", "f"]

            for kwargs, needle in [
                (dict(db=str(tmp_path / "missing.db"), table="notes", id_column="key", text_column="body"), "no database"),
                (dict(db=str(db), table="nope", id_column="key", text_column="body"), "no table 'nope'"),
                (dict(db=str(db), table="notes", id_column="key", text_column="text"), "no column 'text'"),
                (dict(db=str(db), table="notes", id_column="key", text_column="body", where="key >"), "bad --where"),
                (dict(db=str(db), table="dup", id_column="k", text_column="t"), "not unique"),
            ]:
                with pytest.raises(InvalidRequest) as e:
                    c.index_table(**kwargs)
                assert e.value.code == "bad_source" and needle in e.value.message
            with pytest.raises(InvalidRequest) as e:
                c.index_table(str(db), "notes", "key", "body", model="all-minilm-l6-v2:q4_0")
            assert e.value.code == "collection_mismatch"
            with pytest.raises(InvalidRequest) as e:
                c.job(999)
            assert e.value.code == "unknown_job"
            with pytest.raises(InvalidRequest) as e:
                c.call("jobs.submit", {"db": "relative.db", "table": "t", "id_column": "i", "text_column": "t"})
            assert e.value.code == "invalid_input"
            assert c.ping()["pong"]
        r = run_cli("index", "--socket", str(d.socket_path), "--db", str(db), "--table", "nope", "--id", "key",
                    "--text", "body", home=job_home)
        assert r.returncode == 1 and "error[bad_source]" in r.stderr
    finally:
        assert d.stop() == 0
