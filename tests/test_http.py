"""The HTTP transport against a real daemon, with the clients people already use (openai, LangChain, LlamaIndex, httpx).

One daemon serves ZeroMQ on its Unix socket and HTTP on loopback; every vector
that comes over HTTP is compared with the ZeroMQ client's for the same request.
The hostile cases talk raw sockets, as an attacker would, and check after each
that the daemon still answers both transports.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from conftest import fresh_home
from daemon_proc import DaemonProcess, DecodeGate, wait_until
from test_auth import add_client, free_port

Q8 = "all-minilm-l6-v2:q8_0"
TEXTS = ["Are we still meeting for dinner tonight?", "Your parcel is waiting, code 4471",
         "The invoice for $1,250.00 is due Friday", "call me when you land"]


@pytest.fixture(scope="module")
def served(home, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http")
    root = fresh_home(home, tmp / "home")
    port = free_port()
    d = DaemonProcess(root, tmp / "pe.sock", "--model", Q8, "--http", f"127.0.0.1:{port}").wait_ready()
    with d.client() as owner:  # the Unix socket's peer is the owner: admin, no token
        owner.index_add("sms", [{"id": 1, "text": "Are we still meeting for dinner tonight?"},
                                {"id": 2, "text": "You have won a prize, call now"}], store_text=True)
        owner.index_add("work", [{"id": 1, "text": "The meeting moved to 3pm"}])
    d.url = f"http://127.0.0.1:{port}"
    d.port = port
    d.embed_token = add_client(root, "notes", "embed")
    d.sms_token = add_client(root, "smsapp", "embed", "search:sms")
    yield d
    assert d.stop() == 0


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def zmq_vectors(d, texts, **kw) -> np.ndarray:
    with d.client(timeout=60) as c:
        return c.embed(texts, model=Q8, **kw)


def assert_alive(d) -> None:
    """Both transports still answer after whatever the test did."""
    with d.client(timeout=30) as c:
        assert c.embed(["still here"]).shape == (1, 384)
    r = httpx.post(f"{d.url}/v1/embeddings", json={"input": "still here"}, headers=bearer(d.embed_token), timeout=30)
    assert r.status_code == 200, r.text


# -- the clients nobody here wrote ---------------------------------------------------------


def test_openai_sdk_base64_and_float_equal_the_zeromq_vectors(served):
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key=served.embed_token, max_retries=0)
    want = zmq_vectors(served, TEXTS)
    default = client.embeddings.create(model=Q8, input=TEXTS)  # the SDK asks for base64 when numpy is installed
    floats = client.embeddings.create(model=Q8, input=TEXTS, encoding_format="float")
    for reply in (default, floats):
        got = np.array([e.embedding for e in sorted(reply.data, key=lambda e: e.index)], np.float32)
        assert got.shape == (4, 384)
        assert np.array_equal(got, want)
        assert reply.model == Q8
    # Real token counts: [CLS] + the words' pieces + [SEP] for each text, the same as Ollama's prompt_eval_count.
    assert default.usage.prompt_tokens == default.usage.total_tokens == floats.usage.prompt_tokens
    ollama = httpx.post(f"{served.url}/api/embed", json={"model": Q8, "input": TEXTS},
                        headers=bearer(served.embed_token), timeout=60).json()
    assert ollama["prompt_eval_count"] == default.usage.prompt_tokens
    assert sum(len(t.split()) + 2 for t in TEXTS) <= default.usage.prompt_tokens < 4 * sum(len(t) for t in TEXTS)
    # One string, and the model's own dimension count, are accepted.
    one = client.embeddings.create(model=Q8, input=TEXTS[0], dimensions=384, user="someone")
    assert np.array_equal(np.array(one.data[0].embedding, np.float32), zmq_vectors(served, TEXTS[:1])[0])


def test_openai_sdk_dimensions_the_model_was_not_trained_for_are_refused(served):
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key=served.embed_token, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=Q8, input=TEXTS, dimensions=128)
    assert e.value.status_code == 400 and e.value.code == "invalid_input"
    assert "Matryoshka" in e.value.message


def test_openai_sdk_errors_carry_the_daemon_code(served):
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key=served.embed_token, max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="no-such-model", input="hi")
    assert e.value.code == "unknown_model"
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=f"{served.url}/v1", api_key="pe_wrong", max_retries=0).embeddings.create(
            model=Q8, input="hi")
    assert e.value.code == "unauthorized" and "pe_wrong" not in str(e.value.body)
    models = client.models.list()
    assert Q8 in [m.id for m in models.data]


def test_langchain_openai_embeddings_equal_the_zeromq_vectors(served):
    from langchain_openai import OpenAIEmbeddings

    emb = OpenAIEmbeddings(model=Q8, base_url=f"{served.url}/v1", api_key=served.embed_token,
                           check_embedding_ctx_length=False, max_retries=0)
    docs = np.array(emb.embed_documents(TEXTS), np.float32)
    query = np.array(emb.embed_query(TEXTS[2]), np.float32)
    want = zmq_vectors(served, TEXTS)
    assert np.array_equal(docs, want)
    assert np.array_equal(query, zmq_vectors(served, [TEXTS[2]])[0])


def test_llamaindex_openai_like_embedding_equals_the_zeromq_vectors(served):
    from llama_index.embeddings.openai_like import OpenAILikeEmbedding

    emb = OpenAILikeEmbedding(model_name=Q8, api_base=f"{served.url}/v1", api_key=served.embed_token,
                              embed_batch_size=16, max_retries=0)
    got = np.array(emb.get_text_embedding_batch(TEXTS), np.float32)
    assert np.array_equal(got, zmq_vectors(served, TEXTS))


def test_token_id_input_is_refused_with_the_reason(served):
    r = httpx.post(f"{served.url}/v1/embeddings", json={"model": Q8, "input": [[101, 2023, 102]]},
                   headers=bearer(served.embed_token))
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "invalid_input" and "token ids" in err["message"]
    assert "check_embedding_ctx_length=False" in err["message"]


# -- Ollama and TEI shapes -----------------------------------------------------------------


def test_ollama_embed_fields_truncate_and_tags(served):
    h = bearer(served.embed_token)
    r = httpx.post(f"{served.url}/api/embed", json={"model": Q8, "input": TEXTS[1], "keep_alive": "5m"},
                   headers=h, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == Q8 and len(body["embeddings"]) == 1
    assert np.array_equal(np.array(body["embeddings"], np.float32), zmq_vectors(served, [TEXTS[1]], truncate=True))
    assert isinstance(body["total_duration"], int) and body["total_duration"] > 0
    assert isinstance(body["load_duration"], int) and 0 <= body["load_duration"] <= body["total_duration"]
    assert body["prompt_eval_count"] >= 8
    long_text = "word " * 2000
    cut = httpx.post(f"{served.url}/api/embed", json={"model": Q8, "input": long_text}, headers=h, timeout=60)
    assert cut.status_code == 200 and len(cut.json()["embeddings"][0]) == 384  # Ollama truncates by default
    assert cut.json()["prompt_eval_count"] <= 512
    refused = httpx.post(f"{served.url}/api/embed", json={"model": Q8, "input": long_text, "truncate": False},
                         headers=h, timeout=60)
    assert refused.status_code == 400
    assert refused.json()["code"] == "text_too_long" and isinstance(refused.json()["error"], str)
    tags = httpx.get(f"{served.url}/api/tags", headers=h).json()["models"]
    q8 = next(m for m in tags if m["name"] == Q8)
    assert q8["size"] > 10_000_000 and len(q8["digest"]) == 64
    assert q8["details"]["quantization_level"] == "Q8_0"


def test_tei_embed_is_a_list_of_vectors(served):
    r = httpx.post(f"{served.url}/embed", json={"inputs": TEXTS[:2], "normalize": True},
                   headers=bearer(served.embed_token), timeout=60)
    assert r.status_code == 200
    assert np.array_equal(np.array(r.json(), np.float32), zmq_vectors(served, TEXTS[:2]))
    r = httpx.post(f"{served.url}/embed", json={"inputs": ""}, headers=bearer(served.embed_token))
    assert r.status_code == 400 and r.json()["error_type"] == "empty_text"


# -- auth, exactly as on TCP ---------------------------------------------------------------


def test_without_a_token_only_health_answers(served):
    assert httpx.get(f"{served.url}/health").json() == {"status": "ok"}
    for method, path, family in (("POST", "/v1/embeddings", "openai"), ("POST", "/api/embed", "ollama"),
                                 ("POST", "/embed", "tei"), ("GET", "/v1/models", "openai"),
                                 ("POST", "/v1/search", "openai"), ("POST", "/rerank", "tei")):
        r = httpx.request(method, f"{served.url}{path}", content=b"{not json")  # refused before the body is read
        assert r.status_code == 401, (path, r.text)
        body = r.json()
        code = body["error"]["code"] if family == "openai" else body.get("code") or body.get("error_type")
        assert code == "unauthorized", (path, body)
    assert httpx.get(f"{served.url}/nope").status_code == 404


def test_forbidden_says_nothing_about_other_collections(served):
    h = bearer(served.sms_token)
    own = httpx.post(f"{served.url}/v1/search", json={"collection": "sms", "query": "dinner tonight", "k": 1},
                     headers=h, timeout=60)
    assert own.status_code == 200, own.text
    hit = own.json()["hits"][0] if isinstance(own.json(), dict) else own.json()[0]
    assert hit["id"] == 1 and "dinner" in hit["text"]
    existing = httpx.post(f"{served.url}/v1/search", json={"collection": "work", "query": "meeting"}, headers=h)
    missing = httpx.post(f"{served.url}/v1/search", json={"collection": "nope", "query": "meeting"}, headers=h)
    assert existing.status_code == missing.status_code == 403
    assert existing.json() == missing.json() and existing.json()["error"]["code"] == "forbidden"
    # An embed-only token may not search at all, whatever the arguments.
    r = httpx.post(f"{served.url}/v1/search", content=b"[[[[", headers=bearer(served.embed_token))
    assert r.status_code == 403


def test_bad_tokens_block_the_connection_with_retry_after(served):
    with httpx.Client(base_url=served.url, timeout=30) as http:  # one keep-alive connection
        codes = []
        for i in range(12):
            r = http.post("/v1/embeddings", json={"input": "hi"}, headers=bearer(f"pe_guess{i}"))
            codes.append(r.status_code)
        assert set(codes) == {401}
        assert "retry-after" in r.headers and int(r.headers["retry-after"]) >= 1
        assert "too many bad tokens" in r.json()["error"]["message"]
        blocked = http.post("/v1/embeddings", json={"input": "hi"}, headers=bearer(served.embed_token))
        assert blocked.status_code == 401  # even the right token, on this connection, until the block ends
    # A new connection starts clean.
    r = httpx.post(f"{served.url}/v1/embeddings", json={"input": "hi"}, headers=bearer(served.embed_token))
    assert r.status_code == 200


# -- hostile input -------------------------------------------------------------------------


def raw(port: int, data: bytes, timeout: float = 30) -> bytes:
    """Send ``data`` on a fresh connection and return all the daemon answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def test_body_over_the_cap_is_refused_before_it_is_sent(served):
    head = (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: 5000000\r\n\r\n" % served.embed_token.encode())
    assert status(raw(served.port, head)) == 413  # the 5 MB body never comes: the answer needs none of it
    chunked = (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" % served.embed_token.encode())
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as s:
        s.sendall(chunked)
        piece = b"x" * 65536
        reply = b""
        try:
            for _ in range(100):  # 6.5 MB, over the 4 MiB cap
                s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass
    assert reply and status(reply) == 413
    assert_alive(served)


def test_nesting_headers_and_junk_are_refused(served):
    h = bearer(served.embed_token)
    deep = b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = httpx.post(f"{served.url}/v1/embeddings", content=deep, headers=h)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_input"
    for body in (b'{"input": 1e400}', b'{"input": ["a"], "dimensions": -1}', b'{"input": ["a"], "dimensions": 1e308}',
                 b'{"input": NaN}', b"\xff\xfe", b'{"input": {"a": "b"}}'):
        r = httpx.post(f"{served.url}/v1/embeddings", content=body, headers=h)
        assert r.status_code == 400, (body, r.text)
    # integers past msgpack's 64 bits (found by tests/test_fuzz.py): 400, not a 500
    for path, body in (("/v1/search", b'{"collection": -9223512774343131136, "query": "x"}'),
                       ("/api/embed", b'{"model": "%s", "input": "a", "keep_alive": %d}' % (Q8.encode(), 2**70)),
                       ("/v1/search", b'{"collection": "sms", "query": "x", "k": %d}' % 2**70)):
        r = httpx.post(f"{served.url}{path}", content=body, headers=bearer(served.sms_token))
        assert r.status_code == 400, (body, r.text)
    many = "".join(f"X-H{i}: v\r\n" for i in range(100)).encode()
    assert status(raw(served.port, b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")) == 431
    huge = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n"
    assert status(raw(served.port, huge)) == 431
    assert status(raw(served.port, b"NOT HTTP AT ALL\r\n\r\n")) == 400
    assert_alive(served)


def test_a_trickling_request_times_out_while_others_are_served(served):
    """A client sending a byte at a time is cut with a 408; meanwhile ZeroMQ and HTTP clients are answered."""
    request = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n"
    s = socket.create_connection(("127.0.0.1", served.port), timeout=60)
    done = threading.Event()
    reply = bytearray()

    def trickle():
        try:
            for b in request + b'{"input": "hi"}':
                if done.is_set():
                    return
                s.send(bytes([b]))
                time.sleep(0.5)
        except OSError:
            pass

    def read():
        try:
            while chunk := s.recv(65536):
                reply.extend(chunk)
        except OSError:
            pass
        done.set()

    threads = [threading.Thread(target=trickle), threading.Thread(target=read)]
    for t in threads:
        t.start()
    served_meanwhile = 0
    while not done.is_set():  # keeps serving others the whole time the trickle holds its connection
        assert_alive(served)
        served_meanwhile += 1
        done.wait(0.5)
    for t in threads:
        t.join(30)
    s.close()
    assert status(bytes(reply)) == 408, bytes(reply)
    assert served_meanwhile >= 2


def test_connection_cap_refuses_one_more_and_recovers(served):
    idle = [socket.create_connection(("127.0.0.1", served.port), timeout=30) for _ in range(64)]
    try:
        wait_until(lambda: httpx.get(f"{served.url}/v1/models", headers=bearer(served.embed_token)).status_code == 503
                   or None, "the 65th connection refused")
        r = httpx.get(f"{served.url}/health")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        with served.client() as c:  # ZeroMQ clients are not starved by HTTP connections
            assert c.embed(["zmq"]).shape == (1, 384)
    finally:
        for s in idle:
            s.close()
    wait_until(lambda: httpx.get(f"{served.url}/health").status_code == 200 or None, "connections freed")


def test_random_bodies_never_hurt_the_daemon(served):
    """Fuzz: random JSON-ish bodies on every endpoint get a JSON error or a reply, never a dead daemon."""
    rng = np.random.default_rng(31)
    atoms = [b"{", b"}", b"[", b"]", b'"input"', b'"query"', b'"texts"', b'"documents"', b'"collection"', b":", b",",
             b'"sms"', b"1e308", b"-1", b"0", b"null", b"true", b'"a"', b"18446744073709551616", b"\\u0000", b'"\xc3"']
    paths = ["/v1/embeddings", "/api/embed", "/embed", "/v1/rerank", "/rerank", "/v1/search"]
    with httpx.Client(base_url=served.url, headers=bearer(served.sms_token), timeout=60) as http:
        for i in range(300):
            body = b"".join(rng.choice(atoms, size=int(rng.integers(1, 30))))
            r = http.post(paths[i % len(paths)], content=body)
            assert r.status_code in (200, 400, 403, 404, 413), (body, r.status_code, r.text)
            r.json()
    assert_alive(served)


# -- load, busy, health ---------------------------------------------------------------------


def test_health_is_503_while_the_default_model_loads(home, tmp_path):
    gate = DecodeGate(tmp_path / "gate")
    port = free_port()
    d = DaemonProcess(fresh_home(home, tmp_path / "home"), tmp_path / "pe.sock", "--model", Q8,
                      "--http", f"127.0.0.1:{port}",
                      env={"POCKETEMBED_FAILPOINTS": "models:load=hold", "POCKETEMBED_FAILPOINT_GATE": str(gate.path)})
    url = f"http://127.0.0.1:{port}"

    def health():
        try:
            return httpx.get(f"{url}/health", timeout=5)
        except httpx.TransportError:
            return None

    try:
        r = wait_until(health, "HTTP listening while the model loads")
        assert r.status_code == 503 and r.json() == {"status": "loading"} and r.headers["retry-after"] == "1"
        r = httpx.post(f"{url}/v1/embeddings", json={"input": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        gate.release()
        wait_until(lambda: (h := health()) is not None and h.status_code == 200, "ready once loaded")
    finally:
        gate.release()
        assert d.stop() == 0
        gate.close()


def test_a_full_queue_is_429_with_retry_after(gated_daemon):
    d, gate = gated_daemon("--model", Q8, "--workers", "1", "--queue-texts", "4",
                           "--http", f"127.0.0.1:{(port := free_port())}")
    token = add_client(d.home, "bulk", "embed")
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def post():
        r = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": ["a b", "c d", "e f", "g h"]},
                       headers=bearer(token), timeout=120)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=post) for _ in range(5)]
    for t in threads:
        t.start()
    # One worker holds one request at the gate and at most one more fits the queue: three or four are refused.
    wait_until(lambda: len(results) >= 3 or None, "three requests refused while the decode is held")
    with lock:
        refused = list(results)
    for r in refused:
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "busy"
        assert r.json()["error"]["type"] == "rate_limit_error"
    gate.release()
    for t in threads:
        t.join(120)
    codes = [r.status_code for r in results]
    assert len(codes) == 5 and set(codes) == {200, 429} and codes.count(429) >= 3, codes  # none lost, none failed


# -- the docs' curl examples ---------------------------------------------------------------


def test_openapi_file_is_generated_from_the_endpoint_table():
    from pathlib import Path

    from pocketembed.daemon import http_api

    doc = Path(__file__).resolve().parents[1] / "docs" / "openapi.json"
    assert doc.read_text() == http_api.render_openapi(), \
        "docs/openapi.json is stale: python -m pocketembed.daemon.http_api docs/openapi.json"
    paths = json.loads(doc.read_text())["paths"]
    assert {(e.method.lower(), e.path) for e in http_api.ENDPOINTS} == {(m, p) for p in paths for m in paths[p]}


def test_base64_is_little_endian_float32(served):
    r = httpx.post(f"{served.url}/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "base64"},
                   headers=bearer(served.embed_token))
    got = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), "<f4")
    assert np.array_equal(got, zmq_vectors(served, TEXTS[:1])[0])
