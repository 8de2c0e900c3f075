"""Queued indexing over IPC (index.enqueue): committed at once, embedded only on the charger, exactly once."""

from __future__ import annotations

import signal
import sqlite3
import time

import pytest

from conftest import fresh_home
from daemon_proc import DaemonProcess, scheduler_stats, write_battery as battery
from pocketembed.ipc import InvalidRequest
from pocketembed.sms import load_sms

Q8 = "all-minilm-l6-v2:q8_0"


def stored(home, collection: str) -> list:
    with sqlite3.connect(home / "index.db") as conn:
        return [r[0] for r in conn.execute("SELECT id FROM items WHERE collection = ? ORDER BY id", (collection,))]


def wait(client, job_id: int, until, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.job(job_id)
        assert job["state"] not in ("failed", "cancelled"), job
        if until(job):
            return job
        time.sleep(0.1)
    raise TimeoutError(client.job(job_id))


def test_enqueued_sms_wait_for_the_charger_survive_kill_9_and_land_once(home, tmp_path):
    texts = load_sms()[:1200]
    root = fresh_home(home, tmp_path / "home")
    sensors = tmp_path / "battery.json"
    battery(sensors, 40, plugged=False)
    env = {"POCKETEMBED_POWER_POLL_S": "0.2", "POCKETEMBED_POWER_SETTLE_S": "0.2", "POCKETEMBED_JOB_CHUNK_ROWS": "32"}
    args = ("--model", Q8, "--power-source", f"file:{sensors}")
    sock = tmp_path / "pe.sock"
    d = DaemonProcess(root, sock, *args, env=env).wait_ready()
    with d.client() as c:
        for at in range(0, len(texts), 400):
            job = c.index_enqueue("sms", [{"id": at + i + 1, "text": s, "metadata": {"n": at + i + 1}}
                                          for i, s in enumerate(texts[at:at + 400])], store_text=True)
        assert job["kind"] == "queue" and job["total"] == 1200 and not job["new_job"]  # one job gathers them
        job = wait(c, job["id"], lambda j: j["state"] == "waiting")
        assert "on battery at 40%" in job["reason"]
        time.sleep(1.0)
        assert c.job(job["id"])["scanned"] == 0 and stored(root, "sms") == []  # nothing embedded on battery
        battery(sensors, 40, plugged=True)
        # Killed once 100 rows are in; on a machine fast enough to finish first, the restart finds it done,
        # and every assertion below holds either way (nothing here races the clock).
        wait(c, job["id"], lambda j: j["scanned"] >= 100)
    d.proc.send_signal(signal.SIGKILL)  # midway through (as a rule)
    d.proc.wait()
    d = DaemonProcess(root, sock, *args, env=env).wait_ready()
    try:
        with d.client() as c:
            done = wait(c, job["id"], lambda j: j["state"] == "done")
            assert done["scanned"] == 1200 and done["failed"] == 0
            assert stored(root, "sms") == list(range(1, 1201))  # every id once: nothing lost, nothing twice
            hits = c.search("sms", texts[41], k=1, with_text=True)
            assert hits[0]["text"] == texts[41] and hits[0]["metadata"] == {"n": hits[0]["id"]}

            # The same texts again cost no embedding; deletions are applied in order.
            again = c.index_enqueue("sms", [{"id": i + 1, "text": s} for i, s in enumerate(texts[:300])],
                                    delete=[1199, 1200])
            assert again["new_job"]  # the first job is done: a new one
            again = wait(c, again["id"], lambda j: j["state"] == "done")
            assert (again["embedded"], again["unchanged"], again["deleted"]) == (0, 300, 2)
            assert len(stored(root, "sms")) == 1198

            with pytest.raises(InvalidRequest) as e:
                c.call("index.enqueue", {"collection": "sms"})
            assert e.value.code == "invalid_input"
    finally:
        assert d.stop() == 0


def test_a_queue_job_on_battery_costs_no_decode_not_even_the_models_calibration(home, tmp_path):
    """A new collection's int8 ranges embed 256 calibration texts: the job must wait for the charger first.

    Found under qemu-aarch64 (tests/test_arm_daemon.py), where those 256 texts took two minutes
    before the job even said it was waiting; on a phone they are seconds of CPU on battery.
    """
    root = fresh_home(home, tmp_path / "home")
    sensors = tmp_path / "battery.json"
    battery(sensors, 40, plugged=False)
    env = {"POCKETEMBED_POWER_POLL_S": "0.2", "POCKETEMBED_POWER_SETTLE_S": "0.2"}
    d = DaemonProcess(root, tmp_path / "pe.sock", "--model", Q8, "--power-source", f"file:{sensors}", env=env).wait_ready()
    try:
        with d.client() as c:
            before = scheduler_stats(c)["decodes"]
            job = c.index_enqueue("sms", [{"id": i + 1, "text": t} for i, t in enumerate(load_sms()[:50])])
            waiting = wait(c, job["id"], lambda j: j["state"] == "waiting")
            assert "on battery at 40%" in waiting["reason"]
            assert scheduler_stats(c)["decodes"] == before  # nothing embedded on battery, calibration included
            battery(sensors, 40, plugged=True)
            assert wait(c, job["id"], lambda j: j["state"] == "done")["embedded"] == 50
            assert scheduler_stats(c)["decodes"] > before
    finally:
        assert d.stop() == 0


def test_a_collections_queue_is_bounded(home, tmp_path, monkeypatch):
    """Busy beyond MAX_QUEUED waiting items: checked in-process on a real store, the daemon's own code path."""
    from pocketembed.daemon import jobs
    from pocketembed.daemon.store import Store, connect

    monkeypatch.setattr(jobs, "MAX_QUEUED", 5)
    conn = connect(tmp_path / "index.db")
    Store(conn)
    queue = jobs.JobQueue(conn)
    job, created = queue.enqueue("sms", Q8, True, [(i, f"text {i}", None) for i in range(3)], [99])
    assert created and job["total"] == 4
    from pocketembed.errors import Busy
    with pytest.raises(Busy) as e:
        queue.enqueue("sms", Q8, True, [(10, "one too many", None), (11, "two", None)], [])
    assert "wait in its queue" in e.value.message and e.value.retry_after_ms > 0
    assert queue.get(job["id"])["total"] == 4  # the refused call added nothing
    conn.close()
