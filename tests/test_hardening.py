"""Hostile or broken clients and storage faults against a real daemon: it answers, and it survives.

Every test talks to `pocketembed serve` over its socket. Faults inside the
daemon are injected with its failpoints (daemon/faults.py); a full disk with
RLIMIT_FSIZE on the daemon process; a corrupt index.db by writing garbage.
"""

from __future__ import annotations

import resource
import sqlite3
import threading
import time

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import fresh_home, run_cli
from daemon_proc import DaemonProcess, wait_until
from pocketembed.ipc import Client, DaemonError
from pocketembed.ipc import ops
from pocketembed.ipc import protocol as P
from sms_db import make_sms_db

Q8 = "all-minilm-l6-v2:q8_0"


def dealer(endpoint: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def recv(s: zmq.Socket, timeout_ms: int = 30_000) -> dict:
    assert s.poll(timeout_ms), "no reply"
    return P.unpack(s.recv_multipart()[-1])


def nested_frame(op: str, args_prefix: bytes, depth: int, kind: bytes = b"\x81\xa1a") -> bytes:
    """A request whose args end in a value nested ``depth`` levels deep, built as raw msgpack
    (msgpack's own packer refuses such depths; a hostile client does not need it)."""
    deep = kind * depth + (b"\x80" if kind.startswith(b"\x81") else b"\x90")
    head = msgpack.packb({"v": 1, "id": 7, "op": op})
    return bytes([head[0] + 1]) + head[1:] + msgpack.packb("args") + args_prefix + deep


def assert_fully_working(endpoint: str) -> None:
    """Not only ping: an aux op, an index op and an embed answer."""
    with Client(endpoint, timeout=60) as c:
        assert c.ping()["pong"]
        assert "requests" in c.stats()
        assert isinstance(c.collections(), list)
        assert c.embed(["still serving"]).shape == (1, 384)


@pytest.fixture(scope="module")
def daemon(home, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hard")
    d = DaemonProcess(fresh_home(home, tmp / "home"), tmp / "pe.sock", "--model", Q8,
                      env={"POCKETEMBED_SOURCE_BUDGET_S": "1", "POCKETEMBED_JOB_SOURCES": str(tmp)}).wait_ready()
    yield d
    assert d.stop() == 0


def test_deeply_nested_metadata_and_lists_get_one_error_each(daemon):
    s = dealer(daemon.endpoint)
    try:
        prefix = b"\x82" + msgpack.packb("collection") + msgpack.packb("deep") + msgpack.packb("items") + b"\x91" \
            + b"\x83" + msgpack.packb("id") + b"\x01" + msgpack.packb("text") + msgpack.packb("x") + msgpack.packb("metadata")
        for depth in (3, 500, 990, 100_000):
            for kind in (b"\x81\xa1a", b"\x91"):  # maps in maps, lists in lists
                s.send(nested_frame("index.add", prefix, depth, kind))
                reply = recv(s)
                assert not reply["ok"], reply
                if depth <= 500:  # the schema allows two levels: refused at the third, with the request's id
                    assert reply["id"] == 7 and reply["error"]["code"] == P.INVALID_ARGS, reply
                elif reply["error"]["code"] != P.INVALID_ARGS:  # near or past the decoder's nesting limit (~1,000
                    # levels, Python's recursion limit) the frame itself is refused
                    assert reply["error"]["code"] == P.BAD_FRAME and "nested too deep" in reply["error"]["message"]
        # deep values in every other op's args, and as the whole args
        for name in ops.OPS:
            s.send(nested_frame(name, b"", 50_000))
            reply = recv(s)
            assert not reply["ok"] and reply["error"]["code"] in (P.INVALID_ARGS, P.BAD_FRAME), (name, reply)
    finally:
        s.close()
    assert_fully_working(daemon.endpoint)


def test_oversize_frames_up_to_the_cap_get_too_large_and_other_requests_survive(daemon):
    s = dealer(daemon.endpoint)
    try:
        s.send(P.request("before", "embed", {"texts": ["a request in flight on the same connection"]}))
        big = P.request("big", "embed", {"texts": ["x" * 1000] * 5000})  # ~5 MB: over the protocol's 4 MiB
        assert P.MAX_FRAME_BYTES < len(big) < 16 * 1024 * 1024
        s.send(big)
        s.send(P.request("after", "ping"))
        replies = {r["id"]: r for r in (recv(s), recv(s), recv(s))}
        assert set(replies) == {"before", "big", "after"}, replies  # the over-size frame's id is recovered
        assert replies["big"]["error"]["code"] == P.TOO_LARGE
        assert replies["before"]["ok"] and replies["after"]["ok"]
    finally:
        s.close()


def test_a_never_ending_where_fails_on_its_budget_and_never_blocks_stats(daemon):
    db = make_sms_db(daemon.socket_path.parent / "sms.db", limit=50)
    forever = "id IN (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c WHERE x < 0)"
    results: list = []

    def submit() -> None:
        with Client(daemon.endpoint, timeout=60) as c:
            try:
                results.append(c.index_table(str(db), "messages", "id", "body", where=forever, collection="never"))
            except DaemonError as e:
                results.append(e.code)

    threads = [threading.Thread(target=submit) for _ in range(12)]
    for t in threads:
        t.start()
    with Client(daemon.endpoint, timeout=60) as c:
        wait_until(lambda: c.stats()["executors"]["source"]["queued"] > 0, "the wheres queued")
        for _ in range(5):  # answered while the source thread is still busy: aux ops never queue behind it
            assert c.stats()["executors"]["source"]["queued"] > 0
            c.jobs()
    for t in threads:
        t.join(120)
    assert results.count("bad_source") >= 1 and set(results) <= {"bad_source", "busy"}, results
    assert "busy" in results  # the source executor's queue (8) is bounded
    assert_fully_working(daemon.endpoint)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.data())
def test_generated_nested_and_oversized_args_for_every_op(daemon, data):
    leaves = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True),
                       st.text(max_size=30), st.binary(max_size=30), st.just("x" * 70_000))
    nested = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                          st.dictionaries(st.text(max_size=6), inner, max_size=6)),
                          max_leaves=60)
    name = data.draw(st.sampled_from(sorted(ops.OPS)))
    fields = [f.name for f in ops.msgspec.inspect.type_info(ops.OPS[name].args).fields] + ["unknown"]
    args = data.draw(st.dictionaries(st.sampled_from(fields), nested, max_size=len(fields)))
    s = dealer(daemon.endpoint)
    try:
        s.send(P.request(1, name, args))
        reply = recv(s)
        assert reply["id"] == 1 and isinstance(reply["ok"], bool)
        s.send(P.request(2, "ping"))
        assert recv(s)["id"] == 2  # exactly one reply: nothing else came before the ping's
    finally:
        s.close()


def test_daemon_fully_works_after_the_generated_requests(daemon):
    assert_fully_working(daemon.endpoint)


def test_an_exception_in_any_executor_is_answered_and_the_thread_goes_on(home, tmp_path):
    points = "aux:jobs.list=raise,control:models.load=raise,source:jobs.submit=raise,search:search=raise," \
             "write:index.delete=raise,scheduler:decode=raise"
    d = DaemonProcess(fresh_home(home), tmp_path / "pe.sock", "--model", "none",
                      env={"POCKETEMBED_FAILPOINTS": points}).wait_ready()
    try:
        with Client(d.endpoint, timeout=60) as c:
            for call in (c.jobs, lambda: c.load(Q8), lambda: c.index_table("/nonexistent.db", "t", "id", "body"),
                         lambda: c.search("sms", "hello"), lambda: c.index_delete("sms", [1]), lambda: c.embed(["x"])):
                for _ in range(2):  # answered, and answered again: the thread lived on
                    with pytest.raises(DaemonError) as e:
                        call()
                    assert e.value.code == "internal" and "injected fault" in e.value.message
            stats = c.stats()  # the aux thread that failed on jobs.list answers stats
            assert stats["internal_errors"] >= 10 and all(ex["alive"] for ex in stats["executors"].values())
            assert c.ping()["pong"]
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("point", ["aux:jobs.list=die", "scheduler:decode=die", "write:*=die"])
def test_a_thread_that_dies_anyway_makes_the_daemon_answer_and_exit(home, tmp_path, point):
    d = DaemonProcess(fresh_home(home), tmp_path / "pe.sock", "--model", Q8,
                      env={"POCKETEMBED_FAILPOINTS": point}).wait_ready()
    with Client(d.endpoint, timeout=60) as c:
        with pytest.raises(DaemonError) as e:
            {"aux": c.jobs, "scheduler": lambda: c.embed(["x"]),
             "write": lambda: c.index_add("c", [{"id": 1, "text": "x"}])}[point.split(":")[0]]()
    assert e.value.code == "internal" and "restarting" in e.value.message
    assert d.proc.wait(30) == 70  # exits for its supervisor to restart it: never half-alive
    assert "thread died" in d.log()


def test_a_full_disk_fails_writes_cleanly_and_loses_nothing_committed(home, tmp_path):
    limit = 3 << 20

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    root = fresh_home(home, tmp_path / "home")
    d = DaemonProcess(root, tmp_path / "pe.sock", "--model", Q8, preexec_fn=small_disk).wait_ready()
    try:
        with Client(d.endpoint, timeout=120) as c:
            stored, failure = 0, None
            for batch in range(40):
                items = [{"id": batch * 500 + i, "text": f"message {batch}-{i} about the weekend plans",
                          "metadata": {"pad": "p" * 2000}} for i in range(500)]
                try:
                    c.index_add("full", items)
                    stored += 500
                except DaemonError as e:
                    failure = e
                    break
            assert failure is not None and failure.code in ("storage_full", "storage_error"), failure
            assert "nothing of this request was stored" in failure.message.lower()
            assert {x["name"]: x for x in c.collections()}["full"]["items"] == stored  # nothing half-committed
            assert len(c.search("full", "weekend plans", k=5)) == 5  # reads go on
            assert c.embed(["embedding still works"]).shape == (1, 384)
            try:  # the store's connection is not left inside a failed transaction: a small write works or fails cleanly
                c.index_add("full", [{"id": -1, "text": "one more message"}])
                stored += 1
            except DaemonError as e:
                assert e.code in ("storage_full", "storage_error"), e
            assert {x["name"]: x for x in c.collections()}["full"]["items"] == stored
    finally:
        assert d.stop() == 0


def test_a_corrupt_index_db_is_reported_and_embedding_still_works(home, tmp_path):
    root = fresh_home(home, tmp_path / "home")
    (root / "index.db").write_bytes(b"this is not a database " * 200)
    d = DaemonProcess(root, tmp_path / "pe.sock", "--model", Q8).wait_ready()
    try:
        with Client(d.endpoint, timeout=60) as c:
            assert c.embed(["embedding works without a store"]).shape == (1, 384)
            store = c.stats()["store"]
            assert store["ok"] is False and "index.db" in store["error"]
            for call in (lambda: c.search("sms", "x"), c.collections, c.jobs):
                with pytest.raises(DaemonError) as e:
                    call()
                assert e.value.code == "storage_error" and "unavailable" in e.value.message
        status = run_cli("status", "--socket", str(d.socket_path))
        assert status.returncode == 0 and "index store: UNAVAILABLE" in status.stdout
    finally:
        assert d.stop() == 0
    with pytest.raises(sqlite3.DatabaseError):  # untouched: the daemon did not "repair" it away
        sqlite3.connect(root / "index.db").execute("SELECT * FROM sqlite_master").fetchall()


def test_a_model_batch_smaller_than_the_lanes_is_respected(home, tmp_path):
    """A per-model batch_tokens below the lane's 512 made every decode fail with internal."""
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[model."{Q8}"]\nbatch_tokens = 300\n')
    d = DaemonProcess(fresh_home(home), tmp_path / "pe.sock", "--model", Q8, "--config", str(cfg)).wait_ready()
    try:
        with Client(d.endpoint, timeout=120) as c:
            texts = [f"message {i}: are we still on for dinner at the usual place tonight?" for i in range(64)]
            assert c.embed(texts).shape == (64, 384)  # ~1,200 tokens in decodes of at most 300
            assert c.embed(["word " * 250]).shape == (1, 384)  # one text near max_tokens still fits
    finally:
        assert d.stop() == 0
