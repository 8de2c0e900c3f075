"""PROTOCOL.md and the daemon agree, checked from the document's own tables against a real daemon.

The tables are read out of ipc/PROTOCOL.md (between their markers), not copied
here: a row added to the document without a probe here fails, and so does a
row whose code the daemon does not answer. Limits whose probe is costly
(hundreds of requests, 64 connections, a full disk) name the test that holds
them to the document; that test must exist.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
import zmq

from conftest import REPO, fresh_home
from daemon_proc import DaemonProcess
from pocketembed.ipc import client as py_client
from pocketembed.ipc import ops
from pocketembed.ipc import protocol as P

Q8 = "all-minilm-l6-v2:q8_0"
DOC = (REPO / "ipc" / "PROTOCOL.md").read_text()
JAVA = (REPO / "android" / "java" / "org" / "pocketembed" / "DaemonException.java").read_text()


def table(marker: str) -> list[list[str]]:
    """The rows (cells, stripped) of the markdown table between ``<!-- marker -->`` and ``<!-- /marker -->``."""
    m = re.search(rf"<!-- {re.escape(marker)} -->\n(.*?)<!-- /{re.escape(marker.split(':')[0])}", DOC, re.S)
    assert m, f"PROTOCOL.md has no {marker} table"
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in m.group(1).splitlines() if line.startswith("|")]
    return rows[2:]  # past the header and its rule


def codes_in(cell: str) -> set[str]:
    return set(re.findall(r"`([a-z_]+)`", cell))


def error_table() -> dict[str, str]:
    section = DOC[DOC.index("## Error codes"):]
    end = section.find("\n## ")  # the next section, if any
    section = section if end < 0 else section[:end]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `([a-z_]+)` \| (.*) \|$", section, re.M)}


@pytest.fixture(scope="module")
def daemon(home, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("agree")
    sensors = tmp / "battery.json"  # on battery: a queue job waits, so it can be paused and resumed
    sensors.write_text(json.dumps({"battery": {"percent": 40, "plugged": False}, "cpu_percent": 3}))
    d = DaemonProcess(fresh_home(home, tmp / "home"), tmp / "pe.sock", "--model", Q8,
                      env={"POCKETEMBED_MAX_COLLECTIONS": str(MAX_COLLECTIONS),
                           "POCKETEMBED_POWER_SOURCE": f"file:{sensors}"}).wait_ready()
    with d.client() as c:
        c.index_add("doc", [{"id": 1, "text": "see you at the station at six"}])
        c.index_add("queued", [{"id": 1, "text": "a collection that index.enqueue adds to"}])
    yield d
    assert d.stop() == 0


@pytest.fixture
def sock(daemon):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(daemon.endpoint)
    yield s
    s.close()


def send(s: zmq.Socket, frame: bytes) -> dict:
    s.send(frame)
    assert s.poll(60_000), "no reply"
    return P.unpack(s.recv())


def request(op: str, args: dict | None = None, **envelope) -> bytes:
    return msgpack.packb({"v": 1, "id": 9, "op": op, "args": args or {}} | envelope)


TEXT = "x" * (P.MAX_TEXT_BYTES + 1)
MAX_COLLECTIONS = 4
"""The fixture daemon's ``max_collections``."""


def one_collection_too_many(s: zmq.Socket) -> dict:
    """Collections are added until one is refused; those made are dropped again."""
    made, reply = [], {"ok": True}
    while reply["ok"] and len(made) <= MAX_COLLECTIONS:
        made.append(f"lim-{len(made)}")
        reply = send(s, request("index.add", {"collection": made[-1], "items": [{"id": 1, "text": "one more"}]}))
    for name in made:
        send(s, request("collections.drop", {"collection": name}))
    return reply


def big_reply(s: zmq.Socket) -> dict:
    """A search whose reply would be over 16 MiB: 300 hits carrying 60 kB of metadata each."""
    pad = "m" * 60_000
    for start in range(0, 300, 60):
        r = send(s, request("index.add", {"collection": "big", "items": [
            {"id": i, "text": f"message {i}", "metadata": {"pad": pad}} for i in range(start, start + 60)]}))
        assert r["ok"], r
    return send(s, request("search", {"collection": "big", "query": "message", "k": 300}))
Probe = Callable[[zmq.Socket], dict]

LIMIT_PROBES: dict[str, Probe | str] = {
    "request frame": lambda s: send(s, request("embed", {"texts": ["y" * 16_000] * 300})),
    "frame cap": "test_hardening.py::test_oversize_frames_up_to_the_cap_get_too_large_and_other_requests_survive",
    "one text": lambda s: send(s, request("embed", {"texts": [TEXT]})),
    "texts per request": lambda s: send(s, request("embed", {"texts": ["a"] * (P.MAX_TEXTS + 1)})),
    "ids per request": lambda s: send(s, request("index.delete", {"collection": "doc", "ids": list(range(ops.MAX_IDS + 1))})),
    "a name or id string": lambda s: send(s, request("search", {"collection": "c" * 129, "query": "q"})),
    "tokens per text": lambda s: send(s, request("embed", {"texts": ["word " * 600]})),
    "nesting": lambda s: send(s, request("search", {"collection": "doc", "query": "q", "filter": {"a": {"b": 1}}})),
    "metadata": lambda s: send(s, request("index.add", {"collection": "doc", "items": [
        {"id": 2, "text": "t", "metadata": {f"k{i}": i for i in range(257)}}]})),
    "search candidates": lambda s: send(s, request("search", {"collection": "doc", "query": "q", "k": 1000,
                                                              "rescore_multiplier": 11})),
    "`keep_alive`": lambda s: send(s, request("embed", {"texts": ["a"], "keep_alive": 2_592_001})),
    "collections": lambda s: one_collection_too_many(s),
    "requests waiting per connection": "test_protocol_agreement.py::test_the_busy_limits_with_the_workers_held",
    "executor queues": "test_protocol_agreement.py::test_the_busy_limits_with_the_workers_held",
    "one reply": lambda s: big_reply(s),
    "replies waiting unread per connection": "test_hostile_tcp.py::test_a_client_that_never_reads_its_replies_cannot_grow_the_daemon",
    "TCP connections": "test_hostile_tcp.py::test_connections_beyond_the_cap_are_refused_and_others_still_served",
    "a job source's statements": "test_hardening.py::test_a_never_ending_where_fails_on_its_budget_and_never_blocks_stats",
    "queued per collection": "test_enqueue_writes.py::test_a_queue_is_bounded_in_bytes",
    "queued in all": "test_enqueue_writes.py::test_queue_byte_caps_per_request_per_collection_and_in_total",
}


def test_every_limit_of_the_document_is_answered_with_its_code(sock):
    rows = table("limits")
    assert {r[0] for r in rows} == set(LIMIT_PROBES), "PROTOCOL.md's limits and this test's probes differ"
    for limit, _, error in rows:
        probe = LIMIT_PROBES[limit]
        if isinstance(probe, str):
            path, name = probe.split("::")
            assert re.search(rf"^def {name}\(", (REPO / "tests" / path).read_text(), re.M), f"{probe} is gone"
            continue
        reply = probe(sock)
        assert not reply["ok"] and reply["error"]["code"] in codes_in(error), (limit, error, reply)


ENVELOPE_PROBES: dict[str, bytes | tuple[str, bytes]] = {
    "not msgpack, not a map, or a map nested too deep to decode": b"\xc1 not msgpack",
    "`id` not an int or string, or a string over 256 characters": msgpack.packb({"v": 1, "id": 1.5, "op": "ping"}),
    "frame over 4 MiB": request("embed", {"texts": ["y" * 16_000] * 300}),
    "`v` missing or not `1`": msgpack.packb({"id": 9, "op": "ping"}),
    "`auth` not a string, or over 256 characters": request("ping", auth=["token"]),
    "`op` missing or not a string": msgpack.packb({"v": 1, "id": 9}),
    "`op` unknown, with a token the daemon accepts (or on the owner's Unix socket)": request("no.such.op"),
    "`op` unknown, on TCP without a valid token": "test_hostile_tcp.py::test_no_token_and_an_unknown_op_is_unauthorized_without_the_op_list",
    "`args` not a map": msgpack.packb({"v": 1, "id": 9, "op": "stats", "args": [1, 2]}),
}


def test_every_envelope_error_of_the_document(sock):
    rows = table("envelope-errors")
    assert {r[0] for r in rows} == set(ENVELOPE_PROBES)
    for case, code in rows:
        probe = ENVELOPE_PROBES[case]
        if isinstance(probe, str):
            path, name = probe.split("::")
            assert re.search(rf"^def {name}\(", (REPO / "tests" / path).read_text(), re.M), f"{probe} is gone"
            continue
        reply = send(sock, probe)
        assert not reply["ok"] and reply["error"]["code"] in codes_in(code), (case, reply)
    # Unknown envelope keys are ignored; a token on the owner's socket too.
    assert send(sock, request("ping", extra="ignored", auth="pe_not-a-token"))["ok"]


VALID_ARGS: dict[str, dict] = {
    "ping": {}, "models.list": {}, "embed": {"texts": ["hello"]}, "models.load": {"model": Q8},
    "stats": {}, "search": {"collection": "doc", "query": "station"},
    "index.add": {"collection": "doc", "items": [{"id": 3, "text": "dinner at eight"}]},
    "index.delete": {"collection": "doc", "ids": [3]},
    "index.enqueue": {"collection": "queued", "items": [{"id": 2, "text": "later, on the charger"}]},
    "collections.list": {}, "collections.stats": {"collection": "doc"}, "jobs.list": {},
}
ELSEWHERE = {"rerank": "test_import.py (a reranker model)", "jobs.submit": "test_jobs.py (a job source)"}


def test_each_ops_result_has_the_shape_the_document_gives(sock):
    documented = {r[0].strip("`"): r[3] for r in table("gen:ops")}
    assert set(documented) == set(ops.OPS)
    results = {}

    def call(name: str, args: dict) -> dict | list:
        reply = send(sock, request(name, args))
        assert reply["ok"], (name, reply)
        results[name] = reply["result"]
        return reply["result"]

    for name, args in VALID_ARGS.items():
        call(name, args)
    queued = results["index.enqueue"]
    assert isinstance(queued["created"], float) and queued["new_job"] is True  # a timestamp, as in every job map
    for name in ("jobs.status", "jobs.pause", "jobs.resume", "jobs.cancel"):  # on battery: the job waits meanwhile
        call(name, {"job": queued["id"]})
    call("models.unload", {"model": Q8})
    call("collections.drop", {"collection": "queued"})
    assert set(results) | set(ELSEWHERE) == set(ops.OPS)
    for name, result in results.items():
        assert isinstance(result, {"map": dict, "list": list}[documented[name]]), (name, documented[name], result)


def test_the_error_table_the_daemon_and_both_clients_know_the_same_codes():
    documented = set(error_table())
    wire = {v for k, v in vars(P).items() if k.isupper() and isinstance(v, str) and re.fullmatch(r"[a-z_]+", v)}
    wire -= {"float32", "int8", "binary", "interactive", "background"}
    assert documented == wire, (documented ^ wire)
    assert wire == set(P.ERRORS), wire ^ set(P.ERRORS)  # every constant is a registry entry
    missing_py = documented - set(py_client._BY_CODE)
    assert not missing_py, f"the Python client has no exception class for {missing_py}"
    java = set(re.findall(r'case "([a-z_]+)":', JAVA))
    missing_java = documented - java
    assert not missing_java, f"the Java client does not map {missing_java}"


def test_the_busy_limits_with_the_workers_held(gated_daemon):
    """Requests waiting per connection (256) and an executor's queue (aux: 64), each filled while held."""
    d, gate = gated_daemon("--model", Q8, env={"POCKETEMBED_FAILPOINTS": "scheduler:decode=hold,aux:stats=hold"})
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(d.endpoint)
    try:
        n = 256
        for i in range(n + 1):
            s.send(request("embed", {"texts": [f"held {i}"]}, id=i))
        assert s.poll(60_000)
        reply = P.unpack(s.recv())  # the only reply while the decodes are held: the 257th request's
        assert reply["id"] == n and reply["error"]["code"] == P.BUSY and "retry_after_ms" in reply["error"], reply
        other = zmq.Context.instance().socket(zmq.DEALER)
        other.setsockopt(zmq.LINGER, 0)
        other.connect(d.endpoint)
        try:
            for i in range(66):  # one held in the aux thread, 64 queued behind it, one more: busy
                other.send(request("stats", id=i))
            assert other.poll(60_000)
            reply = P.unpack(other.recv())
            assert reply["error"]["code"] == P.BUSY, reply
        finally:
            gate.release()
            other.close()
    finally:
        s.close()
