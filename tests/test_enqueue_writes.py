"""The queued write path (index.enqueue → the job runner's drain) against a real daemon.

Each test holds the drain with the injected battery reading (the charger "off")
while it lays out the queue, then lets the charger drain it: what a chunk sees
and when it commits is then fixed by the queue's order, not by the clock.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import fresh_home
from daemon_proc import DaemonProcess
from pocketembed.ipc import DaemonError
from pocketembed.sms import load_sms
from test_enqueue import battery

Q8 = "all-minilm-l6-v2:q8_0"


def unique_sms(n: int, skip: int = 0) -> list[str]:
    """n distinct SMS texts (the corpus repeats some), so that a text's nearest item is its own."""
    seen: dict[str, None] = {}
    for text in load_sms():
        if len(text) > 20:
            seen.setdefault(text, None)
    texts = list(seen)[skip:skip + n]
    assert len(texts) == n
    return texts


@contextmanager
def queue_daemon(home: Path, tmp_path: Path, env: dict[str, str] | None = None) -> Iterator[tuple]:
    """A daemon on its own data directory whose battery reading the test sets; the charger starts off."""
    root = fresh_home(home, tmp_path / "home")
    sensors = tmp_path / "battery.json"
    battery(sensors, 40, plugged=False)
    env = {"POCKETEMBED_POWER_POLL_S": "0.2", "POCKETEMBED_POWER_SETTLE_S": "0.2",
           "POCKETEMBED_POWER_INTERACTIVE_PAUSE_S": "0", **(env or {})}
    d = DaemonProcess(root, tmp_path / "pe.sock", "--model", Q8, "--power-source", f"file:{sensors}", env=env).wait_ready()
    try:
        yield d, sensors, root
    finally:
        assert d.stop() == 0, d.log()[-3000:]


def stored_texts(root: Path, collection: str) -> dict:
    with sqlite3.connect(root / "index.db") as conn:
        return dict(conn.execute("SELECT id, text FROM items WHERE collection = ?", (collection,)).fetchall())


def queued_left(root: Path, job_id: int) -> int:
    """Rows of the job still in the queue table."""
    with sqlite3.connect(root / "index.db") as conn:
        return conn.execute("SELECT COUNT(*) FROM queue_items WHERE job = ?", (job_id,)).fetchone()[0]


def queue_row(root: Path, job_id: int) -> tuple[int, int, int]:
    """The job's running sums of what waits in its queue, and the rows that really wait."""
    with sqlite3.connect(root / "index.db") as conn:
        rows, size = conn.execute("SELECT queue_rows, queue_bytes FROM jobs WHERE id = ?", (job_id,)).fetchone()
        left = conn.execute("SELECT COUNT(*) FROM queue_items WHERE job = ?", (job_id,)).fetchone()[0]
    return rows, size, left


def recall_at_1(client, collection: str, items: dict) -> float:
    """Share of items whose own text finds them first."""
    found = sum(client.search(collection, text, k=1)[0]["id"] == i for i, text in items.items())
    return found / len(items)


def wait(client, job_id: int, until, timeout: float = 120) -> dict:
    """Poll the job until ``until(job)``; a failed or cancelled job fails the test with its error."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.job(job_id)
        assert job["state"] not in ("failed", "cancelled"), f"job {job_id} {job['state']}: {job['error']}"
        if until(job):
            return job
        time.sleep(0.05)
    raise TimeoutError(client.job(job_id))


def done(job: dict) -> bool:
    return job["state"] == "done"


def test_the_last_write_to_an_id_wins_across_chunk_boundaries(home, tmp_path):
    """Chunks are pipelined two deep; whether an item's text is unchanged is decided against what is committed.

    With 4 rows a chunk the queue reads [1, 2, 3, delete x] [put x (its stored text), 4, 5, put y = new]
    [put y = its stored text, 6]: each second chunk is prepared while the one before it is uncommitted.
    """
    texts = unique_sms(9)
    x_text, y_old, y_new = texts[6:9]
    with queue_daemon(home, tmp_path, {"POCKETEMBED_JOB_CHUNK_ROWS": "4"}) as (d, sensors, root):
        with d.client() as c:
            c.index_add("q", [{"id": "x", "text": x_text}, {"id": "y", "text": y_old}], store_text=True)

            def put(*items: tuple) -> dict:
                return c.index_enqueue("q", [{"id": i, "text": t} for i, t in items])

            job = put((1, texts[0]), (2, texts[1]), (3, texts[2]))
            c.index_enqueue("q", [], delete=["x"])
            put(("x", x_text), (4, texts[3]), (5, texts[4]), ("y", y_new))
            put(("y", y_old), (6, texts[5]))
            battery(sensors, 40, plugged=True)
            job = wait(c, job["id"], done)
            assert job["scanned"] == 10 and job["failed"] == 0
        assert stored_texts(root, "q") == {**{i + 1: texts[i] for i in range(6)}, "x": x_text, "y": y_old}
        assert queue_row(root, job["id"]) == (0, 0, 0)  # the running sums went down with every chunk


def test_items_queued_before_a_drop_never_reach_the_recreated_collection(home, tmp_path):
    """Drop cancels the collection's queue job and deletes its rows in the same transaction."""
    dropped, new = unique_sms(20), unique_sms(5, skip=20)
    with queue_daemon(home, tmp_path) as (d, sensors, root):
        with d.client() as c:
            queued = c.index_enqueue("c", [{"id": i, "text": t} for i, t in enumerate(dropped)])
            wait(c, queued["id"], lambda j: j["state"] == "waiting")
            c.drop_collection("c")
            assert c.job(queued["id"])["state"] == "cancelled"
            assert queued_left(root, queued["id"]) == 0
            again = c.index_enqueue("c", [{"id": 100 + i, "text": t} for i, t in enumerate(new)])
            assert again["id"] != queued["id"] and again["total"] == 5  # a new job
            battery(sensors, 40, plugged=True)
            wait(c, again["id"], done)
        assert sorted(stored_texts(root, "c")) == [100 + i for i in range(5)]  # none of the 20 the user dropped


def test_a_full_queue_does_not_outlive_its_dropped_collection(home, tmp_path):
    from pocketembed.daemon import jobs

    with queue_daemon(home, tmp_path) as (d, sensors, root):
        with d.client() as c:
            for start in range(0, jobs.MAX_QUEUED, 10_000):
                full = c.index_enqueue("full", [], delete=list(range(start, start + 10_000)))
            with pytest.raises(DaemonError) as e:
                c.index_enqueue("full", [], delete=[-1])
            assert e.value.code == "busy"
            c.drop_collection("full")
            assert c.job(full["id"])["state"] == "cancelled" and queued_left(root, full["id"]) == 0
            again = c.index_enqueue("full", [{"id": 1, "text": "a new collection of the same name"}])
            assert again["id"] != full["id"] and again["total"] == 1  # a new job


def test_a_recreated_collection_gets_its_own_calibration_in_the_runner(home, tmp_path):
    """The runner's store must not take the dropped collection's calibration for the new one's.

    The first "c" is calibrated on 1,024 vectors (with a rotation of the binary code); the runner reads
    that calibration when it drains one item into it. The new "c" has its own, which its searches use.
    """
    old, new = unique_sms(1024), unique_sms(200, skip=1024)
    with queue_daemon(home, tmp_path, {"POCKETEMBED_JOB_CHUNK_ROWS": "8"}) as (d, sensors, root):
        with d.client() as c:
            c.index_add("c", [{"id": i, "text": t} for i, t in enumerate(old)])
            battery(sensors, 40, plugged=True)
            wait(c, c.index_enqueue("c", [{"id": "one more", "text": new[0]}])["id"], done)
            assert c.drop_collection("c")["dropped"] == 1025
            again = c.index_enqueue("c", [{"id": 1000 + i, "text": t} for i, t in enumerate(new)])
            wait(c, again["id"], done)
            assert recall_at_1(c, "c", {1000 + i: t for i, t in enumerate(new)}) >= 0.97
            c.index_add("added", [{"id": 1000 + i, "text": t} for i, t in enumerate(new)])
            assert recall_at_1(c, "added", {1000 + i: t for i, t in enumerate(new)}) >= 0.97  # the same, without a queue


def test_enqueue_into_a_matryoshka_collection_drains_at_its_dims(home, tmp_path):
    texts = unique_sms(40)
    with queue_daemon(home, tmp_path, {"POCKETEMBED_JOB_CHUNK_ROWS": "16"}) as (d, sensors, root):
        with d.client() as c:
            job = c.index_enqueue("m", [{"id": i, "text": t} for i, t in enumerate(texts)], dims=64)
            battery(sensors, 40, plugged=True)
            job = wait(c, job["id"], done)
            assert (job["embedded"], job["failed"]) == (40, 0)
            assert [col["dims"] for col in c.collections() if col["name"] == "m"] == [64]
            assert recall_at_1(c, "m", dict(enumerate(texts))) >= 0.95
            # The same texts again reuse the 64-dim vectors the store holds.
            again = c.index_enqueue("m", [{"id": 100 + i, "text": t} for i, t in enumerate(texts[:10])])
            again = wait(c, again["id"], done)
            assert (again["embedded"], again["failed"]) == (10, 0)
            assert c.stats()["scheduler"]["lanes"]["background"]["completed"] == 3  # 40 texts in 3 chunks, no more


def test_a_queue_drain_waits_out_a_model_unload_and_reloads_the_model(home, tmp_path):
    """models.unload refuses new requests until its queued ones are done; the runner waits, then reloads on demand.

    The unload is held open by a long interactive request (E): unload waits for it, and the test sees the
    unload under way (a probe is refused with model_unloading) before it plugs the charger in, so the
    drain's first chunk arrives while the model is being unloaded.
    """
    texts = unique_sms(24)
    pool = unique_sms(192 * 12, skip=24)
    long_texts = [" ".join(pool[k * 12:(k + 1) * 12]) for k in range(192)]  # ~256 tokens each, truncated
    with queue_daemon(home, tmp_path, {"POCKETEMBED_JOB_CHUNK_ROWS": "8"}) as (d, sensors, root):
        with d.client() as c:
            job = c.index_enqueue("u", [{"id": i, "text": t} for i, t in enumerate(texts)])
            wait(c, job["id"], lambda j: j["state"] == "waiting")
            results: dict[str, object] = {}

            def call(name: str, fn) -> None:
                with d.client(timeout=120) as own:
                    try:
                        results[name] = fn(own)
                    except DaemonError as e:
                        results[name] = e

            held = threading.Thread(target=call, args=("E", lambda cl: cl.embed(long_texts, model=Q8, truncate=True)))
            held.start()
            deadline = time.monotonic() + 30
            while c.stats()["scheduler"]["lanes"]["interactive"]["queued_requests"] == 0:
                assert time.monotonic() < deadline and "E" not in results, results
                time.sleep(0.01)
            unloading = threading.Thread(target=call, args=("unload", lambda cl: cl.unload(Q8)))
            unloading.start()
            while True:  # until the unload is under way: new requests for the model are refused
                assert time.monotonic() < deadline and "E" not in results, "E ended before the unload began"
                try:
                    c.call("embed", {"texts": ["probe"], "model": Q8, "timeout_ms": 1})
                except DaemonError as e:
                    if e.code == "model_unloading":
                        break
                    assert e.code == "timeout", e
            battery(sensors, 40, plugged=True)
            held.join(120)
            unloading.join(120)
            assert not isinstance(results["E"], DaemonError) and results["unload"] == {"model": Q8, "loaded": False}
            job = wait(c, job["id"], done)
            assert (job["embedded"], job["failed"]) == (24, 0)
        assert sorted(stored_texts(root, "u")) == list(range(24))


def test_a_queue_is_bounded_in_bytes(home, tmp_path):
    """Near the item limits a queued item is ~80 kB: one collection's queue stops at its byte cap, answering busy."""
    from pocketembed.daemon import jobs

    text = "x" * 16_000
    per_request = [{"id": f"item-{k:04d}", "text": text} for k in range(240)]  # ~3.8 MB, under the 4 MiB frame
    with queue_daemon(home, tmp_path) as (d, sensors, root):
        with d.client(timeout=60) as c:
            sent = 0
            with pytest.raises(DaemonError) as e:
                while True:
                    job = c.index_enqueue("big", [{**it, "id": f"{sent}-{it['id']}"} for it in per_request])
                    sent += 1
                    assert sent < 10, "no byte cap: 10 requests queued ~38 MB"  # the item cap is 833 such requests
            assert e.value.code == "busy" and "bytes" in e.value.message
            rows, size, left = queue_row(root, job["id"])
            assert rows == left == sent * 240 and size <= jobs.MAX_QUEUE_BYTES < size + 240 * 16_000
            small = c.index_enqueue("small", [{"id": 1, "text": "still room for another collection"}])
            assert small["id"] != job["id"] and small["total"] == 1
            c.job_cancel(job["id"])  # cancelling a queue job frees its queue
            assert queue_row(root, job["id"]) == (0, 0, 0)
            assert c.index_enqueue("big", per_request)["id"] != job["id"]


def test_queue_byte_caps_per_request_per_collection_and_in_total(tmp_path, monkeypatch):
    """The byte caps checked in-process on a real store (the daemon's own code path), with small caps."""
    from pocketembed.daemon import jobs
    from pocketembed.daemon.store import Store, connect
    from pocketembed.errors import Busy, TooLarge

    monkeypatch.setattr(jobs, "MAX_QUEUE_BYTES", 10_000)
    monkeypatch.setattr(jobs, "MAX_QUEUE_BYTES_TOTAL", 25_000)
    conn = connect(tmp_path / "index.db")
    Store(conn)
    queue = jobs.JobQueue(conn)
    item = lambda i: (i, "t" * 2_000, '{"n": 1}')  # noqa: E731
    with pytest.raises(TooLarge):
        queue.enqueue("a", Q8, True, [item(i) for i in range(6)], [])  # 12 kB: never fits one queue
    a, created = queue.enqueue("a", Q8, True, [item(i) for i in range(4)], [])
    assert created and a["total"] == 4
    with pytest.raises(Busy) as e:
        queue.enqueue("a", Q8, True, [item(10)], [])  # 4 + 1 items: over a's 10 kB
    assert "bytes" in e.value.message and e.value.retry_after_ms > 0
    queue.enqueue("b", Q8, True, [item(i) for i in range(4)], [])
    queue.enqueue("c", Q8, True, [item(i) for i in range(3)], [])
    with pytest.raises(Busy) as e:
        queue.enqueue("d", Q8, True, [item(i) for i in range(2)], [])  # 11 items: over 25 kB in all
    assert "all" in e.value.message
    queue.control(a["id"], "cancel")
    queue.enqueue("d", Q8, True, [item(i) for i in range(2)], [])  # a's bytes are free again
    conn.close()
