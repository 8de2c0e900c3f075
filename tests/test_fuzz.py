"""Property-based abuse of the daemon's socket and HTTP endpoints: it answers everything and survives.

Hypothesis generates 2,000+ malformed requests (random bytes, truncated msgpack,
wrong types, unknown ops, huge and empty texts, extra or missing frames). Each
must get exactly one reply, an error with a stable code unless the generated
request happens to be valid; afterwards a valid request still succeeds.

The same daemon serves HTTP: 600 generated bodies (JSON of any shape, the
endpoints' fields with wrong types and extreme numbers, NaN and Infinity, raw
bytes) go to every endpoint, each answered with a status of the documented set
and an error body in its family's shape carrying a stable code.
"""

import json
import math

import httpx
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import fresh_home
from daemon_proc import DaemonProcess
from test_auth import add_client, free_port
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
def daemon(home, tmp_path_factory):
    root = fresh_home(home)
    port = free_port()
    d = DaemonProcess(root, tmp_path_factory.mktemp("fuzz") / "s" / "pe.sock", "--http", f"127.0.0.1:{port}").wait_ready()
    with d.client() as owner:
        owner.index_add("fuzz", [{"id": 1, "text": "the parcel code is 4471"}], store_text=True)
    d.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60,
                          headers={"Authorization": f"Bearer {add_client(root, 'fuzzer', 'embed', 'search:fuzz')}"})
    yield d
    d.http.close()
    assert d.stop() == 0


@pytest.fixture(scope="module")
def sock(daemon):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(daemon.endpoint)
    yield s
    s.close()


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


# -- HTTP ---------------------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                         st.sampled_from([1e308, -1e308, 5e-324, -0.0, math.inf]), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                 st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=10)
good_text = st.sampled_from(["running late", "parcel code 4471", "€12.50 at the café", "x" * 600])
http_texts = st.one_of(good_text, texts.filter(lambda t: not isinstance(t, bytes)),
                       st.lists(st.integers(-5, 2**40), max_size=4), json_values)
http_inputs = st.one_of(good_text, st.lists(good_text, min_size=1, max_size=4), http_texts,
                        st.lists(http_texts, max_size=4))
model = st.one_of(st.sampled_from(["all-minilm-l6-v2:q8_0", "nope", "", "../../etc/passwd"]), json_values)
dims = st.one_of(st.sampled_from([384, 128]), st.integers(-5, 10**6), json_values)
flag = st.one_of(st.booleans(), json_values)


def body(required: dict, optional: dict):
    """An endpoint's fields: the required ones usually there, every value often wrong."""
    return st.one_of(st.fixed_dictionaries(required, optional=optional),
                     st.fixed_dictionaries({}, optional={**required, **optional}))


BODIES = {
    "/v1/embeddings": body({"input": http_inputs}, {
        "model": model, "dimensions": dims, "user": json_values,
        "encoding_format": st.one_of(st.sampled_from(["float", "base64", "binary"]), json_values),
        "input_type": st.one_of(st.sampled_from(["query", "document", "other"]), json_values)}),
    "/api/embed": body({"model": st.one_of(st.just("all-minilm-l6-v2:q8_0"), model), "input": http_inputs}, {
        "truncate": flag, "dimensions": dims, "options": json_values,
        "keep_alive": st.one_of(st.sampled_from(["5m", "-1", "soon", ""]), st.integers(-5, 10**12), json_values)}),
    "/embed": body({"inputs": http_inputs}, {"normalize": flag, "truncate": flag, "dimensions": dims,
                                             "prompt_name": st.one_of(st.sampled_from(["query", "passage", "x"]),
                                                                      json_values)}),
    "/v1/rerank": body({"query": http_texts, "documents": http_inputs}, {
        "model": model, "top_n": st.one_of(st.integers(-3, 10**9), json_values), "return_documents": flag}),
    "/rerank": body({"query": http_texts, "texts": http_inputs}, {
        "model": model, "raw_scores": flag, "return_text": flag, "truncate": flag}),
    "/v1/search": body({"collection": st.one_of(st.sampled_from(["fuzz", "sms", "", "nope"]), json_values),
                        "query": st.one_of(good_text, http_texts)}, {
        "k": st.one_of(st.integers(-2, 10**6), json_values), "rescore_multiplier": st.one_of(st.integers(-2, 10**4), json_values),
        "mode": st.one_of(st.sampled_from(["hybrid", "vector", "lexical", "x"]), json_values),
        "filter": json_values, "with_text": flag, "rerank": model}),
}
http_requests = st.sampled_from(sorted(BODIES)).flatmap(lambda path: st.tuples(st.just(path), st.one_of(
    BODIES[path].map(lambda b: json.dumps(b).encode()),  # NaN / Infinity literals included
    json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=200))))
CLIENT_ERRORS = {code for code, e in P.ERRORS.items() if 400 <= e.http < 500 and code != P.UNAUTHORIZED}
"""What a body may earn with a good token: any input error of the registry, never a 5xx or a 401."""
http_seen: dict[int, int] = {}


def error_code(path: str, body) -> str:
    """The daemon's stable code out of the family's error shape."""
    if path.startswith("/v1/"):
        assert set(body["error"]) >= {"message", "type", "code"}, body
        return body["error"]["code"]
    if path.startswith("/api/"):
        assert isinstance(body["error"], str) and body["error"], body
        return body["code"]
    assert isinstance(body["error"], str) and body["error"], body
    return body["error_type"]


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(request=http_requests)
def test_every_malformed_http_body_gets_a_family_shaped_answer(daemon, request):
    path, payload = request
    r = daemon.http.post(path, content=payload)
    http_seen[r.status_code] = http_seen.get(r.status_code, 0) + 1
    body = r.json()
    if r.status_code != 200:
        code = error_code(path, body)
        assert code in CLIENT_ERRORS and r.status_code == P.ERRORS[code].http, (path, payload, r.status_code, body)


def test_daemon_still_serves_http_after_the_fuzzing(daemon):
    assert sum(http_seen.values()) >= 600 and {200, 400} <= set(http_seen), http_seen  # valid ones got through too
    r = daemon.http.post("/v1/embeddings", json={"input": ["still here"]})
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384
    hits = daemon.http.post("/v1/search", json={"collection": "fuzz", "query": "parcel code 4471"}).json()["hits"]
    assert hits[0]["id"] == 1
