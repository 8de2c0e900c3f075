"""The daemon as a separate process, through its real ZeroMQ socket."""

import asyncio
import signal
import socket
import sqlite3
import stat
import threading
import time

import numpy as np
import pytest
import zmq

from conftest import fresh_home, assert_same_embedding, run_cli
from daemon_proc import DaemonProcess, wait_until
from pocketembed.ipc import AsyncClient, Client, DaemonError, InvalidRequest, ModelError
from pocketembed.ipc import protocol as P
from pocketembed.ipc import sqlite as pe_sqlite

SMS = ["Ok lar... Joking wif u oni...", "Free entry in 2 a wkly comp to win FA Cup final tkts",
       "U dun say so early hor... U c already then say...", "Nah I don't think he goes to usf"]


@pytest.fixture(scope="module")
def daemon(home, tmp_path_factory):
    d = DaemonProcess(fresh_home(home), tmp_path_factory.mktemp("run") / "sock" / "pe.sock").wait_ready()
    yield d
    assert d.stop() == 0


def test_socket_is_private(daemon):
    assert stat.S_IMODE(daemon.socket_path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(daemon.socket_path.stat().st_mode) == 0o600


def test_embed_equals_in_process_engine(daemon, engines):
    with daemon.client() as c:
        got = c.embed(SMS)
    want = engines["q8_0"].embed(SMS)
    assert got.dtype == np.float32 and got.shape == (4, 384)
    assert_same_embedding(got, want)  # the daemon may split threads otherwise than the in-process engine


def test_the_same_request_on_an_idle_daemon_gives_the_same_bits(daemon):
    with daemon.client() as c:
        first = c.embed(SMS)
        again = [c.embed(SMS) for _ in range(3)]
    for v in again:
        assert np.array_equal(v, first)  # same decode configuration: bit-identical (PROTOCOL.md's promise)


def test_output_dtypes_and_dims(daemon, engines):
    with daemon.client() as c:
        f = c.embed(SMS, dims=128)
        i8 = c.embed(SMS, dims=128, dtype="int8")
        b = c.embed(SMS, dims=128, dtype="binary")
        raw = c.embed(SMS, normalize=False)
    assert_same_embedding(f, engines["q8_0"].embed(SMS, dims=128))
    assert i8.dtype == np.int8 and np.array_equal(i8, np.clip(np.rint(f * 127), -127, 127).astype(np.int8))
    assert b.shape == (4, 16) and np.array_equal(b, np.packbits(f > 0, axis=1))
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1, atol=1e-2)


def test_ping_is_answered_during_a_long_embed(gated_daemon):
    """The embed's decodes are held at a gate: the ping is answered while the embed is running,
    however fast or slow this machine computes it (the I/O thread never blocks on inference)."""
    d, gate = gated_daemon()
    texts = [f"message number {i} about dinner plans and the weekend" for i in range(600)]
    done = {}

    def long_embed():
        with d.client(timeout=120) as c:
            done["shape"] = c.embed(texts).shape

    th = threading.Thread(target=long_embed)
    th.start()
    with d.client() as c:
        wait_until(lambda: c.stats()["scheduler"]["busy_workers"] > 0, "the embed's first decode held")
        assert c.ping()["pong"]
    assert th.is_alive() and not done  # answered during the embed
    gate.release()
    th.join(120)
    assert done["shape"] == (600, 384)


def test_error_replies_keep_the_daemon_serving(daemon):
    with daemon.client() as c:
        for bad, code in [
            (dict(texts=[""]), P.EMPTY_TEXT),
            (dict(texts=["word " * 400]), P.TEXT_TOO_LONG),
            (dict(texts=["x" * (P.MAX_TEXT_BYTES + 1)]), P.TOO_LARGE),
            (dict(texts=["a"] * (P.MAX_TEXTS + 1)), P.TOO_LARGE),
            (dict(texts="not a list"), P.INVALID_ARGS),
            (dict(texts=[1, 2]), P.INVALID_ARGS),
            (dict(texts=["ok"], dims="ten"), P.INVALID_ARGS),
            (dict(texts=["ok"], dims=9999), P.INVALID_ARGS),
            (dict(texts=["ok"], dtype="float16"), P.INVALID_ARGS),
            (dict(texts=["ok"], model="nope"), P.UNKNOWN_MODEL),
        ]:
            with pytest.raises((InvalidRequest, ModelError)) as ei:
                c.call("embed", bad)
            assert ei.value.code == code, (bad, ei.value)
        with pytest.raises(InvalidRequest) as ei:
            c.call("no.such.op")
        assert ei.value.code == P.UNKNOWN_OP
        assert c.embed(["still fine"]).shape == (1, 384)
        assert c.embed(["word " * 400], truncate=True).shape == (1, 384)


def test_raw_malformed_frames(daemon):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(daemon.endpoint)
    try:
        for frames in ([b"\xc1garbage"], [b""], [P.pack([1, 2, 3])], [P.pack({"v": 2, "id": 7, "op": "ping"})],
                       [b"a", b"b", b"c"], [P.pack({"v": 1, "id": 8, "op": 5})]):
            s.send_multipart(frames)
            assert s.poll(5000), frames
            reply = P.unpack(s.recv_multipart()[-1])
            assert reply["ok"] is False and reply["error"]["code"] in (P.BAD_FRAME, P.BAD_VERSION, P.INVALID_ARGS)
        # REQ-style envelope (empty delimiter) gets a REQ-style reply
        s.send_multipart([b"", P.request(9, "ping")])
        assert s.poll(5000)
        frames = s.recv_multipart()
        assert frames[0] == b"" and P.unpack(frames[1])["result"]["pong"]
    finally:
        s.close()


def test_async_client_many_in_flight(daemon, engines):
    async def main():
        async with AsyncClient(daemon.endpoint) as c:
            results = await asyncio.gather(*(c.embed([t]) for t in SMS * 5), c.ping())
            with pytest.raises(InvalidRequest):
                await c.embed([""])
            return results

    results = asyncio.run(main())
    want = engines["q8_0"].embed(SMS)
    for i, r in enumerate(results[:-1]):
        assert np.dot(r[0], want[i % 4]) > 0.999
    assert results[-1]["pong"]


def test_client_timeout_is_typed(tmp_path):
    from pocketembed.ipc import DaemonTimeout

    with Client(f"ipc://{tmp_path}/nobody.sock", timeout=0.2) as c:
        with pytest.raises(DaemonTimeout):
            c.ping()


def test_sqlite_adapter_returns_the_same_bytes(daemon):
    conn = sqlite3.connect(":memory:")
    with daemon.client() as c:
        funcs = pe_sqlite.register(conn, client=c)
        conn.execute("CREATE TABLE sms (id INTEGER PRIMARY KEY, body TEXT)")
        conn.executemany("INSERT INTO sms (body) VALUES (?)", [(t,) for t in SMS])
        blobs = [r[0] for r in conn.execute("SELECT pe_embed(body) FROM sms ORDER BY id")]
        for text, blob in zip(SMS, blobs):
            assert blob == c.embed([text])[0].astype("<f4").tobytes()
        q4 = conn.execute("SELECT pe_embed(?, 'all-minilm-l6-v2:q4_0')", ["hi"]).fetchone()[0]
        assert len(q4) == 384 * 4
        best = conn.execute(
            "SELECT id FROM sms ORDER BY pe_cosine(pe_embed(body), pe_embed(?)) DESC LIMIT 1", ["win a cup final ticket"]
        ).fetchone()[0]
        assert best == 2
        assert conn.execute("SELECT pe_embed(NULL)").fetchone()[0] is None
        with pytest.raises(sqlite3.OperationalError):
            conn.execute("SELECT pe_embed('')").fetchone()
        assert funcs.last_error.code == "empty_text"


def test_stats_and_status(daemon):
    with daemon.client() as c:
        c.embed(["count me"])
        s = c.stats()
    assert s["requests"] >= 1 and "all-minilm-l6-v2:q8_0" in s["loaded_models"]
    assert s["rss_bytes"] > 10_000_000 and set(s["latency_ms"]) == {"p50", "p90", "p99"}
    proc = run_cli("status", "--socket", str(daemon.socket_path))
    assert proc.returncode == 0 and "requests" in proc.stdout


def test_cli_embed_through_daemon(daemon, engines):
    import json

    proc = run_cli("embed", "--daemon", "--socket", str(daemon.socket_path), *SMS[:2])
    assert proc.returncode == 0, proc.stderr
    got = np.array(json.loads(proc.stdout)["embeddings"], dtype=np.float32)
    assert_same_embedding(got, engines["q8_0"].embed(SMS[:2]))


def test_second_daemon_refuses_and_stale_socket_is_taken_over(home, daemon, tmp_path):
    second = DaemonProcess(fresh_home(home), daemon.socket_path)  # another data directory, the same socket
    assert second.proc.wait(60) == 1
    assert "another pocketembed daemon is serving" in second.log()
    same_home = DaemonProcess(daemon.home, tmp_path / "other" / "pe.sock")  # the same data directory, another socket
    assert same_home.proc.wait(60) == 1
    err = same_home.log()
    assert "error[daemon_running]" in err and f"is using the data directory {daemon.home}" in err, err
    with daemon.client() as c:
        assert c.ping()["pong"]  # the first one is untouched
    # a socket file left by a crashed process (bound, never unlinked) is taken over
    stale = tmp_path / "s" / "pe.sock"
    stale.parent.mkdir(mode=0o700)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    assert stale.exists()
    d = DaemonProcess(fresh_home(home), stale).wait_ready()
    with d.client() as c:
        assert c.ping()["pong"]
    assert d.stop() == 0 and not stale.exists()


def test_sigterm_answers_everything_sent_before_it(gated_daemon):
    """40 requests in flight (their decodes held at a gate) when SIGTERM lands: each is answered.

    Eight connections of five: a decode answers up to 32 requests at once, and one
    connection's burst must stay under the daemon's reply queue (REPLY_HWM, 8).
    """
    d, gate = gated_daemon()
    ctx = zmq.Context.instance()
    socks = []
    for _ in range(8):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(d.endpoint)
        socks.append(s)
    n = 40
    for i in range(n):
        socks[i % 8].send(P.request(i, "embed", {"texts": [f"message {i} " * 20]}))
    for k, s in enumerate(socks):  # a ping behind them: its reply means the daemon has read them all
        s.send(P.request(f"sync-{k}", "ping"))
        assert s.poll(30000) and P.unpack(s.recv())["id"] == f"sync-{k}"  # nothing else is answered yet
    d.proc.send_signal(signal.SIGTERM)
    with Client(d.endpoint, timeout=30) as probe:  # the daemon has taken the signal: new requests are refused
        def refused() -> bool:
            try:
                probe.ping()
                return False
            except DaemonError as e:
                assert e.code == "shutting_down", e
                return True
        wait_until(refused, "the daemon shutting down")
    gate.release()
    replies = {}
    for k, s in enumerate(socks):
        want = set(range(k, n, 8))
        while want - replies.keys() and s.poll(30000):
            r = P.unpack(s.recv())
            replies[r["id"]] = r
        s.close()
    assert sorted(replies) == list(range(n))
    assert all(r["ok"] for r in replies.values())  # all were received before the signal
    assert d.proc.wait(30) == 0
    assert not d.socket_path.exists()


def test_tcp_is_loopback_only(home, tmp_path):
    bad = DaemonProcess(fresh_home(home), tmp_path / "x" / "pe.sock", "--tcp", "0.0.0.0:45831")
    assert bad.proc.wait(60) == 1
    assert "loopback-only" in bad.log()
    assert not bad.socket_path.exists()  # nothing left behind by the refused start
    malformed = DaemonProcess(fresh_home(home), tmp_path / "z" / "pe.sock", "--tcp", "45833")
    assert malformed.proc.wait(60) == 1 and "HOST:PORT" in malformed.log()
    d = DaemonProcess(fresh_home(home), tmp_path / "y" / "pe.sock", "--tcp", "127.0.0.1:45832").wait_ready()
    with Client("tcp://127.0.0.1:45832") as c:
        assert c.ping()["pong"]
    assert d.stop() == 0


def test_cli_without_a_daemon_fails_fast(tmp_path):
    for args in (["status"], ["embed", "--daemon", "hi"]):
        proc = run_cli(*args, "--socket", str(tmp_path / "none.sock"))
        assert proc.returncode == 1 and "error[no_daemon]" in proc.stderr and "Traceback" not in proc.stderr
        # The missing socket file is seen at once: not "no reply from a daemon ..." after the client timeout.
        assert "start one with `pocketembed serve`" in proc.stderr and "no reply" not in proc.stderr, proc.stderr
