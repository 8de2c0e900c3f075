"""Property-based abuse of the daemon's socket: it answers everything and survives.

Hypothesis generates 2,000+ malformed requests (random bytes, truncated msgpack,
wrong types, unknown ops, huge and empty texts, extra or missing frames). Each
must get exactly one reply, an error with a stable code unless the generated
request happens to be valid; afterwards a valid request still succeeds.
"""

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import fresh_home
from daemon_proc import DaemonProcess
from pocketembed.ipc import protocol as P

STABLE = {P.BAD_FRAME, P.BAD_VERSION, P.UNKNOWN_OP, P.INVALID_ARGS, P.TOO_LARGE, P.EMPTY_TEXT,
          P.TEXT_TOO_LONG, P.UNKNOWN_MODEL, P.MODEL_NOT_PREPARED, P.MODEL_NOT_LOADED, P.MODEL_UNLOADING,
          P.MEMORY_BUDGET, P.TIMEOUT, P.UNKNOWN_JOB, P.BAD_SOURCE, P.INVALID_STATE,
          P.UNKNOWN_COLLECTION, P.COLLECTION_MISMATCH, P.BUSY, "storage_full", "storage_error"}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True),
                    st.text(max_size=20), st.binary(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=10)
texts = st.one_of(st.text(max_size=40), st.just(""), st.just("   "), st.text(min_size=1, max_size=3).map(lambda s: s * 6000),
                  st.integers(-2**63, 2**64 - 1), st.none(), st.binary(max_size=10))
embed_args = st.fixed_dictionaries({}, optional={
    "texts": st.one_of(st.lists(texts, max_size=5), values),
    "model": st.one_of(st.sampled_from(["all-minilm-l6-v2:q8_0", "nope", "", "all-minilm-l6-v2"]), values),
    "dims": st.one_of(st.integers(-5, 1000), values), "dtype": st.one_of(st.sampled_from(["float32", "int8", "binary", "f16"]), values),
    "normalize": values, "truncate": values,
    "priority": st.one_of(st.sampled_from(["interactive", "background", "urgent"]), values),
    "timeout_ms": st.one_of(st.integers(-5, 100), st.floats(allow_nan=True), values),
    "keep_alive": st.one_of(st.sampled_from(["5m", "-1", "soon", "1h30m", ""]), st.integers(-5, 600), values),
    "input_type": st.one_of(st.sampled_from(["query", "document", "other"]), values),
})
job_args = st.fixed_dictionaries({}, optional={
    "db": st.one_of(st.sampled_from(["/nonexistent/sms.db", "relative.db", "/dev/null", ""]), values),
    "table": values, "id_column": values, "text_column": values, "where": values,
    "job": st.one_of(st.integers(-3, 3), values), "limit": values,
    "collection": st.one_of(st.sampled_from(["fuzz", "", "nope"]), values), "query": st.one_of(texts, values), "k": st.one_of(st.integers(-2, 2000), values), "filter": values,
    "rescore_multiplier": values, "ids": st.one_of(st.lists(values, max_size=3), values),
    "items": st.one_of(st.lists(st.fixed_dictionaries({}, optional={"id": values, "text": texts, "metadata": values}),
                                max_size=3), values),
})
envelopes = st.fixed_dictionaries({}, optional={
    "v": st.one_of(st.just(1), values), "id": st.one_of(st.integers(0, 10**6), st.text(max_size=8), values),
    "op": st.one_of(st.sampled_from(["embed", "ping", "stats", "models.list", "models.load", "models.unload", "search", ""]), values),
    "args": st.one_of(embed_args, values),
})
job_envelopes = st.fixed_dictionaries({"v": st.just(1), "id": st.integers(0, 10**6)}, optional={
    "op": st.sampled_from(["jobs.submit", "jobs.list", "jobs.status", "jobs.cancel", "jobs.pause", "jobs.resume",
                           "search", "index.add", "index.delete", "collections.list", "collections.drop"]),
    "args": st.one_of(job_args, values),
})


def truncated(frame: bytes):
    return st.integers(0, max(0, len(frame) - 1)).map(lambda n: frame[:n])


valid = P.request(1, "embed", {"texts": ["hello there", "general kenobi"]})
single_frames = st.one_of(
    st.binary(max_size=300),
    truncated(valid),
    values.map(P.pack),
    envelopes.map(P.pack),
    job_envelopes.map(P.pack),
)
messages = st.one_of(
    single_frames.map(lambda f: [f]),
    st.lists(single_frames, min_size=2, max_size=4),  # extra frames
    st.just([b""]),                                      # an empty frame only
)


@pytest.fixture(scope="module")
def sock(home, tmp_path_factory):
    d = DaemonProcess(fresh_home(home), tmp_path_factory.mktemp("fuzz") / "s" / "pe.sock").wait_ready()
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(d.endpoint)
    yield s
    s.close()
    assert d.stop() == 0


def recv_one(s, timeout_ms=20000):
    assert s.poll(timeout_ms), "no reply"
    frames = s.recv_multipart()
    return P.unpack(frames[-1])


counter = {"n": 0}


@settings(max_examples=2100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(msg=messages)
def test_every_malformed_request_gets_exactly_one_reply(sock, msg):
    counter["n"] += 1
    sock.send_multipart(msg)
    reply = recv_one(sock)
    assert reply["v"] == 1 and isinstance(reply["ok"], bool)
    if not reply["ok"]:
        assert reply["error"]["code"] in STABLE, reply
        assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]
    # a sync ping: nothing else may arrive before its reply (no duplicate replies)
    sync_id = f"sync-{counter['n']}"
    sock.send(P.request(sync_id, "ping"))
    assert recv_one(sock)["id"] == sync_id


def test_daemon_still_serves_after_the_fuzzing(sock):
    assert counter["n"] >= 2000
    sock.send(valid)
    reply = recv_one(sock)
    assert reply["ok"] and reply["result"]["shape"] == [2, 384]
